//! End-to-end: the real image pipeline (`cargo xtask image build`).
//!
//! - `built_image_matches_its_manifest`: builds the image into a temporary directory (or reuses
//!   a prebuilt one from `WORKER_IMAGE_DIR`, to save CI time) and checks every file against the
//!   manifest's sha256 and size, the schema, the cmdline bytes and the size budget, and the
//!   ahead-of-time CUDA kernels in the initrd (index vouching for this commit's kernel source,
//!   CUBIN digests, every kernel defined, NVRTC itself absent).
//! - `tampered_cached_input_is_rejected`: copies the download cache into a temporary directory,
//!   flips a byte in one locked .deb and checks that a build with that cache fails naming the input.
//!
//! Run: `cargo test -p e2e-tests --test image -- --nocapture` (needs the Debian mirror or a warm
//! cache at `WORKER_CACHE_DIR` / `~/.cache/confidential-worker/debs`, and dpkg-deb).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use e2e_tests::{cargo, repo_root};
use sha2::{Digest, Sha256};

/// `cargo xtask <args>` from the repository root.
fn xtask(args: &[&str]) -> Output {
    Command::new(cargo())
        .current_dir(repo_root())
        .args(["run", "--quiet", "-p", "xtask", "--"])
        .args(args)
        .output()
        .expect("run cargo xtask")
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("WORKER_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache"));
    base.join("confidential-worker/debs")
}

fn check_image(dir: &Path) {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["schema_version"], 1);
    let files = manifest["files"].as_array().unwrap();
    let paths: Vec<&str> = files.iter().map(|f| f["path"].as_str().unwrap()).collect();
    assert_eq!(
        paths,
        ["OVMF.fd", "cmdline", "initrd", "vmlinuz"],
        "sorted by path"
    );
    let mut total = 0u64;
    for f in files {
        let path = f["path"].as_str().unwrap();
        let data = std::fs::read(dir.join(path)).unwrap();
        assert_eq!(
            sha256_hex(&data),
            f["sha256"].as_str().unwrap(),
            "{path}: sha256 matches the manifest"
        );
        assert_eq!(
            data.len() as u64,
            f["size"].as_u64().unwrap(),
            "{path}: size matches the manifest"
        );
        total += data.len() as u64;
    }
    assert!(
        total < 150_000_000,
        "boot parts {total} bytes must stay under 150 MB"
    );
    let cmdline = std::fs::read_to_string(dir.join("cmdline")).unwrap();
    assert!(!cmdline.ends_with('\n'), "cmdline has no trailing newline");
    assert_eq!(manifest["launch"]["cmdline"], cmdline.as_str());
    let initrd = std::fs::read(dir.join("initrd")).unwrap();
    assert_eq!(&initrd[..4], &[0x28, 0xb5, 0x2f, 0xfd], "initrd is zstd");
    let ovmf = std::fs::read(dir.join("OVMF.fd")).unwrap();
    assert_eq!(ovmf.len() % 4096, 0, "firmware volume size");
    // The agent extends RTMR3 through /sys/class/misc/tdx_guest/measurements/rtmr3:sha384,
    // which exists from Linux 6.16 on (TSM measurement registers).
    let release = manifest["kernel_release"].as_str().unwrap();
    let mut version = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (version.next().unwrap_or(0), version.next().unwrap_or(0));
    assert!(
        (major, minor) >= (6, 16),
        "kernel {release} predates the RTMR sysfs ABI (6.16)"
    );
    // The SBOM is the lock.
    let lock: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo_root().join("image/worker.lock")).unwrap())
            .unwrap();
    let inputs = manifest["inputs"].as_array().unwrap();
    assert_eq!(inputs.len(), lock["packages"].as_array().unwrap().len());
    for (i, p) in inputs.iter().zip(lock["packages"].as_array().unwrap()) {
        assert_eq!(i["sha256"], p["sha256"]);
        assert_eq!(i["name"], p["name"]);
        assert_eq!(i["role"], p["role"]);
    }
    // Hermetic: the agent was compiled in the locked build root with the pinned toolchain;
    // nothing of the build host's C toolchain is recorded (or used).
    let build = &manifest["build"];
    assert!(build.get("host_link_packages").is_none(), "{build}");
    let pinned = std::fs::read_to_string(repo_root().join("rust-toolchain.toml")).unwrap();
    let channel = build["rust_toolchain"].as_str().unwrap();
    assert!(
        pinned.contains(&format!("channel = \"{channel}\"")),
        "{channel} vs rust-toolchain.toml"
    );
    assert!(
        build["rustc"]
            .as_str()
            .unwrap()
            .starts_with(&format!("rustc {channel} ")),
        "{build}"
    );
    check_cuda_kernels(dir, inputs);
    let cc = build["build_root_cc"].as_str().unwrap();
    let gcc = inputs
        .iter()
        .find(|i| i["name"] == "gcc-12" && i["role"] == "build")
        .expect("the build root's compiler is an input");
    let gcc_version = gcc["version"].as_str().unwrap();
    assert!(
        cc.contains(gcc_version),
        "{cc} is the locked gcc {gcc_version}"
    );
}

