//! Throughput measurement of a backend: prefill (one batched forward over the prompt) and
//! decode (one token at a time, greedy), used by `inference-bench` and `cargo xtask bench inference`;
//! [`concurrency`] measures many streams through the scheduler.

use std::time::Instant;

pub mod concurrency;

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
    fn structured_bench_runs_on_synthetic() {
        let bytes =
            crate::synthetic::synthetic_gguf(&LlamaConfig::tiny(), GgmlType::Q8_0, 2).unwrap();
        let mut e = crate::engine::load_cpu_from_bytes(
            &bytes,
            &CpuOptions {
                threads: 1,
                max_context: 256,
                batch: 16,
            },
        )
        .unwrap();
        let r = run_structured_bench(&mut e, 40, 1).unwrap();
        assert!(r.outputs_valid);
        assert!(r.unconstrained_tps > 0.0 && r.constrained_warm_tps > 0.0);
        assert!(r.compile_50_props_ms > 0.0 && r.vocab == 384);
    }

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

/// Structured output: what constrained decoding costs on one model (see
/// [`run_structured_bench`]).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StructuredBench {
    /// Vocabulary size.
    pub vocab: usize,
    /// Nodes of the vocabulary's byte trie.
    pub trie_nodes: usize,
    /// Building the vocabulary index (once per model, at server start), ms.
    pub vocab_index_ms: f64,
    /// Compiling a 50-property schema into the automaton, ms (median).
    pub compile_50_props_ms: f64,
    /// The same plus its first token mask (only tokens starting with `{`), ms (median).
    pub compile_and_first_mask_ms: f64,
    /// One token mask inside a string value, where nearly every token is allowed: a walk
    /// over the whole vocabulary trie (the most expensive cache miss), ms (median).
    pub string_mask_ms: f64,
    /// Tokens per generation.
    pub gen_tokens: usize,
    /// Decode tokens/s without a constraint (median of the rounds).
    pub unconstrained_tps: f64,
    /// Decode tokens/s under the JSON schema with a fresh grammar (empty mask cache).
    pub constrained_cold_tps: f64,
    /// Decode tokens/s under the JSON schema with the grammar reused (the server keeps
    /// compiled grammars for later requests with the same schema).
    pub constrained_warm_tps: f64,
    /// Token masks computed (cache misses) in one cold generation.
    pub cold_mask_computations: u64,
    /// Whether every constrained output was complete JSON matching the schema.
    pub outputs_valid: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A schema with `n` required properties of mixed types.
pub fn wide_schema(n: usize) -> serde_json::Value {
    let mut props = serde_json::Map::new();
    let mut required = Vec::new();
    for i in 0..n {
        let s = match i % 5 {
            0 => serde_json::json!({"type": "string"}),
            1 => serde_json::json!({"type": "integer"}),
            2 => serde_json::json!({"type": "number"}),
            3 => serde_json::json!({"type": "boolean"}),
            _ => serde_json::json!({"enum": ["low", "medium", "high"]}),
        };
        props.insert(format!("field_{i:02}"), s);
        required.push(serde_json::json!(format!("field_{i:02}")));
    }
    serde_json::json!({"type": "object", "properties": props, "required": required, "additionalProperties": false})
}

/// The schema the decode comparison generates under: a list of people (it can go on for as
/// long as the budget allows, like unconstrained text).
pub fn people_schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {"people": {"type": "array", "items": {
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer"},
                "city": {"type": "string"},
                "role": {"enum": ["engineer", "doctor", "teacher", "artist"]}
            },
            "required": ["name", "age", "city", "role"],
            "additionalProperties": false
        }}},
        "required": ["people"],
        "additionalProperties": false
    })
}

