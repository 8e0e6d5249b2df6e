//! Property tests: arbitrary bytes never panic the parsers (quote, CCEL table and log, TDVF
//! metadata, PE/Authenticode, ACPI tables), and truncations of real fixtures are errors or
//! valid parses, never panics.

use measurements::{acpi, eventlog, kernel, quote::Quote, tdvf::Tdvf};
use proptest::prelude::*;

fn fixture(rel: &str) -> Option<Vec<u8>> {
    let dir = std::env::var_os("WORKER_FIXTURES_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shared/fixtures"
            ))
        });
    match std::fs::read(dir.join(rel)) {
        Ok(d) => Some(d),
        Err(_) => {
            eprintln!("SKIPPED: fixture {rel} not found under {}", dir.display());
            assert!(
                std::env::var_os("CI").is_none(),
                "fixtures are required when CI is set"
            );
            None
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn quote_parser_never_panics(data in proptest::collection::vec(any::<u8>(), 0..6000)) {
        let _ = Quote::parse(&data);
    }

    #[test]
    fn quote_parser_with_valid_prefix_never_panics(
        ver in prop_oneof![Just(4u16), Just(5u16)],
        body in proptest::collection::vec(any::<u8>(), 0..2000),
    ) {
        let mut d = Vec::new();
        d.extend_from_slice(&ver.to_le_bytes());
        d.extend_from_slice(&2u16.to_le_bytes());
        d.extend_from_slice(&0x81u32.to_le_bytes());
        d.extend_from_slice(&[0u8; 40]);
        d.extend_from_slice(&body);
        let _ = Quote::parse(&d);
    }

    #[test]
    fn event_log_parser_never_panics(data in proptest::collection::vec(any::<u8>(), 0..4000)) {
        let _ = eventlog::replay(&data);
        let _ = eventlog::parse_ccel(&data);
    }

    #[test]
    fn tdvf_parser_never_panics(data in proptest::collection::vec(any::<u8>(), 0..4000)) {
        if let Ok(t) = Tdvf::parse(&data) {
            let _ = t.mrtd(measurements::tdvf::PageOrder::SinglePass);
        }
    }

    #[test]
    fn pe_and_patch_never_panic(data in proptest::collection::vec(any::<u8>(), 0..8192), ram in any::<u64>()) {
        let _ = kernel::authenticode_sha384(&data);
        let _ = kernel::patch_bzimage(&data, 1234, ram, kernel::QEMU_ACPI_DATA_SIZE);
    }

    #[test]
    fn acpi_parser_never_panics(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let _ = acpi::synthesize(&data);
        let _ = measurements::compute::madt_cpu_count(&data);
    }
}

#[test]
fn truncated_and_flipped_fixtures_never_panic() {
    for f in [
        "quotes/dcap-qvl-tdx_quote",
        "quotes/dcap-qvl-tdx_quote_td15ex",
        "quotes/go-tdx-guest-quote_v5_sample.dat",
    ] {
        let Some(d) = fixture(f) else { return };
        for cut in (0..d.len()).step_by(7) {
            let _ = Quote::parse(&d[..cut]);
        }
        for i in (0..d.len()).step_by(13) {
            let mut m = d.clone();
            m[i] ^= 0xff;
            let _ = Quote::parse(&m);
        }
    }
    let Some(log) = fixture("ccel/go-tdx-guest-cos-ccel_data.dat") else {
        return;
    };
    let end = 20_000.min(log.len());
    for cut in (0..end).step_by(11) {
        let _ = eventlog::replay(&log[..cut]);
    }
    for i in (0..end).step_by(17) {
        let mut m = log[..end].to_vec();
        m[i] ^= 0xff;
        let _ = eventlog::replay(&m);
    }
}
