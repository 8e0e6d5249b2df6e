//! `cargo xtask image repro-check`: two builds in two separate temporary directories (separate
//! outputs and agent target directories, only the download cache shared), then a byte-for-byte
//! comparison of every output file.

use std::collections::BTreeSet;
use std::path::Path;

use serde::Serialize;

use super::build::{BuildOptions, build};

/// Outcome of a comparison.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Comparison {
    pub identical: Vec<String>,
    /// Files whose bytes differ.
    pub differing: Vec<String>,
    /// Files present in only one build.
    pub only_in_one: Vec<String>,
}

impl Comparison {
    pub fn ok(&self) -> bool {
        self.differing.is_empty() && self.only_in_one.is_empty()
    }
}

fn file_names(dir: &Path) -> anyhow::Result<BTreeSet<String>> {
    Ok(std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect())
}

/// Compare the regular files of two directories.
pub fn compare(a: &Path, b: &Path) -> anyhow::Result<Comparison> {
    let na = file_names(a)?;
    let nb = file_names(b)?;
    let mut c = Comparison {
        identical: vec![],
        differing: vec![],
        only_in_one: vec![],
    };
    for n in na.union(&nb) {
        if !(na.contains(n) && nb.contains(n)) {
            c.only_in_one.push(n.clone());
        } else if std::fs::read(a.join(n))? == std::fs::read(b.join(n))? {
            c.identical.push(n.clone());
        } else {
            c.differing.push(n.clone());
        }
    }
    Ok(c)
}

/// Run both builds and compare. `base` supplies the repo, cache, mirror and quietness.
pub fn repro_check(base: &BuildOptions, keep: bool) -> anyhow::Result<Comparison> {
    let one = tempfile::Builder::new().prefix("repro-a-").tempdir()?;
    let two = tempfile::Builder::new().prefix("repro-b-").tempdir()?;
    for (i, d) in [&one, &two].into_iter().enumerate() {
        eprintln!(
            "repro-check: build {} of 2 in {}",
            i + 1,
            d.path().display()
        );
        let opts = BuildOptions {
            out: d.path().join("out"),
            agent_target_dir: d.path().join("agent-target"),
            ..base.clone()
        };
        build(&opts)?;
    }
    let c = compare(&one.path().join("out"), &two.path().join("out"))?;
    if keep {
        let (a, b) = (one.keep(), two.keep());
        eprintln!("repro-check: kept {} and {}", a.display(), b.display());
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_differing_and_missing_files() {
        let a = tempfile::tempdir().expect("tmp");
        let b = tempfile::tempdir().expect("tmp");
        std::fs::write(a.path().join("initrd"), b"x").expect("w");
        std::fs::write(b.path().join("initrd"), b"y").expect("w");
        std::fs::write(a.path().join("vmlinuz"), b"k").expect("w");
        std::fs::write(b.path().join("vmlinuz"), b"k").expect("w");
        std::fs::write(b.path().join("extra"), b"e").expect("w");
        let c = compare(a.path(), b.path()).expect("compare");
        assert_eq!(c.differing, ["initrd"]);
        assert_eq!(c.identical, ["vmlinuz"]);
        assert_eq!(c.only_in_one, ["extra"]);
        assert!(!c.ok());
    }
}
