//! `cargo xtask bench gateway`: what the verifying gateway adds, measured side by side in one run.
//!
//! Builds `guest-agent`, `gateway` and `gateway-bench` in release mode, starts one agent
//! (`serve --no-init` with a simulated TEE and a host config naming the model, so its RTMR3 log
//! measures the model as in a TD) serving SmolLM2-135M (fetched into the model cache if absent;
//! `--model FILE` for another GGUF), a gateway in front of it (verifying the simulated quote,
//! the RTMR3 log and the model), then runs `gateway-bench`: the same greedy requests directly
//! over RA-TLS (kept alive, and a new session per request) and through the gateway, alternating,
//! and N concurrent streams through the gateway. Options: `--rounds N` (15), `--streams N` (64),
//! `--gen-tokens N` (32), `--model FILE`, `--json`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sha2::Digest as _;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn release_bins() -> anyhow::Result<PathBuf> {
    eprintln!("building guest-agent, gateway and gateway-bench (release) ...");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let st = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--quiet",
            "-p",
            "guest-agent",
            "-p",
            "gateway",
        ])
        .status()
        .context("running cargo")?;
    if !st.success() {
        bail!("cargo build --release failed ({st})");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(
        || PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../target")),
        PathBuf::from,
    );
    Ok(target.join("release"))
}

/// `cargo xtask bench gateway ARGS`.
pub fn gateway(args: &[String]) -> anyhow::Result<()> {
    let mut model: Option<PathBuf> = None;
    let mut pass: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--model" => model = Some(PathBuf::from(it.next().context("--model needs a file")?)),
            "--rounds" | "--streams" | "--gen-tokens" | "--stream-tokens" => {
                pass.push(a.clone());
                pass.push(
                    it.next()
                        .with_context(|| format!("{a} needs a value"))?
                        .clone(),
                );
            }
            "--json" => pass.push(a.clone()),
            "-h" | "--help" => {
                println!(
                    "cargo xtask bench gateway [--model FILE] [--rounds N] [--gen-tokens N] [--streams N] [--stream-tokens N] [--json]\n\n\
One release guest-agent (simulated TEE) and a gateway in front of it; the same greedy requests\n\
directly over RA-TLS (kept alive / new session per request) and through the gateway, alternating;\n\
then N concurrent streams through the gateway. Model: SmolLM2-135M from the model cache."
                );
                return Ok(());
            }
            other => bail!("unknown option {other:?}; see `cargo xtask bench gateway --help`"),
        }
    }
    let model = match model {
        Some(m) => m,
        None => crate::model::fetch("smollm2-135m", None)?,
    };
    let model = std::fs::canonicalize(&model)
        .with_context(|| format!("cannot find the model {}", model.display()))?;
    let bytes =
        std::fs::read(&model).with_context(|| format!("cannot read {}", model.display()))?;
    let sha = hex::encode(sha2::Sha256::digest(&bytes));
    drop(bytes);
    let name = model
        .file_stem()
        .map(|s| s.to_string_lossy().to_lowercase())
        .unwrap_or_else(|| "model".into());
    let bin = release_bins()?;

    let tmp = tempfile::tempdir()?;
    let cfg_dir = tmp
        .path()
        .join("sys/firmware/qemu_fw_cfg/by_name")
        .join(worker_api::HOST_CONFIG_FW_CFG_NAME);
    std::fs::create_dir_all(&cfg_dir)?;
    let host_config = worker_api::HostConfig {
        model: Some(model.display().to_string()),
        model_sha256: Some(sha),
        ..worker_api::HostConfig::default()
    };
    std::fs::write(cfg_dir.join("raw"), host_config.to_canonical_json())?;

    let aport = free_port()?;
    let mut agent = Killed(
        Command::new(bin.join("guest-agent"))
            .args(["serve", "--no-init", "--simulate-tee", "--listen"])
            .arg(format!("127.0.0.1:{aport}"))
            .arg("--root")
            .arg(tmp.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting guest-agent")?,
    );
    let mut key = String::new();
    let out = agent.0.stdout.take().context("agent stdout")?;
    for line in BufReader::new(out).lines() {
        if let Some(k) = line?.strip_prefix("simulated TEE public key: ") {
            key = k.trim().to_owned();
            break;
        }
    }
    if key.is_empty() {
        bail!("the agent printed no simulated TEE key");
    }
    wait_port(aport, Duration::from_secs(120))?;

    let gport = free_port()?;
    let _gw = Killed(
        Command::new(bin.join("gateway"))
            .arg("--listen")
            .arg(format!("127.0.0.1:{gport}"))
            .arg("--worker")
            .arg(format!("https://127.0.0.1:{aport}"))
            .args(["--allow-simulated", "--simulated-key", &key])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting gateway")?,
    );
    wait_port(gport, Duration::from_secs(60))?;
    let st = Command::new(bin.join("gateway-bench"))
        .arg("--worker")
        .arg(format!("https://127.0.0.1:{aport}"))
        .args(["--simulated-key", &key, "--model", &name])
        .arg("--gateway")
        .arg(format!("127.0.0.1:{gport}"))
        .args(&pass)
        .status()
        .context("running gateway-bench")?;
    println!(
        "model: {} (sha256 checked by the agent, RTMR3 log verified by the gateway)",
        display(&model)
    );
    if !st.success() {
        bail!("gateway-bench failed ({st})");
    }
    Ok(())
}

fn display(p: &Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

fn wait_port(port: u16, timeout: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + timeout;
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > end {
            bail!("nothing listens on 127.0.0.1:{port} after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
