//! `cargo xtask image repro-check --host SUITE`: the same image from another distribution.
//!
//! Builds once on this host, then once inside a clean Debian root of `SUITE` (made by
//! mmdebstrap from the same mirror) where the repository sits at another path, and compares
//! every output byte for byte. Inside that root everything the pipeline runs (dpkg-deb, the
//! xtask binary itself, compiled there by that distribution's C compiler for its own C
//! dependencies) is the other distribution's; only the pinned Rust toolchain, the crate sources
//! (Cargo.lock checksums) and the .deb cache (the lock's sha256) are shared. A difference is
//! named down to the initrd entry and, for the agent (`/init`), the first differing ELF section.

use std::process::Command;

use anyhow::Context as _;
use serde::Serialize;

use super::build::{BuildOptions, build};
use super::buildroot::{self, Bind};
use super::repro::{Comparison, compare};
use super::sources;
use super::toolchain;
use crate::progress::Progress;

/// Where things sit inside the other root (a path no host build uses).
const IN_ROOT: &str = "/srv/cross-host";

/// Outcome of a cross-host check.
#[derive(Debug, Clone, Serialize)]
pub struct HostComparison {
    pub suite: String,
    pub files: Comparison,
    /// For each differing file, what differs inside it.
    pub details: Vec<String>,
    pub seconds_root: f64,
    pub seconds_host_build: f64,
    pub seconds_other_build: f64,
}

/// The Debian suites this check knows how to make a root of.
pub const SUITES: &[&str] = &["bookworm", "trixie", "forky", "sid"];

fn ensure_mmdebstrap() -> anyhow::Result<()> {
    if crate::tools::find("mmdebstrap").is_some() {
        return Ok(());
    }
    if !crate::demo::is_root() {
        anyhow::bail!(
            "mmdebstrap is not installed: install the Debian package `mmdebstrap` (apt-get install mmdebstrap) \
             or run this check as root, which installs it"
        );
    }
    crate::demo::apt(&["install", "-y", "--no-install-recommends", "mmdebstrap"]).context(
        "installing mmdebstrap failed: run `apt-get update` and retry, or install it yourself",
    )
}

