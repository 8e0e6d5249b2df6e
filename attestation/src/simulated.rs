//! A simulated TEE for machines without TDX: quote-shaped evidence, clearly marked, that only a
//! verifier with `Policy::allow_simulated` (and the simulator's public key) accepts.
//!
//! Format (distinct from anything Intel signs, verified by this crate's own code, not by dcap-qvl):
//! a v4 TDX quote layout (48-byte header + 584-byte TDX 1.0 TD report with the caller's registers,
//! TD_ATTRIBUTES and REPORTDATA) whose header carries QE vendor id [`SIMULATED_VENDOR_ID`]
//! (`"SIMULATED-TEE-v1"`) and attestation key type [`SIMULATED_KEY_TYPE`], followed by signature data
//! `magic (16) || Ed25519 public key (32) || Ed25519 signature (64) over header||body`.
//! dcap-qvl rejects such a quote ("Unknown QE vendor ID"), so it can never pass as real evidence.
//!
//! Choice: a dcap-qvl-verifiable simulated chain (test root CA, PCK leaf with Intel's SGX extension,
//! signed TCB info / QE identity JSON, CRLs, QE report) was judged too large for the time available;
//! this design keeps the quote layout and register semantics so every caller path is exercised.

use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use crate::quote::{
    ParsedQuote, TD_ATTRIBUTES_DEBUG, TD_ATTRIBUTES_SEPT_VE_DISABLE, TdRegisters,
    encode_v4_signed_part,
};

/// QE vendor id marking simulated evidence.
pub const SIMULATED_VENDOR_ID: [u8; 16] = *b"SIMULATED-TEE-v1";
/// Attestation key type marking simulated evidence ("SI").
pub const SIMULATED_KEY_TYPE: u16 = 0x4953;
/// Magic at the start of the simulated signature data.
pub const SIMULATED_SIG_MAGIC: [u8; 16] = *b"SIMULATED-SIG-v1";
/// XFAM of a typical TD (x87, SSE, AVX, AVX-512 state, PKRU...).
pub const DEFAULT_XFAM: u64 = 0x0006_1ae7;

/// Errors of the simulated TEE.
#[derive(Debug, thiserror::Error)]
pub enum SimulatedError {
    /// Key generation or loading failed.
    #[error("simulated TEE key error: {0}")]
    Key(String),
}

/// A software stand-in for a TD's quoting path. Not a TEE: anything it signs proves nothing about
/// hardware; it exists so the whole RA-TLS stack runs where TDX is not available.
pub struct SimulatedTee {
    key: Ed25519KeyPair,
    registers: TdRegisters,
    td_attributes: u64,
    xfam: u64,
}

impl std::fmt::Debug for SimulatedTee {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimulatedTee")
            .field("public_key", &hex::encode(self.public_key()))
            .field("td_attributes", &format_args!("{:#x}", self.td_attributes))
            .finish()
    }
}

