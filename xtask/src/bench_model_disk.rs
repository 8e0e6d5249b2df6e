//! `cargo xtask bench model-disk`: the dm-verity model disk against today's copy-and-hash path,
//! side by side in one run, on this machine's accelerator (KVM where it can, else TCG).
//!
//! 1. SmolLM2-135M booted twice with `host-launcher run --tee none`: `--model FILE` (the guest
//!    copies the raw disk into memory and checks its SHA-256) and `--model-disk DIR` (the guest
//!    reads it through dm-verity into the CPU backend). For each: the guest's model load time
//!    (its console log) and boot-to-first-token (launcher start → the first streamed token of a
//!    one-token `host-launcher chat`, time to first token as the client measured it).
//! 2. A synthetic Q8_0 model of about 1.5 GiB, packed, booted with 2304 MiB of guest memory
//!    (QEMU started from the launcher's dry-run command line plus a second, raw copy of the
//!    disk with serial `cw-bench-raw`): the guest's load through dm-verity (throughput, agent
//!    peak RSS, guest memory high-water mark) and, after it, the agent's timed sequential read
//!    of the same bytes raw vs through the verity mapping (page cache dropped before each).
//!
//! Needs the image (`--image`, default out/worker) and QEMU; fetches SmolLM2 if absent. The
//! big model is generated under the target directory (3 GiB of disk for it and its packed
//! copy), removed afterwards.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

use crate::demo::{RunningLauncher, parse_model_load_secs};

/// Guest memory of the big-model run (the old rule would ask for 2 × 1.53 GiB + 512 MiB).
const BIG_MEMORY_MIB: u64 = 2304;

#[derive(Debug)]
struct Opts {
    image: PathBuf,
    skip_big: bool,
    json: bool,
}

fn parse(repo: &Path, args: &[String]) -> anyhow::Result<Opts> {
    let mut o = Opts {
        image: repo.join("out/worker"),
        skip_big: false,
        json: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--image" => {
                o.image = PathBuf::from(it.next().context("--image needs a directory")?);
            }
            "--skip-big" => o.skip_big = true,
            "--json" => o.json = true,
            "-h" | "--help" => {
                println!(
                    "cargo xtask bench model-disk [--image DIR] [--skip-big] [--json]\n\n\
SmolLM2 booted with --model (copy + sha256) and --model-disk (dm-verity): guest load time and\n\
boot-to-first-token; a 1.5 GiB synthetic model through dm-verity with 2304 MiB of guest memory:\n\
load throughput, memory high-water marks, raw vs dm-verity sequential read in the guest."
                );
                std::process::exit(0);
            }
            other => bail!("unknown option {other:?} (see --help)"),
        }
    }
    Ok(o)
}

/// One SmolLM2 boot.
#[derive(Debug, Clone, serde::Serialize)]
struct SmallRun {
    path: &'static str,
    accelerator: Option<String>,
    model_load_s: Option<f64>,
    boot_to_ready_s: f64,
    boot_to_first_token_s: Option<f64>,
}

/// The big-model boot.
#[derive(Debug, Clone, serde::Serialize)]
struct BigRun {
    model_bytes: u64,
    guest_memory_mib: u64,
    load_s: Option<f64>,
    load_mib_s: Option<f64>,
    agent_peak_rss_mib: Option<u64>,
    guest_mem_peak_mib: Option<u64>,
    raw_read_mib_s: Option<f64>,
    verity_read_mib_s: Option<f64>,
}

fn launcher_bin(repo: &Path) -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let st = Command::new(&cargo)
        .current_dir(repo)
        .args(["build", "--release", "-p", "host-launcher"])
        .status()
        .context("running cargo build -p host-launcher")?;
    if !st.success() {
        bail!("building host-launcher failed ({st})");
    }
    Ok(target_dir(repo).join("release/host-launcher"))
}

fn target_dir(repo: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| if t.is_absolute() { t } else { repo.join(t) })
        .unwrap_or_else(|| repo.join("target"))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Boots SmolLM2 with `model_args`, asks for one token, stops; times it.
