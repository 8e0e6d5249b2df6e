//! Throughput measurement of a backend: prefill (one batched forward over the prompt) and
//! decode (one token at a time, greedy), used by `inference-bench` and `cargo xtask bench inference`.

use std::time::Instant;

use crate::backend::Backend;
use crate::error::InferenceError;
use crate::sampling::argmax;

/// One measurement.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BenchResult {
    /// Backend label (e.g. `cpu-2t`, `cuda`).
    pub backend: String,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Prefill throughput (tokens/s).
    pub prefill_tps: f64,
    /// Decoded tokens.
    pub gen_tokens: usize,
    /// Decode throughput (tokens/s).
    pub decode_tps: f64,
    /// Prefill tokens per second of the calling thread's CPU time (Linux; with 1 thread this
    /// is what an idle machine would measure, so it stays meaningful on a loaded one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_cpu_tps: Option<f64>,
    /// Decode tokens per second of the calling thread's CPU time (see `prefill_cpu_tps`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_cpu_tps: Option<f64>,
    /// Weight bytes read per decoded token, when known.
    pub weight_bytes_per_token: Option<u64>,
    /// Device peak memory bandwidth (bytes/s), when known.
    pub peak_bandwidth: Option<f64>,
    /// Share of the bandwidth floor reached by decode (1.0 = reading all weights once per token
    /// at peak bandwidth), when known.
    pub bandwidth_share: Option<f64>,
}

/// A deterministic prompt of `n` token ids in `1..vocab` (avoids id 0).
pub fn bench_prompt(n: usize, vocab: usize) -> Vec<u32> {
    let v = vocab.max(2) as u64;
    (0..n as u64)
        .map(|i| (1 + (i.wrapping_mul(2_654_435_761) % (v - 1))) as u32)
        .collect()
}

/// Measures prefill of `prompt` and `gen` greedy decode steps (after one warm-up step).
pub fn run_bench(
    label: &str,
    backend: &mut dyn Backend,
    prompt: &[u32],
    gen_tokens: usize,
) -> Result<BenchResult, InferenceError> {
    if prompt.len() + gen_tokens + 1 > backend.max_context() {
        return Err(InferenceError::ContextOverflow {
            needed: prompt.len() + gen_tokens + 1,
            max: backend.max_context(),
        });
    }
    // Warm-up (page in weights, compile kernels, fill caches).
    backend.reset();
    backend.forward(&prompt[..prompt.len().min(8)], 0)?;
    backend.reset();
    let c0 = thread_cpu_seconds();
    let t = Instant::now();
    let logits = backend.forward(prompt, 0)?;
    let prefill = t.elapsed().as_secs_f64();
    let c1 = thread_cpu_seconds();
    let mut next = argmax(&logits);
    let t = Instant::now();
    for i in 0..gen_tokens {
        let l = backend.forward(&[next], prompt.len() + i)?;
        next = argmax(&l);
    }
    let decode = t.elapsed().as_secs_f64();
    let c2 = thread_cpu_seconds();
    let per_cpu = |n: usize, a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > a => Some(n as f64 / (b - a)),
        _ => None,
    };
    Ok(BenchResult {
        backend: label.to_owned(),
        prompt_tokens: prompt.len(),
        prefill_tps: prompt.len() as f64 / prefill.max(1e-9),
        gen_tokens,
        decode_tps: gen_tokens as f64 / decode.max(1e-9),
        prefill_cpu_tps: per_cpu(prompt.len(), c0, c1),
        decode_cpu_tps: per_cpu(gen_tokens, c1, c2),
        weight_bytes_per_token: None,
        peak_bandwidth: None,
        bandwidth_share: None,
    })
}

/// CPU time of the calling thread in seconds (`/proc/thread-self/schedstat`: nanoseconds on
/// the CPU, though kernels may update it only at scheduler ticks, e.g. every 4 ms), or `None`
/// where that file does not exist.
pub fn thread_cpu_seconds() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = s.split_whitespace().next()?.parse().ok()?;
    Some(ns as f64 * 1e-9)
}

/// Nominal peak memory bandwidth of well-known GPUs by name (bytes/s).
pub fn nominal_bandwidth(gpu_name: &str) -> Option<f64> {
    let n = gpu_name.to_ascii_uppercase();
    let tbs = if n.contains("H200") {
        4.8
    } else if n.contains("H100") && (n.contains("PCIE") || n.contains("H100 NVL")) {
        2.0
    } else if n.contains("H100") {
        3.35
    } else if n.contains("A100") && n.contains("80GB") {
        2.0
    } else if n.contains("A100") {
        1.55
    } else if n.contains("L4") {
        0.3
    } else {
        return None;
    };
    Some(tbs * 1e12)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::cpu::{CpuBackend, CpuOptions};
    use crate::gguf::{GgmlType, Gguf};
    use crate::model::{LlamaConfig, LlamaWeights};

    #[test]
    fn bench_runs_on_synthetic() {
        let bytes =
            crate::synthetic::synthetic_gguf(&LlamaConfig::tiny(), GgmlType::Q4_1, 2).unwrap();
        let g = Gguf::parse(&bytes).unwrap();
        let w = LlamaWeights::from_gguf(&g).unwrap();
        let mut b = CpuBackend::new(
            &w,
            &CpuOptions {
                threads: 1,
                max_context: 64,
                batch: 16,
            },
        )
        .unwrap();
        let p = bench_prompt(20, 384);
        assert!(p.iter().all(|&t| t > 0 && t < 384));
        let r = run_bench("cpu-1t", &mut b, &p, 5).unwrap();
        assert!(r.prefill_tps > 0.0 && r.decode_tps > 0.0);
        assert!(run_bench("x", &mut b, &bench_prompt(60, 384), 10).is_err());
        assert_eq!(nominal_bandwidth("NVIDIA H100 80GB HBM3"), Some(3.35e12));
        assert_eq!(nominal_bandwidth("NVIDIA H200"), Some(4.8e12));
    }
}
