//! `inference-bench`: measures prefill and decode throughput of one backend on one model and
//! prints a JSON line (driven by `cargo xtask bench inference`, which builds it in release mode).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use inference::bench::concurrency::{
    ConcurrencyRow, run_batch1_loop, run_concurrency, scheduler_config,
};
use inference::bench::{BenchResult, bench_prompt, nominal_bandwidth, run_bench};
use inference::cpu::{CpuBackend, CpuOptions};
use inference::cpu_batched::CpuBatchedModel;
use inference::scheduler::CpuBatchModel;
use inference::{GgmlType, LlamaConfig, LlamaWeights, ModelFile};

/// Measure tokens/s of the CPU or CUDA backend.
#[derive(Debug, Parser)]
#[command(long_about = "Measure prefill and decode tokens/s of one backend.\n\n\
Examples:\n  inference-bench --model ~/.cache/confidential-worker/models/SmolLM2-135M-Instruct.Q4_1.gguf --threads 2\n  \
inference-bench --synthetic 0.5b --weight-type q4_1 --backend cuda\n  \
inference-bench --model FILE --threads 2 --concurrency 1,8,32,64 --prompt-tokens 16 --gen-tokens 32")]
struct Args {
    /// GGUF model file (or use --synthetic).
    #[arg(long, value_name = "FILE")]
    model: Option<PathBuf>,
    /// Use a generated model instead: `smollm2-135m` or `0.5b` (Qwen2.5-0.5B-like shape).
    #[arg(long)]
    synthetic: Option<String>,
    /// Weight type of the synthetic model.
    #[arg(long, default_value = "Q4_1")]
    weight_type: GgmlType,
    /// `cpu` or `cuda`.
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// CPU threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Prompt tokens for the prefill measurement.
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    /// Decoded tokens for the decode measurement.
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    /// Print JSON (always on; kept for scripts).
    #[arg(long)]
    json: bool,
    /// Instead: structured output (JSON schema) vs unconstrained decode tokens/s and schema
    /// compile times, CPU backend (`--rounds` generations of `--gen-tokens` each).
    #[arg(long)]
    structured: bool,
    /// Rounds of the structured comparison.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Instead: re-encode --model into a K-quant mix (`q4_k_m` or `q5_k_m`) written to --out.
    #[arg(long, value_name = "MIX", requires = "out")]
    write_kquant: Option<inference::requant::KMix>,
    /// Output file of --write-kquant.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Instead: print the greedy continuation (token ids, CPU backend) of the benchmark prompt
    /// of --prompt-tokens ids, --gen-tokens long, as JSON `{"tokens": [...]}`.
    #[arg(long)]
    greedy: bool,
    /// Instead: the concurrency table as one JSON line: for each N in this comma-separated
    /// list, N streams (prompts of --prompt-tokens ids, --gen-tokens greedy tokens each)
    /// submitted to the scheduler at once over the batched CPU model and over the per-sequence
    /// one (baseline), plus the batch-1 loop; aggregate tokens/s, TTFT and inter-token latency.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    concurrency: Vec<usize>,
    /// With --greedy: the prompt is this text (the model's tokenizer, no BOS) instead of ids;
    /// the JSON then also carries the prompt ids.
    #[arg(long, value_name = "TEXT", requires = "greedy")]
    prompt_text: Option<String>,
}

fn synthetic_config(name: &str) -> anyhow::Result<LlamaConfig> {
    Ok(match name {
        "smollm2-135m" => LlamaConfig::smollm2_135m(),
        "0.5b" => LlamaConfig {
            arch: "llama".into(),
            vocab: 151_936,
            dim: 896,
            n_layers: 24,
            n_heads: 14,
            n_kv_heads: 2,
            head_dim: 64,
            ffn_dim: 4864,
            rope_theta: 1_000_000.0,
            rms_eps: 1e-6,
            context_len: 4096,
            tied_embeddings: true,
            rope_style: inference::model::RopeStyle::Norm,
            rope_scaling: inference::model::RopeScaling::None,
        },
        other => anyhow::bail!("unknown synthetic model {other:?}; use smollm2-135m or 0.5b"),
    })
}

