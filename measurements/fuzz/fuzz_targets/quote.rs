//! Fuzz target: TDX quote parsing (and the image hashes derived from a parsed quote).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(q) = measurements::quote::Quote::parse(data) {
        let _ = q.image_hash_cocoon_v1();
        let _ = q.image_hash_cw_v1();
    }
});
