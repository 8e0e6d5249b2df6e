//! [`CudaBackend`]: the Llama forward pass on the GPU with our NVRTC-compiled kernels.
//!
//! Weights are uploaded once (repacked, see [`super::weights`]); Q|K|V and gate|up are fused
//! into one matrix each when their types agree. Activations, the KV cache (f32,
//! `[max_context][kv_dim]` per layer) and the small control words (input tokens, position,
//! output counter, output tokens) live on the device. All position-dependent kernels read the
//! position from device memory, so the single-token decode step is captured once into a CUDA
//! graph and replayed; [`CudaBackend::generate_greedy_on_device`] then runs prompt prefill and
//! `n` decode steps with argmax on the device and copies the token ids back once at the end.
//!
//! Residual adds are fused into the output and down projections (the mat-vec accumulates into
//! the residual stream).
//!
//! Architectures as [`crate::model`] reads them: `llama`; `qwen2` (q/k/v biases, added inside
//! the single-token qkv product, by `bias_add` in prefill); `qwen3` (per-head RMSNorm of q and
//! k: one `qk_norm` launch after the qkv product and its biases, before RoPE, in the decode
//! graph and in prefill alike). RoPE scaling (a `rope_freqs.weight` tensor and/or the
//! metadata's linear / llama3 scaling) is combined on the host into per-pair frequency
//! divisors by [`LlamaConfig::rope_freq_factors`], the same ones the CPU backend uses, which
//! the rope kernels read. Weight types: F32, F16, BF16, Q8_0, Q4_0, Q4_1 and the K-quants
//! Q4_K, Q5_K, Q6_K, Q8_K, per matrix (a K-quant mix such as Q4_K_M keeps the fused Q|K|V or
//! gate|up only where their types agree; otherwise each part is its own launch into its rows).

use cudarc::driver::CudaGraph;

use super::device::{Arg, CudaError, DevBuf, DeviceInfo, Gpu};
use super::kernels::{
    ATTENTION_THREADS, ELEMENTWISE_THREADS, MATVECQ_BLOCKS_PER_SM, REDUCE_THREADS, RMSNORM_THREADS,
    Shape, act_q8_bytes, attention_shape, check_float_matvec_limit, check_model_limits,
    elementwise_shape, matmul_shape, matvec_shape, matvecq_shape, quantize_act_shape,
    rope_kv_shape,
};
use super::weights::{GpuMatrix, STREAM_CHUNK_BYTES, Streamer, repack, weight_kind};
use crate::backend::{Backend, check_forward_args};
use crate::error::InferenceError;
use crate::model::{LlamaConfig, LlamaWeights, RopeStyle, TensorRef};
use crate::stream::ReadAt;

/// Where the weights come from: the tensors' own bytes (a mapped file; each matrix is repacked
/// in host memory, then uploaded), or a reader streamed through a bounded staging buffer.
enum Source<'s> {
    Mapped,
    Streamed(Streamer<'s>),
}

impl Source<'_> {
    fn matrix(&mut self, gpu: &Gpu, parts: &[&TensorRef<'_>]) -> Result<GpuMatrix, InferenceError> {
        match self {
            Source::Mapped => Ok(GpuMatrix::upload(gpu, &repack(parts)?)?),
            Source::Streamed(s) => s.matrix(gpu, parts),
        }
    }

    fn floats(&self, t: &TensorRef<'_>) -> Result<Vec<f32>, InferenceError> {
        match self {
            Source::Mapped => t.to_f32(),
            Source::Streamed(s) => s.floats(t),
        }
    }
}

/// Options of the CUDA backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaOptions {
    /// GPU ordinal.
    pub ordinal: usize,
    /// KV-cache length; `None` = min(model context, 4096).
    pub max_context: Option<usize>,
    /// Largest number of tokens one prefill launch processes (longer prompts are chunked).
    pub max_batch: usize,
    /// Replay the decode step as a CUDA graph.
    pub use_graphs: bool,
    /// Single-token mat-vec kernels for quantized weights.
    pub decode_matvec: DecodeMatvec,
    /// Most `matvecq` blocks per multiprocessor (warps stride over all rows, so this trades
    /// redundant activation staging against latency hiding).
    pub matvec_blocks_per_sm: u32,
}

/// Which kernel multiplies quantized weights by the single decode activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeMatvec {
    /// `quantize_act` (the activation, with the RMSNorm or SiLU gating before it, quantized
    /// once to int8 per 32 elements) then `matvecq_<type>`: dp4a integer dot products, two
    /// rows per warp, long rows split over several warps, the FFN's SiLU gating fused into the
    /// gate|up product and greedy argmax into the output projection (the default).
    Int8,
    /// `matvec_<type>`: weights dequantized to f32 and multiplied with an f32 activation (the
    /// first implementation; kept as the comparison baseline and for float weights).
    Float,
}

impl DecodeMatvec {
    /// Name used in options and reports.
    pub fn name(self) -> &'static str {
        match self {
            DecodeMatvec::Int8 => "int8",
            DecodeMatvec::Float => "float",
        }
    }
}

impl Default for CudaOptions {
    fn default() -> Self {
        CudaOptions {
            ordinal: 0,
            max_context: None,
            max_batch: 256,
            use_graphs: true,
            decode_matvec: DecodeMatvec::Int8,
            matvec_blocks_per_sm: MATVECQ_BLOCKS_PER_SM,
        }
    }
}

/// How the next token is chosen on the device.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DeviceSampler {
    /// Argmax.
    Greedy,
    /// Temperature + nucleus sampling with a seed (deterministic for a given seed).
    TopP {
        /// Softmax temperature (> 0).
        temperature: f32,
        /// Nucleus mass in (0, 1].
        top_p: f32,
        /// Random seed.
        seed: u32,
    },
}

/// A linear layer: one or more matrices writing at row offsets of the same output.
#[derive(Debug)]
pub(super) struct Linear {
    pub(super) parts: Vec<(GpuMatrix, usize)>,
    pub(super) out_width: usize,
}

