//! TEST ONLY: a fake GPU with its OWN test certificate authority and attestation key, producing
//! evidence in NVIDIA's format (SPDM 1.1 GET_MEASUREMENTS request || response, ECDSA P-384).
//!
//! Nothing here comes from NVIDIA: the root "cw TEST GPU Device Identity CA" is generated on the
//! fly (never NVIDIA's), so evidence made here verifies only for a verifier that pins this test
//! root ([`TestGpu::policy`]); a verifier pinning only NVIDIA's root rejects it
//! (`gpu_root_unknown`). Used by the unit tests of [`crate::gpu`], the RA-TLS round trip and the
//! tests of other crates (agent, gateway trust flags).

use std::collections::BTreeMap;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
    PKCS_ECDSA_P384_SHA384,
};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair};
use sha2::{Digest, Sha384};

use super::{CcState, GpuEntry, GpuEvidence, GpuPolicy, ReferenceValues, SPDM_REQUEST_LEN};
use crate::ratls::GpuEvidenceProvider;

/// Driver version the test GPU reports.
pub const TEST_DRIVER_VERSION: &str = "550.90.07";
/// VBIOS version bytes the test GPU reports (formatted `96.00.9f.00.01`).
pub const TEST_VBIOS: [u8; 8] = [0x00, 0x9f, 0x00, 0x96, 0x01, 0x00, 0x00, 0x00];

/// A fake GPU: test CA chain (root → intermediate → attestation key) and measurements.
#[derive(Clone)]
pub struct TestGpu {
    /// DER of the test root.
    pub root_der: Vec<u8>,
    /// DER chain, leaf first, root last (3 certificates).
    pub chain: Vec<Vec<u8>>,
    /// The same chain in PEM, as NVML returns it.
    pub chain_pem: String,
    leaf_pkcs8: Vec<u8>,
    /// Measurement blocks (index, 48-byte value).
    pub measurements: Vec<(u8, Vec<u8>)>,
    /// CC state the evidence states.
    pub cc: CcState,
    /// When set, reports are made with this nonce instead of the one asked for (wrong binding).
    pub force_nonce: Option<[u8; 32]>,
}

impl std::fmt::Debug for TestGpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestGpu")
            .field("cc", &self.cc)
            .field("measurements", &self.measurements.len())
            .finish_non_exhaustive()
    }
}

fn params(cn: &str, ca: bool) -> Result<CertificateParams, String> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, "cw TEST ONLY (not NVIDIA)");
    p.distinguished_name = dn;
    // Fixed validity: 2020-01-01 .. 2100-01-01.
    p.not_before =
        time::OffsetDateTime::from_unix_timestamp(1_577_836_800).map_err(|e| e.to_string())?;
    p.not_after =
        time::OffsetDateTime::from_unix_timestamp(4_102_444_800).map_err(|e| e.to_string())?;
    if ca {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    }
    Ok(p)
}

