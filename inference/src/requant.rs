//! Re-quantizing a GGUF model into a K-quant mix, for test and benchmark files.
//!
//! [`requantize`] copies every metadata pair and tensor of a model, re-encoding the weight
//! matrices that a mix selects (dequantize to f32, then [`crate::quant::quantize`]). The mixes
//! follow llama.cpp's `Q4_K_M` / `Q5_K_M` choices where the shapes allow: matrices whose rows
//! are whole 256-value super-blocks become Q4_K (Q5_K); `ffn_down` and `attn_v` of the layers
//! llama.cpp gives more bits (the first and last eighth, and every third one between) and the
//! output matrix become Q6_K. Matrices with other row widths (SmolLM2's 576) keep their type,
//! where llama.cpp would fall back to Q5_0/Q5_1/Q8_0. Our quantizer is a plain min/max fit,
//! not llama.cpp's error-minimising search: the files are valid K-quant files (llama.cpp reads
//! them), not byte-identical to `llama-quantize` output.

use crate::error::InferenceError;
use crate::gguf::{GgmlType, Gguf, GgufWriter};
use crate::quant::{QK_K, dequantize_vec, quantize};

/// A K-quant mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KMix {
    /// Q4_K, with Q6_K for the sensitive matrices (llama.cpp `Q4_K_M`).
    Q4KM,
    /// Q5_K, with Q6_K for the sensitive matrices (llama.cpp `Q5_K_M`).
    Q5KM,
}

impl std::str::FromStr for KMix {
    type Err = InferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "q4_k_m" => Ok(KMix::Q4KM),
            "q5_k_m" => Ok(KMix::Q5KM),
            other => Err(InferenceError::InvalidArgument(format!(
                "unknown K-quant mix {other:?}; use q4_k_m or q5_k_m"
            ))),
        }
    }
}

impl KMix {
    /// The file-name tag (`Q4_K_M`).
    pub fn tag(self) -> &'static str {
        match self {
            KMix::Q4KM => "Q4_K_M",
            KMix::Q5KM => "Q5_K_M",
        }
    }

    /// The type tensor `name` (GGUF dims `dims`, now `ty`) gets in a model of `n_layers`.
    pub fn choose(self, name: &str, dims: &[u64], ty: GgmlType, n_layers: usize) -> GgmlType {
        let is_matrix = dims.len() == 2 && name.ends_with(".weight");
        if !is_matrix || !(dims[0] as usize).is_multiple_of(QK_K) || ty.block_size() == 1 {
            return ty;
        }
        let more_bits = |name: &str| {
            let layer = name
                .strip_prefix("blk.")
                .and_then(|r| r.split('.').next())
                .and_then(|i| i.parse::<usize>().ok());
            match layer {
                Some(i) => {
                    let e = n_layers / 8;
                    // The first and last eighth, and every third layer from the first eighth on.
                    i < e || i >= 7 * n_layers / 8 || (i - e) % 3 == 2
                }
                None => false,
            }
        };
        let sensitive = name == "output.weight"
            || ((name.ends_with("ffn_down.weight") || name.ends_with("attn_v.weight"))
                && more_bits(name));
        match (self, sensitive) {
            (_, true) => GgmlType::Q6_K,
            (KMix::Q4KM, false) => GgmlType::Q4_K,
            (KMix::Q5KM, false) => GgmlType::Q5_K,
        }
    }
}

/// Count of re-encoded tensors per type (sorted by type name).
pub type TypeCounts = Vec<(GgmlType, usize)>;

