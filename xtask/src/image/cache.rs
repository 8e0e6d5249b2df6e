//! Content-addressed download cache: `<cache>/<sha256>.deb`, verified on every use.
//!
//! Default location `${XDG_CACHE_HOME:-~/.cache}/confidential-worker/debs`, overridden by
//! `--cache-dir` or `WORKER_CACHE_DIR`. The private apt state lives in `<cache>/apt-state/`.

use std::io::Read as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use sha2::{Digest as _, Sha256};

use super::apt::Apt;
use super::lock::LockedPackage;
use crate::progress::{Progress, bytes};

/// The cache directory: explicit, then `WORKER_CACHE_DIR`, then the XDG default.
pub fn cache_dir(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("WORKER_CACHE_DIR").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|p| !p.is_empty()) {
        Some(x) => PathBuf::from(x),
        None => {
            let home = std::env::var_os("HOME").ok_or_else(|| {
                anyhow::anyhow!("neither HOME nor XDG_CACHE_HOME is set: pass --cache-dir DIR")
            })?;
            PathBuf::from(home).join(".cache")
        }
    };
    Ok(base.join("confidential-worker").join("debs"))
}

/// SHA-256 (lowercase hex) and size of a file.
pub fn sha256_file(path: &Path) -> anyhow::Result<(String, u64)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok((hex::encode(h.finalize()), size))
}

/// SHA-256 of bytes, lowercase hex.
pub fn sha256_bytes(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Path of a package in the cache.
pub fn cached_path(cache: &Path, pkg: &LockedPackage) -> PathBuf {
    cache.join(format!("{}.deb", pkg.sha256))
}

/// Check a file against the lock entry; the error names the input and the fix.
pub fn verify(pkg: &LockedPackage, path: &Path) -> anyhow::Result<()> {
    let (sha, size) = sha256_file(path)?;
    if sha != pkg.sha256 || size != pkg.size {
        anyhow::bail!(
            "input {} {} ({}): {} does not match the lock (sha256 {sha}, {size} bytes; the lock says sha256 {}, \
             {} bytes). The cached file is corrupt or was tampered with: delete it (rm {}) and re-run \
             `cargo xtask image build`, which downloads it again.",
            pkg.name,
            pkg.version,
            pkg.suite,
            path.display(),
            pkg.sha256,
            pkg.size,
            path.display()
        );
    }
    Ok(())
}

/// Make sure every locked package is in the cache, downloading what is missing (one apt call),
/// and verify every file. Returns the cached paths in the lock's order.
pub fn ensure_all(
    pkgs: &[LockedPackage],
    cache: &Path,
    apt: impl FnOnce() -> anyhow::Result<Apt>,
    progress: &Progress,
) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(cache)
        .with_context(|| format!("creating cache {}", cache.display()))?;
    let mut missing = Vec::new();
    for pkg in pkgs {
        let path = cached_path(cache, pkg);
        if path.exists() {
            verify(pkg, &path)?;
        } else {
            missing.push(pkg);
        }
    }
    // The same file can be locked twice (one package in two roles, e.g. libc6 for the image
    // and for the build root): download and file it once.
    let missing = unique_files(missing);
    let mut downloaded = 0u64;
    if !missing.is_empty() {
        let total: u64 = missing.iter().map(|p| p.size).sum();
        progress.step(
            "fetch",
            format!(
                "updating the private apt indexes; {} inputs to download ({})",
                missing.len(),
                bytes(total)
            ),
        );
        let mut apt = apt()?;
        apt.update()?;
        let tmp = tempfile::Builder::new()
            .prefix(".download-")
            .tempdir_in(cache)
            .with_context(|| format!("creating a temporary directory in {}", cache.display()))?;
        let names: Vec<String> = missing
            .iter()
            .map(|p| format!("{} {}", p.name, p.version))
            .collect();
        progress.step("fetch", format!("apt-get download {}", names.join(", ")));
        let wanted: Vec<(String, String)> = missing
            .iter()
            .map(|p| (p.name.clone(), p.version.clone()))
            .collect();
        let files = apt.download(&wanted, tmp.path())?;
        let mut by_sha = std::collections::BTreeMap::new();
        for f in files {
            let (sha, size) = sha256_file(&f)?;
            by_sha.insert(sha, (f, size));
        }
        for pkg in &missing {
            let (file, size) = by_sha.remove(&pkg.sha256).ok_or_else(|| {
                anyhow::anyhow!(
                    "the mirror served no file matching the lock for input {} {} ({}; sha256 {}): the mirror \
                     differs from the one the lock was made from; use --mirror URL / WORKER_APT_MIRROR, or refresh \
                     the lock with `cargo xtask image lock`",
                    pkg.name,
                    pkg.version,
                    pkg.suite,
                    pkg.sha256
                )
            })?;
            if size != pkg.size {
                anyhow::bail!(
                    "input {} {}: size {size} differs from the lock's {}",
                    pkg.name,
                    pkg.version,
                    pkg.size
                );
            }
            let path = cached_path(cache, pkg);
            std::fs::rename(&file, &path)
                .with_context(|| format!("moving into {}", path.display()))?;
            downloaded += size;
        }
    }
    progress.step(
        "fetch",
        format!(
            "{} inputs verified ({} downloaded, cache {})",
            pkgs.len(),
            bytes(downloaded),
            cache.display()
        ),
    );
    Ok(pkgs.iter().map(|p| cached_path(cache, p)).collect())
}