impl Linear {
    fn load(
        gpu: &Gpu,
        tensors: &[&TensorRef<'_>],
        src: &mut Source<'_>,
    ) -> Result<Self, InferenceError> {
        let same = tensors
            .windows(2)
            .all(|w| w[0].ty == w[1].ty && w[0].cols() == w[1].cols());
        let mut parts = Vec::new();
        let mut off = 0;
        if same {
            let m = src.matrix(gpu, tensors)?;
            let rows = m.rows;
            parts.push((m, 0));
            off = rows;
        } else {
            for t in tensors {
                let m = src.matrix(gpu, &[*t])?;
                let rows = m.rows;
                parts.push((m, off));
                off += rows;
            }
        }
        Ok(Linear {
            parts,
            out_width: off,
        })
    }

    fn bytes(&self) -> usize {
        self.parts.iter().map(|(m, _)| m.bytes()).sum()
    }
}

/// One layer's weights and its single-sequence KV cache (the fields are shared with
/// [`super::batch`], which runs the same weights over a paged cache).
#[derive(Debug)]
pub(super) struct Layer {
    pub(super) attn_norm: DevBuf,
    pub(super) ffn_norm: DevBuf,
    pub(super) qkv: Linear,
    pub(super) qkv_bias: Option<DevBuf>,
    /// Per-head RMSNorm weights of q and k (qwen3), `head_dim` floats each.
    pub(super) q_norm: Option<DevBuf>,
    pub(super) k_norm: Option<DevBuf>,
    pub(super) wo: Linear,
    pub(super) gate_up: Linear,
    pub(super) down: Linear,
    kc: DevBuf,
    vc: DevBuf,
}

/// The Llama model resident on one GPU.
pub struct CudaBackend {
    pub(super) gpu: Gpu,
    pub(super) cfg: LlamaConfig,
    max_ctx: usize,
    max_t: usize,
    use_graphs: bool,
    decode_matvec: DecodeMatvec,
    matvec_blocks_per_sm: u32,
    pub(super) embed: GpuMatrix,
    output: Option<GpuMatrix>,
    pub(super) out_norm: DevBuf,
    pub(super) rope_ff: Option<DevBuf>,
    pub(super) layers: Vec<Layer>,
    x: DevBuf,
    xn: DevBuf,
    qkv: DevBuf,
    att: DevBuf,
    gu: DevBuf,
    act: DevBuf,
    xq: DevBuf,
    best: DevBuf,
    logits: DevBuf,
    probs: DevBuf,
    tokens: DevBuf,
    pos: DevBuf,
    counter: DevBuf,
    out_tokens: DevBuf,
    out_cap: usize,
    graph_logits: Option<SendGraph>,
    graph_greedy: Option<SendGraph>,
    graph_error: Option<String>,
}

/// A captured decode graph.
pub(super) struct SendGraph(pub(super) CudaGraph);

// SAFETY: a CUDA graph exec may be launched from any thread as long as calls on it are
// serialized; it is only reachable through `&mut CudaBackend` / `&CudaBackend` of a backend that
// is `Send` but not `Sync`, so no two threads touch it at once, and `CudaGraph::launch` binds the
// context to the calling thread first.
unsafe impl Send for SendGraph {}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend")
            .field("gpu", &self.gpu)
            .field("max_context", &self.max_ctx)
            .finish()
    }
}

fn norm_vec(
    gpu: &Gpu,
    t: &TensorRef<'_>,
    n: usize,
    src: &Source<'_>,
) -> Result<DevBuf, InferenceError> {
    let v = src.floats(t)?;
    if v.len() != n {
        return Err(InferenceError::Tensor(format!(
            "{} has {} elements, expected {n}",
            t.name,
            v.len()
        )));
    }
    Ok(gpu.upload_f32(&v)?)
}

impl CudaBackend {
    /// Uploads `weights` to GPU `opts.ordinal` and compiles the kernels. `cfg` must be
    /// `weights.config` (it is passed separately for symmetry with the CPU backend).
    pub fn load(
        weights: &LlamaWeights<'_>,
        cfg: &LlamaConfig,
        opts: &CudaOptions,
    ) -> Result<Self, InferenceError> {
        if *cfg != weights.config {
            return Err(InferenceError::InvalidArgument(
                "CudaBackend::load: cfg differs from weights.config".into(),
            ));
        }
        let gpu = Gpu::new(opts.ordinal)?;
        Self::load_on(gpu, weights, opts)
    }

    /// Like [`CudaBackend::load`] on an already opened [`Gpu`].
    pub fn load_on(
        gpu: Gpu,
        weights: &LlamaWeights<'_>,
        opts: &CudaOptions,
    ) -> Result<Self, InferenceError> {
        Self::load_from(gpu, weights, opts, Source::Mapped)
    }

    /// Like [`CudaBackend::load_on`] for weights described from the GGUF header alone
    /// ([`crate::stream`]): every matrix is streamed from `src` into device memory in chunks of
    /// `chunk_bytes` ([`STREAM_CHUNK_BYTES`] by default) through one page-locked staging
    /// buffer, so host memory for the weights stays at two chunks whatever the model size
    /// (plus the small norm and bias vectors, read whole). Reads and copies overlap: a chunk is
    /// read from `src` while the previous one is copied to the device.
    pub fn load_streamed(
        gpu: Gpu,
        weights: &LlamaWeights<'_>,
        src: &dyn ReadAt,
        opts: &CudaOptions,
        chunk_bytes: Option<usize>,
    ) -> Result<Self, InferenceError> {
        let streamer = Streamer::new(&gpu, src, chunk_bytes.unwrap_or(STREAM_CHUNK_BYTES))?;
        Self::load_from(gpu, weights, opts, Source::Streamed(streamer))
    }

