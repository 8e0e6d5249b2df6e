//! Guest side (inside the TD): get a quote for 64 bytes of REPORTDATA, extend RTMR3, read the CCEL
//! event log. All paths are injectable ([`TdxGuestPaths`]) so the logic is tested against a fake tree.
//!
//! - Quotes: configfs-tsm (Linux >= 6.7, `TSM_REPORTS`): `mkdir /sys/kernel/config/tsm/report/<name>`,
//!   write 64 bytes to `inblob`, read `generation`, read `outblob` (the kernel asks the host's QGS
//!   through the TDVMCALL GetQuote), re-read `generation` (a change means another writer raced us:
//!   retry), check `provider` is `tdx_guest`, `rmdir`. Mainline never had a `TDX_CMD_GET_QUOTE` ioctl
//!   (it existed only in Intel's out-of-tree driver), so there is no ioctl fallback for quotes;
//!   [`TdxGuest::td_report`] (`TDX_CMD_GET_REPORT0`) returns the unsigned 1024-byte TDREPORT, which a
//!   host QGS could turn into a quote (future work: QGS over vsock port 4050).
//! - RTMR3: `/sys/class/misc/tdx_guest/measurements/rtmr3:sha384` (a link to
//!   `/sys/devices/virtual/misc/tdx_guest/...`; Linux >= 6.16, `CONFIG_TSM_MEASUREMENTS`, created by
//!   `tdx-guest.ko` in a TD). ABI (Documentation/ABI/testing/sysfs-devices-virtual-misc-tdx_guest):
//!   a read returns the 48-byte binary value; a write extends the RTMR with the written buffer and
//!   must be one write of exactly 48 bytes at offset 0 (partial writes fail with EINVAL).
//!   Fallback: the `TDX_CMD_EXTEND_RTMR` ioctl of Intel's patched guest driver
//!   (`_IOR('T', 3, {u8 data[48]; u8 index})`). The image's kernel (trixie-backports, >= 6.16) has
//!   the sysfs file; Debian's 6.12 had neither.
//! - CCEL: the ACPI table `/sys/firmware/acpi/tables/CCEL` and the log
//!   `/sys/firmware/acpi/tables/data/CCEL`.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// Errors of the guest interfaces.
#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    /// Neither interface is there.
    #[error(
        "{what} is not available: {detail}. Run inside a TDX guest with the tdx_guest and tsm_report modules loaded"
    )]
    Unavailable {
        /// Which facility.
        what: &'static str,
        /// Why.
        detail: String,
    },
    /// An I/O step failed.
    #[error("{step} ({path}): {source}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// Path.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The kernel's answer was not usable.
    #[error("{0}")]
    Protocol(String),
}

fn io<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> GuestError + 'a {
    move |source| GuestError::Io {
        step,
        path: path.display().to_string(),
        source,
    }
}

/// Where the kernel interfaces live (defaults: the real paths).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TdxGuestPaths {
    /// configfs-tsm report directory.
    pub tsm_report: PathBuf,
    /// TSM measurement registers directory.
    pub measurements: PathBuf,
    /// The guest device.
    pub device: PathBuf,
    /// ACPI tables directory (holds `CCEL` and `data/CCEL`).
    pub acpi_tables: PathBuf,
}

impl Default for TdxGuestPaths {
    fn default() -> Self {
        Self::under(Path::new("/"))
    }
}

impl TdxGuestPaths {
    /// The standard layout below `root` (for tests: a fake tree).
    pub fn under(root: &Path) -> Self {
        Self {
            tsm_report: root.join("sys/kernel/config/tsm/report"),
            measurements: root.join("sys/class/misc/tdx_guest/measurements"),
            device: root.join("dev/tdx_guest"),
            acpi_tables: root.join("sys/firmware/acpi/tables"),
        }
    }
}

/// The CCEL table and its event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ccel {
    /// The raw ACPI table (56 bytes).
    pub table: Vec<u8>,
    /// Log area minimum length (LAML).
    pub log_area_min_len: u64,
    /// Log area start address (LASA).
    pub log_area_start: u64,
    /// The event log bytes (TCG2 crypto-agile format).
    pub log: Vec<u8>,
}

