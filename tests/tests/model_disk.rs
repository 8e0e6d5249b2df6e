//! End-to-end: the model travels on a read-only virtio disk into the booted image (no TEE; KVM or TCG).
//!
//! `host-launcher run --model FILE` attaches SmolLM2-135M as a raw read-only disk; the agent
//! reads it into private memory, checks its SHA-256 against the measured host config and serves
//! it. One test asks the booted worker for a greedy `/v1/completions` of "The capital of France
//! is" and expects "Paris"; the other gives a wrong `--model-sha256` and expects the guest to
//! refuse the model (no `/v1/*`, the reason in `/health` and the console log) and the launcher
//! to report it.
//!
//! Needs the model (`SMOLLM2_GGUF`, else the model cache of `cargo xtask model fetch
//! smollm2-135m`) and QEMU; without either each test prints "SKIPPED: ..." (fails under CI).
//! Inference under TCG is slow (minutes on a loaded machine).
//!
//! Run: `SMOLLM2_GGUF=... WORKER_IMAGE_DIR=$PWD/out/worker cargo test -p e2e-tests --test
//! model_disk -- --nocapture`.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2e_tests::{host_launcher, image_dir, qemu_or_skip, skip};
use sha2::{Digest, Sha256};

/// The SmolLM2 model file, or a visible skip.
fn model_or_skip(test: &str) -> Option<PathBuf> {
    let p = match std::env::var_os("SMOLLM2_GGUF") {
        Some(p) => PathBuf::from(p),
        None => {
            let home = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")));
            match home {
                Some(h) => h
                    .join("confidential-worker/models")
                    .join("SmolLM2-135M-Instruct.Q4_1.gguf"),
                None => PathBuf::new(),
            }
        }
    };
    if p.is_file() {
        Some(p)
    } else {
        skip(
            test,
            "no SmolLM2 model: set SMOLLM2_GGUF or run `cargo xtask model fetch smollm2-135m`",
        );
        None
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One request over RA-TLS to the agent, trusting the simulated TEE key `host-launcher run
/// --tee none` wrote into its run directory; returns (status, body).
fn https(
    run_dir: &Path,
    port: u16,
    method: &str,
    path: &str,
    body: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let key =
        std::fs::read_to_string(run_dir.join("simulated-tee.pub")).map_err(|e| e.to_string())?;
    let key: [u8; 32] = hex::decode(key.trim())
        .ok()
        .and_then(|k| k.try_into().ok())
        .ok_or("simulated-tee.pub is not a 32-byte hex key")?;
    let verifier =
        attestation::Verifier::simulated(attestation::Policy::default().with_simulated(true), key);
    let client = attestation::RaTlsHttpClient::new(verifier);
    let url = format!("https://127.0.0.1:{port}{path}");
    let r = match method {
        "GET" => client.get(&url, timeout),
        _ => client.post_json(&url, body.as_bytes(), timeout),
    }
    .map_err(|e| e.to_string())?;
    Ok((r.status, String::from_utf8_lossy(&r.body).into_owned()))
}

/// Stops a running `host-launcher run` cleanly (SIGINT, as Ctrl-C) and waits for it.
fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn model_disk_boot_serves_a_greedy_completion() {
    let test = "model_disk_boot_serves_a_greedy_completion";
    if !qemu_or_skip(test) {
        return;
    }
    let Some(model) = model_or_skip(test) else {
        return;
    };
    let image = image_dir();
    let run = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = Command::new(host_launcher())
        .args(["run", "--tee", "none", "--image"])
        .arg(image)
        .arg("--model")
        .arg(&model)
        .args([
            "--listen-port",
            &port.to_string(),
            "--health-timeout",
            "600",
        ])
        .arg("--run-dir")
        .arg(run.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    // Wait for the launcher's "guest healthy" summary (it checked /health and the model status).
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut summary = String::new();
    loop {
        let mut line = String::new();
        if out.read_line(&mut line).unwrap() == 0 {
            let status = child.wait().unwrap();
            panic!("host-launcher exited ({status}) before healthy:\n{summary}");
        }
        summary.push_str(&line);
        if line.contains("QMP socket") {
            break;
        }
    }
    eprintln!("{summary}");
    assert!(summary.contains("serving"), "{summary}");
    let (status, health) = https(
        run.path(),
        port,
        "GET",
        "/health",
        "",
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(status, 200);
    let h: worker_api::Health = serde_json::from_str(&health).unwrap();
    let m = h.model.expect("model status in /health");
    let want = hex::encode(Sha256::digest(std::fs::read(&model).unwrap()));
    assert_eq!(
        (m.serving, m.sha256.as_str()),
        (true, want.as_str()),
        "{health}"
    );

    let started = Instant::now();
    let req = r#"{"prompt":"The capital of France is","max_tokens":3,"temperature":0}"#;
    let answer = https(
        run.path(),
        port,
        "POST",
        "/v1/completions",
        req,
        Duration::from_secs(1500),
    );
    let took = started.elapsed();
    let console = std::fs::read_to_string(run.path().join("console.log")).unwrap_or_default();
    stop(child);
    let (status, body) = answer.expect("an answer from /v1/completions over RA-TLS");
    eprintln!("completion after {:.1} s: {body}", took.as_secs_f64());
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(text.contains("Paris"), "greedy answer {text:?} lacks Paris");
    assert!(
        console.contains("sha256 checked") && console.contains("model disk"),
        "{console}"
    );
}

#[test]
fn wrong_model_sha256_is_refused_by_the_guest() {
    let test = "wrong_model_sha256_is_refused_by_the_guest";
    if !qemu_or_skip(test) {
        return;
    }
    let Some(model) = model_or_skip(test) else {
        return;
    };
    let image = image_dir();
    let run = tempfile::tempdir().unwrap();
    let wrong = "00".repeat(32);
    let out = Command::new(host_launcher())
        .args(["run", "--tee", "none", "--exit-when-healthy", "--image"])
        .arg(image)
        .arg("--model")
        .arg(&model)
        .args(["--model-sha256", &wrong, "--health-timeout", "600"])
        .arg("--run-dir")
        .arg(run.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let console = std::fs::read_to_string(run.path().join("console.log")).unwrap_or_default();
    assert!(
        !out.status.success(),
        "launcher accepted a wrong model hash:\n{stderr}"
    );
    assert!(
        stderr.contains("refused to serve model") && stderr.contains("sha256 mismatch"),
        "{stderr}"
    );
    assert!(
        stderr.contains("guest stopped: agent powered off"),
        "the guest is stopped cleanly: {stderr}"
    );
    assert!(
        console.contains("model sha256 mismatch") && console.contains("not serving inference"),
        "{console}"
    );
    assert!(!console.contains("serving model"), "{console}");
}
