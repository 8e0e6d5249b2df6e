//! 256-bit hashes as the root contract stores them (`uint256`, big-endian), and their lists.

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// A 32-byte hash (image hash, model hash or proxy hash).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash256(pub [u8; 32]);

impl Hash256 {
    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The value as a toncenter stack number (`0x` + hex).
    pub fn to_stack_hex(&self) -> String {
        format!("0x{}", self.to_hex())
    }
}

impl fmt::Debug for Hash256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hash256({})", self.to_hex())
    }
}

impl fmt::Display for Hash256 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl FromStr for Hash256 {
    type Err = Error;

    fn from_str(input: &str) -> Result<Self, Error> {
        let s = input.trim();
        let s = s
            .strip_prefix("0x")
            .or_else(|| s.strip_prefix("0X"))
            .unwrap_or(s);
        let invalid = |reason: String| Error::InvalidHash {
            input: input.to_string(),
            reason,
        };
        if s.len() != 64 {
            return Err(invalid(format!("{} hex characters, expected 64", s.len())));
        }
        let bytes = hex::decode(s).map_err(|e| invalid(e.to_string()))?;
        let mut out = [0u8; 32];
        out.copy_from_slice(&bytes);
        Ok(Hash256(out))
    }
}

/// Which list of the root contract a hash belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashKind {
    /// Worker image hashes (`worker_hashes`).
    Image,
    /// Model hashes (`model_hashes`).
    Model,
    /// Proxy image hashes (`proxy_hashes`).
    Proxy,
}

impl HashKind {
    /// The get-method that answers -1 when a hash is listed, 0 otherwise.
    pub fn get_method(self) -> &'static str {
        match self {
            HashKind::Image => "worker_hash_is_valid",
            HashKind::Model => "model_hash_is_valid",
            HashKind::Proxy => "proxy_hash_is_valid",
        }
    }

    /// A word for messages.
    pub fn noun(self) -> &'static str {
        match self {
            HashKind::Image => "image hash",
            HashKind::Model => "model hash",
            HashKind::Proxy => "proxy image hash",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_hex_with_and_without_prefix() {
        let h: Hash256 = "0x00000000000000000000000000000000000000000000000000000000000000ff"
            .parse()
            .expect("valid");
        assert_eq!(h.0[31], 0xff);
        let again: Hash256 = h.to_hex().parse().expect("valid");
        assert_eq!(again, h);
        assert_eq!(h.to_stack_hex().len(), 66);
    }

    #[test]
    fn rejects_wrong_length_and_non_hex() {
        let e = "abcd".parse::<Hash256>().expect_err("short");
        assert!(
            e.to_string().contains("4 hex characters, expected 64"),
            "{e}"
        );
        let e = "zz".repeat(32).parse::<Hash256>().expect_err("not hex");
        assert!(e.to_string().contains("invalid hash"), "{e}");
        // A SHA-384 (96 hex chars) is a classic mistake: say how long it was.
        let e = "ab".repeat(48).parse::<Hash256>().expect_err("sha384");
        assert!(e.to_string().contains("96 hex characters"), "{e}");
    }
}
