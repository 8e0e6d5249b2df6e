//! End-to-end: the official `openai` Python SDK against the `gateway` in front of two real
//! `guest-agent` processes (`serve --no-init` with a simulated TEE from a fw_cfg-style root:
//! distinct registers, so distinct image hashes; a synthetic GGUF model; RA-TLS on loopback),
//! checked against the local chain (`contract/chain/server.mjs`, real TVM), in one sequence:
//!
//! 1. SDK features: models, chat and completions, streamed and not, `stop`, `seed`,
//!    `max_tokens`, errors mapped to the SDK's exception types;
//! 2. 64 concurrent streaming clients for a bounded time, every stream complete and equal to the
//!    single-request greedy answer;
//! 3. abuse against the gateway and an agent: a slow-loris client, a 100 MB body, 10,000 idle
//!    connections — bounded, no crash, other clients served;
//! 4. a worker killed mid-stream: the stream ends with the SDK's APIError (an error event), the
//!    gateway logs a line naming the worker, new requests go to the other worker;
//! 5. the remaining worker's image hash removed on chain: dropped within --max-age, requests
//!    refused naming the reason; published again: back;
//! 6. the chain stopped: no new sessions (503, "fails closed") within --max-age.
//!
//! Needs python3 with the pinned `openai` (WORKER_PYTHONPATH, set by `cargo xtask test`) and
//! `contract/node_modules`; otherwise SKIPPED (a failure under CI).

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use attestation::{Policy, RaTlsHttpClient, SimulatedTee, TdRegisters, Verifier};
use e2e_tests::{python_clients_or_skip, repo_root, skip, workspace_bin};
use ton_root::ops::{Change, HashUpdate};
use ton_root::publish::{Outcome, PublishOptions, Publisher};
use ton_root::wallet::{Network, Signer, WalletKind, parse_address};
use ton_root::{Hash256, HashKind, Toncenter, ToncenterConfig};

const TEST: &str = "gateway_end_to_end";
const MAX_AGE: u64 = 6;

/// A child process killed on drop, its stderr collected (and echoed with a prefix).
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
                // The agent logs every failed handshake: not echoed during the flood.
                if !line.contains("TLS handshake with") {
                    eprintln!("  {name}: {line}");
                }
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

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
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
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
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