impl SimulatedTee {
    /// A simulator with a deterministic signing key from `seed` and the given registers (pass the
    /// ones `measurements` computes for the image). TD_ATTRIBUTES = SEPT_VE_DISABLE (a production TD).
    pub fn from_seed(seed: &[u8; 32], registers: TdRegisters) -> Result<Self, SimulatedError> {
        let key = Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|e| SimulatedError::Key(e.to_string()))?;
        Ok(Self {
            key,
            registers,
            td_attributes: TD_ATTRIBUTES_SEPT_VE_DISABLE,
            xfam: DEFAULT_XFAM,
        })
    }

    /// A simulator with a fresh random key.
    pub fn generate(registers: TdRegisters) -> Result<Self, SimulatedError> {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|e| SimulatedError::Key(e.to_string()))?;
        let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
            .map_err(|e| SimulatedError::Key(e.to_string()))?;
        Ok(Self {
            key,
            registers,
            td_attributes: TD_ATTRIBUTES_SEPT_VE_DISABLE,
            xfam: DEFAULT_XFAM,
        })
    }

    /// Report these TD_ATTRIBUTES and XFAM (use the values the image's measurements assume, so
    /// that the `cw-v1` image hash, which covers both, matches).
    pub fn with_attributes(mut self, td_attributes: u64, xfam: u64) -> Self {
        self.td_attributes = td_attributes;
        self.xfam = xfam;
        self
    }

    /// Set or clear the DEBUG attribute (to test that verifiers reject debug TDs).
    pub fn with_debug(mut self, debug: bool) -> Self {
        if debug {
            self.td_attributes |= TD_ATTRIBUTES_DEBUG;
        } else {
            self.td_attributes &= !TD_ATTRIBUTES_DEBUG;
        }
        self
    }

    /// The simulator's public key: give it to verifiers as a trusted simulated key.
    pub fn public_key(&self) -> [u8; 32] {
        let mut pk = [0u8; 32];
        pk.copy_from_slice(self.key.public_key().as_ref());
        pk
    }

    /// The registers it reports.
    pub fn registers(&self) -> &TdRegisters {
        &self.registers
    }

    /// Produce simulated quote bytes binding `report_data`.
    pub fn quote(&self, report_data: &[u8; 64]) -> Vec<u8> {
        let mut q = encode_v4_signed_part(
            &SIMULATED_VENDOR_ID,
            SIMULATED_KEY_TYPE,
            &self.registers,
            self.td_attributes,
            self.xfam,
            report_data,
        );
        let sig = self.key.sign(&q);
        let sig_len = (SIMULATED_SIG_MAGIC.len() + 32 + 64) as u32;
        q.extend_from_slice(&sig_len.to_le_bytes());
        q.extend_from_slice(&SIMULATED_SIG_MAGIC);
        q.extend_from_slice(&self.public_key());
        q.extend_from_slice(sig.as_ref());
        q
    }
}

/// Whether a parsed quote claims to be simulated (its vendor id is the simulated marker).
pub fn is_simulated(q: &ParsedQuote) -> bool {
    q.qe_vendor_id == SIMULATED_VENDOR_ID
}

/// Check a simulated quote's signature against trusted simulator keys. Returns the signing key.
pub fn verify_simulated(
    raw: &[u8],
    q: &ParsedQuote,
    trusted_keys: &[[u8; 32]],
) -> Result<[u8; 32], String> {
    if q.attestation_key_type != SIMULATED_KEY_TYPE {
        return Err(format!(
            "attestation key type {:#x} is not the simulated one",
            q.attestation_key_type
        ));
    }
    let s = &q.signature_data;
    if s.len() != 16 + 32 + 64 || s[..16] != SIMULATED_SIG_MAGIC {
        return Err("signature data is not in the simulated format".to_owned());
    }
    let mut pk = [0u8; 32];
    pk.copy_from_slice(&s[16..48]);
    if !trusted_keys.contains(&pk) {
        return Err(format!(
            "simulated quote signed by untrusted key {}; add the simulator's public key to the verifier",
            hex::encode(pk)
        ));
    }
    let signed = raw
        .get(..q.signed_len)
        .ok_or_else(|| "quote shorter than its signed part".to_owned())?;
    UnparsedPublicKey::new(&ED25519, pk)
        .verify(signed, &s[48..])
        .map_err(|_| "simulated quote signature does not verify (quote altered?)".to_owned())?;
    Ok(pk)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quote::parse_quote;

    #[test]
    fn simulated_quote_parses_and_verifies_and_detects_tampering() {
        let mut regs = TdRegisters::default();
        regs.rtmr[1] = [3; 48];
        let tee = SimulatedTee::from_seed(&[1; 32], regs).expect("tee");
        let raw = tee.quote(&[9; 64]);
        let q = parse_quote(&raw).expect("parse");
        assert!(is_simulated(&q));
        assert!(!q.is_debug());
        assert_eq!(q.registers, regs);
        assert_eq!(q.report_data, [9; 64]);
        assert_eq!(
            verify_simulated(&raw, &q, &[tee.public_key()]).expect("ok"),
            tee.public_key()
        );
        assert!(verify_simulated(&raw, &q, &[[0; 32]]).is_err());
        let mut bad = raw.clone();
        bad[200] ^= 1;
        let qb = parse_quote(&bad).expect("parse");
        assert!(verify_simulated(&bad, &qb, &[tee.public_key()]).is_err());
    }

    #[test]
    fn debug_flag_is_set_in_quote() {
        let tee = SimulatedTee::generate(TdRegisters::default())
            .expect("tee")
            .with_debug(true);
        let q = parse_quote(&tee.quote(&[0; 64])).expect("parse");
        assert!(q.is_debug());
    }
}
