//! Cocoon-compatible RA-TLS certificates.
//!
//! Issuing (inside the TD): a fresh Ed25519 key, REPORTDATA = SHA-512(raw 32-byte public key), a quote
//! over it, and a self-signed X.509 certificate valid one day with two critical extensions:
//! [`OID_QUOTE`] (`1.3.6.1.4.1.12345.1`) = the raw quote (at most 32 KiB) and [`OID_CLAIMS`]
//! (`1.3.6.1.4.1.12345.2`) = the claims (the 32-byte public key). Rotate hourly
//! ([`RaTlsIdentity::needs_rotation`]). With GPUs, a third, non-critical extension
//! [`crate::gpu::OID_GPU`] (`1.3.6.1.4.1.12345.3`) carries each GPU's NVIDIA attestation report
//! (nonce = SHA-256 of the public key) and certificate chain; see [`crate::gpu`] for its format.
//!
//! Verifying: depth 0 only, Ed25519 only, correctly self-signed, inside its validity, only known
//! critical extensions, no extension over 32 KiB, claims equal to the key, then the full quote
//! verification with REPORTDATA bound to the key, then the GPU evidence
//! ([`crate::gpu::check_evidence`]). Malformed input gives reasons, never a panic.

use std::time::Duration;

use rcgen::{CertificateParams, CustomExtension, DistinguishedName, DnType, KeyPair, PKCS_ED25519};
use ring::signature::{ED25519, UnparsedPublicKey};
use sha2::{Digest, Sha512};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::gpu::{GpuEvidence, OID_GPU, OID_GPU_STR, gpu_nonce_for_key};
use crate::verdict::{ReasonCode, Verdict};
use crate::verify::Verifier;

/// OID of the quote extension.
pub const OID_QUOTE: &[u64] = &[1, 3, 6, 1, 4, 1, 12345, 1];
/// OID of the claims extension.
pub const OID_CLAIMS: &[u64] = &[1, 3, 6, 1, 4, 1, 12345, 2];
const OID_QUOTE_STR: &str = "1.3.6.1.4.1.12345.1";
const OID_CLAIMS_STR: &str = "1.3.6.1.4.1.12345.2";
const OID_ED25519_STR: &str = "1.3.101.112";
/// Critical extensions a verifier understands besides ours: key usage, SAN, basic constraints, EKU.
const KNOWN_CRITICAL: &[&str] = &[
    OID_QUOTE_STR,
    OID_CLAIMS_STR,
    "2.5.29.15",
    "2.5.29.17",
    "2.5.29.19",
    "2.5.29.37",
];
/// Largest accepted extension value (and quote).
pub const MAX_EXTENSION_LEN: usize = 32 * 1024;
/// Largest accepted certificate.
pub const MAX_CERT_LEN: usize = 2 * MAX_EXTENSION_LEN + 4096;
/// Certificate lifetime.
pub const CERT_VALIDITY: Duration = Duration::from_secs(24 * 3600);
/// Rotation period.
pub const ROTATION_PERIOD: Duration = Duration::from_secs(3600);
/// Back-dating of notBefore to tolerate clock skew.
pub const CLOCK_SKEW: Duration = Duration::from_secs(300);

/// Errors while issuing an RA-TLS identity.
#[derive(Debug, thiserror::Error)]
pub enum RaTlsError {
    /// The quote provider failed.
    #[error("getting a quote failed: {0}")]
    Quote(String),
    /// The quote is too large for the extension.
    #[error("quote is {0} bytes, more than the 32 KiB an RA-TLS extension may carry")]
    QuoteTooLarge(usize),
    /// Certificate generation failed.
    #[error("certificate generation failed: {0}")]
    Certificate(String),
    /// The GPU evidence provider failed, or its evidence does not fit the extension.
    #[error("getting GPU evidence failed: {0}")]
    Gpu(String),
}

/// Something that turns 64 bytes of REPORTDATA into a quote: the TD (see [`crate::guest`]) or the
/// [`crate::SimulatedTee`].
pub trait QuoteProvider: Send + Sync {
    /// A quote binding `report_data`.
    fn quote(&self, report_data: &[u8; 64]) -> Result<Vec<u8>, String>;
}

