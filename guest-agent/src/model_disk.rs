//! The read-only model disk: finding it, and reading the model into private memory with its hash.
//!
//! The host attaches the model file as a raw, read-only virtio-blk disk whose virtio serial is
//! [`worker_api::MODEL_DISK_SERIAL`], and names its size (`model_size`) and SHA-256
//! (`model_sha256`) in the measured host config. The agent finds the disk by that serial
//! (`/sys/block/vd*/serial`), reads exactly `model_size` bytes into guest-private memory (a
//! `Vec`; in a TD the host cannot see or change it afterwards), hashes them while reading, and
//! hands the bytes to the inference engine only when the hash matches. The disk itself is
//! host-controlled and unencrypted: only the copy in private memory, checked against the
//! measured hash, is trusted.
//!
//! The dm-verity model disk (`model_verity` in the host config, from `cargo xtask model pack`):
//! [`open_verity`] checks the measured parameters against the format, finds the disk by the
//! same serial, refuses a disk shorter than the measured `disk_size`, and maps it through a
//! read-only dm-verity device ([`crate::dm`]) whose root hash is the measured one. The model
//! is then read only through that mapping ([`VerityReader`]): the kernel checks every block
//! against the hash tree before a read returns it, and a block that does not match fails the
//! read with EIO — the reader turns that into an error naming the block the kernel logged
//! ("data block N is corrupted"). Nothing is copied whole: the backends read one tensor (CPU)
//! or one chunk (CUDA) at a time, so models larger than the guest's RAM work on a GPU.

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
         (the host must attach the model with `host-launcher run --model-disk DIR` or \
         `--model FILE`; is virtio_blk in the image's modules?)"
    )]
    NotFound { sys_block: String, serial: String },
    #[error(
        "model disk {device} holds {disk_bytes} bytes but the measured host config says the \
         dm-verity disk has {disk_size}: the disk is truncated or not this model's disk \
         (attach the model.img that `cargo xtask model pack` wrote beside this model.json)"
    )]
    Truncated {
        device: String,
        disk_bytes: u64,
        disk_size: u64,
    },
    #[error("the measured model_verity parameters are not a valid model disk: {0}")]
    BadVerityParams(String),
    #[error("cannot set up dm-verity for the model disk: {0}")]
    Mapping(#[from] crate::dm::DmError),
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
    read: &std::sync::atomic::AtomicU64,
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
        read.store(done, std::sync::atomic::Ordering::Relaxed);
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

/// `/dev/kmsg`: the kernel log, where dm-verity reports corrupted blocks.
pub const KMSG: &str = "/dev/kmsg";
/// `/dev/mapper/control`: the device-mapper control device.
pub const DM_CONTROL: &str = "/dev/mapper/control";

/// The message part of one `/dev/kmsg` record (`prio,seq,usec,flags;message`).
pub fn kmsg_message(record: &str) -> &str {
    record
        .split_once(';')
        .map_or(record, |(_, m)| m)
        .trim_end_matches('\n')
}

/// The device-mapper / dm-verity lines of the kernel log at `kmsg` (all records still in the
/// ring buffer, oldest first; empty when it cannot be read).
pub fn kernel_dm_messages(kmsg: &Path) -> Vec<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(kmsg)
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    // Each read returns one record; EAGAIN ends the buffer. A plain file (tests) ends at 0.
    let mut buf = vec![0u8; 8192];
    let mut text = String::new();
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // EPIPE: records were overwritten while reading; go on with the next.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break,
        }
        if text.len() > 4 << 20 {
            break;
        }
    }
    for record in text.lines() {
        let m = kmsg_message(record);
        if m.contains("device-mapper") || m.contains("verity") {
            out.push(m.to_string());
        }
    }
    out
}

/// A block dm-verity reported as corrupted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptBlock {
    /// `data` or `metadata` (a hash block).
    pub kind: String,
    /// Block number on the disk (4 KiB blocks from its start; hash blocks counted after the
    /// data, as the kernel counts them).
    pub block: u64,
}

/// The corrupted blocks named in kernel log lines (`... data block 12 is corrupted`,
/// `... metadata block 131 is corrupted`), in order, without repeats.
pub fn corrupted_blocks(lines: &[String]) -> Vec<CorruptBlock> {
    let mut out: Vec<CorruptBlock> = Vec::new();
    for l in lines {
        let words: Vec<&str> = l.split_whitespace().collect();
        for w in words.windows(5) {
            if (w[0] == "data" || w[0] == "metadata")
                && w[1] == "block"
                && w[3] == "is"
                && w[4].starts_with("corrupted")
                && let Ok(block) = w[2].parse::<u64>()
            {
                let c = CorruptBlock {
                    kind: w[0].into(),
                    block,
                };
                if !out.contains(&c) {
                    out.push(c);
                }
            }
        }
    }
    out
}

