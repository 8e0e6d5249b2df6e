//! Unit tests of GPU evidence verification. All evidence is made by [`TestGpu`]: our OWN test CA
//! and test attestation key (never NVIDIA's), in NVIDIA's report format. A public NVIDIA sample is
//! checked by `tests/gpu_sample.rs` when `WORKER_GPU_EVIDENCE_SAMPLE` names one.

use std::collections::BTreeSet;
use std::sync::{Arc, LazyLock};

use proptest::prelude::*;

use super::testing::TestGpu;
use super::*;
use crate::policy::Policy;
use crate::quote::TdRegisters;
use crate::ratls::{RaTlsIdentity, verify_certificate};
use crate::simulated::SimulatedTee;
use crate::verify::Verifier;

const NOW: u64 = 1_800_000_000;
const KEY: [u8; 32] = [7; 32];

fn gpu() -> TestGpu {
    TestGpu::new().expect("test gpu")
}

fn ext_for(g: &TestGpu, key: &[u8; 32]) -> Vec<u8> {
    GpuEvidence {
        gpus: vec![g.entry(&gpu_nonce_for_key(key)).expect("entry")],
    }
    .encode()
    .expect("encode")
}

fn check(policy: Option<&GpuPolicy>, ext: Option<&[u8]>) -> Verdict {
    let mut v = Verdict::default();
    check_evidence(policy, ext, &KEY, NOW, &mut v);
    v.finish()
}

fn codes(v: &Verdict) -> BTreeSet<String> {
    v.reasons.iter().map(|r| r.code.as_str()).collect()
}

fn only(v: &Verdict, code: ReasonCode) {
    assert!(!v.accepted);
    assert_eq!(
        codes(v),
        BTreeSet::from([code.as_str()]),
        "{:#?}",
        v.reasons
    );
    assert_eq!(v.gpu.as_ref().map(|g| g.status), Some(GpuStatus::Invalid));
}

#[test]
fn nvidia_root_pin_is_a_sha256() {
    let b = hex::decode(NVIDIA_DEVICE_IDENTITY_ROOT_SHA256).expect("hex");
    assert_eq!(b.len(), 32);
    let p = GpuPolicy::new(gpu().reference().expect("ref"), false);
    assert_eq!(
        p.pinned_roots,
        vec![<[u8; 32]>::try_from(b.as_slice()).expect("32")]
    );
}

#[test]
fn accepted_with_the_test_ca() {
    let g = gpu();
    let p = g.policy(true).expect("policy");
    let v = check(Some(&p), Some(&ext_for(&g, &KEY)));
    assert!(v.accepted, "{:#?}", v.reasons);
    let gv = v.gpu.expect("gpu verdict");
    assert_eq!(gv.status, GpuStatus::Verified);
    assert!(gv.required);
    assert_eq!(gv.gpus.len(), 1);
    let info = &gv.gpus[0];
    assert_eq!(info.driver_version.as_deref(), Some("550.90.07"));
    assert_eq!(info.vbios_version.as_deref(), Some("96.00.9f.00.01"));
    assert_eq!(info.checked_indices, vec![1, 2, 3, 4]);
    assert!(info.unchecked_indices.is_empty());
    assert_eq!(
        info.root_sha256,
        Some(hex::encode(Sha256::digest(&g.root_der)))
    );
}

#[test]
fn tampered_report_is_rejected() {
    let g = gpu();
    let mut e = g.entry(&gpu_nonce_for_key(&KEY)).expect("entry");
    // Flip a byte of the responder nonce: signed, but neither a measurement nor the request nonce.
    let r = SpdmReport::parse(&e.report).expect("parse");
    let at = e
        .report
        .windows(32)
        .position(|w| w == r.response_nonce)
        .expect("responder nonce")
        + 3;
    e.report[at] ^= 0x01;
    let ext = GpuEvidence { gpus: vec![e] }.encode().expect("encode");
    only(
        &check(Some(&g.policy(false).expect("p")), Some(&ext)),
        ReasonCode::GpuReportSignatureInvalid,
    );
    // A flipped signature byte too.
    let mut e = g.entry(&gpu_nonce_for_key(&KEY)).expect("entry");
    let last = e.report.len() - 1;
    e.report[last] ^= 0x80;
    let ext = GpuEvidence { gpus: vec![e] }.encode().expect("encode");
    only(
        &check(Some(&g.policy(false).expect("p")), Some(&ext)),
        ReasonCode::GpuReportSignatureInvalid,
    );
}