impl QuoteProvider for crate::simulated::SimulatedTee {
    fn quote(&self, report_data: &[u8; 64]) -> Result<Vec<u8>, String> {
        Ok(crate::simulated::SimulatedTee::quote(self, report_data))
    }
}

/// Something that asks the GPUs for their attestation evidence with a nonce (inside the TD:
/// NVML's `nvmlDeviceGetConfComputeGpuAttestationReport` and `...GpuCertificate`).
/// `Ok(None)`: there is no GPU (the certificate then carries no GPU extension).
pub trait GpuEvidenceProvider: Send + Sync {
    /// Evidence of every GPU, each report made with `nonce`
    /// (= [`crate::gpu::gpu_nonce_for_key`] of the certificate's key).
    fn gpu_evidence(&self, nonce: &[u8; 32]) -> Result<Option<GpuEvidence>, String>;
}

/// REPORTDATA binding an Ed25519 public key: SHA-512 of its 32 raw bytes.
pub fn report_data_for_key(public_key: &[u8; 32]) -> [u8; 64] {
    Sha512::digest(public_key).into()
}

/// A certificate and its private key, as issued inside the TD.
#[derive(Clone)]
pub struct RaTlsIdentity {
    /// DER certificate.
    pub cert_der: Vec<u8>,
    /// PKCS#8 DER private key.
    pub key_pkcs8_der: Vec<u8>,
    /// Raw Ed25519 public key.
    pub public_key: [u8; 32],
    /// When it was issued (Unix seconds).
    pub issued_at: u64,
    /// notAfter (Unix seconds).
    pub not_after: u64,
}

