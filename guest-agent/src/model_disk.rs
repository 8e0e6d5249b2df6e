//! The read-only model disk: finding it, and reading the model into private memory with its hash.
//!
//! The host attaches the model file as a raw, read-only virtio-blk disk whose virtio serial is
//! [`worker_api::MODEL_DISK_SERIAL`], and names its size (`model_size`) and SHA-256
//! (`model_sha256`) in the measured host config. The agent finds the disk by that serial
//! (`/sys/block/vd*/serial`), reads exactly `model_size` bytes into guest-private memory (a
//! `Vec`; in a TD the host cannot see or change it afterwards), hashes them while reading, and
//! hands the bytes to the inference engine only when the hash matches. The disk itself is
//! host-controlled and unencrypted: only the copy in private memory, checked against the
//! measured hash, is trusted. Models larger than RAM need a dm-verity disk instead (see
//! ARCHITECTURE.md, "Model delivery").

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// `/sys/block`: where block devices and their virtio serials appear.
pub const SYS_BLOCK: &str = "/sys/block";

/// How long to wait for the model disk to appear after the virtio_blk module was loaded.
pub const DISK_WAIT: Duration = Duration::from_secs(10);

/// Read chunk size (a multiple of the 512-byte sector).
const CHUNK: usize = 4 << 20;

/// Why the model could not be taken from the disk. Every message says what to check next.
#[derive(Debug, thiserror::Error)]
pub enum ModelDiskError {
    #[error(
        "no model disk: no block device under {sys_block} has virtio serial `{serial}` \
         (the host must attach the model with `host-launcher run --model FILE`; is virtio_blk \
         in the image's modules?)"
    )]
    NotFound { sys_block: String, serial: String },
    #[error("cannot read {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "model disk {device} holds {disk_bytes} bytes but the host config says the model has \
         {model_size}: the disk is not the configured model (check --model)"
    )]
    DiskTooSmall {
        device: String,
        disk_bytes: u64,
        model_size: u64,
    },
    #[error(
        "model disk ended after {read} of {expected} bytes: the disk is shorter than the \
         configured model_size"
    )]
    ShortRead { read: u64, expected: u64 },
    #[error(
        "cannot allocate {bytes} bytes of guest memory for the model: give the guest more \
         memory (--memory) or use a smaller model"
    )]
    OutOfMemory { bytes: u64 },
    #[error(
        "model sha256 mismatch: the disk holds {actual}, the measured host config expects \
         {expected}; refusing to serve it (check --model-sha256 or the model file)"
    )]
    HashMismatch { expected: String, actual: String },
    #[error("model_sha256 `{0}` is not 64 hex digits")]
    BadExpectedHash(String),
}

/// Finds the block device whose virtio serial is `serial` below `sys_block`
/// (`<sys_block>/<name>/serial`); returns its name (e.g. `vdb`). Names are scanned in sorted
/// order; only `vd*` devices (virtio-blk) are considered.
pub fn find_disk_by_serial(
    sys_block: &Path,
    serial: &str,
) -> Result<Option<String>, std::io::Error> {
    let mut names: Vec<String> = std::fs::read_dir(sys_block)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("vd"))
        .collect();
    names.sort();
    for name in names {
        let Ok(raw) = std::fs::read(sys_block.join(&name).join("serial")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&raw);
        if text.trim_end_matches(['\n', '\0', ' ']) == serial {
            return Ok(Some(name));
        }
    }
    Ok(None)
}

