//! The verifier: parse a quote, verify its signature chain and TCB with dcap-qvl against collateral
//! (or a simulated quote against trusted simulator keys), apply the [`Policy`], check the REPORTDATA
//! key binding and the image-hash allow-list, and return a [`Verdict`] carrying every reason.
//!
//! Image hashes: the allow-list is checked with the `cw-v1` hash by default (what host-launcher
//! publishes on chain and `measurements.json` carries: it covers TD_ATTRIBUTES and XFAM and leaves
//! out the per-host RTMR3), computed by `measurements::image_hash::cw_v1`; `cocoon-v1` (Telegram's
//! Cocoon roots) is an explicit option ([`ImageHashKind::CocoonV1`]). The verdict reports both.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dcap_qvl::configs::{RingConfig, RustCryptoConfig};
use dcap_qvl::tcb_info::{Tcb, TcbComponents, TcbInfo, TcbLevel, TcbStatus};
use dcap_qvl::verify::QuoteVerifier;

use crate::allowlist::AllowList;
use crate::collateral::{
    CollateralSource, NoCollateral, QuoteCollateralV3, collateral_window, format_rfc3339,
};
use crate::policy::Policy;
use crate::quote::parse_quote;
use crate::simulated::{is_simulated, verify_simulated};
use crate::verdict::{ReasonCode, Verdict};

/// Unix seconds of a system time (0 before 1970).
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Which implementation dcap-qvl uses for ECDSA P-256 / SHA-2 (same results, different speed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CryptoBackend {
    /// ring (assembly-optimized; the default).
    #[default]
    Ring,
    /// RustCrypto (pure Rust).
    RustCrypto,
}

/// Which image hash the allow-list holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ImageHashKind {
    /// `cw-v1` (ours; the default): covers TD_ATTRIBUTES and XFAM, not RTMR3.
    #[default]
    CwV1,
    /// `cocoon-v1` (Telegram Cocoon's root contract): covers RTMR3, not TD_ATTRIBUTES/XFAM.
    CocoonV1,
}

impl ImageHashKind {
    /// The name used in messages and on the command line (`cw-v1`, `cocoon-v1`).
    pub fn name(self) -> &'static str {
        match self {
            ImageHashKind::CwV1 => "cw-v1",
            ImageHashKind::CocoonV1 => "cocoon-v1",
        }
    }
}

impl std::str::FromStr for ImageHashKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cw-v1" => Ok(Self::CwV1),
            "cocoon-v1" => Ok(Self::CocoonV1),
            other => Err(format!(
                "unknown image hash kind {other:?}: use cw-v1 (default) or cocoon-v1"
            )),
        }
    }
}

/// The `cw-v1` image hash of a parsed quote, computed exactly as `measurements` does.
pub fn image_hash_cw_v1(q: &crate::quote::ParsedQuote) -> [u8; 32] {
    use measurements::Mr;
    let r = &q.registers;
    measurements::image_hash::cw_v1(&measurements::image_hash::TdIdentity {
        mrtd: Mr(r.mrtd),
        mrconfigid: Mr(r.mrconfigid),
        mrowner: Mr(r.mrowner),
        mrownerconfig: Mr(r.mrownerconfig),
        rtmr: [Mr(r.rtmr[0]), Mr(r.rtmr[1]), Mr(r.rtmr[2]), Mr(r.rtmr[3])],
        td_attributes: q.td_attributes,
        xfam: q.xfam,
    })
}

/// Verifies TDX quotes (and, through [`crate::ratls`], RA-TLS certificates).
#[derive(Debug, Clone)]
pub struct Verifier {
    /// The policy applied after the cryptographic checks.
    pub policy: Policy,
    root_ca_der: Option<Vec<u8>>,
    collateral: Arc<dyn CollateralSource>,
    allow_list: Option<Arc<dyn AllowList>>,
    simulated_keys: Vec<[u8; 32]>,
    fixed_time: Option<u64>,
    backend: CryptoBackend,
    image_hash_kind: ImageHashKind,
    expected_host_config: Option<Arc<Vec<u8>>>,
    gpu_policy: Option<Arc<crate::gpu::GpuPolicy>>,
}

impl Verifier {
    /// A verifier pinning Intel's SGX/TDX root CA, with the given policy and collateral source.
    pub fn new(policy: Policy, collateral: Arc<dyn CollateralSource>) -> Self {
        Self {
            policy,
            root_ca_der: None,
            collateral,
            allow_list: None,
            simulated_keys: Vec::new(),
            fixed_time: None,
            backend: CryptoBackend::default(),
            image_hash_kind: ImageHashKind::default(),
            expected_host_config: None,
            gpu_policy: None,
        }
    }

