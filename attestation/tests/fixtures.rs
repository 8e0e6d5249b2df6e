//! Verification of the real Intel TDX quotes in the shared fixtures (dcap-qvl's test quotes with
//! their collateral), and one rejection per reason code. Skips visibly when fixtures are missing.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::sync::Arc;

use attestation::collateral::{
    FileCollateral, QuoteCollateralV3, parse_collateral_json, parse_rfc3339,
};
use attestation::{Policy, ReasonCode, SimulatedTee, StaticAllowList, TdRegisters, Verifier};

fn fixtures() -> Option<PathBuf> {
    let dir = std::env::var_os("SHARED_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shared/fixtures"
            ))
        });
    if dir.join("quotes").is_dir() {
        Some(dir)
    } else {
        eprintln!(
            "SKIPPED: shared fixtures not found at {} (set SHARED_FIXTURES)",
            dir.display()
        );
        None
    }
}

struct Case {
    name: &'static str,
    at: &'static str,
    status: &'static str,
}

const CASES: &[Case] = &[
    Case {
        name: "dcap-qvl-tdx_quote",
        at: "2025-07-01T00:00:00Z",
        status: "UpToDate",
    },
    Case {
        name: "dcap-qvl-tdx_quote_td15ex",
        at: "2026-10-20T00:00:00Z",
        status: "UpToDate",
    },
];

fn load(dir: &std::path::Path, name: &str) -> (Vec<u8>, QuoteCollateralV3) {
    let q = std::fs::read(dir.join("quotes").join(name)).unwrap();
    let c = std::fs::read_to_string(dir.join("quotes").join(format!("{name}_collateral.json")))
        .unwrap();
    (q, parse_collateral_json(&c, name).unwrap())
}

fn verifier(c: QuoteCollateralV3, policy: Policy) -> Verifier {
    Verifier::new(policy, Arc::new(FileCollateral::from_collateral(c)))
}

#[test]
fn real_quotes_verify_up_to_date_inside_their_window() {
    let Some(dir) = fixtures() else { return };
    for case in CASES {
        let (q, c) = load(&dir, case.name);
        let at = parse_rfc3339(case.at).unwrap();
        let v = verifier(c.clone(), Policy::default()).verify_quote(&q, None, at);
        assert!(v.accepted, "{}: {:?}", case.name, v.reasons);
        let rc = verifier(c, Policy::default())
            .with_backend(attestation::verify::CryptoBackend::RustCrypto)
            .verify_quote(&q, None, at);
        assert_eq!(rc, v, "ring and RustCrypto backends must agree");
        assert_eq!(v.tcb_status.as_deref(), Some(case.status), "{}", case.name);
        assert!(!v.simulated);
        assert_eq!(v.image_hash_cocoon_v1.as_ref().map(String::len), Some(64));
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["tcb_status"], case.status);
    }
}

#[test]
fn outdated_quote_is_rejected_by_default_and_accepted_when_allowed() {
    let Some(dir) = fixtures() else { return };
    let (q, c) = load(&dir, "dcap-qvl-tdx_quote_outdated");
    let at = parse_rfc3339("2026-03-01T00:00:00Z").unwrap();
    let v = verifier(c.clone(), Policy::default()).verify_quote(&q, None, at);
    assert!(!v.accepted);
    let status = v.tcb_status.clone().expect("status reported");
    assert_eq!(status, "OutOfDate");
    let reason = v
        .reasons
        .iter()
        .find(|r| r.code == ReasonCode::TcbStatusNotAllowed)
        .expect("status reason");
    assert!(reason.message.contains(&status), "{}", reason.message);
    assert_eq!(v.reasons.len(), 1, "{:?}", v.reasons);
    let v = verifier(c, Policy::default().allow_status(&status)).verify_quote(&q, None, at);
    assert!(v.accepted, "{:?}", v.reasons);
}

#[test]
fn flipped_byte_in_quote_is_a_signature_failure() {
    let Some(dir) = fixtures() else { return };
    let (mut q, c) = load(&dir, "dcap-qvl-tdx_quote");
    q[48 + 200] ^= 0x01; // inside the TD report (MRTD)
    let v = verifier(c, Policy::default()).verify_quote(
        &q,
        None,
        parse_rfc3339("2025-07-01T00:00:00Z").unwrap(),
    );
    assert!(!v.accepted);
    assert!(v.has(ReasonCode::QuoteSignatureInvalid), "{:?}", v.reasons);
}

#[test]
fn flipped_byte_in_collateral_is_a_collateral_failure() {
    let Some(dir) = fixtures() else { return };
    let (q, mut c) = load(&dir, "dcap-qvl-tdx_quote");
    c.tcb_info_signature[5] ^= 0x01;
    let v = verifier(c, Policy::default()).verify_quote(
        &q,
        None,
        parse_rfc3339("2025-07-01T00:00:00Z").unwrap(),
    );
    assert!(!v.accepted);
    assert!(v.has(ReasonCode::CollateralInvalid), "{:?}", v.reasons);
}

