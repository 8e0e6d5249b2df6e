//! Llama-family model description: hyper-parameters from GGUF metadata and borrowed weight views.
//!
//! Supported architectures: `llama` (SmolLM2, Llama 2/3, TinyLlama, ...), `qwen2` (q/k/v
//! biases, NEOX RoPE) and `qwen3` (NEOX RoPE, per-head RMSNorm of q and k before RoPE,
//! `blk.N.attn_{q,k}_norm.weight`). GGUF tensor names follow llama.cpp: `token_embd.weight`,
//! `output_norm.weight`, `output.weight` (absent when tied to the embeddings),
//! `blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,ffn_norm,ffn_gate,ffn_up,ffn_down}.weight`,
//! optional `blk.N.attn_{q,k,v}.bias` and `rope_freqs.weight`.
//!
//! RoPE scaling ([`RopeScaling`]): a `rope_freqs.weight` tensor (llama.cpp's converter bakes
//! Llama 3.x `rope_scaling` into it) divides the frequencies; otherwise the
//! `<arch>.rope.scaling.type` key selects `linear` (`.factor`) or `llama3` (`.factor`,
//! `.low_freq_factor`, `.high_freq_factor`, `.original_context_length`), from which the same
//! divisors are computed ([`LlamaConfig::rope_freq_factors`]).
//!
//! Weight matrices have GGUF dims `[in, out]` (`dims[0]` contiguous): row `r` of the stored
//! matrix is the `in`-long weight vector producing output `r`.
//!
//! RoPE: llama.cpp's converter permutes the Q/K weights of `llama` models so that the rotation
//! acts on adjacent pairs (2i, 2i+1) ("NORM" style); `qwen2` models are not permuted and use the
//! "NEOX" style (pairs (i, i + head_dim/2)). [`LlamaConfig::rope_style`] carries the choice.

use std::path::Path;

use crate::error::InferenceError;
use crate::gguf::{GgmlType, Gguf};

/// How RoPE pairs dimensions within a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Adjacent pairs (2i, 2i+1) — llama.cpp `LLAMA_ROPE_TYPE_NORM` (architecture `llama`).
    Norm,
    /// Split halves (i, i + head_dim/2) — llama.cpp `LLAMA_ROPE_TYPE_NEOX` (architecture `qwen2`).
    Neox,
}

/// RoPE frequency scaling from the GGUF metadata.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum RopeScaling {
    /// None (or baked into a `rope_freqs.weight` tensor).
    #[default]
    None,
    /// Positions divided by `factor` (all frequencies divided by it).
    Linear {
        /// `<arch>.rope.scaling.factor`.
        factor: f32,
    },
    /// Llama 3.x: low frequencies divided by `factor`, high ones kept, a smooth ramp between.
    Llama3 {
        /// `<arch>.rope.scaling.factor` (8 for Llama 3.1).
        factor: f32,
        /// `<arch>.rope.scaling.low_freq_factor` (default 1).
        low_freq_factor: f32,
        /// `<arch>.rope.scaling.high_freq_factor` (default 4).
        high_freq_factor: f32,
        /// `<arch>.rope.scaling.original_context_length` (8192 for Llama 3.1).
        original_context: f32,
    },
}

/// Model hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `general.architecture` (`llama` or `qwen2`).
    pub arch: String,
    /// Vocabulary size.
    pub vocab: usize,
    /// Embedding width.
    pub dim: usize,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (GQA).
    pub n_kv_heads: usize,
    /// Per-head width.
    pub head_dim: usize,
    /// Feed-forward hidden width.
    pub ffn_dim: usize,
    /// RoPE base frequency.
    pub rope_theta: f32,
    /// RMSNorm epsilon.
    pub rms_eps: f32,
    /// Trained context length.
    pub context_len: usize,
    /// Output projection shares the token embedding matrix.
    pub tied_embeddings: bool,
    /// RoPE pairing style.
    pub rope_style: RopeStyle,
    /// RoPE frequency scaling.
    pub rope_scaling: RopeScaling,
}

impl LlamaConfig {
    /// A SmolLM2-135M-shaped config (handy for tests and benchmarks).
    pub fn smollm2_135m() -> Self {
        LlamaConfig {
            arch: "llama".into(),
            vocab: 49152,
            dim: 576,
            n_layers: 30,
            n_heads: 9,
            n_kv_heads: 3,
            head_dim: 64,
            ffn_dim: 1536,
            rope_theta: 100_000.0,
            rms_eps: 1e-5,
            context_len: 8192,
            tied_embeddings: true,
            rope_style: RopeStyle::Norm,
            rope_scaling: RopeScaling::None,
        }
    }