    /// A verifier for simulated evidence only (no collateral), trusting `simulator_key`.
    /// Still refuses everything unless `policy.allow_simulated` is true.
    pub fn simulated(policy: Policy, simulator_key: [u8; 32]) -> Self {
        Self::new(policy, Arc::new(NoCollateral)).with_simulated_key(simulator_key)
    }

    /// Check image hashes against `list` (without one, image hashes are reported, not checked).
    pub fn with_allow_list(mut self, list: Arc<dyn AllowList>) -> Self {
        self.allow_list = Some(list);
        self
    }

    /// Which image hash the allow-list holds (default `cw-v1`).
    pub fn with_image_hash_kind(mut self, kind: ImageHashKind) -> Self {
        self.image_hash_kind = kind;
        self
    }

    /// The image hash kind checked against the allow-list.
    pub fn image_hash_kind(&self) -> ImageHashKind {
        self.image_hash_kind
    }

    /// Expect the agent's RTMR3 `host_config` event to cover exactly these host-config bytes
    /// (checked by [`crate::runtime::check_rtmr3`] when the agent's event log is fetched).
    pub fn with_expected_host_config(mut self, bytes: Vec<u8>) -> Self {
        self.expected_host_config = Some(Arc::new(bytes));
        self
    }

    /// The host-config bytes this verifier expects, if any.
    pub fn expected_host_config(&self) -> Option<&[u8]> {
        self.expected_host_config.as_deref().map(Vec::as_slice)
    }

    /// Check GPU evidence in RA-TLS certificates against `policy` (pinned roots, reference
    /// values, whether a GPU is required). Without it, GPU evidence is reported as unchecked.
    pub fn with_gpu_policy(mut self, policy: crate::gpu::GpuPolicy) -> Self {
        self.gpu_policy = Some(Arc::new(policy));
        self
    }

    /// The GPU policy, if any.
    pub fn gpu_policy(&self) -> Option<&crate::gpu::GpuPolicy> {
        self.gpu_policy.as_deref()
    }

    /// Trust a simulated-TEE public key (only used when the policy allows simulated evidence).
    pub fn with_simulated_key(mut self, key: [u8; 32]) -> Self {
        self.simulated_keys.push(key);
        self
    }

    /// Pin another root CA (DER) instead of Intel's (tests only).
    pub fn with_root_ca(mut self, der: Vec<u8>) -> Self {
        self.root_ca_der = Some(der);
        self
    }

    /// Verify at a fixed time instead of the clock (for TLS handshakes with archived collateral).
    pub fn with_fixed_time(mut self, unix_secs: u64) -> Self {
        self.fixed_time = Some(unix_secs);
        self
    }

    /// Choose dcap-qvl's crypto backend.
    pub fn with_backend(mut self, backend: CryptoBackend) -> Self {
        self.backend = backend;
        self
    }

    /// The time to verify at: the fixed time if set, else `now`.
    pub fn effective_time(&self, now: u64) -> u64 {
        self.fixed_time.unwrap_or(now)
    }

    /// Verify a quote, fetching collateral from this verifier's source.
    /// `expected_report_data`: the REPORTDATA the quote must carry (e.g. SHA-512 of a TLS key).
    pub fn verify_quote(
        &self,
        raw: &[u8],
        expected_report_data: Option<&[u8; 64]>,
        at_unix: u64,
    ) -> Verdict {
        let needs_collateral = parse_quote(raw).map(|q| !is_simulated(&q)).unwrap_or(false);
        if needs_collateral {
            match self.collateral.collateral_for(raw) {
                Ok(c) => self.verify_quote_with(raw, Some(&c), expected_report_data, at_unix),
                Err(e) => {
                    let mut v = self.verify_quote_with(raw, None, expected_report_data, at_unix);
                    v.reject(ReasonCode::CollateralMissing, e.to_string());
                    v
                }
            }
        } else {
            self.verify_quote_with(raw, None, expected_report_data, at_unix)
        }
    }

