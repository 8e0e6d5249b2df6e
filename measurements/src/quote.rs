//! TDX quote parsing: versions 4 and 5, TD report bodies 1.0 (584 bytes), 1.5 (648 bytes) and
//! 1.5ex (v5 body type 4, 885 bytes: the 1.5 body, VMID, TD_ID and further extension bytes).
//!
//! Layout: a 48-byte header {version u16, attestation key type u16, TEE type u32 (0x81 = TDX),
//! QE SVN u16, PCE SVN u16, QE vendor id [16], user data [20]}; v5 adds a body descriptor
//! {type u16, size u32}; then the TD report; then u32 signature-data length and the ECDSA
//! signature data {signature [64], attestation key [64], certification data {type u16, size u32,
//! data}}; certification type 6 wraps {QE report [384], QE report signature [64], QE auth data
//! (u16 len), inner certification data (type 5 = PCK certificate chain, PEM)}.
//!
//! This module only parses. It does not verify signatures or the certificate chain (that needs
//! Intel collateral; see the attestation crate).

use crate::bytes::Reader;
use crate::image_hash::{TdIdentity, cocoon_v1, cw_v1};
use crate::{Error, Mr, Result};
use serde::Serialize;

/// TEE type of TDX quotes.
pub const TEE_TYPE_TDX: u32 = 0x81;

fn hexs(b: &[u8]) -> String {
    hex::encode(b)
}

/// The 48-byte quote header.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Header {
    /// Quote version (4 or 5).
    pub version: u16,
    /// Attestation key type (2 = ECDSA-256 with P-256).
    pub attestation_key_type: u16,
    /// TEE type (0x81 = TDX).
    pub tee_type: u32,
    /// QE SVN (v4: reserved).
    pub qe_svn: u16,
    /// PCE SVN (v4: reserved).
    pub pce_svn: u16,
    /// QE vendor id (hex).
    pub qe_vendor_id: String,
    /// User data (hex; Intel's QE puts the platform-instance id here).
    pub user_data: String,
}

/// A TD report as carried in a quote (every field; byte strings as lowercase hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TdReport {
    /// "1.0", "1.5" or "1.5ex".
    pub body_kind: String,
    /// TEE_TCB_SVN.
    pub tee_tcb_svn: String,
    /// MRSEAM.
    pub mr_seam: String,
    /// MRSIGNERSEAM.
    pub mr_signer_seam: String,
    /// SEAMATTRIBUTES.
    pub seam_attributes: String,
    /// TD_ATTRIBUTES (raw 8 bytes, hex).
    pub td_attributes: String,
    /// XFAM (raw 8 bytes, hex).
    pub xfam: String,
    /// MRTD.
    pub mr_td: Mr,
    /// MRCONFIGID.
    pub mr_config_id: Mr,
    /// MROWNER.
    pub mr_owner: Mr,
    /// MROWNERCONFIG.
    pub mr_owner_config: Mr,
    /// RTMR0.
    pub rtmr0: Mr,
    /// RTMR1.
    pub rtmr1: Mr,
    /// RTMR2.
    pub rtmr2: Mr,
    /// RTMR3.
    pub rtmr3: Mr,
    /// REPORTDATA (64 bytes).
    pub report_data: String,
    /// TEE_TCB_SVN2 (TD 1.5).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tee_tcb_svn2: Option<String>,
    /// MRSERVICETD (TD 1.5).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mr_service_td: Option<String>,
    /// VMID (TD 1.5ex).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vmid: Option<u8>,
    /// TD_ID (TD 1.5ex, 32 bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub td_id: Option<String>,
    /// Remaining 1.5ex extension bytes (not decoded further).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extension: Option<String>,
    /// TD_ATTRIBUTES decoded.
    pub td_attributes_decoded: TdAttributes,
}

/// Decoded TD_ATTRIBUTES bits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TdAttributes {
    /// The u64 value.
    pub value: u64,
    /// Bit 0: DEBUG. A debug TD is not confidential.
    pub debug: bool,
    /// Bit 28: SEPT_VE_DISABLE.
    pub sept_ve_disable: bool,
    /// Bit 30: PKS.
    pub pks: bool,
    /// Bit 31: KL.
    pub key_locker: bool,
    /// Bit 63: PERFMON.
    pub perfmon: bool,
}

impl TdAttributes {
    fn from_u64(v: u64) -> Self {
        TdAttributes {
            value: v,
            debug: v & 1 != 0,
            sept_ve_disable: v & (1 << 28) != 0,
            pks: v & (1 << 30) != 0,
            key_locker: v & (1 << 31) != 0,
            perfmon: v & (1 << 63) != 0,
        }
    }
}

