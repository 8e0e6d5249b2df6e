//! The kernel's device-mapper ioctl interface (`/dev/mapper/control`), just enough to create a
//! read-only dm-verity device: `DM_DEV_CREATE`, `DM_TABLE_LOAD` with one `verity` target,
//! `DM_DEV_SUSPEND` without the suspend flag (= resume, which makes the loaded table live) and
//! `DM_DEV_REMOVE` to clean up after a failure.
//!
//! Why ioctls and not `veritysetup`: the image is an initramfs whose every byte is measured;
//! `veritysetup` would bring libcryptsetup, libdevmapper, OpenSSL, json-c, libblkid, argon2 and
//! popt into it (and their CVEs into the TCB) for four ioctls whose structures are a stable
//! kernel ABI (`include/uapi/linux/dm-ioctl.h`, interface version 4). The encoding below is pure
//! and unit-tested byte for byte; the e2e tests run it against the image's real kernel.
//!
//! Layout of `struct dm_ioctl` (312 bytes): `version[3]` u32 @0, `data_size` @12,
//! `data_start` @16, `target_count` @20, `open_count` @24, `flags` @28, `event_nr` @32,
//! padding @36, `dev` u64 @40, `name[128]` @48, `uuid[129]` @176, `data[7]` @305. A table
//! follows at `data_start` as `struct dm_target_spec` (40 bytes: `sector_start` u64,
//! `length` u64, `status` i32, `next` u32, `target_type[16]`) and the NUL-terminated
//! parameter string, padded to 8 bytes.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `sizeof(struct dm_ioctl)`.
pub const HEADER_SIZE: usize = 312;
/// `sizeof(struct dm_target_spec)`.
pub const SPEC_SIZE: usize = 40;
const NAME_LEN: usize = 128;
const TYPE_NAME_LEN: usize = 16;
/// Interface version we speak (major 4; the kernel accepts any minor it is newer than).
const VERSION: [u32; 3] = [4, 0, 0];
const DM_IOCTL_TYPE: u64 = 0xfd;

/// Commands (`enum` in dm-ioctl.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Cmd {
    /// `DM_DEV_CREATE`.
    DevCreate = 3,
    /// `DM_DEV_REMOVE`.
    DevRemove = 4,
    /// `DM_DEV_SUSPEND` (without `DM_SUSPEND_FLAG`: resume).
    DevSuspend = 6,
    /// `DM_TABLE_LOAD`.
    TableLoad = 9,
}

/// `DM_READONLY_FLAG`.
pub const READONLY_FLAG: u32 = 1;

/// The ioctl request number of `cmd`: `_IOWR(0xfd, cmd, struct dm_ioctl)`.
pub fn request(cmd: Cmd) -> u64 {
    (3 << 30) | ((HEADER_SIZE as u64) << 16) | (DM_IOCTL_TYPE << 8) | cmd as u64
}

/// Why a device-mapper operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DmError {
    #[error(
        "cannot open {path}: {source} (is the dm-mod module loaded? it must be in the image's \
         modules.list with dm-verity)"
    )]
    Control {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("device-mapper {what} of {name} failed: {source}{}", kernel_suffix(.kernel))]
    Ioctl {
        what: &'static str,
        name: String,
        #[source]
        source: std::io::Error,
        /// The kernel's device-mapper messages around the failure.
        kernel: Vec<String>,
    },
    #[error("device-mapper name {0:?} is empty or longer than 127 bytes")]
    BadName(String),
    #[error("dm-verity parameter string is too long ({0} bytes)")]
    TableTooLong(usize),
    #[error("the device node of {name} ({major}:{minor}) did not appear: {why}")]
    NoNode {
        name: String,
        major: u32,
        minor: u32,
        why: String,
    },
}

fn kernel_suffix(lines: &[String]) -> String {
    if lines.is_empty() {
        String::new()
    } else {
        format!("; kernel: {}", lines.join(" | "))
    }
}