    /// A tiny config for fast tests.
    pub fn tiny() -> Self {
        LlamaConfig {
            arch: "llama".into(),
            vocab: 384,
            dim: 64,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 16,
            ffn_dim: 128,
            rope_theta: 10_000.0,
            rms_eps: 1e-5,
            context_len: 256,
            tied_embeddings: false,
            rope_style: RopeStyle::Norm,
            rope_scaling: RopeScaling::None,
        }
    }

    /// Width of all query heads together.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }

    /// Width of all key (or value) heads together.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Approximate parameter count.
    pub fn n_params(&self) -> u64 {
        let per_layer = self.dim * (self.q_dim() + 2 * self.kv_dim())
            + self.q_dim() * self.dim
            + 3 * self.dim * self.ffn_dim
            + 2 * self.dim;
        let emb = self.vocab * self.dim * if self.tied_embeddings { 1 } else { 2 };
        (per_layer * self.n_layers + emb + self.dim) as u64
    }

    /// Reads the config from GGUF metadata (`<arch>.*` keys) and tensor shapes.
    pub fn from_gguf(g: &Gguf<'_>) -> Result<Self, InferenceError> {
        let arch = g
            .get_str("general.architecture")
            .ok_or_else(|| InferenceError::Metadata("general.architecture is missing".into()))?
            .to_owned();
        let rope_style = match arch.as_str() {
            "llama" => RopeStyle::Norm,
            "qwen2" | "qwen3" => RopeStyle::Neox,
            _ => {
                // Say what a supported file would carry, so the user can tell a renamed
                // architecture from a different one.
                let missing: Vec<String> = ["llama", "qwen2", "qwen3"]
                    .iter()
                    .flat_map(|a| [format!("{a}.embedding_length"), format!("{a}.block_count")])
                    .filter(|k| g.get_u64(k).is_none())
                    .collect();
                return Err(InferenceError::UnsupportedArchitecture(format!(
                    "{arch:?} (this file has no {} keys)",
                    missing.join(", ")
                )));
            }
        };
        let req = |key: &str| -> Result<usize, InferenceError> {
            let full = format!("{arch}.{key}");
            g.get_u64(&full)
                .and_then(|v| usize::try_from(v).ok())
                .filter(|&v| v > 0 && v < (1 << 24))
                .ok_or_else(|| {
                    InferenceError::Metadata(format!("{full} is missing or out of range"))
                })
        };
        let dim = req("embedding_length")?;
        let n_layers = req("block_count")?;
        let n_heads = req("attention.head_count")?;
        let n_kv_heads = req("attention.head_count_kv").unwrap_or(n_heads);
        let ffn_dim = req("feed_forward_length")?;
        let context_len = req("context_length")?;
        let head_dim = match req("attention.key_length") {
            Ok(k) => k,
            Err(_) => {
                if dim % n_heads != 0 {
                    return Err(InferenceError::Metadata(format!(
                        "embedding_length {dim} is not divisible by head_count {n_heads}"
                    )));
                }
                dim / n_heads
            }
        };
        if n_heads % n_kv_heads != 0 {
            return Err(InferenceError::Metadata(format!(
                "head_count {n_heads} is not a multiple of head_count_kv {n_kv_heads}"
            )));
        }
        if head_dim % 2 != 0 {
            return Err(InferenceError::Metadata(format!(
                "head dimension {head_dim} is odd; RoPE needs pairs"
            )));
        }
        let rope_theta = g
            .get_f64(&format!("{arch}.rope.freq_base"))
            .unwrap_or(10_000.0) as f32;
        let rms_eps = g
            .get_f64(&format!("{arch}.attention.layer_norm_rms_epsilon"))
            .unwrap_or(1e-5) as f32;
        let embd = g
            .tensor("token_embd.weight")
            .ok_or_else(|| InferenceError::Tensor("token_embd.weight is missing".into()))?;
        let vocab = match g.get_u64(&format!("{arch}.vocab_size")) {
            Some(v) => usize::try_from(v).unwrap_or(usize::MAX),
            None => embd.dims.get(1).copied().unwrap_or(0) as usize,
        };
        if vocab == 0 || vocab >= (1 << 24) {
            return Err(InferenceError::Metadata(format!(
                "vocabulary size {vocab} out of range"
            )));
        }
        let rope_scaling = rope_scaling_from(g, &arch)?;
        Ok(LlamaConfig {
            arch,
            vocab,
            dim,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            ffn_dim,
            rope_theta,
            rms_eps,
            context_len,
            tied_embeddings: g.tensor("output.weight").is_none(),
            rope_style,
            rope_scaling,
        })
    }