#[test]
fn report_signed_by_another_gpu_is_rejected() {
    let g = gpu();
    let other = gpu();
    let mut e = g.entry(&gpu_nonce_for_key(&KEY)).expect("entry");
    e.report = other.report(&gpu_nonce_for_key(&KEY)).expect("report");
    let ext = GpuEvidence { gpus: vec![e] }.encode().expect("encode");
    only(
        &check(Some(&g.policy(false).expect("p")), Some(&ext)),
        ReasonCode::GpuReportSignatureInvalid,
    );
}

#[test]
fn wrong_nonce_is_rejected() {
    let g = gpu();
    let ext = ext_for(&g, &[8; 32]); // made for another TLS key
    let v = check(Some(&g.policy(false).expect("p")), Some(&ext));
    only(&v, ReasonCode::GpuNonceMismatch);
    assert!(v.reasons[0].message.contains("replayed"));
}

#[test]
fn unknown_root_is_rejected() {
    let g = gpu();
    // Pins NVIDIA's root only: the test CA is unknown.
    let p = GpuPolicy::new(g.reference().expect("ref"), false);
    let v = check(Some(&p), Some(&ext_for(&g, &KEY)));
    only(&v, ReasonCode::GpuRootUnknown);
    assert!(v.reasons[0].message.contains("--gpu-root"));
    // The same root pinned by its SHA-256 is accepted.
    let p = p.with_root_sha256(Sha256::digest(&g.root_der).into());
    assert!(check(Some(&p), Some(&ext_for(&g, &KEY))).accepted);
}

#[test]
fn broken_chain_is_rejected() {
    let g = gpu();
    let mut e = g.entry(&gpu_nonce_for_key(&KEY)).expect("entry");
    e.cert_chain.remove(1); // leaf directly under the root: issuer link broken
    let ext = GpuEvidence { gpus: vec![e] }.encode().expect("encode");
    only(
        &check(Some(&g.policy(false).expect("p")), Some(&ext)),
        ReasonCode::GpuCertChainInvalid,
    );
    // An intermediate from another test CA (same names, other keys): signature broken.
    let other = gpu();
    let mut e = g.entry(&gpu_nonce_for_key(&KEY)).expect("entry");
    e.cert_chain[1] = other.chain[1].clone();
    let ext = GpuEvidence { gpus: vec![e] }.encode().expect("encode");
    only(
        &check(Some(&g.policy(false).expect("p")), Some(&ext)),
        ReasonCode::GpuCertChainInvalid,
    );
    // Outside the certificates' validity.
    let mut v = Verdict::default();
    check_evidence(
        Some(&g.policy(false).expect("p")),
        Some(&ext_for(&g, &KEY)),
        &KEY,
        4_200_000_000,
        &mut v,
    );
    only(&v.finish(), ReasonCode::GpuCertChainInvalid);
}

#[test]
fn cc_off_and_dev_tools_are_rejected() {
    let mut g = gpu();
    g.cc.cc_on = false;
    let v = check(Some(&g.policy(false).expect("p")), Some(&ext_for(&g, &KEY)));
    only(&v, ReasonCode::GpuCcModeOff);
    assert!(v.reasons[0].message.contains("set-cc-mode"));
    g.cc = CcState {
        cc_on: true,
        dev_tools: true,
    };
    let v = check(Some(&g.policy(false).expect("p")), Some(&ext_for(&g, &KEY)));
    only(&v, ReasonCode::GpuCcModeOff);
    assert!(v.reasons[0].message.contains("dev-tools"));
}