/// A `struct dm_ioctl` header for device `name` with `flags`, followed by `payload` at
/// `data_start` = [`HEADER_SIZE`] (`target_count` targets).
pub fn encode(
    name: &str,
    flags: u32,
    target_count: u32,
    payload: &[u8],
) -> Result<Vec<u8>, DmError> {
    if name.is_empty() || name.len() >= NAME_LEN || name.contains('\0') {
        return Err(DmError::BadName(name.into()));
    }
    // Room for the kernel's answer (it writes status into the buffer it was given).
    let size = (HEADER_SIZE + payload.len()).max(HEADER_SIZE + 4096);
    let mut b = vec![0u8; size];
    for (i, v) in VERSION.iter().enumerate() {
        b[4 * i..4 * i + 4].copy_from_slice(&v.to_ne_bytes());
    }
    b[12..16].copy_from_slice(&(size as u32).to_ne_bytes());
    b[16..20].copy_from_slice(&(HEADER_SIZE as u32).to_ne_bytes());
    b[20..24].copy_from_slice(&target_count.to_ne_bytes());
    b[28..32].copy_from_slice(&flags.to_ne_bytes());
    b[48..48 + name.len()].copy_from_slice(name.as_bytes());
    b[HEADER_SIZE..HEADER_SIZE + payload.len()].copy_from_slice(payload);
    Ok(b)
}

/// One `struct dm_target_spec` covering `length` 512-byte sectors from 0, of `target_type`,
/// with its NUL-terminated `params`, padded to 8 bytes (`next` = the padded size).
pub fn target_spec(length: u64, target_type: &str, params: &str) -> Result<Vec<u8>, DmError> {
    if params.len() > 64 * 1024 || params.contains('\0') {
        return Err(DmError::TableTooLong(params.len()));
    }
    let unpadded = SPEC_SIZE + params.len() + 1;
    let size = unpadded.div_ceil(8) * 8;
    let mut b = vec![0u8; size];
    b[8..16].copy_from_slice(&length.to_ne_bytes());
    b[20..24].copy_from_slice(&(size as u32).to_ne_bytes());
    let ty = target_type.as_bytes();
    let n = ty.len().min(TYPE_NAME_LEN - 1);
    b[24..24 + n].copy_from_slice(&ty[..n]);
    b[SPEC_SIZE..SPEC_SIZE + params.len()].copy_from_slice(params.as_bytes());
    Ok(b)
}

/// `dev` of an answer (the kernel's `huge_encode_dev`) as (major, minor).
pub fn decode_dev(header: &[u8]) -> (u32, u32) {
    let mut d = [0u8; 8];
    d.copy_from_slice(&header[40..48]);
    let dev = u64::from_ne_bytes(d);
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major as u32, minor as u32)
}

/// The parameters of a dm-verity target (format 1, no superblock, no optional arguments:
/// a block that does not match the tree fails the read with EIO and is logged by the kernel).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerityTable {
    /// The data device and the hash device (the same disk), `major:minor`.
    pub dev: (u32, u32),
    /// Data and hash block size.
    pub block_size: u64,
    /// Data blocks.
    pub data_blocks: u64,
    /// First hash block, in hash blocks from the start of the device.
    pub hash_start_block: u64,
    /// `sha256`.
    pub algorithm: String,
    /// Root hash, hex.
    pub root_hash: String,
    /// Salt, hex.
    pub salt: String,
}

impl VerityTable {
    /// Length of the mapped device in 512-byte sectors (the data blocks).
    pub fn sectors(&self) -> u64 {
        self.data_blocks * (self.block_size / 512)
    }

    /// The target line: `1 <data dev> <hash dev> <data bs> <hash bs> <#data blocks>
    /// <hash start block> <alg> <root> <salt>`.
    pub fn params(&self) -> String {
        let (ma, mi) = self.dev;
        format!(
            "1 {ma}:{mi} {ma}:{mi} {bs} {bs} {} {} {} {} {}",
            self.data_blocks,
            self.hash_start_block,
            self.algorithm,
            self.root_hash,
            self.salt,
            bs = self.block_size
        )
    }
}

