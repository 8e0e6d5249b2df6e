//! Image-hash allow-lists: a JSON file of hex hashes ([`StaticAllowList`]), or the root contract
//! (`ton_root::RootAllowList`, over its `worker_hash_is_valid` get-method, plugged in by
//! `host-launcher verify-quote --root`).

use std::collections::BTreeSet;
use std::path::Path;

/// Why an allow-list could not be loaded or consulted.
#[derive(Debug, thiserror::Error)]
pub enum AllowListError {
    /// The file could not be read.
    #[error("cannot read allow-list {path}: {source}; pass an existing JSON file")]
    Read {
        /// File.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not a JSON list of 64-hex-digit hashes.
    #[error("allow-list {path} is not a JSON array of 64-hex-digit SHA-256 hashes: {detail}")]
    Format {
        /// File.
        path: String,
        /// Detail.
        detail: String,
    },
    /// A remote source failed.
    #[error("allow-list source unavailable: {0}")]
    Unavailable(String),
}

/// Something that says whether an image hash (32 bytes; `cw-v1` by default, `cocoon-v1` when the
/// verifier is configured with [`crate::verify::ImageHashKind::CocoonV1`]) is approved.
pub trait AllowList: Send + Sync + std::fmt::Debug {
    /// Whether `image_hash` is approved.
    fn contains(&self, image_hash: &[u8; 32]) -> Result<bool, AllowListError>;
}

/// An in-memory set loaded from a JSON file: `["<64 hex>", ...]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StaticAllowList {
    hashes: BTreeSet<[u8; 32]>,
}

impl StaticAllowList {
    /// From hashes.
    pub fn new(hashes: impl IntoIterator<Item = [u8; 32]>) -> Self {
        Self {
            hashes: hashes.into_iter().collect(),
        }
    }

    /// Parse the JSON form (`path` is only used in messages).
    pub fn from_json(text: &str, path: &str) -> Result<Self, AllowListError> {
        let fmt = |detail: String| AllowListError::Format {
            path: path.to_owned(),
            detail,
        };
        let items: Vec<String> = serde_json::from_str(text).map_err(|e| fmt(e.to_string()))?;
        let mut hashes = BTreeSet::new();
        for item in items {
            let bytes = hex::decode(item.trim().trim_start_matches("0x"))
                .map_err(|e| fmt(format!("{item:?}: {e}")))?;
            let arr: [u8; 32] = bytes
                .try_into()
                .map_err(|_| fmt(format!("{item:?} is not 32 bytes")))?;
            hashes.insert(arr);
        }
        Ok(Self { hashes })
    }

    /// Load from a file.
    pub fn from_file(path: &Path) -> Result<Self, AllowListError> {
        let text = std::fs::read_to_string(path).map_err(|source| AllowListError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text, &path.display().to_string())
    }
}

impl AllowList for StaticAllowList {
    fn contains(&self, image_hash: &[u8; 32]) -> Result<bool, AllowListError> {
        Ok(self.hashes.contains(image_hash))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hex_list_and_rejects_bad_entries() {
        let h = "ab".repeat(32);
        let l = StaticAllowList::from_json(&format!("[\"{h}\"]"), "x").expect("parse");
        assert!(l.contains(&[0xab; 32]).expect("ok"));
        assert!(!l.contains(&[0; 32]).expect("ok"));
        assert!(StaticAllowList::from_json("[\"abcd\"]", "x").is_err());
        assert!(StaticAllowList::from_json("{}", "x").is_err());
    }
}