    /// Verify a quote with the given collateral (`None`: only simulated quotes can pass).
    pub fn verify_quote_with(
        &self,
        raw: &[u8],
        collateral: Option<&QuoteCollateralV3>,
        expected_report_data: Option<&[u8; 64]>,
        at_unix: u64,
    ) -> Verdict {
        let mut v = Verdict {
            verified_at: at_unix,
            ..Verdict::default()
        };
        let q = match parse_quote(raw) {
            Ok(q) => q,
            Err(e) => {
                v.reject(ReasonCode::QuoteMalformed, e.to_string());
                return v.finish();
            }
        };
        let cocoon = q.registers.image_hash_cocoon_v1();
        let cw = image_hash_cw_v1(&q);
        let image_hash = match self.image_hash_kind {
            ImageHashKind::CwV1 => cw,
            ImageHashKind::CocoonV1 => cocoon,
        };
        v.quote_version = Some(q.version);
        v.image_hash_cocoon_v1 = Some(hex::encode(cocoon));
        v.image_hash_cw_v1 = Some(hex::encode(cw));
        v.registers = Some(q.registers.to_hex());
        v.td_attributes = Some(format!("{:016x}", q.td_attributes));
        v.xfam = Some(format!("{:016x}", q.xfam));
        v.mr_seam = Some(hex::encode(q.mr_seam));
        v.report_data = Some(hex::encode(q.report_data));

        if is_simulated(&q) {
            v.simulated = true;
            v.tcb_status = Some("Simulated".to_owned());
            if !self.policy.allow_simulated {
                v.reject(
                    ReasonCode::SimulatedNotAllowed,
                    "evidence comes from the simulated TEE (no hardware attestation); \
                     only a verifier configured with allow_simulated accepts it",
                );
            } else if let Err(e) = verify_simulated(raw, &q, &self.simulated_keys) {
                v.reject(ReasonCode::SimulatedSignatureInvalid, e);
            }
        } else {
            match collateral {
                None => v.reject(
                    ReasonCode::CollateralMissing,
                    "no collateral for this quote; pass the collateral JSON (dcap-qvl QuoteCollateralV3)",
                ),
                Some(c) => self.verify_real(raw, c, at_unix, &mut v),
            }
        }

        if q.is_debug() && !self.policy.allow_debug {
            v.reject(
                ReasonCode::DebugTd,
                "TD_ATTRIBUTES.DEBUG is set: the host can read and change this TD's memory; \
                 boot the TD without debug",
            );
        }
        if let Some(expected) = expected_report_data
            && &q.report_data != expected
        {
            v.reject(
                ReasonCode::ReportDataMismatch,
                format!(
                    "REPORTDATA {} does not bind the expected key (expected {})",
                    hex::encode(q.report_data),
                    hex::encode(expected)
                ),
            );
        }
        if let Some(list) = &self.allow_list {
            v.image_hash_checked = Some(self.image_hash_kind.name().to_owned());
            match list.contains(&image_hash) {
                Ok(true) => {}
                Ok(false) => v.reject(
                    ReasonCode::ImageHashNotAllowed,
                    format!(
                        "image hash ({}) {} is not on the allow-list; publish it or boot an approved image",
                        self.image_hash_kind.name(),
                        hex::encode(image_hash)
                    ),
                ),
                Err(e) => v.reject(ReasonCode::AllowListUnavailable, e.to_string()),
            }
        }
        v.finish()
    }

    fn verify_real(&self, raw: &[u8], c: &QuoteCollateralV3, at: u64, v: &mut Verdict) {
        match collateral_window(c) {
            Ok((nb, na)) => {
                v.collateral_not_before = Some(nb);
                v.collateral_not_after = Some(na);
                if at < nb {
                    v.reject(
                        ReasonCode::CollateralNotYetValid,
                        format!(
                            "verification time {} is before the collateral's issue date {}; check the clock or --at",
                            format_rfc3339(at),
                            format_rfc3339(nb)
                        ),
                    );
                } else if at > na {
                    v.reject(
                        ReasonCode::CollateralExpired,
                        format!(
                            "collateral expired at {} (verification time {}); fetch fresh collateral from a PCCS",
                            format_rfc3339(na),
                            format_rfc3339(at)
                        ),
                    );
                }
                if let Some(max) = self.policy.max_collateral_age {
                    let age = Duration::from_secs(at.saturating_sub(nb));
                    if age > max {
                        v.reject(
                            ReasonCode::CollateralTooOld,
                            format!(
                                "collateral issued {} is {} s old, more than the policy's {} s; fetch fresh collateral",
                                format_rfc3339(nb),
                                age.as_secs(),
                                max.as_secs()
                            ),
                        );
                    }
                }
            }
            Err(e) => v.reject(ReasonCode::CollateralInvalid, e),
        }

        let root = self.root_ca_der.clone();
        let run = |override_levels: bool| {
            let base = match &root {
                Some(der) => QuoteVerifier::new_with_config(der.clone()),
                None => QuoteVerifier::new_prod(),
            }
            // DEBUG is checked (and reported with its own code) by this crate, not by dcap-qvl.
            .allow_debug(true);
            match (self.backend, override_levels) {
                (CryptoBackend::Ring, false) => base.with_config::<RingConfig>().verify(raw, c, at),
                (CryptoBackend::Ring, true) => base
                    .with_config::<RingConfig>()
                    .dangerous_verify_with_tcb_override(raw, c, at, add_catch_all_level),
                (CryptoBackend::RustCrypto, false) => {
                    base.with_config::<RustCryptoConfig>().verify(raw, c, at)
                }
                (CryptoBackend::RustCrypto, true) => base
                    .with_config::<RustCryptoConfig>()
                    .dangerous_verify_with_tcb_override(raw, c, at, add_catch_all_level),
            }
        };
        let mut below_all_levels = false;
        let mut result = run(false);
        if let Err(e) = &result
            && format!("{e:#}").contains("No matching TCB level found")
        {
            // The platform's TCB is below every level of the signed TCB info (Intel's QVL calls this
            // "TCB not supported"). Re-run with one extra catch-all level *below* all of Intel's, with
            // status OutOfDate, so every other check still runs; the status then reads OutOfDate and
            // only a policy that allows OutOfDate accepts it. The TCB info signature is verified before
            // this override is applied.
            below_all_levels = true;
            result = run(true);
        }
        match result {
            Ok(report) => {
                let status = report.status.clone();
                v.advisory_ids = report.advisory_ids.clone();
                if !self.policy.status_allowed(&status) {
                    v.reject(
                        ReasonCode::TcbStatusNotAllowed,
                        format!(
                            "TCB status {status}{} is not allowed by the policy (allowed: {}); update the platform (microcode/TDX module) or allow the status explicitly",
                            if below_all_levels { " (platform TCB is below every level of the collateral's TCB info)" } else { "" },
                            self.policy.allowed_tcb_statuses.join(", ")
                        ),
                    );
                }
                v.tcb_status = Some(status);
            }
            Err(e) => {
                let msg = format!("{e:#}");
                let code = classify_dcap_error(&msg);
                if !v.has(code) {
                    v.reject(code, format!("quote verification failed: {msg}"));
                }
            }
        }
    }
}