/// The QE report inside certification data type 6 (SGX enclave report, 384 bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QeReport {
    /// CPUSVN.
    pub cpu_svn: String,
    /// MISCSELECT.
    pub misc_select: u32,
    /// ATTRIBUTES.
    pub attributes: String,
    /// MRENCLAVE.
    pub mr_enclave: String,
    /// MRSIGNER.
    pub mr_signer: String,
    /// ISVPRODID.
    pub isv_prod_id: u16,
    /// ISVSVN.
    pub isv_svn: u16,
    /// REPORTDATA.
    pub report_data: String,
}

/// Signature data of the quote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SignatureData {
    /// Length of the signature data.
    pub length: u32,
    /// ECDSA signature over header and body (r || s).
    pub signature: String,
    /// ECDSA attestation public key (x || y).
    pub attestation_key: String,
    /// Outer certification data type (6 = QE report certification data).
    pub certification_data_type: u16,
    /// QE report (type 6 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qe_report: Option<QeReport>,
    /// QE report signature (type 6 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qe_report_signature: Option<String>,
    /// QE authentication data (type 6 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qe_auth_data: Option<String>,
    /// Inner certification data type (5 = PCK certificate chain).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inner_certification_data_type: Option<u16>,
    /// Number of PEM certificates found in the (inner) certification data.
    pub pem_certificates: usize,
    /// Size of the (inner) certification data.
    pub certification_data_size: usize,
}

/// A parsed TDX quote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Quote {
    /// Header.
    pub header: Header,
    /// v5 body type (absent for v4).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub body_type: Option<u16>,
    /// The TD report.
    pub report: TdReport,
    /// Signature data.
    pub signature_data: SignatureData,
    /// Bytes after the signature data (usually zero padding).
    pub trailing_bytes: usize,
}

fn malformed(reason: impl Into<String>) -> Error {
    Error::Malformed {
        what: "TDX quote",
        reason: reason.into(),
    }
}

fn mr(r: &mut Reader<'_>, f: &str) -> Result<Mr> {
    Ok(Mr(r.array::<48>(f)?))
}

fn parse_report(r: &mut Reader<'_>, kind: &str, size: usize) -> Result<TdReport> {
    let start = r.pos();
    let tee_tcb_svn = hexs(r.take(16, "TEE_TCB_SVN")?);
    let mr_seam = hexs(r.take(48, "MRSEAM")?);
    let mr_signer_seam = hexs(r.take(48, "MRSIGNERSEAM")?);
    let seam_attributes = hexs(r.take(8, "SEAMATTRIBUTES")?);
    let td_attr_raw = r.array::<8>("TD_ATTRIBUTES")?;
    let xfam = hexs(r.take(8, "XFAM")?);
    let mut rep = TdReport {
        body_kind: kind.to_string(),
        tee_tcb_svn,
        mr_seam,
        mr_signer_seam,
        seam_attributes,
        td_attributes: hexs(&td_attr_raw),
        xfam,
        mr_td: mr(r, "MRTD")?,
        mr_config_id: mr(r, "MRCONFIGID")?,
        mr_owner: mr(r, "MROWNER")?,
        mr_owner_config: mr(r, "MROWNERCONFIG")?,
        rtmr0: mr(r, "RTMR0")?,
        rtmr1: mr(r, "RTMR1")?,
        rtmr2: mr(r, "RTMR2")?,
        rtmr3: mr(r, "RTMR3")?,
        report_data: hexs(r.take(64, "REPORTDATA")?),
        tee_tcb_svn2: None,
        mr_service_td: None,
        vmid: None,
        td_id: None,
        extension: None,
        td_attributes_decoded: TdAttributes::from_u64(u64::from_le_bytes(td_attr_raw)),
    };
    if kind != "1.0" {
        rep.tee_tcb_svn2 = Some(hexs(r.take(16, "TEE_TCB_SVN2")?));
        rep.mr_service_td = Some(hexs(r.take(48, "MRSERVICETD")?));
    }
    if kind == "1.5ex" {
        rep.vmid = Some(r.u8("VMID")?);
        rep.td_id = Some(hexs(r.take(32, "TD_ID")?));
        let used = r.pos() - start;
        let rest = size
            .checked_sub(used)
            .ok_or_else(|| malformed(format!("1.5ex body size {size} is below {used}")))?;
        rep.extension = Some(hexs(r.take(rest, "1.5ex extension")?));
    }
    Ok(rep)
}

