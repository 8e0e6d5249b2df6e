//! A public NVIDIA Hopper attestation sample, verified with the real pinned NVIDIA root.
//!
//! Set `WORKER_GPU_EVIDENCE_SAMPLE` to either
//! - a directory holding NVIDIA nvtrust's public samples `hopperAttestationReport.txt` (the
//!   report, hex) and `hopperCertChain.txt` (the PEM chain), as in
//!   `guest_tools/gpu_verifiers/local_gpu_verifier/src/verifier/samples/`, or
//! - the report file (hex text or raw bytes), with `WORKER_GPU_EVIDENCE_SAMPLE_CHAIN` naming the
//!   PEM chain.
//!
//! Unset: prints `SKIPPED:` (nothing of NVIDIA's is in this repository). What it checks: the
//! report parses, the chain verifies up to the pinned NVIDIA Device Identity root
//! (`NVIDIA_DEVICE_IDENTITY_ROOT_SHA256`), and the report's signature verifies with the leaf key.
//! The measurements are NOT compared with NVIDIA's RIMs here (the reference values are taken
//! from the report itself), and the nonce is the sample's own.

use std::path::PathBuf;

use attestation::Verdict;
use attestation::gpu::{CcState, GpuEntry, GpuPolicy, ReferenceValues, SpdmReport, check_entry};

fn read_report(p: &std::path::Path) -> Vec<u8> {
    let raw = std::fs::read(p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
    let text: String = String::from_utf8_lossy(&raw)
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    hex::decode(&text).unwrap_or(raw)
}

#[test]
fn public_nvidia_sample_verifies_to_the_pinned_root() {
    let Some(sample) = std::env::var_os("WORKER_GPU_EVIDENCE_SAMPLE").map(PathBuf::from) else {
        println!(
            "SKIPPED: WORKER_GPU_EVIDENCE_SAMPLE is not set (a directory with NVIDIA nvtrust's \
             hopperAttestationReport.txt and hopperCertChain.txt, or a report file with \
             WORKER_GPU_EVIDENCE_SAMPLE_CHAIN naming its PEM chain)"
        );
        return;
    };
    let (report_path, chain_path) = if sample.is_dir() {
        (
            sample.join("hopperAttestationReport.txt"),
            sample.join("hopperCertChain.txt"),
        )
    } else {
        let chain = std::env::var_os("WORKER_GPU_EVIDENCE_SAMPLE_CHAIN")
            .map(PathBuf::from)
            .expect(
                "WORKER_GPU_EVIDENCE_SAMPLE names a file: set WORKER_GPU_EVIDENCE_SAMPLE_CHAIN",
            );
        (sample, chain)
    };
    let report = read_report(&report_path);
    let pem = std::fs::read(&chain_path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", chain_path.display()));
    let chain = attestation::gpu::pem_chain_to_der(&pem).expect("PEM chain");
    let parsed = SpdmReport::parse(&report).expect("the sample parses as SPDM GET_MEASUREMENTS");
    let reference = ReferenceValues::new(
        parsed
            .blocks
            .iter()
            .map(|b| (b.index, vec![b.value.clone()]))
            .collect(),
    )
    .expect("reference");
    let policy = GpuPolicy::new(reference, true); // NVIDIA's root only
    let entry = GpuEntry {
        cc: CcState {
            cc_on: true,
            dev_tools: false,
        },
        report,
        cert_chain: chain,
    };
    let now = attestation::verify::unix_secs(std::time::SystemTime::now());
    let mut v = Verdict::default();
    let info = check_entry(&policy, &entry, &parsed.request_nonce, now, &mut v);
    let v = v.finish();
    println!(
        "sample: {} certificates, leaf {:?}, root sha256 {:?}, {} measurement blocks, driver {:?}, \
         vbios {:?}, request nonce {}",
        entry.cert_chain.len(),
        info.leaf_subject,
        info.root_sha256,
        info.measurement_blocks,
        info.driver_version,
        info.vbios_version,
        hex::encode(parsed.request_nonce)
    );
    assert!(v.accepted, "{:#?}", v.reasons);
    assert_eq!(
        info.root_sha256.as_deref(),
        Some(attestation::gpu::NVIDIA_DEVICE_IDENTITY_ROOT_SHA256)
    );
}
