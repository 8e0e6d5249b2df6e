//! `cargo xtask model fetch`: download a pinned model (placeholder; owned by the inference work).

use std::path::{Path, PathBuf};

/// Fetch the model called `name` into `dest_dir` (or the default cache) and return its path.
pub fn fetch(name: &str, dest_dir: Option<&Path>) -> anyhow::Result<PathBuf> {
    let _ = dest_dir;
    anyhow::bail!("not implemented yet: `cargo xtask model fetch {name}` (xtask/src/model.rs)")
}
