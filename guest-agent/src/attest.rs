//! The agent's attestation: RTMR3 runtime events, the evidence provider, and the RA-TLS identity.
//!
//! At start-up, right after the host config was read ([`crate::measured_config`]) and before
//! anything is served, [`Attestor::setup`]:
//!
//! 1. computes the RTMR3 events for the exact config bytes received
//!    (`measurements::rtmr3::rtmr3_events`; **no config is measured as an empty config**, and an
//!    unreadable or malformed one by its exact bytes with empty model/wallet/root events — see
//!    [`attestation::runtime::expected_events`]);
//! 2. picks the evidence provider, in this order:
//!    - **real TDX** when the guest has the TDX guest device `/dev/tdx_guest` (the configfs-tsm
//!      report directory alone proves nothing: tsm.ko creates it on any machine): the events are extended into the hardware RTMR3
//!      (`attestation::guest::TdxGuest::extend_rtmr3`, sysfs `rtmr3:sha384`, Linux >= 6.16); a
//!      failure is logged loudly and reported in `/health` (`tee.rtmr3_error`) and
//!      `/attestation` — a verifier then rejects the agent because the log no longer replays to
//!      the quote's RTMR3; quotes come from configfs-tsm;
//!    - **simulated** when the host handed a `worker_api::SimulatedTeeConfig` through fw_cfg
//!      (`host-launcher run --tee none`), or `guest-agent serve --simulate-tee` generated one: a
//!      software RTMR3 starting at zero is extended with the same events, and quotes are signed
//!      by the simulator key (insecure, test-only; verifiers need `--allow-simulated`);
//!    - **none** otherwise: the agent still serves TLS (so health and shutdown work) with a
//!      certificate that carries NO quote; every verifier rejects it ("certificate has no quote
//!      extension ... no TEE evidence"), and `/attestation` says `"tee": "none"` with the reason.
//! 3. issues the first RA-TLS identity (Ed25519 key, REPORTDATA = SHA-512(key)); a background task
//!    rotates it hourly ([`Attestor::rotate_if_needed`]). With a GPU evidence source
//!    ([`Attestor::setup_with_gpu`], [`crate::gpu_evidence`]) every identity also carries each
//!    GPU's attestation report for the nonce SHA-256(key) and its certificate chain (extension
//!    `1.3.6.1.4.1.12345.3`); when the GPUs cannot give evidence the identity is issued without
//!    it (logged, [`Attestor::gpu_error`]) and verifiers that require a GPU reject the agent.

use std::sync::Arc;

use attestation::guest::{TdxGuest, TdxGuestPaths};
use attestation::quote::{TdRegisters, parse_quote};
use attestation::ratls::{GpuEvidenceProvider, QuoteProvider, RaTlsIdentity, check_certificate};
use attestation::tls::RaTlsCertResolver;
use attestation::{SimulatedTee, Verdict};
use measurements::rtmr3::Event;
use worker_api::{AttestationInfo, AttestedRegisters, Rtmr3Event, SimulatedTeeConfig};

use crate::log_line;
use crate::paths::Paths;

/// Which evidence the agent serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvidenceKind {
    /// Real TDX quotes.
    Tdx,
    /// The simulated TEE (insecure, test-only).
    Simulated,
    /// No evidence.
    None,
}

impl EvidenceKind {
    /// The wire name ("tdx", "simulated", "none").
    pub fn name(self) -> &'static str {
        match self {
            EvidenceKind::Tdx => "tdx",
            EvidenceKind::Simulated => "simulated",
            EvidenceKind::None => "none",
        }
    }
}

/// Development options (`guest-agent serve --simulate-tee`).
#[derive(Debug, Clone, Copy, Default)]
pub struct DevOptions {
    /// Without TDX and without a simulated-TEE fw_cfg file, generate a simulator key.
    pub simulate_tee: bool,
}