    /// The per-frequency divisors of RoPE (`theta_i = pos * base^(-2i/head_dim) / ff[i]`):
    /// the `rope_freqs.weight` tensor when the file has one (times a linear factor), else
    /// computed from [`Self::rope_scaling`]; `None` when no scaling applies.
    pub fn rope_freq_factors(&self, tensor: Option<Vec<f32>>) -> Option<Vec<f32>> {
        let half = self.head_dim / 2;
        match (tensor, self.rope_scaling) {
            (Some(ff), RopeScaling::Linear { factor }) => {
                Some(ff.iter().map(|f| f * factor).collect())
            }
            (Some(ff), _) => Some(ff),
            (None, RopeScaling::None) => None,
            (None, RopeScaling::Linear { factor }) => Some(vec![factor; half]),
            (
                None,
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_context,
                },
            ) => {
                let low_wavelen = original_context / low_freq_factor;
                let high_wavelen = original_context / high_freq_factor;
                Some(
                    (0..half)
                        .map(|i| {
                            let freq = self.rope_theta.powf(-2.0 * i as f32 / self.head_dim as f32);
                            let wavelen = 2.0 * std::f32::consts::PI / freq;
                            if wavelen < high_wavelen {
                                1.0
                            } else if wavelen > low_wavelen {
                                factor
                            } else {
                                let smooth = (original_context / wavelen - low_freq_factor)
                                    / (high_freq_factor - low_freq_factor);
                                1.0 / ((1.0 - smooth) / factor + smooth)
                            }
                        })
                        .collect(),
                )
            }
        }
    }
}

/// Reads `<arch>.rope.scaling.*`.
fn rope_scaling_from(g: &Gguf<'_>, arch: &str) -> Result<RopeScaling, InferenceError> {
    let key = |k: &str| format!("{arch}.rope.scaling.{k}");
    let f = |k: &str| g.get_f64(&key(k)).map(|v| v as f32);
    let positive = |k: &str, v: Option<f32>| -> Result<f32, InferenceError> {
        v.filter(|v| v.is_finite() && *v > 0.0).ok_or_else(|| {
            InferenceError::Metadata(format!(
                "{} is missing or not a positive number (needed by {} = {:?})",
                key(k),
                key("type"),
                g.get_str(&key("type")).unwrap_or_default()
            ))
        })
    };
    Ok(match g.get_str(&key("type")) {
        None | Some("none") => RopeScaling::None,
        Some("linear") => RopeScaling::Linear {
            factor: positive("factor", f("factor"))?,
        },
        Some("llama3") => {
            let low = positive("low_freq_factor", f("low_freq_factor").or(Some(1.0)))?;
            let high = positive("high_freq_factor", f("high_freq_factor").or(Some(4.0)))?;
            if high <= low {
                return Err(InferenceError::Metadata(format!(
                    "{} ({high}) must exceed {} ({low})",
                    key("high_freq_factor"),
                    key("low_freq_factor")
                )));
            }
            RopeScaling::Llama3 {
                factor: positive("factor", f("factor"))?,
                low_freq_factor: low,
                high_freq_factor: high,
                original_context: positive(
                    "original_context_length",
                    g.get_u64(&key("original_context_length")).map(|v| v as f32),
                )?,
            }
        }
        Some(other) => {
            return Err(InferenceError::Metadata(format!(
                "{} = {other:?} is not supported; supported: none, linear, llama3 (or a rope_freqs.weight tensor)",
                key("type")
            )));
        }
    })
}

/// A borrowed view of one tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorRef<'a> {
    /// GGUF tensor name.
    pub name: String,
    /// Element type.
    pub ty: GgmlType,
    /// GGUF dims (`dims[0]` contiguous).
    pub dims: Vec<u64>,
    /// Raw bytes (empty when the weights were described from the GGUF header alone,
    /// [`crate::gguf::Gguf::parse_header`]: then read `size` bytes at `offset`).
    pub data: &'a [u8],
    /// Absolute byte offset of the data in the model file.
    pub offset: u64,
    /// Size of the data in bytes.
    pub size: u64,
}

