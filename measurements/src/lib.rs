//! Offline computation and checking of Intel TDX measurements for the confidential worker.
//!
//! This crate is a leaf: it depends on no other crate of the workspace, so an auditor can read
//! it alone. It computes, from the boot parts of an image and its launch configuration, the
//! registers a TD will report (MRTD, RTMR0..3), the image hashes derived from them, and it parses
//! what a running TD hands out (TDX quotes, the CCEL ACPI table and its event log) so that the two
//! can be compared and every difference explained in words.
//!
//! Module map:
//! - [`tdvf`]: TDVF metadata of the firmware and MRTD (single-pass and two-pass page order).
//! - [`rtmr0`]: the firmware-configuration events (TD HOB, CFV, UEFI variables, ACPI, boot vars).
//! - [`acpi`]: QEMU's fw_cfg ACPI blobs; synthesis of `etc/acpi/rsdp` and `etc/table-loader`.
//! - [`kernel`]: QEMU's bzImage setup-header patching, Authenticode, RTMR1 and RTMR2 events.
//! - [`rtmr3`]: our agent's runtime events (format defined here).
//! - [`model_disk`]: model disks (GGUF + dm-verity tree), `model.json` and the model hash.
//! - [`image_hash`]: `cocoon-v1` and our own `cw-v1` image hashes.
//! - [`quote`]: TDX quote v4/v5 parsing (TD 1.0, 1.5 and 1.5ex bodies).
//! - [`eventlog`]: CCEL table and TCG2 crypto-agile event log parsing and replay.
//! - [`compute`]: one launch configuration in, the expected registers with their events out.
//! - [`diff`]: compare expected registers with a quote or an event log and explain mismatches.
//! - [`image`]: measure an xtask-built image directory (the `measurements image` command).
//! - [`bytes`]: the bounds-checked little-endian reader every parser uses.

pub mod acpi;
pub mod acpi_diff;
pub mod bytes;
pub mod compute;
pub mod diff;
pub mod eventlog;
pub mod image;
pub mod image_hash;
pub mod kernel;
pub mod model_disk;
pub mod quote;
pub mod rtmr0;
pub mod rtmr3;
pub mod tdvf;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha384};
use std::fmt;
use std::path::PathBuf;

/// Errors of this library. Each message says what was wrong and, where it helps, what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Input data that does not have the expected structure.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// What was being parsed (e.g. "TDX quote", "TDVF metadata").
        what: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// A well-formed input of a version or kind this crate does not handle.
    #[error("unsupported {what}: {reason}")]
    Unsupported {
        /// What was being parsed.
        what: &'static str,
        /// Which version/kind and what is supported.
        reason: String,
    },
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A missing or inconsistent user input (launch configuration, option values).
    #[error("{0}")]
    Input(String),
}

/// Convenience alias.
pub type Result<T> = std::result::Result<T, Error>;

/// Read a whole file, with the path in the error.
pub fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// A 48-byte measurement register value or SHA-384 digest. Serialises as lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mr(pub [u8; 48]);

impl Mr {
    /// All zeros: the initial value of every RTMR.
    pub const ZERO: Mr = Mr([0u8; 48]);

    /// Parse 96 hex digits.
    pub fn from_hex(s: &str) -> Result<Mr> {
        let v = hex::decode(s.trim()).map_err(|e| Error::Input(format!("bad hex {s:?}: {e}")))?;
        let arr: [u8; 48] = v.try_into().map_err(|v: Vec<u8>| {
            Error::Input(format!(
                "expected 48 bytes (96 hex digits), got {} bytes",
                v.len()
            ))
        })?;
        Ok(Mr(arr))
    }

    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for Mr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Mr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mr({})", self.to_hex())
    }
}

impl Serialize for Mr {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Mr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Mr::from_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// SHA-384 of `data`.
pub fn sha384(data: &[u8]) -> Mr {
    Mr(Sha384::digest(data).into())
}

/// One RTMR extend: `SHA384(old || digest)`.
pub fn extend(old: &Mr, digest: &Mr) -> Mr {
    let mut h = Sha384::new();
    h.update(old.0);
    h.update(digest.0);
    Mr(h.finalize().into())
}

/// Replay a list of event digests from the zero register.
pub fn replay_digests<'a>(digests: impl IntoIterator<Item = &'a Mr>) -> Mr {
    digests.into_iter().fold(Mr::ZERO, |acc, d| extend(&acc, d))
}

