//! CUDA backend tests on a real GPU.
//!
//! They run only with `INFERENCE_TEST_CUDA=1` (on a GPU machine); otherwise each prints a
//! visible "SKIPPED" line and returns. With the variable set and no usable GPU they FAIL.
//!
//! Tolerances: see `inference::cuda::checks` (mat-vec 1e-5 of sum|w x|, element-wise 1e-5
//! relative, RoPE/attention 1e-4 absolute, dequantization and argmax exact; whole-model logits
//! 1e-3 of max|logit| against the f32 reference and 5e-2 against the CPU backend, greedy token
//! ids identical except at near-ties).
//!
//! Run: `INFERENCE_TEST_CUDA=1 cargo test -p inference --test cuda -- --nocapture --test-threads=1`

use inference::cuda::checks::{CheckResult, model_cases, run_kernel_checks, run_model_checks};
use inference::cuda::{CudaBackend, CudaOptions, DeviceSampler, Gpu, cuda_available};
use inference::{Backend, GgmlType, Gguf, LlamaConfig, LlamaWeights};

/// The GPU if the tests should run, `None` (after printing SKIPPED) if not requested; panics
/// when requested but no GPU is usable.
fn gpu() -> Option<Gpu> {
    if std::env::var_os("INFERENCE_TEST_CUDA").is_none() {
        eprintln!("SKIPPED (set INFERENCE_TEST_CUDA=1 on a GPU machine)");
        return None;
    }
    match cuda_available() {
        Ok(info) => eprintln!("GPU: {info}"),
        Err(e) => panic!("INFERENCE_TEST_CUDA is set but no GPU is usable: {e}"),
    }
    match Gpu::new(0) {
        Ok(g) => Some(g),
        Err(e) => panic!("INFERENCE_TEST_CUDA is set but the kernels could not be prepared: {e}"),
    }
}

fn assert_all_pass(results: &[CheckResult]) {
    for r in results {
        eprintln!("{}", r.line());
    }
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| !r.passed)
        .map(|r| r.name.as_str())
        .collect();
    assert!(failed.is_empty(), "failed checks: {failed:?}");
    assert!(!results.is_empty(), "no checks ran");
}

#[test]
fn every_kernel_matches_the_cpu_reference() {
    let Some(gpu) = gpu() else { return };
    assert_all_pass(&run_kernel_checks(&gpu));
}

#[test]
fn synthetic_models_match_the_cpu_backend() {
    let Some(gpu) = gpu() else { return };
    assert_all_pass(&run_model_checks(&gpu, &model_cases()));
}

fn tiny(ty: GgmlType) -> Vec<u8> {
    inference::synthetic::synthetic_gguf(&LlamaConfig::tiny(), ty, 5).expect("synthetic model")
}

#[test]
fn backend_contract_errors_and_rewind() {
    let Some(_gpu) = gpu() else { return };
    let bytes = tiny(GgmlType::Q8_0);
    let g = Gguf::parse(&bytes).expect("parse");
    let w = LlamaWeights::from_gguf(&g).expect("weights");
    let opts = CudaOptions {
        max_context: Some(32),
        ..Default::default()
    };
    let mut be = CudaBackend::load(&w, &w.config, &opts).expect("load");
    assert_eq!(be.name(), "cuda");
    assert_eq!(be.max_context(), 32);
    assert!(be.forward(&[], 0).is_err());
    assert!(be.forward(&[w.config.vocab as u32], 0).is_err());
    assert!(be.forward(&[1; 33], 0).is_err());
    // Rewinding: the same prefix computed twice gives the same logits.
    let a = be.forward(&[5, 6, 7], 0).expect("forward");
    let _ = be.forward(&[8, 9], 3).expect("forward");
    let b = be.forward(&[5, 6, 7], 0).expect("forward");
    assert_eq!(a, b);
    // Single tokens (graph path) continue a prefix exactly like a batched prompt does.
    be.reset();
    let whole = be.forward(&[5, 6, 7, 8], 0).expect("forward");
    be.forward(&[5, 6, 7], 0).expect("forward");
    let step = be.forward(&[8], 3).expect("forward");
    let d = whole
        .iter()
        .zip(&step)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(d < 1e-3, "batched vs step logits differ by {d}");
    let e = CudaBackend::generate_greedy_on_device(&mut be, &[1; 30], 5)
        .expect_err("needs 34 positions of 32");
    assert!(e.to_string().contains("context"), "{e}");
}

#[test]
fn device_sampling_is_deterministic_and_greedy_at_tiny_top_p() {
    let Some(_gpu) = gpu() else { return };
    let bytes = tiny(GgmlType::Q4_0);
    let g = Gguf::parse(&bytes).expect("parse");
    let w = LlamaWeights::from_gguf(&g).expect("weights");
    let mut be = CudaBackend::load(&w, &w.config, &CudaOptions::default()).expect("load");
    let prompt = [3u32, 4, 5];
    let greedy = be.generate_greedy_on_device(&prompt, 10).expect("greedy");
    let s = |be: &mut CudaBackend, top_p: f32, seed: u32| {
        be.generate_on_device(
            &prompt,
            10,
            DeviceSampler::TopP {
                temperature: 0.9,
                top_p,
                seed,
            },
        )
        .expect("sample")
    };
    assert_eq!(s(&mut be, 1e-6, 1), greedy, "top_p -> 0 must be greedy");
    assert_eq!(
        s(&mut be, 0.9, 7),
        s(&mut be, 0.9, 7),
        "same seed, same tokens"
    );
}

#[test]
fn no_gpu_message_is_clear_without_the_variable() {
    // Runs everywhere: cuda_available never panics and explains itself.
    match cuda_available() {
        Ok(info) => eprintln!("GPU present: {info}"),
        Err(e) => {
            assert!(!e.is_empty());
            eprintln!("no GPU here (expected on CI): {e}");
        }
    }
}