impl TensorRef<'_> {
    /// Elements per row (`dims[0]`).
    pub fn cols(&self) -> usize {
        self.dims.first().copied().unwrap_or(0) as usize
    }
    /// Number of rows (product of `dims[1..]`).
    pub fn rows(&self) -> usize {
        self.dims.iter().skip(1).product::<u64>() as usize
    }
    /// Bytes per row.
    pub fn row_bytes(&self) -> usize {
        (self.cols() as u64 / self.ty.block_size() * self.ty.block_bytes()) as usize
    }
    /// Dequantizes the whole tensor to f32.
    pub fn to_f32(&self) -> Result<Vec<f32>, InferenceError> {
        self.bytes_to_f32(self.data)
    }

    /// Dequantizes `bytes` (this tensor's data, read elsewhere) to f32.
    pub fn bytes_to_f32(&self, bytes: &[u8]) -> Result<Vec<f32>, InferenceError> {
        Ok(crate::quant::dequantize_vec(
            self.ty,
            bytes,
            self.cols() * self.rows(),
        )?)
    }
}

/// One transformer block's weights.
#[derive(Debug, Clone)]
pub struct LayerWeights<'a> {
    /// RMSNorm before attention, `[dim]`.
    pub attn_norm: TensorRef<'a>,
    /// `[dim, q_dim]`.
    pub attn_q: TensorRef<'a>,
    /// `[dim, kv_dim]`.
    pub attn_k: TensorRef<'a>,
    /// `[dim, kv_dim]`.
    pub attn_v: TensorRef<'a>,
    /// `[q_dim, dim]`.
    pub attn_output: TensorRef<'a>,
    /// Optional `[q_dim]` bias (qwen2).
    pub attn_q_bias: Option<TensorRef<'a>>,
    /// Optional `[kv_dim]` bias (qwen2).
    pub attn_k_bias: Option<TensorRef<'a>>,
    /// Optional `[kv_dim]` bias (qwen2).
    pub attn_v_bias: Option<TensorRef<'a>>,
    /// RMSNorm before the FFN, `[dim]`.
    pub ffn_norm: TensorRef<'a>,
    /// `[dim, ffn_dim]`.
    pub ffn_gate: TensorRef<'a>,
    /// `[dim, ffn_dim]`.
    pub ffn_up: TensorRef<'a>,
    /// `[ffn_dim, dim]`.
    pub ffn_down: TensorRef<'a>,
    /// Per-head RMSNorm of the queries, `[head_dim]` (qwen3).
    pub attn_q_norm: Option<TensorRef<'a>>,
    /// Per-head RMSNorm of the keys, `[head_dim]` (qwen3).
    pub attn_k_norm: Option<TensorRef<'a>>,
}

/// All weights of a Llama-family model, borrowed from the GGUF bytes.
#[derive(Debug, Clone)]
pub struct LlamaWeights<'a> {
    /// Hyper-parameters.
    pub config: LlamaConfig,
    /// `[dim, vocab]`.
    pub token_embd: TensorRef<'a>,
    /// Final RMSNorm, `[dim]`.
    pub output_norm: TensorRef<'a>,
    /// `[dim, vocab]`; the same tensor as `token_embd` when embeddings are tied.
    pub output: TensorRef<'a>,
    /// Optional llama3-style per-frequency divisors `[head_dim/2]`.
    pub rope_freqs: Option<TensorRef<'a>>,
    /// Transformer blocks.
    pub layers: Vec<LayerWeights<'a>>,
}

