//! End-to-end mutual RA-TLS: a real `guest-agent` process (`serve --no-init`, simulated TEE from
//! a fw_cfg-style root, a synthetic GGUF model) whose measured host config has `client_auth`
//! pinning one client certificate, checked from every side:
//!
//! - its RTMR3 log has the `client_auth` event with exactly that pin, and a verifier's view shows
//!   it (`RaTlsHttpClient::attest`: `verdict.rtmr3.client_cert_sha256`; `host-launcher verify`:
//!   "client auth: REQUIRED ... SHA-256 <pin>");
//! - a TLS client without a certificate, and one with another certificate, fail the handshake;
//!   the agent logs each failure (naming the wrong certificate's SHA-256, no secret);
//! - `gateway --client-cert/--client-key` with the pinned certificate verifies the worker and
//!   serves chat completions (plain and streamed) through it; a gateway without a certificate,
//!   and one with the wrong certificate, never mark it usable and answer 503.
//!
//! Needs nothing beyond the workspace's binaries (no chain, no Python, no QEMU).

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use attestation::client_auth::ClientIdentity;
use attestation::{HttpError, Policy, RaTlsHttpClient, SimulatedTee, TdRegisters, Verifier};
use e2e_tests::workspace_bin;

/// A child process killed on drop, its stderr collected.
struct Proc {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Proc {
    fn spawn(name: &'static str, cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let log = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().unwrap();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                eprintln!("  {name}: {line}");
                let mut g = l.lock().unwrap();
                g.push_str(&line);
                g.push('\n');
            }
        });
        Proc { child, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn wait_log(&self, needle: &str, timeout: Duration) {
        let end = Instant::now() + timeout;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < end,
                "no {needle:?} within {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One plain HTTP/1.1 request; (status, body).
fn http(port: u16, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let b = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{b}",
        b.len()
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map_or("", |x| x.1).to_owned();
    (status, body)
}

fn worker(port: u16) -> serde_json::Value {
    let (st, body) = http(port, "GET", "/gateway/workers", None);
    assert_eq!(st, 200, "{body}");
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    j["workers"][0].clone()
}

/// The agent's root: host config (model + client_auth pinning `pin`), simulated TEE.
fn agent_root(dir: &Path, seed: u8, model: &Path, model_sha: &str, pin: [u8; 32]) -> [u8; 32] {
    let by_name = dir.join("sys/firmware/qemu_fw_cfg/by_name");
    let cfg = by_name.join(worker_api::HOST_CONFIG_FW_CFG_NAME);
    std::fs::create_dir_all(&cfg).unwrap();
    let host_config = worker_api::HostConfig {
        model: Some(model.display().to_string()),
        model_sha256: Some(model_sha.to_owned()),
        client_auth: Some(worker_api::ClientAuth {
            cert_sha256: vec![hex::encode(pin)],
        }),
        ..worker_api::HostConfig::default()
    };
    std::fs::write(cfg.join("raw"), host_config.to_canonical_json()).unwrap();
    let sim = by_name.join(worker_api::SIMULATED_TEE_FW_CFG_NAME);
    std::fs::create_dir_all(&sim).unwrap();
    let hex48 = |b: u8| hex::encode([b; 48]);
    let defaults = measurements::image::Options::default();
    let s = worker_api::SimulatedTeeConfig {
        seed: hex::encode([seed; 32]),
        mrtd: hex48(seed),
        rtmr0: hex48(1),
        rtmr1: hex48(2),
        rtmr2: hex48(3),
        td_attributes: defaults.td_attributes,
        xfam: defaults.xfam,
    };
    std::fs::write(sim.join("raw"), serde_json::to_vec(&s).unwrap()).unwrap();
    SimulatedTee::from_seed(&[seed; 32], TdRegisters::default())
        .unwrap()
        .public_key()
}

#[test]
fn mutual_ratls_end_to_end() {
    let agent_bin = workspace_bin("guest-agent", "guest-agent");
    let gateway_bin = workspace_bin("gateway", "gateway");
    let launcher_bin = workspace_bin("host-launcher", "host-launcher");
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();

    // Two client certificates: the pinned one and a stranger's.
    let write_id = |name: &str| -> (ClientIdentity, String, String) {
        let (cert, key) = ClientIdentity::generate_pem(name).unwrap();
        let (c, k) = (d.join(format!("{name}.crt")), d.join(format!("{name}.key")));
        std::fs::write(&c, &cert).unwrap();
        std::fs::write(&k, &key).unwrap();
        let id = ClientIdentity::from_pem(cert.as_bytes(), key.as_bytes()).unwrap();
        (id, c.display().to_string(), k.display().to_string())
    };
    let (good, good_crt, good_key) = write_id("gateway");
    let (stranger, bad_crt, bad_key) = write_id("stranger");
    let pin = hex::encode(good.cert_sha256());

    let cfg = inference::model::LlamaConfig::tiny();
    let gguf = inference::synthetic::synthetic_gguf(&cfg, inference::GgmlType::Q8_0, 5).unwrap();
    let model = d.join("mtls-synthetic.gguf");
    std::fs::write(&model, &gguf).unwrap();
    let model_sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&gguf))
    };

    let root = d.join("agent");
    let key = agent_root(&root, 31, &model, &model_sha, good.cert_sha256());
    let port = free_port();
    let agent = Proc::spawn(
        "agent",
        Command::new(&agent_bin).args([
            "serve",
            "--no-init",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--root",
            root.to_str().unwrap(),
        ]),
    );
    agent.wait_log(worker_api::READY_MARKER, Duration::from_secs(120));
    assert!(
        agent
            .log()
            .contains("RA-TLS listener requires a client certificate: 1 pinned"),
        "{}",
        agent.log()
    );
    assert!(agent.log().contains(&pin), "{}", agent.log());
    let url = format!("https://127.0.0.1:{port}");
    let verifier = Verifier::simulated(Policy::default().with_simulated(true), key);
    let t = Duration::from_secs(30);

    // 1. The pinned client: accepted, and the verifier sees the requirement in the RTMR3 log.
    let a = RaTlsHttpClient::new(verifier.clone())
        .with_client_identity(good.clone())
        .attest(&url, t)
        .unwrap();
    assert!(a.verdict.accepted, "{:?}", a.verdict.reasons);
    let r3 = a.verdict.rtmr3.clone().unwrap();
    assert_eq!(r3.client_cert_sha256, Some(vec![pin.clone()]));
    assert_eq!(r3.replayed, r3.quote_rtmr3);
    assert_eq!(
        r3.event_types,
        [
            "host_config",
            "model",
            "payout_wallet",
            "root_contract",
            "client_auth",
            "agent_ready"
        ]
    );

    // 2. No certificate, and a stranger's: the handshake fails, the agent logs why.
    let before = agent.log().matches("TLS handshake with").count();
    let err = RaTlsHttpClient::new(verifier.clone())
        .attest(&url, t)
        .expect_err("a client without a certificate was served");
    assert!(!matches!(err, HttpError::Rejected(_)), "{err}");
    let err = RaTlsHttpClient::new(verifier.clone())
        .with_client_identity(stranger.clone())
        .attest(&url, t)
        .expect_err("a client with an unpinned certificate was served");
    assert!(!matches!(err, HttpError::Rejected(_)), "{err}");
    let end = Instant::now() + Duration::from_secs(10);
    while agent.log().matches("TLS handshake with").count() < before + 2 {
        assert!(Instant::now() < end, "{}", agent.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = agent.log();
    assert!(log.contains("peer sent no certificates"), "{log}");
    assert!(
        log.contains(&hex::encode(stranger.cert_sha256())),
        "the refusal names the certificate: {log}"
    );
    assert!(!log.contains("PRIVATE KEY"), "{log}");

    // 3. host-launcher verify shows the requirement (and needs the certificate to get through).
    let verify = |extra: &[&str]| {
        let mut args = vec![
            "verify",
            "--url",
            &url,
            "--allow-simulated",
            "--simulated-key",
        ];
        let k = hex::encode(key);
        args.push(&k);
        args.extend_from_slice(extra);
        let out = Command::new(&launcher_bin).args(&args).output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = verify(&["--client-cert", &good_crt, "--client-key", &good_key]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!(
            "client auth: REQUIRED (mutual RA-TLS); admits only client certificates with SHA-256 {pin}"
        )),
        "{out}"
    );
    let (code, out) = verify(&[]);
    assert_eq!(code, Some(4), "no certificate: unreachable (exit 4): {out}");

    // 4. Gateways: with the pinned certificate, without one, with the stranger's.
    let gateway = |name: &'static str, extra: &[&str]| {
        let gport = free_port();
        let mut args = vec![
            "--listen".to_owned(),
            format!("127.0.0.1:{gport}"),
            "--worker".to_owned(),
            url.clone(),
            "--allow-simulated".to_owned(),
            "--simulated-key".to_owned(),
            hex::encode(key),
            "--check-interval".to_owned(),
            "1".to_owned(),
            "--verify-timeout".to_owned(),
            "10".to_owned(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let p = Proc::spawn(name, Command::new(&gateway_bin).args(&args));
        p.wait_log("ready: OpenAI API", Duration::from_secs(60));
        (p, gport)
    };
    let (_gw, gport) = gateway(
        "gateway",
        &["--client-cert", &good_crt, "--client-key", &good_key],
    );
    let (_gw_none, nport) = gateway("gateway-nocert", &[]);
    let (_gw_bad, bport) = gateway(
        "gateway-stranger",
        &["--client-cert", &bad_crt, "--client-key", &bad_key],
    );
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let w = worker(gport);
        if w["status"] == "up" {
            assert_eq!(
                w["verdict"]["rtmr3"]["client_cert_sha256"],
                serde_json::json!([pin]),
                "{w:#}"
            );
            break;
        }
        assert!(Instant::now() < end, "worker not up: {w:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let req = |stream: bool| {
        serde_json::json!({
            "model": "mtls-synthetic",
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 4,
            "temperature": 0,
            "stream": stream,
        })
        .to_string()
    };
    let (st, body) = http(gport, "POST", "/v1/chat/completions", Some(&req(false)));
    assert_eq!(st, 200, "{body}");
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(j["object"], "chat.completion", "{j}");
    assert!(
        j["usage"]["completion_tokens"].as_u64().unwrap() >= 1,
        "{j}"
    );
    let (st, body) = http(gport, "POST", "/v1/chat/completions", Some(&req(true)));
    assert_eq!(st, 200, "{body}");
    assert!(body.contains("data: [DONE]"), "{body}");

    // The others: checked several times by now, never usable; requests fail closed.
    for (p, what, code) in [
        (nport, "no certificate", "client_cert_required"),
        (bport, "the stranger's", "client_cert_refused"),
    ] {
        let w = worker(p);
        assert_ne!(w["status"], "up", "gateway with {what}: {w:#}");
        assert!(w.to_string().contains(code), "gateway with {what}: {w:#}");
        let (st, body) = http(p, "POST", "/v1/chat/completions", Some(&req(false)));
        assert_eq!(st, 503, "gateway with {what}: {body}");
    }
}
