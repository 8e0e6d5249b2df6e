//! Command-line generation (`guest-agent generate ...`) and the shared model-loading helper.

use std::path::PathBuf;

use anyhow::Context;

use crate::cpu::CpuOptions;
use crate::engine::{Engine, Generation, load_cpu};
use crate::model::{LlamaWeights, ModelFile, verify_model_sha256};
use crate::sampling::SamplingParams;
use crate::tokenizer::{ChatMessage, Tokenizer};

/// Compute backend choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Multi-threaded CPU reference backend.
    Cpu,
    /// NVIDIA GPU via CUDA (needs libcuda and a GPU).
    Cuda,
}

/// Arguments of `generate`.
#[derive(Debug, Clone, clap::Args)]
#[command(
    about = "Generate text with a local GGUF model",
    long_about = "Generate text with a local GGUF model (Llama family: SmolLM2, Llama 3, Qwen2).\n\n\
Fetch the default model first with `cargo xtask model fetch smollm2-135m`.\n\n\
Examples:\n  generate --prompt 'The capital of France is' --max-tokens 8\n  \
generate --chat --prompt 'Write a haiku about the sea' --temperature 0.7 --seed 1\n  \
generate --prompt 'Hi' --json   # machine-readable: token ids, text, timings"
)]
pub struct GenerateArgs {
    /// GGUF model file [default: the SmolLM2-135M file in the model cache].
    #[arg(long, value_name = "FILE")]
    pub model: Option<PathBuf>,
    /// Expected sha256 of the model file (hex). The default model is always checked against its
    /// pinned digest; pass this for other files, or `--no-verify` to skip.
    #[arg(long, value_name = "HEX")]
    pub sha256: Option<String>,
    /// Skip the sha256 check.
    #[arg(long)]
    pub no_verify: bool,
    /// Prompt text (with --chat: the user message).
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    pub chat: bool,
    /// System message (with --chat).
    #[arg(long)]
    pub system: Option<String>,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 = greedy (deterministic).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// RNG seed for temperature > 0.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop before this string (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// CPU threads [default: all cores].
    #[arg(long)]
    pub threads: Option<usize>,
    /// KV-cache length in tokens.
    #[arg(long, default_value_t = 2048)]
    pub max_context: usize,
    /// Compute backend.
    #[arg(long, value_enum, default_value_t = BackendKind::Cpu)]
    pub backend: BackendKind,
    /// Print one JSON object (prompt, token ids, text, timings) instead of streaming text.
    #[arg(long)]
    pub json: bool,
}

/// Model-loading settings shared by the CLI, the benchmark and the server.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// GGUF path.
    pub path: PathBuf,
    /// Expected sha256 (None: no check).
    pub sha256: Option<String>,
    /// Backend.
    pub backend: BackendKind,
    /// CPU threads.
    pub threads: usize,
    /// KV-cache length.
    pub max_context: usize,
}

/// Resolves the model path and the digest to check it against.
pub fn resolve_model(
    model: Option<PathBuf>,
    sha256: Option<String>,
    no_verify: bool,
) -> anyhow::Result<(PathBuf, Option<String>)> {
    let path = match model {
        Some(p) => p,
        None => crate::default_model_path()?,
    };
    if !path.is_file() {
        anyhow::bail!(
            "model file {} not found; fetch it with `cargo xtask model fetch smollm2-135m` or pass --model FILE",
            path.display()
        );
    }
    let digest = if no_verify {
        None
    } else if sha256.is_some() {
        sha256
    } else if path.file_name().and_then(|n| n.to_str()) == Some(crate::SMOLLM2_FILE_NAME) {
        Some(crate::SMOLLM2_SHA256.to_owned())
    } else {
        None
    };
    Ok((path, digest))
}

/// Loads a model into the chosen backend (after the sha256 check).
pub fn load_engine(o: &LoadOptions) -> anyhow::Result<Engine> {
    if let Some(d) = &o.sha256 {
        verify_model_sha256(&o.path, d)?;
    }
    match o.backend {
        BackendKind::Cpu => Ok(load_cpu(
            &o.path,
            &CpuOptions {
                threads: o.threads,
                max_context: o.max_context,
                ..CpuOptions::default()
            },
        )?),
        BackendKind::Cuda => {
            let f = ModelFile::open(&o.path)?;
            let g = f.gguf()?;
            let w = LlamaWeights::from_gguf(&g)?;
            let tok = Tokenizer::from_gguf(&g)?;
            let opts = crate::cuda::CudaOptions {
                max_context: Some(o.max_context),
                ..Default::default()
            };
            let b = crate::cuda::CudaBackend::load(&w, &w.config, &opts)
                .map_err(|e| anyhow::anyhow!("CUDA backend unavailable: {e}; use --backend cpu"))?;
            Ok(Engine::new(Box::new(b), tok, w.config.clone()))
        }
    }
}

