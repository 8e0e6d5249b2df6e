//! GPU evidence in RA-TLS: NVIDIA Hopper confidential-computing attestation reports, carried in
//! the certificate extension [`OID_GPU`] (`1.3.6.1.4.1.12345.3`) and verified on the client side.
//!
//! # What the GPU gives
//!
//! Through NVML (`nvmlDeviceGetConfComputeGpuAttestationReport` with a 32-byte nonce, and
//! `nvmlDeviceGetConfComputeGpuCertificate`) the agent gets, per GPU:
//!
//! - the **attestation report**: an SPDM 1.1 (DMTF DSP0274) `GET_MEASUREMENTS` request (37 bytes:
//!   version `0x11`, code `0xE0`, param1 bit 0 "signature requested", param2 `0xFF` "all
//!   measurements", the requester's 32-byte nonce, slot id) immediately followed by the
//!   `MEASUREMENTS` response (version, code `0x60`, param1, param2, NumberOfBlocks (1), record
//!   length (3, little endian), the measurement blocks, the responder's 32-byte nonce, opaque
//!   length (2, LE), opaque data, signature). Each measurement block is index (1), measurement
//!   specification (1, must be 1 = DMTF), size (2, LE), then DMTF value type (1), value size (2,
//!   LE), value (48 bytes, SHA-384, on Hopper). The opaque data is a list of `type (2, LE) | size
//!   (2, LE) | value` fields; NVIDIA's types include 3 driver version (NUL-terminated text), 6 VBIOS
//!   version (8 bytes), 20 FWID, 36 feature flag. The signature is ECDSA P-384 over SHA-384 of
//!   `request || response-without-signature`, as raw `r || s` (96 bytes), by the GPU's attestation
//!   key;
//! - the **attestation certificate chain** (PEM, leaf first): the attestation key's certificate,
//!   the GPU's BROM/device certificate, NVIDIA provisioning/identity intermediates, and NVIDIA's
//!   "Device Identity CA" root (ECDSA P-384 with SHA-384 throughout; at most 5 certificates).
//!
//! These facts come from NVIDIA's public nvtrust local GPU verifier and DSP0274; the code here is
//! our own.
//!
//! # Binding and CC mode
//!
//! The nonce the agent asks the GPU to sign is [`gpu_nonce_for_key`]: SHA-256 of the RA-TLS
//! certificate's raw 32-byte Ed25519 public key. A report made for another key (a replayed or
//! relayed one) fails [`ReasonCode::GpuNonceMismatch`].
//!
//! The GPU does not sign its confidential-computing mode; the driver reports it
//! (`nvmlSystemGetConfComputeState`: CC feature on/off, dev-tools mode). The agent states it in
//! the extension (flags byte below). That statement is as trustworthy as the agent that made it:
//! the extension sits in a certificate signed by the RA-TLS key, which only the measured agent in
//! the TD holds (the TDX quote binds the key). Verifiers reject CC off and dev-tools mode
//! ([`ReasonCode::GpuCcModeOff`]).
//!
//! # Extension format (`1.3.6.1.4.1.12345.3`, non-critical, at most 32 KiB)
//!
//! All integers big endian:
//!
//! ```text
//! u8  format version = 1
//! u8  number of GPUs, 1..=8
//! per GPU:
//!   u8  CC flags: bit 0 CC mode on, bit 1 CC dev-tools mode; other bits 0
//!   u16 report length, then the raw NVML attestation report (SPDM request || response)
//!   u8  number of certificates, 1..=5
//!   per certificate (leaf first, root last): u16 length, DER certificate
//! ```
//!
//! Nothing may follow. One Hopper GPU takes about 7.5 KB (NVIDIA's public sample: 7,493 bytes),
//! so at most 4 GPUs fit the 32 KiB limit; more GPUs make issuing fail
//! ([`crate::ratls::RaTlsError::Gpu`]). The extension is non-critical: verifiers that do not know it ignore it
//! (they prove nothing about GPUs, and say nothing about them either).
//!
//! # Verification (client side, offline)
//!
//! [`check_evidence`] with a [`GpuPolicy`]: every certificate signed by the next, the last one
//! self-signed and pinned by the SHA-256 of its DER ([`NVIDIA_DEVICE_IDENTITY_ROOT_SHA256`] by
//! default, others added by the verifier), all inside their validity; the report parsed and its
//! signature verified with the leaf's P-384 key; the request nonce equal to the binding of the
//! presented TLS key; CC on, dev-tools off; every measurement index of the [`ReferenceValues`]
//! present with one of its allowed values (and the driver/VBIOS version allowed when listed).
//! Each failure has its own [`ReasonCode`]. Malformed input gives reasons, never a panic.

#[cfg(any(test, feature = "test-gpu"))]
pub mod testing;

use std::collections::BTreeMap;