/// Parse a [`SimulatedTeeConfig`] and build the simulator with `rtmr3` as its RTMR3.
pub fn simulator_from_config(
    cfg: &SimulatedTeeConfig,
    rtmr3: [u8; 48],
) -> Result<SimulatedTee, String> {
    fn hex_n<const N: usize>(field: &str, s: &str) -> Result<[u8; N], String> {
        let b = hex::decode(s.trim()).map_err(|e| format!("{field} is not hex: {e}"))?;
        <[u8; N]>::try_from(b.as_slice())
            .map_err(|_| format!("{field} must be {N} bytes ({} hex digits)", 2 * N))
    }
    let seed: [u8; 32] = hex_n("seed", &cfg.seed)?;
    let regs = TdRegisters {
        mrtd: hex_n("mrtd", &cfg.mrtd)?,
        rtmr: [
            hex_n("rtmr0", &cfg.rtmr0)?,
            hex_n("rtmr1", &cfg.rtmr1)?,
            hex_n("rtmr2", &cfg.rtmr2)?,
            rtmr3,
        ],
        ..TdRegisters::default()
    };
    Ok(SimulatedTee::from_seed(&seed, regs)
        .map_err(|e| e.to_string())?
        .with_attributes(cfg.td_attributes, cfg.xfam))
}

/// Reads the simulated-TEE fw_cfg file, if the host supplied one.
fn read_simulated_config(paths: &Paths) -> Option<Result<SimulatedTeeConfig, String>> {
    let p = paths.simulated_tee_raw();
    match std::fs::read(&p) {
        Ok(bytes) => Some(serde_json::from_slice(&bytes).map_err(|e| {
            format!(
                "{} is not a SimulatedTeeConfig ({e}); the launcher and the image disagree, rebuild both",
                p.display()
            )
        })),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => Some(Err(format!("cannot read {}: {e}", p.display()))),
    }
}

/// The agent's attestation state (shared with the server).
pub struct Attestor {
    kind: EvidenceKind,
    provider: Option<Arc<dyn QuoteProvider>>,
    events: Vec<Event>,
    rtmr3_error: Option<String>,
    evidence_error: std::sync::Mutex<Option<String>>,
    resolver: Arc<RaTlsCertResolver>,
    simulator_public_key: Option<[u8; 32]>,
    gpu: std::sync::RwLock<Option<Arc<dyn GpuEvidenceProvider>>>,
    gpu_error: std::sync::Mutex<Option<String>>,
}

impl std::fmt::Debug for Attestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attestor")
            .field("kind", &self.kind)
            .field("events", &self.events.len())
            .field("rtmr3_error", &self.rtmr3_error)
            .finish_non_exhaustive()
    }
}

impl Attestor {
    /// Measure `host_config` (the exact bytes received, `None` when absent) into RTMR3, choose
    /// the evidence provider and issue the first RA-TLS identity (see the module docs).
    pub fn setup(
        paths: &Paths,
        host_config: Option<&[u8]>,
        dev: DevOptions,
        now_unix: u64,
    ) -> anyhow::Result<Self> {
        Self::setup_with_gpu(paths, host_config, dev, None, now_unix)
    }

