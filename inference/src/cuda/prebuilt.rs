//! Kernels compiled ahead of time: the image pipeline runs NVRTC from the image lock
//! (`cuda-aot`) over [`KERNEL_SOURCE`] for the architectures `worker.yaml` names and ships the
//! CUBINs with an index, so the guest needs neither NVRTC (60 MiB) nor the driver's PTX JIT and
//! starts without compiling.
//!
//! Layout of the directory (default [`DEFAULT_DIR`], or `$INFERENCE_CUDA_KERNELS`):
//!
//! ```text
//! kernels.json     {"schema":1,"source_sha256":"…","nvrtc":"12.4","options":[…],
//!                   "images":[{"arch":90,"file":"sm_90.cubin","sha256":"…","size":N}]}
//! sm_90.cubin      NVRTC's CUBIN for sm_90
//! ```
//!
//! A prebuilt image is used only when the index names the SHA-256 of exactly the source this
//! binary carries (a stale or foreign CUBIN would run other kernels than the ones the CPU
//! reference checks) and the file's SHA-256 matches the index. A CUBIN for `sm_XY` runs on
//! devices `X.Z` with `Z >= Y` (same major: SASS compatibility); the highest such one is chosen.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::kernels::KERNEL_SOURCE;

/// Where the image puts the prebuilt kernels.
pub const DEFAULT_DIR: &str = "/usr/lib/worker/cuda";
/// Environment variable that overrides [`DEFAULT_DIR`].
pub const ENV_DIR: &str = "INFERENCE_CUDA_KERNELS";
/// Name of the index inside the directory.
pub const INDEX_FILE: &str = "kernels.json";
/// Current index schema.
pub const SCHEMA: u32 = 1;

/// `kernels.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelIndex {
    pub schema: u32,
    /// SHA-256 (hex) of the CUDA C source the images were compiled from.
    pub source_sha256: String,
    /// NVRTC version that compiled them (`major.minor`).
    pub nvrtc: String,
    /// NVRTC options other than `--gpu-architecture`.
    pub options: Vec<String>,
    /// One entry per architecture, sorted by `arch`.
    pub images: Vec<IndexedImage>,
}

/// One CUBIN of the index.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IndexedImage {
    /// `major*10 + minor` (90 = sm_90).
    pub arch: i32,
    /// File name inside the directory.
    pub file: String,
    pub sha256: String,
    pub size: u64,
}

/// A prebuilt CUBIN chosen for a device.
#[derive(Debug, Clone)]
pub struct Prebuilt {
    pub arch: i32,
    pub path: PathBuf,
    pub bytes: Vec<u8>,
    /// NVRTC version that made it.
    pub nvrtc: String,
}

/// SHA-256 (hex) of [`KERNEL_SOURCE`].
pub fn source_sha256() -> String {
    hex::encode(Sha256::digest(KERNEL_SOURCE.as_bytes()))
}

/// The directory to look in: `$INFERENCE_CUDA_KERNELS` if set, else [`DEFAULT_DIR`].
pub fn kernels_dir() -> PathBuf {
    match std::env::var_os(ENV_DIR) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(DEFAULT_DIR),
    }
}

/// File name of the CUBIN for `arch`.
pub fn cubin_name(arch: i32) -> String {
    format!("sm_{arch}.cubin")
}

/// Picks the image for a device of compute capability `cc` from the index: same major, highest
/// minor not above the device's.
pub fn choose(index: &KernelIndex, cc: (i32, i32)) -> Option<&IndexedImage> {
    index
        .images
        .iter()
        .filter(|i| i.arch / 10 == cc.0 && i.arch % 10 <= cc.1)
        .max_by_key(|i| i.arch)
}

/// Looks for a usable prebuilt CUBIN in `dir` for a device of compute capability `cc`.
///
/// `Ok(None)` with the reason when there is none to use (no directory, no image for this
/// architecture, or images of another kernel source: the caller may compile with NVRTC);
/// `Err` when what is there is damaged (malformed index, a file whose SHA-256 differs from the
/// index): never load a CUBIN the index does not vouch for.
pub fn find(dir: &Path, cc: (i32, i32)) -> Result<Result<Prebuilt, String>, String> {
    let index_path = dir.join(INDEX_FILE);
    let text = match std::fs::read_to_string(&index_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Err(format!(
                "no prebuilt kernels ({} does not exist)",
                index_path.display()
            )));
        }
        Err(e) => return Err(format!("reading {}: {e}", index_path.display())),
    };
    let index: KernelIndex = serde_json::from_str(&text)
        .map_err(|e| format!("{} is not a kernel index: {e}", index_path.display()))?;
    if index.schema != SCHEMA {
        return Err(format!(
            "{} has schema {}, this binary reads schema {SCHEMA}",
            index_path.display(),
            index.schema
        ));
    }
    let ours = source_sha256();
    if index.source_sha256 != ours {
        return Ok(Err(format!(
            "the prebuilt kernels in {} were compiled from kernel source {} but this binary carries {}: \
             rebuild the image (cargo xtask image build) so agent and kernels come from the same commit",
            dir.display(),
            short(&index.source_sha256),
            short(&ours)
        )));
    }
    let Some(img) = choose(&index, cc) else {
        return Ok(Err(format!(
            "the prebuilt kernels in {} are for {} but the GPU is sm_{}{}: add {}{} to cuda.archs in image/worker.yaml",
            dir.display(),
            index
                .images
                .iter()
                .map(|i| format!("sm_{}", i.arch))
                .collect::<Vec<_>>()
                .join(", "),
            cc.0,
            cc.1,
            cc.0,
            cc.1
        )));
    };
    if img.file.contains('/') || img.file.starts_with('.') {
        return Err(format!(
            "{} names the file {:?}, which is not a plain file name",
            index_path.display(),
            img.file
        ));
    }
    let path = dir.join(&img.file);
    let bytes = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let got = hex::encode(Sha256::digest(&bytes));
    if got != img.sha256 || bytes.len() as u64 != img.size {
        return Err(format!(
            "{} has SHA-256 {} ({} bytes) but {} says {} ({} bytes): the kernel directory is damaged",
            path.display(),
            short(&got),
            bytes.len(),
            index_path.display(),
            short(&img.sha256),
            img.size
        ));
    }
    Ok(Ok(Prebuilt {
        arch: img.arch,
        path,
        bytes,
        nvrtc: index.nvrtc.clone(),
    }))
}

