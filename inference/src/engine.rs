//! The generation loop: a backend plus its tokenizer, prompt-prefix reuse across requests,
//! streaming callbacks, stop strings and timings.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::backend::Backend;
use crate::continuation::{Advance, Continuation};
use crate::cpu::{CpuBackend, CpuOptions};
use crate::error::InferenceError;
use crate::grammar::TokenConstraint;
use crate::model::{LlamaConfig, LlamaWeights, ModelFile};
use crate::sampling::{SamplingParams, TokenLogprob};
use crate::tokenizer::Tokenizer;

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` or the context window was reached.
    Length,
    /// The streaming consumer went away.
    Cancelled,
}

/// Timing breakdown of one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Timings {
    /// Prompt tokens actually computed (after prefix reuse).
    pub prefill_tokens: usize,
    /// Prefill wall time in milliseconds.
    pub prefill_ms: f64,
    /// Tokens decoded one at a time.
    pub decode_tokens: usize,
    /// Decode wall time in milliseconds.
    pub decode_ms: f64,
}

impl Timings {
    /// Prefill throughput.
    pub fn prefill_tps(&self) -> f64 {
        self.prefill_tokens as f64 / (self.prefill_ms / 1000.0).max(1e-9)
    }
    /// Decode throughput.
    pub fn decode_tps(&self) -> f64 {
        self.decode_tokens as f64 / (self.decode_ms / 1000.0).max(1e-9)
    }
}

/// Result of [`Engine::generate`].
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Generation {
    /// Generated token ids (including a final stop token if one was sampled).
    pub tokens: Vec<u32>,
    /// Generated text (stop strings and control tokens excluded).
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Timings.
    pub timings: Timings,
    /// The reported tokens (see [`Engine::generate_pieces`]) with their logprobs, when
    /// `SamplingParams::logprobs` asked for them; empty otherwise.
    pub logprobs: Vec<GeneratedToken>,
}

/// One generated token as reported to a consumer.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct GeneratedToken {
    /// The token id.
    pub id: u32,
    /// Where its text starts in the generated text, in characters (Unicode scalar values).
    pub text_offset: usize,
    /// Its logprob and the top alternatives (raw logits), when asked for.
    pub logprob: Option<TokenLogprob>,
}

/// Text that became final during generation, and the tokens that begin in it.
#[derive(Debug, Clone, Copy)]
pub struct Piece<'a> {
    /// The text (may be empty).
    pub text: &'a str,
    /// The generated tokens whose text starts in this piece, in order.
    pub tokens: &'a [GeneratedToken],
}

/// A model ready to generate.
pub struct Engine {
    backend: Box<dyn Backend>,
    tokenizer: Arc<Tokenizer>,
    config: LlamaConfig,
    cached: Vec<u32>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("backend", &self.backend.name())
            .field("config", &self.config)
            .finish()
    }
}

/// Loads a GGUF from bytes into the CPU backend.
pub fn load_cpu_from_bytes(bytes: &[u8], opts: &CpuOptions) -> Result<Engine, InferenceError> {
    let g = crate::gguf::Gguf::parse(bytes)?;
    let (w, tok) = weights_and_tokenizer(&g)?;
    let backend = CpuBackend::new(&w, opts)?;
    Ok(Engine::new(Box::new(backend), tok, w.config.clone()))
}

/// The weights' description and the tokenizer of a parsed GGUF (header or whole file); checks
/// the architecture, every tensor's shape and type, and that the tokenizer fits the model.
pub fn weights_and_tokenizer<'a>(
    g: &crate::gguf::Gguf<'a>,
) -> Result<(LlamaWeights<'a>, Tokenizer), InferenceError> {
    let w = LlamaWeights::from_gguf(g)?;
    let tok = Tokenizer::from_gguf(g)?;
    if tok.vocab_size() != w.config.vocab {
        return Err(InferenceError::Tokenizer(format!(
            "tokenizer has {} tokens but the model {}",
            tok.vocab_size(),
            w.config.vocab
        )));
    }
    Ok((w, tok))
}

/// Loads a GGUF read through `src` into the CPU backend without holding the file in memory:
/// the header is read first, then each tensor is read, repacked and dropped
/// ([`crate::stream`]). Peak memory: the repacked weights, one raw tensor, the header.
pub fn load_cpu_streamed(
    src: &dyn crate::stream::ReadAt,
    opts: &CpuOptions,
) -> Result<Engine, InferenceError> {
    let header = crate::stream::read_header(src)?;
    let g = crate::gguf::Gguf::parse_header(&header, src.len())?;
    let (w, tok) = weights_and_tokenizer(&g)?;
    let backend = CpuBackend::from_source(&w, opts, src)?;
    Ok(Engine::new(Box::new(backend), tok, w.config.clone()))
}

/// Maps a model file and loads it into the CPU backend.
pub fn load_cpu(path: &Path, opts: &CpuOptions) -> Result<Engine, InferenceError> {
    let f = ModelFile::open(path)?;
    load_cpu_from_bytes(f.bytes(), opts)
}

/// Loads a GGUF read through `src` into the CUDA backend on GPU `opts.ordinal`, streaming
/// every matrix through a bounded page-locked staging buffer
/// ([`crate::cuda::CudaBackend::load_streamed`]): host memory stays at the header plus two
/// chunks, whatever the model size.
pub fn load_cuda_streamed(
    src: &dyn crate::stream::ReadAt,
    opts: &crate::cuda::CudaOptions,
) -> Result<Engine, InferenceError> {
    let header = crate::stream::read_header(src)?;
    let g = crate::gguf::Gguf::parse_header(&header, src.len())?;
    let (w, tok) = weights_and_tokenizer(&g)?;
    let gpu = crate::cuda::Gpu::new(opts.ordinal)?;
    let backend = crate::cuda::CudaBackend::load_streamed(gpu, &w, src, opts, None)?;
    Ok(Engine::new(Box::new(backend), tok, w.config.clone()))
}

impl Engine {
    /// Wraps a backend and tokenizer.
    pub fn new(backend: Box<dyn Backend>, tokenizer: Tokenizer, config: LlamaConfig) -> Self {
        Engine {
            backend,
            tokenizer: Arc::new(tokenizer),
            config,
            cached: Vec::new(),
        }
    }

    /// The tokenizer (shared).
    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    /// The model config.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Backend name.
    pub fn backend_name(&self) -> &str {
        self.backend.name()
    }

    /// Context window in tokens.
    pub fn max_context(&self) -> usize {
        self.backend.max_context()
    }

    /// The model as a [`crate::scheduler::BatchModel`] with room for `slots` sequences and the
    /// KV budget of `cfg` (see [`Backend::into_batch_model`]), and its tokenizer: what the
    /// server's scheduler runs.
    pub fn into_batch_model(
        self,
        slots: usize,
        cfg: &crate::scheduler::SchedulerConfig,
    ) -> Result<(Box<dyn crate::scheduler::BatchModel>, Arc<Tokenizer>), InferenceError> {
        Ok((self.backend.into_batch_model(slots, cfg)?, self.tokenizer))
    }

    /// Generates a continuation of `prompt`. `on_text` receives text pieces as they become
    /// final (stop strings are held back until they can be ruled out) and returns `false` to
    /// cancel.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &SamplingParams,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<Generation, InferenceError> {
        self.generate_pieces(prompt, params, &mut |p| {
            p.text.is_empty() || on_text(p.text)
        })
    }

    /// [`Engine::generate`] with token detail: each [`Piece`] carries the text that became
    /// final and the generated tokens that begin in it (with logprobs when
    /// `params.logprobs` asks for them). A token belongs to the piece holding its first byte;
    /// tokens whose text a stop string cut off entirely are dropped, and the final stop token
    /// (end of sequence/turn) is never reported, so the pieces' tokens are exactly the tokens
    /// that made the returned text (plus zero-width tokens, reported with the last piece).
    /// A piece may have empty text but tokens (a token that is only part of a UTF-8 character
    /// is reported once the character is complete).
    pub fn generate_pieces(
        &mut self,
        prompt: &[u32],
        params: &SamplingParams,
        on_piece: &mut dyn FnMut(&Piece<'_>) -> bool,
    ) -> Result<Generation, InferenceError> {
        self.generate_constrained(prompt, params, None, on_piece)
    }

    /// [`Engine::generate_pieces`] under a constraint (structured output, tool calls): each
    /// step samples among [`TokenConstraint::allowed`] (given the tokens still allowed by
    /// `max_tokens` and the context window) and reports the chosen token back; generation
    /// stops (`FinishReason::Stop`) as soon as the constraint is complete and nothing may
    /// follow. The token masks are computed on the host for every backend (the backends
    /// return logits to the host); logprobs stay those of the raw logits.
    pub fn generate_constrained(
        &mut self,
        prompt: &[u32],
        params: &SamplingParams,
        constraint: Option<&mut dyn TokenConstraint>,
        on_piece: &mut dyn FnMut(&Piece<'_>) -> bool,
    ) -> Result<Generation, InferenceError> {
        let max_ctx = self.backend.max_context();
        if prompt.is_empty() {
            return Err(InferenceError::InvalidArgument(
                "the prompt is empty".into(),
            ));
        }
        if prompt.len() >= max_ctx {
            return Err(InferenceError::ContextOverflow {
                needed: prompt.len() + 1,
                max: max_ctx,
            });
        }
        // Reuse the longest cached prefix (keep at least one token to compute logits).
        let common = self
            .cached
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count()
            .min(prompt.len() - 1);
        self.cached.truncate(common);
        let t0 = Instant::now();
        let mut logits = match self.backend.forward(&prompt[common..], common) {
            Ok(l) => l,
            Err(e) => {
                self.cached.clear();
                self.backend.reset();
                return Err(e);
            }
        };
        self.cached.extend_from_slice(&prompt[common..]);
        let mut timings = Timings {
            prefill_tokens: prompt.len() - common,
            prefill_ms: t0.elapsed().as_secs_f64() * 1000.0,
            ..Default::default()
        };
        let constraint = constraint.map(|c| Box::new(c) as Box<dyn TokenConstraint + '_>);
        let mut cont = Continuation::new(
            self.tokenizer.clone(),
            prompt,
            params.clone(),
            constraint,
            max_ctx,
        );
        let mut step = match cont.start() {
            Some(r) => Advance::Done(r),
            None => cont.advance(&logits, self.cached.len(), on_piece)?,
        };
        let finish = loop {
            let next = match step {
                Advance::Done(r) => break r,
                Advance::Feed(t) => t,
            };
            let pos = self.cached.len();
            let td = Instant::now();
            logits = match self.backend.forward(&[next], pos) {
                Ok(l) => l,
                Err(e) => {
                    self.cached.clear();
                    self.backend.reset();
                    return Err(e);
                }
            };
            timings.decode_tokens += 1;
            timings.decode_ms += td.elapsed().as_secs_f64() * 1000.0;
            self.cached.push(next);
            step = cont.advance(&logits, self.cached.len(), on_piece)?;
        };
        Ok(cont.finish(finish, timings, on_piece))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::gguf::GgmlType;
    use crate::synthetic::synthetic_gguf;

    fn engine() -> Engine {
        let bytes = synthetic_gguf(&LlamaConfig::tiny(), GgmlType::Q8_0, 5).unwrap();
        load_cpu_from_bytes(
            &bytes,
            &CpuOptions {
                threads: 2,
                max_context: 64,
                batch: 8,
            },
        )
        .unwrap()
    }

    #[test]
    fn deterministic_streaming_and_prefix_reuse() {
        let mut e = engine();
        let prompt = e.tokenizer().encode("hello there", false, true);
        let params = SamplingParams {
            max_tokens: 12,
            ..Default::default()
        };
        let mut streamed = String::new();
        let a = e
            .generate(&prompt, &params, &mut |t| {
                streamed.push_str(t);
                true
            })
            .unwrap();
        assert_eq!(a.tokens.len(), 12.min(a.tokens.len()));
        assert_eq!(streamed, a.text);
        assert_eq!(a.timings.prefill_tokens, prompt.len());
        // Second identical request reuses all but the last prompt token.
        let b = e.generate(&prompt, &params, &mut |_| true).unwrap();
        assert_eq!(b.timings.prefill_tokens, 1);
        assert_eq!(a.tokens, b.tokens);
        // Seeded sampling is reproducible.
        let p = SamplingParams {
            temperature: 0.8,
            top_p: 0.9,
            seed: 9,
            max_tokens: 10,
            ..Default::default()
        };
        let c = e.generate(&prompt, &p, &mut |_| true).unwrap();
        let d = e.generate(&prompt, &p, &mut |_| true).unwrap();
        assert_eq!(c.tokens, d.tokens);
    }

    #[test]
    fn stop_strings_and_cancel() {
        let mut e = engine();
        let prompt = e.tokenizer().encode("abc", false, true);
        let params = SamplingParams {
            max_tokens: 20,
            ..Default::default()
        };
        let full = e.generate(&prompt, &params, &mut |_| true).unwrap();
        if full.text.chars().count() >= 4 {
            let stop: String = full.text.chars().skip(2).take(2).collect();
            let mut streamed = String::new();
            let g = e
                .generate(
                    &prompt,
                    &SamplingParams {
                        stop: vec![stop.clone()],
                        ..params.clone()
                    },
                    &mut |t| {
                        streamed.push_str(t);
                        true
                    },
                )
                .unwrap();
            assert_eq!(g.finish_reason, FinishReason::Stop);
            let expect_end = full.text.find(&stop).unwrap();
            assert_eq!(g.text, full.text[..expect_end]);
            assert_eq!(streamed, g.text);
        }
        let g = e.generate(&prompt, &params, &mut |_| false).unwrap();
        assert!(matches!(
            g.finish_reason,
            FinishReason::Cancelled | FinishReason::Stop | FinishReason::Length
        ));
        let long = vec![5u32; 64];
        assert!(matches!(
            e.generate(&long, &params, &mut |_| true),
            Err(InferenceError::ContextOverflow { .. })
        ));
        assert_eq!(
            crate::continuation::held_back("xx<|en", &["<|end|>".into()]),
            4
        );
        assert_eq!(crate::continuation::held_back("xx", &["<|end|>".into()]), 0);
    }

    fn reference_logits(prefix: &[u32]) -> Vec<f32> {
        let bytes = synthetic_gguf(&LlamaConfig::tiny(), GgmlType::Q8_0, 5).unwrap();
        let g = crate::gguf::Gguf::parse(&bytes).unwrap();
        let w = LlamaWeights::from_gguf(&g).unwrap();
        let mut b = CpuBackend::new(
            &w,
            &CpuOptions {
                threads: 1,
                max_context: 64,
                batch: 8,
            },
        )
        .unwrap();
        b.forward(prefix, 0).unwrap()
    }

    #[test]
    fn logprobs_follow_the_raw_logits_and_pieces_carry_the_tokens() {
        let mut e = engine();
        let prompt = e.tokenizer().encode("hello there", false, true);
        // Sampling settings that change the distribution: logprobs must not see them.
        let params = SamplingParams {
            max_tokens: 10,
            temperature: 0.9,
            seed: 3,
            repetition_penalty: 1.5,
            logit_bias: vec![(100, 2.0)],
            logprobs: Some(4),
            ..Default::default()
        };
        let mut streamed = String::new();
        let mut piece_tokens = Vec::new();
        let g = e
            .generate_pieces(&prompt, &params, &mut |p| {
                streamed.push_str(p.text);
                piece_tokens.extend_from_slice(p.tokens);
                true
            })
            .unwrap();
        assert_eq!(streamed, g.text);
        assert_eq!(piece_tokens, g.logprobs);
        let reported: Vec<u32> = g.logprobs.iter().map(|t| t.id).collect();
        let generated: Vec<u32> = g
            .tokens
            .iter()
            .copied()
            .filter(|&t| !e.tokenizer().is_stop(t))
            .collect();
        assert_eq!(reported, generated);
        assert!(!reported.is_empty());
        let mut last_offset = 0;
        for (i, t) in g.logprobs.iter().enumerate() {
            let mut prefix = prompt.clone();
            prefix.extend_from_slice(&g.tokens[..i]);
            let logits = reference_logits(&prefix);
            let lse = crate::sampling::log_sum_exp(&logits);
            let lp = t.logprob.as_ref().unwrap();
            assert_eq!(lp.id, t.id);
            let want = (f64::from(logits[t.id as usize]) - lse) as f32;
            assert!((lp.logprob - want).abs() < 1e-3, "{} vs {want}", lp.logprob);
            assert_eq!(lp.top.len(), 4);
            let best = crate::sampling::top_n(&logits, 4);
            for ((id, l), (bid, bl)) in lp.top.iter().zip(&best) {
                assert_eq!(id, bid);
                assert!((l - (f64::from(*bl) - lse) as f32).abs() < 1e-3);
            }
            assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
            if lp.top.iter().any(|&(_, l)| l <= lp.logprob) {
                assert!(
                    lp.top.iter().any(|&(id, _)| id == t.id),
                    "chosen in the top"
                );
            }
            assert!(t.text_offset >= last_offset);
            last_offset = t.text_offset;
        }
        assert_eq!(g.logprobs[0].text_offset, 0);
        assert!(last_offset <= g.text.chars().count());
        // Without logprobs asked, none are reported.
        let g = e
            .generate(&prompt, &SamplingParams::default(), &mut |_| true)
            .unwrap();
        assert!(g.logprobs.is_empty());
    }

    #[test]
    fn a_stop_string_drops_the_tokens_it_cuts_away() {
        let mut e = engine();
        let prompt = e.tokenizer().encode("abc", false, true);
        let params = SamplingParams {
            max_tokens: 20,
            logprobs: Some(0),
            ..Default::default()
        };
        let full = e.generate(&prompt, &params, &mut |_| true).unwrap();
        let chars: Vec<char> = full.text.chars().collect();
        assert!(chars.len() >= 6, "{:?}", full.text);
        let stop: String = chars[3..5].iter().collect();
        let g = e
            .generate(
                &prompt,
                &SamplingParams {
                    stop: vec![stop.clone()],
                    ..params.clone()
                },
                &mut |_| true,
            )
            .unwrap();
        let cut = g.text.chars().count();
        let want: Vec<u32> = full
            .logprobs
            .iter()
            .take_while(|t| t.text_offset < cut)
            .map(|t| t.id)
            .collect();
        let got: Vec<u32> = g.logprobs.iter().map(|t| t.id).collect();
        assert_eq!(got, want, "stop {stop:?} in {:?}", full.text);
        assert!(got.len() < full.logprobs.len());
    }

    #[test]
    fn streamed_load_generates_what_the_in_memory_load_does() {
        let opts = CpuOptions {
            threads: 2,
            max_context: 64,
            batch: 8,
        };
        let mut qwen = LlamaConfig::tiny();
        qwen.arch = "qwen2".into();
        qwen.rope_style = crate::model::RopeStyle::Neox;
        qwen.tied_embeddings = true;
        for (cfg, ty) in [
            (LlamaConfig::tiny(), GgmlType::Q8_0),
            (LlamaConfig::tiny(), GgmlType::Q4_1),
            (qwen, GgmlType::F16),
        ] {
            let bytes = synthetic_gguf(&cfg, ty, 11).unwrap();
            let mut a = load_cpu_from_bytes(&bytes, &opts).unwrap();
            let mut b = load_cpu_streamed(&bytes, &opts).unwrap();
            let prompt = a.tokenizer().encode("the cat is", false, true);
            let params = SamplingParams {
                max_tokens: 8,
                ..Default::default()
            };
            let ga = a.generate(&prompt, &params, &mut |_| true).unwrap();
            let gb = b.generate(&prompt, &params, &mut |_| true).unwrap();
            assert_eq!(ga.tokens, gb.tokens, "{ty} {}", cfg.arch);
        }
    }

    #[test]
    fn streamed_load_stops_at_a_read_error_with_the_reader_s_reason() {
        struct Corrupt<'a>(&'a [u8], u64);
        impl crate::stream::ReadAt for Corrupt<'_> {
            fn len(&self) -> u64 {
                self.0.len() as u64
            }
            fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
                if offset <= self.1 && self.1 < offset + buf.len() as u64 {
                    return Err(std::io::Error::other(format!(
                        "data block {} is corrupted",
                        self.1 / 4096
                    )));
                }
                crate::stream::ReadAt::read_exact_at(&self.0, buf, offset)
            }
        }
        // Larger than the first header read (1 MiB), so the tensors are read one by one.
        let cfg = LlamaConfig {
            dim: 512,
            ffn_dim: 1536,
            n_heads: 8,
            n_kv_heads: 4,
            head_dim: 64,
            vocab: 1024,
            ..LlamaConfig::tiny()
        };
        let bytes = synthetic_gguf(&cfg, GgmlType::Q8_0, 5).unwrap();
        let last = bytes.len() as u64 - 10;
        let e = load_cpu_streamed(&Corrupt(&bytes, last), &CpuOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("is corrupted") && e.contains("tensor"), "{e}");
        // An unsupported architecture is refused from the header, before any tensor is read.
        let mut w = crate::gguf::GgufWriter::new();
        w.kv(
            "general.architecture",
            crate::gguf::Value::String("mamba".into()),
        );
        w.tensor("x", &[32], GgmlType::F32, vec![0; 128]);
        let other = w.to_bytes();
        let e = load_cpu_streamed(&other, &CpuOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("\"mamba\"") && e.contains("is not supported"),
            "{e}"
        );
    }

    #[test]
    fn real_model_says_paris() {
        let Some(path) = crate::test_support::real_model_path() else {
            return;
        };
        let mut e = load_cpu(
            &path,
            &CpuOptions {
                threads: 2,
                max_context: 256,
                batch: 32,
            },
        )
        .unwrap();
        let prompt = e
            .tokenizer()
            .encode("The capital of France is", false, true);
        let params = SamplingParams {
            max_tokens: 4,
            ..Default::default()
        };
        let g = e.generate(&prompt, &params, &mut |_| true).unwrap();
        assert!(g.text.starts_with(" Paris"), "got {:?}", g.text);
        assert_eq!(g.tokens[0], 7042, "' Paris' token id");
    }
}
