//! `cargo xtask image package`: one deterministic archive of `out/<image>/`
//! (`<name>-<version>.tar.zst`: ustar, entries sorted, owner 0:0, mode 0644, mtime =
//! `source_date_epoch`, zstd level 19 single-threaded) plus `<archive>.sha256` in `sha256sum` format.
//! Everything in the archive sits under `<name>/` (the layout of `out/<name>/`).

use std::path::{Path, PathBuf};

use anyhow::Context as _;

use super::cache::sha256_bytes;

/// Build the archive bytes for the regular files of `image_dir` and of its subdirectories
/// (e.g. `acpi/` written by `cargo xtask image capture-acpi`, which RTMR0 is computed from).
pub fn archive_bytes(image_dir: &Path, top: &str, mtime: u64) -> anyhow::Result<Vec<u8>> {
    if !image_dir.join("manifest.json").is_file() {
        if !image_dir.is_dir() {
            anyhow::bail!(
                "reading {}: no such directory; build it first with `cargo xtask image build`",
                image_dir.display()
            );
        }
        anyhow::bail!(
            "{} has no manifest.json: build it with `cargo xtask image build`",
            image_dir.display()
        );
    }
    let mut entries = Vec::new();
    collect(image_dir, "", &mut entries)?;
    // Byte-wise order of the relative paths: independent of the file system's listing order.
    entries.sort();
    let mut builder = tar::Builder::new(Vec::new());
    builder.mode(tar::HeaderMode::Deterministic);
    let mut dir = tar::Header::new_ustar();
    dir.set_entry_type(tar::EntryType::Directory);
    set_common(&mut dir, 0o755, 0, mtime);
    builder.append_data(&mut dir, format!("{top}/"), std::io::empty())?;
    for (rel, is_dir) in &entries {
        if *is_dir {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Directory);
            set_common(&mut h, 0o755, 0, mtime);
            builder.append_data(&mut h, format!("{top}/{rel}/"), std::io::empty())?;
            continue;
        }
        let path = image_dir.join(rel);
        let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        set_common(&mut h, 0o644, data.len() as u64, mtime);
        builder.append_data(&mut h, format!("{top}/{rel}"), &data[..])?;
    }
    let tar = builder.into_inner()?;
    zstd::bulk::compress(&tar, 19).context("zstd compression of the archive")
}

/// Relative paths (`/`-separated) of the regular files and directories under `dir`; `*.tmp`
/// leftovers of interrupted writes and anything that is neither a file nor a directory
/// (links, sockets) are skipped.
fn collect(dir: &Path, prefix: &str, out: &mut Vec<(String, bool)>) -> anyhow::Result<()> {
    let listing = std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))?;
    for e in listing {
        let e = e.with_context(|| format!("reading {}", dir.display()))?;
        let name = e.file_name();
        let Some(name) = name.to_str() else {
            anyhow::bail!(
                "{}: file name {:?} is not UTF-8; remove it before packaging",
                dir.display(),
                e.file_name()
            );
        };
        let rel = if prefix.is_empty() {
            name.to_string()
        } else {
            format!("{prefix}/{name}")
        };
        let t = e.file_type()?;
        if t.is_dir() {
            out.push((rel.clone(), true));
            collect(&e.path(), &rel, out)?;
        } else if t.is_file() && !name.ends_with(".tmp") {
            out.push((rel, false));
        }
    }
    Ok(())
}

fn set_common(h: &mut tar::Header, mode: u32, size: u64, mtime: u64) {
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(mtime);
    h.set_uid(0);
    h.set_gid(0);
    let _ = h.set_username("root");
    let _ = h.set_groupname("root");
}