#[test]
fn measurement_mismatch_is_rejected() {
    let g = gpu();
    let p = g.policy(false).expect("p");
    let mut changed = g.clone();
    changed.measurements[2].1[0] ^= 0xff;
    only(
        &check(Some(&p), Some(&ext_for(&changed, &KEY))),
        ReasonCode::GpuMeasurementMismatch,
    );
    let mut missing = g.clone();
    missing.measurements.pop();
    let v = check(Some(&p), Some(&ext_for(&missing, &KEY)));
    only(&v, ReasonCode::GpuMeasurementMismatch);
    assert!(v.reasons[0].message.contains("index 4 is missing"));
    // Driver version not allowed.
    let mut p2 = p.clone();
    p2.reference.driver_versions = vec!["535.0.0".into()];
    let v = check(Some(&p2), Some(&ext_for(&g, &KEY)));
    only(&v, ReasonCode::GpuMeasurementMismatch);
    assert!(v.reasons[0].message.contains("driver version 550.90.07"));
    // Extra blocks not in the reference are reported, not rejected.
    let mut extra = g.clone();
    extra.measurements.push((9, vec![1; 48]));
    let v = check(Some(&p), Some(&ext_for(&extra, &KEY)));
    assert!(v.accepted, "{:#?}", v.reasons);
    assert_eq!(v.gpu.expect("gpu").gpus[0].unchecked_indices, vec![9]);
}

#[test]
fn missing_evidence_is_rejected_only_when_required() {
    let g = gpu();
    let v = check(Some(&g.policy(true).expect("p")), None);
    assert_eq!(
        codes(&v),
        BTreeSet::from([ReasonCode::GpuEvidenceMissing.as_str()])
    );
    assert!(v.reasons[0].message.contains("--require-gpu"));
    let v = check(Some(&g.policy(false).expect("p")), None);
    assert!(v.accepted);
    assert_eq!(v.gpu.expect("gpu").status, GpuStatus::Absent);
    let v = check(None, None);
    assert!(v.accepted);
}

#[test]
fn malformed_evidence_is_a_reason_never_a_panic() {
    let g = gpu();
    let p = g.policy(false).expect("p");
    for bad in [
        &b""[..],
        &b"\x01"[..],
        &b"\x02\x01"[..],
        &b"\x01\x00"[..],
        &b"\x01\x09"[..],
        &b"\x01\x01\x04\x00\x00\x01"[..],
    ] {
        only(
            &check(Some(&p), Some(bad)),
            ReasonCode::GpuEvidenceMalformed,
        );
    }
    let good = ext_for(&g, &KEY);
    for cut in [1, 2, 3, 10, 100, good.len() - 1] {
        only(
            &check(Some(&p), Some(&good[..cut])),
            ReasonCode::GpuEvidenceMalformed,
        );
    }
    let mut trailing = good.clone();
    trailing.push(0);
    only(
        &check(Some(&p), Some(&trailing)),
        ReasonCode::GpuEvidenceMalformed,
    );
    // A report that is not SPDM, and a certificate that is not DER.
    let mut e = g.entry(&gpu_nonce_for_key(&KEY)).expect("entry");
    e.report = vec![0x10; 300];
    let ext = GpuEvidence { gpus: vec![e] }.encode().expect("encode");
    only(
        &check(Some(&p), Some(&ext)),
        ReasonCode::GpuEvidenceMalformed,
    );
    let mut e = g.entry(&gpu_nonce_for_key(&KEY)).expect("entry");
    e.cert_chain[0] = b"not a certificate".to_vec();
    let ext = GpuEvidence { gpus: vec![e] }.encode().expect("encode");
    let v = check(Some(&p), Some(&ext));
    assert!(v.has(ReasonCode::GpuEvidenceMalformed), "{:#?}", v.reasons);
    assert!(!v.accepted);
    // Every truncation of a report parses to an error, not a panic.
    let report = g.report(&[0; 32]).expect("report");
    for n in 0..report.len() {
        assert!(SpdmReport::parse(&report[..n]).is_err(), "prefix {n}");
    }
}