/// The files of a newc archive (name, data); directories and device nodes are skipped.
fn newc_files(mut data: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let field = |h: &[u8], i: usize| {
        usize::from_str_radix(std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).unwrap(), 16).unwrap()
    };
    let pad = |n: usize| (4 - n % 4) % 4;
    loop {
        assert!(data.len() >= 110 && &data[..6] == b"070701", "newc header");
        let (mode, namesize, filesize) = (field(data, 1), field(data, 11), field(data, 6));
        let name = std::str::from_utf8(&data[110..110 + namesize - 1])
            .unwrap()
            .to_string();
        let start = 110 + namesize + pad(110 + namesize);
        if name == "TRAILER!!!" {
            return out;
        }
        if mode & 0o170000 == 0o100000 {
            out.push((name, data[start..start + filesize].to_vec()));
        }
        data = &data[start + filesize + pad(filesize)..];
    }
}

/// The CUDA kernels compiled ahead of time are in the initrd: `kernels.json` vouches for the
/// kernel source this commit carries and for each CUBIN's bytes; each CUBIN is a CUDA ELF that
/// defines every kernel the backend loads; NVRTC came from the lock (the SBOM).
fn check_cuda_kernels(dir: &Path, inputs: &[serde_json::Value]) {
    use inference::cuda::{kernels::all_kernel_names, prebuilt};
    let initrd = std::fs::read(dir.join("initrd")).unwrap();
    let cpio = zstd::decode_all(initrd.as_slice()).unwrap();
    let files = newc_files(&cpio);
    let get = |name: &str| {
        files
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.clone())
            .unwrap_or_else(|| panic!("{name} is not in the initrd"))
    };
    let index: prebuilt::KernelIndex =
        serde_json::from_slice(&get("usr/lib/worker/cuda/kernels.json")).unwrap();
    assert_eq!(
        index.source_sha256,
        prebuilt::source_sha256(),
        "kernels of this source"
    );
    assert_eq!(
        index.images.iter().map(|i| i.arch).collect::<Vec<_>>(),
        vec![90],
        "cuda.archs of worker.yaml"
    );
    let nvrtc = inputs
        .iter()
        .find(|i| i["name"] == "libnvrtc12" && i["role"] == "cuda-compiler")
        .expect("NVRTC is a locked input");
    let version = nvrtc["version"].as_str().unwrap();
    assert!(
        version.starts_with(&format!("{}.", index.nvrtc)),
        "index says NVRTC {} but the lock has {version}",
        index.nvrtc
    );
    for img in &index.images {
        let cubin = get(&format!("usr/lib/worker/cuda/{}", img.file));
        assert_eq!(sha256_hex(&cubin), img.sha256);
        assert_eq!(cubin.len() as u64, img.size);
        assert_eq!(&cubin[..4], b"\x7fELF");
        assert_eq!(u16::from_le_bytes([cubin[18], cubin[19]]), 190, "EM_CUDA");
        for name in all_kernel_names() {
            let needle = format!("\0{name}\0");
            assert!(
                cubin.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{}: no kernel {name}",
                img.file
            );
        }
    }
    // Nothing of the compiler itself is in the image.
    assert!(
        !files.iter().any(|(n, _)| n.contains("nvrtc")),
        "NVRTC must not be in the initrd"
    );
}

#[test]
fn built_image_matches_its_manifest() {
    if let Some(dir) = std::env::var_os("WORKER_IMAGE_DIR").filter(|d| !d.is_empty()) {
        eprintln!("checking the prebuilt image in {}", dir.to_string_lossy());
        check_image(Path::new(&dir));
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let image = out.path().join("worker");
    let o = xtask(&[
        "image",
        "build",
        "--quiet",
        "--json",
        "--out",
        image.to_str().unwrap(),
    ]);
    assert!(
        o.status.success(),
        "cargo xtask image build failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        report["modules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == "virtio_net")
    );
    check_image(&image);
}

#[test]
fn tampered_cached_input_is_rejected() {
    let lock: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo_root().join("image/worker.lock")).unwrap())
            .unwrap();
    let packages = lock["packages"].as_array().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let real = default_cache_dir();
    // Copy the cached inputs (the small ones suffice: verification fails before any download).
    let mut copied = 0;
    for p in packages {
        let name = format!("{}.deb", p["sha256"].as_str().unwrap());
        if real.join(&name).is_file() && p["size"].as_u64().unwrap() < 20_000_000 {
            std::fs::copy(real.join(&name), cache.path().join(&name)).unwrap();
            copied += 1;
        }
    }
    // The first input in lock order is verified first; tamper with it.
    let victim = &packages[0];
    let victim_name = victim["name"].as_str().unwrap();
    let victim_file = cache
        .path()
        .join(format!("{}.deb", victim["sha256"].as_str().unwrap()));
    if victim_file.is_file() {
        let mut data = std::fs::read(&victim_file).unwrap();
        let mid = data.len() / 2;
        data[mid] ^= 0x01;
        std::fs::write(&victim_file, data).unwrap();
    } else {
        eprintln!(
            "note: {victim_name} is not in {} (copied {copied}); using a same-size corrupt file",
            real.display()
        );
        std::fs::write(
            &victim_file,
            vec![0u8; victim["size"].as_u64().unwrap() as usize],
        )
        .unwrap();
    }
    let out = tempfile::tempdir().unwrap();
    let o = xtask(&[
        "image",
        "build",
        "--quiet",
        "--out",
        out.path().join("worker").to_str().unwrap(),
        "--cache-dir",
        cache.path().to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "a tampered input must fail the build:\n{stderr}"
    );
    assert!(
        stderr.contains(&format!("input {victim_name} ")),
        "the error names the input:\n{stderr}"
    );
    assert!(
        stderr.contains("delete it"),
        "the error says what to do:\n{stderr}"
    );
    assert!(
        !out.path().join("worker/manifest.json").exists(),
        "no output after a failed check"
    );
}
