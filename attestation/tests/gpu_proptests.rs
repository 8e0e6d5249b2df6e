//! Property tests of GPU evidence: arbitrary bytes as the extension or as a report never panic
//! and are never verified, and any single-bit change of a valid (test-CA) extension is rejected.
//! The evidence is made by `gpu::testing::TestGpu`: our own test CA, not NVIDIA's.
#![allow(clippy::unwrap_used)]

use std::sync::LazyLock;

use attestation::Verdict;
use attestation::gpu::testing::TestGpu;
use attestation::gpu::{
    GpuEvidence, GpuPolicy, GpuStatus, SpdmReport, check_evidence, gpu_nonce_for_key,
};
use proptest::prelude::*;

const KEY: [u8; 32] = [9; 32];
const NOW: u64 = 1_800_000_000;

static GPU: LazyLock<(GpuPolicy, Vec<u8>)> = LazyLock::new(|| {
    let g = TestGpu::new().unwrap();
    let ext = GpuEvidence {
        gpus: vec![g.entry(&gpu_nonce_for_key(&KEY)).unwrap()],
    }
    .encode()
    .unwrap();
    (g.policy(true).unwrap(), ext)
});

fn verdict(ext: &[u8]) -> Verdict {
    let mut v = Verdict::default();
    check_evidence(Some(&GPU.0), Some(ext), &KEY, NOW, &mut v);
    v.finish()
}

#[test]
fn the_unmodified_extension_verifies() {
    let v = verdict(&GPU.1);
    assert!(v.accepted, "{:#?}", v.reasons);
    assert_eq!(v.gpu.unwrap().status, GpuStatus::Verified);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        prop_assert!(!verdict(&bytes).accepted);
        let _ = SpdmReport::parse(&bytes);
        let _ = GpuEvidence::decode(&bytes);
    }

    #[test]
    fn any_bit_flip_is_rejected(pos in 0usize..8192, bit in 0u8..8) {
        let mut ext = GPU.1.clone();
        let pos = pos % ext.len();
        ext[pos] ^= 1 << bit;
        let v = verdict(&ext);
        prop_assert!(!v.accepted, "flip at {} accepted", pos);
        prop_assert!(v.gpu.map(|g| g.status) != Some(GpuStatus::Verified));
    }
}