#[test]
fn without_gpu_trust_present_evidence_is_reported_unchecked() {
    let g = gpu();
    let v = check(None, Some(&ext_for(&g, &KEY)));
    assert!(v.accepted, "TDX alone decides; {:#?}", v.reasons);
    let gv = v.gpu.as_ref().expect("gpu");
    assert_eq!(gv.status, GpuStatus::Unchecked);
    assert!(gv.note.as_deref().unwrap_or("").contains("NOT verified"));
    assert!(
        v.summary().contains("gpu=present-NOT-verified"),
        "{}",
        v.summary()
    );
    // Garbage is not verified either.
    let v = check(None, Some(b"garbage"));
    assert_eq!(v.gpu.expect("gpu").status, GpuStatus::Unchecked);
    // With a policy, present-but-invalid evidence rejects even when a GPU is not required.
    let v = check(
        Some(&g.policy(false).expect("p")),
        Some(&ext_for(&g, &[1; 32])),
    );
    assert!(!v.accepted);
}

#[test]
fn every_failure_has_its_own_code() {
    let all = [
        ReasonCode::GpuEvidenceMissing,
        ReasonCode::GpuEvidenceMalformed,
        ReasonCode::GpuCertChainInvalid,
        ReasonCode::GpuRootUnknown,
        ReasonCode::GpuReportSignatureInvalid,
        ReasonCode::GpuNonceMismatch,
        ReasonCode::GpuCcModeOff,
        ReasonCode::GpuMeasurementMismatch,
    ];
    let names: BTreeSet<String> = all.iter().map(|c| c.as_str()).collect();
    assert_eq!(names.len(), all.len());
    assert!(names.iter().all(|n| n.starts_with("gpu_")));
}

#[test]
fn reference_values_parse_and_refuse_bad_files() {
    let r = ReferenceValues::from_json(
        br#"{"description": "x", "measurements": {"1": ["aabb", "ccdd"], "2": ["00"]},
            "driver_versions": ["550.90.07"]}"#,
    )
    .expect("parse");
    assert_eq!(r.parsed.get(&1).map(Vec::len), Some(2));
    for bad in [
        &br#"{"measurements": {}}"#[..],
        br#"{"measurements": {"x": ["00"]}}"#,
        br#"{"measurements": {"300": ["00"]}}"#,
        br#"{"measurements": {"1": []}}"#,
        br#"{"measurements": {"1": ["zz"]}}"#,
        br#"{"measurements": {"1": ["00"]}, "extra": 1}"#,
        b"not json",
    ] {
        let e = ReferenceValues::from_json(bad).expect_err("must fail");
        assert!(e.to_string().contains("reference values"), "{e}");
    }
}

