//! End-to-end test of the `guest-agent` binary in `serve --no-init` mode: a fake guest root
//! (release file, fw_cfg host config, TDX device node), the ready marker on stderr, `/health`,
//! then `POST /shutdown` ending the process with status 0. The agent serves RA-TLS; these tests
//! talk TLS 1.3 to it without checking its evidence (that is tested in the server's unit tests
//! and end to end), because a fake root has no TEE.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_rustls::rustls;

use worker_api::{HOST_CONFIG_FW_CFG_NAME, Health, HostConfig, ShutdownAck};

fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    request(addr, method, path, "")
}

fn post_json(addr: SocketAddr, path: &str, body: &str) -> (u16, String) {
    request(addr, "POST", path, body)
}

/// Accepts any server certificate (TEST ONLY: a fake guest root has no TEE evidence).
#[derive(Debug)]
struct AcceptAnyCert;

impl rustls::client::danger::ServerCertVerifier for AcceptAnyCert {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.3 only".into()))
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        vec![rustls::SignatureScheme::ED25519]
    }
}

/// One HTTP/1.1 request over TLS 1.3 with a JSON body (possibly empty); returns status and body.
fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let sock = TcpStream::connect(addr).expect("connect");
    sock.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    let cfg = rustls::ClientConfig::builder_with_provider(attestation::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert))
        .with_no_client_auth();
    let conn = rustls::ClientConnection::new(
        Arc::new(cfg),
        rustls::pki_types::ServerName::try_from("ratls.invalid").expect("name"),
    )
    .expect("client");
    let mut s = rustls::StreamOwned::new(conn, sock);
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("write");
    let mut raw = Vec::new();
    // The agent closes with close_notify; tolerate a bare EOF after a complete answer.
    if let Err(e) = s.read_to_end(&mut raw) {
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
    }
    let text = String::from_utf8(raw).expect("utf8");
    let (head, body) = text.split_once("\r\n\r\n").expect("header end");
    let status = head
        .split_whitespace()
        .nth(1)
        .expect("status")
        .parse()
        .expect("number");
    (status, body.to_string())
}

#[test]
fn serve_no_init_reports_a_fake_guest_and_exits_on_shutdown() {
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    std::fs::create_dir_all(r.join("etc/worker-image")).expect("mkdir");
    std::fs::write(
        r.join("etc/worker-image/release.json"),
        br#"{"name":"worker","version":"9.9.9"}"#,
    )
    .expect("write release");
    std::fs::create_dir_all(r.join("dev")).expect("mkdir");
    std::fs::write(r.join("dev/tdx_guest"), b"").expect("touch");
    let cfg_dir = r
        .join("sys/firmware/qemu_fw_cfg/by_name")
        .join(HOST_CONFIG_FW_CFG_NAME);
    std::fs::create_dir_all(&cfg_dir).expect("mkdir");
    let cfg = HostConfig {
        model: Some("smollm2-135m".into()),
        ..HostConfig::default()
    }
    .to_canonical_json();
    std::fs::write(cfg_dir.join("raw"), &cfg).expect("write config");

    let mut child = Command::new(env!("CARGO_BIN_EXE_guest-agent"))
        .args(["serve", "--no-init", "--listen", "127.0.0.1:0", "--root"])
        .arg(r)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn guest-agent");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));

    // Wait for the ready marker and learn the port from it.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut log = String::new();
    let addr: SocketAddr = loop {
        assert!(Instant::now() < deadline, "no ready marker; log:\n{log}");
        let mut line = String::new();
        if stderr.read_line(&mut line).expect("read stderr") == 0 {
            panic!("agent exited before ready; log:\n{log}");
        }
        log.push_str(&line);
        if let Some((_, rest)) = line.split_once(worker_api::READY_MARKER) {
            break rest
                .trim()
                .trim_start_matches("on ")
                .parse()
                .expect("address in ready line");
        }
    };

    let (status, body) = http(addr, "GET", worker_api::HEALTH_PATH);
    assert_eq!(status, 200, "{body}");
    let health: Health = serde_json::from_str(&body).expect("Health");
    assert_eq!(health.image.name, "worker");
    assert_eq!(health.image.version, "9.9.9");
    assert_eq!(health.tee.kind, "tdx");
    // No NVIDIA device in the fake sysfs: said plainly, in /health and in the log.
    let gpu = health.gpu.as_ref().expect("gpu reported");
    assert!(!gpu.present && !gpu.serving, "{gpu:?}");
    assert_eq!(gpu.summary, worker_api::NO_GPU_SUMMARY);
    assert!(
        log.contains("gpu: no GPU present (no NVIDIA PCI device, vendor 0x10de); serving on CPU"),
        "{log}"
    );
    let hc = health.host_config.expect("host config reported");
    assert_eq!(hc.error, None);
    assert_eq!(hc.sha384, guest_agent::measured_config::sha384_hex(&cfg));
    // The fake /dev/tdx_guest is not a TDX device: RTMR3 cannot be extended, and that is said.
    assert!(
        health
            .tee
            .rtmr3_error
            .as_deref()
            .unwrap_or("")
            .contains("RTMR3"),
        "{:?}",
        health.tee
    );
    let (status, body) = http(addr, "GET", worker_api::ATTESTATION_PATH);
    assert_eq!(status, 200, "{body}");
    let att: worker_api::AttestationInfo = serde_json::from_str(&body).expect("AttestationInfo");
    assert_eq!(att.tee, "tdx");
    assert_eq!(att.rtmr3_events.len(), 5);
    assert_eq!(att.rtmr3_events[0].event_type, "host_config");
    assert_eq!(
        att.rtmr3_events[0].payload,
        guest_agent::measured_config::sha384_hex(&cfg)
    );
    assert!(att.evidence_error.is_some(), "no quote from a fake device");

    let (status, body) = http(addr, "POST", worker_api::SHUTDOWN_PATH);
    assert_eq!(status, 200, "{body}");
    let ack: ShutdownAck = serde_json::from_str(&body).expect("ShutdownAck");
    assert!(!ack.powering_off);

    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "agent did not exit after /shutdown"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
    let mut rest = String::new();
    stderr.read_to_string(&mut rest).expect("read rest");
    assert!(rest.contains("stopped: shutdown requested"), "{rest}");
}