use ring::signature::{
    ECDSA_P256_SHA384_ASN1, ECDSA_P384_SHA384_ASN1, ECDSA_P384_SHA384_FIXED, UnparsedPublicKey,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::verdict::{ReasonCode, Verdict};

/// OID of the GPU evidence extension.
pub const OID_GPU: &[u64] = &[1, 3, 6, 1, 4, 1, 12345, 3];
/// [`OID_GPU`] as text.
pub const OID_GPU_STR: &str = "1.3.6.1.4.1.12345.3";
/// Version byte of the extension format.
pub const FORMAT_VERSION: u8 = 1;
/// Most GPUs one extension carries (the largest launch shape has 8).
pub const MAX_GPUS: usize = 8;
/// Longest accepted certificate chain (NVIDIA's Hopper chains have 5).
pub const MAX_CHAIN_LEN: usize = 5;
/// Size of an SPDM 1.1 GET_MEASUREMENTS request with a nonce.
pub const SPDM_REQUEST_LEN: usize = 37;
/// ECDSA P-384 raw signature length.
pub const SIGNATURE_LEN: usize = 96;
/// SHA-256 of the DER of NVIDIA's "NVIDIA Device Identity CA" root certificate (CN=NVIDIA Device
/// Identity CA, O=NVIDIA, valid 2021-11-05 to 9999-12-31, ECDSA P-384). Source: the file
/// `guest_tools/gpu_verifiers/local_gpu_verifier/src/verifier/certs/verifier_device_root.pem` of
/// NVIDIA's public nvtrust repository (commit 028173093d43), whose public sample Hopper chain
/// ends in the same certificate.
pub const NVIDIA_DEVICE_IDENTITY_ROOT_SHA256: &str =
    "102bf659d5419614c9d8e6aecebc80454eb26b1df6a769ac720b9a690b167b48";

const CC_ON: u8 = 0x01;
const CC_DEV_TOOLS: u8 = 0x02;
const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_SECP384R1: &str = "1.3.132.0.34";
const OID_PRIME256V1: &str = "1.2.840.10045.3.1.7";
const OID_ECDSA_SHA384: &str = "1.2.840.10045.4.3.3";
const OPAQUE_DRIVER_VERSION: u16 = 3;
const OPAQUE_VBIOS_VERSION: u16 = 6;

/// Errors decoding or building GPU evidence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GpuError {
    /// The extension bytes are not the format above.
    #[error("GPU evidence extension is malformed: {0}")]
    Malformed(String),
    /// The attestation report is not an SPDM GET_MEASUREMENTS request and response.
    #[error("GPU attestation report is malformed: {0}")]
    Report(String),
    /// The certificate chain cannot be read.
    #[error("GPU certificate chain is malformed: {0}")]
    Chain(String),
    /// The reference values cannot be used.
    #[error("GPU reference values are invalid: {0}; see the format in the attestation::gpu docs")]
    Reference(String),
}

/// The confidential-computing state the driver reports for a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct CcState {
    /// Confidential-computing mode is on.
    pub cc_on: bool,
    /// CC dev-tools mode (debuggable; not confidential) is on.
    pub dev_tools: bool,
}

/// The evidence of one GPU as carried in the extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuEntry {
    /// CC state as the agent read it from the driver.
    pub cc: CcState,
    /// Raw NVML attestation report: SPDM GET_MEASUREMENTS request || response.
    pub report: Vec<u8>,
    /// DER certificates, leaf first, root last.
    pub cert_chain: Vec<Vec<u8>>,
}

/// The whole extension: one entry per GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuEvidence {
    /// The GPUs.
    pub gpus: Vec<GpuEntry>,
}

/// The 32-byte nonce the agent asks each GPU to sign: SHA-256 of the RA-TLS certificate's raw
/// Ed25519 public key.
pub fn gpu_nonce_for_key(public_key: &[u8; 32]) -> [u8; 32] {
    Sha256::digest(public_key).into()
}

/// Split a PEM certificate chain (what NVML returns) into DER certificates, in order.
pub fn pem_chain_to_der(pem: &[u8]) -> Result<Vec<Vec<u8>>, GpuError> {
    let mut out = Vec::new();
    for item in x509_parser::pem::Pem::iter_from_buffer(pem) {
        let p = item.map_err(|e| GpuError::Chain(format!("bad PEM block: {e}")))?;
        if p.label != "CERTIFICATE" {
            return Err(GpuError::Chain(format!(
                "unexpected PEM block {:?} (only CERTIFICATE blocks are allowed)",
                p.label
            )));
        }
        out.push(p.contents);
    }
    if out.is_empty() {
        return Err(GpuError::Chain("no PEM certificate found".into()));
    }
    Ok(out)
}

impl GpuEvidence {
    /// Encode as the extension value.
    pub fn encode(&self) -> Result<Vec<u8>, GpuError> {
        let bad = |m: String| Err(GpuError::Malformed(m));
        if self.gpus.is_empty() || self.gpus.len() > MAX_GPUS {
            return bad(format!(
                "{} GPUs; the extension carries 1 to {MAX_GPUS}",
                self.gpus.len()
            ));
        }
        let mut out = vec![FORMAT_VERSION, self.gpus.len() as u8];
        for g in &self.gpus {
            let mut flags = 0u8;
            if g.cc.cc_on {
                flags |= CC_ON;
            }
            if g.cc.dev_tools {
                flags |= CC_DEV_TOOLS;
            }
            out.push(flags);
            let Ok(rl) = u16::try_from(g.report.len()) else {
                return bad(format!("report of {} bytes is too long", g.report.len()));
            };
            out.extend_from_slice(&rl.to_be_bytes());
            out.extend_from_slice(&g.report);
            if g.cert_chain.is_empty() || g.cert_chain.len() > MAX_CHAIN_LEN {
                return bad(format!(
                    "{} certificates; a chain has 1 to {MAX_CHAIN_LEN}",
                    g.cert_chain.len()
                ));
            }
            out.push(g.cert_chain.len() as u8);
            for c in &g.cert_chain {
                let Ok(cl) = u16::try_from(c.len()) else {
                    return bad(format!("certificate of {} bytes is too long", c.len()));
                };
                out.extend_from_slice(&cl.to_be_bytes());
                out.extend_from_slice(c);
            }
        }
        Ok(out)
    }