#[test]
fn time_outside_the_collateral_window_is_rejected() {
    let Some(dir) = fixtures() else { return };
    let (q, c) = load(&dir, "dcap-qvl-tdx_quote");
    let v = verifier(c.clone(), Policy::default()).verify_quote(
        &q,
        None,
        parse_rfc3339("2025-08-01T00:00:00Z").unwrap(),
    );
    assert!(v.has(ReasonCode::CollateralExpired), "{:?}", v.reasons);
    assert!(!v.accepted);
    let v = verifier(c.clone(), Policy::default()).verify_quote(
        &q,
        None,
        parse_rfc3339("2025-06-01T00:00:00Z").unwrap(),
    );
    assert!(v.has(ReasonCode::CollateralNotYetValid), "{:?}", v.reasons);
    // Maximum collateral age.
    let p = Policy {
        max_collateral_age: Some(std::time::Duration::from_secs(3600)),
        ..Policy::default()
    };
    let v = verifier(c, p).verify_quote(&q, None, parse_rfc3339("2025-07-01T00:00:00Z").unwrap());
    assert!(v.has(ReasonCode::CollateralTooOld), "{:?}", v.reasons);
}

#[test]
fn wrong_key_binding_is_rejected() {
    let Some(dir) = fixtures() else { return };
    let (q, c) = load(&dir, "dcap-qvl-tdx_quote");
    let v = verifier(c, Policy::default()).verify_quote(
        &q,
        Some(&[0u8; 64]),
        parse_rfc3339("2025-07-01T00:00:00Z").unwrap(),
    );
    assert!(v.has(ReasonCode::ReportDataMismatch), "{:?}", v.reasons);
    assert_eq!(v.reasons.len(), 1);
}

