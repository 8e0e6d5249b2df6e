//! The host config: read once, hashed, (later) measured, then parsed.
//!
//! The host hands the guest a [`worker_api::HostConfig`] through the QEMU fw_cfg file
//! [`worker_api::HOST_CONFIG_FW_CFG_NAME`]. The host is not trusted in a TD, so the agent keeps the
//! **exact bytes** it received and computes their SHA-384: that hash is what a verifier compares
//! with the config it expects. [`load_measured_config`] is the single place where the config enters
//! the guest; right after it, before anything is served, the agent measures the exact bytes
//! ([`MeasuredConfig::measured_bytes`]) into RTMR3 as the `host_config` event and the events derived
//! from them (see [`crate::attest`] and `measurements::rtmr3`). Nothing else in the agent may read
//! the fw_cfg file.
//!
//! A malformed config (bad JSON, unknown field, or a field the RTMR3 events are derived from that
//! `measurements::rtmr3::RuntimeInputs` refuses — model digest, `client_auth` pins) is not fatal:
//! it is logged, reported in `/health` with its hash and the parse error, and the agent runs as
//! if no config had been given (its RTMR3 log then has no `client_auth` event either, so the log
//! still shows what the listener enforces).

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha384};
use worker_api::{HostConfig, HostConfigStatus};

/// Largest host config the agent accepts; anything bigger is reported as an error, not read whole.
pub const MAX_HOST_CONFIG_BYTES: u64 = 64 * 1024;

/// What the agent got from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeasuredConfig {
    /// No fw_cfg file of that name: the host supplied no config.
    Absent,
    /// The file exists but reading it failed (so nothing was hashed).
    Unreadable { error: String },
    /// Bytes were received and hashed.
    Received {
        /// The exact bytes received.
        raw: Vec<u8>,
        /// SHA-384 of `raw`, lowercase hex (what gets measured).
        sha384: String,
        /// The parsed config, or why parsing failed.
        parsed: Result<HostConfig, String>,
    },
}

impl MeasuredConfig {
    /// The config to act on: `Some` only when bytes were received and parsed.
    pub fn config(&self) -> Option<&HostConfig> {
        match self {
            MeasuredConfig::Received { parsed: Ok(c), .. } => Some(c),
            _ => None,
        }
    }

    /// The bytes measured into RTMR3: the exact bytes received, or `None` when no config was
    /// supplied or it could not be read (measured as an empty config).
    pub fn measured_bytes(&self) -> Option<&[u8]> {
        match self {
            MeasuredConfig::Received { raw, .. } => Some(raw),
            _ => None,
        }
    }

    /// The `/health` view of this config.
    pub fn status(&self) -> Option<HostConfigStatus> {
        match self {
            MeasuredConfig::Absent => None,
            MeasuredConfig::Unreadable { error } => Some(HostConfigStatus {
                sha384: String::new(),
                error: Some(error.clone()),
            }),
            MeasuredConfig::Received { sha384, parsed, .. } => Some(HostConfigStatus {
                sha384: sha384.clone(),
                error: parsed.as_ref().err().cloned(),
            }),
        }
    }

    /// One human-readable line for the console log.
    pub fn describe(&self) -> String {
        match self {
            MeasuredConfig::Absent => "no host config supplied (fw_cfg file absent)".into(),
            MeasuredConfig::Unreadable { error } => format!("host config unreadable: {error}"),
            MeasuredConfig::Received {
                raw,
                sha384,
                parsed: Ok(_),
            } => format!("host config: {} bytes, sha384 {sha384}", raw.len()),
            MeasuredConfig::Received {
                raw,
                sha384,
                parsed: Err(e),
            } => format!(
                "error: host config malformed ({} bytes, sha384 {sha384}), ignoring it: {e}",
                raw.len()
            ),
        }
    }
}

/// SHA-384 of `bytes`, lowercase hex.
pub fn sha384_hex(bytes: &[u8]) -> String {
    hex::encode(Sha384::digest(bytes))
}

/// Hashes and parses the exact bytes the host supplied (pure; no I/O).
pub fn measure_bytes(raw: Vec<u8>) -> MeasuredConfig {
    let sha384 = sha384_hex(&raw);
    let parsed = serde_json::from_slice::<HostConfig>(&raw)
        .map_err(|e| {
            format!("not a valid host config ({e}); the host must send worker_api::HostConfig JSON")
        })
        .and_then(|c| {
            // The fields RTMR3 events are derived from (model digest, client_auth pins) must
            // be valid too: a config is used only as it was measured.
            measurements::rtmr3::RuntimeInputs::from_host_config(&raw)
                .map(|_| c)
                .map_err(|e| format!("host config rejected: {e}"))
        });
    MeasuredConfig::Received {
        raw,
        sha384,
        parsed,
    }
}

