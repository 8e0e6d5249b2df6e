//! Finding and checking the image to boot.
//!
//! `--image` is either an image directory (`out/worker/`, as `cargo xtask image build` writes it)
//! or a bundle (`worker-<version>.tar.zst`, as `cargo xtask image package` writes it) with its
//! `<bundle>.sha256` beside it. A bundle is checked against that file before anything is read
//! from it, then unpacked into a content-addressed cache directory. Either way every file listed
//! in `manifest.json` is checked (size and SHA-256) before QEMU sees it.

use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Component, Path, PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::Deserialize;
use sha2::{Digest, Sha256};

/// `manifest.json` (schema 1). Unknown fields are ignored, as the schema requires of readers.
#[derive(Debug, Clone, Deserialize)]
pub struct Manifest {
    pub schema_version: u32,
    pub image: worker_api::ImageRelease,
    pub files: Vec<ManifestFile>,
    pub launch: Launch,
    /// `uname -r` of the image kernel (shown in the summary).
    #[serde(default)]
    pub kernel_release: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ManifestFile {
    pub path: String,
    pub role: String,
    pub sha256: String,
    pub size: u64,
}

/// Launch defaults from `image/worker.yaml`.
#[derive(Debug, Clone, Deserialize)]
pub struct Launch {
    pub memory_mib: u64,
    pub cpus: u32,
    #[serde(default)]
    pub cmdline: Option<String>,
    /// Declared TDX launch shapes and QEMU releases (images built before shapes have none).
    #[serde(default)]
    pub tdx: Option<worker_api::shapes::TdxLaunch>,
}

/// A checked image: its directory, manifest and the four boot parts.
#[derive(Debug, Clone)]
pub struct Image {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub firmware: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The exact kernel command line (contents of the `cmdline` file).
    pub cmdline: String,
}

/// Lowercase hex SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Resolves `--image`: a directory is checked in place; a `.tar.zst` bundle is verified against
/// its `.sha256`, unpacked into `cache_dir`, then checked.
pub fn resolve(image: &Path, cache_dir: &Path) -> Result<Image> {
    let meta = fs::metadata(image).with_context(|| {
        format!(
            "image {} not found: pass an image directory (build one with `cargo xtask image \
             build`) or a bundle .tar.zst (from `cargo xtask image package`)",
            image.display()
        )
    })?;
    let dir = if meta.is_dir() {
        image.to_path_buf()
    } else {
        let digest = verify_bundle_checksum(image)?;
        unpack_bundle(image, &digest, cache_dir)?
    };
    load_and_verify(&dir)
}

/// Checks a bundle against `<bundle>.sha256` (sha256sum format) and returns its digest.
pub fn verify_bundle_checksum(bundle: &Path) -> Result<String> {
    let mut sum_name = bundle.as_os_str().to_owned();
    sum_name.push(".sha256");
    let sum_path = PathBuf::from(sum_name);
    let text = fs::read_to_string(&sum_path).with_context(|| {
        format!(
            "the checksum file {} is missing: download it together with the bundle (it is \
             published beside it) and put it in the same directory; a bundle is never booted \
             unchecked",
            sum_path.display()
        )
    })?;
    let expected = text
        .split_whitespace()
        .next()
        .map(str::to_ascii_lowercase)
        .filter(|h| h.len() == 64 && h.bytes().all(|c| c.is_ascii_hexdigit()))
        .ok_or_else(|| {
            anyhow!(
                "{} is not in sha256sum format (`<64 hex digits>  <file name>`): download it again",
                sum_path.display()
            )
        })?;
    let actual =
        sha256_file(bundle).with_context(|| format!("cannot read bundle {}", bundle.display()))?;
    if actual != expected {
        bail!(
            "bundle {} does not match {}: sha256 is {actual}, expected {expected}. The download \
             is corrupt or was tampered with: delete it and download the bundle and its .sha256 \
             again",
            bundle.display(),
            sum_path.display()
        );
    }
    Ok(actual)
}

/// Unpacks a verified bundle into `<cache_dir>/images/<sha256>/` (reused when complete) and
/// returns the directory holding `manifest.json`.
pub fn unpack_bundle(bundle: &Path, digest: &str, cache_dir: &Path) -> Result<PathBuf> {
    let images = cache_dir.join("images");
    let dest = images.join(digest);
    let done = dest.join(".unpacked");
    if !done.exists() {
        fs::create_dir_all(&images).with_context(|| {
            format!(
                "cannot create the cache directory {}: choose another with --cache-dir",
                images.display()
            )
        })?;
        let tmp = images.join(format!("{digest}.partial-{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).with_context(|| format!("cannot clear {}", tmp.display()))?;
        }
        fs::create_dir_all(&tmp)?;
        let f = fs::File::open(bundle)
            .with_context(|| format!("cannot open bundle {}", bundle.display()))?;
        extract_tar(ZstdFrames::new(BufReader::new(f)), &tmp)
            .with_context(|| format!("cannot unpack bundle {}", bundle.display()))?;
        fs::write(tmp.join(".unpacked"), digest.as_bytes())?;
        if dest.exists() {
            fs::remove_dir_all(&dest)
                .with_context(|| format!("cannot replace stale {}", dest.display()))?;
        }
        fs::rename(&tmp, &dest)
            .with_context(|| format!("cannot move unpacked bundle to {}", dest.display()))?;
    }
    manifest_root(&dest)
}

/// The directory of `manifest.json`: the unpack root itself, or its single top-level directory.
fn manifest_root(dest: &Path) -> Result<PathBuf> {
    if dest.join("manifest.json").is_file() {
        return Ok(dest.to_path_buf());
    }
    let dirs: Vec<PathBuf> = fs::read_dir(dest)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    match dirs.as_slice() {
        [one] if one.join("manifest.json").is_file() => Ok(one.clone()),
        _ => bail!(
            "the bundle has no manifest.json at its top level: it is not an image bundle made \
             by `cargo xtask image package`"
        ),
    }
}

/// Extracts plain files and directories only, refusing absolute paths, `..`, links and devices.
fn extract_tar(reader: impl Read, dest: &Path) -> Result<()> {
    let mut ar = tar::Archive::new(reader);
    for entry in ar.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let safe = path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
        if !safe {
            bail!(
                "bundle entry `{}` escapes the unpack directory: refusing this bundle",
                path.display()
            );
        }
        let out = dest.join(&path);
        match entry.header().entry_type() {
            tar::EntryType::Directory => fs::create_dir_all(&out)?,
            tar::EntryType::Regular => {
                if let Some(p) = out.parent() {
                    fs::create_dir_all(p)?;
                }
                let mut f = fs::File::create(&out)?;
                io::copy(&mut entry, &mut f)?;
            }
            // pax/GNU metadata records carry no file of their own.
            tar::EntryType::XHeader
            | tar::EntryType::XGlobalHeader
            | tar::EntryType::GNULongName => {}
            other => bail!(
                "bundle entry `{}` is a {other:?}, not a plain file: refusing this bundle",
                path.display()
            ),
        }
    }
    Ok(())
}

/// A reader over a zstd stream of one or more concatenated frames.
struct ZstdFrames<R: BufRead> {
    current: Option<ruzstd::decoding::StreamingDecoder<R, ruzstd::decoding::FrameDecoder>>,
    source: Option<R>,
}

impl<R: BufRead> ZstdFrames<R> {
    fn new(source: R) -> Self {
        ZstdFrames {
            current: None,
            source: Some(source),
        }
    }
}

impl<R: BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if let Some(dec) = self.current.as_mut() {
                let n = dec.read(buf)?;
                if n > 0 || buf.is_empty() {
                    return Ok(n);
                }
                self.source = self.current.take().map(|d| d.into_inner());
            }
            let Some(mut src) = self.source.take() else {
                return Ok(0);
            };
            if src.fill_buf()?.is_empty() {
                return Ok(0);
            }
            let dec = ruzstd::decoding::StreamingDecoder::new(src).map_err(|e| {
                io::Error::new(io::ErrorKind::InvalidData, format!("not zstd data: {e}"))
            })?;
            self.current = Some(dec);
        }
    }
}