    fn load_from(
        gpu: Gpu,
        weights: &LlamaWeights<'_>,
        opts: &CudaOptions,
        mut src: Source<'_>,
    ) -> Result<Self, InferenceError> {
        let cfg = weights.config.clone();
        let gpu_supports_graphs = gpu.supports_graphs();
        let max_ctx = opts.max_context.unwrap_or(cfg.context_len.min(4096)).max(1);
        let max_t = opts.max_batch.clamp(1, max_ctx);
        if cfg.n_heads == 0 || cfg.n_kv_heads == 0 || !cfg.n_heads.is_multiple_of(cfg.n_kv_heads) {
            return Err(InferenceError::Metadata(format!(
                "n_heads {} must be a positive multiple of n_kv_heads {}",
                cfg.n_heads, cfg.n_kv_heads
            )));
        }
        check_model_limits(
            &[
                ("dim", cfg.dim),
                ("ffn_dim", cfg.ffn_dim),
                ("q_dim", cfg.q_dim()),
            ],
            cfg.head_dim,
            max_ctx,
        )
        .map_err(CudaError::Invalid)?;
        for t in [&weights.token_embd, &weights.output] {
            if weight_kind(t.ty).is_none() {
                return Err(InferenceError::UnsupportedType {
                    name: t.name.clone(),
                    ty: t.ty,
                });
            }
        }
        let embed = src.matrix(&gpu, &[&weights.token_embd])?;
        let tied = cfg.tied_embeddings || weights.output.name == weights.token_embd.name;
        let output = if tied {
            None
        } else {
            Some(src.matrix(&gpu, &[&weights.output])?)
        };
        let out_norm = norm_vec(&gpu, &weights.output_norm, cfg.dim, &src)?;
        // The rope_freqs tensor and/or the metadata rope scaling, combined on the host.
        let ff_tensor = match &weights.rope_freqs {
            Some(t) => {
                let v = src.floats(t)?;
                if v.len() != cfg.head_dim / 2 {
                    return Err(InferenceError::Tensor(format!(
                        "{} has {} elements, expected {}",
                        t.name,
                        v.len(),
                        cfg.head_dim / 2
                    )));
                }
                Some(v)
            }
            None => None,
        };
        let rope_ff = match cfg.rope_freq_factors(ff_tensor) {
            Some(v) => Some(gpu.upload_f32(&v)?),
            None => None,
        };
        let kvdim = cfg.kv_dim();
        let qkv_w = cfg.q_dim() + 2 * kvdim;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for (i, l) in weights.layers.iter().enumerate() {
            let qkv = Linear::load(&gpu, &[&l.attn_q, &l.attn_k, &l.attn_v], &mut src)?;
            let gate_up = Linear::load(&gpu, &[&l.ffn_gate, &l.ffn_up], &mut src)?;
            let wo = Linear::load(&gpu, &[&l.attn_output], &mut src)?;
            let down = Linear::load(&gpu, &[&l.ffn_down], &mut src)?;
            if qkv.out_width != qkv_w || gate_up.out_width != 2 * cfg.ffn_dim {
                return Err(InferenceError::Tensor(format!(
                    "layer {i}: projection shapes do not match the config"
                )));
            }
            let qkv_bias = match (&l.attn_q_bias, &l.attn_k_bias, &l.attn_v_bias) {
                (None, None, None) => None,
                (q, k, v) => {
                    let mut b = Vec::with_capacity(qkv_w);
                    for (t, n) in [(q, cfg.q_dim()), (k, kvdim), (v, kvdim)] {
                        match t {
                            Some(t) => {
                                let x = src.floats(t)?;
                                if x.len() != n {
                                    return Err(InferenceError::Tensor(format!(
                                        "{} has {} elements, expected {n}",
                                        t.name,
                                        x.len()
                                    )));
                                }
                                b.extend(x);
                            }
                            None => b.extend(std::iter::repeat_n(0.0, n)),
                        }
                    }
                    Some(gpu.upload_f32(&b)?)
                }
            };
            let head_norm = |t: &Option<TensorRef<'_>>| {
                t.as_ref()
                    .map(|t| norm_vec(&gpu, t, cfg.head_dim, &src))
                    .transpose()
            };
            layers.push(Layer {
                attn_norm: norm_vec(&gpu, &l.attn_norm, cfg.dim, &src)?,
                ffn_norm: norm_vec(&gpu, &l.ffn_norm, cfg.dim, &src)?,
                qkv,
                qkv_bias,
                q_norm: head_norm(&l.attn_q_norm)?,
                k_norm: head_norm(&l.attn_k_norm)?,
                wo,
                gate_up,
                down,
                kc: gpu.alloc(max_ctx * kvdim * 4)?,
                vc: gpu.alloc(max_ctx * kvdim * 4)?,
            });
        }
        // The float mat-vec stages an f32 activation in shared memory: float weights (and
        // quantized ones when the float path is chosen) must fit it.
        let float_ok = |name: &str, m: &GpuMatrix| -> Result<(), CudaError> {
            if !m.kind.is_quantized() {
                check_float_matvec_limit(name, m.k).map_err(CudaError::Invalid)?;
            }
            Ok(())
        };
        float_ok("token_embd (output projection)", &embed)?;
        if let Some(o) = &output {
            float_ok("output", o)?;
        }
        for (i, l) in layers.iter().enumerate() {
            for (what, lin) in [
                ("attn_qkv", &l.qkv),
                ("attn_output", &l.wo),
                ("ffn_gate_up", &l.gate_up),
                ("ffn_down", &l.down),
            ] {
                for (m, _) in &lin.parts {
                    float_ok(&format!("blk.{i}.{what}"), m)?;
                }
            }
        }
        let out_cap = max_ctx + 1;
        let be = CudaBackend {
            x: gpu.alloc(max_t * cfg.dim * 4)?,
            xn: gpu.alloc(max_t * cfg.dim * 4)?,
            qkv: gpu.alloc(max_t * qkv_w * 4)?,
            att: gpu.alloc(max_t * cfg.q_dim() * 4)?,
            gu: gpu.alloc(max_t * 2 * cfg.ffn_dim * 4)?,
            act: gpu.alloc(max_t * cfg.ffn_dim * 4)?,
            xq: gpu.alloc(act_q8_bytes(cfg.dim.max(cfg.q_dim()).max(cfg.ffn_dim)))?,
            best: gpu.alloc(16)?,
            logits: gpu.alloc(cfg.vocab * 4)?,
            probs: gpu.alloc(cfg.vocab * 4)?,
            tokens: gpu.alloc(max_t * 4)?,
            pos: gpu.alloc(16)?,
            counter: gpu.alloc(16)?,
            out_tokens: gpu.alloc(out_cap * 4)?,
            out_cap,
            gpu,
            cfg,
            max_ctx,
            max_t,
            use_graphs: opts.use_graphs && gpu_supports_graphs,
            decode_matvec: opts.decode_matvec,
            matvec_blocks_per_sm: opts.matvec_blocks_per_sm.max(1),
            embed,
            output,
            out_norm,
            rope_ff,
            layers,
            graph_logits: None,
            graph_greedy: None,
            graph_error: None,
        };
        be.gpu.sync()?;
        Ok(be)
    }

    /// The GPU this backend runs on.
    pub fn device(&self) -> &DeviceInfo {
        &self.gpu.info
    }

    /// The opened GPU (for kernel checks and benchmarks).
    pub fn gpu(&self) -> &Gpu {
        &self.gpu
    }

    /// The model configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Bytes of this backend's single-sequence KV cache (all layers, K and V).
    pub fn kv_cache_bytes(&self) -> usize {
        self.layers.iter().map(|l| l.kc.len + l.vc.len).sum()
    }

    /// Frees the single-sequence KV cache, for [`super::batch::CudaBatchModel`], which keeps its
    /// own paged pools (on an 8B model at 8k context this cache is 2 GiB of GPU memory the
    /// batch would never touch). Afterwards this backend's own forward passes refuse to run
    /// (its context is 0) and no decode graph refers to the old buffers.
    pub(super) fn release_kv_cache(&mut self) -> Result<(), CudaError> {
        self.graph_greedy = None;
        self.graph_logits = None;
        for l in &mut self.layers {
            l.kc = self.gpu.alloc(0)?;
            l.vc = self.gpu.alloc(0)?;
        }
        self.max_ctx = 0;
        Ok(())
    }

    /// Turns CUDA-graph replay of the decode step on or off.
    pub fn set_use_graphs(&mut self, on: bool) {
        self.use_graphs = on && self.gpu.supports_graphs();
    }

    /// Chooses the decode mat-vec kernels (re-captures the decode graph on next use).
    pub fn set_decode_matvec(&mut self, kind: DecodeMatvec, blocks_per_sm: u32) {
        if kind != self.decode_matvec || blocks_per_sm.max(1) != self.matvec_blocks_per_sm {
            self.graph_greedy = None;
            self.graph_logits = None;
        }
        self.decode_matvec = kind;
        self.matvec_blocks_per_sm = blocks_per_sm.max(1);
    }

    /// The decode mat-vec kernels in use and their blocks per multiprocessor.
    pub fn decode_matvec(&self) -> (DecodeMatvec, u32) {
        (self.decode_matvec, self.matvec_blocks_per_sm)
    }

    /// Bytes of weights one decode step reads (all matrices, the output projection once, norms).
    pub fn weight_bytes_per_token(&self) -> usize {
        let mut b = self.output().bytes() + self.cfg.dim * 4;
        for l in &self.layers {
            b += l.qkv.bytes() + l.wo.bytes() + l.gate_up.bytes() + l.down.bytes();
            b += 2 * self.cfg.dim * 4;
        }
        b
    }

    /// The output projection (the embedding matrix when tied).
    pub(super) fn output(&self) -> &GpuMatrix {
        self.output.as_ref().unwrap_or(&self.embed)
    }

    fn write_i32(&mut self, which: Ctl, v: i32) -> Result<(), CudaError> {
        let buf = match which {
            Ctl::Pos => &mut self.pos,
            Ctl::Counter => &mut self.counter,
        };
        self.gpu.write(buf, 0, &v.to_le_bytes())
    }

    fn write_tokens(&mut self, tokens: &[u32]) -> Result<(), CudaError> {
        let b: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
        self.gpu.write(&mut self.tokens, 0, &b)
    }

    /// Whether the single-token product with `m` uses `matvecq` (int8 activations).
    fn use_matvecq(&self, m: &GpuMatrix) -> bool {
        m.kind.is_quantized()
            && (self.decode_matvec == DecodeMatvec::Int8
                || check_float_matvec_limit("", m.k).is_err())
    }

    /// Queues one single-token mat-vec: `epi` 0 stores, 1 accumulates, 2 = SiLU-gated
    /// gate|up pair (int8 path only, see `matvecq_impl`).
    #[allow(clippy::too_many_arguments)]
    fn matvec1(
        &self,
        m: &GpuMatrix,
        x: u64,
        y: u64,
        epi: i32,
        pre: Pre,
        bias: u64,
    ) -> Result<(), CudaError> {
        let (qs, d, mm) = m.ptrs();
        let (mode, pw) = match pre {
            Pre::None | Pre::Quantized => (0, 0),
            Pre::Norm(w) => (1, w),
            Pre::Silu => (2, 0),
        };
        let q = self.use_matvecq(m);
        if pre == Pre::Quantized && !q {
            return Err(CudaError::Invalid(
                "internal: a pre-quantized activation needs the int8 mat-vec".into(),
            ));
        }
        if epi >= 2 && !q {
            return Err(CudaError::Invalid(
                "internal: the fused SiLU pair / argmax need the int8 mat-vec".into(),
            ));
        }
        if !q {
            self.gpu.note(|| (format!("{}x{}", m.rows, m.k), m.bytes()));
            return self.gpu.launch(
                &format!("matvec_{}", m.kind.suffix()),
                matvec_shape(m.rows, m.k),
                &[
                    Arg::Ptr(qs),
                    Arg::Ptr(d),
                    Arg::Ptr(mm),
                    Arg::Ptr(x),
                    Arg::Ptr(y),
                    Arg::I32(m.rows as i32),
                    Arg::I32(m.k as i32),
                    Arg::I32(epi),
                    Arg::I32(mode),
                    Arg::Ptr(pw),
                    Arg::F32(self.cfg.rms_eps),
                    Arg::Ptr(bias),
                ],
            );
        }
        if pre != Pre::Quantized {
            self.gpu.launch(
                "quantize_act",
                quantize_act_shape(m.k),
                &[
                    Arg::Ptr(x),
                    Arg::Ptr(self.xq.ptr),
                    Arg::I32(m.k as i32),
                    Arg::I32(mode),
                    Arg::Ptr(pw),
                    Arg::F32(self.cfg.rms_eps),
                ],
            )?;
        }
        let (shape, ks) = matvecq_shape(
            m.rows,
            m.k,
            epi == 2,
            self.gpu.info.sm_count.max(1) as u32,
            self.matvec_blocks_per_sm,
        );
        self.gpu.note(|| {
            (
                format!(
                    "{}x{}{}",
                    m.rows,
                    m.k,
                    match epi {
                        2 => " silu-pair",
                        3 => " +argmax",
                        _ => "",
                    }
                ),
                m.bytes(),
            )
        });
        self.gpu.launch(
            &format!("matvecq_{}", m.kind.suffix()),
            shape,
            &[
                Arg::Ptr(qs),
                Arg::Ptr(d),
                Arg::Ptr(mm),
                Arg::Ptr(self.xq.ptr),
                Arg::Ptr(y),
                Arg::I32(m.rows as i32),
                Arg::I32(m.k as i32),
                Arg::I32(epi),
                Arg::I32(ks as i32),
                Arg::Ptr(bias),
                Arg::Ptr(self.best.ptr),
            ],
        )
    }

    /// Queues `y (= or +=) W v (+ bias)` for `t` tokens (`x` rows of `k`, `y` rows of `ldy`).
    /// For one token `v` is prepared inside the mat-vec as `pre` says and the bias is added
    /// there; for several tokens `pre` must be [`Pre::None`] and `bias` 0 (the caller runs the
    /// separate rmsnorm/silu/bias kernels).
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &self,
        lin: &Linear,
        x: u64,
        y: u64,
        t: usize,
        ldy: usize,
        acc: bool,
        pre: Pre,
        bias: u64,
    ) -> Result<(), CudaError> {
        for (m, off) in &lin.parts {
            let yo = y + 4 * *off as u64;
            if t == 1 {
                let b = if bias == 0 { 0 } else { bias + 4 * *off as u64 };
                self.matvec1(m, x, yo, acc as i32, pre, b)?;
            } else {
                if pre != Pre::None || bias != 0 {
                    return Err(CudaError::Invalid(
                        "internal: fused pre-processing requested for a batched mat-mul".into(),
                    ));
                }
                self.launch_matmul(m, x, yo, t, ldy, acc)?;
            }
        }
        Ok(())
    }

    /// Qwen3's per-head RMSNorm of the q and k heads of `t` rows of `self.qkv` (after the
    /// projections and biases, before RoPE); nothing for layers without those norms.
    fn qk_norm(&self, l: &Layer, t: usize, qkv_w: usize) -> Result<(), CudaError> {
        self.qk_norm_at(l, self.qkv.ptr, t, qkv_w)
    }

    /// [`Self::qk_norm`] over `t` rows of width `qkv_w` at `qkv` (also the batched path's).
    pub(super) fn qk_norm_at(
        &self,
        l: &Layer,
        qkv: u64,
        t: usize,
        qkv_w: usize,
    ) -> Result<(), CudaError> {
        if l.q_norm.is_none() && l.k_norm.is_none() {
            return Ok(());
        }
        let c = &self.cfg;
        self.gpu.launch(
            "qk_norm",
            Shape {
                grid: ((c.n_heads + c.n_kv_heads) as u32, t as u32, 1),
                block: (32, 1, 1),
                smem: 0,
            },
            &[
                Arg::Ptr(qkv),
                Arg::Ptr(l.q_norm.as_ref().map_or(0, |b| b.ptr)),
                Arg::Ptr(l.k_norm.as_ref().map_or(0, |b| b.ptr)),
                Arg::I32(c.n_heads as i32),
                Arg::I32(c.head_dim as i32),
                Arg::I32(qkv_w as i32),
                Arg::F32(c.rms_eps),
            ],
        )
    }

    /// Queues the f32 multi-token product `y (= or +=) W x` of one matrix for `t` rows (`x` rows
    /// of `m.k`, `y` rows of `ldy`); shared with the batched model.
    pub(super) fn launch_matmul(
        &self,
        m: &GpuMatrix,
        x: u64,
        y: u64,
        t: usize,
        ldy: usize,
        acc: bool,
    ) -> Result<(), CudaError> {
        let (qs, d, mm) = m.ptrs();
        self.gpu.launch(
            &format!("matmul_{}", m.kind.suffix()),
            matmul_shape(m.rows, t),
            &[
                Arg::Ptr(qs),
                Arg::Ptr(d),
                Arg::Ptr(mm),
                Arg::Ptr(x),
                Arg::Ptr(y),
                Arg::I32(m.rows as i32),
                Arg::I32(m.k as i32),
                Arg::I32(t as i32),
                Arg::I32(ldy as i32),
                Arg::I32(acc as i32),
            ],
        )
    }

    pub(super) fn rmsnorm(&self, x: u64, w: u64, out: u64, t: usize) -> Result<(), CudaError> {
        self.gpu.launch(
            "rmsnorm",
            Shape {
                grid: (t as u32, 1, 1),
                block: (RMSNORM_THREADS, 1, 1),
                smem: 0,
            },
            &[
                Arg::Ptr(x),
                Arg::Ptr(w),
                Arg::Ptr(out),
                Arg::I32(self.cfg.dim as i32),
                Arg::F32(self.cfg.rms_eps),
            ],
        )
    }

    /// Queues the forward pass of the `t` tokens in `self.tokens` at positions `pos[0]..`,
    /// leaving the last token's logits in `self.logits`.
    ///
    /// One token (decode) uses 6 launches per layer: qkv mat-vec with the RMSNorm (and bias)
    /// fused in, rope + cache store, attention, output projection accumulating into the
    /// residual, gate|up mat-vec with the RMSNorm fused in, down projection with the SiLU
    /// gating fused in, accumulating into the residual. Several tokens (prefill) use the
    /// batched mat-mul with separate rmsnorm / bias / rope / kv_store / silu kernels.
    fn enqueue_forward(&self, t: usize) -> Result<(), CudaError> {
        self.enqueue_forward_ex(t, false)
    }

    /// Whether greedy decode folds the argmax into the output projection (`matvecq` epi 3 +
    /// `argmax_finish`) instead of a separate single-block `argmax_step` over the logits.
    fn fused_argmax(&self) -> bool {
        self.use_matvecq(self.output())
    }

    /// One decode step (forward of the token in `tokens[0]` at `pos[0]`) and the pick.
    fn enqueue_step(&self, sampler: DeviceSampler) -> Result<(), CudaError> {
        if sampler == DeviceSampler::Greedy && self.fused_argmax() {
            self.enqueue_forward_ex(1, true)?;
            self.gpu.launch(
                "argmax_finish",
                Shape {
                    grid: (1, 1, 1),
                    block: (32, 1, 1),
                    smem: 0,
                },
                &[
                    Arg::Ptr(self.best.ptr),
                    Arg::Ptr(self.tokens.ptr),
                    Arg::Ptr(self.out_tokens.ptr),
                    Arg::Ptr(self.counter.ptr),
                    Arg::I32(self.out_cap as i32),
                    Arg::Ptr(self.pos.ptr),
                ],
            )
        } else {
            self.enqueue_forward(1)?;
            self.enqueue_pick(sampler)
        }
    }

    /// [`Self::enqueue_forward`]; with `fused_argmax` (one token, int8 output projection) the
    /// output projection also folds the greedy argmax into `best` for `argmax_finish`.
    fn enqueue_forward_ex(&self, t: usize, fused_argmax: bool) -> Result<(), CudaError> {
        let c = &self.cfg;
        let g = &self.gpu;
        let dim = c.dim;
        let kvdim = c.kv_dim();
        let qdim = c.q_dim();
        let qkv_w = qdim + 2 * kvdim;
        let (eq, ed, em) = self.embed.ptrs();
        g.launch(
            &format!("embed_{}", self.embed.kind.suffix()),
            Shape {
                grid: (t as u32, 1, 1),
                block: (128, 1, 1),
                smem: 0,
            },
            &[
                Arg::Ptr(eq),
                Arg::Ptr(ed),
                Arg::Ptr(em),
                Arg::Ptr(self.tokens.ptr),
                Arg::Ptr(self.x.ptr),
                Arg::I32(dim as i32),
                Arg::I32(self.embed.rows as i32),
            ],
        )?;
        let row_shape = Shape {
            grid: (t as u32, 1, 1),
            block: (ELEMENTWISE_THREADS, 1, 1),
            smem: 0,
        };
        let neox = matches!(c.rope_style, RopeStyle::Neox) as i32;
        let ff = self.rope_ff.as_ref().map_or(0, |b| b.ptr);
        let scale = 1.0f32 / (c.head_dim as f32).sqrt();
        let decode = t == 1;
        for l in &self.layers {
            let bias = l.qkv_bias.as_ref().map_or(0, |b| b.ptr);
            if decode {
                self.linear(
                    &l.qkv,
                    self.x.ptr,
                    self.qkv.ptr,
                    1,
                    qkv_w,
                    false,
                    Pre::Norm(l.attn_norm.ptr),
                    bias,
                )?;
                self.qk_norm(l, 1, qkv_w)?;
                g.launch(
                    "rope_kv",
                    rope_kv_shape(c.n_heads, c.n_kv_heads, c.head_dim, 1),
                    &[
                        Arg::Ptr(self.qkv.ptr),
                        Arg::Ptr(l.kc.ptr),
                        Arg::Ptr(l.vc.ptr),
                        Arg::Ptr(self.pos.ptr),
                        Arg::I32(c.n_heads as i32),
                        Arg::I32(c.n_kv_heads as i32),
                        Arg::I32(c.head_dim as i32),
                        Arg::F32(c.rope_theta),
                        Arg::I32(neox),
                        Arg::Ptr(ff),
                        Arg::I32(self.max_ctx as i32),
                    ],
                )?;
            } else {
                self.rmsnorm(self.x.ptr, l.attn_norm.ptr, self.xn.ptr, t)?;
                self.linear(
                    &l.qkv,
                    self.xn.ptr,
                    self.qkv.ptr,
                    t,
                    qkv_w,
                    false,
                    Pre::None,
                    0,
                )?;
                if bias != 0 {
                    g.launch(
                        "bias_add",
                        elementwise_shape(qkv_w * t),
                        &[
                            Arg::Ptr(self.qkv.ptr),
                            Arg::Ptr(bias),
                            Arg::I32(qkv_w as i32),
                            Arg::I32(t as i32),
                        ],
                    )?;
                }
                self.qk_norm(l, t, qkv_w)?;
                g.launch(
                    "rope",
                    row_shape,
                    &[
                        Arg::Ptr(self.qkv.ptr),
                        Arg::Ptr(self.pos.ptr),
                        Arg::I32((c.n_heads + c.n_kv_heads) as i32),
                        Arg::I32(c.head_dim as i32),
                        Arg::I32(qkv_w as i32),
                        Arg::F32(c.rope_theta),
                        Arg::I32(neox),
                        Arg::Ptr(ff),
                    ],
                )?;
                g.launch(
                    "kv_store",
                    row_shape,
                    &[
                        Arg::Ptr(self.qkv.ptr),
                        Arg::Ptr(l.kc.ptr),
                        Arg::Ptr(l.vc.ptr),
                        Arg::Ptr(self.pos.ptr),
                        Arg::I32(qdim as i32),
                        Arg::I32(kvdim as i32),
                        Arg::I32(self.max_ctx as i32),
                    ],
                )?;
            }
            // One token into an int8 output projection: attention also quantizes its output.
            // (Whole 32-element blocks per head: head_dim a multiple of 32.)
            let att_q = decode
                && c.head_dim.is_multiple_of(32)
                && matches!(l.wo.parts.as_slice(), [(m, 0)] if self.use_matvecq(m));
            g.launch(
                "attention",
                attention_shape(c.n_heads, t, c.head_dim, self.max_ctx),
                &[
                    Arg::Ptr(self.qkv.ptr),
                    Arg::Ptr(l.kc.ptr),
                    Arg::Ptr(l.vc.ptr),
                    Arg::Ptr(self.att.ptr),
                    Arg::Ptr(self.pos.ptr),
                    Arg::I32(c.n_heads as i32),
                    Arg::I32(c.n_kv_heads as i32),
                    Arg::I32(c.head_dim as i32),
                    Arg::I32(self.max_ctx as i32),
                    Arg::F32(scale),
                    Arg::Ptr(if att_q { self.xq.ptr } else { 0 }),
                ],
            )?;
            if att_q {
                self.matvec1(
                    &l.wo.parts[0].0,
                    self.att.ptr,
                    self.x.ptr,
                    1,
                    Pre::Quantized,
                    0,
                )?;
            } else {
                self.linear(&l.wo, self.att.ptr, self.x.ptr, t, dim, true, Pre::None, 0)?;
            }
            // gate|up, then the SiLU gating (fused into the gate|up product for one token on the
            // int8 path, into the down projection on the float path), then down into x.
            let (down_in, down_pre) = if decode {
                match l.gate_up.parts.as_slice() {
                    [(m, 0)] if self.use_matvecq(m) => {
                        self.matvec1(m, self.x.ptr, self.act.ptr, 2, Pre::Norm(l.ffn_norm.ptr), 0)?;
                        (self.act.ptr, Pre::None)
                    }
                    _ => {
                        self.linear(
                            &l.gate_up,
                            self.x.ptr,
                            self.gu.ptr,
                            1,
                            2 * c.ffn_dim,
                            false,
                            Pre::Norm(l.ffn_norm.ptr),
                            0,
                        )?;
                        (self.gu.ptr, Pre::Silu)
                    }
                }
            } else {
                self.rmsnorm(self.x.ptr, l.ffn_norm.ptr, self.xn.ptr, t)?;
                self.linear(
                    &l.gate_up,
                    self.xn.ptr,
                    self.gu.ptr,
                    t,
                    2 * c.ffn_dim,
                    false,
                    Pre::None,
                    0,
                )?;
                g.launch(
                    "silu_mul",
                    elementwise_shape(c.ffn_dim * t),
                    &[
                        Arg::Ptr(self.gu.ptr),
                        Arg::Ptr(self.act.ptr),
                        Arg::I32(c.ffn_dim as i32),
                        Arg::I32(t as i32),
                    ],
                )?;
                (self.act.ptr, Pre::None)
            };
            self.linear(&l.down, down_in, self.x.ptr, t, dim, true, down_pre, 0)?;
        }
        // Final norm fused into the output projection, on the last token only.
        self.matvec1(
            self.output(),
            self.x.f32_at((t - 1) * dim),
            self.logits.ptr,
            if fused_argmax && t == 1 { 3 } else { 0 },
            Pre::Norm(self.out_norm.ptr),
            0,
        )?;
        Ok(())
    }

    fn enqueue_pick(&self, sampler: DeviceSampler) -> Result<(), CudaError> {
        let shape = Shape {
            grid: (1, 1, 1),
            block: (REDUCE_THREADS, 1, 1),
            smem: 0,
        };
        match sampler {
            DeviceSampler::Greedy => self.gpu.launch(
                "argmax_step",
                shape,
                &[
                    Arg::Ptr(self.logits.ptr),
                    Arg::I32(self.cfg.vocab as i32),
                    Arg::Ptr(self.tokens.ptr),
                    Arg::Ptr(self.out_tokens.ptr),
                    Arg::Ptr(self.counter.ptr),
                    Arg::I32(self.out_cap as i32),
                    Arg::Ptr(self.pos.ptr),
                ],
            ),
            DeviceSampler::TopP {
                temperature,
                top_p,
                seed,
            } => self.gpu.launch(
                "sample_step",
                shape,
                &[
                    Arg::Ptr(self.logits.ptr),
                    Arg::Ptr(self.probs.ptr),
                    Arg::I32(self.cfg.vocab as i32),
                    Arg::F32(temperature),
                    Arg::F32(top_p),
                    Arg::U32(seed),
                    Arg::Ptr(self.tokens.ptr),
                    Arg::Ptr(self.out_tokens.ptr),
                    Arg::Ptr(self.counter.ptr),
                    Arg::I32(self.out_cap as i32),
                    Arg::Ptr(self.pos.ptr),
                ],
            ),
        }
    }

    /// Times each launch of one greedy decode step (after prefilling `prompt`) with device
    /// events, without a graph. For benchmarks: where the time of a token goes.
    pub fn profile_decode_step(
        &mut self,
        prompt: &[u32],
    ) -> Result<Vec<super::device::ProfiledLaunch>, InferenceError> {
        check_forward_args(prompt, 0, self.cfg.vocab, self.max_ctx)?;
        if prompt.len() + 1 > self.max_ctx {
            return Err(InferenceError::ContextOverflow {
                needed: prompt.len() + 1,
                max: self.max_ctx,
            });
        }
        self.enqueue_prefill(prompt, 0)?;
        self.write_i32(Ctl::Pos, prompt.len() as i32 - 1)?;
        self.write_i32(Ctl::Counter, 0)?;
        self.enqueue_pick(DeviceSampler::Greedy)?;
        self.gpu.sync()?;
        self.gpu.profile_start()?;
        let r = self.enqueue_step(DeviceSampler::Greedy);
        let prof = self.gpu.profile_stop()?;
        r?;
        Ok(prof)
    }

    /// Captures `f`'s launches into a graph; on failure ends the capture and returns the error.
    fn capture(
        &self,
        f: impl FnOnce(&Self) -> Result<(), CudaError>,
    ) -> Result<SendGraph, CudaError> {
        self.gpu.begin_capture()?;
        let r = f(self);
        let g = self.gpu.end_capture();
        r?;
        Ok(SendGraph(g?))
    }

    /// [`Self::capture`], but on failure remembers why ([`CudaBackend::graph_error`]), turns
    /// graphs off and returns `None`, so the caller falls back to plain launches.
    fn capture_or_disable(
        &mut self,
        f: impl FnOnce(&Self) -> Result<(), CudaError>,
    ) -> Option<SendGraph> {
        match self.capture(f) {
            Ok(g) => Some(g),
            Err(e) => {
                self.graph_error = Some(e.to_string());
                self.use_graphs = false;
                None
            }
        }
    }

    /// Why CUDA-graph capture failed (graphs are then off), if it did.
    pub fn graph_error(&self) -> Option<&str> {
        self.graph_error.as_deref()
    }

    /// Queues the prefill of `prompt` at positions `start..` in chunks of `max_t`.
    fn enqueue_prefill(&mut self, prompt: &[u32], start: usize) -> Result<(), CudaError> {
        let mut p = start;
        let chunks: Vec<Vec<u32>> = prompt.chunks(self.max_t).map(|c| c.to_vec()).collect();
        for chunk in chunks {
            self.write_tokens(&chunk)?;
            self.write_i32(Ctl::Pos, p as i32)?;
            if chunk.len() == 1 && self.use_graphs && self.graph_logits.is_none() {
                self.graph_logits = self.capture_or_disable(|s| s.enqueue_forward(1));
            }
            if chunk.len() == 1
                && self.use_graphs
                && let Some(gr) = &self.graph_logits
            {
                gr.0.launch().map_err(super::device::drv("cuGraphLaunch"))?;
            } else {
                self.enqueue_forward(chunk.len())?;
            }
            p += chunk.len();
        }
        Ok(())
    }

    /// Greedy generation entirely on the device: prefill `prompt`, then `n` tokens chosen by
    /// argmax on the GPU; token ids cross to the host once, at the end. The cache is reset first.
    pub fn generate_greedy_on_device(
        &mut self,
        prompt: &[u32],
        n: usize,
    ) -> Result<Vec<u32>, InferenceError> {
        self.generate_on_device(prompt, n, DeviceSampler::Greedy)
    }

    /// Generation on the device with `sampler` (see [`CudaBackend::generate_greedy_on_device`]).
    pub fn generate_on_device(
        &mut self,
        prompt: &[u32],
        n: usize,
        sampler: DeviceSampler,
    ) -> Result<Vec<u32>, InferenceError> {
        check_forward_args(prompt, 0, self.cfg.vocab, self.max_ctx)?;
        if n == 0 {
            return Ok(Vec::new());
        }
        let needed = prompt.len() + n - 1;
        if needed > self.max_ctx {
            return Err(InferenceError::ContextOverflow {
                needed,
                max: self.max_ctx,
            });
        }
        self.enqueue_prefill(prompt, 0)?;
        // The pick advances pos by one: set it to the last prompt position first.
        self.write_i32(Ctl::Pos, prompt.len() as i32 - 1)?;
        self.write_i32(Ctl::Counter, 0)?;
        self.enqueue_pick(sampler)?;
        if n > 1 {
            let mut sampled: Option<SendGraph> = None;
            if self.use_graphs {
                match sampler {
                    DeviceSampler::Greedy => {
                        if self.graph_greedy.is_none() {
                            self.graph_greedy =
                                self.capture_or_disable(|s| s.enqueue_step(DeviceSampler::Greedy));
                        }
                    }
                    other => {
                        sampled = self.capture_or_disable(|s| s.enqueue_step(other));
                    }
                }
            }
            let graph = match sampler {
                _ if !self.use_graphs => None,
                DeviceSampler::Greedy => self.graph_greedy.as_ref(),
                DeviceSampler::TopP { .. } => sampled.as_ref(),
            };
            for _ in 1..n {
                match graph {
                    Some(gr) => gr.0.launch().map_err(super::device::drv("cuGraphLaunch"))?,
                    None => {
                        self.enqueue_step(sampler)?;
                    }
                }
            }
        }
        self.gpu.sync()?;
        let count = self.gpu.read_u32(&self.counter, 0, 1)?[0] as usize;
        if count != n {
            return Err(CudaError::Invalid(format!(
                "device produced {count} tokens, expected {n}"
            ))
            .into());
        }
        Ok(self.gpu.read_u32(&self.out_tokens, 0, n)?)
    }

    /// Runs `tokens` at `start_pos` and returns the last token's logits (see [`Backend`]).
    pub fn forward_logits(
        &mut self,
        tokens: &[u32],
        start_pos: usize,
    ) -> Result<Vec<f32>, InferenceError> {
        check_forward_args(tokens, start_pos, self.cfg.vocab, self.max_ctx)?;
        self.enqueue_prefill(tokens, start_pos)?;
        let v = self.gpu.read_f32(&self.logits, 0, self.cfg.vocab)?;
        Ok(v)
    }
}

