//! Fuzz the RA-TLS certificate path and the quote path (simulated and, when the shared fixtures are
//! present, real dcap-qvl verification against the fixture collateral). Nothing may panic, and
//! fuzzed input is never accepted.
#![no_main]

use std::sync::{Arc, OnceLock};

use attestation::collateral::{FileCollateral, parse_collateral_json};
use attestation::{Policy, SimulatedTee, TdRegisters, Verifier};

fn verifiers() -> &'static (Verifier, Option<Verifier>) {
    static V: OnceLock<(Verifier, Option<Verifier>)> = OnceLock::new();
    V.get_or_init(|| {
        let tee = SimulatedTee::from_seed(&[1; 32], TdRegisters::default()).expect("simulator");
        let sim = Verifier::simulated(Policy::default().with_simulated(true), tee.public_key());
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../../shared/fixtures/quotes"
        );
        let real = std::fs::read_to_string(format!("{dir}/dcap-qvl-tdx_quote_collateral.json"))
            .ok()
            .and_then(|j| parse_collateral_json(&j, "fuzz").ok())
            .map(|c| {
                Verifier::new(
                    Policy::default(),
                    Arc::new(FileCollateral::from_collateral(c)),
                )
            });
        (sim, real)
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (sim, real) = verifiers();
    let _ = attestation::parse_quote(data);
    assert!(!sim.verify_quote(data, None, 0).accepted);
    assert!(!attestation::ratls::verify_certificate(sim, data, 1, 1_800_000_000).accepted);
    if let Some(real) = real {
        // 2025-07-01T00:00:00Z, inside the fixture collateral's window.
        let _ = real.verify_quote(data, None, 1_751_328_000);
    }
});