/// `--concurrency`: the batch-1 loop, then per N the per-sequence and the batched model.
fn concurrency_table(
    a: &Args,
    g: &inference::Gguf<'_>,
    w: &LlamaWeights<'_>,
) -> anyhow::Result<Vec<ConcurrencyRow>> {
    anyhow::ensure!(
        a.backend == "cpu",
        "--concurrency measures the CPU models; drop --backend {}",
        a.backend
    );
    let tok = Arc::new(inference::tokenizer::Tokenizer::from_gguf(g)?);
    let (prompt, max_tokens) = (a.prompt_tokens.max(1), a.gen_tokens.max(1));
    let opts = CpuOptions {
        threads: a.threads,
        max_context: prompt + max_tokens + 8,
        ..CpuOptions::default()
    };
    let vocab = w.config.vocab;
    let mut rows = vec![run_batch1_loop(
        &mut CpuBackend::new(w, &opts)?,
        vocab,
        prompt,
        max_tokens,
    )?];
    for &n in &a.concurrency {
        anyhow::ensure!(n > 0, "--concurrency takes stream counts of at least 1");
        let cfg = scheduler_config(n, prompt, max_tokens);
        eprintln!("concurrency {n}: per-sequence ...");
        let per_seq = CpuBatchModel::new(CpuBackend::new(w, &opts)?, n);
        rows.push(run_concurrency(
            per_seq,
            tok.clone(),
            cfg.clone(),
            n,
            prompt,
            max_tokens,
        )?);
        eprintln!("concurrency {n}: batched ...");
        let batched = CpuBatchedModel::new(CpuBackend::new(w, &opts)?, n, &cfg)?;
        rows.push(run_concurrency(
            batched,
            tok.clone(),
            cfg,
            n,
            prompt,
            max_tokens,
        )?);
    }
    Ok(rows)
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let owned;
    let file;
    let bytes: &[u8] = match (&a.model, &a.synthetic) {
        (Some(p), None) => {
            file = ModelFile::open(p).with_context(|| format!("opening {}", p.display()))?;
            file.bytes()
        }
        (None, Some(s)) => {
            owned = inference::synthetic::synthetic_gguf(&synthetic_config(s)?, a.weight_type, 1)?;
            &owned
        }
        _ => anyhow::bail!("pass exactly one of --model FILE or --synthetic NAME"),
    };
    if let (Some(mix), Some(out)) = (a.write_kquant, &a.out) {
        let g = inference::Gguf::parse(bytes)?;
        let (file, counts) = inference::requant::requantize(&g, mix)?;
        let tmp = out.with_extension("partial");
        std::fs::write(&tmp, &file).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, out).with_context(|| format!("renaming to {}", out.display()))?;
        let counts: Vec<String> = counts.iter().map(|(t, n)| format!("{n} {t}")).collect();
        eprintln!("wrote {} ({} re-encoded)", out.display(), counts.join(", "));
        return Ok(());
    }
    if a.structured {
        let mut e = inference::engine::load_cpu_from_bytes(
            bytes,
            &CpuOptions {
                threads: a.threads,
                max_context: 512.max(a.gen_tokens + 128),
                ..CpuOptions::default()
            },
        )?;
        let r = inference::bench::run_structured_bench(&mut e, a.gen_tokens, a.rounds)?;
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let g = inference::Gguf::parse(bytes)?;
    let w = LlamaWeights::from_gguf(&g)?;
    if !a.concurrency.is_empty() {
        let table = concurrency_table(&a, &g, &w)?;
        println!("{}", serde_json::to_string(&table)?);
        return Ok(());
    }
    let ctx = a.prompt_tokens + a.gen_tokens + 8;
    let mut prompt = bench_prompt(a.prompt_tokens, w.config.vocab);
    if let Some(text) = &a.prompt_text {
        prompt = inference::tokenizer::Tokenizer::from_gguf(&g)?.encode(text, false, false);
        anyhow::ensure!(!prompt.is_empty(), "--prompt-text encodes to no tokens");
    }
    let ctx = ctx.max(prompt.len() + a.gen_tokens + 8);
    if a.greedy {
        use inference::Backend;
        let mut b = CpuBackend::new(
            &w,
            &CpuOptions {
                threads: a.threads,
                max_context: ctx,
                ..CpuOptions::default()
            },
        )?;
        let mut logits = b.forward(&prompt, 0)?;
        let mut tokens = Vec::with_capacity(a.gen_tokens);
        // Top-1 minus top-2 logit per step: how close each pick was to a tie.
        let mut gaps = Vec::with_capacity(a.gen_tokens);
        for i in 0..a.gen_tokens {
            let t = inference::sampling::argmax(&logits);
            let second = logits
                .iter()
                .enumerate()
                .filter(|&(j, _)| j != t as usize)
                .map(|(_, &v)| v)
                .fold(f32::NEG_INFINITY, f32::max);
            gaps.push(logits[t as usize] - second);
            tokens.push(t);
            if i + 1 < a.gen_tokens {
                logits = b.forward(&[t], prompt.len() + i)?;
            }
        }
        println!(
            "{}",
            serde_json::json!({ "prompt": prompt, "tokens": tokens, "gaps": gaps })
        );
        return Ok(());
    }
    let r: BenchResult = match a.backend.as_str() {
        "cpu" => {
            let mut b = CpuBackend::new(
                &w,
                &CpuOptions {
                    threads: a.threads,
                    max_context: ctx,
                    ..CpuOptions::default()
                },
            )?;
            run_bench(
                &format!("cpu-{}t", a.threads),
                &mut b,
                &prompt,
                a.gen_tokens,
            )?
        }
        "cuda" => {
            let opts = inference::cuda::CudaOptions {
                max_context: Some(ctx),
                ..Default::default()
            };
            let mut b = inference::cuda::CudaBackend::load(&w, &w.config, &opts)
                .map_err(|e| anyhow::anyhow!("CUDA backend unavailable: {e}"))?;
            let bytes_per_token = b.weight_bytes_per_token() as u64;
            let bw = nominal_bandwidth(&b.device().name);
            let mut r = run_bench("cuda", &mut b, &prompt, a.gen_tokens)?;
            r.backend = format!("cuda ({})", b.device().name);
            r.weight_bytes_per_token = Some(bytes_per_token);
            r.peak_bandwidth = bw;
            r.bandwidth_share = bw.map(|bw| r.decode_tps * bytes_per_token as f64 / bw);
            r
        }
        other => anyhow::bail!("unknown backend {other:?}; use cpu or cuda"),
    };
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