fn ioctl(
    ctl: &std::fs::File,
    cmd: Cmd,
    buf: &mut [u8],
    what: &'static str,
    name: &str,
    kmsg: &Path,
) -> Result<(), DmError> {
    // SAFETY: `buf` is a writable buffer of `data_size` bytes (encode() wrote that size into
    // the header), which is what the kernel reads and writes for every dm command; the fd is
    // the open control device.
    let r = unsafe { libc::ioctl(ctl.as_raw_fd(), request(cmd) as _, buf.as_mut_ptr()) };
    if r < 0 {
        let source = std::io::Error::last_os_error();
        return Err(DmError::Ioctl {
            what,
            name: name.into(),
            source,
            kernel: crate::model_disk::kernel_dm_messages(kmsg),
        });
    }
    Ok(())
}

/// A live dm-verity device.
#[derive(Debug)]
pub struct VerityDevice {
    /// The device-mapper name.
    pub name: String,
    /// Its block device node (`/dev/dm-N`).
    pub node: PathBuf,
    /// (major, minor).
    pub dev: (u32, u32),
}

/// Creates the read-only dm-verity device `name` over `table`: create, load the table, resume;
/// removes the half-made device when a step fails. `control` is `/dev/mapper/control`, `dev`
/// the directory of device nodes (`/dev`), `kmsg` the kernel log (`/dev/kmsg`) whose
/// device-mapper lines are attached to errors.
pub fn create_verity(
    control: &Path,
    dev: &Path,
    kmsg: &Path,
    name: &str,
    table: &VerityTable,
) -> Result<VerityDevice, DmError> {
    let ctl = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(control)
        .map_err(|source| DmError::Control {
            path: control.display().to_string(),
            source,
        })?;
    let mut b = encode(name, 0, 0, &[])?;
    ioctl(&ctl, Cmd::DevCreate, &mut b, "DM_DEV_CREATE", name, kmsg)?;
    let devno = decode_dev(&b);
    let result = (|| {
        let spec = target_spec(table.sectors(), "verity", &table.params())?;
        let mut b = encode(name, READONLY_FLAG, 1, &spec)?;
        ioctl(
            &ctl,
            Cmd::TableLoad,
            &mut b,
            "DM_TABLE_LOAD (verity)",
            name,
            kmsg,
        )?;
        let mut b = encode(name, 0, 0, &[])?;
        ioctl(
            &ctl,
            Cmd::DevSuspend,
            &mut b,
            "DM_DEV_SUSPEND (resume)",
            name,
            kmsg,
        )?;
        node_for(dev, name, devno)
    })();
    match result {
        Ok(node) => Ok(VerityDevice {
            name: name.into(),
            node,
            dev: devno,
        }),
        Err(e) => {
            if let Ok(mut b) = encode(name, 0, 0, &[]) {
                let _ = ioctl(&ctl, Cmd::DevRemove, &mut b, "DM_DEV_REMOVE", name, kmsg);
            }
            Err(e)
        }
    }
}

