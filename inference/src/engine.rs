//! The generation loop: a backend plus its tokenizer, prompt-prefix reuse across requests,
//! streaming callbacks, stop strings and timings.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::backend::Backend;
use crate::cpu::{CpuBackend, CpuOptions};
use crate::error::InferenceError;
use crate::model::{LlamaConfig, LlamaWeights, ModelFile};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::{StreamDecoder, Tokenizer};

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
    let w = LlamaWeights::from_gguf(&g)?;
    let tok = Tokenizer::from_gguf(&g)?;
    if tok.vocab_size() != w.config.vocab {
        return Err(InferenceError::Tokenizer(format!(
            "tokenizer has {} tokens but the model {}",
            tok.vocab_size(),
            w.config.vocab
        )));
    }
    let backend = CpuBackend::new(&w, opts)?;
    Ok(Engine::new(Box::new(backend), tok, w.config.clone()))
}

/// Maps a model file and loads it into the CPU backend.
pub fn load_cpu(path: &Path, opts: &CpuOptions) -> Result<Engine, InferenceError> {
    let f = ModelFile::open(path)?;
    load_cpu_from_bytes(f.bytes(), opts)
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

    /// Generates a continuation of `prompt`. `on_text` receives text pieces as they become
    /// final (stop strings are held back until they can be ruled out) and returns `false` to
    /// cancel.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &SamplingParams,
        on_text: &mut dyn FnMut(&str) -> bool,
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
        let mut sampler = Sampler::new(params);
        let mut decoder = StreamDecoder::new();
        let mut out_tokens = Vec::new();
        let mut text = String::new();
        let mut sent = 0usize;
        let max_hold = params.stop.iter().map(String::len).max().unwrap_or(0);
        let t1 = Instant::now();
        let finish = loop {
            if out_tokens.len() >= params.max_tokens {
                break FinishReason::Length;
            }
            let next = sampler.sample(&logits);
            out_tokens.push(next);
            if self.tokenizer.is_stop(next) {
                break FinishReason::Stop;
            }
            text.push_str(&decoder.push(&self.tokenizer, next));
            // Stop strings: search the region that could contain a new match.
            let search_from = sent.saturating_sub(max_hold);
            let search_from = floor_char_boundary(&text, search_from);
            if let Some(cut) = params
                .stop
                .iter()
                .filter(|s| !s.is_empty())
                .filter_map(|s| {
                    text[search_from..]
                        .find(s.as_str())
                        .map(|i| i + search_from)
                })
                .min()
            {
                text.truncate(cut);
                if cut > sent && !on_text(&text[sent..]) {
                    break FinishReason::Cancelled;
                }
                sent = text.len();
                break FinishReason::Stop;
            }
            let safe = floor_char_boundary(&text, text.len() - held_back(&text, &params.stop));
            if safe > sent {
                if !on_text(&text[sent..safe]) {
                    break FinishReason::Cancelled;
                }
                sent = safe;
            }
            let pos = self.cached.len();
            if pos >= max_ctx {
                break FinishReason::Length;
            }
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
        };
        let _ = t1;
        if finish != FinishReason::Stop || sent < text.len() {
            text.push_str(&decoder.finish());
            if sent < text.len() && finish != FinishReason::Cancelled {
                on_text(&text[sent..]);
            }
        }
        Ok(Generation {
            tokens: out_tokens,
            text,
            finish_reason: finish,
            prompt_tokens: prompt.len(),
            timings,
        })
    }
}

/// Bytes at the end of `text` that might start a stop string.
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut hold = 0;
    for s in stops {
        for k in (1..s.len().min(text.len() + 1)).rev() {
            if k <= hold {
                break;
            }
            if text.as_bytes().ends_with(&s.as_bytes()[..k]) {
                hold = k;
                break;
            }
        }
    }
    hold
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
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
            stop: vec![],
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
        assert_eq!(held_back("xx<|en", &["<|end|>".into()]), 4);
        assert_eq!(held_back("xx", &["<|end|>".into()]), 0);
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