/// What a single-token mat-vec does to its input before multiplying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pre {
    /// Nothing.
    None,
    /// RMSNorm with these weights (device pointer).
    Norm(u64),
    /// SiLU gating of a gate|up row.
    Silu,
    /// Already quantized into `xq` by the previous kernel (attention); int8 mat-vec only.
    Quantized,
}

#[derive(Clone, Copy)]
enum Ctl {
    Pos,
    Counter,
}

impl Backend for CudaBackend {
    fn name(&self) -> &str {
        "cuda"
    }

    fn forward(&mut self, tokens: &[u32], start_pos: usize) -> Result<Vec<f32>, InferenceError> {
        self.forward_logits(tokens, start_pos)
    }

    fn reset(&mut self) {
        // Positions are overwritten before they are read (attention only reads 0..=pos, all
        // written by this sequence), so forgetting the cache needs no device work.
    }

    fn max_context(&self) -> usize {
        self.max_ctx
    }
    fn into_batch_model(
        self: Box<Self>,
        slots: usize,
        cfg: &crate::scheduler::SchedulerConfig,
    ) -> Result<Box<dyn crate::scheduler::BatchModel>, InferenceError> {
        // One step for all sequences on the device: paged KV pools sized by the scheduler's
        // budget (see `super::batch`).
        let opts = super::batch::CudaBatchOptions::for_scheduler(slots, cfg);
        Ok(Box::new(super::batch::CudaBatchModel::new(*self, &opts)?))
    }
}

