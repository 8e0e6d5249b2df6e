//! The structured, serde-serializable result of a verification: accepted or not, what was seen, and
//! every reason for a rejection (each with a stable machine code and a human explanation).

use serde::{Deserialize, Serialize};

use crate::quote::RegistersHex;

/// Stable machine-readable reason codes (serialized in snake_case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReasonCode {
    /// The bytes are not a TDX quote this verifier understands.
    QuoteMalformed,
    /// The quote's signature chain (PCK chain, QE report, ISV signature) does not verify.
    QuoteSignatureInvalid,
    /// The collateral (TCB info, QE identity, CRLs, their signatures) is malformed or does not verify.
    CollateralInvalid,
    /// No collateral was available for this quote.
    CollateralMissing,
    /// The verification time is past the collateral's validity window.
    CollateralExpired,
    /// The verification time is before the collateral's validity window.
    CollateralNotYetValid,
    /// The collateral is older than the policy's maximum age.
    CollateralTooOld,
    /// The TCB status is not one the policy allows.
    TcbStatusNotAllowed,
    /// The TD runs with TD_ATTRIBUTES.DEBUG set: its memory is readable by the host.
    DebugTd,
    /// Other TD attributes forbidden by the verification library (migration, profiling, no SEPT_VE_DISABLE...).
    TdAttributesForbidden,
    /// REPORTDATA does not bind the expected key (SHA-512 of the TLS public key).
    ReportDataMismatch,
    /// The image hash is not on the allow-list.
    ImageHashNotAllowed,
    /// The allow-list could not be consulted.
    AllowListUnavailable,
    /// The quote is simulated and the verifier does not allow simulated evidence.
    SimulatedNotAllowed,
    /// The simulated quote is not signed by a trusted simulated-TEE key.
    SimulatedSignatureInvalid,
    /// The certificate could not be parsed.
    CertificateMalformed,
    /// The certificate chain is longer than one certificate (RA-TLS accepts depth 0 only).
    CertificateChainTooLong,
    /// The certificate is outside its validity period.
    CertificateExpired,
    /// The certificate's validity starts in the future.
    CertificateNotYetValid,
    /// The certificate has a critical extension this verifier does not know.
    CertificateUnknownCriticalExtension,
    /// An extension is larger than allowed (32 KiB).
    CertificateExtensionTooLarge,
    /// The certificate carries no quote extension.
    CertificateMissingQuote,
    /// The key is not Ed25519, or the claims extension does not match the key.
    CertificateKeyMismatch,
    /// The certificate is not correctly self-signed.
    CertificateSignatureInvalid,
    /// The peer has no TEE evidence at all (an agent without TDX and without a simulated TEE).
    NoEvidence,
    /// The agent's RTMR3 event log could not be fetched or parsed.
    Rtmr3LogUnavailable,
    /// An event's digest in the agent's RTMR3 log does not match its type and payload (forged log).
    Rtmr3LogInvalid,
    /// Replaying the agent's RTMR3 event log does not give the quote's RTMR3.
    Rtmr3Mismatch,
    /// The RTMR3 `host_config` event does not cover the host config the verifier expects.
    HostConfigMismatch,
    /// RTMR3 events other than `host_config` differ from what the expected host config implies
    /// (missing, extra, reordered, or different model/wallet/root-contract events).
    Rtmr3EventsUnexpected,
    /// The verifier requires a GPU (`--require-gpu`) and the certificate carries no GPU evidence.
    GpuEvidenceMissing,
    /// The GPU evidence extension, its attestation report or its certificates cannot be parsed.
    GpuEvidenceMalformed,
    /// The GPU certificate chain is broken (a signature, issuer link, CA flag or validity).
    GpuCertChainInvalid,
    /// The GPU certificate chain does not end at a pinned root (NVIDIA's Device Identity CA).
    GpuRootUnknown,
    /// The GPU attestation report's signature does not verify with the attestation key (tampered).
    GpuReportSignatureInvalid,
    /// The GPU report's nonce is not SHA-256 of the presented TLS key (replayed or relayed).
    GpuNonceMismatch,
    /// A GPU is not in confidential-computing mode (or runs it in dev-tools mode).
    GpuCcModeOff,
    /// A GPU measurement (or driver/VBIOS version) differs from the verifier's reference values.
    GpuMeasurementMismatch,
    /// The worker's measured host config lets it serve on GPUs without confidential computing
    /// (RTMR3 `dev_gpu_without_cc`) and the verifier does not accept that.
    DevGpuWithoutCc,
}

