//! The compute backend contract shared by the CPU reference backend and the CUDA backend.
//!
//! Contract for implementors of [`Backend`]:
//! - A backend owns one model's weights and one sequence's KV cache (positions `0..max_context()`).
//! - `forward(tokens, start_pos)` runs the transformer over `tokens`, which occupy positions
//!   `start_pos .. start_pos + tokens.len()`. It writes their K/V into the cache at those
//!   positions, attends causally over cache positions `0 ..= pos`, and returns the logits
//!   (length = vocab size, f32, before any sampling or temperature) of the LAST token only.
//!   Positions before `start_pos` must have been filled by earlier calls since the last `reset`;
//!   calling with `start_pos` smaller than the filled length overwrites (rewinds) the cache from
//!   there, which is how a caller reuses a shared prompt prefix.
//! - Errors: `tokens` empty, a token id `>= vocab`, or `start_pos + tokens.len() > max_context()`
//!   return `InferenceError::InvalidArgument` / `ContextOverflow`; never panic.
//! - `reset()` forgets the cache (cheap; no reallocation needed).
//! - Numerics: the CPU backend is the reference; other backends should match its logits to a
//!   relative tolerance of about 1e-2 (quantized activations differ slightly).
//! - Model semantics (Llama): `x = embd[token]`; per layer: h = x + Wo·attn(rope(Wq·rms(x)),
//!   rope(Wk·rms(x)), Wv·rms(x)); x = h + Wdown·(silu(Wgate·rms(h)) * Wup·rms(h)); logits =
//!   Wout·rms(x). RoPE style comes from [`crate::model::LlamaConfig::rope_style`]
//!   (`Norm`: rotate adjacent pairs (2i, 2i+1) — llama; `Neox`: pairs (i, i + head_dim/2) — qwen2),
//!   theta_i = pos * rope_theta^(-2i/head_dim) (divided by `rope_freqs[i]` when that tensor exists).
//!   GQA: query head h uses KV head h / (n_heads / n_kv_heads). Attention scale 1/sqrt(head_dim).
//!   Optional q/k/v biases (qwen2) are added after the projections.

use crate::error::InferenceError;
use crate::scheduler::{BatchModel, SchedulerConfig};

/// A loaded model ready to compute logits.
pub trait Backend: Send {
    /// Short name, e.g. `"cpu"` or `"cuda"`.
    fn name(&self) -> &str;
    /// Runs `tokens` at positions `start_pos..`; returns the last token's logits (vocab length).
    fn forward(&mut self, tokens: &[u32], start_pos: usize) -> Result<Vec<f32>, InferenceError>;
    /// Clears the KV cache.
    fn reset(&mut self);
    /// Maximum number of positions (KV cache length).
    fn max_context(&self) -> usize;
    /// This backend as a [`BatchModel`] for the continuous-batching scheduler, with room for
    /// `slots` sequences at once and the KV budget of `cfg` (a backend without batching gives
    /// a one-slot model that runs the sequences one after another). Fails when the batch's
    /// buffers cannot be allocated.
    fn into_batch_model(
        self: Box<Self>,
        slots: usize,
        cfg: &SchedulerConfig,
    ) -> Result<Box<dyn BatchModel>, InferenceError>;
}

/// Checks the common `forward` preconditions (for use by implementors).
pub fn check_forward_args(
    tokens: &[u32],
    start_pos: usize,
    vocab: usize,
    max_context: usize,
) -> Result<(), InferenceError> {
    if tokens.is_empty() {
        return Err(InferenceError::InvalidArgument(
            "forward called with no tokens".into(),
        ));
    }
    if let Some(t) = tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(InferenceError::InvalidArgument(format!(
            "token id {t} is outside the vocabulary (size {vocab})"
        )));
    }
    let needed = start_pos.saturating_add(tokens.len());
    if needed > max_context {
        return Err(InferenceError::ContextOverflow {
            needed,
            max: max_context,
        });
    }
    Ok(())
}