impl std::fmt::Debug for RaTlsIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RaTlsIdentity")
            .field("public_key", &hex::encode(self.public_key))
            .field("issued_at", &self.issued_at)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl RaTlsIdentity {
    /// Generate a key, get a quote binding it from `provider`, and self-sign a certificate valid
    /// from `now - 5 min` to `now + 1 day`.
    pub fn generate(provider: &dyn QuoteProvider, now_unix: u64) -> Result<Self, RaTlsError> {
        Self::build(Some(provider), None, now_unix)
    }

    /// As [`generate`](Self::generate), also embedding the GPU evidence `gpu` gives for the nonce
    /// SHA-256(public key) in extension `1.3.6.1.4.1.12345.3` (none when it reports no GPU).
    /// A failing GPU provider fails the whole issue: the caller decides whether to serve without
    /// GPU evidence (verifiers requiring a GPU will then reject it).
    pub fn generate_with_gpu(
        provider: &dyn QuoteProvider,
        gpu: &dyn GpuEvidenceProvider,
        now_unix: u64,
    ) -> Result<Self, RaTlsError> {
        Self::build(Some(provider), Some(gpu), now_unix)
    }

    /// A certificate of the same shape but WITHOUT a quote extension: what an agent that has no
    /// TEE evidence at all (no TDX, no simulated TEE) serves, so that TLS still works while every
    /// verifier rejects it ("certificate has no quote extension").
    pub fn generate_unattested(now_unix: u64) -> Result<Self, RaTlsError> {
        Self::build(None, None, now_unix)
    }

    fn build(
        provider: Option<&dyn QuoteProvider>,
        gpu: Option<&dyn GpuEvidenceProvider>,
        now_unix: u64,
    ) -> Result<Self, RaTlsError> {
        let cert_err = |e: rcgen::Error| RaTlsError::Certificate(e.to_string());
        let key = KeyPair::generate_for(&PKCS_ED25519).map_err(cert_err)?;
        let mut public_key = [0u8; 32];
        let raw = key.public_key_raw();
        if raw.len() != 32 {
            return Err(RaTlsError::Certificate(format!(
                "Ed25519 public key has {} bytes",
                raw.len()
            )));
        }
        public_key.copy_from_slice(raw);
        let quote = match provider {
            Some(p) => Some(
                p.quote(&report_data_for_key(&public_key))
                    .map_err(RaTlsError::Quote)?,
            ),
            None => None,
        };
        if let Some(q) = &quote
            && q.len() > MAX_EXTENSION_LEN
        {
            return Err(RaTlsError::QuoteTooLarge(q.len()));
        }
        let gpu_ext = match gpu {
            Some(g) => match g
                .gpu_evidence(&gpu_nonce_for_key(&public_key))
                .map_err(RaTlsError::Gpu)?
            {
                Some(ev) => {
                    let bytes = ev.encode().map_err(|e| RaTlsError::Gpu(e.to_string()))?;
                    if bytes.len() > MAX_EXTENSION_LEN {
                        return Err(RaTlsError::Gpu(format!(
                            "GPU evidence of {} GPUs is {} bytes, more than the 32 KiB an RA-TLS \
                             extension may carry",
                            ev.gpus.len(),
                            bytes.len()
                        )));
                    }
                    Some(bytes)
                }
                None => None,
            },
            None => None,
        };
        let ts = |secs: u64| {
            i64::try_from(secs)
                .ok()
                .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
                .ok_or_else(|| RaTlsError::Certificate(format!("time {secs} out of range")))
        };
        let not_after = now_unix + CERT_VALIDITY.as_secs();
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(cert_err)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "confidential-worker RA-TLS");
        params.distinguished_name = dn;
        params.not_before = ts(now_unix.saturating_sub(CLOCK_SKEW.as_secs()))?;
        params.not_after = ts(not_after)?;
        let mut serial = [0u8; 16];
        serial.copy_from_slice(&public_key[..16]);
        serial[0] &= 0x7f;
        params.serial_number = Some(serial.to_vec().into());
        let mut c = CustomExtension::from_oid_content(OID_CLAIMS, public_key.to_vec());
        c.set_criticality(true);
        params.custom_extensions = match quote {
            Some(quote) => {
                let mut q = CustomExtension::from_oid_content(OID_QUOTE, quote);
                q.set_criticality(true);
                vec![q, c]
            }
            None => vec![c],
        };
        if let Some(g) = gpu_ext {
            // Non-critical: verifiers that do not know it ignore it (and claim nothing of GPUs).
            params
                .custom_extensions
                .push(CustomExtension::from_oid_content(OID_GPU, g));
        }
        let cert = params.self_signed(&key).map_err(cert_err)?;
        Ok(Self {
            cert_der: cert.der().to_vec(),
            key_pkcs8_der: key.serialize_der(),
            public_key,
            issued_at: now_unix,
            not_after,
        })
    }

    /// True when the certificate is an hour old or within an hour of expiry: issue a new one.
    pub fn needs_rotation(&self, now_unix: u64) -> bool {
        now_unix >= self.issued_at + ROTATION_PERIOD.as_secs()
            || now_unix + ROTATION_PERIOD.as_secs() >= self.not_after
            || now_unix < self.issued_at.saturating_sub(CLOCK_SKEW.as_secs())
    }
}

/// The RA-TLS parts of a certificate that passed the structural checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedRaTlsCert {
    /// Raw Ed25519 public key.
    pub public_key: [u8; 32],
    /// The quote extension.
    pub quote: Option<Vec<u8>>,
    /// The claims extension.
    pub claims: Option<Vec<u8>>,
    /// The GPU evidence extension ([`crate::gpu`]).
    pub gpu: Option<Vec<u8>>,
    /// DER SubjectPublicKeyInfo (for TLS signature checks).
    pub spki_der: Vec<u8>,
}

