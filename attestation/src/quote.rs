//! Minimal, panic-free parsing of TDX quote bodies (v4 and v5) and the Cocoon-compatible image hash.
//!
//! Only the fields the verifier needs are read: the header, the TD report (TDX 1.0, 1.5 and 1.5-ex
//! bodies) and the signature-data slice. Cryptographic checks of real quotes are done by `dcap-qvl`;
//! this module only locates fields. The `cocoon-v1` image hash computed here must stay identical to
//! the one in the `measurements` crate (the lead will make one call the other).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Length of the quote header.
pub const HEADER_LEN: usize = 48;
/// Length of a TDX 1.0 TD report body.
pub const TD_REPORT10_LEN: usize = 584;
/// Length of a TDX 1.5 TD report body.
pub const TD_REPORT15_LEN: usize = 648;
/// Length of a TDX 1.5 "ex" TD report body.
pub const TD_REPORT15_EX_LEN: usize = 885;
/// TEE type of a TDX quote.
pub const TEE_TYPE_TDX: u32 = 0x81;
/// Intel's QE vendor id (the only one real quotes carry).
pub const INTEL_QE_VENDOR_ID: [u8; 16] = [
    0x93, 0x9a, 0x72, 0x33, 0xf7, 0x9c, 0x4c, 0xa9, 0x94, 0x0a, 0x0d, 0xb3, 0x95, 0x7f, 0x06, 0x07,
];
/// TD_ATTRIBUTES bit 0 (TUD.DEBUG): the TD runs in debug mode and its memory is readable by the host.
pub const TD_ATTRIBUTES_DEBUG: u64 = 1;
/// TD_ATTRIBUTES bit 28 (SEPT_VE_DISABLE), set by every production TD.
pub const TD_ATTRIBUTES_SEPT_VE_DISABLE: u64 = 1 << 28;

/// Why a byte string is not a TDX quote this crate understands.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QuoteParseError {
    /// Fewer bytes than the layout needs.
    #[error(
        "quote is truncated: {what} needs {needed} bytes but only {available} remain; pass the complete quote file"
    )]
    Truncated {
        /// The field being read.
        what: &'static str,
        /// Bytes needed.
        needed: usize,
        /// Bytes left.
        available: usize,
    },
    /// A header version this crate does not parse.
    #[error("unsupported quote version {0}: only TDX quote versions 4 and 5 are understood")]
    UnsupportedVersion(u16),
    /// Not a TDX quote.
    #[error("unsupported TEE type {0:#x}: this is not a TDX quote (expected 0x81)")]
    NotTdx(u32),
    /// A v5 body type this crate does not parse.
    #[error("unsupported v5 body type {0}: expected 2 (TDX 1.0), 3 (TDX 1.5) or 4 (TDX 1.5 ex)")]
    UnsupportedBodyType(u16),
    /// A v5 body whose declared size does not match its type.
    #[error("v5 body type {body_type} declares {declared} bytes but that body is {expected} bytes")]
    BodySizeMismatch {
        /// Body type.
        body_type: u16,
        /// Declared size.
        declared: u32,
        /// Size the type implies.
        expected: usize,
    },
}

/// The eight 48-byte registers that identify a TD image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TdRegisters {
    /// MRTD: the initial TD memory (firmware).
    pub mrtd: [u8; 48],
    /// MRCONFIGID: host-chosen configuration id.
    pub mrconfigid: [u8; 48],
    /// MROWNER.
    pub mrowner: [u8; 48],
    /// MROWNERCONFIG.
    pub mrownerconfig: [u8; 48],
    /// RTMR0..RTMR3.
    pub rtmr: [[u8; 48]; 4],
}

impl Default for TdRegisters {
    fn default() -> Self {
        Self {
            mrtd: [0; 48],
            mrconfigid: [0; 48],
            mrowner: [0; 48],
            mrownerconfig: [0; 48],
            rtmr: [[0; 48]; 4],
        }
    }
}

impl TdRegisters {
    /// The Cocoon-compatible "cocoon-v1" image hash:
    /// `SHA-256(MRTD || MRCONFIGID || MROWNER || MROWNERCONFIG || RTMR0 || RTMR1 || RTMR2 || RTMR3 || 64 zero bytes)`.
    ///
    /// NOTE: must equal `measurements`' computation of the same hash; the lead unifies them.
    /// It does not cover TD_ATTRIBUTES (DEBUG) or XFAM, which is why the verifier checks DEBUG separately.
    pub fn image_hash_cocoon_v1(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.mrtd);
        h.update(self.mrconfigid);
        h.update(self.mrowner);
        h.update(self.mrownerconfig);
        for r in &self.rtmr {
            h.update(r);
        }
        h.update([0u8; 64]);
        h.finalize().into()
    }

    /// Hex form, for reports.
    pub fn to_hex(&self) -> RegistersHex {
        RegistersHex {
            mrtd: hex::encode(self.mrtd),
            mrconfigid: hex::encode(self.mrconfigid),
            mrowner: hex::encode(self.mrowner),
            mrownerconfig: hex::encode(self.mrownerconfig),
            rtmr0: hex::encode(self.rtmr[0]),
            rtmr1: hex::encode(self.rtmr[1]),
            rtmr2: hex::encode(self.rtmr[2]),
            rtmr3: hex::encode(self.rtmr[3]),
        }
    }
}