/// JSON output of `generate --json`.
#[derive(Debug, serde::Serialize)]
pub struct GenerateOutput {
    /// Model path.
    pub model: String,
    /// Backend used.
    pub backend: BackendKind,
    /// The prompt as given.
    pub prompt: String,
    /// Prompt token ids (after the chat template, if any).
    pub prompt_token_ids: Vec<u32>,
    /// Generated token ids.
    pub generated_token_ids: Vec<u32>,
    /// Generated text.
    pub text: String,
    /// Why generation ended.
    pub finish_reason: crate::engine::FinishReason,
    /// Prefill/decode timings.
    pub timings: crate::engine::Timings,
    /// Prefill tokens per second.
    pub prefill_tokens_per_s: f64,
    /// Decode tokens per second.
    pub decode_tokens_per_s: f64,
}

/// Runs `generate`.
pub fn run_generate(args: &GenerateArgs) -> anyhow::Result<()> {
    let (path, sha) = resolve_model(args.model.clone(), args.sha256.clone(), args.no_verify)?;
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 0 {
        anyhow::bail!("--threads must be at least 1");
    }
    if args.temperature.is_nan()
        || args.temperature < 0.0
        || args.top_p.is_nan()
        || args.top_p <= 0.0
        || args.top_p > 1.0
    {
        anyhow::bail!("--temperature must be >= 0 and --top-p in (0, 1]");
    }
    let mut engine = load_engine(&LoadOptions {
        path: path.clone(),
        sha256: sha,
        backend: args.backend,
        threads,
        max_context: args.max_context,
    })
    .with_context(|| format!("loading {}", path.display()))?;
    let tok = engine.tokenizer().clone();
    let prompt_ids = if args.chat {
        let mut msgs = Vec::new();
        if let Some(s) = &args.system {
            msgs.push(ChatMessage {
                role: "system".into(),
                content: s.clone(),
            });
        }
        msgs.push(ChatMessage {
            role: "user".into(),
            content: args.prompt.clone(),
        });
        tok.encode_chat(&msgs)?
    } else {
        tok.encode(&args.prompt, false, true)
    };
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        seed: args.seed,
        max_tokens: args.max_tokens,
        stop: args.stop.clone(),
        ..SamplingParams::default()
    };
    let json = args.json;
    let mut stdout = std::io::stdout();
    let g: Generation = engine.generate(&prompt_ids, &params, &mut |t| {
        if !json {
            use std::io::Write;
            let _ = stdout.write_all(t.as_bytes());
            let _ = stdout.flush();
        }
        true
    })?;
    if json {
        let out = GenerateOutput {
            model: path.display().to_string(),
            backend: args.backend,
            prompt: args.prompt.clone(),
            prompt_token_ids: prompt_ids,
            generated_token_ids: g.tokens.clone(),
            text: g.text.clone(),
            finish_reason: g.finish_reason,
            timings: g.timings,
            prefill_tokens_per_s: g.timings.prefill_tps(),
            decode_tokens_per_s: g.timings.decode_tps(),
        };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!();
        eprintln!(
            "[{} tokens prompt, {} generated; prefill {:.1} tok/s, decode {:.1} tok/s, backend {}]",
            g.prompt_tokens,
            g.tokens.len(),
            g.timings.prefill_tps(),
            g.timings.decode_tps(),
            engine.backend_name()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        g: GenerateArgs,
    }

    #[test]
    fn parses_and_runs_on_a_synthetic_model() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tiny.gguf");
        let bytes = crate::synthetic::synthetic_gguf(
            &crate::model::LlamaConfig::tiny(),
            crate::GgmlType::Q4_0,
            1,
        )
        .unwrap();
        std::fs::write(&p, &bytes).unwrap();
        let t = T::try_parse_from([
            "x",
            "--model",
            p.to_str().unwrap(),
            "--prompt",
            "hello",
            "--max-tokens",
            "3",
            "--threads",
            "1",
            "--max-context",
            "64",
            "--json",
        ])
        .unwrap();
        run_generate(&t.g).unwrap();
        // Wrong digest is refused.
        let mut bad = t.g.clone();
        bad.sha256 = Some("00".repeat(32));
        let e = run_generate(&bad).unwrap_err();
        assert!(format!("{e:#}").contains("sha256"), "{e:#}");
        // Missing model file explains what to do.
        let mut missing = t.g.clone();
        missing.model = Some(dir.path().join("nope.gguf"));
        let e = run_generate(&missing).unwrap_err();
        assert!(e.to_string().contains("xtask model fetch"));
    }
}