/// The block device node of `devno`: devtmpfs creates `/dev/dm-<minor>`; without devtmpfs
/// one is made with mknod at `/dev/mapper/<name>`.
fn node_for(dev: &Path, name: &str, devno: (u32, u32)) -> Result<PathBuf, DmError> {
    let want = dev.join(format!("dm-{}", devno.1));
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        if is_block_device(&want, devno) {
            return Ok(want);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mapper = dev.join("mapper");
    let _ = std::fs::create_dir_all(&mapper);
    let node = mapper.join(name);
    let _ = std::fs::remove_file(&node);
    let c = std::ffi::CString::new(node.as_os_str().as_encoded_bytes()).map_err(|e| {
        DmError::NoNode {
            name: name.into(),
            major: devno.0,
            minor: devno.1,
            why: e.to_string(),
        }
    })?;
    // SAFETY: `c` is a NUL-terminated path; mknod only reads it.
    let r = unsafe {
        libc::mknod(
            c.as_ptr(),
            libc::S_IFBLK | 0o400,
            libc::makedev(devno.0, devno.1),
        )
    };
    if r != 0 {
        return Err(DmError::NoNode {
            name: name.into(),
            major: devno.0,
            minor: devno.1,
            why: format!(
                "{} is missing and mknod {} failed: {}",
                want.display(),
                node.display(),
                std::io::Error::last_os_error()
            ),
        });
    }
    Ok(node)
}

fn is_block_device(p: &Path, devno: (u32, u32)) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    std::fs::metadata(p).is_ok_and(|m| {
        m.file_type().is_block_device() && {
            let rdev = m.rdev();
            libc::major(rdev) == devno.0 && libc::minor(rdev) == devno.1
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_numbers_are_the_kernel_s() {
        // As strace prints them: DM_DEV_CREATE = 0xc138fd03, DM_TABLE_LOAD = 0xc138fd09.
        assert_eq!(request(Cmd::DevCreate), 0xc138_fd03);
        assert_eq!(request(Cmd::DevRemove), 0xc138_fd04);
        assert_eq!(request(Cmd::DevSuspend), 0xc138_fd06);
        assert_eq!(request(Cmd::TableLoad), 0xc138_fd09);
    }

    #[test]
    fn header_and_spec_layout() {
        let spec = target_spec(16, "verity", "1 2 3").expect("spec");
        // 40 + "1 2 3\0" = 46 -> padded to 48.
        assert_eq!(spec.len(), 48);
        assert_eq!(u64::from_ne_bytes(spec[8..16].try_into().expect("8")), 16);
        assert_eq!(u32::from_ne_bytes(spec[20..24].try_into().expect("4")), 48);
        assert_eq!(&spec[24..30], b"verity");
        assert_eq!(&spec[40..46], b"1 2 3\0");
        let b = encode("cw-model", READONLY_FLAG, 1, &spec).expect("encode");
        let u32_at = |o: usize| u32::from_ne_bytes(b[o..o + 4].try_into().expect("4"));
        assert_eq!((u32_at(0), u32_at(4), u32_at(8)), (4, 0, 0));
        assert_eq!(u32_at(12) as usize, b.len());
        assert!(b.len() >= HEADER_SIZE + spec.len());
        assert_eq!(u32_at(16) as usize, HEADER_SIZE);
        assert_eq!((u32_at(20), u32_at(28)), (1, READONLY_FLAG));
        assert_eq!(&b[48..56], b"cw-model");
        assert_eq!(b[56], 0);
        assert_eq!(&b[HEADER_SIZE..HEADER_SIZE + spec.len()], &spec[..]);
        assert!(encode("", 0, 0, &[]).is_err());
        assert!(encode(&"x".repeat(128), 0, 0, &[]).is_err());
    }

    #[test]
    fn dev_numbers_decode_like_glibc() {
        let mut h = vec![0u8; HEADER_SIZE];
        // major 252, minor 3: new_encode_dev = (minor & 0xff) | (major << 8) | ((minor & ~0xff) << 12)
        h[40..48].copy_from_slice(&((3u64) | (252 << 8)).to_ne_bytes());
        assert_eq!(decode_dev(&h), (252, 3));
        let (ma, mi) = (259u64, 300u64);
        let dev = (mi & 0xff) | (ma << 8) | ((mi & !0xff) << 12);
        h[40..48].copy_from_slice(&dev.to_ne_bytes());
        assert_eq!(decode_dev(&h), (259, 300));
    }

    #[test]
    fn verity_target_line() {
        let t = VerityTable {
            dev: (254, 16),
            block_size: 4096,
            data_blocks: 131,
            hash_start_block: 131,
            algorithm: "sha256".into(),
            root_hash: "ab".repeat(32),
            salt: "cd".repeat(32),
        };
        assert_eq!(t.sectors(), 131 * 8);
        assert_eq!(
            t.params(),
            format!(
                "1 254:16 254:16 4096 4096 131 131 sha256 {} {}",
                "ab".repeat(32),
                "cd".repeat(32)
            )
        );
    }

    #[test]
    fn a_missing_control_device_names_the_module() {
        let d = tempfile::tempdir().expect("tmp");
        let t = VerityTable {
            dev: (1, 2),
            block_size: 4096,
            data_blocks: 1,
            hash_start_block: 1,
            algorithm: "sha256".into(),
            root_hash: "00".repeat(32),
            salt: "00".repeat(32),
        };
        let e = create_verity(
            &d.path().join("control"),
            d.path(),
            &d.path().join("kmsg"),
            "x",
            &t,
        )
        .expect_err("no control device");
        assert!(e.to_string().contains("dm-mod"), "{e}");
    }
}
