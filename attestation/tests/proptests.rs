//! Property tests: arbitrary bytes as a quote or as a certificate never panic the verifier, and
//! mutations of a real quote are never accepted.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use attestation::collateral::{FileCollateral, parse_collateral_json};
use attestation::{NoCollateral, Policy, SimulatedTee, TdRegisters, Verifier};
use proptest::prelude::*;

fn sim_verifier() -> Verifier {
    let tee = SimulatedTee::from_seed(&[1; 32], TdRegisters::default()).unwrap();
    Verifier::new(
        Policy::default().with_simulated(true),
        Arc::new(NoCollateral),
    )
    .with_simulated_key(tee.public_key())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_as_quote_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let v = sim_verifier().verify_quote(&bytes, None, 0);
        prop_assert!(!v.accepted);
        let _ = attestation::parse_quote(&bytes);
    }

    #[test]
    fn quote_shaped_bytes_never_panic(body in proptest::collection::vec(any::<u8>(), 0..1200), version in 3u16..6, sig_len in 0u32..200) {
        let mut q = Vec::new();
        q.extend_from_slice(&version.to_le_bytes());
        q.extend_from_slice(&2u16.to_le_bytes());
        q.extend_from_slice(&0x81u32.to_le_bytes());
        q.extend_from_slice(&[0u8; 40]);
        q.extend_from_slice(&body);
        q.extend_from_slice(&sig_len.to_le_bytes());
        let v = sim_verifier().verify_quote(&q, None, 0);
        prop_assert!(!v.accepted);
    }

    #[test]
    fn arbitrary_bytes_as_certificate_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let v = attestation::ratls::verify_certificate(&sim_verifier(), &bytes, 1, 0);
        prop_assert!(!v.accepted);
    }

    #[test]
    fn mutated_simulated_quote_is_never_accepted(pos in 0usize..744, bit in 0u8..8) {
        let tee = SimulatedTee::from_seed(&[1; 32], TdRegisters::default()).unwrap();
        let mut q = tee.quote(&[3; 64]);
        prop_assume!(pos < q.len());
        q[pos] ^= 1 << bit;
        prop_assert!(!sim_verifier().verify_quote(&q, None, 0).accepted);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Real quote with one flipped bit (dcap-qvl path): never accepted, never panics.
    #[test]
    fn mutated_real_quote_is_never_accepted(pos in 0usize..5006, bit in 0u8..8) {
        let dir = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fixtures/quotes"));
        let Ok(mut q) = std::fs::read(dir.join("dcap-qvl-tdx_quote")) else {
            eprintln!("SKIPPED: shared fixtures not found");
            return Ok(());
        };
        let c = parse_collateral_json(&std::fs::read_to_string(dir.join("dcap-qvl-tdx_quote_collateral.json")).unwrap(), "c").unwrap();
        prop_assume!(pos < q.len());
        q[pos] ^= 1 << bit;
        let v = Verifier::new(Policy::default(), Arc::new(FileCollateral::from_collateral(c)))
            .verify_quote(&q, None, attestation::collateral::parse_rfc3339("2025-07-01T00:00:00Z").unwrap());
        // Bytes outside the signed part (e.g. unused padding in certification data) may not matter;
        // everything in the header and body must.
        if pos < 48 + 584 {
            prop_assert!(!v.accepted, "flip at {} accepted", pos);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A real RA-TLS certificate with one flipped bit: never accepted, never panics.
    #[test]
    fn mutated_ratls_certificate_is_never_accepted(seed in any::<u64>(), bit in 0u8..8) {
        let tee = SimulatedTee::from_seed(&[1; 32], TdRegisters::default()).unwrap();
        let now = 1_800_000_000;
        let id = attestation::RaTlsIdentity::generate(&tee, now).unwrap();
        let mut der = id.cert_der.clone();
        let pos = (seed % der.len() as u64) as usize;
        der[pos] ^= 1 << bit;
        let v = attestation::ratls::verify_certificate(&sim_verifier(), &der, 1, now);
        prop_assert!(!v.accepted, "flip at {} accepted", pos);
    }
}

/// Exhaustive: every single-bit flip anywhere in an RA-TLS certificate is rejected.
#[test]
fn every_single_bit_flip_of_a_certificate_is_rejected() {
    let tee = SimulatedTee::from_seed(&[1; 32], TdRegisters::default()).unwrap();
    let now = 1_800_000_000;
    let id = attestation::RaTlsIdentity::generate(&tee, now).unwrap();
    let ver = sim_verifier();
    assert!(attestation::ratls::verify_certificate(&ver, &id.cert_der, 1, now).accepted);
    for pos in 0..id.cert_der.len() {
        for bit in 0..8 {
            let mut der = id.cert_der.clone();
            der[pos] ^= 1 << bit;
            let v = attestation::ratls::verify_certificate(&ver, &der, 1, now);
            assert!(!v.accepted, "flip of bit {bit} at byte {pos} accepted");
        }
    }
}