/// The registers as lowercase hex strings (the verdict's JSON form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistersHex {
    /// MRTD.
    pub mrtd: String,
    /// MRCONFIGID.
    pub mrconfigid: String,
    /// MROWNER.
    pub mrowner: String,
    /// MROWNERCONFIG.
    pub mrownerconfig: String,
    /// RTMR0.
    pub rtmr0: String,
    /// RTMR1.
    pub rtmr1: String,
    /// RTMR2.
    pub rtmr2: String,
    /// RTMR3.
    pub rtmr3: String,
}

/// Which TD report layout the quote carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BodyKind {
    /// TDX 1.0 report (584 bytes).
    TdReport10,
    /// TDX 1.5 report (648 bytes).
    TdReport15,
    /// TDX 1.5 "ex" report (885 bytes).
    TdReport15Ex,
}

/// The parsed parts of a TDX quote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedQuote {
    /// Quote version (4 or 5).
    pub version: u16,
    /// Attestation key type from the header.
    pub attestation_key_type: u16,
    /// QE vendor id: Intel's for real quotes, [`crate::simulated::SIMULATED_VENDOR_ID`] for simulated ones.
    pub qe_vendor_id: [u8; 16],
    /// Body layout.
    pub body: BodyKind,
    /// TEE_TCB_SVN.
    pub tee_tcb_svn: [u8; 16],
    /// MRSEAM (TDX module measurement).
    pub mr_seam: [u8; 48],
    /// TD_ATTRIBUTES, little-endian.
    pub td_attributes: u64,
    /// XFAM, little-endian.
    pub xfam: u64,
    /// MRTD, MRCONFIGID, MROWNER, MROWNERCONFIG, RTMR0-3.
    pub registers: TdRegisters,
    /// REPORTDATA (64 bytes chosen by the TD).
    pub report_data: [u8; 64],
    /// Number of bytes covered by the quote signature (header plus body, with the v5 body descriptor).
    pub signed_len: usize,
    /// The signature data (after its 4-byte length).
    pub signature_data: Vec<u8>,
}

impl ParsedQuote {
    /// True when the TD runs with the DEBUG attribute.
    pub fn is_debug(&self) -> bool {
        self.td_attributes & TD_ATTRIBUTES_DEBUG != 0
    }
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], QuoteParseError> {
        let available = self.data.len().saturating_sub(self.pos);
        if available < n {
            return Err(QuoteParseError::Truncated {
                what,
                needed: n,
                available,
            });
        }
        let s = &self.data[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, QuoteParseError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, QuoteParseError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

fn arr<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&s[..N]);
    a
}

/// Parse a TDX quote (v4, or v5 with a TD report body). Never panics.
pub fn parse_quote(bytes: &[u8]) -> Result<ParsedQuote, QuoteParseError> {
    let mut r = Reader {
        data: bytes,
        pos: 0,
    };
    let header = r.take(HEADER_LEN, "header")?;
    let version = u16::from_le_bytes([header[0], header[1]]);
    let attestation_key_type = u16::from_le_bytes([header[2], header[3]]);
    let tee_type = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    let qe_vendor_id: [u8; 16] = arr(&header[12..28]);
    if tee_type != TEE_TYPE_TDX {
        return Err(QuoteParseError::NotTdx(tee_type));
    }
    let (body_kind, body) = match version {
        4 => (
            BodyKind::TdReport10,
            r.take(TD_REPORT10_LEN, "TD report body")?,
        ),
        5 => {
            let body_type = r.u16("v5 body type")?;
            let size = r.u32("v5 body size")?;
            let (kind, expected) = match body_type {
                2 => (BodyKind::TdReport10, TD_REPORT10_LEN),
                3 => (BodyKind::TdReport15, TD_REPORT15_LEN),
                4 => (BodyKind::TdReport15Ex, TD_REPORT15_EX_LEN),
                other => return Err(QuoteParseError::UnsupportedBodyType(other)),
            };
            if size as usize != expected {
                return Err(QuoteParseError::BodySizeMismatch {
                    body_type,
                    declared: size,
                    expected,
                });
            }
            (kind, r.take(expected, "TD report body")?)
        }
        v => return Err(QuoteParseError::UnsupportedVersion(v)),
    };
    let signed_len = r.pos;
    let sig_len = r.u32("signature data length")? as usize;
    let signature_data = r.take(sig_len, "signature data")?.to_vec();
    let b = body;
    let registers = TdRegisters {
        mrtd: arr(&b[136..184]),
        mrconfigid: arr(&b[184..232]),
        mrowner: arr(&b[232..280]),
        mrownerconfig: arr(&b[280..328]),
        rtmr: [
            arr(&b[328..376]),
            arr(&b[376..424]),
            arr(&b[424..472]),
            arr(&b[472..520]),
        ],
    };
    Ok(ParsedQuote {
        version,
        attestation_key_type,
        qe_vendor_id,
        body: body_kind,
        tee_tcb_svn: arr(&b[0..16]),
        mr_seam: arr(&b[16..64]),
        td_attributes: u64::from_le_bytes(arr(&b[120..128])),
        xfam: u64::from_le_bytes(arr(&b[128..136])),
        registers,
        report_data: arr(&b[520..584]),
        signed_len,
        signature_data,
    })
}