/// Size in bytes of block device `name` (`<sys_block>/<name>/size` counts 512-byte sectors).
pub fn disk_size_bytes(sys_block: &Path, name: &str) -> Result<u64, ModelDiskError> {
    let p = sys_block.join(name).join("size");
    let text = std::fs::read_to_string(&p).map_err(|source| ModelDiskError::Io {
        what: p.display().to_string(),
        source,
    })?;
    let sectors: u64 = text.trim().parse().map_err(|_| ModelDiskError::Io {
        what: p.display().to_string(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not a sector count"),
    })?;
    Ok(sectors.saturating_mul(512))
}

/// Waits up to `timeout` for the disk with `serial` to appear; returns its name.
pub fn wait_for_disk(
    sys_block: &Path,
    serial: &str,
    timeout: Duration,
) -> Result<String, ModelDiskError> {
    let start = Instant::now();
    loop {
        if let Ok(Some(name)) = find_disk_by_serial(sys_block, serial) {
            return Ok(name);
        }
        if start.elapsed() >= timeout {
            return Err(ModelDiskError::NotFound {
                sys_block: sys_block.display().to_string(),
                serial: serial.into(),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Reads exactly `size` bytes from `reader` into a new buffer, hashing them, and checks the
/// SHA-256 against `expected_hex`. `progress(done, total)` is called after every chunk.
/// Bytes after `size` (the disk's padding to a whole sector) are not read.
pub fn read_verified(
    reader: &mut impl Read,
    size: u64,
    expected_hex: &str,
    mut progress: impl FnMut(u64, u64),
) -> Result<Vec<u8>, ModelDiskError> {
    let expected = expected_hex.to_ascii_lowercase();
    if expected.len() != 64 || !expected.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(ModelDiskError::BadExpectedHash(expected_hex.into()));
    }
    let len = usize::try_from(size).map_err(|_| ModelDiskError::OutOfMemory { bytes: size })?;
    let mut buf: Vec<u8> = Vec::new();
    buf.try_reserve_exact(len)
        .map_err(|_| ModelDiskError::OutOfMemory { bytes: size })?;
    buf.resize(len, 0);
    let mut hasher = Sha256::new();
    let mut done = 0usize;
    while done < len {
        let end = (done + CHUNK).min(len);
        let n = match reader.read(&mut buf[done..end]) {
            Ok(0) => {
                return Err(ModelDiskError::ShortRead {
                    read: done as u64,
                    expected: size,
                });
            }
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(ModelDiskError::Io {
                    what: format!("the model disk at byte {done}"),
                    source,
                });
            }
        };
        hasher.update(&buf[done..done + n]);
        done += n;
        progress(done as u64, size);
    }
    let actual = hex::encode(hasher.finalize());
    if actual != expected {
        return Err(ModelDiskError::HashMismatch { expected, actual });
    }
    Ok(buf)
}

/// What [`load_from_disk`] did, for the log.
#[derive(Debug, Clone)]
pub struct DiskLoad {
    /// The device read (`/dev/vdb`).
    pub device: PathBuf,
    /// Time spent reading and hashing.
    pub elapsed: Duration,
}

/// Finds the model disk below `root` (`/` in the guest), reads `size` bytes, checks the hash.
/// Logs progress every 10% on the console.
pub fn load_from_disk(
    paths: &crate::paths::Paths,
    size: u64,
    expected_hex: &str,
    wait: Duration,
) -> Result<(Vec<u8>, DiskLoad), ModelDiskError> {
    let sys_block = paths.resolve(SYS_BLOCK);
    let name = wait_for_disk(&sys_block, worker_api::MODEL_DISK_SERIAL, wait)?;
    let device = paths.resolve(&format!("/dev/{name}"));
    let disk_bytes = disk_size_bytes(&sys_block, &name)?;
    if disk_bytes < size {
        return Err(ModelDiskError::DiskTooSmall {
            device: device.display().to_string(),
            disk_bytes,
            model_size: size,
        });
    }
    let mut f = std::fs::File::open(&device).map_err(|source| ModelDiskError::Io {
        what: device.display().to_string(),
        source,
    })?;
    crate::log_line!(
        "model disk {} ({} bytes): reading {} bytes into private memory",
        device.display(),
        disk_bytes,
        size
    );
    let start = Instant::now();
    let mut last_decile = 0;
    let bytes = read_verified(&mut f, size, expected_hex, |done, total| {
        let decile = done.saturating_mul(10) / total.max(1);
        if decile > last_decile {
            last_decile = decile;
            crate::log_line!(
                "model disk: {}% ({} MiB, {:.1} s)",
                decile * 10,
                done >> 20,
                start.elapsed().as_secs_f64()
            );
        }
    })?;
    // The page cache holds a second copy of what was read; drop it (best effort).
    // SAFETY: plain syscall on an fd we own; no memory is passed.
    unsafe {
        libc::posix_fadvise(
            std::os::fd::AsRawFd::as_raw_fd(&f),
            0,
            0,
            libc::POSIX_FADV_DONTNEED,
        );
    }
    Ok((
        bytes,
        DiskLoad {
            device,
            elapsed: start.elapsed(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sha(b: &[u8]) -> String {
        hex::encode(Sha256::digest(b))
    }

    fn fake_sys(root: &Path, disks: &[(&str, &str, u64)]) -> PathBuf {
        let sb = root.join("sys/block");
        for (name, serial, sectors) in disks {
            let d = sb.join(name);
            std::fs::create_dir_all(&d).expect("mkdir");
            if !serial.is_empty() {
                std::fs::write(d.join("serial"), serial).expect("serial");
            }
            std::fs::write(d.join("size"), format!("{sectors}\n")).expect("size");
        }
        sb
    }

    #[test]
    fn disk_is_found_by_serial_only_among_virtio_disks() {
        let d = tempfile::tempdir().expect("tempdir");
        let sb = fake_sys(
            d.path(),
            &[
                ("loop0", "cw-model", 8),
                ("vda", "other\n", 8),
                ("vdb", "", 8),
                ("vdc", "cw-model\n", 3),
            ],
        );
        assert_eq!(
            find_disk_by_serial(&sb, "cw-model").expect("scan"),
            Some("vdc".into())
        );
        assert_eq!(find_disk_by_serial(&sb, "nope").expect("scan"), None);
        assert_eq!(disk_size_bytes(&sb, "vdc").expect("size"), 1536);
        let e = wait_for_disk(&sb, "nope", Duration::ZERO).expect_err("absent");
        assert!(e.to_string().contains("no model disk"), "{e}");
    }

    #[test]
    fn read_verified_accepts_exact_bytes_and_ignores_padding() {
        let model = b"GGUF model bytes".to_vec();
        let mut padded = model.clone();
        padded.resize(512, 0);
        let mut calls = 0;
        let got = read_verified(
            &mut padded.as_slice(),
            model.len() as u64,
            &sha(&model),
            |done, total| {
                calls += 1;
                assert!(done <= total);
            },
        )
        .expect("ok");
        assert_eq!(got, model);
        assert!(calls >= 1);
    }

    #[test]
    fn read_verified_refuses_short_disk_and_wrong_hash() {
        let model = vec![7u8; 1000];
        let e =
            read_verified(&mut &model[..500], 1000, &sha(&model), |_, _| {}).expect_err("short");
        assert!(
            matches!(
                e,
                ModelDiskError::ShortRead {
                    read: 500,
                    expected: 1000
                }
            ),
            "{e}"
        );
        let e = read_verified(&mut model.as_slice(), 1000, &"0".repeat(64), |_, _| {})
            .expect_err("mismatch");
        assert!(e.to_string().contains("sha256 mismatch"), "{e}");
        let e = read_verified(&mut model.as_slice(), 1000, "xyz", |_, _| {}).expect_err("bad");
        assert!(matches!(e, ModelDiskError::BadExpectedHash(_)), "{e}");
    }

    #[test]
    fn load_from_disk_checks_size_and_hash_in_a_fake_tree() {
        let d = tempfile::tempdir().expect("tempdir");
        let model: Vec<u8> = (0..3000u32).map(|i| (i % 251) as u8).collect();
        fake_sys(d.path(), &[("vdb", worker_api::MODEL_DISK_SERIAL, 6)]);
        std::fs::create_dir_all(d.path().join("dev")).expect("mkdir");
        let mut padded = model.clone();
        padded.resize(3072, 0);
        std::fs::write(d.path().join("dev/vdb"), &padded).expect("disk");
        let paths = crate::paths::Paths::new(d.path());
        let (bytes, info) =
            load_from_disk(&paths, 3000, &sha(&model), Duration::ZERO).expect("load");
        assert_eq!(bytes, model);
        assert!(info.device.ends_with("dev/vdb"));
        let e = load_from_disk(&paths, 4000, &sha(&model), Duration::ZERO).expect_err("small");
        assert!(matches!(e, ModelDiskError::DiskTooSmall { .. }), "{e}");
        let e = load_from_disk(&paths, 3000, &"ab".repeat(32), Duration::ZERO).expect_err("hash");
        assert!(matches!(e, ModelDiskError::HashMismatch { .. }), "{e}");
    }
}
