//! GPU evidence for the RA-TLS certificate (the agent side of `attestation::gpu`).
//!
//! Whoever talks to the GPUs (NVML: `nvmlSystemGetConfComputeState` for the CC mode,
//! `nvmlDeviceGetConfComputeGpuAttestationReport(nonce)` for the report,
//! `nvmlDeviceGetConfComputeGpuCertificate` for the PEM attestation chain) plugs a function into
//! [`GpuEvidenceSource::new`]: given the 32-byte nonce it returns each GPU's [`RawGpuEvidence`],
//! or `None` when the machine has no GPU. The [`crate::attest::Attestor`] asks it for every
//! RA-TLS identity it issues, with the nonce [`nonce_for_key`] of that identity's key, and embeds
//! the result in extension `1.3.6.1.4.1.12345.3`.
//!
//! This module holds no NVML code: it converts and validates what the GPU layer returns.

use attestation::gpu::{CcState, GpuEntry, GpuEvidence, pem_chain_to_der};
use attestation::ratls::GpuEvidenceProvider;

/// The nonce each GPU must sign for an RA-TLS key: SHA-256 of its raw 32-byte Ed25519 public key.
pub fn nonce_for_key(public_key: &[u8; 32]) -> [u8; 32] {
    attestation::gpu::gpu_nonce_for_key(public_key)
}

/// One GPU's evidence as the driver returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawGpuEvidence {
    /// `nvmlConfComputeGpuAttestationReport_t.attestationReport[..attestationReportSize]`.
    pub report: Vec<u8>,
    /// `nvmlConfComputeGpuCertificate_t.attestationCertChain[..attestationCertChainSize]` (PEM).
    pub cert_chain_pem: Vec<u8>,
    /// CC mode on (`nvmlConfComputeSystemState_t.ccFeature != 0`).
    pub cc_on: bool,
    /// CC dev-tools mode (`devToolsMode != 0`).
    pub dev_tools: bool,
}

/// The function that asks the GPUs: nonce → every GPU's evidence (`Ok(None)`: no GPU).
pub type GpuEvidenceFn =
    dyn Fn(&[u8; 32]) -> Result<Option<Vec<RawGpuEvidence>>, String> + Send + Sync;

/// Adapts a [`GpuEvidenceFn`] to the attestation crate's [`GpuEvidenceProvider`].
pub struct GpuEvidenceSource {
    f: Box<GpuEvidenceFn>,
}

impl std::fmt::Debug for GpuEvidenceSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GpuEvidenceSource").finish_non_exhaustive()
    }
}

impl GpuEvidenceSource {
    /// Wrap the GPU layer's function.
    pub fn new(
        f: impl Fn(&[u8; 32]) -> Result<Option<Vec<RawGpuEvidence>>, String> + Send + Sync + 'static,
    ) -> Self {
        Self { f: Box::new(f) }
    }
}

/// Convert the driver's raw evidence into the extension's structure (PEM chain → DER
/// certificates). Errors name the GPU and what is wrong.
pub fn to_evidence(raw: &[RawGpuEvidence]) -> Result<GpuEvidence, String> {
    let mut gpus = Vec::with_capacity(raw.len());
    for (i, r) in raw.iter().enumerate() {
        let cert_chain =
            pem_chain_to_der(&r.cert_chain_pem).map_err(|e| format!("GPU {i}: {e}"))?;
        gpus.push(GpuEntry {
            cc: CcState {
                cc_on: r.cc_on,
                dev_tools: r.dev_tools,
            },
            report: r.report.clone(),
            cert_chain,
        });
    }
    Ok(GpuEvidence { gpus })
}

impl GpuEvidenceProvider for GpuEvidenceSource {
    fn gpu_evidence(&self, nonce: &[u8; 32]) -> Result<Option<GpuEvidence>, String> {
        match (self.f)(nonce)? {
            None => Ok(None),
            Some(raw) if raw.is_empty() => Ok(None),
            Some(raw) => to_evidence(&raw).map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use attestation::gpu::testing::TestGpu;

    /// A source backed by the attestation crate's TEST GPU (our own test CA, not NVIDIA's).
    pub(crate) fn test_source(g: TestGpu) -> GpuEvidenceSource {
        GpuEvidenceSource::new(move |nonce| {
            Ok(Some(vec![RawGpuEvidence {
                report: g.report(nonce)?,
                cert_chain_pem: g.chain_pem.clone().into_bytes(),
                cc_on: g.cc.cc_on,
                dev_tools: g.cc.dev_tools,
            }]))
        })
    }

    #[test]
    fn raw_evidence_converts_and_bad_pem_is_an_error() {
        let g = TestGpu::new().expect("gpu");
        let src = test_source(g.clone());
        let ev = src.gpu_evidence(&[1; 32]).expect("ok").expect("some");
        assert_eq!(ev.gpus[0].cert_chain, g.chain);
        assert!(ev.gpus[0].cc.cc_on);
        let none = GpuEvidenceSource::new(|_| Ok(Some(Vec::new())));
        assert_eq!(none.gpu_evidence(&[0; 32]), Ok(None));
        let bad = GpuEvidenceSource::new(|_| {
            Ok(Some(vec![RawGpuEvidence {
                report: vec![1],
                cert_chain_pem: b"garbage".to_vec(),
                cc_on: true,
                dev_tools: false,
            }]))
        });
        let e = bad.gpu_evidence(&[0; 32]).expect_err("bad pem");
        assert!(e.starts_with("GPU 0:"), "{e}");
        assert_eq!(
            nonce_for_key(&[2; 32]),
            attestation::gpu::gpu_nonce_for_key(&[2; 32])
        );
    }
}
