//! Concurrency benchmark: N streams submitted to the [`Scheduler`] at once, per
//! [`BatchModel`], with aggregate tokens/s, time to first token and inter-token latency (used
//! by `inference-bench --concurrency` and `cargo xtask bench inference`). Also the batch-1 loop
//! (one stream through [`Backend::forward`], no scheduler) for reference.

use std::sync::Arc;
use std::time::Instant;

use crate::backend::Backend;
use crate::error::InferenceError;
use crate::sampling::{SamplingParams, argmax};
use crate::scheduler::{BatchModel, Event, Request, Scheduler, SchedulerConfig};
use crate::tokenizer::Tokenizer;

/// One row of the concurrency table: one model serving `streams` streams at once.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ConcurrencyRow {
    /// What served them (`batch-1 loop`, `cpu-per-sequence`, `cpu-batched`).
    pub model: String,
    /// Streams submitted at once.
    pub streams: usize,
    /// Tokens generated over all streams (a stream may stop early at an end-of-text token).
    pub tokens: usize,
    /// Seconds from the submission to the last token.
    pub wall_s: f64,
    /// Aggregate tokens/s: `tokens / wall_s` (prefill included).
    pub tps: f64,
    /// Time to first token, median over the streams (ms).
    pub ttft_p50_ms: f64,
    /// Inter-token latency (gaps between a stream's consecutive tokens, all streams pooled),
    /// median (ms).
    pub itl_p50_ms: f64,
    /// Inter-token latency, 99th percentile (ms).
    pub itl_p99_ms: f64,
}

/// The `p`-th percentile (0..=100) of `v` with linear interpolation between the two nearest
/// ranks (NaNs ignored); `None` for no values.
pub fn percentile(v: &[f64], p: f64) -> Option<f64> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| !x.is_nan()).collect();
    if s.is_empty() {
        return None;
    }
    s.sort_by(f64::total_cmp);
    let r = p.clamp(0.0, 100.0) / 100.0 * (s.len() - 1) as f64;
    let (lo, hi) = (r.floor() as usize, r.ceil() as usize);
    Some(s[lo] + (s[hi] - s[lo]) * (r - lo as f64))
}

/// Stream `i`'s prompt: `n` token ids in `1..vocab`, different per stream.
pub fn stream_prompt(i: usize, n: usize, vocab: usize) -> Vec<u32> {
    let v = vocab.max(2) as u64;
    (0..n as u64)
        .map(|k| (1 + (k.wrapping_mul(2_654_435_761) + i as u64 * 7_919) % (v - 1)) as u32)
        .collect()
}

/// Per-stream token times (seconds since submission) into a row.
fn row(model: &str, times: &[Vec<f64>], wall: f64) -> ConcurrencyRow {
    let tokens = times.iter().map(Vec::len).sum();
    let firsts: Vec<f64> = times.iter().filter_map(|t| t.first().copied()).collect();
    let gaps: Vec<f64> = times
        .iter()
        .flat_map(|t| t.windows(2).map(|w| w[1] - w[0]))
        .collect();
    let ms = |x: Option<f64>| x.map_or(f64::NAN, |x| x * 1e3);
    ConcurrencyRow {
        model: model.to_owned(),
        streams: times.len(),
        tokens,
        wall_s: wall,
        tps: tokens as f64 / wall.max(1e-9),
        ttft_p50_ms: ms(percentile(&firsts, 50.0)),
        itl_p50_ms: ms(percentile(&gaps, 50.0)),
        itl_p99_ms: ms(percentile(&gaps, 99.0)),
    }
}

/// A scheduler configuration that holds `streams` streams of `prompt + max_tokens` positions
/// at once (16-position blocks, the default prefill chunk).
pub fn scheduler_config(streams: usize, prompt: usize, max_tokens: usize) -> SchedulerConfig {
    let d = SchedulerConfig::default();
    SchedulerConfig {
        kv_blocks: streams.max(1) * (prompt + max_tokens).div_ceil(d.block_size),
        max_queued: streams.max(1),
        ..d
    }
}