    /// Decode an extension value (strictly: no trailing bytes, no unknown flags).
    pub fn decode(bytes: &[u8]) -> Result<Self, GpuError> {
        let mut r = Reader(bytes);
        let version = r.u8()?;
        if version != FORMAT_VERSION {
            return Err(GpuError::Malformed(format!(
                "format version {version}, this verifier knows {FORMAT_VERSION}; upgrade it"
            )));
        }
        let n = usize::from(r.u8()?);
        if n == 0 || n > MAX_GPUS {
            return Err(GpuError::Malformed(format!(
                "{n} GPUs; the extension carries 1 to {MAX_GPUS}"
            )));
        }
        let mut gpus = Vec::with_capacity(n);
        for _ in 0..n {
            let flags = r.u8()?;
            if flags & !(CC_ON | CC_DEV_TOOLS) != 0 {
                return Err(GpuError::Malformed(format!(
                    "unknown CC flags {flags:#04x}"
                )));
            }
            let rl = usize::from(r.u16()?);
            let report = r.take(rl)?.to_vec();
            let cn = usize::from(r.u8()?);
            if cn == 0 || cn > MAX_CHAIN_LEN {
                return Err(GpuError::Malformed(format!(
                    "{cn} certificates; a chain has 1 to {MAX_CHAIN_LEN}"
                )));
            }
            let mut cert_chain = Vec::with_capacity(cn);
            for _ in 0..cn {
                let cl = usize::from(r.u16()?);
                cert_chain.push(r.take(cl)?.to_vec());
            }
            gpus.push(GpuEntry {
                cc: CcState {
                    cc_on: flags & CC_ON != 0,
                    dev_tools: flags & CC_DEV_TOOLS != 0,
                },
                report,
                cert_chain,
            });
        }
        if !r.0.is_empty() {
            return Err(GpuError::Malformed(format!(
                "{} trailing bytes after the last GPU",
                r.0.len()
            )));
        }
        Ok(Self { gpus })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], GpuError> {
        if self.0.len() < n {
            return Err(GpuError::Malformed(format!(
                "truncated: needs {n} more bytes, {} left",
                self.0.len()
            )));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, GpuError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, GpuError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
}

/// One SPDM measurement block (DMTF format).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeasurementBlock {
    /// Index (1-based).
    pub index: u8,
    /// DMTF measurement value type.
    pub value_type: u8,
    /// The measurement (48 bytes on Hopper).
    pub value: Vec<u8>,
}

/// A parsed NVIDIA attestation report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpdmReport {
    /// SPDM version byte (0x11 = 1.1).
    pub version: u8,
    /// The requester's nonce (what binds the report to the RA-TLS key).
    pub request_nonce: [u8; 32],
    /// The responder's nonce.
    pub response_nonce: [u8; 32],
    /// Measurement blocks in report order.
    pub blocks: Vec<MeasurementBlock>,
    /// Opaque data fields (type, value) in report order.
    pub opaque: Vec<(u16, Vec<u8>)>,
    /// Raw `r || s` signature.
    pub signature: Vec<u8>,
    /// Length of the signed part (request || response without the signature).
    pub signed_len: usize,
}

