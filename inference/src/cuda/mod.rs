//! The CUDA backend: our own kernels (CUDA C compiled by NVRTC at start-up for the device's
//! architecture, sm_80 and newer), driven through `cudarc` with dynamic loading, so the crate
//! builds and runs on machines without CUDA and reports clearly when no GPU is present.
//!
//! - [`cuda_available`]: describes GPU 0 or says why there is none (never panics).
//! - [`CudaBackend`]: implements [`crate::Backend`]; [`CudaBackend::generate_greedy_on_device`]
//!   keeps the whole decode loop on the GPU (CUDA-graph replay, argmax on the device).
//! - [`CudaBatchModel`]: the continuous-batching scheduler's model on the GPU (a paged KV
//!   cache, all sequences of a step run through the weights as one batch).
//! - [`checks`]: every kernel compared with a scalar CPU reference (used by the tests in
//!   `tests/cuda.rs` and by the `gpu-check` binary).
//!
//! Module map: [`kernels`] (CUDA C source + launch shapes), [`nvrtc`] (compilation, library
//! lookup), [`prebuilt`] (CUBINs compiled by the image pipeline, used before NVRTC), [`device`] (context, buffers, launches), [`weights`] (repacking to the device
//! layout), [`backend`] (the forward pass), [`checks`] (GPU-vs-CPU checks and references).

pub mod backend;
pub mod batch;
pub mod checks;
pub mod device;
pub mod emu;
pub mod kernels;
pub mod nvrtc;
pub mod prebuilt;
pub mod weights;

pub use backend::{CudaBackend, CudaOptions, DecodeMatvec, DeviceSampler};
pub use batch::{CudaBatchModel, CudaBatchOptions, DecodeGraphs, decode_buckets};
pub use device::{CudaError, DeviceInfo, Gpu, ProfiledLaunch, cuda_available};