    /// [`setup`](Self::setup), embedding GPU evidence from `gpu` (see
    /// [`crate::gpu_evidence::GpuEvidenceSource`]) in every RA-TLS identity.
    pub fn setup_with_gpu(
        paths: &Paths,
        host_config: Option<&[u8]>,
        dev: DevOptions,
        gpu: Option<Arc<dyn GpuEvidenceProvider>>,
        now_unix: u64,
    ) -> anyhow::Result<Self> {
        let events = attestation::runtime::expected_events(host_config);
        let tdx_paths = TdxGuestPaths::under(paths.root());
        // `/dev/tdx_guest` exists only in a TDX guest (tdx-guest.ko refuses to load elsewhere);
        // the configfs-tsm report directory exists whenever tsm.ko is loaded, TDX or not.
        let has_tdx = paths.tdx_guest_device().exists();
        let mut rtmr3_error = None;
        let mut evidence_error = None;
        let (kind, provider, simulator_public_key): (
            EvidenceKind,
            Option<Arc<dyn QuoteProvider>>,
            Option<[u8; 32]>,
        ) = if has_tdx {
            if read_simulated_config(paths).is_some() {
                log_line!(
                    "warning: this guest has TDX interfaces; ignoring the simulated-TEE fw_cfg file"
                );
            }
            let guest = TdxGuest::with_paths(tdx_paths);
            for (i, e) in events.iter().enumerate() {
                if let Err(err) = guest.extend_rtmr3(&e.digest.0) {
                    let msg = format!(
                        "extending RTMR3 with event {i} ({}) failed: {err}; verifiers will reject \
                         this agent (its RTMR3 does not match its event log). Boot a kernel >= \
                         6.16 with TSM measurement registers",
                        e.event_type
                    );
                    log_line!("ERROR: {msg}");
                    rtmr3_error = Some(msg);
                    break;
                }
            }
            if rtmr3_error.is_none() {
                log_line!("RTMR3 extended with {} runtime events", events.len());
            }
            (EvidenceKind::Tdx, Some(Arc::new(guest)), None)
        } else {
            let rtmr3 = measurements::rtmr3::replay(&events)
                .map_err(|e| anyhow::anyhow!("RTMR3 events are inconsistent: {e}"))?
                .0;
            let sim = match read_simulated_config(paths) {
                Some(Ok(cfg)) => match simulator_from_config(&cfg, rtmr3) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        let msg = format!("simulated-TEE config is invalid: {e}");
                        log_line!("error: {msg}");
                        evidence_error = Some(msg);
                        None
                    }
                },
                Some(Err(e)) => {
                    log_line!("error: {e}");
                    evidence_error = Some(e);
                    None
                }
                None if dev.simulate_tee => {
                    let regs = TdRegisters {
                        rtmr: [[0; 48], [0; 48], [0; 48], rtmr3],
                        ..TdRegisters::default()
                    };
                    Some(SimulatedTee::generate(regs).map_err(|e| anyhow::anyhow!("{e}"))?)
                }
                None => None,
            };
            match sim {
                Some(t) => {
                    let pk = t.public_key();
                    log_line!(
                        "SIMULATED TEE (insecure, test-only): no TDX here; quotes are signed by \
                         simulator key {}",
                        hex::encode(pk)
                    );
                    (EvidenceKind::Simulated, Some(Arc::new(t)), Some(pk))
                }
                None => {
                    let msg = evidence_error.clone().unwrap_or_else(|| {
                        "no TDX guest interfaces and no simulated-TEE config: the agent has no \
                         TEE evidence"
                            .to_owned()
                    });
                    log_line!(
                        "warning: {msg}; serving TLS with an unattested certificate that every \
                         verifier rejects"
                    );
                    evidence_error = Some(msg);
                    (EvidenceKind::None, None, None)
                }
            }
        };
        let mut gpu_error = None;
        let identity = issue(
            provider.as_deref(),
            gpu.as_deref(),
            now_unix,
            &mut evidence_error,
            &mut gpu_error,
        )?;
        let resolver = Arc::new(
            RaTlsCertResolver::new(identity)
                .map_err(|e| anyhow::anyhow!("cannot load the RA-TLS key: {e}"))?,
        );
        Ok(Self {
            kind,
            provider,
            events,
            rtmr3_error,
            evidence_error: std::sync::Mutex::new(evidence_error),
            resolver,
            simulator_public_key,
            gpu: std::sync::RwLock::new(gpu),
            gpu_error: std::sync::Mutex::new(gpu_error),
        })
    }

    /// Why the current identity carries no GPU evidence although a GPU source is set.
    pub fn gpu_error(&self) -> Option<String> {
        self.gpu_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The evidence kind.
    pub fn kind(&self) -> EvidenceKind {
        self.kind
    }

    /// Why RTMR3 could not be extended (real TDX only).
    pub fn rtmr3_error(&self) -> Option<&str> {
        self.rtmr3_error.as_deref()
    }

    /// The simulator's public key (simulated TEE only).
    pub fn simulator_public_key(&self) -> Option<[u8; 32]> {
        self.simulator_public_key
    }

    /// The certificate resolver for the TLS server.
    pub fn resolver(&self) -> Arc<RaTlsCertResolver> {
        self.resolver.clone()
    }

    /// Issue a new identity when the current one is due (hourly). Returns whether it rotated.
    pub fn rotate_if_needed(&self, now_unix: u64) -> anyhow::Result<bool> {
        if !self.resolver.identity().needs_rotation(now_unix) {
            return Ok(false);
        }
        self.reissue(now_unix)?;
        Ok(true)
    }

    /// Attach the GPUs' evidence source once they are initialised (after the host config is
    /// measured and the CC mode checked) and issue a new identity at once, so the certificate
    /// served from then on carries the GPU evidence for its own key.
    pub fn attach_gpu(
        &self,
        gpu: Arc<dyn GpuEvidenceProvider>,
        now_unix: u64,
    ) -> anyhow::Result<()> {
        *self.gpu.write().unwrap_or_else(|p| p.into_inner()) = Some(gpu);
        self.reissue(now_unix)
    }

    fn reissue(&self, now_unix: u64) -> anyhow::Result<()> {
        let mut err = None;
        let mut gpu_err = None;
        let gpu = self.gpu.read().unwrap_or_else(|p| p.into_inner()).clone();
        let id = issue(
            self.provider.as_deref(),
            gpu.as_deref(),
            now_unix,
            &mut err,
            &mut gpu_err,
        )?;
        *self.gpu_error.lock().unwrap_or_else(|p| p.into_inner()) = gpu_err;
        if self.provider.is_some() {
            *self
                .evidence_error
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = err;
        }
        self.resolver
            .rotate(id)
            .map_err(|e| anyhow::anyhow!("cannot load the new RA-TLS key: {e}"))?;
        Ok(())
    }

    /// Whether the measured RTMR3 events allow serving on GPUs without confidential computing
    /// (`dev_gpu_without_cc`, from the host config's `dev_allow_gpu_without_cc`): the agent takes
    /// the permission from what it measured, so verifiers see exactly what it acts on.
    pub fn dev_gpu_without_cc(&self) -> bool {
        measurements::rtmr3::dev_gpu_without_cc_from_events(&self.events)
    }

    /// Mutual RA-TLS: the client-certificate pins of the measured `client_auth` RTMR3 event
    /// (`None`: the listener admits any client). The listener is built from this, so it enforces
    /// exactly what the log shows.
    pub fn client_auth_pins(&self) -> anyhow::Result<Option<Vec<[u8; 32]>>> {
        measurements::rtmr3::client_auth_from_events(&self.events)
            .map_err(|e| anyhow::anyhow!("the measured client_auth event is unusable: {e}"))
    }

    /// The agent's own cw-v1 image hash, from the quote in the certificate it serves (real TDX
    /// registers, or the simulated TEE's); `None` without evidence. The approval gate checks this
    /// hash against the root contract.
    pub fn image_hash_cw_v1(&self) -> Option<[u8; 32]> {
        let id = self.resolver.identity();
        let mut scratch = Verdict::default();
        check_certificate(&id.cert_der, id.issued_at, &mut scratch)
            .and_then(|c| c.quote)
            .and_then(|q| parse_quote(&q).ok())
            .map(|q| attestation::verify::image_hash_cw_v1(&q))
    }

    /// The `/attestation` document for the identity currently served.
    pub fn info(&self) -> AttestationInfo {
        let id = self.resolver.identity();
        let mut scratch = Verdict::default();
        let quote = check_certificate(&id.cert_der, id.issued_at, &mut scratch)
            .and_then(|c| c.quote)
            .and_then(|q| parse_quote(&q).ok());
        let (registers, cw, cocoon) = match &quote {
            Some(q) => {
                let r = q.registers.to_hex();
                (
                    Some(AttestedRegisters {
                        mrtd: r.mrtd,
                        mrconfigid: r.mrconfigid,
                        mrowner: r.mrowner,
                        mrownerconfig: r.mrownerconfig,
                        rtmr0: r.rtmr0,
                        rtmr1: r.rtmr1,
                        rtmr2: r.rtmr2,
                        rtmr3: r.rtmr3,
                        td_attributes: q.td_attributes,
                        xfam: q.xfam,
                    }),
                    Some(hex::encode(attestation::verify::image_hash_cw_v1(q))),
                    Some(hex::encode(q.registers.image_hash_cocoon_v1())),
                )
            }
            None => (None, None, None),
        };
        AttestationInfo {
            tee: self.kind.name().to_owned(),
            rtmr3_events: self
                .events
                .iter()
                .map(|e| Rtmr3Event {
                    event_type: e.event_type.clone(),
                    payload: hex::encode(&e.payload),
                    digest: e.digest.to_hex(),
                })
                .collect(),
            rtmr3_error: self.rtmr3_error.clone(),
            registers,
            image_hash_cw_v1: cw,
            image_hash_cocoon_v1: cocoon,
            tls_public_key: hex::encode(id.public_key),
            evidence_error: self
                .evidence_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}

/// Issue an identity with a quote from `provider` (and GPU evidence from `gpu`: when that fails,
/// without it, recording why in `gpu_error`); when there is no provider, or the quote fails, an
/// unattested one (recording why in `evidence_error`).
fn issue(
    provider: Option<&dyn QuoteProvider>,
    gpu: Option<&dyn GpuEvidenceProvider>,
    now_unix: u64,
    evidence_error: &mut Option<String>,
    gpu_error: &mut Option<String>,
) -> anyhow::Result<RaTlsIdentity> {
    if let (Some(p), Some(g)) = (provider, gpu) {
        match RaTlsIdentity::generate_with_gpu(p, g, now_unix) {
            Ok(id) => return Ok(id),
            Err(e) => {
                let msg = format!("no GPU evidence in the RA-TLS certificate: {e}");
                log_line!(
                    "ERROR: {msg}; serving without GPU evidence until the next rotation \
                     (verifiers requiring a GPU reject this worker)"
                );
                *gpu_error = Some(msg);
            }
        }
    }
    if let Some(p) = provider {
        match RaTlsIdentity::generate(p, now_unix) {
            Ok(id) => return Ok(id),
            Err(e) => {
                let msg = format!("cannot get a quote for the RA-TLS certificate: {e}");
                log_line!(
                    "ERROR: {msg}; serving an unattested certificate until the next rotation"
                );
                *evidence_error = Some(msg);
            }
        }
    }
    RaTlsIdentity::generate_unattested(now_unix)
        .map_err(|e| anyhow::anyhow!("cannot issue a TLS certificate: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use attestation::ratls::verify_certificate;
    use attestation::{Policy, ReasonCode, Verifier};

    const NOW: u64 = 1_800_000_000;

    fn sim_cfg() -> SimulatedTeeConfig {
        SimulatedTeeConfig {
            seed: "07".repeat(32),
            mrtd: "11".repeat(48),
            rtmr0: "22".repeat(48),
            rtmr1: "33".repeat(48),
            rtmr2: "44".repeat(48),
            td_attributes: 1 << 28,
            xfam: 0x602e7,
        }
    }

    fn write_sim(root: &std::path::Path, text: &str) {
        let p = Paths::new(root).simulated_tee_raw();
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, text).expect("write");
    }

    #[test]
    fn simulated_config_parsing_checks_every_field() {
        let t = simulator_from_config(&sim_cfg(), [5; 48]).expect("ok");
        assert_eq!(t.registers().mrtd, [0x11; 48]);
        assert_eq!(t.registers().rtmr[3], [5; 48]);
        for (field, f) in [
            (
                "seed",
                Box::new(|c: &mut SimulatedTeeConfig| c.seed = "zz".into())
                    as Box<dyn Fn(&mut SimulatedTeeConfig)>,
            ),
            (
                "mrtd",
                Box::new(|c: &mut SimulatedTeeConfig| c.mrtd = "11".into()),
            ),
            (
                "rtmr2",
                Box::new(|c: &mut SimulatedTeeConfig| c.rtmr2 = "".into()),
            ),
        ] {
            let mut c = sim_cfg();
            f(&mut c);
            let e = simulator_from_config(&c, [0; 48]).expect_err(field);
            assert!(e.starts_with(field), "{e}");
        }
    }

    #[test]
    fn simulated_setup_extends_a_software_rtmr3_and_verifies() {
        let root = tempfile::tempdir().expect("tempdir");
        write_sim(
            root.path(),
            &serde_json::to_string(&sim_cfg()).expect("json"),
        );
        let cfg = br#"{"payout_wallet":"EQabc"}"#;
        let a = Attestor::setup(
            &Paths::new(root.path()),
            Some(cfg),
            DevOptions::default(),
            NOW,
        )
        .expect("setup");
        assert_eq!(a.kind(), EvidenceKind::Simulated);
        let info = a.info();
        assert_eq!(info.tee, "simulated");
        assert_eq!(info.rtmr3_events.len(), 5);
        let regs = info.registers.expect("registers");
        let events = attestation::runtime::expected_events(Some(cfg));
        assert_eq!(
            regs.rtmr3,
            measurements::rtmr3::replay(&events)
                .expect("replay")
                .to_hex()
        );
        assert_eq!((regs.td_attributes, regs.xfam), (1 << 28, 0x602e7));
        let pk = a.simulator_public_key().expect("key");
        let ver = Verifier::simulated(Policy::default().with_simulated(true), pk);
        let v = verify_certificate(&ver, &a.resolver().identity().cert_der, 1, NOW);
        assert!(v.accepted, "{:?}", v.reasons);
        assert_eq!(v.image_hash_cw_v1, info.image_hash_cw_v1);
        // The /attestation JSON is what the verifiers' client parses.
        let doc: attestation::https::AgentAttestation =
            serde_json::from_value(serde_json::to_value(a.info()).expect("json")).expect("parse");
        assert_eq!(doc.rtmr3_events, events);
    }

    #[test]
    fn gpu_evidence_is_embedded_and_verifies_and_failures_fall_back() {
        use crate::gpu_evidence::{GpuEvidenceSource, RawGpuEvidence};
        use attestation::gpu::testing::TestGpu;
        let root = tempfile::tempdir().expect("tempdir");
        write_sim(
            root.path(),
            &serde_json::to_string(&sim_cfg()).expect("json"),
        );
        // TEST GPU: our own test CA and attestation key, not NVIDIA's.
        let g = TestGpu::new().expect("gpu");
        let g2 = g.clone();
        let asked = Arc::new(std::sync::Mutex::new(Vec::<[u8; 32]>::new()));
        let asked2 = asked.clone();
        let src = GpuEvidenceSource::new(move |nonce| {
            asked2.lock().expect("lock").push(*nonce);
            Ok(Some(vec![RawGpuEvidence {
                report: g2.report(nonce)?,
                cert_chain_pem: g2.chain_pem.clone().into_bytes(),
                cc_on: true,
                dev_tools: false,
            }]))
        });
        let a = Attestor::setup_with_gpu(
            &Paths::new(root.path()),
            None,
            DevOptions::default(),
            Some(Arc::new(src)),
            NOW,
        )
        .expect("setup");
        let id = a.resolver().identity();
        assert_eq!(
            asked.lock().expect("lock").as_slice(),
            &[crate::gpu_evidence::nonce_for_key(&id.public_key)]
        );
        let ver = Verifier::simulated(
            Policy::default().with_simulated(true),
            a.simulator_public_key().expect("key"),
        )
        .with_gpu_policy(g.policy(true).expect("policy"));
        let v = verify_certificate(&ver, &id.cert_der, 1, NOW);
        assert!(v.accepted, "{:?}", v.reasons);
        assert_eq!(
            v.gpu.map(|g| g.status),
            Some(attestation::gpu::GpuStatus::Verified)
        );
        assert!(a.gpu_error().is_none());
        // Rotation asks the GPU again, for the new key.
        assert!(a.rotate_if_needed(NOW + 3600).expect("rotate"));
        let id2 = a.resolver().identity();
        assert_eq!(asked.lock().expect("lock").len(), 2);
        assert!(verify_certificate(&ver, &id2.cert_der, 1, NOW + 3600).accepted);

        // Attached after start-up (the agent's order: RTMR3 first, then the GPUs): the identity
        // is reissued at once and carries evidence for its own new key.
        let late = Attestor::setup(&Paths::new(root.path()), None, DevOptions::default(), NOW)
            .expect("setup");
        let before = late.resolver().identity();
        assert!(
            verify_certificate(&ver, &before.cert_der, 1, NOW)
                .gpu
                .is_none_or(|g| g.status != attestation::gpu::GpuStatus::Verified)
        );
        let g3 = g.clone();
        late.attach_gpu(
            Arc::new(GpuEvidenceSource::new(move |nonce| {
                Ok(Some(vec![RawGpuEvidence {
                    report: g3.report(nonce)?,
                    cert_chain_pem: g3.chain_pem.clone().into_bytes(),
                    cc_on: true,
                    dev_tools: false,
                }]))
            })),
            NOW + 1,
        )
        .expect("attach");
        let after = late.resolver().identity();
        assert_ne!(after.public_key, before.public_key, "a new key was issued");
        let late_ver = Verifier::simulated(
            Policy::default().with_simulated(true),
            late.simulator_public_key().expect("key"),
        )
        .with_gpu_policy(g.policy(true).expect("policy"));
        let v = verify_certificate(&late_ver, &after.cert_der, 1, NOW + 1);
        assert!(v.accepted, "{:?}", v.reasons);
        assert_eq!(
            v.gpu.map(|g| g.status),
            Some(attestation::gpu::GpuStatus::Verified)
        );

        // A GPU layer that fails: the agent still serves, without GPU evidence, says why, and a
        // verifier requiring a GPU rejects it with its own reason.
        let failing = GpuEvidenceSource::new(|_| Err("NVML: GPU is not in CC mode".to_owned()));
        let a = Attestor::setup_with_gpu(
            &Paths::new(root.path()),
            None,
            DevOptions::default(),
            Some(Arc::new(failing)),
            NOW,
        )
        .expect("setup");
        assert!(a.gpu_error().expect("error").contains("not in CC mode"));
        let v = verify_certificate(&ver, &a.resolver().identity().cert_der, 1, NOW);
        assert!(v.has(ReasonCode::GpuEvidenceMissing), "{:?}", v.reasons);
        assert_eq!(v.reasons.len(), 1, "{:?}", v.reasons);
    }

    #[test]
    fn no_evidence_serves_an_unattested_certificate() {
        let root = tempfile::tempdir().expect("tempdir");
        let a = Attestor::setup(&Paths::new(root.path()), None, DevOptions::default(), NOW)
            .expect("setup");
        assert_eq!(a.kind(), EvidenceKind::None);
        let info = a.info();
        assert_eq!(info.tee, "none");
        assert!(info.registers.is_none());
        assert!(
            info.evidence_error
                .expect("why")
                .contains("no TEE evidence")
        );
        let ver = Verifier::simulated(Policy::default().with_simulated(true), [0; 32]);
        let v = verify_certificate(&ver, &a.resolver().identity().cert_der, 1, NOW);
        assert!(
            v.has(ReasonCode::CertificateMissingQuote),
            "{:?}",
            v.reasons
        );
        // A broken simulated config is reported, not fatal.
        write_sim(root.path(), "{}");
        let a = Attestor::setup(&Paths::new(root.path()), None, DevOptions::default(), NOW)
            .expect("setup");
        assert_eq!(a.kind(), EvidenceKind::None);
        assert!(
            a.info()
                .evidence_error
                .expect("why")
                .contains("SimulatedTeeConfig")
        );
    }

    #[test]
    fn dev_simulation_and_rotation() {
        let root = tempfile::tempdir().expect("tempdir");
        let a = Attestor::setup(
            &Paths::new(root.path()),
            None,
            DevOptions { simulate_tee: true },
            NOW,
        )
        .expect("setup");
        assert_eq!(a.kind(), EvidenceKind::Simulated);
        let first = a.resolver().identity().public_key;
        assert!(!a.rotate_if_needed(NOW + 60).expect("rotate"));
        assert!(a.rotate_if_needed(NOW + 3600).expect("rotate"));
        assert_ne!(a.resolver().identity().public_key, first);
        assert_eq!(
            a.info().tls_public_key,
            hex::encode(a.resolver().identity().public_key)
        );
    }

    #[test]
    fn tdx_extension_failure_is_reported() {
        // A fake TDX guest: the device node exists but RTMR3 cannot be extended (no sysfs
        // attribute, and the fake device is not a TDX device) and no quote can be had.
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(root.path().join("dev")).expect("mkdir");
        std::fs::write(root.path().join("dev/tdx_guest"), b"").expect("touch");
        let a = Attestor::setup(&Paths::new(root.path()), None, DevOptions::default(), NOW)
            .expect("setup");
        assert_eq!(a.kind(), EvidenceKind::Tdx);
        assert!(a.rtmr3_error().expect("error").contains("RTMR3"));
        let info = a.info();
        assert!(info.rtmr3_error.is_some());
        assert!(info.evidence_error.expect("no quote").contains("quote"));
        // With the sysfs attribute present, the digests are written there.
        let attr_dir = root.path().join("sys/class/misc/tdx_guest/measurements");
        std::fs::create_dir_all(&attr_dir).expect("mkdir");
        std::fs::write(attr_dir.join("rtmr3:sha384"), b"").expect("touch");
        let a = Attestor::setup(&Paths::new(root.path()), None, DevOptions::default(), NOW)
            .expect("setup");
        assert_eq!(a.rtmr3_error(), None);
    }
}