impl SpdmReport {
    /// Parse `request || response` (strict: every length must add up).
    pub fn parse(report: &[u8]) -> Result<Self, GpuError> {
        let bad = |m: String| GpuError::Report(m);
        if report.len() < SPDM_REQUEST_LEN + 8 + 32 + 2 + SIGNATURE_LEN {
            return Err(bad(format!(
                "{} bytes is too short for an SPDM GET_MEASUREMENTS request and response",
                report.len()
            )));
        }
        let (req, resp) = report.split_at(SPDM_REQUEST_LEN);
        let version = req[0];
        if !matches!(version, 0x11 | 0x12) {
            return Err(bad(format!(
                "SPDM version {version:#04x}; only 1.1 and 1.2 are understood"
            )));
        }
        if req[1] != 0xE0 {
            return Err(bad(format!(
                "request code {:#04x} is not GET_MEASUREMENTS (0xe0)",
                req[1]
            )));
        }
        if req[2] & 0x01 == 0 {
            return Err(bad("the request did not ask for a signature".into()));
        }
        let mut request_nonce = [0u8; 32];
        request_nonce.copy_from_slice(&req[4..36]);
        if resp[0] != version || resp[1] != 0x60 {
            return Err(bad(format!(
                "response header {:02x}{:02x} is not an SPDM {version:#04x} MEASUREMENTS (0x60)",
                resp[0], resp[1]
            )));
        }
        let nblocks = usize::from(resp[4]);
        let rec_len =
            usize::from(resp[5]) | (usize::from(resp[6]) << 8) | (usize::from(resp[7]) << 16);
        let mut r = Reader(&resp[8..]);
        let record = r.take(rec_len).map_err(|_| {
            bad(format!(
                "measurement record length {rec_len} overruns the report"
            ))
        })?;
        let mut blocks = Vec::with_capacity(nblocks);
        let mut rec = Reader(record);
        for i in 0..nblocks {
            let trunc = |_| bad(format!("measurement block {i} is truncated"));
            let index = rec.u8().map_err(trunc)?;
            let spec = rec.u8().map_err(trunc)?;
            if spec != 1 {
                return Err(bad(format!(
                    "measurement block {index} has specification {spec}, not DMTF (1)"
                )));
            }
            let size = usize::from(u16::from_le_bytes(
                rec.take(2)
                    .map_err(trunc)?
                    .try_into()
                    .map_err(|_| bad("size".into()))?,
            ));
            let mut m = Reader(rec.take(size).map_err(trunc)?);
            let value_type = m.u8().map_err(trunc)?;
            let vs = usize::from(u16::from_le_bytes(
                m.take(2)
                    .map_err(trunc)?
                    .try_into()
                    .map_err(|_| bad("size".into()))?,
            ));
            let value = m.take(vs).map_err(trunc)?.to_vec();
            if !m.0.is_empty() {
                return Err(bad(format!(
                    "measurement block {index}: value size {vs} does not fill its size {size}"
                )));
            }
            if blocks.iter().any(|b: &MeasurementBlock| b.index == index) {
                return Err(bad(format!("measurement index {index} appears twice")));
            }
            blocks.push(MeasurementBlock {
                index,
                value_type,
                value,
            });
        }
        if !rec.0.is_empty() {
            return Err(bad(format!(
                "{} bytes left in the measurement record after {nblocks} blocks",
                rec.0.len()
            )));
        }
        let trunc = |_| bad("truncated after the measurement record".into());
        let mut response_nonce = [0u8; 32];
        response_nonce.copy_from_slice(r.take(32).map_err(trunc)?);
        let olen = usize::from(u16::from_le_bytes(
            r.take(2)
                .map_err(trunc)?
                .try_into()
                .map_err(|_| bad("opaque".into()))?,
        ));
        let opaque_bytes = r
            .take(olen)
            .map_err(|_| bad(format!("opaque data length {olen} overruns the report")))?;
        let signature = r.0.to_vec();
        if signature.len() != SIGNATURE_LEN {
            return Err(bad(format!(
                "signature is {} bytes; ECDSA P-384 signatures are {SIGNATURE_LEN}",
                signature.len()
            )));
        }
        let mut opaque = Vec::new();
        let mut o = Reader(opaque_bytes);
        while !o.0.is_empty() {
            let trunc = |_| bad("opaque data field is truncated".into());
            let t = u16::from_le_bytes(
                o.take(2)
                    .map_err(trunc)?
                    .try_into()
                    .map_err(|_| bad("t".into()))?,
            );
            let s = usize::from(u16::from_le_bytes(
                o.take(2)
                    .map_err(trunc)?
                    .try_into()
                    .map_err(|_| bad("s".into()))?,
            ));
            opaque.push((t, o.take(s).map_err(trunc)?.to_vec()));
        }
        Ok(Self {
            version,
            request_nonce,
            response_nonce,
            blocks,
            opaque,
            signature,
            signed_len: report.len() - SIGNATURE_LEN,
        })
    }

    fn opaque_field(&self, t: u16) -> Option<&[u8]> {
        self.opaque
            .iter()
            .find(|(ty, _)| *ty == t)
            .map(|(_, v)| v.as_slice())
    }

    /// The driver version from the opaque data (e.g. `550.90.07`).
    pub fn driver_version(&self) -> Option<String> {
        let v = self.opaque_field(OPAQUE_DRIVER_VERSION)?;
        let end = v.iter().position(|b| *b == 0).unwrap_or(v.len());
        std::str::from_utf8(&v[..end]).ok().map(str::to_owned)
    }

    /// The VBIOS version from the opaque data, formatted as NVIDIA does (`96.00.9f.00.01`).
    pub fn vbios_version(&self) -> Option<String> {
        let v = self.opaque_field(OPAQUE_VBIOS_VERSION)?;
        if v.len() < 5 {
            return None;
        }
        Some(
            [v[3], v[2], v[1], v[0], v[4]]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<Vec<_>>()
                .join("."),
        )
    }
}

/// What a GPU must measure: the reference values a verifier is given (a file, offline).
///
/// JSON: `{"measurements": {"1": ["<96 hex>", ...], ...}, "driver_versions": [...],
/// "vbios_versions": [...]}`. Every listed index must be in the report with one of its listed
/// values (alternatives allowed, as in NVIDIA's RIMs); indices not listed are reported as
/// unchecked. `driver_versions` / `vbios_versions`, when present and non-empty, must contain the
/// report's. At least one measurement must be listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceValues {
    /// Free text: where the values come from.
    #[serde(default)]
    pub description: Option<String>,
    /// Index (decimal) → allowed values (hex).
    pub measurements: BTreeMap<String, Vec<String>>,
    /// Allowed driver versions (empty: not checked).
    #[serde(default)]
    pub driver_versions: Vec<String>,
    /// Allowed VBIOS versions (empty: not checked).
    #[serde(default)]
    pub vbios_versions: Vec<String>,
    #[serde(skip)]
    parsed: BTreeMap<u8, Vec<Vec<u8>>>,
}

impl ReferenceValues {
    /// Parse and validate reference values from JSON.
    pub fn from_json(text: &[u8]) -> Result<Self, GpuError> {
        let mut r: Self =
            serde_json::from_slice(text).map_err(|e| GpuError::Reference(e.to_string()))?;
        r.validate()?;
        Ok(r)
    }

    /// Reference values from index → allowed values.
    pub fn new(measurements: BTreeMap<u8, Vec<Vec<u8>>>) -> Result<Self, GpuError> {
        let mut r = Self {
            description: None,
            measurements: measurements
                .iter()
                .map(|(k, v)| (k.to_string(), v.iter().map(hex::encode).collect()))
                .collect(),
            driver_versions: Vec::new(),
            vbios_versions: Vec::new(),
            parsed: BTreeMap::new(),
        };
        r.validate()?;
        Ok(r)
    }