fn small_run(
    bin: &Path,
    image: &Path,
    path: &'static str,
    model_args: &[&std::ffi::OsStr],
) -> anyhow::Result<SmallRun> {
    let run_dir = tempfile::tempdir()?;
    let port = free_port()?.to_string();
    let mut args: Vec<&std::ffi::OsStr> =
        vec!["run".as_ref(), "--image".as_ref(), image.as_os_str()];
    args.extend_from_slice(model_args);
    args.extend(
        [
            "--tee",
            "none",
            "--health-timeout",
            "1200",
            "--listen-port",
            port.as_str(),
            "--run-dir",
        ]
        .map(std::ffi::OsStr::new),
    );
    args.push(run_dir.path().as_os_str());
    eprintln!("bench: boot with {path}");
    let t0 = Instant::now();
    let mut guest = RunningLauncher::spawn(bin, &args)?;
    guest.wait_for("host-launcher: running;", Duration::from_secs(1500))?;
    let ready = t0.elapsed().as_secs_f64();
    let accelerator = crate::demo::parse_accelerator(guest.seen.iter().map(String::as_str));
    let chat_at = t0.elapsed().as_secs_f64();
    let out = Command::new(bin)
        .args(["chat", "--url", &format!("https://127.0.0.1:{port}")])
        .args(["--allow-simulated", "--simulated-key"])
        .arg(format!(
            "@{}",
            run_dir.path().join("simulated-tee.pub").display()
        ))
        .arg("--host-config")
        .arg(run_dir.path().join("host-config.json"))
        .args(["--max-tokens", "1", "--answer-timeout", "1800", "--json"])
        .args([
            "--system",
            crate::demo::DEMO_SYSTEM,
            crate::demo::DEMO_PROMPT,
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running host-launcher chat")?;
    let console = std::fs::read_to_string(run_dir.path().join("console.log")).unwrap_or_default();
    guest.stop()?;
    let ttft = serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v["time_to_first_token_s"].as_f64());
    // The raw path logs reading + hashing and the CPU backend's load separately; the dm-verity
    // path's one line covers reading, verifying and building the weights.
    let model_load_s =
        parse_model_load_secs(&console).map(|s| s + parse_cpu_load_secs(&console).unwrap_or(0.0));
    Ok(SmallRun {
        path,
        accelerator,
        model_load_s,
        boot_to_ready_s: ready,
        boot_to_first_token_s: ttft.map(|t| chat_at + t),
    })
}

/// The raw path's "model loaded into the CPU backend (N threads) in X s" → X.
fn parse_cpu_load_secs(console: &str) -> Option<f64> {
    console.lines().find_map(|l| {
        let rest = l.split("model loaded into the CPU backend").nth(1)?;
        rest.split(") in ")
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// The `(X MiB/s)` of the console line containing `needle`.
fn mib_s_after(console: &str, needle: &str) -> Option<f64> {
    let l = console.lines().find(|l| l.contains(needle))?;
    let rest = l.split(needle).nth(1)?;
    let inner = rest.split('(').nth(1)?;
    inner.split_whitespace().next()?.parse().ok()
}

/// The number before ` MiB` after `needle` on the line containing `anchor`.
fn mib_after(console: &str, anchor: &str, needle: &str) -> Option<u64> {
    let l = console.lines().find(|l| l.contains(anchor))?;
    l.split(needle)
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn big_run(repo: &Path, bin: &Path, image: &Path) -> anyhow::Result<BigRun> {
    let base = target_dir(repo).join("bench");
    std::fs::create_dir_all(&base)?;
    let t = tempfile::tempdir_in(&base)?;
    let cfg = inference::LlamaConfig {
        arch: "llama".into(),
        vocab: 32000,
        dim: 2048,
        n_layers: 32,
        n_heads: 16,
        n_kv_heads: 2,
        head_dim: 128,
        ffn_dim: 5632,
        rope_theta: 10_000.0,
        rms_eps: 1e-5,
        context_len: 4096,
        tied_embeddings: false,
        rope_style: inference::model::RopeStyle::Norm,
        rope_scaling: inference::model::RopeScaling::None,
    };
    eprintln!("bench: generating a synthetic Q8_0 model of about 1.5 GiB");
    let bytes = inference::synthetic::synthetic_gguf_fast(&cfg, inference::GgmlType::Q8_0, 17)?;
    let gguf = t.path().join("big.gguf");
    std::fs::write(&gguf, &bytes)?;
    let model_bytes = bytes.len() as u64;
    drop(bytes);
    let packed = crate::model::pack::pack(&crate::model::pack::PackOptions {
        gguf: gguf.clone(),
        name: "synthetic-1b5".into(),
        revision: Some("bench".into()),
        out: t.path().join("packed"),
        quiet: false,
    })?;
    std::fs::remove_file(&gguf)?;
    let run_dir = t.path().join("run");
    let port = free_port()?.to_string();
    let o = Command::new(bin)
        .args(["run", "--tee", "none", "--image"])
        .arg(image)
        .arg("--model-disk")
        .arg(&packed.json_path)
        .args(["--memory", &format!("{BIG_MEMORY_MIB}M")])
        .args(["--listen-port", &port, "--dry-run", "--json", "--run-dir"])
        .arg(&run_dir)
        .output()?;
    if !o.status.success() {
        bail!(
            "host-launcher run --dry-run failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
    let mut argv: Vec<String> = v["argv"]
        .as_array()
        .context("no argv in the dry run")?
        .iter()
        .filter_map(|a| a.as_str().map(str::to_owned))
        .collect();
    let img = packed.disk.display().to_string().replace(',', ",,");
    argv.extend([
        "-drive".into(),
        format!("file={img},if=none,id=benchraw,format=raw,readonly=on"),
        "-device".into(),
        format!(
            "virtio-blk-pci,drive=benchraw,serial={}",
            worker_api::BENCH_RAW_DISK_SERIAL
        ),
    ]);
    eprintln!("bench: booting the 1.5 GiB model with {BIG_MEMORY_MIB} MiB of guest memory");
    let mut qemu = Command::new(&argv[0])
        .args(&argv[1..])
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("starting QEMU")?;
    let console_path = run_dir.join("console.log");
    let deadline = Instant::now() + Duration::from_secs(3600);
    let mut console = String::new();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_secs(2));
        console = std::fs::read_to_string(&console_path).unwrap_or_default();
        if console.contains("bench: dm-verity read")
            || console.contains("not serving inference")
            || qemu.try_wait()?.is_some()
        {
            break;
        }
    }
    let _ = qemu.kill();
    let _ = qemu.wait();
    if !console.contains("loaded through dm-verity") {
        bail!(
            "the big model did not load; console log:\n{}",
            console
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let load_line = "loaded through dm-verity";
    Ok(BigRun {
        model_bytes,
        guest_memory_mib: BIG_MEMORY_MIB,
        load_s: parse_model_load_secs(&console),
        load_mib_s: mib_s_after(&console, " bytes verified in"),
        agent_peak_rss_mib: mib_after(&console, load_line, "agent peak RSS "),
        guest_mem_peak_mib: mib_after(&console, load_line, "in use at most "),
        raw_read_mib_s: mib_s_after(&console, "bench: raw read"),
        verity_read_mib_s: mib_s_after(&console, "bench: dm-verity read"),
    })
}

/// Runs the benchmark and prints the table (or JSON).
pub fn model_disk(repo: &Path, args: &[String]) -> anyhow::Result<()> {
    let o = parse(repo, args)?;
    if !o.image.join("manifest.json").is_file() {
        bail!(
            "no image at {}: build one with `cargo xtask image build` or pass --image DIR",
            o.image.display()
        );
    }
    let bin = launcher_bin(repo)?;
    let model = crate::model::fetch("smollm2-135m", None)?;
    let t = tempfile::tempdir()?;
    let packed = crate::model::pack::pack(&crate::model::pack::PackOptions {
        gguf: model.clone(),
        name: crate::demo::DEMO_MODEL_NAME.into(),
        revision: Some(crate::demo::DEMO_MODEL_REVISION.into()),
        out: t.path().join("smollm2"),
        quiet: true,
    })?;
    let raw = small_run(
        &bin,
        &o.image,
        "copy+sha256 (--model)",
        &["--model".as_ref(), model.as_os_str()],
    )?;
    let verity = small_run(
        &bin,
        &o.image,
        "dm-verity (--model-disk)",
        &["--model-disk".as_ref(), packed.json_path.as_os_str()],
    )?;
    let big = if o.skip_big {
        None
    } else {
        Some(big_run(repo, &bin, &o.image)?)
    };
    if o.json {
        println!(
            "{}",
            serde_json::json!({"smollm2": [raw, verity], "big": big})
        );
        return Ok(());
    }
    let f = |x: Option<f64>, unit: &str| x.map_or("n/a".into(), |x| format!("{x:.1} {unit}"));
    let mb = 98_362_432f64 / 1048576.0;
    println!(
        "\nmodel disk benchmark ({})",
        raw.accelerator
            .as_deref()
            .unwrap_or("accelerator not reported")
    );
    println!(
        "{:<44} {:>24} {:>24}",
        "SmolLM2-135M Q4_1 (94 MiB)", raw.path, verity.path
    );
    println!(
        "{:<44} {:>24} {:>24}",
        "guest model load (read, check, build weights)",
        f(raw.model_load_s, "s"),
        f(verity.model_load_s, "s")
    );
    println!(
        "{:<44} {:>24} {:>24}",
        "  as throughput",
        f(raw.model_load_s.map(|s| mb / s), "MiB/s"),
        f(verity.model_load_s.map(|s| mb / s), "MiB/s")
    );
    println!(
        "{:<44} {:>24} {:>24}",
        "boot to ready (launcher start)",
        f(Some(raw.boot_to_ready_s), "s"),
        f(Some(verity.boot_to_ready_s), "s")
    );
    println!(
        "{:<44} {:>24} {:>24}",
        "boot to first token",
        f(raw.boot_to_first_token_s, "s"),
        f(verity.boot_to_first_token_s, "s")
    );
    if let Some(b) = &big {
        println!(
            "\n{:<44} {:>24} {:>24}",
            format!(
                "synthetic Q8_0 ({} MiB), guest {} MiB",
                b.model_bytes >> 20,
                b.guest_memory_mib
            ),
            "raw disk",
            "dm-verity mapping"
        );
        println!(
            "{:<44} {:>24} {:>24}",
            "guest sequential read (page cache dropped)",
            f(b.raw_read_mib_s, "MiB/s"),
            f(b.verity_read_mib_s, "MiB/s")
        );
        println!(
            "{:<44} {:>24} {:>24}",
            "load into the CPU backend (read+verify+repack)",
            "-",
            format!("{} ({})", f(b.load_s, "s"), f(b.load_mib_s, "MiB/s"))
        );
        println!(
            "{:<44} {:>24} {:>24}",
            "agent peak RSS / guest memory in use (max)",
            "-",
            format!(
                "{} / {} MiB",
                b.agent_peak_rss_mib.map_or("n/a".into(), |m| m.to_string()),
                b.guest_mem_peak_mib.map_or("n/a".into(), |m| m.to_string())
            )
        );
        println!(
            "{:<44} {:>24} {:>24}",
            "guest memory the launcher asks for",
            format!("{} MiB (2x + 512)", 2 * (b.model_bytes >> 20) + 512),
            format!("{} MiB given", b.guest_memory_mib)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_numbers_are_parsed() {
        let c = "[ 9.1] guest-agent: model synthetic-1b5 loaded through dm-verity into the cpu \
                 backend: 1641168896 bytes verified in 80.2 s (19.5 MiB/s), agent peak RSS 1590 MiB, \
                 guest memory in use at most 1720 MiB; serving (model hash ab)\n\
                 [99.0] guest-agent: bench: raw read of /dev/vdb: 1641168896 bytes in 10.00 s (156.5 MiB/s)\n\
                 [120.0] guest-agent: bench: dm-verity read of /dev/dm-0: 1641168896 bytes in 20.00 s (78.3 MiB/s)\n";
        assert_eq!(parse_model_load_secs(c), Some(80.2));
        assert_eq!(mib_s_after(c, " bytes verified in"), Some(19.5));
        assert_eq!(mib_s_after(c, "bench: raw read"), Some(156.5));
        assert_eq!(mib_s_after(c, "bench: dm-verity read"), Some(78.3));
        assert_eq!(
            mib_after(c, "loaded through dm-verity", "agent peak RSS "),
            Some(1590)
        );
        assert_eq!(
            mib_after(c, "loaded through dm-verity", "in use at most "),
            Some(1720)
        );
        assert_eq!(mib_s_after(c, "nothing"), None);
        let raw = "[5.0] guest-agent: model disk: 98362432 bytes read and sha256 checked in 3.5 s (26.8 MiB/s) from /dev/vda\n\
                   [7.1] guest-agent: model loaded into the CPU backend (1 threads) in 2.1 s\n";
        assert_eq!(parse_model_load_secs(raw), Some(3.5));
        assert_eq!(parse_cpu_load_secs(raw), Some(2.1));
        assert_eq!(parse_cpu_load_secs(c), None);
    }
}