/// Submits `streams` greedy requests (prompts of `prompt` tokens, `max_tokens` each) to a
/// scheduler over `model` at once and runs it until all finish, after a short warm-up request.
/// `cfg` must hold them all (see [`scheduler_config`]) and the model needs `streams` slots.
pub fn run_concurrency<M: BatchModel>(
    model: M,
    tokenizer: Arc<Tokenizer>,
    cfg: SchedulerConfig,
    streams: usize,
    prompt: usize,
    max_tokens: usize,
) -> Result<ConcurrencyRow, InferenceError> {
    let mut s = Scheduler::new(model, tokenizer, cfg);
    run_concurrency_on(&mut s, streams, prompt, max_tokens)
}

/// [`run_concurrency`] on an idle scheduler that already exists (whose configuration holds
/// `streams` streams of `prompt + max_tokens` positions), so one model serves several rows.
pub fn run_concurrency_on<M: BatchModel>(
    s: &mut Scheduler<M>,
    streams: usize,
    prompt: usize,
    max_tokens: usize,
) -> Result<ConcurrencyRow, InferenceError> {
    let name = s.model().name().to_owned();
    let vocab = s.model().vocab();
    let submit = |s: &mut Scheduler<M>, i: usize, max_tokens: usize| {
        let req = Request {
            prompt: stream_prompt(i, prompt.max(1), vocab),
            params: SamplingParams {
                max_tokens,
                ..Default::default()
            },
        };
        s.submit(req)
            .map_err(|e| InferenceError::InvalidArgument(format!("concurrency bench: {e}")))
    };
    // Warm-up (page in weights, fill caches).
    let warm = submit(s, streams, 2)?;
    while !s.is_idle() {
        s.step()?;
    }
    drop(warm);
    let t0 = Instant::now();
    let mut handles = (0..streams)
        .map(|i| submit(s, i, max_tokens))
        .collect::<Result<Vec<_>, _>>()?;
    let mut times = vec![Vec::with_capacity(max_tokens); streams];
    while !s.is_idle() {
        s.step()?;
        let now = t0.elapsed().as_secs_f64();
        for (h, t) in handles.iter_mut().zip(times.iter_mut()) {
            while let Some(e) = h.try_recv() {
                match e {
                    Event::Piece { tokens, .. } => {
                        t.extend(std::iter::repeat_n(now, tokens.len()));
                    }
                    Event::Finished(g) => {
                        // A final stop token is reported only here.
                        let rest = g.tokens.len().saturating_sub(t.len());
                        t.extend(std::iter::repeat_n(now, rest));
                    }
                    Event::Failed(m) => {
                        return Err(InferenceError::InvalidArgument(format!(
                            "concurrency bench: a stream failed: {m}"
                        )));
                    }
                }
            }
        }
    }
    let wall = times
        .iter()
        .filter_map(|t| t.last().copied())
        .fold(0.0, f64::max);
    Ok(row(&name, &times, wall))
}

