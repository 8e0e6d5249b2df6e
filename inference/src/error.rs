//! The crate-wide error type.

use crate::gguf::{GgmlType, GgufError};
use crate::quant::QuantError;

/// Everything that can go wrong while loading a model or running inference.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    /// Reading the model file failed.
    #[error(
        "cannot read model file {path}: {source}; check the path (fetch the model with `cargo xtask model fetch smollm2-135m`)"
    )]
    Io {
        /// File path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Reading part of the model from its source failed (e.g. EIO from dm-verity on a block
    /// that does not match the hash tree).
    #[error("cannot read {what} ({len} bytes at byte {offset} of the model): {source}")]
    Read {
        /// What was being read (the header, a tensor name).
        what: String,
        /// Absolute byte offset in the model file.
        offset: u64,
        /// Bytes asked for.
        len: u64,
        /// Cause (the reader's message names the failing block where it knows it).
        #[source]
        source: std::io::Error,
    },
    /// The GGUF container is malformed.
    #[error(transparent)]
    Gguf(#[from] GgufError),
    /// Quantization problem.
    #[error(transparent)]
    Quant(#[from] QuantError),
    /// The model's sha256 differs from the configured one.
    #[error(
        "model file {path} has sha256 {actual}, expected {expected}; the file is corrupt or a different model: delete it and fetch it again"
    )]
    ChecksumMismatch {
        /// File path.
        path: String,
        /// Expected digest (hex).
        expected: String,
        /// Actual digest (hex).
        actual: String,
    },
    /// Required metadata missing or invalid.
    #[error("model metadata: {0}")]
    Metadata(String),
    /// A required tensor is missing or has the wrong shape/type.
    #[error("model tensor: {0}")]
    Tensor(String),
    /// Tensor type not computable.
    #[error(
        "tensor {name} has type {ty}, which is not supported; use a model quantized as F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K or Q6_K"
    )]
    UnsupportedType {
        /// Tensor name.
        name: String,
        /// Its type.
        ty: GgmlType,
    },
    /// The model architecture is not implemented.
    #[error("model architecture {0} is not supported; supported: llama, qwen2, qwen3")]
    UnsupportedArchitecture(String),
    /// Tokenizer problem.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A request exceeds the context window.
    #[error(
        "context overflow: {needed} tokens needed but the model context holds {max}; shorten the prompt or lower max_tokens"
    )]
    ContextOverflow {
        /// Tokens required.
        needed: usize,
        /// Context size.
        max: usize,
    },
    /// Bad argument from the caller.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A backend (e.g. CUDA) failed or is unavailable.
    #[error("backend {backend}: {message}")]
    Backend {
        /// Backend name.
        backend: String,
        /// What happened.
        message: String,
    },
}