fn workers(port: u16) -> serde_json::Value {
    let (st, body) = http(port, "GET", "/gateway/workers", None);
    assert_eq!(st, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Waits until `cond` holds on /gateway/workers; returns how long it took.
fn wait_workers(
    port: u16,
    what: &str,
    timeout: Duration,
    cond: impl Fn(&serde_json::Value) -> bool,
) -> Duration {
    let t = Instant::now();
    loop {
        let w = workers(port);
        if cond(&w) {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < timeout,
            "{what}: not within {timeout:?}: {w:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn status_of(w: &serde_json::Value, url: &str) -> String {
    w["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["url"] == url)
        .map(|x| x["status"].as_str().unwrap_or("").to_owned())
        .unwrap_or_default()
}

/// The running chain; killed on drop.
struct Chain {
    proc: Proc,
    state: serde_json::Value,
    _dir: tempfile::TempDir,
}

fn start_chain() -> Option<Chain> {
    let contract = repo_root().join("contract");
    if !contract.join("node_modules/@ton/sandbox").is_dir() {
        skip(
            TEST,
            "contract/node_modules is missing: run `cd contract && npm ci` (cargo xtask test does)",
        );
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let state_file = dir.path().join("state.json");
    let mut child = Command::new("node")
        .current_dir(&contract)
        .args([
            "chain/server.mjs",
            "--port",
            "0",
            "--json",
            "--wallet",
            "v4r2",
            "--state-file",
        ])
        .arg(&state_file)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("node must be installed to run the local chain");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(
        !line.trim().is_empty(),
        "local chain exited before it was ready"
    );
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&state_file).unwrap()).unwrap();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || for _ in BufReader::new(err).lines() {});
    Some(Chain {
        proc: Proc {
            child,
            log: Arc::default(),
        },
        state,
        _dir: dir,
    })
}

fn publisher(chain: &Chain) -> (Publisher<Toncenter>, Signer) {
    let s = &chain.state;
    let mut cfg = ToncenterConfig::new(s["rpc_url"].as_str().unwrap());
    cfg.timeout = Duration::from_secs(20);
    let root = parse_address(s["root"]["address"].as_str().unwrap(), Network::Local).unwrap();
    let m = &s["wallet"]["mnemonic"];
    let words = m.as_array().map_or_else(
        || m.as_str().unwrap().to_owned(),
        |a| {
            a.iter()
                .filter_map(|w| w.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        },
    );
    let signer = Signer::from_mnemonic(&words, WalletKind::V4R2).unwrap();
    (Publisher::new(Toncenter::new(cfg), root), signer)
}

fn apply(p: &Publisher<Toncenter>, s: &Signer, kind: HashKind, change: Change, hash: [u8; 32]) {
    let opts = PublishOptions {
        poll_interval: Duration::from_millis(200),
        wait: Duration::from_secs(30),
        ..PublishOptions::default()
    };
    let out = p
        .apply(
            s,
            HashUpdate {
                kind,
                change,
                query_id: u64::from(hash[0]) << 8 | u64::from(hash[1]),
                hash: Hash256(hash),
            },
            &opts,
        )
        .unwrap();
    assert!(
        matches!(out, Outcome::Confirmed { .. } | Outcome::AlreadyDone),
        "{out:?}"
    );
}

/// A guest-agent root with a host config (the model) and a simulated TEE (seed, registers).
fn agent_root(dir: &Path, seed: u8, model: &Path, model_sha: &str) -> [u8; 32] {
    let by_name = dir.join("sys/firmware/qemu_fw_cfg/by_name");
    let cfg = by_name.join(worker_api::HOST_CONFIG_FW_CFG_NAME);
    std::fs::create_dir_all(&cfg).unwrap();
    let host_config = worker_api::HostConfig {
        model: Some(model.display().to_string()),
        model_sha256: Some(model_sha.to_owned()),
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

/// The agent's cw-v1 image hash, read over RA-TLS with its simulator key.
fn image_hash(port: u16, key: [u8; 32]) -> [u8; 32] {
    let c = RaTlsHttpClient::new(Verifier::simulated(
        Policy::default().with_simulated(true),
        key,
    ));
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        match c.attest(
            &format!("https://127.0.0.1:{port}"),
            Duration::from_secs(10),
        ) {
            Ok(a) => {
                assert!(a.verdict.accepted, "{:?}", a.verdict.reasons);
                let h = hex::decode(a.verdict.image_hash_cw_v1.unwrap()).unwrap();
                return h.try_into().unwrap();
            }
            Err(e) if Instant::now() < end => {
                eprintln!("gateway: waiting for the agent on {port}: {e}");
                std::thread::sleep(Duration::from_millis(300));
            }
            Err(e) => panic!("agent on {port}: {e}"),
        }
    }
}

fn python(pp: &Path, script: &str, args: &[&str]) -> serde_json::Value {
    let t = Instant::now();
    let out = Command::new("python3")
        .env("PYTHONPATH", pp)
        .arg(repo_root().join("tests/python").join(script))
        .args(args)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!(
        "gateway: {script} took {:.1} s: {stdout}{}",
        t.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{script} failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("null")).unwrap()
}

fn raise_nofile(want: u64) -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct passed.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max.min(want.max(r.rlim_cur));
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
    }
    r.rlim_cur
}

/// A byte stream to the port under test (plain TCP, or RA-TLS to an agent).
trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}
type Connect = Arc<dyn Fn() -> Box<dyn Stream> + Send + Sync>;

fn plain(port: u16) -> Connect {
    Arc::new(move || Box::new(TcpStream::connect(("127.0.0.1", port)).unwrap()) as Box<dyn Stream>)
}

/// RA-TLS to an agent, its certificate verified with the simulator key.
fn ratls(port: u16, key: [u8; 32]) -> Connect {
    use attestation::tls::{RATLS_SERVER_NAME, RaTlsServerVerifier, client_config};
    Arc::new(move || {
        let v = RaTlsServerVerifier::new(Verifier::simulated(
            Policy::default().with_simulated(true),
            key,
        ));
        let cfg = client_config(Arc::new(v), None).unwrap();
        let name = rustls::pki_types::ServerName::try_from(RATLS_SERVER_NAME).unwrap();
        let conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
        let sock = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut s = rustls::StreamOwned::new(conn, sock);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock).unwrap();
        }
        Box::new(s) as Box<dyn Stream>
    })
}