    fn validate(&mut self) -> Result<(), GpuError> {
        if self.measurements.is_empty() {
            return Err(GpuError::Reference("no measurements listed".into()));
        }
        let mut parsed = BTreeMap::new();
        for (k, vals) in &self.measurements {
            let idx: u8 = k
                .parse()
                .map_err(|_| GpuError::Reference(format!("index {k:?} is not 0..=255")))?;
            if vals.is_empty() {
                return Err(GpuError::Reference(format!("index {k} lists no value")));
            }
            let mut vs = Vec::new();
            for v in vals {
                vs.push(hex::decode(v).map_err(|e| {
                    GpuError::Reference(format!("index {k}: value {v:?} is not hex: {e}"))
                })?);
            }
            parsed.insert(idx, vs);
        }
        self.parsed = parsed;
        Ok(())
    }
}

/// What a verifier trusts about GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuPolicy {
    /// Reject workers without valid GPU evidence.
    pub required: bool,
    /// SHA-256 of the DER of each accepted root (NVIDIA's by default).
    pub pinned_roots: Vec<[u8; 32]>,
    /// The measurements a GPU must have.
    pub reference: ReferenceValues,
}

impl GpuPolicy {
    /// Pin NVIDIA's Device Identity root only.
    pub fn new(reference: ReferenceValues, required: bool) -> Self {
        let mut nvidia = [0u8; 32];
        // The constant is 64 valid hex digits (checked by a unit test).
        if let Ok(b) = hex::decode(NVIDIA_DEVICE_IDENTITY_ROOT_SHA256) {
            nvidia.copy_from_slice(&b);
        }
        Self {
            required,
            pinned_roots: vec![nvidia],
            reference,
        }
    }

    /// Also accept the root with this DER (e.g. a test CA).
    pub fn with_root_der(mut self, der: &[u8]) -> Self {
        self.pinned_roots.push(Sha256::digest(der).into());
        self
    }

    /// Also accept the root whose DER has this SHA-256.
    pub fn with_root_sha256(mut self, sha256: [u8; 32]) -> Self {
        self.pinned_roots.push(sha256);
        self
    }
}

/// Overall outcome of the GPU checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GpuStatus {
    /// Every GPU's evidence verified.
    Verified,
    /// Evidence is present but does not verify (the reasons say why).
    Invalid,
    /// Evidence is present but the verifier was given no GPU trust (root, reference values):
    /// NOT verified.
    Unchecked,
    /// The certificate carries no GPU evidence.
    Absent,
}

/// What was seen of one GPU.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GpuInfo {
    /// CC state stated by the agent.
    pub cc: CcState,
    /// Driver version from the signed opaque data.
    pub driver_version: Option<String>,
    /// VBIOS version from the signed opaque data.
    pub vbios_version: Option<String>,
    /// Number of measurement blocks.
    pub measurement_blocks: usize,
    /// Indices checked against the reference values.
    pub checked_indices: Vec<u8>,
    /// Indices in the report that the reference values do not list.
    pub unchecked_indices: Vec<u8>,
    /// Subject of the attestation (leaf) certificate.
    pub leaf_subject: Option<String>,
    /// SHA-256 of the chain's root certificate (hex).
    pub root_sha256: Option<String>,
}

/// The GPU part of a [`Verdict`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuVerdict {
    /// Overall status.
    pub status: GpuStatus,
    /// Whether the verifier requires GPU evidence.
    pub required: bool,
    /// One entry per GPU in the evidence.
    pub gpus: Vec<GpuInfo>,
    /// Why the status is not `verified`, in words.
    #[serde(default)]
    pub note: Option<String>,
}

/// Check the GPU evidence extension `ext` (if any) of a certificate whose Ed25519 key is
/// `tls_key`, at `now_unix`. Records reasons in `v` (which rejects) and sets `v.gpu`.
///
/// - No policy (the verifier was given no GPU trust): present evidence is parsed for information
///   and reported as [`GpuStatus::Unchecked`], with no reason (the worker is judged on its TDX
///   evidence alone and the verdict says the GPU was not verified).
/// - With a policy: present evidence must verify (else the worker is rejected, required or not:
///   it claims something false); absent evidence rejects only when the policy requires a GPU.
pub fn check_evidence(
    policy: Option<&GpuPolicy>,
    ext: Option<&[u8]>,
    tls_key: &[u8; 32],
    now_unix: u64,
    v: &mut Verdict,
) {
    let required = policy.is_some_and(|p| p.required);
    let Some(ext) = ext else {
        if required {
            v.reject(
                ReasonCode::GpuEvidenceMissing,
                "the verifier requires a GPU (--require-gpu) but the certificate carries no GPU \
                 evidence (extension 1.3.6.1.4.1.12345.3): the worker has no GPU in \
                 confidential-computing mode, or its agent could not get a GPU attestation report",
            );
        }
        v.gpu = Some(GpuVerdict {
            status: GpuStatus::Absent,
            required,
            gpus: Vec::new(),
            note: None,
        });
        return;
    };
    let before = v.reasons.len();
    let mut scratch = Verdict::default();
    let sink = if policy.is_some() {
        &mut *v
    } else {
        &mut scratch
    };
    let evidence = match GpuEvidence::decode(ext) {
        Ok(e) => e,
        Err(e) => {
            sink.reject(ReasonCode::GpuEvidenceMalformed, e.to_string());
            let note = policy
                .is_none()
                .then(|| format!("GPU evidence present but unreadable: {e}"));
            v.gpu = Some(GpuVerdict {
                status: if policy.is_some() {
                    GpuStatus::Invalid
                } else {
                    GpuStatus::Unchecked
                },
                required,
                gpus: Vec::new(),
                note,
            });
            return;
        }
    };
    let nonce = gpu_nonce_for_key(tls_key);
    let mut gpus = Vec::new();
    for (i, g) in evidence.gpus.iter().enumerate() {
        gpus.push(check_gpu(policy, i, g, &nonce, now_unix, sink));
    }
    let (status, note) = match policy {
        None => (
            GpuStatus::Unchecked,
            Some(
                "GPU evidence is present but NOT verified: the verifier was given no GPU \
                 reference values (--gpu-reference) and so checks no GPU"
                    .to_owned(),
            ),
        ),
        Some(_) if v.reasons.len() > before => (
            GpuStatus::Invalid,
            Some("GPU evidence does not verify; see the gpu_* reasons".to_owned()),
        ),
        Some(_) => (GpuStatus::Verified, None),
    };
    v.gpu = Some(GpuVerdict {
        status,
        required,
        gpus,
        note,
    });
}