/// Serialize a v4 TDX 1.0 quote header and body (used by the simulated TEE). The caller appends the
/// signature data.
pub(crate) fn encode_v4_signed_part(
    qe_vendor_id: &[u8; 16],
    attestation_key_type: u16,
    registers: &TdRegisters,
    td_attributes: u64,
    xfam: u64,
    report_data: &[u8; 64],
) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + TD_REPORT10_LEN);
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&attestation_key_type.to_le_bytes());
    out.extend_from_slice(&TEE_TYPE_TDX.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes()); // QE SVN
    out.extend_from_slice(&0u16.to_le_bytes()); // PCE SVN
    out.extend_from_slice(qe_vendor_id);
    out.extend_from_slice(&[0u8; 20]); // user data
    // TD report 1.0
    out.extend_from_slice(&[0u8; 16]); // TEE_TCB_SVN
    out.extend_from_slice(&[0u8; 48]); // MRSEAM
    out.extend_from_slice(&[0u8; 48]); // MRSIGNERSEAM
    out.extend_from_slice(&[0u8; 8]); // SEAMATTRIBUTES
    out.extend_from_slice(&td_attributes.to_le_bytes());
    out.extend_from_slice(&xfam.to_le_bytes());
    out.extend_from_slice(&registers.mrtd);
    out.extend_from_slice(&registers.mrconfigid);
    out.extend_from_slice(&registers.mrowner);
    out.extend_from_slice(&registers.mrownerconfig);
    for r in &registers.rtmr {
        out.extend_from_slice(r);
    }
    out.extend_from_slice(report_data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cocoon_v1_hash_of_zero_registers_is_sha256_of_448_zero_bytes() {
        let expect: [u8; 32] = Sha256::digest([0u8; 448]).into();
        assert_eq!(TdRegisters::default().image_hash_cocoon_v1(), expect);
    }

    #[test]
    fn cocoon_v1_hash_orders_fields() {
        let mut a = TdRegisters::default();
        a.mrtd[0] = 1;
        let mut b = TdRegisters::default();
        b.rtmr[3][0] = 1;
        assert_ne!(a.image_hash_cocoon_v1(), b.image_hash_cocoon_v1());
        let mut buf = vec![0u8; 448];
        buf[0] = 1;
        let expect: [u8; 32] = Sha256::digest(&buf).into();
        assert_eq!(a.image_hash_cocoon_v1(), expect);
    }

    #[test]
    fn encode_then_parse_round_trips() {
        let mut regs = TdRegisters {
            mrtd: [7; 48],
            ..TdRegisters::default()
        };
        regs.rtmr[2] = [9; 48];
        let mut signed = encode_v4_signed_part(&[1; 16], 2, &regs, 0x1000_0001, 0xe7, &[5; 64]);
        signed.extend_from_slice(&3u32.to_le_bytes());
        signed.extend_from_slice(&[1, 2, 3]);
        let q = parse_quote(&signed).expect("parse");
        assert_eq!(q.version, 4);
        assert_eq!(q.registers, regs);
        assert_eq!(q.report_data, [5; 64]);
        assert!(q.is_debug());
        assert_eq!(q.xfam, 0xe7);
        assert_eq!(q.signed_len, HEADER_LEN + TD_REPORT10_LEN);
        assert_eq!(q.signature_data, vec![1, 2, 3]);
    }

    #[test]
    fn truncated_and_foreign_inputs_are_errors() {
        assert!(matches!(
            parse_quote(&[0u8; 10]),
            Err(QuoteParseError::Truncated { .. })
        ));
        let mut h = vec![0u8; 48];
        h[0] = 4;
        assert_eq!(parse_quote(&h), Err(QuoteParseError::NotTdx(0)));
        h[4] = 0x81;
        h[0] = 3;
        assert_eq!(parse_quote(&h), Err(QuoteParseError::UnsupportedVersion(3)));
    }
}
