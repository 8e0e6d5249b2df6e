//! The pinned Rust toolchain: `rust-toolchain.toml` names one exact release, and the image build
//! refuses any other rustc, because the agent's bytes (and so the image hash) depend on it.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;

/// What `rustc -vV` says about the toolchain that will build the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rustc {
    /// First line of `rustc -vV` (`rustc 1.95.0 (59807616e 2026-04-14)`).
    pub version_line: String,
    /// `release:` (`1.95.0`).
    pub release: String,
    /// `commit-hash:`.
    pub commit_hash: String,
    /// `host:` triple.
    pub host: String,
}

/// The channel `rust-toolchain.toml` pins (`[toolchain] channel = "1.95.0"`).
pub fn pinned_channel(repo: &Path) -> anyhow::Result<String> {
    let path = repo.join("rust-toolchain.toml");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {}: the repository pins its Rust toolchain there",
            path.display()
        )
    })?;
    parse_channel(&text).ok_or_else(|| {
        anyhow::anyhow!(
            "{} has no `channel = \"X.Y.Z\"` line under [toolchain]",
            path.display()
        )
    })
}

/// `channel` of the `[toolchain]` table (the only key we read; enough for this file's format).
pub fn parse_channel(text: &str) -> Option<String> {
    let mut in_toolchain = false;
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.starts_with('[') {
            in_toolchain = line == "[toolchain]";
            continue;
        }
        if !in_toolchain {
            continue;
        }
        if let Some((k, v)) = line.split_once('=')
            && k.trim() == "channel"
        {
            let v = v.trim().trim_matches('"').trim();
            return (!v.is_empty()).then(|| v.to_string());
        }
    }
    None
}

/// Parse `rustc -vV` output.
pub fn parse_rustc_vv(text: &str) -> Option<Rustc> {
    let mut lines = text.lines();
    let version_line = lines.next()?.trim().to_string();
    if !version_line.starts_with("rustc ") {
        return None;
    }
    let mut release = None;
    let mut commit_hash = None;
    let mut host = None;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            let v = v.trim().to_string();
            match k.trim() {
                "release" => release = Some(v),
                "commit-hash" => commit_hash = Some(v),
                "host" => host = Some(v),
                _ => {}
            }
        }
    }
    Some(Rustc {
        version_line,
        release: release?,
        commit_hash: commit_hash?,
        host: host?,
    })
}

/// Refuse a rustc whose release is not the pinned channel.
pub fn check(rustc: &Rustc, pinned: &str) -> anyhow::Result<()> {
    if rustc.release != pinned {
        anyhow::bail!(
            "the image must be built with Rust {pinned} (rust-toolchain.toml), but the rustc in use is {} \
             ({}). A different compiler gives a different agent binary and so a different image hash. \
             Install the pinned one with `rustup toolchain install {pinned} --component rustfmt,clippy` \
             and run through rustup (which reads rust-toolchain.toml), or unset RUSTC if it points elsewhere",
            rustc.release,
            rustc.version_line
        );
    }
    if rustc.host != "x86_64-unknown-linux-gnu" {
        anyhow::bail!(
            "the image build needs an x86_64-unknown-linux-gnu host toolchain (rustc's host is {})",
            rustc.host
        );
    }
    Ok(())
}

/// The rustc cargo would use in `repo` (`$RUSTC`, else `rustc` through rustup, which honours
/// rust-toolchain.toml), checked against the pin; with its sysroot (the toolchain directory the
/// build root mounts).
pub fn resolve(repo: &Path) -> anyhow::Result<(Rustc, PathBuf)> {
    let pinned = pinned_channel(repo)?;
    let prog = std::env::var_os("RUSTC").unwrap_or_else(|| OsString::from("rustc"));
    let run = |args: &[&str]| -> anyhow::Result<String> {
        let out = Command::new(&prog)
            .args(args)
            .current_dir(repo)
            .output()
            .with_context(|| {
                format!(
                    "running {} {}: install Rust {pinned} with rustup",
                    prog.to_string_lossy(),
                    args.join(" ")
                )
            })?;
        if !out.status.success() {
            anyhow::bail!(
                "{} {} failed: {}\nInstall Rust {pinned}: `rustup toolchain install {pinned}`",
                prog.to_string_lossy(),
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let vv = run(&["-vV"])?;
    let rustc = parse_rustc_vv(&vv)
        .ok_or_else(|| anyhow::anyhow!("cannot read `rustc -vV` output:\n{vv}"))?;
    check(&rustc, &pinned)?;
    let sysroot = PathBuf::from(run(&["--print", "sysroot"])?.trim());
    for tool in ["bin/rustc", "bin/cargo"] {
        if !sysroot.join(tool).is_file() {
            anyhow::bail!(
                "the Rust toolchain at {} has no {tool}: install the pinned toolchain with rustup \
                 (`rustup toolchain install {pinned}`)",
                sysroot.display()
            );
        }
    }
    Ok((rustc, sysroot))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VV: &str = "rustc 1.95.0 (59807616e 2026-04-14)\nbinary: rustc\ncommit-hash: 59807616e1fa2540724bfbac14d7976d7e4a3860\ncommit-date: 2026-04-14\nhost: x86_64-unknown-linux-gnu\nrelease: 1.95.0\nLLVM version: 22.1.2\n";

    #[test]
    fn the_repository_pins_an_exact_release() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let ch = pinned_channel(&repo).expect("rust-toolchain.toml");
        let parts: Vec<&str> = ch.split('.').collect();
        assert_eq!(parts.len(), 3, "exact X.Y.Z, not a moving channel: {ch}");
        assert!(parts.iter().all(|p| p.parse::<u32>().is_ok()), "{ch}");
    }

    #[test]
    fn parses_the_channel_only_in_the_toolchain_table() {
        assert_eq!(
            parse_channel("[toolchain]\nchannel = \"1.95.0\" # pinned\n").as_deref(),
            Some("1.95.0")
        );
        assert_eq!(parse_channel("[other]\nchannel = \"nightly\"\n"), None);
        assert_eq!(parse_channel("channel = \"1.0.0\"\n"), None);
    }

    #[test]
    fn the_pinned_rustc_is_accepted() {
        let r = parse_rustc_vv(VV).expect("parse");
        assert_eq!(r.release, "1.95.0");
        assert_eq!(r.commit_hash, "59807616e1fa2540724bfbac14d7976d7e4a3860");
        check(&r, "1.95.0").expect("pinned");
    }

    #[test]
    fn a_foreign_rustc_is_refused_naming_the_version_to_install() {
        let other = VV
            .replace("1.95.0", "1.96.0")
            .replace("59807616e", "aaaaaaaaa");
        let r = parse_rustc_vv(&other).expect("parse");
        let err = check(&r, "1.95.0").expect_err("foreign").to_string();
        assert!(err.contains("Rust 1.95.0"), "{err}");
        assert!(err.contains("rustc 1.96.0"), "{err}");
        assert!(
            err.contains("rustup toolchain install 1.95.0"),
            "names the fix: {err}"
        );
        let nightly = parse_rustc_vv(
            &VV.replace("release: 1.95.0", "release: 1.97.0-nightly")
                .replace("rustc 1.95.0", "rustc 1.97.0-nightly"),
        )
        .expect("parse");
        assert!(check(&nightly, "1.95.0").is_err());
        assert!(parse_rustc_vv("garbage").is_none());
    }
}