/// The reason for a failed read through the verity mapping, from the kernel log: which
/// block(s) did not match the tree and what that means.
pub fn describe_corruption(blocks: &[CorruptBlock], v: &worker_api::ModelVerity) -> String {
    let Some(first) = blocks.first() else {
        return "no dm-verity message in the kernel log (the disk itself failed the read?)".into();
    };
    let hash_start = v.hash_offset / measurements::model_disk::BLOCK_SIZE as u64;
    let what = |b: &CorruptBlock| {
        let at = b.block * measurements::model_disk::BLOCK_SIZE as u64;
        if b.kind == "metadata" && b.block == hash_start {
            format!(
                "hash block {} (byte offset {at} of the model disk: the top of the hash tree) \
                 does not match the measured root hash: the disk is not the model this root \
                 hash names (wrong disk, or wrong root hash in model.json)",
                b.block
            )
        } else if b.kind == "metadata" {
            format!(
                "hash block {} (byte offset {at} of the model disk) does not match the tree \
                 above it: the hash tree on the disk was modified",
                b.block
            )
        } else {
            format!(
                "data block {} (byte offset {at} of the model disk) does not match the hash \
                 tree: the model bytes on the disk were modified",
                b.block
            )
        }
    };
    let mut s = format!("dm-verity rejected {}", what(first));
    if blocks.len() > 1 {
        s.push_str(&format!(
            " ({} more corrupted blocks logged)",
            blocks.len() - 1
        ));
    }
    s
}

/// Load progress shared between the reader and `/health`.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes returned by the verity device (each block checked against the tree).
    pub verified: std::sync::atomic::AtomicU64,
}

/// The model read through the dm-verity mapping (see the module docs).
#[derive(Debug)]
pub struct VerityReader {
    file: std::fs::File,
    /// The GGUF's length (the mapping is longer: whole blocks).
    len: u64,
    verity: worker_api::ModelVerity,
    kmsg: PathBuf,
    progress: std::sync::Arc<Progress>,
}

impl VerityReader {
    /// The device node read from.
    pub fn file(&self) -> &std::fs::File {
        &self.file
    }
}

impl inference::stream::ReadAt for VerityReader {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        if offset.saturating_add(buf.len() as u64) > self.len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "read past the {}-byte model (offset {offset}, {} bytes)",
                    self.len,
                    buf.len()
                ),
            ));
        }
        match self.file.read_exact_at(buf, offset) {
            Ok(()) => {
                self.progress
                    .verified
                    .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
                // The bytes are in the caller's buffer now: drop the page cache's copy so RAM
                // holds the model once (best effort).
                // SAFETY: plain syscall on an fd we own; no memory is passed.
                unsafe {
                    libc::posix_fadvise(
                        std::os::fd::AsRawFd::as_raw_fd(&self.file),
                        offset as libc::off_t,
                        buf.len() as libc::off_t,
                        libc::POSIX_FADV_DONTNEED,
                    );
                }
                Ok(())
            }
            Err(e) => {
                let lines = kernel_dm_messages(&self.kmsg);
                let reason = describe_corruption(&corrupted_blocks(&lines), &self.verity);
                Err(std::io::Error::new(e.kind(), format!("{e}: {reason}")))
            }
        }
    }
}

/// Reads `len` bytes of `path` sequentially in 4 MiB chunks after dropping its page cache;
/// returns the seconds taken.
fn timed_read(path: &Path, len: u64) -> std::io::Result<f64> {
    let mut f = std::fs::File::open(path)?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    // SAFETY: plain syscall on an fd we own; no memory is passed.
    unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) };
    let mut buf = vec![0u8; CHUNK];
    let start = Instant::now();
    let mut done = 0u64;
    while done < len {
        let want = (len - done).min(CHUNK as u64) as usize;
        let n = f.read(&mut buf[..want])?;
        if n == 0 {
            break;
        }
        done += n as u64;
    }
    let secs = start.elapsed().as_secs_f64();
    // SAFETY: as above.
    unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) };
    Ok(secs)
}