/// Append a lowest TCB level (all SVNs 0) with status OutOfDate (see `verify_real`).
fn add_catch_all_level(mut info: TcbInfo) -> TcbInfo {
    let oldest = info
        .tcb_levels
        .iter()
        .map(|l| l.tcb_date.clone())
        .min()
        .unwrap_or_else(|| info.issue_date.clone());
    let width = |f: fn(&TcbLevel) -> usize| info.tcb_levels.iter().map(f).max().unwrap_or(16);
    let sgx = width(|l| l.tcb.sgx_components.len());
    let tdx = width(|l| l.tcb.tdx_components.len());
    info.tcb_levels.push(TcbLevel {
        tcb: Tcb {
            sgx_components: vec![TcbComponents { svn: 0 }; sgx],
            tdx_components: vec![TcbComponents { svn: 0 }; tdx],
            pce_svn: 0,
        },
        tcb_date: oldest,
        tcb_status: TcbStatus::OutOfDate,
        advisory_ids: Vec::new(),
    });
    info
}

/// Map a dcap-qvl error message to a reason code.
fn classify_dcap_error(msg: &str) -> ReasonCode {
    let m = msg.to_ascii_lowercase();
    let any = |xs: &[&str]| xs.iter().any(|x| m.contains(x));
    if any(&["revoked"]) {
        ReasonCode::TcbStatusNotAllowed
    } else if any(&["expired"]) {
        ReasonCode::CollateralExpired
    } else if any(&["in the future", "notvalidyet", "not valid yet"]) {
        ReasonCode::CollateralNotYetValid
    } else if any(&[
        "profiling",
        "reserved bits in td attributes",
        "migration",
        "servtd_ext",
        "sept_ve_disable",
        "mr service td",
    ]) {
        ReasonCode::TdAttributesForbidden
    } else if any(&[
        "failed to decode quote",
        "quote version",
        "qe vendor",
        "tee type",
        "attestation key type",
    ]) {
        ReasonCode::QuoteMalformed
    } else if any(&[
        "tcb_info",
        "tcbinfo",
        "tcb info",
        "qe_identity",
        "qeidentity",
        "qe identity",
        "crl",
        "collateral",
        "root ca",
        "fmspc",
        "tcb level",
    ]) {
        ReasonCode::CollateralInvalid
    } else {
        ReasonCode::QuoteSignatureInvalid
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_known_dcap_messages() {
        assert_eq!(
            classify_dcap_error("Signature is invalid for tcb_info in quote_collateral"),
            ReasonCode::CollateralInvalid
        );
        assert_eq!(
            classify_dcap_error("Signature is invalid for qe_report in quote"),
            ReasonCode::QuoteSignatureInvalid
        );
        assert_eq!(
            classify_dcap_error("TCBInfo expired"),
            ReasonCode::CollateralExpired
        );
        assert_eq!(
            classify_dcap_error("Unknown QE vendor ID"),
            ReasonCode::QuoteMalformed
        );
    }

    #[test]
    fn garbage_is_malformed() {
        let v =
            Verifier::new(Policy::default(), Arc::new(NoCollateral)).verify_quote(&[1, 2], None, 0);
        assert!(!v.accepted);
        assert!(v.has(ReasonCode::QuoteMalformed));
    }
}
