//! End-to-end: the gateway in front of one booted image under QEMU (`host-launcher run --tee
//! none`, KVM or TCG, SmolLM2-135M on a raw model disk): the gateway verifies the booted agent
//! (simulated quote with the image's registers, RTMR3 log against the launcher's host config,
//! the model event) and serves one short greedy `/v1/completions` through it over plain HTTP (and
//! the same completion streamed by the official openai SDK when `cargo xtask test` installed it) on
//! loopback; the answer names Paris.
//!
//! Needs QEMU and the model (`SMOLLM2_GGUF`, else the model cache of `cargo xtask model fetch
//! smollm2-135m`); without either it prints "SKIPPED: ..." (fails under CI). Bounded: one
//! request of 3 tokens (minutes under TCG on a loaded machine).
//!
//! Run: `WORKER_IMAGE_DIR=$PWD/out/worker cargo test -p e2e-tests --test gateway_qemu --
//! --nocapture`.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2e_tests::{host_launcher, image_dir, qemu_or_skip, skip, workspace_bin};

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

/// One plain HTTP/1.1 request to the gateway; (status, body).
fn http(port: u16, method: &str, path: &str, body: &str, timeout: Duration) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(timeout)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (
        status,
        out.split_once("\r\n\r\n").map_or("", |x| x.1).to_owned(),
    )
}

/// Kills the gateway on drop.
struct Gw(Child);

impl Drop for Gw {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn gateway_in_front_of_a_booted_image() {
    let test = "gateway_in_front_of_a_booted_image";
    if !qemu_or_skip(test) {
        return;
    }
    let Some(model) = model_or_skip(test) else {
        return;
    };
    let gateway_bin = workspace_bin("gateway", "gateway");
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

    let gport = free_port();
    let key = format!("@{}", run.path().join("simulated-tee.pub").display());
    let host_config: PathBuf = run.path().join("host-config.json");
    let gw = Gw(Command::new(&gateway_bin)
        .args([
            "--listen",
            &format!("127.0.0.1:{gport}"),
            "--worker",
            &format!("https://127.0.0.1:{port}"),
            "--allow-simulated",
            "--simulated-key",
            &key,
            "--host-config",
            host_config.to_str().unwrap(),
            "--check-interval",
            "5",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap());
    let end = Instant::now() + Duration::from_secs(120);
    let w = loop {
        let ok = TcpStream::connect(("127.0.0.1", gport)).is_ok();
        if ok {
            let (st, body) = http(
                gport,
                "GET",
                "/gateway/workers",
                "",
                Duration::from_secs(10),
            );
            let j: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if st == 200 && j["workers"][0]["status"] == "up" {
                break j["workers"][0].clone();
            }
        }
        assert!(
            Instant::now() < end,
            "the gateway did not verify the booted worker"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(w["verdict"]["rtmr3"]["host_config_checked"], true, "{w:#}");
    assert_eq!(
        w["verdict"]["rtmr3"]["replayed"], w["verdict"]["rtmr3"]["quote_rtmr3"],
        "{w:#}"
    );
    let model_id = w["models"][0].as_str().unwrap().to_owned();

    let started = Instant::now();
    let req = serde_json::json!({
        "model": model_id, "prompt": "The capital of France is", "max_tokens": 3, "temperature": 0
    })
    .to_string();
    let (status, body) = http(
        gport,
        "POST",
        "/v1/completions",
        &req,
        Duration::from_secs(1500),
    );
    eprintln!(
        "completion through the gateway after {:.1} s: {body}",
        started.elapsed().as_secs_f64()
    );
    // The official openai SDK (pinned, installed by `cargo xtask test`) streams the same greedy
    // completion from the booted worker through the gateway.
    let sdk = e2e_tests::python_clients_or_skip(test).map(|pythonpath| {
        let script = format!(
            r#"
from openai import OpenAI
c = OpenAI(base_url="http://127.0.0.1:{gport}/v1", api_key="unused", max_retries=0, timeout=1500)
s = c.completions.create(model={model_id:?}, prompt="The capital of France is", max_tokens=3,
                         temperature=0, stream=True)
print("".join(ch.choices[0].text for ch in s if ch.choices), end="")
"#
        );
        Command::new("python3")
            .env("PYTHONPATH", pythonpath)
            .args(["-c", &script])
            .output()
            .unwrap()
    });
    drop(gw);
    stop(child);
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(text.contains("Paris"), "greedy answer {text:?} lacks Paris");
    if let Some(out) = sdk {
        assert!(
            out.status.success(),
            "openai SDK streaming through the gateway failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            text,
            "the SDK's streamed text equals the plain completion (greedy)"
        );
    }
}