/// Run the check. `base` supplies the repo, cache, mirror and quietness.
pub fn repro_check_host(
    base: &BuildOptions,
    suite: &str,
    keep: bool,
) -> anyhow::Result<HostComparison> {
    if !SUITES.contains(&suite) {
        anyhow::bail!(
            "--host {suite}: not a Debian suite this check can make a root of; use one of {}",
            SUITES.join(", ")
        );
    }
    let progress = Progress::new(base.quiet);
    let (_, rust_sysroot) = toolchain::resolve(&base.repo)?;
    ensure_mmdebstrap()?;
    let mirror = sources::resolve_mirror(base.mirror.as_deref())?;
    let work = tempfile::Builder::new()
        .prefix("repro-host-")
        .tempdir()
        .context("creating a work directory")?;
    let root = work.path().join(suite);

    // 1. A clean root of the other distribution, with a C compiler for xtask's own C
    //    dependencies (zstd) and dpkg for extraction.
    progress.step(
        "cross-host",
        format!("mmdebstrap {suite} (minbase + gcc, libc6-dev) from {mirror}"),
    );
    let t = std::time::Instant::now();
    let out = Command::new("mmdebstrap")
        .args([
            "--variant=minbase",
            "--include=gcc,libc6-dev",
            "--quiet",
            &format!("--keyring={}", super::apt::DEBIAN_KEYRING),
            suite,
        ])
        .arg(&root)
        .arg(format!("deb {mirror} {suite} main"))
        .output()
        .context("running mmdebstrap")?;
    if !out.status.success() {
        anyhow::bail!(
            "mmdebstrap {suite} from {mirror} failed: {}\nCheck the mirror (--mirror URL / WORKER_APT_MIRROR) \
             and that {} knows {suite}'s signing key (package debian-archive-keyring)",
            String::from_utf8_lossy(&out.stderr).trim(),
            super::apt::DEBIAN_KEYRING
        );
    }
    let seconds_root = t.elapsed().as_secs_f64();
    let os = std::fs::read_to_string(root.join("etc/os-release")).unwrap_or_default();
    let pretty = os
        .lines()
        .find_map(|l| l.strip_prefix("PRETTY_NAME="))
        .map(|v| v.trim_matches('"').to_string())
        .unwrap_or_else(|| suite.to_string());
    progress.step(
        "cross-host",
        format!("{pretty} root ready in {seconds_root:.0}s"),
    );

    // 2. The build on this host.
    let host_out = work.path().join("host-out");
    progress.step(
        "cross-host",
        format!("build 1 of 2: this host, {}", host_out.display()),
    );
    let t = std::time::Instant::now();
    build(&BuildOptions {
        out: host_out.clone(),
        ..base.clone()
    })?;
    let seconds_host_build = t.elapsed().as_secs_f64();

    // 3. The build inside the other root, repository at another path.
    progress.step(
        "cross-host",
        format!("build 2 of 2: inside {pretty}, repository at {IN_ROOT}/src"),
    );
    let t = std::time::Instant::now();
    let cargo_home = super::build::cargo_home()?;
    std::fs::create_dir_all(&base.cache)?;
    let binds = [
        Bind {
            src: rust_sysroot.clone(),
            dst: "/opt/rust".into(),
        },
        Bind {
            src: base.repo.clone(),
            dst: format!("{IN_ROOT}/src"),
        },
        Bind {
            src: cargo_home,
            dst: format!("{IN_ROOT}/cargo"),
        },
        Bind {
            src: base.cache.clone(),
            dst: format!("{IN_ROOT}/debs"),
        },
        Bind {
            src: "/proc".into(),
            dst: "/proc".into(),
        },
        Bind {
            src: "/dev".into(),
            dst: "/dev".into(),
        },
    ];
    let env: Vec<(&str, String)> = vec![
        ("PATH", "/opt/rust/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()),
        ("HOME", "/root".into()),
        ("LC_ALL", "C".into()),
        ("RUSTC", "/opt/rust/bin/rustc".into()),
        ("CARGO_HOME", format!("{IN_ROOT}/cargo")),
        ("CARGO_TARGET_DIR", format!("{IN_ROOT}/xtask-target")),
        // Crate sources are already in CARGO_HOME (Cargo.lock pins them); no network inside.
        ("CARGO_NET_OFFLINE", "true".into()),
        ("CARGO_TERM_COLOR", "never".into()),
    ];
    let mut cmd = buildroot::chroot_command(
        &root,
        "/opt/rust/bin/cargo",
        &binds,
        &env,
        &format!("{IN_ROOT}/src"),
    )?;
    cmd.args(["run", "--locked", "--quiet", "-p", "xtask", "--"])
        .args(["image", "build"])
        .args(["--out", &format!("{IN_ROOT}/out")])
        .args(["--cache-dir", &format!("{IN_ROOT}/debs")])
        .args(["--agent-target-dir", &format!("{IN_ROOT}/agent-target")])
        .arg("--mirror")
        .arg(&mirror);
    if base.quiet {
        cmd.arg("--quiet");
    }
    let st = cmd.status().map_err(|e| {
        anyhow::anyhow!(
            "entering the {suite} root failed: {e}; {}",
            buildroot::namespace_hint()
        )
    })?;
    if !st.success() {
        anyhow::bail!("the build inside the {pretty} root failed ({st}); its output is above");
    }
    let seconds_other_build = t.elapsed().as_secs_f64();
    let other_out = root.join(IN_ROOT.trim_start_matches('/')).join("out");

    let files = compare(&host_out, &other_out)?;
    let mut details = Vec::new();
    for f in &files.differing {
        let a = std::fs::read(host_out.join(f))?;
        let b = std::fs::read(other_out.join(f))?;
        details.extend(explain(f, &a, &b));
    }
    if keep {
        let kept = work.keep();
        eprintln!(
            "repro-check: kept {} (this host: host-out/, {suite}: {suite}{IN_ROOT}/out/)",
            kept.display()
        );
    }
    Ok(HostComparison {
        suite: suite.to_string(),
        files,
        details,
        seconds_root,
        seconds_host_build,
        seconds_other_build,
    })
}

/// What differs inside one output file: for the initrd, each differing entry, and for the
/// agent (`init`) and other ELF files, the first differing section; for text, the first
/// differing line.
pub fn explain(name: &str, a: &[u8], b: &[u8]) -> Vec<String> {
    if name == "initrd" {
        let unpack = |d: &[u8]| -> anyhow::Result<Vec<super::cpio::Entry>> {
            let raw = zstd::stream::decode_all(d).context("zstd")?;
            super::cpio::parse_newc(&raw).map_err(|e| anyhow::anyhow!("{e}"))
        };
        let (ea, eb) = match (unpack(a), unpack(b)) {
            (Ok(x), Ok(y)) => (x, y),
            (Err(e), _) | (_, Err(e)) => return vec![format!("initrd: cannot unpack: {e}")],
        };
        let mut out = Vec::new();
        for x in &ea {
            match eb.iter().find(|y| y.name == x.name) {
                None => out.push(format!("initrd: {} only in this host's build", x.name)),
                Some(y) if y.mode != x.mode => out.push(format!(
                    "initrd: {} mode {:o} vs {:o}",
                    x.name, x.mode, y.mode
                )),
                Some(y) if y.data != x.data => {
                    let inner = explain_bytes(&format!("initrd:/{}", x.name), &x.data, &y.data);
                    out.push(inner);
                }
                Some(_) => {}
            }
        }
        for y in &eb {
            if !ea.iter().any(|x| x.name == y.name) {
                out.push(format!("initrd: {} only in the other host's build", y.name));
            }
        }
        if out.is_empty() {
            out.push("initrd: same entries and contents, different compression or order".into());
        }
        return out;
    }
    vec![explain_bytes(name, a, b)]
}

fn explain_bytes(name: &str, a: &[u8], b: &[u8]) -> String {
    if let (Ok(ea), Ok(eb)) = (super::elf::Elf::parse(a), super::elf::Elf::parse(b)) {
        let (sa, sb) = (ea.sections(), eb.sections());
        if let (Ok(sa), Ok(sb)) = (sa, sb) {
            for (x, y) in sa.iter().zip(&sb) {
                if x.0 != y.0 {
                    return format!("{name}: ELF section lists differ at {} vs {}", x.0, y.0);
                }
                if x.1 != y.1 {
                    return format!(
                        "{name}: first differing ELF section {} ({} vs {} bytes)",
                        x.0,
                        x.1.len(),
                        y.1.len()
                    );
                }
            }
            if sa.len() != sb.len() {
                return format!("{name}: {} vs {} ELF sections", sa.len(), sb.len());
            }
            return format!("{name}: same sections, headers differ");
        }
    }
    fn text(d: &[u8]) -> Option<&str> {
        std::str::from_utf8(d)
            .ok()
            .filter(|t| !t.bytes().any(|c| c < 0x09))
    }
    if let (Some(ta), Some(tb)) = (text(a), text(b)) {
        for (i, (x, y)) in ta.lines().zip(tb.lines()).enumerate() {
            if x != y {
                return format!("{name}: line {} differs: {x:?} vs {y:?}", i + 1);
            }
        }
    }
    let first = a
        .iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .unwrap_or(a.len().min(b.len()));
    format!(
        "{name}: {} vs {} bytes, first difference at byte {first}",
        a.len(),
        b.len()
    )
}

/// The suite named by `--host`, checked early (before any build).
pub fn parse_suite(s: &str) -> Result<String, String> {
    if SUITES.contains(&s) {
        Ok(s.to_string())
    } else {
        Err(format!("use one of {}", SUITES.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::cpio::Tree;

    fn initrd(init: &[u8], extra: Option<&str>) -> Vec<u8> {
        let mut t = Tree::new();
        t.dir("etc", 0o755).expect("dir");
        t.file("init", 0o755, init.to_vec()).expect("file");
        if let Some(e) = extra {
            t.file(e, 0o644, b"x".to_vec()).expect("file");
        }
        zstd::bulk::compress(&t.to_newc(1_700_000_000), 3).expect("zstd")
    }

    #[test]
    fn names_the_first_differing_elf_section_of_the_agent() {
        let a = crate::image::elf::tests::build_elf(&[(".text", b"abcd"), (".rodata", b"x")], &[]);
        let b = crate::image::elf::tests::build_elf(&[(".text", b"abcd"), (".rodata", b"y")], &[]);
        let got = explain("initrd", &initrd(&a, None), &initrd(&b, Some("etc/extra")));
        assert!(
            got.iter()
                .any(|l| l == "initrd:/init: first differing ELF section .rodata (1 vs 1 bytes)"),
            "{got:?}"
        );
        assert!(
            got.iter()
                .any(|l| l == "initrd: etc/extra only in the other host's build"),
            "{got:?}"
        );
    }

    #[test]
    fn names_the_differing_line_of_a_text_file() {
        let got = explain(
            "manifest.json",
            b"{\n  \"rustc\": \"rustc 1.95.0\"\n}\n",
            b"{\n  \"rustc\": \"rustc 1.96.0\"\n}\n",
        );
        assert_eq!(got.len(), 1);
        assert!(
            got[0].starts_with("manifest.json: line 2 differs"),
            "{got:?}"
        );
        let got = explain("OVMF.fd", b"\x00\x01\x02", b"\x00\x01\x03\x04");
        assert_eq!(got, ["OVMF.fd: 3 vs 4 bytes, first difference at byte 2"]);
    }

    #[test]
    fn only_known_suites() {
        assert!(parse_suite("trixie").is_ok());
        assert!(parse_suite("ubuntu").is_err());
    }
}
