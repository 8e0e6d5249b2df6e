//! `cargo xtask test`: the README's test command.
//!
//! On a fresh Debian/Ubuntu machine it installs what the tests need, prepares their inputs once,
//! then runs every suite and prints a table of steps with their times:
//!
//! 1. host tools (QEMU 10 from bookworm-backports, dpkg, apt keyring) — as `demo` does;
//! 2. the contract's npm packages (`npm ci` in `contract/`, exact versions from its lock);
//! 3. the small real model (`cargo xtask model fetch smollm2-135m`), exported as `SMOLLM2_GGUF`;
//! 4. the pinned Python client libraries the end-to-end tests drive workers with (the official
//!    `openai` SDK and `jsonschema`, [`PYTHON_CLIENTS`]), installed with pip into
//!    `<target>/python-clients` and exported as `WORKER_PYTHONPATH`;
//! 5. the image (`cargo xtask image build`), exported as `WORKER_IMAGE_DIR` so that end-to-end
//!    tests boot it instead of building their own;
//! 6. `cargo test --workspace --locked` (unit and end-to-end tests, real QEMU under TCG);
//! 7. `npm test` in `contract/` (the Tolk contract on @ton/sandbox).
//!
//! A step that fails stops the run with its name; the exit status is non-zero.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context as _, bail};

use crate::image::build::{BuildOptions, build};

/// The Python packages the end-to-end tests use as real clients, exact versions.
pub const PYTHON_CLIENTS: &[&str] = &["openai==1.109.1", "jsonschema==4.23.0"];

/// Installs [`PYTHON_CLIENTS`] into `dir` (pip `--target`, no system packages touched) unless a
/// stamp says this exact list is already there; returns `dir` for `PYTHONPATH`.
pub fn install_python_clients(dir: &Path) -> anyhow::Result<()> {
    let want = PYTHON_CLIENTS.join("\n");
    let stamp = dir.join(".installed");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == want) {
        eprintln!(
            "python clients: {} already in {}",
            PYTHON_CLIENTS.join(" "),
            dir.display()
        );
        return Ok(());
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .with_context(|| format!("removing stale {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    eprintln!(
        "python clients: pip install {} into {}",
        PYTHON_CLIENTS.join(" "),
        dir.display()
    );
    status(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-warn-conflicts",
                "--only-binary=:all:",
                "--target",
            ])
            .arg(dir)
            .args(PYTHON_CLIENTS),
        "python3 -m pip install (install python3 and python3-pip; set PIP_INDEX_URL for a mirror)",
    )?;
    std::fs::write(&stamp, want).with_context(|| format!("writing {}", stamp.display()))?;
    Ok(())
}

/// What to run.
#[derive(Debug, Clone)]
pub struct TestOptions {
    pub build: BuildOptions,
    /// Do not install host packages (fail instead when something is missing).
    pub no_install: bool,
    /// Extra arguments for `cargo test` (after `--workspace --locked`).
    pub cargo_args: Vec<String>,
}

fn status(cmd: &mut Command, what: &str) -> anyhow::Result<()> {
    let st = cmd.status().with_context(|| format!("starting {what}"))?;
    if !st.success() {
        bail!("{what} failed ({st}); its output is above");
    }
    Ok(())
}

fn require_node(contract: &Path) -> anyhow::Result<()> {
    let out = Command::new("node")
        .arg("--version")
        .output()
        .map_err(|_| {
            anyhow::anyhow!(
                "node is not installed: install Node.js 20 or newer (with npm) to test {}",
                contract.display()
            )
        })?;
    let v = String::from_utf8_lossy(&out.stdout);
    let major: u32 = v
        .trim()
        .trim_start_matches('v')
        .split('.')
        .next()
        .and_then(|m| m.parse().ok())
        .unwrap_or(0);
    if major < 20 {
        bail!(
            "node {} is too old for the contract tests: install Node.js 20 or newer",
            v.trim()
        );
    }
    Ok(())
}

/// Runs the whole suite.
pub fn run(opts: &TestOptions) -> anyhow::Result<()> {
    let repo = &opts.build.repo;
    let contract = repo.join("contract");
    let mut steps: Vec<(&str, f64)> = Vec::new();
    let mut timed =
        |name: &'static str, f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<()> {
            eprintln!("\n== xtask test: {name}");
            let t = Instant::now();
            f().with_context(|| format!("step `{name}`"))?;
            steps.push((name, t.elapsed().as_secs_f64()));
            Ok(())
        };

    timed("host tools", &mut || {
        if opts.no_install {
            crate::tools::require(&["qemu-system-x86_64", "dpkg-deb", "apt-get"])
        } else {
            crate::demo::install_tools()
        }
    })?;
    timed("contract packages (npm ci)", &mut || {
        require_node(&contract)?;
        status(
            Command::new("npm").current_dir(&contract).args([
                "ci",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
            ]),
            "npm ci in contract/",
        )
    })?;
    let mut model = std::path::PathBuf::new();
    timed("model (smollm2-135m)", &mut || {
        model = crate::model::fetch("smollm2-135m", None)?;
        Ok(())
    })?;
    let target_base = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| repo.join("target"));
    let python_clients = target_base.join("python-clients");
    timed("python clients (pip)", &mut || {
        install_python_clients(&python_clients)
    })?;
    timed("image build", &mut || build(&opts.build).map(|_| ()))?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    timed("cargo test --workspace", &mut || {
        status(
            Command::new(&cargo)
                .current_dir(repo)
                .args(["test", "--workspace", "--locked"])
                .args(&opts.cargo_args)
                .env("WORKER_IMAGE_DIR", &opts.build.out)
                .env("SMOLLM2_GGUF", &model)
                .env("WORKER_PYTHONPATH", &python_clients),
            "cargo test --workspace",
        )
    })?;
    timed("contract tests (npm test)", &mut || {
        status(
            Command::new("npm").current_dir(&contract).arg("test"),
            "npm test in contract/",
        )
    })?;

    eprintln!("\nxtask test: all steps passed");
    eprintln!("{:<32} {:>9}", "step", "seconds");
    for (name, secs) in &steps {
        eprintln!("{name:<32} {secs:>9.1}");
    }
    Ok(())
}