/// `pkgs` without repeats of a file (same sha256), first occurrence kept, order kept.
fn unique_files(pkgs: Vec<&LockedPackage>) -> Vec<&LockedPackage> {
    let mut seen = std::collections::BTreeSet::new();
    pkgs.into_iter()
        .filter(|p| seen.insert(p.sha256.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::definition::Role;

    #[test]
    fn verify_names_the_input_and_the_fix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = b"not really a deb";
        let pkg = LockedPackage {
            name: "libc6".into(),
            version: "2.36".into(),
            arch: "amd64".into(),
            suite: "bookworm".into(),
            role: Role::Runtime,
            requested: "libc6".into(),
            sha256: sha256_bytes(data),
            size: data.len() as u64,
            filename: "pool/x.deb".into(),
        };
        let path = cached_path(dir.path(), &pkg);
        std::fs::write(&path, data).expect("write");
        verify(&pkg, &path).expect("intact file verifies");
        fn no_apt() -> anyhow::Result<Apt> {
            anyhow::bail!("no download expected")
        }
        let got = ensure_all(
            std::slice::from_ref(&pkg),
            dir.path(),
            no_apt,
            &Progress::new(true),
        )
        .expect("cached");
        assert_eq!(got, vec![path.clone()]);
        std::fs::write(&path, b"not really a dex").expect("tamper");
        let err = verify(&pkg, &path).expect_err("tampered").to_string();
        assert!(
            err.contains("input libc6 2.36") && err.contains("delete it"),
            "{err}"
        );
        let err = ensure_all(&[pkg], dir.path(), no_apt, &Progress::new(true))
            .expect_err("tampered")
            .to_string();
        assert!(err.contains("libc6"), "{err}");
    }

    /// A file locked in two roles is downloaded once (a cold cache used to fail on the second
    /// entry: "the mirror served no file matching the lock").
    #[test]
    fn a_file_locked_twice_is_fetched_once() {
        let pkg = |role: Role, sha: &str| LockedPackage {
            name: "libc6".into(),
            version: "2.36".into(),
            arch: "amd64".into(),
            suite: "bookworm".into(),
            role,
            requested: "libc6".into(),
            sha256: sha.into(),
            size: 1,
            filename: "pool/x.deb".into(),
        };
        let (a, b, c) = (
            pkg(Role::Runtime, "aa"),
            pkg(Role::Build, "aa"),
            pkg(Role::Build, "bb"),
        );
        let got = unique_files(vec![&a, &b, &c]);
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].role, got[1].sha256.as_str()), (Role::Runtime, "bb"));
    }

    #[test]
    fn explicit_cache_dir_wins() {
        assert_eq!(
            cache_dir(Some(Path::new("/x/y"))).expect("dir"),
            PathBuf::from("/x/y")
        );
    }
}