/// Structural checks of an RA-TLS certificate at `now_unix`. Records reasons in `v`; returns the
/// parsed parts when the certificate could be parsed at all.
pub fn check_certificate(der: &[u8], now_unix: u64, v: &mut Verdict) -> Option<ParsedRaTlsCert> {
    if der.len() > MAX_CERT_LEN {
        v.reject(
            ReasonCode::CertificateMalformed,
            format!(
                "certificate is {} bytes, more than the {MAX_CERT_LEN} accepted",
                der.len()
            ),
        );
        return None;
    }
    let cert = match X509Certificate::from_der(der) {
        Ok(([], c)) => c,
        Ok(_) => {
            v.reject(
                ReasonCode::CertificateMalformed,
                "certificate has trailing bytes after its DER encoding",
            );
            return None;
        }
        Err(e) => {
            v.reject(
                ReasonCode::CertificateMalformed,
                format!("certificate is not valid DER X.509: {e}"),
            );
            return None;
        }
    };
    let spki = cert.public_key();
    let alg = spki.algorithm.algorithm.to_id_string();
    let key_bytes = spki.subject_public_key.data.as_ref();
    let public_key: [u8; 32] = match (alg.as_str(), <[u8; 32]>::try_from(key_bytes)) {
        (OID_ED25519_STR, Ok(k)) => k,
        _ => {
            v.reject(
                ReasonCode::CertificateKeyMismatch,
                format!("certificate key is not a 32-byte Ed25519 key (algorithm {alg})"),
            );
            return None;
        }
    };
    v.tls_public_key = Some(hex::encode(public_key));

    let nb = cert.validity().not_before.timestamp();
    let na = cert.validity().not_after.timestamp();
    let now = i64::try_from(now_unix).unwrap_or(i64::MAX);
    if now < nb {
        v.reject(
            ReasonCode::CertificateNotYetValid,
            format!("certificate is valid only from Unix time {nb} (now {now}); check clocks"),
        );
    } else if now > na {
        v.reject(
            ReasonCode::CertificateExpired,
            format!("certificate expired at Unix time {na} (now {now}); the peer must rotate it"),
        );
    }

    // Everything outside the signed TBS must be exactly the canonical envelope:
    // SEQUENCE { tbs, AlgorithmIdentifier{Ed25519}, BIT STRING (64-byte signature) }.
    // Parsers are lenient there, and nothing unsigned may vary.
    let tail_ok = envelope_is_canonical(der, cert.tbs_certificate.as_ref());
    let self_signed = tail_ok
        && cert.subject() == cert.issuer()
        && cert.signature_algorithm.algorithm.to_id_string() == OID_ED25519_STR
        && UnparsedPublicKey::new(&ED25519, public_key)
            .verify(
                cert.tbs_certificate.as_ref(),
                cert.signature_value.data.as_ref(),
            )
            .is_ok();
    if !self_signed {
        v.reject(
            ReasonCode::CertificateSignatureInvalid,
            "certificate is not self-signed with its own Ed25519 key",
        );
    }

    let mut quote = None;
    let mut claims = None;
    let mut gpu = None;
    for ext in cert.extensions() {
        let oid = ext.oid.to_id_string();
        if ext.value.len() > MAX_EXTENSION_LEN {
            v.reject(
                ReasonCode::CertificateExtensionTooLarge,
                format!(
                    "extension {oid} is {} bytes, more than {MAX_EXTENSION_LEN}",
                    ext.value.len()
                ),
            );
            continue;
        }
        if ext.critical && !KNOWN_CRITICAL.contains(&oid.as_str()) {
            v.reject(
                ReasonCode::CertificateUnknownCriticalExtension,
                format!("certificate has unknown critical extension {oid}"),
            );
        }
        let slot = match oid.as_str() {
            OID_QUOTE_STR => &mut quote,
            OID_CLAIMS_STR => &mut claims,
            OID_GPU_STR => &mut gpu,
            _ => continue,
        };
        if slot.is_some() {
            v.reject(
                ReasonCode::CertificateMalformed,
                format!("extension {oid} appears twice"),
            );
        }
        *slot = Some(ext.value.to_vec());
    }
    Some(ParsedRaTlsCert {
        public_key,
        quote,
        claims,
        gpu,
        spki_der: spki.raw.to_vec(),
    })
}

const ED25519_TAIL: [u8; 10] = [0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x41, 0x00];