/// Check one GPU's evidence against `policy` with an explicit expected nonce (what
/// [`check_evidence`] does per GPU with the nonce of the TLS key). Records reasons in `v`.
pub fn check_entry(
    policy: &GpuPolicy,
    entry: &GpuEntry,
    expected_nonce: &[u8; 32],
    now_unix: u64,
    v: &mut Verdict,
) -> GpuInfo {
    check_gpu(Some(policy), 0, entry, expected_nonce, now_unix, v)
}

fn check_gpu(
    policy: Option<&GpuPolicy>,
    i: usize,
    g: &GpuEntry,
    nonce: &[u8; 32],
    now_unix: u64,
    v: &mut Verdict,
) -> GpuInfo {
    let mut info = GpuInfo {
        cc: g.cc,
        ..GpuInfo::default()
    };
    if !g.cc.cc_on {
        v.reject(
            ReasonCode::GpuCcModeOff,
            format!(
                "GPU {i} is not in confidential-computing mode: its memory and the PCIe traffic \
                 to it are not protected; the owner must enable CC mode on the GPU \
                 (nvtrust host_tools gpu-admin-tools --set-cc-mode=on) and reboot the worker"
            ),
        );
    } else if g.cc.dev_tools {
        v.reject(
            ReasonCode::GpuCcModeOff,
            format!(
                "GPU {i} runs confidential computing in dev-tools mode (debuggable, not \
                 confidential); set CC mode to `on`, not `devtools`"
            ),
        );
    }
    // Chain first: the report's signature is checked with the leaf key.
    let leaf_key = check_chain(policy, i, &g.cert_chain, now_unix, v, &mut info);
    let report = match SpdmReport::parse(&g.report) {
        Ok(r) => r,
        Err(e) => {
            v.reject(ReasonCode::GpuEvidenceMalformed, format!("GPU {i}: {e}"));
            return info;
        }
    };
    info.driver_version = report.driver_version();
    info.vbios_version = report.vbios_version();
    info.measurement_blocks = report.blocks.len();
    if let Some(key) = leaf_key
        && UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, &key)
            .verify(&g.report[..report.signed_len], &report.signature)
            .is_err()
    {
        v.reject(
            ReasonCode::GpuReportSignatureInvalid,
            format!(
                "GPU {i}: the attestation report's signature does not verify with the GPU's \
                 attestation key (the report was altered or comes from another GPU)"
            ),
        );
    }
    if report.request_nonce != *nonce {
        v.reject(
            ReasonCode::GpuNonceMismatch,
            format!(
                "GPU {i}: the report's nonce {} is not SHA-256 of this certificate's key ({}): \
                 the report was made for another connection (replayed or relayed)",
                hex::encode(report.request_nonce),
                hex::encode(nonce)
            ),
        );
    }
    if let Some(p) = policy {
        check_measurements(&p.reference, i, &report, v, &mut info);
    }
    info
}