fn short(h: &str) -> &str {
    h.get(..16).unwrap_or(h)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn write_dir(dir: &Path, source: &str, images: &[(i32, &[u8])]) -> KernelIndex {
        let mut index = KernelIndex {
            schema: SCHEMA,
            source_sha256: source.to_string(),
            nvrtc: "12.4".into(),
            options: vec!["--std=c++17".into()],
            images: Vec::new(),
        };
        for (arch, bytes) in images {
            let file = cubin_name(*arch);
            std::fs::write(dir.join(&file), bytes).unwrap();
            index.images.push(IndexedImage {
                arch: *arch,
                file,
                sha256: hex::encode(Sha256::digest(bytes)),
                size: bytes.len() as u64,
            });
        }
        std::fs::write(
            dir.join(INDEX_FILE),
            serde_json::to_vec_pretty(&index).unwrap(),
        )
        .unwrap();
        index
    }

    #[test]
    fn picks_the_same_major_highest_minor_not_above_the_device() {
        let d = tempfile::tempdir().unwrap();
        write_dir(
            d.path(),
            &source_sha256(),
            &[(80, b"a80"), (86, b"a86"), (90, b"a90")],
        );
        let p = find(d.path(), (9, 0)).unwrap().unwrap();
        assert_eq!((p.arch, p.bytes.as_slice()), (90, &b"a90"[..]));
        let p = find(d.path(), (8, 9)).unwrap().unwrap();
        assert_eq!(p.arch, 86);
        let p = find(d.path(), (8, 0)).unwrap().unwrap();
        assert_eq!(p.arch, 80);
        // sm_100 is another major: no SASS compatibility.
        let why = find(d.path(), (10, 0)).unwrap().unwrap_err();
        assert!(
            why.contains("sm_100") && why.contains("cuda.archs"),
            "{why}"
        );
    }

    #[test]
    fn no_directory_is_not_an_error() {
        let d = tempfile::tempdir().unwrap();
        let why = find(&d.path().join("absent"), (9, 0)).unwrap().unwrap_err();
        assert!(why.contains("does not exist"), "{why}");
    }

    #[test]
    fn kernels_of_another_source_are_not_used() {
        let d = tempfile::tempdir().unwrap();
        write_dir(d.path(), &"0".repeat(64), &[(90, b"old")]);
        let why = find(d.path(), (9, 0)).unwrap().unwrap_err();
        assert!(why.contains("rebuild the image"), "{why}");
    }

    #[test]
    fn a_damaged_file_or_index_is_refused() {
        let d = tempfile::tempdir().unwrap();
        write_dir(d.path(), &source_sha256(), &[(90, b"good")]);
        std::fs::write(d.path().join("sm_90.cubin"), b"evil").unwrap();
        let e = find(d.path(), (9, 0)).unwrap_err();
        assert!(e.contains("damaged"), "{e}");

        std::fs::write(d.path().join(INDEX_FILE), b"{not json").unwrap();
        let e = find(d.path(), (9, 0)).unwrap_err();
        assert!(e.contains("not a kernel index"), "{e}");

        let mut idx = write_dir(d.path(), &source_sha256(), &[(90, b"good")]);
        idx.images[0].file = "../../etc/passwd".into();
        std::fs::write(d.path().join(INDEX_FILE), serde_json::to_vec(&idx).unwrap()).unwrap();
        let e = find(d.path(), (9, 0)).unwrap_err();
        assert!(e.contains("not a plain file name"), "{e}");

        idx.schema = 2;
        std::fs::write(d.path().join(INDEX_FILE), serde_json::to_vec(&idx).unwrap()).unwrap();
        assert!(find(d.path(), (9, 0)).unwrap_err().contains("schema 2"));
    }

    #[test]
    fn the_source_digest_is_of_the_kernel_source() {
        assert_eq!(
            source_sha256(),
            hex::encode(Sha256::digest(KERNEL_SOURCE.as_bytes()))
        );
        assert_eq!(source_sha256().len(), 64);
    }
}