/// Abuse one port while `alive` must keep answering: a slow-loris client (a request head one
/// byte per 200 ms, over `connect`), a 100 MB body (over `connect`), `idle` idle TCP connections.
fn abuse(name: &str, port: u16, connect: Connect, idle: usize, alive: &dyn Fn() -> bool) {
    let c = connect.clone();
    let slow = std::thread::spawn(move || {
        let mut s = c();
        let t = Instant::now();
        for b in b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: "
            .iter()
            .cycle()
        {
            if s.write_all(&[*b]).and_then(|()| s.flush()).is_err()
                || t.elapsed() > Duration::from_secs(60)
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        t.elapsed()
    });
    let c = connect.clone();
    let big = std::thread::spawn(move || {
        let mut s = c();
        let n = 100 << 20;
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {n}\r\n\r\n"
        );
        let _ = s.write_all(head.as_bytes());
        let chunk = vec![b' '; 1 << 20];
        let mut sent = 0usize;
        while sent < n && s.write_all(&chunk).is_ok() {
            sent += chunk.len();
        }
        let _ = s.flush();
        let mut resp = Vec::new();
        let _ = s.read_to_end(&mut resp);
        (
            sent,
            String::from_utf8_lossy(&resp[..resp.len().min(300)]).into_owned(),
        )
    });
    let t = Instant::now();
    let mut conns = Vec::new();
    for _ in 0..idle {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => conns.push(s),
            Err(e) => {
                eprintln!("gateway: {name}: connection {} failed: {e}", conns.len());
                break;
            }
        }
    }
    eprintln!(
        "gateway: {name}: {} idle connections open after {:.1} s",
        conns.len(),
        t.elapsed().as_secs_f64()
    );
    let t = Instant::now();
    assert!(
        alive(),
        "{name} stopped serving with {} idle connections",
        conns.len()
    );
    eprintln!(
        "gateway: {name}: a normal request was served in {:.2} s during the flood",
        t.elapsed().as_secs_f64()
    );
    let (sent, resp) = big.join().unwrap();
    eprintln!("gateway: {name}: 100 MB body: {sent} bytes sent, answer {resp:?}");
    assert!(
        resp.is_empty() || resp.contains(" 413 "),
        "{name}: 100 MB body: {resp}"
    );
    assert!(
        sent < 100 << 20 || resp.contains(" 413 "),
        "{name}: the whole 100 MB was read"
    );
    let slow_for = slow.join().unwrap();
    eprintln!(
        "gateway: {name}: slow-loris cut off after {:.1} s",
        slow_for.as_secs_f64()
    );
    assert!(
        slow_for < Duration::from_secs(59),
        "{name}: a slow-loris client was never cut off"
    );
    drop(conns);
    assert!(alive(), "{name} stopped serving after the flood");
}

