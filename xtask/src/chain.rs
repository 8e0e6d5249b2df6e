//! `cargo xtask chain`: start the local chain for tests and demos.
//!
//! Runs `contract/chain/server.mjs` (an @ton/sandbox emulator with the root contract and a
//! funded team wallet, serving a toncenter v2 subset on 127.0.0.1), installing the contract's
//! npm packages first when they are missing. Arguments after `--` go to the server
//! (`cargo xtask chain -- --help` lists them: `--port`, `--state-file`, `--wallet`, ...).

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, bail};

/// Installs `contract/node_modules` when absent (`npm ci`, exact versions from the lock).
pub fn ensure_packages(repo: &Path) -> anyhow::Result<()> {
    let contract = repo.join("contract");
    if !contract.join("node_modules/@ton/sandbox").is_dir() {
        eprintln!(
            "chain: installing the contract's npm packages (npm ci in {})",
            contract.display()
        );
        let st = Command::new("npm")
            .current_dir(&contract)
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .status()
            .context("running npm: install Node.js 20 or newer with npm")?;
        if !st.success() {
            bail!("npm ci failed ({st}) in {}", contract.display());
        }
    }
    Ok(())
}

/// A local chain started in the background; stopped on drop.
pub struct LocalChain {
    child: std::process::Child,
    /// The state file's JSON: rpc_url, wallet {address, mnemonic, version}, root {address}.
    pub state: serde_json::Value,
    _dir: tempfile::TempDir,
}

impl Drop for LocalChain {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the chain on a free loopback port and waits until it is ready.
pub fn start(repo: &Path) -> anyhow::Result<LocalChain> {
    use std::io::BufRead as _;
    ensure_packages(repo)?;
    let dir = tempfile::Builder::new().prefix("xtask-chain").tempdir()?;
    let state_file = dir.path().join("state.json");
    let mut child = Command::new("node")
        .current_dir(repo.join("contract"))
        .args(["chain/server.mjs", "--port", "0", "--json", "--state-file"])
        .arg(&state_file)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running node: install Node.js 20 or newer")?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        std::io::BufReader::new(out).read_line(&mut line)?;
    }
    if line.trim().is_empty() {
        let _ = child.kill();
        bail!("the local chain exited before it was ready (see its output above)");
    }
    let state: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&state_file).with_context(|| format!("reading {}", state_file.display()))?,
    )?;
    Ok(LocalChain {
        child,
        state,
        _dir: dir,
    })
}

/// Installs the npm packages if needed, then runs the chain in the foreground.
pub fn run(repo: &Path, args: &[String]) -> anyhow::Result<()> {
    ensure_packages(repo)?;
    let contract = repo.join("contract");
    let st = Command::new("node")
        .current_dir(&contract)
        .arg("chain/server.mjs")
        .args(args)
        .status()
        .context("running node: install Node.js 20 or newer")?;
    if !st.success() {
        bail!("the local chain exited with {st}");
    }
    Ok(())
}