impl<'a> LlamaWeights<'a> {
    /// Collects and shape-checks all tensors.
    pub fn from_gguf(g: &Gguf<'a>) -> Result<Self, InferenceError> {
        let config = LlamaConfig::from_gguf(g)?;
        let c = &config;
        let get = |name: &str, want: &[usize]| -> Result<TensorRef<'a>, InferenceError> {
            let t = g
                .tensor(name)
                .ok_or_else(|| InferenceError::Tensor(format!("{name} is missing")))?;
            let dims: Vec<usize> = t.dims.iter().map(|&d| d as usize).collect();
            // Accept trailing 1-dims.
            let trimmed: Vec<usize> = {
                let mut d = dims.clone();
                while d.len() > want.len() && d.last() == Some(&1) {
                    d.pop();
                }
                d
            };
            if trimmed != want {
                return Err(InferenceError::Tensor(format!(
                    "{name} has shape {dims:?}, expected {want:?}"
                )));
            }
            if !t.ty.is_supported() {
                return Err(InferenceError::UnsupportedType {
                    name: name.to_owned(),
                    ty: t.ty,
                });
            }
            Ok(TensorRef {
                name: name.to_owned(),
                ty: t.ty,
                dims: t.dims.clone(),
                data: g.tensor_data(t),
                offset: g.tensor_file_offset(t),
                size: t.size,
            })
        };
        let opt = |name: &str, want: &[usize]| -> Result<Option<TensorRef<'a>>, InferenceError> {
            if g.tensor(name).is_some() {
                get(name, want).map(Some)
            } else {
                Ok(None)
            }
        };
        let token_embd = get("token_embd.weight", &[c.dim, c.vocab])?;
        let output_norm = get("output_norm.weight", &[c.dim])?;
        let output = if c.tied_embeddings {
            TensorRef {
                name: "output.weight (tied to token_embd.weight)".into(),
                ..token_embd.clone()
            }
        } else {
            get("output.weight", &[c.dim, c.vocab])?
        };
        let rope_freqs = opt("rope_freqs.weight", &[c.head_dim / 2])?;
        // qwen3 requires the per-head q/k norms; other architectures may not have them.
        let qk_norm = |name: &str| -> Result<Option<TensorRef<'a>>, InferenceError> {
            if c.arch == "qwen3" {
                get(name, &[c.head_dim]).map(Some)
            } else {
                opt(name, &[c.head_dim])
            }
        };
        // No with_capacity: n_layers comes from the file; a missing tensor ends the loop early.
        let mut layers = Vec::new();
        for i in 0..c.n_layers {
            let n = |s: &str| format!("blk.{i}.{s}");
            layers.push(LayerWeights {
                attn_norm: get(&n("attn_norm.weight"), &[c.dim])?,
                attn_q: get(&n("attn_q.weight"), &[c.dim, c.q_dim()])?,
                attn_k: get(&n("attn_k.weight"), &[c.dim, c.kv_dim()])?,
                attn_v: get(&n("attn_v.weight"), &[c.dim, c.kv_dim()])?,
                attn_output: get(&n("attn_output.weight"), &[c.q_dim(), c.dim])?,
                attn_q_bias: opt(&n("attn_q.bias"), &[c.q_dim()])?,
                attn_k_bias: opt(&n("attn_k.bias"), &[c.kv_dim()])?,
                attn_v_bias: opt(&n("attn_v.bias"), &[c.kv_dim()])?,
                ffn_norm: get(&n("ffn_norm.weight"), &[c.dim])?,
                ffn_gate: get(&n("ffn_gate.weight"), &[c.dim, c.ffn_dim])?,
                ffn_up: get(&n("ffn_up.weight"), &[c.dim, c.ffn_dim])?,
                ffn_down: get(&n("ffn_down.weight"), &[c.ffn_dim, c.dim])?,
                attn_q_norm: qk_norm(&n("attn_q_norm.weight"))?,
                attn_k_norm: qk_norm(&n("attn_k_norm.weight"))?,
            });
        }
        Ok(LlamaWeights {
            config,
            token_embd,
            output_norm,
            output,
            rope_freqs,
            layers,
        })
    }
}

/// A model file mapped into memory read-only.
#[derive(Debug)]
pub struct ModelFile {
    mmap: memmap2::Mmap,
    path: std::path::PathBuf,
}

impl ModelFile {
    /// Maps `path`.
    pub fn open(path: &Path) -> Result<Self, InferenceError> {
        let io = |source| InferenceError::Io {
            path: path.display().to_string(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only and private to this process; model files are not modified
        // while being served (they are verified by sha256 and live on read-only storage in the
        // image). A concurrent truncation could fault, which is the documented memmap caveat.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        Ok(ModelFile {
            mmap,
            path: path.to_owned(),
        })
    }

    /// The file bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.mmap
    }

    /// The path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Parses the GGUF header.
    pub fn gguf(&self) -> Result<Gguf<'_>, InferenceError> {
        Ok(Gguf::parse(&self.mmap)?)
    }
}