/// One greedy stream through `backend` alone (prompt of `prompt` tokens, then `max_tokens`
/// tokens one [`Backend::forward`] at a time), after a short warm-up: the batch-1 loop.
pub fn run_batch1_loop(
    backend: &mut dyn Backend,
    vocab: usize,
    prompt: usize,
    max_tokens: usize,
) -> Result<ConcurrencyRow, InferenceError> {
    let p = stream_prompt(0, prompt.max(1), vocab);
    backend.reset();
    backend.forward(&p[..p.len().min(8)], 0)?;
    backend.reset();
    let t0 = Instant::now();
    let mut times = Vec::with_capacity(max_tokens);
    let mut logits = backend.forward(&p, 0)?;
    for i in 0..max_tokens {
        let next = argmax(&logits);
        times.push(t0.elapsed().as_secs_f64());
        if i + 1 < max_tokens {
            logits = backend.forward(&[next], p.len() + i)?;
        }
    }
    let wall = times.last().copied().unwrap_or(0.0);
    Ok(row("batch-1 loop", &[times], wall))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::cpu::{CpuBackend, CpuOptions};
    use crate::cpu_batched::CpuBatchedModel;
    use crate::engine::weights_and_tokenizer;
    use crate::gguf::{GgmlType, Gguf};
    use crate::model::LlamaConfig;
    use crate::scheduler::CpuBatchModel;

    #[test]
    fn percentiles_interpolate_between_ranks() {
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[f64::NAN], 50.0), None);
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        let v = [4.0, 1.0, 3.0, 2.0, f64::NAN];
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 50.0), Some(2.5));
        assert_eq!(percentile(&v, 100.0), Some(4.0));
        assert!((percentile(&v, 99.0).unwrap() - 3.97).abs() < 1e-12);
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert!((percentile(&hundred, 99.0).unwrap() - 99.01).abs() < 1e-9);
        assert_eq!(percentile(&hundred, 250.0), Some(100.0), "clamped");
    }

    #[test]
    fn rows_from_token_times() {
        // Stream 0: tokens at 10, 30, 60 ms; stream 1: at 20, 30 ms; stream 2: none.
        let r = row(
            "m",
            &[vec![0.01, 0.03, 0.06], vec![0.02, 0.03], vec![]],
            0.06,
        );
        assert_eq!((r.streams, r.tokens), (3, 5));
        assert!((r.tps - 5.0 / 0.06).abs() < 1e-9);
        assert!((r.ttft_p50_ms - 15.0).abs() < 1e-9, "{}", r.ttft_p50_ms);
        // Gaps 20, 30, 10 ms.
        assert!((r.itl_p50_ms - 20.0).abs() < 1e-9, "{}", r.itl_p50_ms);
        assert!((r.itl_p99_ms - 29.8).abs() < 1e-9, "{}", r.itl_p99_ms);
        let p = stream_prompt(1, 16, 384);
        assert!(p.iter().all(|&t| (1..384).contains(&t)));
        assert_ne!(p, stream_prompt(2, 16, 384));
    }

    #[test]
    fn concurrency_bench_runs_both_models_on_synthetic() {
        let bytes =
            crate::synthetic::synthetic_gguf(&LlamaConfig::tiny(), GgmlType::Q4_1, 2).unwrap();
        let g = Gguf::parse(&bytes).unwrap();
        let (w, tok) = weights_and_tokenizer(&g).unwrap();
        let tok = Arc::new(tok);
        let opts = CpuOptions {
            threads: 2,
            max_context: 64,
            batch: 16,
        };
        let (n, prompt, max_tokens) = (5, 6, 4);
        let cfg = scheduler_config(n, prompt, max_tokens);
        let per_seq = CpuBatchModel::new(CpuBackend::new(&w, &opts).unwrap(), n);
        let a = run_concurrency(per_seq, tok.clone(), cfg.clone(), n, prompt, max_tokens).unwrap();
        let batched = CpuBatchedModel::new(CpuBackend::new(&w, &opts).unwrap(), n, &cfg).unwrap();
        let b = run_concurrency(batched, tok, cfg, n, prompt, max_tokens).unwrap();
        for r in [&a, &b] {
            assert_eq!(r.streams, n);
            assert!(r.tokens >= n && r.tokens <= n * max_tokens, "{r:?}");
            assert!(r.ttft_p50_ms > 0.0 && r.itl_p50_ms <= r.itl_p99_ms, "{r:?}");
        }
        assert_eq!(
            (a.model.as_str(), b.model.as_str()),
            ("cpu-per-sequence", "cpu-batched")
        );
        assert_eq!(
            a.tokens, b.tokens,
            "greedy: the same streams end at the same tokens"
        );
        let mut backend = CpuBackend::new(&w, &opts).unwrap();
        let l = run_batch1_loop(&mut backend, 384, prompt, max_tokens).unwrap();
        assert_eq!((l.streams, l.tokens), (1, max_tokens));
    }
}