fn count_pem(b: &[u8]) -> usize {
    let needle = b"-----BEGIN CERTIFICATE-----";
    b.windows(needle.len()).filter(|w| w == needle).count()
}

fn parse_signature(data: &[u8]) -> Result<SignatureData> {
    let mut r = Reader::new(data, "TDX quote signature data");
    let signature = hexs(r.take(64, "ECDSA signature")?);
    let attestation_key = hexs(r.take(64, "attestation key")?);
    let cert_type = r.u16("certification data type")?;
    let cert_size = r.u32("certification data size")? as usize;
    let cert = r.take(cert_size, "certification data")?;
    let mut sd = SignatureData {
        length: data.len() as u32,
        signature,
        attestation_key,
        certification_data_type: cert_type,
        qe_report: None,
        qe_report_signature: None,
        qe_auth_data: None,
        inner_certification_data_type: None,
        pem_certificates: count_pem(cert),
        certification_data_size: cert_size,
    };
    if cert_type == 6 {
        let mut c = Reader::new(cert, "QE report certification data");
        let rep = c.take(384, "QE report")?;
        let mut q = Reader::new(rep, "QE report");
        let cpu_svn = hexs(q.take(16, "CPUSVN")?);
        let misc_select = q.u32("MISCSELECT")?;
        q.take(28, "reserved")?;
        let attributes = hexs(q.take(16, "ATTRIBUTES")?);
        let mr_enclave = hexs(q.take(32, "MRENCLAVE")?);
        q.take(32, "reserved")?;
        let mr_signer = hexs(q.take(32, "MRSIGNER")?);
        q.take(96, "reserved")?;
        let isv_prod_id = q.u16("ISVPRODID")?;
        let isv_svn = q.u16("ISVSVN")?;
        q.take(60, "reserved")?;
        let report_data = hexs(q.take(64, "REPORTDATA")?);
        sd.qe_report = Some(QeReport {
            cpu_svn,
            misc_select,
            attributes,
            mr_enclave,
            mr_signer,
            isv_prod_id,
            isv_svn,
            report_data,
        });
        sd.qe_report_signature = Some(hexs(c.take(64, "QE report signature")?));
        let auth_len = usize::from(c.u16("QE auth data size")?);
        sd.qe_auth_data = Some(hexs(c.take(auth_len, "QE auth data")?));
        sd.inner_certification_data_type = Some(c.u16("inner certification data type")?);
        let inner_size = c.u32("inner certification data size")? as usize;
        let inner = c.take(inner_size, "inner certification data")?;
        sd.pem_certificates = count_pem(inner);
        sd.certification_data_size = inner_size;
    }
    Ok(sd)
}

impl Quote {
    /// Parse a TDX quote (v4 or v5).
    pub fn parse(data: &[u8]) -> Result<Quote> {
        let mut r = Reader::new(data, "TDX quote");
        let version = r.u16("version")?;
        let attestation_key_type = r.u16("attestation key type")?;
        let tee_type = r.u32("TEE type")?;
        let header = Header {
            version,
            attestation_key_type,
            tee_type,
            qe_svn: r.u16("QE SVN")?,
            pce_svn: r.u16("PCE SVN")?,
            qe_vendor_id: hexs(r.take(16, "QE vendor id")?),
            user_data: hexs(r.take(20, "user data")?),
        };
        if tee_type != TEE_TYPE_TDX {
            return Err(Error::Unsupported {
                what: "TDX quote",
                reason: format!(
                    "TEE type {tee_type:#x} (0x0 is SGX); only TDX (0x81) quotes are handled"
                ),
            });
        }
        let (body_type, report) = match version {
            4 => (None, parse_report(&mut r, "1.0", 584)?),
            5 => {
                let ty = r.u16("body type")?;
                let size = r.u32("body size")? as usize;
                let (kind, min) = match ty {
                    2 => ("1.0", 584),
                    3 => ("1.5", 648),
                    4 => ("1.5ex", 681),
                    o => {
                        return Err(Error::Unsupported {
                            what: "TDX quote",
                            reason: format!(
                                "v5 body type {o}; known: 2 (TD 1.0), 3 (TD 1.5), 4 (TD 1.5ex)"
                            ),
                        });
                    }
                };
                if size < min || (ty != 4 && size != min) {
                    return Err(malformed(format!(
                        "v5 body type {ty} has size {size}, expected {min}"
                    )));
                }
                (Some(ty), parse_report(&mut r, kind, size)?)
            }
            v => {
                return Err(Error::Unsupported {
                    what: "TDX quote",
                    reason: format!("version {v}; only versions 4 and 5 are TDX quotes"),
                });
            }
        };
        let sig_len = r.u32("signature data length")? as usize;
        let sig = r.take(sig_len, "signature data")?;
        let signature_data = parse_signature(sig)?;
        Ok(Quote {
            header,
            body_type,
            report,
            signature_data,
            trailing_bytes: r.remaining(),
        })
    }

