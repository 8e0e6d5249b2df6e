//! `cargo xtask chain`: start the local chain for tests and demos.
//!
//! Runs `contract/chain/server.mjs` (an @ton/sandbox emulator with the root contract and a
//! funded team wallet, serving a toncenter v2 subset on 127.0.0.1), installing the contract's
//! npm packages first when they are missing. Arguments after `--` go to the server
//! (`cargo xtask chain -- --help` lists them: `--port`, `--state-file`, `--wallet`, ...).

use std::path::Path;
use std::process::Command;

use anyhow::{Context as _, bail};

/// Installs `contract/node_modules` if absent, then runs the chain in the foreground.
pub fn run(repo: &Path, args: &[String]) -> anyhow::Result<()> {
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