/// Reads `manifest.json` in `dir`, checks every listed file, and locates the boot parts.
pub fn load_and_verify(dir: &Path) -> Result<Image> {
    let mpath = dir.join("manifest.json");
    let text = fs::read_to_string(&mpath).with_context(|| {
        format!(
            "{} not found: {} is not an image directory (build one with `cargo xtask image build`)",
            mpath.display(),
            dir.display()
        )
    })?;
    let manifest: Manifest = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a valid image manifest: rebuild the image",
            mpath.display()
        )
    })?;
    if manifest.schema_version != 1 {
        bail!(
            "{} has schema_version {}, this host-launcher reads 1: use a matching host-launcher",
            mpath.display(),
            manifest.schema_version
        );
    }
    verify_files(dir, &manifest)?;
    let by_role = |role: &str| -> Result<PathBuf> {
        let mut it = manifest.files.iter().filter(|f| f.role == role);
        match (it.next(), it.next()) {
            (Some(f), None) => Ok(dir.join(&f.path)),
            (None, _) => bail!("manifest.json lists no `{role}` file: rebuild the image"),
            (Some(_), Some(_)) => {
                bail!("manifest.json lists several `{role}` files: rebuild the image")
            }
        }
    };
    let firmware = by_role("firmware")?;
    let kernel = by_role("kernel")?;
    let initrd = by_role("initrd")?;
    let cmdline_path = by_role("cmdline")?;
    let cmdline = String::from_utf8(fs::read(&cmdline_path)?).map_err(|_| {
        anyhow!(
            "{} is not UTF-8 text: rebuild the image",
            cmdline_path.display()
        )
    })?;
    if let Some(expected) = &manifest.launch.cmdline
        && expected.trim() != cmdline.trim()
    {
        bail!(
            "manifest.json launch.cmdline differs from the `cmdline` file ({expected:?} vs \
             {cmdline:?}): the image is inconsistent; rebuild it"
        );
    }
    Ok(Image {
        dir: dir.to_path_buf(),
        manifest,
        firmware,
        kernel,
        initrd,
        cmdline,
    })
}