fn envelope_is_canonical(der: &[u8], tbs: &[u8]) -> bool {
    let content = tbs.len() + ED25519_TAIL.len() + 64;
    let mut expect = vec![0x30];
    if content < 0x80 {
        expect.push(content as u8);
    } else {
        let bytes = content.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        expect.push(0x80 | (bytes.len() - skip) as u8);
        expect.extend_from_slice(&bytes[skip..]);
    }
    let h = expect.len();
    der.len() == h + content
        && der[..h] == expect[..]
        && &der[h..h + tbs.len()] == tbs
        && der[h + tbs.len()..der.len() - 64] == ED25519_TAIL
}

/// Full verification of an RA-TLS certificate: structure (at `now_unix`), then the quote (at the
/// verifier's effective time) with REPORTDATA = SHA-512(certificate key). `chain_len` is the number of
/// certificates the peer sent (RA-TLS accepts exactly one).
pub fn verify_certificate(
    verifier: &Verifier,
    der: &[u8],
    chain_len: usize,
    now_unix: u64,
) -> Verdict {
    let mut v = Verdict::default();
    if chain_len != 1 {
        v.reject(
            ReasonCode::CertificateChainTooLong,
            format!("peer sent {chain_len} certificates; RA-TLS accepts one self-signed certificate (depth 0)"),
        );
    }
    let Some(parsed) = check_certificate(der, now_unix, &mut v) else {
        v.verified_at = verifier.effective_time(now_unix);
        return v.finish();
    };
    match &parsed.claims {
        Some(c) if c.as_slice() == parsed.public_key.as_slice() => {}
        Some(_) => v.reject(
            ReasonCode::CertificateKeyMismatch,
            "claims extension does not equal the certificate's public key",
        ),
        None => v.reject(
            ReasonCode::CertificateKeyMismatch,
            "certificate has no claims extension (1.3.6.1.4.1.12345.2)",
        ),
    }
    let Some(quote) = &parsed.quote else {
        v.reject(
            ReasonCode::CertificateMissingQuote,
            "certificate has no quote extension (1.3.6.1.4.1.12345.1): the peer presents no TEE \
             evidence at all (an agent with neither TDX nor a simulated TEE serves such a \
             certificate); nothing about it can be trusted",
        );
        crate::gpu::check_evidence(
            verifier.gpu_policy(),
            parsed.gpu.as_deref(),
            &parsed.public_key,
            now_unix,
            &mut v,
        );
        v.verified_at = verifier.effective_time(now_unix);
        return v.finish();
    };
    let expected = report_data_for_key(&parsed.public_key);
    let mut qv = verifier.verify_quote(quote, Some(&expected), verifier.effective_time(now_unix));
    let mut reasons = std::mem::take(&mut v.reasons);
    reasons.append(&mut qv.reasons);
    qv.reasons = reasons;
    qv.tls_public_key = v.tls_public_key;
    crate::gpu::check_evidence(
        verifier.gpu_policy(),
        parsed.gpu.as_deref(),
        &parsed.public_key,
        now_unix,
        &mut qv,
    );
    qv.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Policy;
    use crate::quote::TdRegisters;
    use crate::simulated::SimulatedTee;

    const NOW: u64 = 1_800_000_000;

    fn tee() -> SimulatedTee {
        SimulatedTee::from_seed(&[4; 32], TdRegisters::default()).expect("tee")
    }

    #[test]
    fn issued_certificate_verifies_with_simulation_allowed() {
        let t = tee();
        let id = RaTlsIdentity::generate(&t, NOW).expect("id");
        let ver = Verifier::simulated(Policy::default().with_simulated(true), t.public_key());
        let v = verify_certificate(&ver, &id.cert_der, 1, NOW + 10);
        assert!(v.accepted, "{:?}", v.reasons);
        assert!(v.simulated);
        assert_eq!(v.tls_public_key, Some(hex::encode(id.public_key)));
        let strict = Verifier::simulated(Policy::default(), t.public_key());
        let v = verify_certificate(&strict, &id.cert_der, 1, NOW + 10);
        assert!(v.has(ReasonCode::SimulatedNotAllowed));
    }

    #[test]
    fn unattested_certificate_is_rejected_for_missing_evidence() {
        let id = RaTlsIdentity::generate_unattested(NOW).expect("id");
        let ver = Verifier::simulated(Policy::default().with_simulated(true), [0; 32]);
        let v = verify_certificate(&ver, &id.cert_der, 1, NOW);
        assert!(
            v.has(ReasonCode::CertificateMissingQuote),
            "{:?}",
            v.reasons
        );
        assert_eq!(v.reasons.len(), 1, "{:?}", v.reasons);
        assert!(v.reasons[0].message.contains("no TEE"));
    }

    #[test]
    fn rotation_is_hourly_and_validity_enforced() {
        let t = tee();
        let id = RaTlsIdentity::generate(&t, NOW).expect("id");
        assert!(!id.needs_rotation(NOW + 3599));
        assert!(id.needs_rotation(NOW + 3600));
        let ver = Verifier::simulated(Policy::default().with_simulated(true), t.public_key());
        assert!(
            verify_certificate(&ver, &id.cert_der, 1, NOW + 2 * 86400)
                .has(ReasonCode::CertificateExpired)
        );
        assert!(
            verify_certificate(&ver, &id.cert_der, 1, NOW - 3600)
                .has(ReasonCode::CertificateNotYetValid)
        );
        assert!(
            verify_certificate(&ver, &id.cert_der, 2, NOW).has(ReasonCode::CertificateChainTooLong)
        );
    }

    /// A provider that binds the wrong REPORTDATA.
    struct WrongBinding(SimulatedTee);
    impl QuoteProvider for WrongBinding {
        fn quote(&self, _rd: &[u8; 64]) -> Result<Vec<u8>, String> {
            Ok(self.0.quote(&[0xee; 64]))
        }
    }

    #[test]
    fn wrong_key_binding_is_rejected() {
        let t = tee();
        let key = t.public_key();
        let id = RaTlsIdentity::generate(&WrongBinding(t), NOW).expect("id");
        let ver = Verifier::simulated(Policy::default().with_simulated(true), key);
        let v = verify_certificate(&ver, &id.cert_der, 1, NOW);
        assert!(v.has(ReasonCode::ReportDataMismatch), "{:?}", v.reasons);
    }

    fn cert_with(exts: Vec<CustomExtension>) -> Vec<u8> {
        let key = KeyPair::generate_for(&PKCS_ED25519).expect("key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        p.not_before = time::OffsetDateTime::from_unix_timestamp(NOW as i64 - 10).expect("t");
        p.not_after = time::OffsetDateTime::from_unix_timestamp(NOW as i64 + 10).expect("t");
        p.custom_extensions = exts;
        p.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn unknown_critical_and_oversized_extensions_are_rejected() {
        let mut unknown = CustomExtension::from_oid_content(&[1, 2, 3, 4], vec![0x05, 0x00]);
        unknown.set_criticality(true);
        let der = cert_with(vec![unknown]);
        let ver = Verifier::simulated(Policy::default().with_simulated(true), [0; 32]);
        let v = verify_certificate(&ver, &der, 1, NOW);
        assert!(v.has(ReasonCode::CertificateUnknownCriticalExtension));
        assert!(v.has(ReasonCode::CertificateMissingQuote));
        let big = CustomExtension::from_oid_content(OID_QUOTE, vec![0u8; MAX_EXTENSION_LEN + 1]);
        let v = verify_certificate(&ver, &cert_with(vec![big]), 1, NOW);
        assert!(
            v.has(ReasonCode::CertificateExtensionTooLarge),
            "{:?}",
            v.reasons
        );
    }

    #[test]
    fn garbage_and_non_ed25519_certificates_are_rejected() {
        let ver = Verifier::simulated(Policy::default().with_simulated(true), [0; 32]);
        assert!(
            verify_certificate(&ver, b"not a cert", 1, NOW).has(ReasonCode::CertificateMalformed)
        );
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let der = CertificateParams::new(Vec::<String>::new())
            .expect("p")
            .self_signed(&key)
            .expect("c")
            .der()
            .to_vec();
        assert!(verify_certificate(&ver, &der, 1, NOW).has(ReasonCode::CertificateKeyMismatch));
    }
}