    /// The identity fields for image hashes.
    pub fn identity(&self) -> TdIdentity {
        let rep = &self.report;
        TdIdentity {
            mrtd: rep.mr_td,
            mrconfigid: rep.mr_config_id,
            mrowner: rep.mr_owner,
            mrownerconfig: rep.mr_owner_config,
            rtmr: [rep.rtmr0, rep.rtmr1, rep.rtmr2, rep.rtmr3],
            td_attributes: rep.td_attributes_decoded.value,
            xfam: u64::from_le_bytes(
                hex::decode(&rep.xfam)
                    .ok()
                    .and_then(|v| v.try_into().ok())
                    .unwrap_or([0; 8]),
            ),
        }
    }

    /// `cocoon-v1` image hash of this quote.
    pub fn image_hash_cocoon_v1(&self) -> [u8; 32] {
        cocoon_v1(&self.identity())
    }

    /// `cw-v1` image hash of this quote.
    pub fn image_hash_cw_v1(&self) -> [u8; 32] {
        cw_v1(&self.identity())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture;

    #[test]
    fn every_fixture_quote_parses() {
        let cases = [
            ("quotes/cocoon-test-quote.dat", 4, "1.0"),
            ("quotes/dcap-qvl-tdx_quote", 4, "1.0"),
            ("quotes/dcap-qvl-tdx_quote_outdated", 5, "1.5"),
            ("quotes/dcap-qvl-tdx_quote_td15ex", 5, "1.5ex"),
            ("quotes/go-tdx-guest-quote_v5_sample.dat", 5, "1.5"),
            ("quotes/go-tdx-guest-tdx_prod_quote_SPR_E4.dat", 4, "1.0"),
            ("ccel/go-tdx-guest-cos-113-tdx-quote.dat", 4, "1.0"),
        ];
        for (f, v, kind) in cases {
            let Some(d) = fixture(f) else { return };
            let q = Quote::parse(&d).unwrap_or_else(|e| panic!("{f}: {e}"));
            assert_eq!(q.header.version, v, "{f}");
            assert_eq!(q.report.body_kind, kind, "{f}");
            assert_eq!(q.signature_data.certification_data_type, 6, "{f}");
            assert!(q.signature_data.pem_certificates >= 1, "{f}");
            if kind == "1.5ex" {
                assert_eq!(q.report.td_id.as_ref().map(|s| s.len()), Some(64));
                assert_eq!(
                    q.report.extension.as_ref().map(|s| s.len()),
                    Some((885 - 681) * 2)
                );
            }
        }
    }

    #[test]
    fn cocoon_quote_image_hash_is_over_448_bytes() {
        let Some(d) = fixture("quotes/cocoon-test-quote.dat") else {
            return;
        };
        let q = Quote::parse(&d).expect("parse");
        // The report starts at 48; MRTD at 48+136; the 8 registers are contiguous: 384 bytes.
        let regs = &d[48 + 136..48 + 136 + 384];
        let mut raw = regs.to_vec();
        raw.extend_from_slice(&[0u8; 64]);
        use sha2::Digest;
        let want: [u8; 32] = sha2::Sha256::digest(&raw).into();
        assert_eq!(q.image_hash_cocoon_v1(), want);
    }

    #[test]
    fn bad_quotes_are_errors() {
        assert!(Quote::parse(&[]).is_err());
        let Some(d) = fixture("quotes/dcap-qvl-tdx_quote") else {
            return;
        };
        for cut in [10, 48, 300, 632, 700, 48 + 584 + 4 + 200] {
            assert!(Quote::parse(&d[..cut]).is_err(), "cut {cut}");
        }
        let mut v = d.clone();
        v[0] = 3;
        let e = Quote::parse(&v).expect_err("v3");
        assert!(e.to_string().contains("version 3"), "{e}");
        let mut t = d.clone();
        t[4] = 0;
        assert!(matches!(Quote::parse(&t), Err(Error::Unsupported { .. })));
    }
}
