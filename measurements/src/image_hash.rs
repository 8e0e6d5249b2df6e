//! Image hashes over a TD's identity registers.
//!
//! `cocoon-v1` (Telegram's Cocoon root contract, compatibility):
//! `SHA-256(MRTD || MRCONFIGID || MROWNER || MROWNERCONFIG || RTMR0 || RTMR1 || RTMR2 || RTMR3 || 64 zero bytes)`
//! over the raw 48-byte fields (448 bytes). It does NOT cover TD_ATTRIBUTES (a DEBUG TD gets the
//! same hash) or XFAM.
//!
//! `cw-v1` (ours):
//! `SHA-256("confidential-worker/image-hash/v1\0" || MRTD || MRCONFIGID || MROWNER || MROWNERCONFIG
//!          || RTMR0 || RTMR1 || RTMR2 || TD_ATTRIBUTES || XFAM)`
//! with TD_ATTRIBUTES and XFAM as the 8 raw bytes each that the TD report carries (little-endian
//! u64). It deliberately leaves out RTMR3: RTMR3 holds per-deployment runtime events (host
//! config, model, wallet; see [`crate::rtmr3`]) that a verifier checks by replaying that log
//! against its policy, so one image has one `cw-v1` hash across all hosts. Verifiers must still
//! reject TDs with the DEBUG attribute bit regardless of any hash.

use crate::Mr;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Domain prefix of `cw-v1`.
pub const CW_V1_DOMAIN: &[u8] = b"confidential-worker/image-hash/v1\0";

/// TD_ATTRIBUTES bit 0: the TD is debuggable (its memory and state are visible to the host).
pub const TD_ATTR_DEBUG: u64 = 1;
/// TD_ATTRIBUTES bit 28: SEPT_VE_DISABLE (QEMU's default for TDX guests).
pub const TD_ATTR_SEPT_VE_DISABLE: u64 = 1 << 28;

/// The identity fields of a TD report that image hashes cover.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TdIdentity {
    /// MRTD.
    pub mrtd: Mr,
    /// MRCONFIGID.
    pub mrconfigid: Mr,
    /// MROWNER.
    pub mrowner: Mr,
    /// MROWNERCONFIG.
    pub mrownerconfig: Mr,
    /// RTMR0..3.
    pub rtmr: [Mr; 4],
    /// TD_ATTRIBUTES as a u64.
    pub td_attributes: u64,
    /// XFAM as a u64.
    pub xfam: u64,
}

/// `cocoon-v1` image hash.
pub fn cocoon_v1(id: &TdIdentity) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(id.mrtd.0);
    h.update(id.mrconfigid.0);
    h.update(id.mrowner.0);
    h.update(id.mrownerconfig.0);
    for r in &id.rtmr {
        h.update(r.0);
    }
    h.update([0u8; 64]);
    h.finalize().into()
}

/// `cw-v1` image hash.
pub fn cw_v1(id: &TdIdentity) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(CW_V1_DOMAIN);
    h.update(id.mrtd.0);
    h.update(id.mrconfigid.0);
    h.update(id.mrowner.0);
    h.update(id.mrownerconfig.0);
    for r in &id.rtmr[..3] {
        h.update(r.0);
    }
    h.update(id.td_attributes.to_le_bytes());
    h.update(id.xfam.to_le_bytes());
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sha384;

    fn id() -> TdIdentity {
        TdIdentity {
            mrtd: sha384(b"mrtd"),
            mrconfigid: Mr::ZERO,
            mrowner: Mr::ZERO,
            mrownerconfig: Mr::ZERO,
            rtmr: [sha384(b"0"), sha384(b"1"), sha384(b"2"), Mr::ZERO],
            td_attributes: TD_ATTR_SEPT_VE_DISABLE,
            xfam: 0x602e7,
        }
    }

    #[test]
    fn cocoon_v1_layout() {
        let i = id();
        let mut raw = Vec::new();
        for m in [i.mrtd, i.mrconfigid, i.mrowner, i.mrownerconfig] {
            raw.extend_from_slice(&m.0);
        }
        for r in &i.rtmr {
            raw.extend_from_slice(&r.0);
        }
        raw.extend_from_slice(&[0u8; 64]);
        assert_eq!(raw.len(), 448);
        let want: [u8; 32] = Sha256::digest(&raw).into();
        assert_eq!(cocoon_v1(&i), want);
        // The debug bit does not change cocoon-v1 but changes cw-v1.
        let mut dbg = i.clone();
        dbg.td_attributes |= TD_ATTR_DEBUG;
        assert_eq!(cocoon_v1(&dbg), cocoon_v1(&i));
        assert_ne!(cw_v1(&dbg), cw_v1(&i));
        // RTMR3 is outside cw-v1.
        let mut r3 = i.clone();
        r3.rtmr[3] = sha384(b"x");
        assert_eq!(cw_v1(&r3), cw_v1(&i));
        assert_ne!(cocoon_v1(&r3), cocoon_v1(&i));
    }
}
