//! End-to-end: the official OpenAI Python SDK (openai 1.109.1, with jsonschema 4.23.0, both
//! pinned and installed by `cargo xtask test`) against real guest-agent processes
//! (`serve --no-init`, RA-TLS on loopback): structured output (100 outputs at temperature 1 per
//! schema, each validated with jsonschema; json_object; the SDK's `parse` helper; streaming;
//! logprobs), 400s naming unsupported fields, and tool-call round trips (call, streamed call,
//! tool result, answer) on tiny synthetic models with the Qwen2.5 and Llama 3.1 chat templates.
//! The script is `openai_sdk.py` next to this file.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2e_tests::{python_clients_or_skip, skip, workspace_bin};
use inference::synthetic::{ChatFamily, synthetic_gguf_family};
use sha2::Digest as _;

/// Kills the agent on drop.
struct Agent {
    child: Child,
    log: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Starts `guest-agent serve` on `model` and waits until it listens (the model is loaded
/// before the agent listens).
fn start_agent(bin: &Path, dir: &Path, name: &str, model: &Path) -> (Agent, String) {
    let sha = hex::encode(sha2::Sha256::digest(
        std::fs::read(model).expect("read model"),
    ));
    let port = free_port();
    let root = dir.join(format!("root-{name}"));
    std::fs::create_dir_all(&root).unwrap();
    let log = dir.join(format!("{name}.log"));
    let child = Command::new(bin)
        .args([
            "serve",
            "--no-init",
            "--listen",
            &format!("127.0.0.1:{port}"),
        ])
        .arg("--root")
        .arg(&root)
        .arg("--model")
        .arg(model)
        .args(["--model-sha256", &sha])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start guest-agent");
    let agent = Agent { child, log };
    let deadline = Instant::now() + Duration::from_secs(300);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "agent {name} never listened:\n{}",
            std::fs::read_to_string(&agent.log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    (agent, format!("https://127.0.0.1:{port}"))
}

#[test]
fn openai_sdk_structured_output_and_tool_calls() {
    let test = "openai_sdk_structured_output_and_tool_calls";
    let Some(pythonpath) = python_clients_or_skip(test) else {
        return;
    };
    let model = std::env::var_os("SMOLLM2_GGUF")
        .map(PathBuf::from)
        .or_else(|| inference::default_model_path().ok())
        .filter(|p| p.is_file());
    let Some(model) = model else {
        skip(
            test,
            "SmolLM2 model not found: run `cargo xtask model fetch smollm2-135m` or set SMOLLM2_GGUF",
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = inference::LlamaConfig::tiny();
    cfg.context_len = 4096;
    let mut synth = Vec::new();
    for (name, family) in [("qwen", ChatFamily::Qwen25), ("llama", ChatFamily::Llama31)] {
        let path = dir.path().join(format!("{name}.gguf"));
        let bytes = synthetic_gguf_family(&cfg, inference::GgmlType::Q8_0, 7, family).unwrap();
        std::fs::write(&path, bytes).unwrap();
        synth.push((name, path));
    }
    let bin = workspace_bin("guest-agent", "guest-agent");
    let (smol, smol_url) = start_agent(&bin, dir.path(), "smollm2", &model);
    let (qwen, qwen_url) = start_agent(&bin, dir.path(), synth[0].0, &synth[0].1);
    let (llama, llama_url) = start_agent(&bin, dir.path(), synth[1].0, &synth[1].1);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_sdk.py");
    let t0 = Instant::now();
    let out = Command::new("python3")
        .arg(&script)
        .env("PYTHONPATH", &pythonpath)
        .env("SMOL_URL", &smol_url)
        .env("QWEN_URL", &qwen_url)
        .env("LLAMA_URL", &llama_url)
        .output()
        .expect("run python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}");
    if !out.status.success() {
        for a in [&smol, &qwen, &llama] {
            eprintln!(
                "--- {}:\n{}",
                a.log.display(),
                std::fs::read_to_string(&a.log).unwrap_or_default()
            );
        }
        panic!(
            "the OpenAI SDK script failed ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(stdout.contains("OK all"), "{stdout}");
    eprintln!("SDK checks took {:.1} s", t0.elapsed().as_secs_f64());
}