/// Verify the chain; returns the leaf's uncompressed P-384 point when the leaf parsed.
fn check_chain(
    policy: Option<&GpuPolicy>,
    i: usize,
    chain: &[Vec<u8>],
    now_unix: u64,
    v: &mut Verdict,
    info: &mut GpuInfo,
) -> Option<Vec<u8>> {
    let mut certs = Vec::with_capacity(chain.len());
    for (k, der) in chain.iter().enumerate() {
        match X509Certificate::from_der(der) {
            Ok(([], c)) => certs.push(c),
            Ok(_) => {
                v.reject(
                    ReasonCode::GpuEvidenceMalformed,
                    format!("GPU {i}: certificate {k} has trailing bytes"),
                );
                return None;
            }
            Err(e) => {
                v.reject(
                    ReasonCode::GpuEvidenceMalformed,
                    format!("GPU {i}: certificate {k} is not DER X.509: {e}"),
                );
                return None;
            }
        }
    }
    let (Some(leaf), Some(root)) = (certs.first(), certs.last()) else {
        v.reject(
            ReasonCode::GpuEvidenceMalformed,
            format!("GPU {i}: empty certificate chain"),
        );
        return None;
    };
    info.leaf_subject = Some(leaf.subject().to_string());
    let root_hash: [u8; 32] = Sha256::digest(&chain[chain.len() - 1]).into();
    info.root_sha256 = Some(hex::encode(root_hash));
    let leaf_key = match ec_point(leaf, OID_SECP384R1) {
        Some(k) => Some(k),
        None => {
            v.reject(
                ReasonCode::GpuEvidenceMalformed,
                format!("GPU {i}: the attestation certificate's key is not ECDSA P-384"),
            );
            None
        }
    };
    let now = i64::try_from(now_unix).unwrap_or(i64::MAX);
    let mut broken = Vec::new();
    for (k, c) in certs.iter().enumerate() {
        let issuer = certs.get(k + 1).unwrap_or(c);
        if c.issuer() != issuer.subject() {
            broken.push(format!(
                "certificate {k} ({}) is issued by {}, not by the next certificate ({})",
                c.subject(),
                c.issuer(),
                issuer.subject()
            ));
        } else if !signed_by(&chain[k], c, issuer) {
            broken.push(format!(
                "certificate {k} ({}) is not signed by {}",
                c.subject(),
                issuer.subject()
            ));
        }
        if k > 0 && !c.is_ca() {
            broken.push(format!("certificate {k} ({}) is not a CA", c.subject()));
        }
        let (nb, na) = (
            c.validity().not_before.timestamp(),
            c.validity().not_after.timestamp(),
        );
        if now < nb || now > na {
            broken.push(format!(
                "certificate {k} ({}) is valid only from Unix time {nb} to {na} (now {now})",
                c.subject()
            ));
        }
    }
    if !broken.is_empty() {
        v.reject(
            ReasonCode::GpuCertChainInvalid,
            format!(
                "GPU {i}: certificate chain does not verify: {}",
                broken.join("; ")
            ),
        );
    }
    if let Some(p) = policy
        && !p.pinned_roots.contains(&root_hash)
    {
        v.reject(
            ReasonCode::GpuRootUnknown,
            format!(
                "GPU {i}: the certificate chain ends at {} (SHA-256 {}), which is not a pinned \
                 root (NVIDIA's Device Identity CA is {NVIDIA_DEVICE_IDENTITY_ROOT_SHA256}; pin \
                 another with --gpu-root)",
                root.subject(),
                hex::encode(root_hash)
            ),
        );
    }
    leaf_key
}

/// The uncompressed EC point of an `id-ecPublicKey` on `curve`.
fn ec_point(c: &X509Certificate<'_>, curve: &str) -> Option<Vec<u8>> {
    let spki = c.public_key();
    if spki.algorithm.algorithm.to_id_string() != OID_EC_PUBLIC_KEY {
        return None;
    }
    let param = spki.algorithm.parameters.as_ref()?.as_oid().ok()?;
    (param.to_id_string() == curve).then(|| spki.subject_public_key.data.to_vec())
}

/// DER header (tag, definite length) for `len` content bytes.
fn der_header(tag: u8, len: usize) -> Vec<u8> {
    let mut h = vec![tag];
    if len < 0x80 {
        h.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        h.push(0x80 | (bytes.len() - skip) as u8);
        h.extend_from_slice(&bytes[skip..]);
    }
    h
}

/// `ecdsa-with-SHA384` AlgorithmIdentifier, DER (no parameters).
const ECDSA_SHA384_ALG: [u8; 12] = [
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03,
];

/// Whether `der` is exactly the canonical DER of `SEQUENCE { tbs, ecdsa-with-SHA384, BIT STRING
/// (0 unused bits) sig }`: the parser tolerates variations outside the signed TBS, and nothing
/// unsigned may vary.
fn ecdsa_envelope_is_canonical(der: &[u8], tbs: &[u8], sig: &[u8]) -> bool {
    let mut bits = der_header(0x03, sig.len() + 1);
    bits.push(0x00);
    bits.extend_from_slice(sig);
    let content = tbs.len() + ECDSA_SHA384_ALG.len() + bits.len();
    let mut expect = der_header(0x30, content);
    expect.extend_from_slice(tbs);
    expect.extend_from_slice(&ECDSA_SHA384_ALG);
    expect.extend_from_slice(&bits);
    der == expect.as_slice()
}

/// Whether `c` (DER `der`) carries a valid ecdsa-with-SHA384 signature by `issuer`'s P-384 (or
/// P-256) key, in a canonical envelope.
fn signed_by(der: &[u8], c: &X509Certificate<'_>, issuer: &X509Certificate<'_>) -> bool {
    if c.signature_algorithm.algorithm.to_id_string() != OID_ECDSA_SHA384 {
        return false;
    }
    let tbs = c.tbs_certificate.as_ref();
    let sig = c.signature_value.data.as_ref();
    if !ecdsa_envelope_is_canonical(der, tbs, sig) {
        return false;
    }
    if let Some(k) = ec_point(issuer, OID_SECP384R1) {
        UnparsedPublicKey::new(&ECDSA_P384_SHA384_ASN1, k)
            .verify(tbs, sig)
            .is_ok()
    } else if let Some(k) = ec_point(issuer, OID_PRIME256V1) {
        UnparsedPublicKey::new(&ECDSA_P256_SHA384_ASN1, k)
            .verify(tbs, sig)
            .is_ok()
    } else {
        false
    }
}