/// Re-encodes `src` with `mix`; returns the new file and [`TypeCounts`].
pub fn requantize(src: &Gguf<'_>, mix: KMix) -> Result<(Vec<u8>, TypeCounts), InferenceError> {
    let arch = src.get_str("general.architecture").unwrap_or("llama");
    let n_layers = src
        .get_u64(&format!("{arch}.block_count"))
        .and_then(|n| usize::try_from(n).ok())
        .unwrap_or(0);
    let mut w = GgufWriter::new();
    for (k, v) in &src.metadata {
        if k == "general.alignment" {
            continue;
        }
        w.kv(k, v.clone());
    }
    w.kv(
        "general.file_type",
        crate::gguf::Value::U32(match mix {
            KMix::Q4KM => 15, // llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_K_M
            KMix::Q5KM => 17, // LLAMA_FTYPE_MOSTLY_Q5_K_M
        }),
    );
    let mut counts: std::collections::BTreeMap<&'static str, (GgmlType, usize)> =
        Default::default();
    for t in &src.tensors {
        let data = src.tensor_data(t);
        let to = mix.choose(&t.name, &t.dims, t.ty, n_layers);
        if to == t.ty {
            w.tensor(&t.name, &t.dims, t.ty, data.to_vec());
            continue;
        }
        let n = usize::try_from(t.n_elements())
            .map_err(|_| InferenceError::Tensor(format!("{} is too large", t.name)))?;
        let x = dequantize_vec(t.ty, data, n)
            .map_err(|e| InferenceError::Tensor(format!("{}: {e}", t.name)))?;
        let q = quantize(to, &x).map_err(|e| InferenceError::Tensor(format!("{}: {e}", t.name)))?;
        w.tensor(&t.name, &t.dims, to, q);
        counts.entry(to.name()).or_insert((to, 0)).1 += 1;
    }
    Ok((w.to_bytes(), counts.into_values().collect()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::Backend;
    use crate::cpu::{CpuBackend, CpuOptions, naive_forward};
    use crate::model::{LlamaConfig, LlamaWeights};
    use crate::synthetic::synthetic_gguf;

    #[test]
    fn mix_choices() {
        let m = KMix::Q4KM;
        let d = [256u64, 64];
        assert_eq!(
            m.choose("blk.3.attn_q.weight", &d, GgmlType::Q8_0, 30),
            GgmlType::Q4_K
        );
        // Layers 0..3 and 27.. get more bits, then every third from 3: 5, 8, ...
        assert_eq!(
            m.choose("blk.0.ffn_down.weight", &d, GgmlType::Q8_0, 30),
            GgmlType::Q6_K
        );
        assert_eq!(
            m.choose("blk.4.ffn_down.weight", &d, GgmlType::Q8_0, 30),
            GgmlType::Q4_K
        );
        assert_eq!(
            m.choose("blk.5.attn_v.weight", &d, GgmlType::Q8_0, 30),
            GgmlType::Q6_K
        );
        assert_eq!(
            m.choose("blk.29.ffn_down.weight", &d, GgmlType::Q8_0, 30),
            GgmlType::Q6_K
        );
        assert_eq!(
            m.choose("output.weight", &d, GgmlType::Q8_0, 30),
            GgmlType::Q6_K
        );
        // Rows that are not whole super-blocks, vectors and float tensors keep their type.
        assert_eq!(
            m.choose("blk.3.attn_q.weight", &[576, 576], GgmlType::Q4_1, 30),
            GgmlType::Q4_1
        );
        assert_eq!(
            m.choose("blk.3.attn_norm.weight", &[256], GgmlType::F32, 30),
            GgmlType::F32
        );
        assert_eq!(
            m.choose("blk.3.attn_q.weight", &d, GgmlType::F32, 30),
            GgmlType::F32
        );
        assert_eq!(
            KMix::Q5KM.choose("blk.3.ffn_up.weight", &d, GgmlType::Q8_0, 30),
            GgmlType::Q5_K
        );
        assert_eq!("Q4_K_M".parse::<KMix>().unwrap(), KMix::Q4KM);
        assert!("q3_k_s".parse::<KMix>().is_err());
    }

    #[test]
    fn requantized_model_runs_close_to_its_source() {
        let cfg = LlamaConfig {
            dim: 256,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 64,
            ffn_dim: 512,
            n_layers: 9,
            ..LlamaConfig::tiny()
        };
        let src = synthetic_gguf(&cfg, GgmlType::Q8_0, 3).unwrap();
        let g = Gguf::parse(&src).unwrap();
        let mut errors = vec![];
        for mix in [KMix::Q4KM, KMix::Q5KM] {
            let (bytes, counts) = requantize(&g, mix).unwrap();
            let k = Gguf::parse(&bytes).unwrap();
            assert_eq!(k.metadata.len(), g.metadata.len() + 1);
            let ty = |n: &str| k.tensor(n).unwrap().ty;
            let base = match mix {
                KMix::Q4KM => GgmlType::Q4_K,
                KMix::Q5KM => GgmlType::Q5_K,
            };
            // 9 layers: more bits for 0 (< 9/8), 7.. (>= 63/8) and 1 + 3k + 2 = 3, 6.
            assert_eq!(ty("blk.0.ffn_down.weight"), GgmlType::Q6_K);
            assert_eq!(ty("blk.3.attn_v.weight"), GgmlType::Q6_K);
            assert_eq!(ty("blk.2.ffn_down.weight"), base);
            assert_eq!(ty("output.weight"), GgmlType::Q6_K);
            assert_eq!(ty("blk.1.attn_output.weight"), base);
            assert!(counts.iter().any(|(t, n)| *t == GgmlType::Q6_K && *n > 0));
            // The CPU backend computes the re-encoded model as the f32 reference does, and the
            // re-encoding costs accuracy like a 4- (5-) bit quantization of random weights.
            let tokens = [5u32, 77, 300, 9, 42];
            let want = naive_forward(&LlamaWeights::from_gguf(&g).unwrap(), &tokens).unwrap();
            let wk = LlamaWeights::from_gguf(&k).unwrap();
            let reference = naive_forward(&wk, &tokens).unwrap();
            let mut b = CpuBackend::new(&wk, &CpuOptions::default()).unwrap();
            let got = b.forward(&tokens, 0).unwrap();
            let rel = |a: &[f32], b: &[f32]| {
                let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
                let den: f32 = b.iter().map(|y| y * y).sum();
                (num / den).sqrt()
            };
            assert!(
                rel(&got, &reference) < 0.03,
                "{mix:?}: backend vs reference"
            );
            let e = rel(&got, &want);
            errors.push(e);
            assert!(e < 0.5, "{mix:?}: relative error {e} against the source");
        }
        assert!(
            errors[1] < errors[0],
            "Q5_K_M ({}) should beat Q4_K_M ({})",
            errors[1],
            errors[0]
        );
    }
}