#[test]
fn init_refuses_outside_pid1_with_advice() {
    let out = Command::new(env!("CARGO_BIN_EXE_guest-agent"))
        .arg("init")
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("PID 1") && err.contains("serve --no-init"),
        "{err}"
    );
}

/// `serve --model` checks the model's digest, then serves the OpenAI-compatible API beside
/// /health; a wrong digest is refused (the agent keeps serving /health without inference).
#[test]
fn serve_with_a_model_answers_chat_completions_and_refuses_a_wrong_digest() {
    use sha2::Digest as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let gguf = inference::synthetic::synthetic_gguf(
        &inference::model::LlamaConfig::tiny(),
        inference::gguf::GgmlType::Q8_0,
        7,
    )
    .expect("synthetic model");
    let model = dir.path().join("tiny.gguf");
    std::fs::write(&model, &gguf).expect("write model");
    let digest = hex::encode(sha2::Sha256::digest(&gguf));

    for (sha, serves) in [(digest.clone(), true), ("00".repeat(32), false)] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_guest-agent"))
            .args(["serve", "--no-init", "--listen", "127.0.0.1:0", "--model"])
            .arg(&model)
            .args(["--model-sha256", &sha])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn guest-agent");
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
        let mut log = String::new();
        let addr: SocketAddr = loop {
            let mut line = String::new();
            assert!(
                stderr.read_line(&mut line).expect("read") > 0,
                "agent exited; log:\n{log}"
            );
            log.push_str(&line);
            if let Some((_, rest)) = line.split_once(worker_api::READY_MARKER) {
                break rest
                    .trim()
                    .trim_start_matches("on ")
                    .parse()
                    .expect("address");
            }
        };
        let (status, body) = post_json(
            addr,
            "/v1/chat/completions",
            r#"{"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":4,"temperature":0}"#,
        );
        if serves {
            assert_eq!(status, 200, "{body}\n{log}");
            let v: serde_json::Value = serde_json::from_str(&body).expect("json");
            assert_eq!(v["object"], "chat.completion", "{v}");
            assert!(
                v["usage"]["completion_tokens"]
                    .as_u64()
                    .is_some_and(|n| n >= 1),
                "{v}"
            );
            assert!(log.contains("sha256 checked"), "{log}");
        } else {
            assert_eq!(
                status, 404,
                "no inference router without a verified model: {body}"
            );
            assert!(log.contains("not serving inference"), "{log}");
        }
        // The counters are published right after the scheduler step that answered; poll.
        let mut model = None;
        for _ in 0..100 {
            let (status, body) = http(addr, "GET", worker_api::HEALTH_PATH);
            assert_eq!(status, 200);
            let health: Health = serde_json::from_str(&body).expect("Health");
            let m = health.model.expect("model reported");
            let settled = m.batch.as_ref().is_none_or(|b| b.ended >= 1);
            model = Some(m);
            if settled {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let model = model.expect("polled");
        if serves {
            // The scheduler's counters: the completion ran through it and left the batch.
            let b = model.batch.expect("batch counters once serving");
            assert!(b.slots >= 1 && b.kv_blocks >= 1, "{b:?}");
            assert!(
                b.steps >= 1 && b.decoded_tokens >= 1 && b.prefilled_tokens >= 1,
                "{b:?}"
            );
            assert_eq!((b.ended, b.running, b.waiting), (1, 0, 0), "{b:?}");
            assert_eq!(b.free_kv_blocks, b.kv_blocks, "{b:?}");
        } else {
            assert!(model.batch.is_none(), "no scheduler without a served model");
        }
        let _ = http(addr, "POST", worker_api::SHUTDOWN_PATH);
        assert!(child.wait().expect("wait").success());
    }
}

/// Starts `serve --no-init --root ROOT`, returns /health, shuts the agent down.
fn health_of_fake_guest(r: &std::path::Path) -> Health {
    let mut child = Command::new(env!("CARGO_BIN_EXE_guest-agent"))
        .args(["serve", "--no-init", "--listen", "127.0.0.1:0", "--root"])
        .arg(r)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn guest-agent");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut log = String::new();
    let addr: SocketAddr = loop {
        let mut line = String::new();
        if stderr.read_line(&mut line).expect("read stderr") == 0 {
            panic!("agent exited before ready; log:\n{log}");
        }
        log.push_str(&line);
        if let Some((_, rest)) = line.split_once(worker_api::READY_MARKER) {
            break rest
                .trim()
                .trim_start_matches("on ")
                .parse()
                .expect("address in ready line");
        }
    };
    let (status, body) = http(addr, "GET", worker_api::HEALTH_PATH);
    assert_eq!(status, 200, "{body}");
    let _ = http(addr, "POST", worker_api::SHUTDOWN_PATH);
    let _ = child.wait();
    serde_json::from_str(&body).expect("Health")
}

/// A fake guest (a TDX device node, so the CC rule is enforced) with an NVIDIA device but no
/// NVML: the GPU's CC mode cannot be checked, so it is refused with the reason in /health;
/// the measured development flag lets it serve with a warning.
#[test]
fn a_gpu_whose_cc_mode_cannot_be_checked_is_refused_unless_the_dev_flag() {
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    std::fs::create_dir_all(r.join("dev")).expect("mkdir");
    std::fs::write(r.join("dev/tdx_guest"), b"").expect("touch");
    let gpu = r.join("sys/bus/pci/devices/0000:00:10.0");
    std::fs::create_dir_all(&gpu).expect("mkdir");
    std::fs::write(gpu.join("vendor"), "0x10de\n").expect("vendor");
    std::fs::write(gpu.join("device"), "0x2330\n").expect("device");
    std::fs::write(gpu.join("class"), "0x030200\n").expect("class");
    let h = health_of_fake_guest(r);
    let g = h.gpu.expect("gpu reported");
    if g.cc_mode.as_deref() != Some("unknown") {
        println!(
            "SKIPPED: NVML loads on this machine; the fake guest's GPU state is the real one's"
        );
        return;
    }
    assert!(g.present && !g.serving && !g.ready, "{g:?}");
    assert_eq!(g.pci, vec!["0000:00:10.0".to_string()]);
    let e = g.error.expect("reason");
    assert!(
        e.contains("cannot check the GPU's confidential-computing mode"),
        "{e}"
    );
    assert!(e.contains("libnvidia-ml.so.1"), "{e}");

    let cfg_dir = r
        .join("sys/firmware/qemu_fw_cfg/by_name")
        .join(HOST_CONFIG_FW_CFG_NAME);
    std::fs::create_dir_all(&cfg_dir).expect("mkdir");
    let cfg = HostConfig {
        dev_allow_gpu_without_cc: Some(true),
        ..HostConfig::default()
    }
    .to_canonical_json();
    std::fs::write(cfg_dir.join("raw"), &cfg).expect("write config");
    let g = health_of_fake_guest(r).gpu.expect("gpu reported");
    assert!(g.serving && !g.ready && g.error.is_none(), "{g:?}");
    assert!(
        g.summary.contains("WARNING") && g.summary.contains("dev_allow_gpu_without_cc"),
        "{g:?}"
    );
}