#[test]
fn pem_chains_split_into_der() {
    let g = gpu();
    let pem = &g.chain_pem;
    assert_eq!(pem_chain_to_der(pem.as_bytes()).expect("split"), g.chain);
    assert!(pem_chain_to_der(b"").is_err());
    assert!(
        pem_chain_to_der(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
            .is_err()
    );
}

fn sim_verifier(t: &SimulatedTee) -> Verifier {
    Verifier::simulated(Policy::default().with_simulated(true), t.public_key())
}

#[test]
fn ratls_round_trip_with_gpu_evidence() {
    let tee = SimulatedTee::from_seed(&[4; 32], TdRegisters::default()).expect("tee");
    let g = gpu();
    let id = RaTlsIdentity::generate_with_gpu(&tee, &g, NOW).expect("identity");
    // Accepted with the test root pinned and the GPU required.
    let ver = sim_verifier(&tee).with_gpu_policy(g.policy(true).expect("p"));
    let v = verify_certificate(&ver, &id.cert_der, 1, NOW + 10);
    assert!(v.accepted, "{:#?}", v.reasons);
    assert_eq!(v.gpu.as_ref().map(|g| g.status), Some(GpuStatus::Verified));
    assert!(v.summary().contains("gpu=verified(1)"), "{}", v.summary());
    // The nonce in the embedded report is SHA-256 of the certificate's key.
    let mut scratch = Verdict::default();
    let parsed = crate::ratls::check_certificate(&id.cert_der, NOW, &mut scratch).expect("cert");
    let ev = GpuEvidence::decode(parsed.gpu.as_deref().expect("gpu ext")).expect("decode");
    let r = SpdmReport::parse(&ev.gpus[0].report).expect("report");
    assert_eq!(r.request_nonce, gpu_nonce_for_key(&id.public_key));
    // A verifier that knows nothing of GPUs still accepts (non-critical extension), unchecked.
    let v = verify_certificate(&sim_verifier(&tee), &id.cert_der, 1, NOW + 10);
    assert!(v.accepted, "{:#?}", v.reasons);
    assert_eq!(v.gpu.as_ref().map(|g| g.status), Some(GpuStatus::Unchecked));
    // A CPU-only certificate is rejected when a GPU is required, accepted otherwise.
    let cpu = RaTlsIdentity::generate(&tee, NOW).expect("cpu identity");
    let v = verify_certificate(&ver, &cpu.cert_der, 1, NOW + 10);
    assert_eq!(
        codes(&v),
        BTreeSet::from([ReasonCode::GpuEvidenceMissing.as_str()])
    );
    let lenient = sim_verifier(&tee).with_gpu_policy(g.policy(false).expect("p"));
    assert!(verify_certificate(&lenient, &cpu.cert_der, 1, NOW + 10).accepted);
    // A GPU whose evidence was made for another key (relayed): rejected.
    let mut relay = g.clone();
    relay.force_nonce = Some([3; 32]);
    let id = RaTlsIdentity::generate_with_gpu(&tee, &relay, NOW).expect("identity");
    let v = verify_certificate(&lenient, &id.cert_der, 1, NOW + 10);
    assert_eq!(
        codes(&v),
        BTreeSet::from([ReasonCode::GpuNonceMismatch.as_str()])
    );
}

#[test]
fn tls_handshake_carries_and_checks_gpu_evidence() {
    use crate::tls::{
        RaTlsCertResolver, RaTlsServerVerifier, client_config, handshake_in_memory, server_config,
    };
    let tee = SimulatedTee::from_seed(&[5; 32], TdRegisters::default()).expect("tee");
    let g = gpu();
    // The RA-TLS certificate is checked at the real clock in a handshake.
    let now = crate::verify::unix_secs(std::time::SystemTime::now());
    let id = RaTlsIdentity::generate_with_gpu(&tee, &g, now).expect("identity");
    let server = Arc::new(
        server_config(
            Arc::new(RaTlsCertResolver::new(id).expect("resolver")),
            None,
        )
        .expect("server config"),
    );
    let run = |policy: GpuPolicy| {
        let sv = Arc::new(RaTlsServerVerifier::new(
            sim_verifier(&tee).with_gpu_policy(policy),
        ));
        let client = Arc::new(client_config(sv.clone(), None).expect("client config"));
        let r = handshake_in_memory(client, server.clone());
        (r, sv.last_verdict().expect("verdict"))
    };
    let (r, v) = run(g.policy(true).expect("p"));
    assert!(r.is_ok(), "{r:?} {:#?}", v.reasons);
    assert_eq!(v.gpu.map(|g| g.status), Some(GpuStatus::Verified));
    // Reference values for other firmware: the handshake fails with the mismatch reason.
    let mut other = g.clone();
    other.measurements[0].1[0] ^= 1;
    let policy = GpuPolicy::new(other.reference().expect("ref"), true).with_root_der(&g.root_der);
    let (r, v) = run(policy);
    assert!(r.is_err());
    assert!(
        v.has(ReasonCode::GpuMeasurementMismatch),
        "{:#?}",
        v.reasons
    );
}

#[test]
fn cli_flags_build_the_policy() {
    use clap::Parser;
    #[derive(Debug, clap::Parser)]
    struct T {
        #[command(flatten)]
        g: GpuArgs,
    }
    let parse = |a: &[&str]| T::try_parse_from([&["t"][..], a].concat()).map(|t| t.g);
    assert!(
        parse(&["--require-gpu"]).is_err(),
        "--require-gpu needs --gpu-reference"
    );
    assert!(parse(&[]).expect("none").policy().expect("ok").is_none());
    let d = tempfile::tempdir().expect("tmp");
    let g = gpu();
    let reference = d.path().join("ref.json");
    std::fs::write(
        &reference,
        serde_json::to_vec(&g.reference().expect("ref")).expect("json"),
    )
    .expect("write");
    let root = d.path().join("root.pem");
    std::fs::write(
        &root,
        g.chain_pem
            .rsplit_once("-----BEGIN")
            .map(|(_, r)| format!("-----BEGIN{r}"))
            .expect("pem"),
    )
    .expect("write");
    let r = reference.to_str().expect("utf8");
    let p = parse(&[
        "--require-gpu",
        "--gpu-reference",
        r,
        "--gpu-root",
        root.to_str().expect("utf8"),
    ])
    .expect("parse")
    .policy()
    .expect("policy")
    .expect("some");
    assert!(p.required);
    assert_eq!(p, g.policy(true).expect("p"));
    let p = parse(&[
        "--gpu-reference",
        r,
        "--gpu-root-sha256",
        &hex::encode(Sha256::digest(&g.root_der)),
    ])
    .expect("parse")
    .policy()
    .expect("policy")
    .expect("some");
    assert_eq!(p, g.policy(false).expect("p"));
    let e = parse(&["--gpu-reference", r, "--gpu-root-sha256", "abcd"])
        .expect("parse")
        .policy()
        .expect_err("bad hex");
    assert!(e.to_string().contains("64 hex digits"), "{e}");
    let chain = d.path().join("chain.pem");
    std::fs::write(&chain, &g.chain_pem).expect("write");
    let e = parse(&[
        "--gpu-reference",
        r,
        "--gpu-root",
        chain.to_str().expect("utf8"),
    ])
    .expect("parse")
    .policy()
    .expect_err("3 certs");
    assert!(e.to_string().contains("one root per flag"), "{e}");
    let e = parse(&["--gpu-reference", "/nonexistent/ref.json"])
        .expect("parse")
        .policy()
        .expect_err("missing");
    assert!(e.to_string().contains("cannot read"), "{e}");
}

#[test]
fn verify_quote_cert_checks_gpu_evidence() {
    use clap::Parser;
    #[derive(Debug, clap::Parser)]
    struct T {
        #[command(flatten)]
        a: crate::cli::Args,
    }
    let d = tempfile::tempdir().expect("tmp");
    let tee = SimulatedTee::from_seed(&[6; 32], TdRegisters::default()).expect("tee");
    let g = gpu();
    let now = crate::verify::unix_secs(std::time::SystemTime::now());
    let id = RaTlsIdentity::generate_with_gpu(&tee, &g, now).expect("identity");
    let cert = d.path().join("cert.der");
    std::fs::write(&cert, &id.cert_der).expect("write");
    let reference = d.path().join("ref.json");
    std::fs::write(
        &reference,
        serde_json::to_vec(&g.reference().expect("ref")).expect("json"),
    )
    .expect("write");
    let root = d.path().join("root.der");
    std::fs::write(&root, &g.root_der).expect("write");
    let p = |s: &str| s.to_owned();
    let (c, r, rt) = (
        cert.display().to_string(),
        reference.display().to_string(),
        root.display().to_string(),
    );
    let args = T::try_parse_from([
        p("t"),
        p("--quote"),
        c.clone(),
        p("--cert"),
        p("--require-gpu"),
        p("--gpu-reference"),
        r.clone(),
        p("--gpu-root"),
        rt,
    ])
    .expect("parse")
    .a;
    let v = crate::cli::verdict(&args).expect("verdict");
    // verify-quote trusts no simulator: the quote is refused, the GPU part verifies.
    assert_eq!(
        codes(&v),
        BTreeSet::from([ReasonCode::SimulatedNotAllowed.as_str()]),
        "{:#?}",
        v.reasons
    );
    assert_eq!(v.gpu.map(|g| g.status), Some(GpuStatus::Verified));
    // Without --gpu-root the test CA is unknown.
    let args = T::try_parse_from([
        p("t"),
        p("--quote"),
        c.clone(),
        p("--cert"),
        p("--gpu-reference"),
        r.clone(),
    ])
    .expect("parse")
    .a;
    assert!(
        crate::cli::verdict(&args)
            .expect("verdict")
            .has(ReasonCode::GpuRootUnknown)
    );
    // GPU flags without --cert: a usage error.
    let args = T::try_parse_from([p("t"), p("--quote"), c, p("--gpu-reference"), r])
        .expect("parse")
        .a;
    let e = crate::cli::verdict(&args).expect_err("usage");
    assert!(e.to_string().contains("--cert"), "{e}");
}

// Arbitrary bytes as the extension or as a report never panic and are never verified, and EVERY
// single-bit change of a valid (test-CA) extension is rejected (also in the unsigned parts of the
// certificates, which must be canonical DER).

const PKEY: [u8; 32] = [9; 32];

static PGPU: LazyLock<(GpuPolicy, Vec<u8>)> = LazyLock::new(|| {
    let g = TestGpu::new().expect("test gpu");
    let ext = GpuEvidence {
        gpus: vec![g.entry(&gpu_nonce_for_key(&PKEY)).expect("test gpu")],
    }
    .encode()
    .expect("test gpu");
    (g.policy(true).expect("test gpu"), ext)
});

fn pverdict(ext: &[u8]) -> Verdict {
    let mut v = Verdict::default();
    check_evidence(Some(&PGPU.0), Some(ext), &PKEY, NOW, &mut v);
    v.finish()
}

#[test]
fn unmodified_extension_verifies_for_the_proptests() {
    let v = pverdict(&PGPU.1);
    assert!(v.accepted, "{:#?}", v.reasons);
    assert_eq!(v.gpu.expect("test gpu").status, GpuStatus::Verified);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        prop_assert!(!pverdict(&bytes).accepted);
        let _ = SpdmReport::parse(&bytes);
        let _ = GpuEvidence::decode(&bytes);
    }
}

#[test]
fn single_bit_flips_anywhere_are_rejected() {
    // Every byte, one bit each (rotating), plus the constructed/class bits of every byte that
    // looks like a DER tag (the parser is lenient there; our canonical-envelope check is not).
    // All 8 bits of every byte also pass (~3 minutes in a debug build, so not run here).
    let ext = PGPU.1.clone();
    for pos in 0..ext.len() {
        let mut bits = vec![pos % 8];
        if [0x30, 0x31, 0x02, 0x03, 0x04, 0x05, 0x06, 0xa0, 0xa3].contains(&ext[pos]) {
            bits.extend([5, 6, 7]);
        }
        for bit in bits {
            let mut x = ext.clone();
            x[pos] ^= 1 << bit;
            let v = pverdict(&x);
            assert!(!v.accepted, "flip of bit {bit} at byte {pos} accepted");
            assert_ne!(v.gpu.map(|g| g.status), Some(GpuStatus::Verified));
        }
    }
}
