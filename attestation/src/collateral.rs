//! Collateral (Intel TCB info, QE identity, CRLs and their issuer chains) for quote verification.
//!
//! The JSON format is dcap-qvl's `QuoteCollateralV3` (the fixtures' `*_collateral.json`): strings for
//! PEM chains and JSON documents, hex strings for DER CRLs and signatures. Verification is fully
//! offline: [`FileCollateral`] loads and parses a file once and hands out the cached value.
//! [`PccsCollateral`] (module [`pccs`]) fetches it from a PCS/PCCS URL for each quote's FMSPC,
//! caches it on disk, and can run from that cache alone (offline).

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use dcap_qvl::QuoteCollateralV3;

pub mod pccs;
pub use pccs::{CollateralKey, PccsCollateral, PccsConfig, PckCa};

/// Why collateral could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum CollateralError {
    /// File unreadable.
    #[error(
        "cannot read collateral file {path}: {source}; pass --collateral with a JSON file in dcap-qvl's QuoteCollateralV3 format"
    )]
    Read {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// Not the expected JSON.
    #[error("collateral file {path} is not dcap-qvl QuoteCollateralV3 JSON: {detail}")]
    Format {
        /// File.
        path: String,
        /// Detail.
        detail: String,
    },
    /// No collateral for this quote.
    #[error("no collateral available: {0}")]
    Missing(String),
    /// A PCS/PCCS request failed or answered something unusable.
    #[error(
        "fetching collateral from {url} failed: {detail}; check --pccs-url (a PCCS or Intel's PCS, v4 API) and the network, or verify offline with --collateral FILE"
    )]
    Fetch {
        /// The request.
        url: String,
        /// What went wrong.
        detail: String,
    },
}

/// Parse collateral JSON.
pub fn parse_collateral_json(
    text: &str,
    origin: &str,
) -> Result<QuoteCollateralV3, CollateralError> {
    serde_json::from_str(text).map_err(|e| CollateralError::Format {
        path: origin.to_owned(),
        detail: e.to_string(),
    })
}

/// A source of collateral for a given quote.
pub trait CollateralSource: Send + Sync + std::fmt::Debug {
    /// Collateral to verify `raw_quote` with.
    fn collateral_for(&self, raw_quote: &[u8]) -> Result<Arc<QuoteCollateralV3>, CollateralError>;
}

/// Collateral loaded once from a JSON file (or given in memory) and returned for every quote.
#[derive(Debug, Clone)]
pub struct FileCollateral {
    path: Option<PathBuf>,
    collateral: Arc<QuoteCollateralV3>,
}

impl FileCollateral {
    /// Load and parse `path`.
    pub fn load(path: &Path) -> Result<Self, CollateralError> {
        let text = std::fs::read_to_string(path).map_err(|source| CollateralError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Ok(Self {
            path: Some(path.to_owned()),
            collateral: Arc::new(parse_collateral_json(&text, &path.display().to_string())?),
        })
    }

    /// Wrap an already parsed collateral.
    pub fn from_collateral(collateral: QuoteCollateralV3) -> Self {
        Self {
            path: None,
            collateral: Arc::new(collateral),
        }
    }

    /// The file it came from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }
}

impl CollateralSource for FileCollateral {
    fn collateral_for(&self, _raw_quote: &[u8]) -> Result<Arc<QuoteCollateralV3>, CollateralError> {
        Ok(self.collateral.clone())
    }
}

/// A source with no collateral: only simulated evidence can be verified with it.
#[derive(Debug, Clone, Default)]
pub struct NoCollateral;

impl CollateralSource for NoCollateral {
    fn collateral_for(&self, _raw_quote: &[u8]) -> Result<Arc<QuoteCollateralV3>, CollateralError> {
        Err(CollateralError::Missing(
            "this verifier has no collateral source; pass a collateral file".to_owned(),
        ))
    }
}

/// The validity window of a collateral's signed JSON documents (TCB info and QE identity):
/// `(latest issueDate, earliest nextUpdate)` in Unix seconds. CRL and certificate validity is checked
/// by dcap-qvl on top of this.
pub fn collateral_window(c: &QuoteCollateralV3) -> Result<(u64, u64), String> {
    let mut nb = 0u64;
    let mut na = u64::MAX;
    for (name, doc) in [("tcb_info", &c.tcb_info), ("qe_identity", &c.qe_identity)] {
        let v: serde_json::Value =
            serde_json::from_str(doc).map_err(|e| format!("{name} is not JSON: {e}"))?;
        let issue = v
            .get("issueDate")
            .and_then(|x| x.as_str())
            .ok_or_else(|| format!("{name} has no issueDate"))?;
        let next = v
            .get("nextUpdate")
            .and_then(|x| x.as_str())
            .ok_or_else(|| format!("{name} has no nextUpdate"))?;
        nb = nb.max(parse_rfc3339(issue).map_err(|e| format!("{name} issueDate: {e}"))?);
        na = na.min(parse_rfc3339(next).map_err(|e| format!("{name} nextUpdate: {e}"))?);
    }
    Ok((nb, na))
}

/// Parse an RFC 3339 time to Unix seconds (times before 1970 are an error).
pub fn parse_rfc3339(s: &str) -> Result<u64, String> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("{s:?} is not an RFC 3339 time (like 2025-07-01T00:00:00Z): {e}"))?;
    u64::try_from(t.unix_timestamp()).map_err(|_| format!("{s:?} is before 1970"))
}

/// Format Unix seconds as RFC 3339.
pub fn format_rfc3339(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| secs.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trip() {
        let s = parse_rfc3339("2025-06-19T10:32:27Z").expect("parse");
        assert_eq!(s, 1_750_329_147);
        assert_eq!(format_rfc3339(s), "2025-06-19T10:32:27Z");
        assert!(parse_rfc3339("yesterday").is_err());
    }

    #[test]
    fn bad_json_is_a_format_error() {
        assert!(matches!(
            parse_collateral_json("{}", "x"),
            Err(CollateralError::Format { .. })
        ));
        assert!(NoCollateral.collateral_for(&[]).is_err());
    }
}