fn check_measurements(
    reference: &ReferenceValues,
    i: usize,
    report: &SpdmReport,
    v: &mut Verdict,
    info: &mut GpuInfo,
) {
    let mut wrong = Vec::new();
    for (idx, allowed) in &reference.parsed {
        match report.blocks.iter().find(|b| b.index == *idx) {
            None => wrong.push(format!("index {idx} is missing from the report")),
            Some(b) if !allowed.contains(&b.value) => wrong.push(format!(
                "index {idx} is {} (allowed: {})",
                hex::encode(&b.value),
                allowed
                    .iter()
                    .map(hex::encode)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            Some(_) => info.checked_indices.push(*idx),
        }
    }
    info.unchecked_indices = report
        .blocks
        .iter()
        .map(|b| b.index)
        .filter(|x| !reference.parsed.contains_key(x))
        .collect();
    let version_ok = |list: &[String], got: &Option<String>| {
        list.is_empty()
            || got
                .as_ref()
                .is_some_and(|g| list.iter().any(|l| l.eq_ignore_ascii_case(g)))
    };
    if !version_ok(&reference.driver_versions, &info.driver_version) {
        wrong.push(format!(
            "driver version {} is not one of {}",
            info.driver_version.as_deref().unwrap_or("(none)"),
            reference.driver_versions.join(", ")
        ));
    }
    if !version_ok(&reference.vbios_versions, &info.vbios_version) {
        wrong.push(format!(
            "VBIOS version {} is not one of {}",
            info.vbios_version.as_deref().unwrap_or("(none)"),
            reference.vbios_versions.join(", ")
        ));
    }
    if !wrong.is_empty() {
        v.reject(
            ReasonCode::GpuMeasurementMismatch,
            format!(
                "GPU {i}: measurements differ from the reference values: {}; the GPU runs other \
                 firmware/driver than the verifier expects (update the reference values only if \
                 the new ones come from NVIDIA's signed RIMs)",
                wrong.join("; ")
            ),
        );
    }
}

#[cfg(test)]
mod tests;

/// The GPU trust flags shared by every client (`verify-quote --cert`, `host-launcher
/// verify`/`chat`, `gateway`).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct GpuArgs {
    /// Reject workers without valid GPU evidence (NVIDIA confidential-computing attestation in
    /// the RA-TLS certificate). Needs --gpu-reference.
    #[arg(long, requires = "gpu_reference")]
    pub require_gpu: bool,
    /// GPU reference values (JSON: {"measurements": {"INDEX": ["HEX", ...]}, "driver_versions":
    /// [...], "vbios_versions": [...]}), kept offline beside the collateral. With it, GPU
    /// evidence a worker presents must verify (even without --require-gpu).
    #[arg(long, value_name = "FILE")]
    pub gpu_reference: Option<std::path::PathBuf>,
    /// Also trust this GPU root certificate (PEM or DER file; repeatable). NVIDIA's Device
    /// Identity CA is always pinned (by its SHA-256).
    #[arg(long, value_name = "FILE", requires = "gpu_reference")]
    pub gpu_root: Vec<std::path::PathBuf>,
    /// Also trust the GPU root whose DER has this SHA-256 (64 hex digits; repeatable).
    #[arg(long, value_name = "HEX", requires = "gpu_reference")]
    pub gpu_root_sha256: Vec<String>,
}

/// Why the GPU flags cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum GpuArgsError {
    /// A file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A value is wrong; the message says how to fix it.
    #[error("{0}")]
    Invalid(String),
}

impl GpuArgs {
    /// The GPU policy the flags describe; `None` without --gpu-reference (GPU evidence is then
    /// reported as unchecked).
    pub fn policy(&self) -> Result<Option<GpuPolicy>, GpuArgsError> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|source| GpuArgsError::Read {
                path: p.display().to_string(),
                source,
            })
        };
        let Some(path) = &self.gpu_reference else {
            if self.require_gpu || !self.gpu_root.is_empty() || !self.gpu_root_sha256.is_empty() {
                return Err(GpuArgsError::Invalid(
                    "--require-gpu, --gpu-root and --gpu-root-sha256 need --gpu-reference FILE \
                     (the GPU reference values)"
                        .into(),
                ));
            }
            return Ok(None);
        };
        let reference = ReferenceValues::from_json(&read(path)?).map_err(|e| {
            GpuArgsError::Invalid(format!("--gpu-reference {}: {e}", path.display()))
        })?;
        let mut p = GpuPolicy::new(reference, self.require_gpu);
        for f in &self.gpu_root {
            let bytes = read(f)?;
            let der = if bytes.starts_with(b"-----BEGIN") {
                let certs = pem_chain_to_der(&bytes).map_err(|e| {
                    GpuArgsError::Invalid(format!("--gpu-root {}: {e}", f.display()))
                })?;
                match <[Vec<u8>; 1]>::try_from(certs) {
                    Ok([one]) => one,
                    Err(v) => {
                        return Err(GpuArgsError::Invalid(format!(
                            "--gpu-root {} holds {} certificates; give one root per flag",
                            f.display(),
                            v.len()
                        )));
                    }
                }
            } else {
                bytes
            };
            if !matches!(X509Certificate::from_der(&der), Ok(([], _))) {
                return Err(GpuArgsError::Invalid(format!(
                    "--gpu-root {} is not a PEM or DER X.509 certificate",
                    f.display()
                )));
            }
            p = p.with_root_der(&der);
        }
        for h in &self.gpu_root_sha256 {
            let b = hex::decode(h.trim())
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok());
            let Some(b) = b else {
                return Err(GpuArgsError::Invalid(format!(
                    "--gpu-root-sha256 {h:?} is not 64 hex digits (SHA-256 of the root's DER)"
                )));
            };
            p = p.with_root_sha256(b);
        }
        Ok(Some(p))
    }
}