/// Hex sha256 of a file (streamed).
pub fn sha256_file(path: &Path) -> Result<String, InferenceError> {
    use sha2::Digest;
    use std::io::Read;
    let io = |source| InferenceError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Fails unless the file's sha256 equals `expected` (hex, case-insensitive).
pub fn verify_model_sha256(path: &Path, expected: &str) -> Result<(), InferenceError> {
    let actual = sha256_file(path)?;
    if actual.eq_ignore_ascii_case(expected.trim()) {
        Ok(())
    } else {
        Err(InferenceError::ChecksumMismatch {
            path: path.display().to_string(),
            expected: expected.to_owned(),
            actual,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::gguf::Value;
    use crate::synthetic::synthetic_gguf;

    #[test]
    fn config_and_weights_from_synthetic() {
        let cfg = LlamaConfig::tiny();
        let bytes = synthetic_gguf(&cfg, GgmlType::Q4_1, 7).unwrap();
        let g = Gguf::parse(&bytes).unwrap();
        let read = LlamaConfig::from_gguf(&g).unwrap();
        assert_eq!(read, cfg);
        let w = LlamaWeights::from_gguf(&g).unwrap();
        assert_eq!(w.layers.len(), 2);
        assert_eq!(w.layers[1].ffn_down.cols(), 128);
        assert_eq!(w.layers[1].ffn_down.rows(), 64);
        assert_eq!(w.layers[0].attn_q.ty, GgmlType::Q4_1);
        assert_eq!(w.output.rows(), cfg.vocab);
    }

    #[test]
    fn tied_and_qwen2() {
        let mut cfg = LlamaConfig::tiny();
        cfg.tied_embeddings = true;
        cfg.arch = "qwen2".into();
        cfg.rope_style = RopeStyle::Neox;
        let bytes = synthetic_gguf(&cfg, GgmlType::Q8_0, 1).unwrap();
        let g = Gguf::parse(&bytes).unwrap();
        assert_eq!(LlamaConfig::from_gguf(&g).unwrap(), cfg);
        let w = LlamaWeights::from_gguf(&g).unwrap();
        assert_eq!(w.output.data, w.token_embd.data);
        assert!(w.layers[0].attn_q_bias.is_some());
    }

    #[test]
    fn qwen3_config_and_norms() {
        let mut cfg = LlamaConfig::tiny();
        cfg.arch = "qwen3".into();
        cfg.rope_style = RopeStyle::Neox;
        cfg.head_dim = 32; // q_dim 128 != dim 64, as in real Qwen3 models
        let bytes = synthetic_gguf(&cfg, GgmlType::Q8_0, 1).unwrap();
        let g = Gguf::parse(&bytes).unwrap();
        assert_eq!(LlamaConfig::from_gguf(&g).unwrap(), cfg);
        let w = LlamaWeights::from_gguf(&g).unwrap();
        assert_eq!(w.layers[1].attn_q_norm.as_ref().unwrap().dims, vec![32]);
        assert!(w.layers[1].attn_k_norm.is_some());
        assert!(w.layers[0].attn_q_bias.is_none());
        // The same file without its k norm: qwen3 requires it and says which tensor.
        let mut wr = crate::gguf::GgufWriter::new();
        for (k, v) in &g.metadata {
            wr.kv(k, v.clone());
        }
        for t in &g.tensors {
            if t.name != "blk.1.attn_k_norm.weight" {
                wr.tensor(&t.name, &t.dims, t.ty, g.tensor_data(t).to_vec());
            }
        }
        let bytes = wr.to_bytes();
        let g = Gguf::parse(&bytes).unwrap();
        let e = LlamaWeights::from_gguf(&g).unwrap_err().to_string();
        assert!(e.contains("blk.1.attn_k_norm.weight is missing"), "{e}");
    }

    #[test]
    fn rope_scaling_keys() {
        let mut cfg = LlamaConfig::tiny();
        cfg.rope_scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_context: 8192.0,
        };
        let bytes = synthetic_gguf(&cfg, GgmlType::Q8_0, 1).unwrap();
        let g = Gguf::parse(&bytes).unwrap();
        assert_eq!(LlamaConfig::from_gguf(&g).unwrap(), cfg);
        cfg.rope_scaling = RopeScaling::Linear { factor: 2.0 };
        let bytes = synthetic_gguf(&cfg, GgmlType::Q8_0, 1).unwrap();
        let g = Gguf::parse(&bytes).unwrap();
        assert_eq!(LlamaConfig::from_gguf(&g).unwrap(), cfg);
        assert_eq!(cfg.rope_freq_factors(None), Some(vec![2.0; 8]));
        assert_eq!(
            cfg.rope_freq_factors(Some(vec![1.5; 8])),
            Some(vec![3.0; 8])
        );
        cfg.rope_scaling = RopeScaling::None;
        assert_eq!(cfg.rope_freq_factors(None), None);
        assert_eq!(
            cfg.rope_freq_factors(Some(vec![1.5; 8])),
            Some(vec![1.5; 8])
        );
    }

    #[test]
    fn llama3_rope_factors() {
        // Llama 3.1 8B: theta 500000, head_dim 128, factor 8, low 1, high 4, original 8192.
        let cfg = LlamaConfig {
            head_dim: 128,
            rope_theta: 500_000.0,
            rope_scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_context: 8192.0,
            },
            ..LlamaConfig::tiny()
        };
        let ff = cfg.rope_freq_factors(None).unwrap();
        assert_eq!(ff.len(), 64);
        assert_eq!(ff[0], 1.0); // wavelength 2 pi, far below 8192 / 4
        assert_eq!(ff[28], 1.0);
        assert_eq!(ff[63], 8.0); // wavelength ~2.6e6, above 8192
        assert_eq!(ff[35], 8.0);
        // i = 30: wavelength 2945: smooth = (8192 / 2945 - 1) / 3 = 0.594 -> 1 / (0.406 / 8 + 0.594)
        assert!((ff[30] - 1.550).abs() < 0.01, "{}", ff[30]);
        assert!(ff.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn unsupported_architecture_and_scaling_say_what_is_missing() {
        let cfg = LlamaConfig::tiny();
        let bytes = synthetic_gguf(&cfg, GgmlType::Q8_0, 1).unwrap();
        let g = Gguf::parse(&bytes).unwrap();
        // The file with its architecture renamed to `arch` (keys too) plus `extra` pairs.
        let rewrite = |arch: &str, extra: &[(&str, Value)]| {
            let mut wr = crate::gguf::GgufWriter::new();
            for (k, v) in &g.metadata {
                match k.as_str() {
                    "general.architecture" => wr.kv(k, Value::String(arch.into())),
                    _ => wr.kv(&k.replace("llama.", &format!("{arch}.")), v.clone()),
                };
            }
            for (k, v) in extra {
                wr.kv(k, v.clone());
            }
            for t in &g.tensors {
                wr.tensor(&t.name, &t.dims, t.ty, g.tensor_data(t).to_vec());
            }
            wr.to_bytes()
        };
        let phi = rewrite("phi3", &[]);
        let e = LlamaConfig::from_gguf(&Gguf::parse(&phi).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("phi3") && e.contains("llama.embedding_length"),
            "{e}"
        );
        assert!(
            e.contains("qwen3.block_count") && e.contains("supported: llama"),
            "{e}"
        );
        let yarn = rewrite(
            "llama",
            &[("llama.rope.scaling.type", Value::String("yarn".into()))],
        );
        let e = LlamaConfig::from_gguf(&Gguf::parse(&yarn).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("llama.rope.scaling.type") && e.contains("yarn"),
            "{e}"
        );
        let no_factor = rewrite(
            "llama",
            &[("llama.rope.scaling.type", Value::String("linear".into()))],
        );
        let e = LlamaConfig::from_gguf(&Gguf::parse(&no_factor).unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("llama.rope.scaling.factor is missing"), "{e}");
    }

    #[test]
    fn sha256_check() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.gguf");
        std::fs::write(&p, b"abc").unwrap();
        let good = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        verify_model_sha256(&p, good).unwrap();
        let err = verify_model_sha256(&p, &"0".repeat(64)).unwrap_err();
        assert!(err.to_string().contains("fetch it again"), "{err}");
    }

    #[test]
    fn real_model_config() {
        let Some(path) = crate::test_support::real_model_path() else {
            return;
        };
        let f = ModelFile::open(&path).unwrap();
        let g = f.gguf().unwrap();
        assert_eq!(g.tensors.len(), 272);
        let cfg = LlamaConfig::from_gguf(&g).unwrap();
        assert_eq!(cfg, LlamaConfig::smollm2_135m());
        let w = LlamaWeights::from_gguf(&g).unwrap();
        assert_eq!(w.token_embd.ty, GgmlType::Q8_0);
        assert_eq!(w.layers[0].attn_q.ty, GgmlType::Q4_1);
    }
}