/// Write `<out>/<stem>.tar.zst` and its `.sha256`; returns (archive path, sha256).
pub fn package(
    image_dir: &Path,
    out: &Path,
    stem: &str,
    top: &str,
    mtime: u64,
) -> anyhow::Result<(PathBuf, String)> {
    let bytes = archive_bytes(image_dir, top, mtime)?;
    std::fs::create_dir_all(out)?;
    let file = format!("{stem}.tar.zst");
    let path = out.join(&file);
    std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
    let sha = sha256_bytes(&bytes);
    std::fs::write(
        out.join(format!("{file}.sha256")),
        format!("{sha}  {file}\n"),
    )?;
    Ok((path, sha))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn archive_is_deterministic_and_sorted() {
        let a = tempfile::tempdir().expect("tmp");
        let b = tempfile::tempdir().expect("tmp");
        for (d, order) in [
            (&a, ["manifest.json", "initrd"]),
            (&b, ["initrd", "manifest.json"]),
        ] {
            for n in order {
                std::fs::write(d.path().join(n), n.as_bytes()).expect("write");
            }
        }
        // Different file mtimes and permissions must not matter.
        std::fs::set_permissions(
            b.path().join("initrd"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .expect("chmod");
        let x = archive_bytes(a.path(), "worker-0.1.0", 1_700_000_000).expect("a");
        let y = archive_bytes(b.path(), "worker-0.1.0", 1_700_000_000).expect("b");
        assert_eq!(x, y);
        let tar = zstd::stream::decode_all(&x[..]).expect("zstd");
        let mut ar = tar::Archive::new(&tar[..]);
        let entries: Vec<(String, u64, u32, u64)> = ar
            .entries()
            .expect("entries")
            .map(|e| {
                let e = e.expect("entry");
                let h = e.header();
                (
                    e.path().expect("path").display().to_string(),
                    h.mtime().expect("mtime"),
                    h.mode().expect("mode"),
                    h.uid().expect("uid"),
                )
            })
            .collect();
        assert_eq!(
            entries,
            [
                ("worker-0.1.0/".to_string(), 1_700_000_000, 0o755, 0),
                ("worker-0.1.0/initrd".to_string(), 1_700_000_000, 0o644, 0),
                (
                    "worker-0.1.0/manifest.json".to_string(),
                    1_700_000_000,
                    0o644,
                    0
                ),
            ]
        );
        let out = tempfile::tempdir().expect("tmp");
        let (path, sha) = package(
            a.path(),
            out.path(),
            "worker-0.1.0",
            "worker-0.1.0",
            1_700_000_000,
        )
        .expect("package");
        let line = std::fs::read_to_string(out.path().join("worker-0.1.0.tar.zst.sha256"))
            .expect("sha file");
        assert_eq!(line, format!("{sha}  worker-0.1.0.tar.zst\n"));
        assert_eq!(sha, sha256_bytes(&std::fs::read(path).expect("read")));
    }

    #[test]
    fn subdirectories_such_as_acpi_are_packaged_in_order() {
        let a = tempfile::tempdir().expect("tmp");
        std::fs::write(a.path().join("manifest.json"), b"{}").expect("write");
        std::fs::create_dir(a.path().join("acpi")).expect("mkdir");
        for n in ["tables.bin", "capture.json", "rsdp.bin"] {
            std::fs::write(a.path().join("acpi").join(n), n.as_bytes()).expect("write");
        }
        std::fs::write(a.path().join("acpi").join("x.tmp"), b"partial").expect("write");
        let x = archive_bytes(a.path(), "w", 1).expect("archive");
        let tar = zstd::stream::decode_all(&x[..]).expect("zstd");
        let mut ar = tar::Archive::new(&tar[..]);
        let names: Vec<String> = ar
            .entries()
            .expect("entries")
            .map(|e| {
                e.expect("entry")
                    .path()
                    .expect("path")
                    .display()
                    .to_string()
            })
            .collect();
        assert_eq!(
            names,
            [
                "w/",
                "w/acpi/",
                "w/acpi/capture.json",
                "w/acpi/rsdp.bin",
                "w/acpi/tables.bin",
                "w/manifest.json"
            ]
        );
    }

    #[test]
    fn refuses_a_directory_without_manifest() {
        let a = tempfile::tempdir().expect("tmp");
        let err = archive_bytes(a.path(), "w", 0)
            .expect_err("no manifest")
            .to_string();
        assert!(err.contains("cargo xtask image build"), "{err}");
    }
}
