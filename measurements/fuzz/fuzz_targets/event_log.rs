//! Fuzz target: CCEL table parsing and TCG2 event-log replay.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = measurements::eventlog::parse_ccel(data);
    let _ = measurements::eventlog::replay(data);
});