/// Decode speed with a JSON schema vs without, on the same prompt and sampling settings,
/// `rounds` times each (alternating), plus the schema compile costs. The unconstrained runs
/// ban the stop tokens so that both generate `gen_tokens` tokens (a constrained run may end
/// earlier when its JSON is complete; speeds are per token).
pub fn run_structured_bench(
    engine: &mut crate::engine::Engine,
    gen_tokens: usize,
    rounds: usize,
) -> Result<StructuredBench, InferenceError> {
    use crate::grammar::{Grammar, Matcher, TokenConstraint, VocabIndex};
    use crate::sampling::SamplingParams;
    use std::sync::Arc;

    let tok = engine.tokenizer().clone();
    let t = Instant::now();
    let vocab = Arc::new(VocabIndex::from_tokenizer(&tok));
    let vocab_index_ms = t.elapsed().as_secs_f64() * 1e3;
    let wide = wide_schema(50);
    let (mut compile, mut first, mut string) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..9 {
        let t = Instant::now();
        let g = Arc::new(
            Grammar::json_schema(&wide, true, vocab.clone(), "schema")
                .map_err(|e| InferenceError::InvalidArgument(e.to_string()))?,
        );
        compile.push(t.elapsed().as_secs_f64() * 1e3);
        let mut m = Matcher::new(g.clone());
        let _ = m.allowed(usize::MAX).count();
        first.push(t.elapsed().as_secs_f64() * 1e3);
        for id in tok.encode("{\"field_00\": \"", false, false) {
            m.advance(id)
                .map_err(|e| InferenceError::InvalidArgument(e.to_string()))?;
        }
        let t = Instant::now();
        let _ = m.allowed(usize::MAX).count();
        string.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let schema = people_schema();
    let prompt = tok.encode_chat(&[crate::tokenizer::ChatMessage {
        role: "user".into(),
        content: "List a few people (name, age, city, role) as JSON.".into(),
    }])?;
    let base = SamplingParams {
        temperature: 0.7,
        seed: 1,
        max_tokens: gen_tokens,
        ..Default::default()
    };
    let free = SamplingParams {
        logit_bias: tok.stop_tokens.iter().map(|&s| (s, -100.0)).collect(),
        ..base.clone()
    };
    let new_grammar = || -> Result<Arc<Grammar>, InferenceError> {
        Grammar::json_schema(&schema, true, vocab.clone(), "schema")
            .map(Arc::new)
            .map_err(|e| InferenceError::InvalidArgument(e.to_string()))
    };
    // Tokens/s of one generation: everything after the prefill (sampling and masks
    // included) per generated token.
    let mut run = |params: &SamplingParams,
                   g: Option<&Arc<Grammar>>|
     -> Result<(f64, bool), InferenceError> {
        let mut m = g.map(|g| Matcher::new(g.clone()));
        let t = Instant::now();
        let out = engine.generate_constrained(
            &prompt,
            params,
            m.as_mut().map(|m| m as &mut dyn TokenConstraint),
            &mut |_| true,
        )?;
        let ms = t.elapsed().as_secs_f64() * 1e3 - out.timings.prefill_ms;
        let valid = g.is_none_or(|g| g.matches(out.text.as_bytes()));
        Ok((out.tokens.len() as f64 / (ms / 1e3).max(1e-9), valid))
    };
    // Warm-up: page the weights in, fill the prompt cache.
    run(&free, None)?;
    let warm = new_grammar()?;
    let (_, mut valid) = run(&base, Some(&warm))?;
    let (mut free_tps, mut cold_tps, mut warm_tps) = (Vec::new(), Vec::new(), Vec::new());
    let mut cold_misses = 0;
    for r in 0..rounds {
        let cold = new_grammar()?;
        let mut each = |i: usize| -> Result<(), InferenceError> {
            match i {
                0 => free_tps.push(run(&free, None)?.0),
                1 => {
                    let (tps, ok) = run(&base, Some(&cold))?;
                    cold_tps.push(tps);
                    valid &= ok;
                    cold_misses = cold.cache_stats().1;
                }
                _ => {
                    let (tps, ok) = run(&base, Some(&warm))?;
                    warm_tps.push(tps);
                    valid &= ok;
                }
            }
            Ok(())
        };
        // Rotate the order so that no variant always runs first.
        for k in 0..3 {
            each((k + r) % 3)?;
        }
    }
    Ok(StructuredBench {
        vocab: vocab.len(),
        trie_nodes: vocab.trie_nodes(),
        vocab_index_ms,
        compile_50_props_ms: median(compile),
        compile_and_first_mask_ms: median(first),
        string_mask_ms: median(string),
        gen_tokens,
        unconstrained_tps: median(free_tps),
        constrained_cold_tps: median(cold_tps),
        constrained_warm_tps: median(warm_tps),
        cold_mask_computations: cold_misses,
        outputs_valid: valid,
    })
}