impl ReasonCode {
    /// The snake_case code, as in JSON.
    pub fn as_str(&self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

/// One reason a piece of evidence was rejected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reason {
    /// Machine-readable code.
    pub code: ReasonCode,
    /// What happened and what to do about it.
    pub message: String,
}

impl Reason {
    /// Build a reason.
    pub fn new(code: ReasonCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// The outcome of verifying a quote (or an RA-TLS certificate carrying one).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Verdict {
    /// True only when no reason was recorded.
    pub accepted: bool,
    /// True when the evidence came from [`crate::simulated::SimulatedTee`], not a real TD.
    pub simulated: bool,
    /// TCB status as reported by the collateral, e.g. "UpToDate", "OutOfDate"; "Simulated" for simulated evidence.
    pub tcb_status: Option<String>,
    /// Intel security advisories that apply to this TCB.
    pub advisory_ids: Vec<String>,
    /// Quote version (4 or 5).
    pub quote_version: Option<u16>,
    /// Cocoon-compatible image hash (hex).
    pub image_hash_cocoon_v1: Option<String>,
    /// Our image hash `cw-v1` (hex): what host-launcher publishes and the allow-list holds by default.
    #[serde(default)]
    pub image_hash_cw_v1: Option<String>,
    /// Which hash was checked against an allow-list (`cw-v1` or `cocoon-v1`); absent: none was.
    #[serde(default)]
    pub image_hash_checked: Option<String>,
    /// RTMR3 event log replay: absent when not checked (a bare quote), else what was found.
    #[serde(default)]
    pub rtmr3: Option<crate::runtime::Rtmr3Check>,
    /// MRTD, MRCONFIGID, MROWNER, MROWNERCONFIG, RTMR0-3 (hex).
    pub registers: Option<RegistersHex>,
    /// TD_ATTRIBUTES (hex of the little-endian u64).
    pub td_attributes: Option<String>,
    /// XFAM (hex of the little-endian u64).
    pub xfam: Option<String>,
    /// MRSEAM (hex).
    pub mr_seam: Option<String>,
    /// REPORTDATA (hex).
    pub report_data: Option<String>,
    /// The TLS public key bound by REPORTDATA (hex), when verifying an RA-TLS certificate.
    pub tls_public_key: Option<String>,
    /// GPU evidence (extension 1.3.6.1.4.1.12345.3): absent when no certificate was checked.
    /// Read `gpu.status`: only `verified` means the GPUs were proven.
    #[serde(default)]
    pub gpu: Option<crate::gpu::GpuVerdict>,
    /// Verification time (Unix seconds).
    pub verified_at: u64,
    /// Collateral validity window (Unix seconds), when known.
    pub collateral_not_before: Option<u64>,
    /// Collateral validity window end (Unix seconds), when known.
    pub collateral_not_after: Option<u64>,
    /// Every reason for rejection (empty when accepted).
    pub reasons: Vec<Reason>,
}

impl Verdict {
    /// Record a reason (and so a rejection).
    pub fn reject(&mut self, code: ReasonCode, message: impl Into<String>) {
        self.reasons.push(Reason::new(code, message));
        self.accepted = false;
    }

    /// Whether a reason with this code was recorded.
    pub fn has(&self, code: ReasonCode) -> bool {
        self.reasons.iter().any(|r| r.code == code)
    }

    /// Set `accepted` from the reasons (accepted exactly when there are none).
    pub fn finish(mut self) -> Self {
        self.accepted = self.reasons.is_empty();
        self
    }

    /// A one-line human summary.
    pub fn summary(&self) -> String {
        if self.accepted {
            let gpu = match &self.gpu {
                Some(g) if g.status == crate::gpu::GpuStatus::Verified => {
                    format!(" gpu=verified({})", g.gpus.len())
                }
                Some(g) if g.status == crate::gpu::GpuStatus::Unchecked => {
                    " gpu=present-NOT-verified".to_owned()
                }
                _ => String::new(),
            };
            format!(
                "accepted: tcb_status={} image_hash_cw_v1={} image_hash_cocoon_v1={}{}{gpu}",
                self.tcb_status.as_deref().unwrap_or("-"),
                self.image_hash_cw_v1.as_deref().unwrap_or("-"),
                self.image_hash_cocoon_v1.as_deref().unwrap_or("-"),
                if self.simulated { " (SIMULATED)" } else { "" }
            )
        } else {
            let codes: Vec<String> = self.reasons.iter().map(|r| r.code.as_str()).collect();
            format!("rejected: {}", codes.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_serialize_snake_case() {
        assert_eq!(ReasonCode::DebugTd.as_str(), "debug_td");
        assert_eq!(
            ReasonCode::TcbStatusNotAllowed.as_str(),
            "tcb_status_not_allowed"
        );
    }

    #[test]
    fn reject_marks_not_accepted_and_finish_recomputes() {
        let mut v = Verdict::default().finish();
        assert!(v.accepted);
        v.reject(ReasonCode::DebugTd, "debug");
        assert!(!v.accepted);
        assert!(v.has(ReasonCode::DebugTd));
        assert!(v.summary().contains("debug_td"));
    }
}