/// Checks each manifest entry's path, size and SHA-256; the first difference is an error that
/// names the file.
pub fn verify_files(dir: &Path, manifest: &Manifest) -> Result<()> {
    for f in &manifest.files {
        let rel = Path::new(&f.path);
        if f.path.is_empty() || !rel.components().all(|c| matches!(c, Component::Normal(_))) {
            bail!(
                "manifest.json lists the path `{}`, which leaves the image directory: refusing \
                 this image",
                f.path
            );
        }
        let p = dir.join(rel);
        let meta = fs::metadata(&p).with_context(|| {
            format!(
                "image file `{}` listed in manifest.json is missing from {}: rebuild or \
                 re-download the image",
                f.path,
                dir.display()
            )
        })?;
        let tampered = |what: String| {
            anyhow!(
                "image file `{}` does not match manifest.json ({what}): the image was modified \
                 or corrupted; rebuild it with `cargo xtask image build` or re-download the \
                 bundle",
                f.path
            )
        };
        if meta.len() != f.size {
            return Err(tampered(format!(
                "size {} bytes, expected {}",
                meta.len(),
                f.size
            )));
        }
        let actual = sha256_file(&p).with_context(|| format!("cannot read {}", p.display()))?;
        if actual != f.sha256.to_ascii_lowercase() {
            return Err(tampered(format!("sha256 {actual}, expected {}", f.sha256)));
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;

    /// Writes a small, valid image directory (fake boot parts) and returns its manifest text.
    pub(crate) fn write_fake_image(dir: &Path) {
        let parts: [(&str, &str, &[u8]); 4] = [
            ("OVMF.fd", "firmware", b"firmware bytes"),
            ("cmdline", "cmdline", b"console=ttyS0 panic=-1"),
            ("initrd", "initrd", b"initrd bytes"),
            ("vmlinuz", "kernel", b"kernel bytes"),
        ];
        let mut files = Vec::new();
        for (name, role, data) in parts {
            fs::write(dir.join(name), data).unwrap();
            files.push(serde_json::json!({
                "path": name, "role": role,
                "sha256": hex::encode(Sha256::digest(data)), "size": data.len(),
            }));
        }
        let m = serde_json::json!({
            "schema_version": 1,
            "image": {"name": "worker", "version": "0.1.0"},
            "files": files,
            "launch": {
                "memory_mib": 2048, "cpus": 1, "cmdline": "console=ttyS0 panic=-1",
                "tdx": {
                    "qemu_versions": ["10.1"],
                    "machine": "pc-q35-10.1",
                    "shapes": [
                        {"name": "cpu-1c-2g", "memory_mib": 2048, "cpus": 1},
                        {"name": "h100x1", "memory_mib": 131072, "cpus": 16, "gpus": 1,
                         "pci_hole64_gib": 1024}
                    ]
                }
            },
            "kernel_release": "6.12.95+deb12-amd64",
            "future_field": {"ignored": true}
        });
        fs::write(dir.join("manifest.json"), m.to_string()).unwrap();
    }

    fn make_bundle(src: &Path, out: &Path, prefix: &str) {
        let mut b = tar::Builder::new(Vec::new());
        let mut names: Vec<_> = fs::read_dir(src)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        for n in names {
            b.append_path_with_name(src.join(&n), Path::new(prefix).join(&n))
                .unwrap();
        }
        let tar_bytes = b.into_inner().unwrap();
        let z = ruzstd::encoding::compress_to_vec(
            &tar_bytes[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        fs::write(out, z).unwrap();
        let sum = sha256_file(out).unwrap();
        let name = out.file_name().unwrap().to_string_lossy();
        fs::write(
            format!("{}.sha256", out.display()),
            format!("{sum}  {name}\n"),
        )
        .unwrap();
    }

    #[test]
    fn image_directory_is_verified_and_parts_located() {
        let d = tempfile::tempdir().unwrap();
        write_fake_image(d.path());
        let img = load_and_verify(d.path()).unwrap();
        assert_eq!(img.cmdline, "console=ttyS0 panic=-1");
        assert_eq!(img.firmware, d.path().join("OVMF.fd"));
        assert_eq!(img.kernel, d.path().join("vmlinuz"));
        assert_eq!(img.initrd, d.path().join("initrd"));
        assert_eq!(img.manifest.launch.memory_mib, 2048);
        assert_eq!(img.manifest.image.version, "0.1.0");
    }

    #[test]
    fn tampered_file_is_rejected_by_name() {
        let d = tempfile::tempdir().unwrap();
        write_fake_image(d.path());
        // Same size, different content.
        fs::write(d.path().join("initrd"), b"initrd bytez").unwrap();
        let e = format!("{:#}", load_and_verify(d.path()).unwrap_err());
        assert!(
            e.contains("image file `initrd` does not match manifest.json (sha256"),
            "{e}"
        );
        fs::write(d.path().join("initrd"), b"longer initrd bytes").unwrap();
        let e = format!("{:#}", load_and_verify(d.path()).unwrap_err());
        assert!(
            e.contains("`initrd`") && e.contains("size 19 bytes, expected 12"),
            "{e}"
        );
        fs::remove_file(d.path().join("vmlinuz")).unwrap();
        write_fake_image(d.path());
        fs::remove_file(d.path().join("vmlinuz")).unwrap();
        let e = format!("{:#}", load_and_verify(d.path()).unwrap_err());
        assert!(
            e.contains("image file `vmlinuz` listed in manifest.json is missing"),
            "{e}"
        );
    }

    #[test]
    fn manifest_paths_cannot_escape() {
        let d = tempfile::tempdir().unwrap();
        write_fake_image(d.path());
        let mut m: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(d.path().join("manifest.json")).unwrap())
                .unwrap();
        m["files"][0]["path"] = "../OVMF.fd".into();
        fs::write(d.path().join("manifest.json"), m.to_string()).unwrap();
        let e = format!("{:#}", load_and_verify(d.path()).unwrap_err());
        assert!(e.contains("leaves the image directory"), "{e}");
        write_fake_image(d.path());
        let mut m: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(d.path().join("manifest.json")).unwrap())
                .unwrap();
        m["launch"]["cmdline"] = "console=ttyS0 init=/bin/sh".into();
        fs::write(d.path().join("manifest.json"), m.to_string()).unwrap();
        let e = format!("{:#}", load_and_verify(d.path()).unwrap_err());
        assert!(e.contains("launch.cmdline differs"), "{e}");
    }

    #[test]
    fn bundle_is_checked_unpacked_and_cached() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::create_dir(&src).unwrap();
        write_fake_image(&src);
        let cache = d.path().join("cache");
        for prefix in ["", "worker-0.1.0"] {
            let bundle = d.path().join(format!("b{}.tar.zst", prefix.len()));
            make_bundle(&src, &bundle, prefix);
            let img = resolve(&bundle, &cache).unwrap();
            assert!(img.dir.starts_with(cache.join("images")));
            assert_eq!(img.cmdline, "console=ttyS0 panic=-1");
            // Second use comes from the cache and is verified again.
            let again = resolve(&bundle, &cache).unwrap();
            assert_eq!(again.dir, img.dir);
            fs::write(img.dir.join("vmlinuz"), b"kernel bytez").unwrap();
            let e = format!("{:#}", resolve(&bundle, &cache).unwrap_err());
            assert!(e.contains("`vmlinuz` does not match"), "{e}");
        }
    }

    #[test]
    fn bundle_checksum_mismatch_or_absence_is_rejected() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::create_dir(&src).unwrap();
        write_fake_image(&src);
        let bundle = d.path().join("w.tar.zst");
        make_bundle(&src, &bundle, "");
        let sum = d.path().join("w.tar.zst.sha256");
        fs::write(&sum, format!("{}  w.tar.zst\n", "0".repeat(64))).unwrap();
        let e = format!("{:#}", verify_bundle_checksum(&bundle).unwrap_err());
        assert!(
            e.contains("does not match") && e.contains("download"),
            "{e}"
        );
        fs::write(&sum, "garbage\n").unwrap();
        let e = format!("{:#}", verify_bundle_checksum(&bundle).unwrap_err());
        assert!(e.contains("sha256sum format"), "{e}");
        fs::remove_file(&sum).unwrap();
        let e = format!("{:#}", resolve(&bundle, &d.path().join("c")).unwrap_err());
        assert!(
            e.contains("checksum file") && e.contains("is missing"),
            "{e}"
        );
        assert!(
            !d.path().join("c").exists(),
            "nothing unpacked from an unchecked bundle"
        );
    }

    #[test]
    fn bundle_with_escaping_entry_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let data = b"x";
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        // Bypass the builder's own path check by writing the name bytes directly.
        h.as_old_mut().name[..9].copy_from_slice(b"../escape");
        h.set_cksum();
        b.append(&h, &data[..]).unwrap();
        let z = ruzstd::encoding::compress_to_vec(
            &b.into_inner().unwrap()[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        let out = d.path().join("u");
        fs::create_dir(&out).unwrap();
        let e = extract_tar(ZstdFrames::new(&z[..]), &out).unwrap_err();
        assert!(e.to_string().contains("escapes"), "{e}");
        assert!(!d.path().join("escape").exists());
    }

    #[test]
    fn concatenated_zstd_frames_are_read() {
        let mut z = ruzstd::encoding::compress_to_vec(
            &b"hello "[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        );
        z.extend(ruzstd::encoding::compress_to_vec(
            &b"world"[..],
            ruzstd::encoding::CompressionLevel::Fastest,
        ));
        let mut s = String::new();
        ZstdFrames::new(&z[..]).read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello world");
    }
}