#[test]
fn image_hash_must_be_on_the_allow_list() {
    let Some(dir) = fixtures() else { return };
    let (q, c) = load(&dir, "dcap-qvl-tdx_quote");
    let at = parse_rfc3339("2025-07-01T00:00:00Z").unwrap();
    let v = verifier(c.clone(), Policy::default())
        .with_allow_list(Arc::new(StaticAllowList::new([[0u8; 32]])))
        .verify_quote(&q, None, at);
    assert!(v.has(ReasonCode::ImageHashNotAllowed), "{:?}", v.reasons);
    assert_eq!(v.image_hash_checked.as_deref(), Some("cw-v1"));
    let hash: [u8; 32] = hex::decode(v.image_hash_cw_v1.clone().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let v = verifier(c.clone(), Policy::default())
        .with_allow_list(Arc::new(StaticAllowList::new([hash])))
        .verify_quote(&q, None, at);
    assert!(v.accepted, "{:?}", v.reasons);
    // The Cocoon hash is an explicit option; a cw-v1 list does not match it.
    let cocoon: [u8; 32] = hex::decode(v.image_hash_cocoon_v1.clone().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let v = verifier(c.clone(), Policy::default())
        .with_allow_list(Arc::new(StaticAllowList::new([cocoon])))
        .verify_quote(&q, None, at);
    assert!(v.has(ReasonCode::ImageHashNotAllowed), "{:?}", v.reasons);
    let v = verifier(c, Policy::default())
        .with_image_hash_kind(attestation::ImageHashKind::CocoonV1)
        .with_allow_list(Arc::new(StaticAllowList::new([cocoon])))
        .verify_quote(&q, None, at);
    assert!(v.accepted, "{:?}", v.reasons);
    assert_eq!(v.image_hash_checked.as_deref(), Some("cocoon-v1"));
}

#[test]
fn debug_td_is_rejected_even_when_simulation_is_allowed() {
    let tee = SimulatedTee::from_seed(&[2; 32], TdRegisters::default())
        .unwrap()
        .with_debug(true);
    let ver = Verifier::simulated(Policy::default().with_simulated(true), tee.public_key());
    let v = ver.verify_quote(&tee.quote(&[0; 64]), None, 0);
    assert!(v.has(ReasonCode::DebugTd), "{:?}", v.reasons);
    assert_eq!(v.reasons.len(), 1);
    let tee = tee.with_debug(false);
    assert!(ver.verify_quote(&tee.quote(&[0; 64]), None, 0).accepted);
}

#[test]
fn simulated_quote_is_refused_without_allow_simulated_and_by_a_real_verifier() {
    let Some(dir) = fixtures() else { return };
    let tee = SimulatedTee::from_seed(&[2; 32], TdRegisters::default()).unwrap();
    let q = tee.quote(&[0; 64]);
    let (_, c) = load(&dir, "dcap-qvl-tdx_quote");
    // Default policy, even with the simulator key and real collateral: refused.
    let v = verifier(c, Policy::default())
        .with_simulated_key(tee.public_key())
        .verify_quote(&q, None, 0);
    assert!(v.has(ReasonCode::SimulatedNotAllowed));
    assert!(v.simulated && !v.accepted);
}

#[test]
fn cli_exit_codes_and_json() {
    let Some(dir) = fixtures() else { return };
    let args = |name: &str, at: &str, extra: &[&str]| {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct T {
            #[command(flatten)]
            a: attestation::cli::Args,
        }
        let q = dir.join("quotes").join(name);
        let c = dir.join("quotes").join(format!("{name}_collateral.json"));
        let mut v = vec![
            "t".to_owned(),
            "--quote".into(),
            q.display().to_string(),
            "--collateral".into(),
            c.display().to_string(),
            "--at".into(),
            at.into(),
            "--json".into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        T::parse_from(v).a
    };
    let a = args("dcap-qvl-tdx_quote", "2025-07-01T00:00:00Z", &[]);
    let v = attestation::cli::verdict(&a).unwrap();
    assert_eq!(v.tcb_status.as_deref(), Some("UpToDate"));
    assert_eq!(attestation::cli::run(&a), 0);
    let a = args("dcap-qvl-tdx_quote_outdated", "2026-03-01T00:00:00Z", &[]);
    assert_eq!(attestation::cli::run(&a), 1);
    let status = attestation::cli::verdict(&a).unwrap().tcb_status.unwrap();
    let a = args(
        "dcap-qvl-tdx_quote_outdated",
        "2026-03-01T00:00:00Z",
        &["--allow-status", &status],
    );
    assert_eq!(attestation::cli::run(&a), 0);
    let a = args("dcap-qvl-tdx_quote", "not-a-time", &[]);
    assert_eq!(attestation::cli::run(&a), 2);
}

/// The cocoon-v1 hashes of the fixture quotes, as printed by `measurements quote` (the two crates
/// compute the hash independently; these vectors keep them in agreement).
#[test]
fn image_hashes_match_measurements_vectors() {
    let Some(dir) = fixtures() else { return };
    for (name, want) in [
        (
            "cocoon-test-quote.dat",
            "04b3afd931d28680af91a15b09d672c40ad6b141f7f9089a8d67d595220f7436",
        ),
        (
            "dcap-qvl-tdx_quote",
            "b260fa9168ca9f28e7f15f128a45ac31c419705b31a60feac30b322ee06bc752",
        ),
        (
            "dcap-qvl-tdx_quote_td15ex",
            "828898d0193ff4cbc40f8a6510c9c70136035d828c8525de40ec3ed71b52ca4f",
        ),
        (
            "go-tdx-guest-quote_v5_sample.dat",
            "3bb83abe8ee891c2b848d51b0fc6a33beaa326b8f15b7bf917ecbb78ed5c04ec",
        ),
    ] {
        let q = attestation::parse_quote(&std::fs::read(dir.join("quotes").join(name)).unwrap())
            .unwrap();
        assert_eq!(
            hex::encode(q.registers.image_hash_cocoon_v1()),
            want,
            "{name}"
        );
    }
}

#[test]
fn real_quote_without_collateral_is_rejected_with_collateral_missing() {
    let Some(dir) = fixtures() else { return };
    let q = std::fs::read(dir.join("quotes/cocoon-test-quote.dat")).unwrap();
    let v = Verifier::new(Policy::default(), Arc::new(attestation::NoCollateral))
        .verify_quote(&q, None, 0);
    assert!(v.has(ReasonCode::CollateralMissing), "{:?}", v.reasons);
    assert_eq!(v.quote_version, Some(4));
}

/// A real quote inside an RA-TLS certificate: everything verifies except the key binding (the
/// fixture quote binds someone else's REPORTDATA), so exactly that reason is reported.
#[test]
fn real_quote_in_ratls_certificate_fails_only_on_key_binding() {
    let Some(dir) = fixtures() else { return };
    struct Fixed(Vec<u8>);
    impl attestation::QuoteProvider for Fixed {
        fn quote(&self, _rd: &[u8; 64]) -> Result<Vec<u8>, String> {
            Ok(self.0.clone())
        }
    }
    let (q, c) = load(&dir, "dcap-qvl-tdx_quote");
    let now = 1_800_000_000;
    let id = attestation::RaTlsIdentity::generate(&Fixed(q), now).unwrap();
    let ver = verifier(c, Policy::default())
        .with_fixed_time(parse_rfc3339("2025-07-01T00:00:00Z").unwrap());
    let v = attestation::ratls::verify_certificate(&ver, &id.cert_der, 1, now);
    assert_eq!(v.tcb_status.as_deref(), Some("UpToDate"));
    let codes: Vec<_> = v.reasons.iter().map(|r| r.code).collect();
    assert_eq!(codes, vec![ReasonCode::ReportDataMismatch]);
}