/// Reads the host config from the fw_cfg sysfs file `raw_path` (normally
/// [`crate::paths::Paths::host_config_raw`]), keeps the exact bytes and hashes them.
///
/// The caller measures the result into RTMR3 ([`crate::attest::Attestor::setup`]) before it acts
/// on the config, so that no unmeasured config is ever used.
pub fn load_measured_config(raw_path: &Path) -> MeasuredConfig {
    let file = match std::fs::File::open(raw_path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return MeasuredConfig::Absent,
        Err(e) => {
            return MeasuredConfig::Unreadable {
                error: format!("cannot open {}: {e}", raw_path.display()),
            };
        }
    };
    let mut raw = Vec::new();
    // Read one byte past the limit to detect oversize files without reading them whole.
    if let Err(e) = file.take(MAX_HOST_CONFIG_BYTES + 1).read_to_end(&mut raw) {
        return MeasuredConfig::Unreadable {
            error: format!("cannot read {}: {e}", raw_path.display()),
        };
    }
    if raw.len() as u64 > MAX_HOST_CONFIG_BYTES {
        return MeasuredConfig::Unreadable {
            error: format!(
                "{} is larger than {MAX_HOST_CONFIG_BYTES} bytes; the host must send a small JSON HostConfig",
                raw_path.display()
            ),
        };
    }
    measure_bytes(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha384_of_empty_input_is_the_known_value() {
        assert_eq!(
            sha384_hex(b""),
            "38b060a751ac96384cd9327eb1b1e36a21fdb71114be07434c0cc7bf63f6e1da274edebfe76f65fbd51ad2f14898b95b"
        );
    }

    #[test]
    fn valid_config_is_hashed_over_exact_bytes_and_parsed() {
        let cfg = HostConfig {
            model: Some("smollm2-135m".into()),
            ..HostConfig::default()
        };
        let bytes = cfg.to_canonical_json();
        let m = measure_bytes(bytes.clone());
        assert_eq!(m.config(), Some(&cfg));
        let status = m.status().expect("status");
        assert_eq!(status.sha384, sha384_hex(&bytes));
        assert_eq!(status.error, None);

        // The same config with different whitespace is a different measurement.
        let mut spaced = bytes.clone();
        spaced.push(b'\n');
        let m2 = measure_bytes(spaced);
        assert_eq!(m2.config(), Some(&cfg));
        assert_ne!(m2.status().expect("status").sha384, status.sha384);
    }

    #[test]
    fn unknown_field_is_reported_not_used() {
        let raw = br#"{"modle":"x"}"#.to_vec();
        let m = measure_bytes(raw.clone());
        assert_eq!(m.config(), None);
        let status = m.status().expect("status");
        assert_eq!(status.sha384, sha384_hex(&raw));
        let err = status.error.expect("error");
        assert!(err.contains("unknown field"), "{err}");
        assert!(m.describe().starts_with("error: host config malformed"));
    }

    #[test]
    fn malformed_client_auth_is_reported_not_used() {
        let raw = br#"{"model":null,"client_auth":{"cert_sha256":["abc"]}}"#.to_vec();
        let m = measure_bytes(raw.clone());
        assert_eq!(m.config(), None);
        let err = m.status().and_then(|s| s.error).expect("error");
        assert!(err.contains("client_auth"), "{err}");
        // Its RTMR3 log then carries no client_auth event: what is measured is what is enforced
        // (an agent without a config admits any client).
        let ev = attestation::runtime::expected_events(m.measured_bytes());
        assert!(ev.iter().all(|e| e.event_type != "client_auth"));
        let good = format!(
            r#"{{"model":null,"client_auth":{{"cert_sha256":["{}"]}}}}"#,
            "ab".repeat(32)
        );
        let m = measure_bytes(good.into_bytes());
        assert!(m.config().and_then(|c| c.client_auth.as_ref()).is_some());
    }

    #[test]
    fn absent_file_means_no_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let m = load_measured_config(&dir.path().join("missing/raw"));
        assert_eq!(m, MeasuredConfig::Absent);
        assert_eq!(m.status(), None);
    }

    #[test]
    fn file_is_read_exactly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raw");
        let raw = br#"{"payout_wallet":"EQabc"}"#;
        std::fs::write(&path, raw).expect("write");
        match load_measured_config(&path) {
            MeasuredConfig::Received {
                raw: got,
                sha384,
                parsed,
            } => {
                assert_eq!(got, raw);
                assert_eq!(sha384, sha384_hex(raw));
                assert_eq!(
                    parsed.expect("parsed").payout_wallet.as_deref(),
                    Some("EQabc")
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn oversize_file_is_rejected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raw");
        std::fs::write(&path, vec![b' '; MAX_HOST_CONFIG_BYTES as usize + 1]).expect("write");
        match load_measured_config(&path) {
            MeasuredConfig::Unreadable { error } => assert!(error.contains("larger than")),
            other => panic!("unexpected {other:?}"),
        }
    }
}