impl TestGpu {
    /// A new test CA (fresh P-384 keys) and a GPU with four measurements, CC on.
    pub fn new() -> Result<Self, String> {
        let e = |e: rcgen::Error| e.to_string();
        let root_key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).map_err(e)?;
        let root =
            CertifiedIssuer::self_signed(params("cw TEST GPU Device Identity CA", true)?, root_key)
                .map_err(e)?;
        let ica_key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).map_err(e)?;
        let ica =
            CertifiedIssuer::signed_by(params("cw TEST GH100 Identity", true)?, ica_key, &root)
                .map_err(e)?;
        let leaf_key = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).map_err(e)?;
        let leaf = params("cw TEST GPU attestation key", false)?
            .signed_by(&leaf_key, &ica)
            .map_err(e)?;
        let measurements = (1u8..=4)
            .map(|i| (i, Sha384::digest([b't', b'e', b's', b't', i]).to_vec()))
            .collect();
        Ok(Self {
            root_der: root.der().to_vec(),
            chain: vec![leaf.der().to_vec(), ica.der().to_vec(), root.der().to_vec()],
            chain_pem: format!("{}{}{}", leaf.pem(), ica.pem(), root.pem()),
            leaf_pkcs8: leaf_key.serialize_der(),
            measurements,
            cc: CcState {
                cc_on: true,
                dev_tools: false,
            },
            force_nonce: None,
        })
    }

    /// An NVIDIA-format attestation report over `nonce`, signed by the test attestation key.
    pub fn report(&self, nonce: &[u8; 32]) -> Result<Vec<u8>, String> {
        let nonce = self.force_nonce.as_ref().unwrap_or(nonce);
        let mut out = vec![0x11, 0xE0, 0x01, 0xFF];
        out.extend_from_slice(nonce);
        out.push(0x00);
        debug_assert_eq!(out.len(), SPDM_REQUEST_LEN);
        let mut record = Vec::new();
        for (idx, value) in &self.measurements {
            let vlen = u16::try_from(value.len()).map_err(|e| e.to_string())?;
            record.push(*idx);
            record.push(1); // DMTF
            record.extend_from_slice(&(vlen + 3).to_le_bytes());
            record.push(0x01); // mutable firmware
            record.extend_from_slice(&vlen.to_le_bytes());
            record.extend_from_slice(value);
        }
        out.extend_from_slice(&[0x11, 0x60, 0x00, 0x00]);
        out.push(u8::try_from(self.measurements.len()).map_err(|e| e.to_string())?);
        let rl = u32::try_from(record.len()).map_err(|e| e.to_string())?;
        out.extend_from_slice(&rl.to_le_bytes()[..3]);
        out.extend_from_slice(&record);
        out.extend_from_slice(&[0x5a; 32]); // responder nonce
        let mut opaque = Vec::new();
        let mut field = |t: u16, v: &[u8]| {
            opaque.extend_from_slice(&t.to_le_bytes());
            opaque.extend_from_slice(&(v.len() as u16).to_le_bytes());
            opaque.extend_from_slice(v);
        };
        field(3, format!("{TEST_DRIVER_VERSION}\0").as_bytes());
        field(6, &TEST_VBIOS);
        field(36, &[0x00]);
        out.extend_from_slice(&(opaque.len() as u16).to_le_bytes());
        out.extend_from_slice(&opaque);
        let rng = SystemRandom::new();
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P384_SHA384_FIXED_SIGNING, &self.leaf_pkcs8, &rng)
                .map_err(|e| e.to_string())?;
        let sig = key.sign(&rng, &out).map_err(|e| e.to_string())?;
        out.extend_from_slice(sig.as_ref());
        Ok(out)
    }

    /// This GPU's entry for `nonce`.
    pub fn entry(&self, nonce: &[u8; 32]) -> Result<GpuEntry, String> {
        Ok(GpuEntry {
            cc: self.cc,
            report: self.report(nonce)?,
            cert_chain: self.chain.clone(),
        })
    }

    /// Reference values equal to this GPU's measurements (and driver/VBIOS versions).
    pub fn reference(&self) -> Result<ReferenceValues, String> {
        let m: BTreeMap<u8, Vec<Vec<u8>>> = self
            .measurements
            .iter()
            .map(|(i, v)| (*i, vec![v.clone()]))
            .collect();
        let mut r = ReferenceValues::new(m).map_err(|e| e.to_string())?;
        r.description = Some("TEST ONLY: the test GPU's own measurements".into());
        r.driver_versions = vec![TEST_DRIVER_VERSION.into()];
        r.vbios_versions = vec!["96.00.9f.00.01".into()];
        Ok(r)
    }

    /// A policy pinning NVIDIA's root and this test root, with [`reference`](Self::reference).
    pub fn policy(&self, required: bool) -> Result<GpuPolicy, String> {
        Ok(GpuPolicy::new(self.reference()?, required).with_root_der(&self.root_der))
    }
}

impl GpuEvidenceProvider for TestGpu {
    fn gpu_evidence(&self, nonce: &[u8; 32]) -> Result<Option<GpuEvidence>, String> {
        Ok(Some(GpuEvidence {
            gpus: vec![self.entry(nonce)?],
        }))
    }
}