/// Unused-constant guard: the attention block size is fixed in the kernel's shared-memory math.
const _: () = assert!(ATTENTION_THREADS == 256);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Every weight buffer of a loaded backend, read back.
    fn weight_bytes(be: &CudaBackend) -> Vec<Vec<u8>> {
        let g = &be.gpu;
        let read = |b: &DevBuf| g.read(b, 0, b.len).unwrap();
        let mut out = Vec::new();
        let mat = |m: &GpuMatrix, out: &mut Vec<Vec<u8>>| {
            out.push(read(&m.qs));
            out.extend(m.d.as_ref().map(read));
            out.extend(m.m.as_ref().map(read));
        };
        mat(&be.embed, &mut out);
        if let Some(o) = &be.output {
            mat(o, &mut out);
        }
        out.push(read(&be.out_norm));
        out.extend(be.rope_ff.as_ref().map(read));
        for l in &be.layers {
            out.push(read(&l.attn_norm));
            out.push(read(&l.ffn_norm));
            out.extend(l.qkv_bias.as_ref().map(read));
            out.extend(l.q_norm.as_ref().map(read));
            out.extend(l.k_norm.as_ref().map(read));
            for lin in [&l.qkv, &l.wo, &l.gate_up, &l.down] {
                for (m, _) in &lin.parts {
                    mat(m, &mut out);
                }
            }
        }
        out
    }

    /// Loading from the GGUF header + a reader through a small staging buffer puts the same
    /// bytes on the device as loading the mapped file, for every model case (types, qwen2
    /// biases, tied embeddings). Runs on the kernel emulator; no GPU needed, no kernel runs.
    #[test]
    fn streamed_load_equals_mapped_load_on_the_emulator() {
        let gpu = match Gpu::emulated() {
            Ok(g) => g,
            Err(e) => {
                eprintln!("SKIPPED: kernel emulator unavailable ({e}); streamed load not checked");
                return;
            }
        };
        let opts = CudaOptions {
            max_context: Some(64),
            ..Default::default()
        };
        for case in super::super::checks::model_cases() {
            let bytes = super::super::checks::case_gguf(&case, 1).unwrap();
            let g = crate::gguf::Gguf::parse(&bytes).unwrap();
            let w = LlamaWeights::from_gguf(&g).unwrap();
            let mapped = CudaBackend::load_on(gpu.clone(), &w, &opts).unwrap();
            let header = crate::stream::read_header(&bytes).unwrap();
            // The synthetic files are smaller than the first header read: describe them from
            // their header bytes only, as a large model would be.
            let h = crate::gguf::Gguf::parse_header(
                &header[..g.data_offset as usize],
                bytes.len() as u64,
            )
            .unwrap();
            let hw = LlamaWeights::from_gguf(&h).unwrap();
            assert!(hw.token_embd.data.is_empty());
            let streamed =
                CudaBackend::load_streamed(gpu.clone(), &hw, &bytes, &opts, Some(1000)).unwrap();
            assert_eq!(
                weight_bytes(&streamed),
                weight_bytes(&mapped),
                "{}",
                case.name
            );
            assert_eq!(
                streamed.weight_bytes_per_token(),
                mapped.weight_bytes_per_token()
            );
            // Without a reader, header-only weights are refused (never uploaded as zeros).
            let e = CudaBackend::load_on(gpu.clone(), &hw, &opts)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("header only") || e.contains("holds 0 bytes"),
                "{e}"
            );
        }
    }
}