/// UTF-16LE encoding of a string (no terminator).
pub fn utf16le(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(|u| u.to_le_bytes()).collect()
}

/// Binary (mixed-endian, as UEFI stores it) form of a GUID string `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
/// Returns `None` for a malformed string.
pub fn guid_bytes(s: &str) -> Option<[u8; 16]> {
    let parts: Vec<&str> = s.split('-').collect();
    if parts.len() != 5 {
        return None;
    }
    let mut out = Vec::with_capacity(16);
    for (i, p) in parts.iter().enumerate() {
        let raw = hex::decode(p).ok()?;
        if i <= 2 {
            out.extend(raw.iter().rev());
        } else {
            out.extend_from_slice(&raw);
        }
    }
    out.try_into().ok()
}

/// GUID string (lowercase) from its UEFI binary form.
pub fn guid_string(b: &[u8; 16]) -> String {
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{}-{}",
        b[3],
        b[2],
        b[1],
        b[0],
        b[5],
        b[4],
        b[7],
        b[6],
        hex::encode(&b[8..10]),
        hex::encode(&b[10..16])
    )
}

/// Parse a memory size like `1G`, `1024M`, `2GiB`, `512MiB`, `4096K` or plain bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let digits_end = lower
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(lower.len());
    let (num, unit) = lower.split_at(digits_end);
    let n: u64 = num.parse().map_err(|_| {
        Error::Input(format!(
            "bad size {s:?}: expected a number with an optional unit, e.g. 2G or 2048M"
        ))
    })?;
    let mult: u64 = match unit.trim() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => {
            return Err(Error::Input(format!(
                "bad size unit {other:?} in {s:?}: use K, M, G or T (binary units)"
            )));
        }
    };
    n.checked_mul(mult)
        .ok_or_else(|| Error::Input(format!("size {s:?} is too large")))
}

/// Where the shared test fixtures live (tests only): `WORKER_FIXTURES_DIR` or `../../shared/fixtures`.
#[cfg(test)]
pub(crate) fn fixtures_dir() -> Option<PathBuf> {
    let p = std::env::var_os("WORKER_FIXTURES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shared/fixtures"
            ))
        });
    if p.is_dir() {
        Some(p)
    } else {
        eprintln!(
            "SKIPPED: fixtures not found at {} (set WORKER_FIXTURES_DIR)",
            p.display()
        );
        assert!(
            std::env::var_os("CI").is_none(),
            "fixtures are required when CI is set"
        );
        None
    }
}

/// Read one fixture file (tests only); `None` (with a visible SKIPPED line) when absent.
#[cfg(test)]
pub(crate) fn fixture(rel: &str) -> Option<Vec<u8>> {
    let dir = fixtures_dir()?;
    let p = dir.join(rel);
    match std::fs::read(&p) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("SKIPPED: fixture {} not found ({e})", p.display());
            assert!(
                std::env::var_os("CI").is_none(),
                "fixtures are required when CI is set"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1G").ok(), Some(1 << 30));
        assert_eq!(parse_size("1024M").ok(), Some(1 << 30));
        assert_eq!(parse_size("2GiB").ok(), Some(2 << 30));
        assert_eq!(parse_size("4096").ok(), Some(4096));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999999T").is_err());
    }

    #[test]
    fn guid_round_trip() {
        let s = "8be4df61-93ca-11d2-aa0d-00e098032b8c";
        let b = guid_bytes(s).expect("valid guid");
        assert_eq!(b[0], 0x61);
        assert_eq!(guid_string(&b), s);
        assert!(guid_bytes("nope").is_none());
    }

    #[test]
    fn replay_matches_manual_extend() {
        let d = sha384(b"x");
        let manual = extend(&Mr::ZERO, &d);
        assert_eq!(replay_digests([&d]), manual);
        assert_eq!(replay_digests(std::iter::empty()), Mr::ZERO);
    }

    #[test]
    fn oasis_measure_log_vector() {
        // Public vector (oasisprotocol/cli measureLog): one event.
        let d = Mr::from_hex("98a24811a887cc59e301bff5a3c11f118ebabbace224826e5c1365c2762f24e29c08fb03fc215ce42f9e11f7804c22f0").expect("hex");
        assert_eq!(
            replay_digests([&d]).to_hex(),
            "04d1279ff61eaa5ee548d1a3b02933efcb59d8d16f6f11eb31dc573261b1bdb5a9817a306f7509dbb4b3f6979ded7192"
        );
    }
}