/// Benchmark probe (`cargo xtask bench model-disk`): when the host attached a second copy of
/// the model disk with serial [`worker_api::BENCH_RAW_DISK_SERIAL`] (the launcher never does),
/// times a sequential read of `len` bytes of it raw, then of the same bytes through the verity
/// mapping `verity_node`, and logs both. Read-only; without that disk it does nothing.
pub fn bench_probe(paths: &crate::paths::Paths, verity_node: &Path, len: u64) {
    let sys_block = paths.resolve(SYS_BLOCK);
    let Ok(Some(raw)) = find_disk_by_serial(&sys_block, worker_api::BENCH_RAW_DISK_SERIAL) else {
        return;
    };
    let raw = paths.resolve(&format!("/dev/{raw}"));
    for (what, path) in [("raw", raw.as_path()), ("dm-verity", verity_node)] {
        match timed_read(path, len) {
            Ok(secs) => crate::log_line!(
                "bench: {what} read of {}: {len} bytes in {secs:.2} s ({:.1} MiB/s)",
                path.display(),
                len as f64 / secs.max(1e-9) / 1048576.0
            ),
            Err(e) => crate::log_line!("bench: {what} read of {} failed: {e}", path.display()),
        }
    }
}

/// Checks the measured parameters, finds the model disk, refuses a short one and maps it
/// through dm-verity with the measured root hash. Returns the reader of the GGUF through the
/// mapping and the device it maps.
pub fn open_verity(
    paths: &crate::paths::Paths,
    verity: &worker_api::ModelVerity,
    wait: Duration,
    progress: std::sync::Arc<Progress>,
) -> Result<(VerityReader, crate::dm::VerityDevice), ModelDiskError> {
    let info = measurements::model_disk::VerityInfo {
        format: verity.format,
        hash_algorithm: verity.hash_algorithm.clone(),
        data_block_size: verity.data_block_size,
        hash_block_size: verity.hash_block_size,
        data_blocks: verity.data_blocks,
        hash_blocks: verity.hash_blocks,
        hash_offset: verity.hash_offset,
        superblock: false,
        salt: verity.salt.clone(),
        root_hash: verity.root_hash.clone(),
    };
    info.validate(verity.file_size, verity.disk_size)
        .map_err(|e| ModelDiskError::BadVerityParams(e.to_string()))?;
    let sys_block = paths.resolve(SYS_BLOCK);
    let name = wait_for_disk(&sys_block, worker_api::MODEL_DISK_SERIAL, wait)?;
    let device = paths.resolve(&format!("/dev/{name}"));
    let disk_bytes = disk_size_bytes(&sys_block, &name)?;
    if disk_bytes < verity.disk_size {
        return Err(ModelDiskError::Truncated {
            device: device.display().to_string(),
            disk_bytes,
            disk_size: verity.disk_size,
        });
    }
    let devno_path = sys_block.join(&name).join("dev");
    let devno = std::fs::read_to_string(&devno_path).map_err(|source| ModelDiskError::Io {
        what: devno_path.display().to_string(),
        source,
    })?;
    let dev = devno
        .trim()
        .split_once(':')
        .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
        .ok_or_else(|| ModelDiskError::Io {
            what: devno_path.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not major:minor"),
        })?;
    let table = crate::dm::VerityTable {
        dev,
        block_size: measurements::model_disk::BLOCK_SIZE as u64,
        data_blocks: verity.data_blocks,
        hash_start_block: verity.hash_offset / measurements::model_disk::BLOCK_SIZE as u64,
        algorithm: verity.hash_algorithm.clone(),
        root_hash: verity.root_hash.clone(),
        salt: verity.salt.clone(),
    };
    let kmsg = paths.resolve(KMSG);
    let mapped = crate::dm::create_verity(
        &paths.resolve(DM_CONTROL),
        &paths.resolve("/dev"),
        &kmsg,
        worker_api::MODEL_VERITY_DM_NAME,
        &table,
    )?;
    crate::log_line!(
        "model disk {} ({} bytes) mapped through dm-verity as {} (root hash {}, {} data blocks)",
        device.display(),
        disk_bytes,
        mapped.node.display(),
        verity.root_hash,
        verity.data_blocks
    );
    let file = std::fs::File::open(&mapped.node).map_err(|source| ModelDiskError::Io {
        what: mapped.node.display().to_string(),
        source,
    })?;
    Ok((
        VerityReader {
            file,
            len: verity.file_size,
            verity: verity.clone(),
            kmsg,
            progress,
        },
        mapped,
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
        let (bytes, info) = load_from_disk(
            &paths,
            3000,
            &sha(&model),
            Duration::ZERO,
            &Default::default(),
        )
        .expect("load");
        assert_eq!(bytes, model);
        assert!(info.device.ends_with("dev/vdb"));
        let e = load_from_disk(
            &paths,
            4000,
            &sha(&model),
            Duration::ZERO,
            &Default::default(),
        )
        .expect_err("small");
        assert!(matches!(e, ModelDiskError::DiskTooSmall { .. }), "{e}");
        let e = load_from_disk(
            &paths,
            3000,
            &"ab".repeat(32),
            Duration::ZERO,
            &Default::default(),
        )
        .expect_err("hash");
        assert!(matches!(e, ModelDiskError::HashMismatch { .. }), "{e}");
    }

    #[test]
    fn kernel_log_corruption_lines_name_the_block() {
        let lines: Vec<String> = [
            "6,1234,5678,-;device-mapper: verity: 254:0: data block 12 is corrupted",
            "3,1235,5679,-;device-mapper: verity: 254:0: data block 12 is corrupted",
            "3,1236,5680,-;device-mapper: verity: 254:0: metadata block 131 is corrupted",
            "6,1,1,-;virtio_blk virtio1: [vdb] 1 512-byte logical blocks",
        ]
        .iter()
        .map(|r| kmsg_message(r).to_string())
        .collect();
        assert_eq!(
            lines[0],
            "device-mapper: verity: 254:0: data block 12 is corrupted"
        );
        let b = corrupted_blocks(&lines);
        assert_eq!(
            b,
            [
                CorruptBlock {
                    kind: "data".into(),
                    block: 12
                },
                CorruptBlock {
                    kind: "metadata".into(),
                    block: 131
                }
            ]
        );
        let v = worker_api::ModelVerity {
            revision: "r".into(),
            file_size: 131 * 4096,
            disk_size: 134 * 4096,
            format: 1,
            hash_algorithm: "sha256".into(),
            data_block_size: 4096,
            hash_block_size: 4096,
            data_blocks: 131,
            hash_blocks: 3,
            hash_offset: 131 * 4096,
            salt: "00".repeat(32),
            root_hash: "00".repeat(32),
        };
        let d = describe_corruption(&b, &v);
        assert!(
            d.contains("data block 12 (byte offset 49152") && d.contains("1 more"),
            "{d}"
        );
        let top = describe_corruption(&b[1..], &v);
        assert!(
            top.contains("top of the hash tree") && top.contains("root hash"),
            "{top}"
        );
        let inner = describe_corruption(
            &[CorruptBlock {
                kind: "metadata".into(),
                block: 133,
            }],
            &v,
        );
        assert!(
            inner.contains("hash tree on the disk was modified"),
            "{inner}"
        );
        assert!(describe_corruption(&[], &v).contains("no dm-verity message"));
        // A log file with such lines (a plain file stands in for /dev/kmsg).
        let d = tempfile::tempdir().expect("tmp");
        let k = d.path().join("kmsg");
        std::fs::write(
            &k,
            "6,1,1,-;hello\n3,2,2,-;device-mapper: verity: 254:0: data block 7 is corrupted\n",
        )
        .expect("write");
        assert_eq!(
            kernel_dm_messages(&k),
            ["device-mapper: verity: 254:0: data block 7 is corrupted"]
        );
    }

    #[test]
    fn open_verity_checks_parameters_and_disk_size_before_mapping() {
        let d = tempfile::tempdir().expect("tempdir");
        let paths = crate::paths::Paths::new(d.path());
        let layout = measurements::model_disk::Layout::new(200 * 4096).expect("layout");
        let good = worker_api::ModelVerity {
            revision: "r".into(),
            file_size: layout.file_size,
            disk_size: layout.disk_size(),
            format: 1,
            hash_algorithm: "sha256".into(),
            data_block_size: 4096,
            hash_block_size: 4096,
            data_blocks: layout.data_blocks,
            hash_blocks: layout.hash_blocks,
            hash_offset: layout.hash_offset(),
            salt: hex::encode(measurements::model_disk::SALT),
            root_hash: "ab".repeat(32),
        };
        let progress = std::sync::Arc::new(Progress::default());
        let bad = worker_api::ModelVerity {
            salt: "00".repeat(32),
            ..good.clone()
        };
        let e = open_verity(&paths, &bad, Duration::ZERO, progress.clone()).expect_err("salt");
        assert!(matches!(e, ModelDiskError::BadVerityParams(_)), "{e}");
        // The disk is found by serial but is one block short of the measured disk size.
        fake_sys(
            d.path(),
            &[(
                "vdb",
                worker_api::MODEL_DISK_SERIAL,
                good.disk_size / 512 - 8,
            )],
        );
        let e = open_verity(&paths, &good, Duration::ZERO, progress.clone()).expect_err("short");
        assert!(matches!(e, ModelDiskError::Truncated { .. }), "{e}");
        assert!(e.to_string().contains("truncated"), "{e}");
        // Right size: the mapping step runs (and fails here: no device-mapper in a temp dir).
        fake_sys(
            d.path(),
            &[("vdb", worker_api::MODEL_DISK_SERIAL, good.disk_size / 512)],
        );
        std::fs::write(d.path().join("sys/block/vdb/dev"), "254:16\n").expect("dev");
        let e = open_verity(&paths, &good, Duration::ZERO, progress).expect_err("no dm");
        assert!(matches!(e, ModelDiskError::Mapping(_)), "{e}");
    }
}