#[test]
fn gateway_end_to_end() {
    let Some(pp) = python_clients_or_skip(TEST) else {
        return;
    };
    let Some(chain) = start_chain() else {
        return;
    };
    let mut chain = chain;
    let nofile = raise_nofile(20_000);
    let idle = if nofile >= 11_000 {
        10_000
    } else {
        (nofile as usize).saturating_sub(1_000)
    };
    if idle < 10_000 {
        eprintln!(
            "gateway: RLIMIT_NOFILE is {nofile}: using {idle} idle connections instead of 10,000"
        );
    }
    let agent_bin = workspace_bin("guest-agent", "guest-agent");
    let gateway_bin = workspace_bin("gateway", "gateway");
    let tmp = tempfile::tempdir().unwrap();

    // The model: synthetic, deterministic, slow enough in a debug build that a long stream is
    // still running when its worker is killed.
    let cfg = inference::model::LlamaConfig {
        dim: 128,
        ffn_dim: 256,
        n_layers: 4,
        context_len: 4096,
        ..inference::model::LlamaConfig::tiny()
    };
    let gguf = inference::synthetic::synthetic_gguf(&cfg, inference::GgmlType::Q8_0, 11).unwrap();
    let model = tmp.path().join("gw-synthetic.gguf");
    std::fs::write(&model, &gguf).unwrap();
    let model_sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&gguf))
    };
    let model_name = "gw-synthetic";

    // Two agents.
    let mut agents = Vec::new();
    let mut keys = Vec::new();
    for (i, seed) in [21u8, 22].into_iter().enumerate() {
        let root = tmp.path().join(format!("agent{i}"));
        keys.push(agent_root(&root, seed, &model, &model_sha));
        let port = free_port();
        let p = Proc::spawn(
            if i == 0 { "agent-a" } else { "agent-b" },
            Command::new(&agent_bin).args([
                "serve",
                "--no-init",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--root",
                root.to_str().unwrap(),
            ]),
        );
        agents.push((p, port));
    }
    let hashes: Vec<[u8; 32]> = agents
        .iter()
        .zip(&keys)
        .map(|((_, port), key)| image_hash(*port, *key))
        .collect();
    assert_ne!(hashes[0], hashes[1]);
    let urls: Vec<String> = agents
        .iter()
        .map(|(_, p)| format!("https://127.0.0.1:{p}"))
        .collect();

    // Approve both images and the model on chain.
    let (publ, signer) = publisher(&chain);
    let model_hash: [u8; 32] = hex::decode(&model_sha).unwrap().try_into().unwrap();
    for h in &hashes {
        apply(&publ, &signer, HashKind::Image, Change::Add, *h);
    }
    apply(&publ, &signer, HashKind::Model, Change::Add, model_hash);

    // The gateway.
    let gport = free_port();
    let rpc = chain.state["rpc_url"].as_str().unwrap().to_owned();
    let root_addr = chain.state["root"]["address"].as_str().unwrap().to_owned();
    let mut args: Vec<String> = vec![
        "--listen".into(),
        format!("127.0.0.1:{gport}"),
        "--root".into(),
        root_addr,
        "--rpc".into(),
        rpc,
        "--max-age".into(),
        MAX_AGE.to_string(),
        "--check-interval".into(),
        "2".into(),
        "--header-timeout".into(),
        "5".into(),
        "--allow-simulated".into(),
    ];
    for (u, k) in urls.iter().zip(&keys) {
        args.extend([
            "--worker".into(),
            u.clone(),
            "--simulated-key".into(),
            hex::encode(k),
        ]);
    }
    let gw = Proc::spawn("gateway", Command::new(&gateway_bin).args(&args));
    gw.wait_log("ready: OpenAI API", Duration::from_secs(120));
    wait_workers(
        gport,
        "both workers verified",
        Duration::from_secs(30),
        |w| urls.iter().all(|u| status_of(w, u) == "up"),
    );
    let w = workers(gport);
    for x in w["workers"].as_array().unwrap() {
        assert_eq!(x["model_hash"], model_sha.as_str(), "{x}");
        assert_eq!(
            x["verdict"]["rtmr3"]["replayed"], x["verdict"]["rtmr3"]["quote_rtmr3"],
            "{x}"
        );
        assert_eq!(x["models"][0], model_name, "{x}");
    }
    let base = format!("http://127.0.0.1:{gport}/v1");

    // 1. SDK features.
    python(&pp, "gateway_sdk.py", &[&base, model_name]);

    // 2. 64 concurrent streams for a bounded time.
    let load = python(
        &pp,
        "gateway_load.py",
        &[&base, model_name, "64", "15", "8"],
    );
    assert!(load["completed"].as_u64().unwrap() >= 64, "{load}");
    let (_, metrics) = http(gport, "GET", "/metrics", None);
    assert!(
        metrics
            .contains("gateway_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("gateway_worker_up{worker="), "{metrics}");

    // 3. Abuse: the gateway, then an agent directly.
    let chat_ok = || {
        let (st, body) = http(
            gport,
            "POST",
            "/v1/chat/completions",
            Some(&format!(
                r#"{{"model":"{model_name}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":2}}"#
            )),
        );
        if st != 200 {
            eprintln!("gateway: request during abuse: {st} {body}");
        }
        st == 200
    };
    abuse("gateway", gport, plain(gport), idle, &chat_ok);
    let agent_port = agents[1].1;
    let agent_client = RaTlsHttpClient::new(Verifier::simulated(
        Policy::default().with_simulated(true),
        keys[1],
    ));
    let agent_ok = || {
        agent_client
            .get(
                &format!("https://127.0.0.1:{agent_port}/health"),
                Duration::from_secs(60),
            )
            .is_ok_and(|r| r.status == 200)
    };
    abuse(
        "agent",
        agent_port,
        ratls(agent_port, keys[1]),
        idle,
        &agent_ok,
    );
    assert!(chat_ok(), "the gateway serves after the agent was flooded");

    // 4. A worker killed mid-stream.
    let mut kill = Command::new("python3")
        .env("PYTHONPATH", &pp)
        .arg(repo_root().join("tests/python/gateway_kill.py"))
        .args([&base, model_name, "3000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut kout = BufReader::new(kill.stdout.take().unwrap());
    let mut line = String::new();
    kout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "STARTED", "{line}");
    let w = workers(gport);
    let busy = w["workers"]
        .as_array()
        .unwrap()
        .iter()
        .position(|x| x["in_flight"].as_u64() == Some(1))
        .unwrap_or_else(|| panic!("no worker has the stream: {w:#}"));
    let killed_url = urls[busy].clone();
    agents[busy].0.kill();
    writeln!(kill.stdin.take().unwrap()).unwrap();
    let mut rest = String::new();
    kout.read_to_string(&mut rest).unwrap();
    assert!(kill.wait().unwrap().success(), "{rest}");
    let k: serde_json::Value = serde_json::from_str(rest.lines().last().unwrap()).unwrap();
    eprintln!("gateway: kill: {k}");
    assert_eq!(
        k["result"], "error",
        "a broken stream must not end as a success: {k}"
    );
    assert!(k["message"].as_str().unwrap().contains(&killed_url), "{k}");
    assert!(k["after"].is_string(), "{k}");
    assert!(
        gw.log()
            .contains(&format!("worker {killed_url}: stream ended with an error")),
        "{}",
        gw.log()
    );
    let alive = 1 - busy;
    let alive_url = urls[alive].clone();

    // 5. The remaining worker's image hash removed on chain: dropped within --max-age.
    apply(
        &publ,
        &signer,
        HashKind::Image,
        Change::Remove,
        hashes[alive],
    );
    let took = wait_workers(
        gport,
        "removed image dropped",
        Duration::from_secs(MAX_AGE + 10),
        |w| status_of(w, &alive_url) == "down",
    );
    eprintln!(
        "gateway: removed image hash dropped after {:.1} s (max-age {MAX_AGE} s)",
        took.as_secs_f64()
    );
    let w = workers(gport);
    assert!(w.to_string().contains("image_hash_not_allowed"), "{w:#}");
    let (st, body) = http(
        gport,
        "POST",
        "/v1/chat/completions",
        Some(&format!(
            r#"{{"model":"{model_name}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":2}}"#
        )),
    );
    assert_eq!(st, 503, "{body}");
    assert!(
        body.contains("image_hash_not_allowed") && body.contains("fails closed"),
        "{body}"
    );
    apply(&publ, &signer, HashKind::Image, Change::Add, hashes[alive]);
    wait_workers(
        gport,
        "re-approved worker back",
        Duration::from_secs(MAX_AGE + 10),
        |w| status_of(w, &alive_url) == "up",
    );
    assert!(chat_ok());

    // 6. The chain unreachable: within --max-age nothing is sent, the error says why.
    chain.proc.kill();
    let took = wait_workers(
        gport,
        "chain down",
        Duration::from_secs(MAX_AGE + 10),
        |w| status_of(w, &alive_url) == "down",
    );
    eprintln!(
        "gateway: chain down: worker dropped after {:.1} s",
        took.as_secs_f64()
    );
    let (st, body) = http(
        gport,
        "POST",
        "/v1/chat/completions",
        Some(&format!(
            r#"{{"model":"{model_name}","messages":[{{"role":"user","content":"hi"}}],"max_tokens":2}}"#
        )),
    );
    assert_eq!(st, 503, "{body}");
    assert!(
        body.contains("fails closed") && body.contains("cannot be asked"),
        "{body}"
    );
}