/// Size of the TDREPORT structure.
pub const TDREPORT_LEN: usize = 1024;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;
const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | ((b'T' as u64) << 8) | nr
}
/// `_IOWR('T', 1, struct tdx_report_req { u8 reportdata[64]; u8 tdreport[1024]; })` (mainline).
pub const TDX_CMD_GET_REPORT0: u64 = ioc(IOC_READ | IOC_WRITE, 1, 64 + TDREPORT_LEN as u64);
/// `_IOR('T', 3, struct tdx_extend_rtmr_req { u8 data[48]; u8 index; })` (Intel's patched driver).
pub const TDX_CMD_EXTEND_RTMR: u64 = ioc(IOC_READ, 3, 49);

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Access to the TD's attestation interfaces.
#[derive(Debug, Clone, Default)]
pub struct TdxGuest {
    /// Paths used.
    pub paths: TdxGuestPaths,
}

impl TdxGuest {
    /// With custom paths.
    pub fn with_paths(paths: TdxGuestPaths) -> Self {
        Self { paths }
    }

    /// Get a quote binding `report_data` through configfs-tsm. Retries up to 3 times when another
    /// writer races on the entry.
    pub fn quote(&self, report_data: &[u8; 64]) -> Result<Vec<u8>, GuestError> {
        if !self.paths.tsm_report.is_dir() {
            return Err(GuestError::Unavailable {
                what: "configfs-tsm",
                detail: format!(
                    "{} does not exist (mount configfs on /sys/kernel/config; Linux >= 6.7 with TSM_REPORTS and tdx_guest)",
                    self.paths.tsm_report.display()
                ),
            });
        }
        let name = format!(
            "worker-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let entry = self.paths.tsm_report.join(name);
        fs::create_dir(&entry).map_err(io("creating the configfs-tsm report entry", &entry))?;
        let mut result = Err(GuestError::Protocol("no attempt made".to_owned()));
        for _ in 0..3 {
            result = quote_via_entry(&entry, report_data);
            if !matches!(&result, Err(GuestError::Protocol(m)) if m.contains("generation changed"))
            {
                break;
            }
        }
        // configfs entries are removed with rmdir; a fake tree needs remove_dir_all.
        if fs::remove_dir(&entry).is_err() {
            let _ = fs::remove_dir_all(&entry);
        }
        result
    }

    /// The unsigned TDREPORT for `report_data` via `TDX_CMD_GET_REPORT0` on the guest device.
    pub fn td_report(&self, report_data: &[u8; 64]) -> Result<Vec<u8>, GuestError> {
        use std::os::fd::AsRawFd;
        let dev = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.paths.device)
            .map_err(|e| GuestError::Unavailable {
                what: "the TDX guest device",
                detail: format!("{}: {e}", self.paths.device.display()),
            })?;
        let mut req = [0u8; 64 + TDREPORT_LEN];
        req[..64].copy_from_slice(report_data);
        // SAFETY: `req` is a live, writable buffer of exactly the size encoded in the request number
        // (struct tdx_report_req: 64 + 1024 bytes, no padding); the fd is open for the call's duration.
        let rc = unsafe {
            libc::ioctl(
                dev.as_raw_fd(),
                TDX_CMD_GET_REPORT0 as libc::c_ulong,
                req.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(GuestError::Io {
                step: "TDX_CMD_GET_REPORT0 ioctl",
                path: self.paths.device.display().to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(req[64..].to_vec())
    }

    /// Extend RTMR3 with a 48-byte SHA-384 digest (sysfs first, then the ioctl fallback).
    pub fn extend_rtmr3(&self, digest: &[u8; 48]) -> Result<(), GuestError> {
        let attr = self.paths.measurements.join("rtmr3:sha384");
        if attr.exists() {
            let mut f = fs::OpenOptions::new()
                .write(true)
                .open(&attr)
                .map_err(io("opening the RTMR3 attribute", &attr))?;
            // One write() of all 48 bytes at offset 0: the kernel rejects anything else, so a
            // retrying write_all would only turn a short write into a confusing EINVAL.
            let n = f
                .write(digest)
                .map_err(io("writing the RTMR3 extension", &attr))?;
            if n != digest.len() {
                return Err(GuestError::Protocol(format!(
                    "{} accepted {n} of 48 bytes: RTMR3 was not extended",
                    attr.display()
                )));
            }
            return Ok(());
        }
        use std::os::fd::AsRawFd;
        let dev = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.paths.device)
            .map_err(|e| GuestError::Unavailable {
                what: "RTMR3 extension",
                detail: format!(
                    "neither {} (Linux >= 6.16) nor {} ({e}) is present",
                    attr.display(),
                    self.paths.device.display()
                ),
            })?;
        let mut req = [0u8; 49];
        req[..48].copy_from_slice(digest);
        req[48] = 3;
        // SAFETY: `req` is a live buffer of exactly the 49 bytes encoded in the request number
        // (struct tdx_extend_rtmr_req { u8 data[48]; u8 index; }); the fd is open for the call.
        let rc = unsafe {
            libc::ioctl(
                dev.as_raw_fd(),
                TDX_CMD_EXTEND_RTMR as libc::c_ulong,
                req.as_mut_ptr(),
            )
        };
        if rc != 0 {
            return Err(GuestError::Io {
                step: "TDX_CMD_EXTEND_RTMR ioctl (this kernel may not have it)",
                path: self.paths.device.display().to_string(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// The current RTMR3 value from the measurement-register sysfs file (Linux >= 6.16).
    pub fn read_rtmr3(&self) -> Result<[u8; 48], GuestError> {
        let attr = self.paths.measurements.join("rtmr3:sha384");
        let v = fs::read(&attr).map_err(|e| GuestError::Unavailable {
            what: "the RTMR3 sysfs file",
            detail: format!("{}: {e} (Linux >= 6.16 inside a TD)", attr.display()),
        })?;
        <[u8; 48]>::try_from(v.as_slice()).map_err(|_| {
            GuestError::Protocol(format!(
                "{} holds {} bytes, not a 48-byte SHA-384 value",
                attr.display(),
                v.len()
            ))
        })
    }

    /// Read the CCEL ACPI table and its event log.
    pub fn ccel(&self) -> Result<Ccel, GuestError> {
        let tp = self.paths.acpi_tables.join("CCEL");
        let lp = self.paths.acpi_tables.join("data/CCEL");
        let table = fs::read(&tp).map_err(|e| GuestError::Unavailable {
            what: "the CCEL ACPI table",
            detail: format!("{}: {e}", tp.display()),
        })?;
        let (log_area_min_len, log_area_start) = parse_ccel_table(&table)?;
        let log = fs::read(&lp).map_err(io("reading the CCEL event log", &lp))?;
        Ok(Ccel {
            table,
            log_area_min_len,
            log_area_start,
            log,
        })
    }
}

impl crate::ratls::QuoteProvider for TdxGuest {
    fn quote(&self, report_data: &[u8; 64]) -> Result<Vec<u8>, String> {
        TdxGuest::quote(self, report_data).map_err(|e| e.to_string())
    }
}

fn read_trimmed(p: &Path, step: &'static str) -> Result<String, GuestError> {
    Ok(fs::read_to_string(p)
        .map_err(io(step, p))?
        .trim()
        .to_owned())
}

/// One request on an existing configfs-tsm entry: write `inblob`, read `generation`, read `outblob`,
/// check `generation` did not move and `provider` is `tdx_guest`.
pub fn quote_via_entry(entry: &Path, report_data: &[u8; 64]) -> Result<Vec<u8>, GuestError> {
    let inblob = entry.join("inblob");
    fs::write(&inblob, report_data).map_err(io("writing inblob", &inblob))?;
    let gen_path = entry.join("generation");
    let before = read_trimmed(&gen_path, "reading generation")?;
    let outblob = entry.join("outblob");
    let quote = fs::read(&outblob).map_err(io("reading outblob (the quote)", &outblob))?;
    let after = read_trimmed(&gen_path, "reading generation")?;
    if before != after {
        return Err(GuestError::Protocol(format!(
            "configfs-tsm generation changed from {before} to {after} while reading: another writer raced on the entry"
        )));
    }
    let provider_path = entry.join("provider");
    if provider_path.exists() {
        let provider = read_trimmed(&provider_path, "reading provider")?;
        if provider != "tdx_guest" {
            return Err(GuestError::Protocol(format!(
                "configfs-tsm provider is {provider:?}, not tdx_guest: this is not a TDX guest"
            )));
        }
    }
    if quote.is_empty() {
        return Err(GuestError::Protocol(
            "configfs-tsm returned an empty quote: is the host's quote generation service (QGS) running?".to_owned(),
        ));
    }
    Ok(quote)
}

/// Parse the CCEL table: signature "CCEL", length >= 56; returns (LAML, LASA).
pub fn parse_ccel_table(t: &[u8]) -> Result<(u64, u64), GuestError> {
    if t.len() < 56 || &t[..4] != b"CCEL" {
        return Err(GuestError::Protocol(format!(
            "CCEL table is {} bytes with signature {:?}; expected >= 56 bytes starting with \"CCEL\"",
            t.len(),
            String::from_utf8_lossy(t.get(..4).unwrap_or(t))
        )));
    }
    let le = |s: &[u8]| {
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        u64::from_le_bytes(a)
    };
    Ok((le(&t[40..48]), le(&t[48..56])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quote_via_fake_entry_and_provider_check() {
        let d = tempfile::tempdir().expect("tmp");
        let e = d.path();
        fs::write(e.join("generation"), "1\n").expect("w");
        fs::write(e.join("outblob"), b"QUOTE").expect("w");
        fs::write(e.join("provider"), "tdx_guest\n").expect("w");
        assert_eq!(quote_via_entry(e, &[7; 64]).expect("quote"), b"QUOTE");
        assert_eq!(fs::read(e.join("inblob")).expect("r"), vec![7u8; 64]);
        fs::write(e.join("provider"), "sev_guest\n").expect("w");
        assert!(matches!(
            quote_via_entry(e, &[7; 64]),
            Err(GuestError::Protocol(_))
        ));
        fs::write(e.join("provider"), "tdx_guest\n").expect("w");
        fs::write(e.join("outblob"), b"").expect("w");
        assert!(quote_via_entry(e, &[7; 64]).is_err());
    }

    #[test]
    fn quote_without_configfs_is_unavailable_and_entry_is_cleaned_up() {
        let d = tempfile::tempdir().expect("tmp");
        let g = TdxGuest::with_paths(TdxGuestPaths::under(d.path()));
        assert!(matches!(
            g.quote(&[0; 64]),
            Err(GuestError::Unavailable { .. })
        ));
        fs::create_dir_all(&g.paths.tsm_report).expect("mkdir");
        // A plain directory does not answer: the request fails (no outblob) and leaves nothing behind.
        assert!(g.quote(&[0; 64]).is_err());
        assert_eq!(fs::read_dir(&g.paths.tsm_report).expect("ls").count(), 0);
    }

    #[test]
    fn rtmr3_extension_writes_48_bytes_or_reports_unavailable() {
        let d = tempfile::tempdir().expect("tmp");
        let g = TdxGuest::with_paths(TdxGuestPaths::under(d.path()));
        assert!(matches!(
            g.extend_rtmr3(&[1; 48]),
            Err(GuestError::Unavailable { .. })
        ));
        fs::create_dir_all(&g.paths.measurements).expect("mkdir");
        let attr = g.paths.measurements.join("rtmr3:sha384");
        fs::write(&attr, b"").expect("w");
        g.extend_rtmr3(&[1; 48]).expect("extend");
        assert_eq!(fs::read(&attr).expect("r"), vec![1u8; 48]);
        // The documented ABI location (the class link of the misc device).
        assert_eq!(
            TdxGuestPaths::default().measurements.join("rtmr3:sha384"),
            Path::new("/sys/class/misc/tdx_guest/measurements/rtmr3:sha384")
        );
        // Reading gives the 48-byte binary value; anything else is a protocol error.
        assert_eq!(g.read_rtmr3().expect("read"), [1u8; 48]);
        fs::write(&attr, b"0101").expect("w");
        assert!(matches!(g.read_rtmr3(), Err(GuestError::Protocol(_))));
        fs::remove_file(&attr).expect("rm");
        assert!(matches!(
            g.read_rtmr3(),
            Err(GuestError::Unavailable { .. })
        ));
    }

    #[test]
    fn ccel_is_read_from_both_paths() {
        let d = tempfile::tempdir().expect("tmp");
        let g = TdxGuest::with_paths(TdxGuestPaths::under(d.path()));
        assert!(g.ccel().is_err());
        fs::create_dir_all(g.paths.acpi_tables.join("data")).expect("mkdir");
        let mut t = vec![0u8; 56];
        t[..4].copy_from_slice(b"CCEL");
        t[40..48].copy_from_slice(&0x1_0000u64.to_le_bytes());
        t[48..56].copy_from_slice(&0x7f00_0000u64.to_le_bytes());
        fs::write(g.paths.acpi_tables.join("CCEL"), &t).expect("w");
        fs::write(g.paths.acpi_tables.join("data/CCEL"), b"log").expect("w");
        let c = g.ccel().expect("ccel");
        assert_eq!(
            (c.log_area_min_len, c.log_area_start, c.log.as_slice()),
            (0x1_0000, 0x7f00_0000, &b"log"[..])
        );
        assert!(parse_ccel_table(b"XXXX").is_err());
    }

    #[test]
    fn ioctl_numbers_match_the_kernel_encoding() {
        assert_eq!(TDX_CMD_GET_REPORT0, 0xc440_5401);
        assert_eq!(TDX_CMD_EXTEND_RTMR, 0x8031_5403);
        let d = tempfile::tempdir().expect("tmp");
        let g = TdxGuest::with_paths(TdxGuestPaths::under(d.path()));
        assert!(matches!(
            g.td_report(&[0; 64]),
            Err(GuestError::Unavailable { .. })
        ));
    }
}
