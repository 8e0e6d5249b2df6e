//! [`CudaBatchModel`]: the scheduler's [`BatchModel`] on the CUDA backend, with a paged KV
//! cache on the device.
//!
//! - **Paged KV cache.** One pool per layer for K and one for V, each `kv_blocks` blocks of
//!   `block_size` positions (`[kv_blocks][block_size][kv_dim]` f32), allocated once at
//!   construction. A sequence's positions are found through its block table
//!   ([`SeqWork::blocks`], ids into the pool, owned by the scheduler's
//!   [`crate::scheduler::BlockAllocator`]): position `p` is row `p % block_size` of block
//!   `blocks[p / block_size]`. Nothing is allocated per token or per step.
//! - **One batch per step.** All the step's tokens (one per decoding sequence, several per
//!   prefill chunk) run through the layers together as one batch of `T` tokens, so every
//!   weight matrix is read once per step (per tile of 8 tokens) for all sequences: embedding,
//!   RMSNorm, the projections (`matmul_<type>`), bias, SiLU gating and residual adds treat
//!   tokens independently. Only two kernels depend on the sequence, and they take per-token
//!   metadata (position, block-table offset) uploaded once per step in one host-to-device
//!   copy: `rope_kv_paged` (RoPE, then K/V written at the token's own paged position) and
//!   `attention_paged` (each token attends causally over its own sequence's pages).
//! - **Int8 products for quantized weights.** With [`DecodeMatvec::Int8`] (the default, taken
//!   from the backend's [`CudaOptions::decode_matvec`]; [`CudaBatchModel::set_matmul`] changes
//!   it) a linear layer whose matrices are Q8_0, Q4_0 or Q4_1 quantizes its `T` input rows to
//!   int8 per 32 elements (`quantize_rows`, the layout of the decode path's `quantize_act` per
//!   row) and multiplies them with `matmulq_<type>`: dp4a products, each weight block read once
//!   per tile of 64 tokens (so once per step for up to 64 sequences) instead of once per 8
//!   tokens as the f32 `matmul_<type>`. The quantization is fused into its producer where
//!   that is an RMSNorm (`rmsnorm_quantize_rows`) or the SiLU gating (`silu_mul_quantize_rows`):
//!   3 launches fewer per layer, bit for bit the same rows ([`CudaBatchModel::set_fused`]
//!   turns it off for comparison). The choice is per model, never per pass: a pass of 100
//!   tokens uses the same kernels as a pass of 1, so batch independence holds. Float weights
//!   (and [`DecodeMatvec::Float`]) use the f32 `matmul_<type>`.
//! - **Logits.** The final norm and the output projection run only on the rows that want
//!   logits (gathered by `rmsnorm_rows`), into one `[rows][vocab]` buffer that crosses to the
//!   host in ONE device-to-host copy per step ([`BatchModel::step`]).
//! - **Sampling on the device.** [`BatchModel::step_sampled`] (what the scheduler, hence the
//!   server, calls) samples every row whose request needs nothing but greedy or temperature +
//!   top-p on the device (`sample_rows`, one block per row, no sort: bisection over the
//!   probabilities' bit patterns finds the nucleus cut and the draw), with the uniform number
//!   drawn on the host from the request's own seeded stream, so the tokens are the host
//!   sampler's ([`SimpleSample::pick`]) up to float rounding at a boundary. Only the token ids
//!   cross to the host; rows that need the host (grammar, logprobs, penalties, bias, top-k,
//!   min-p) get their logits in one copy of the span holding them.
//! - **CUDA graphs per batch-size bucket.** A decode-only step (every sequence feeds one token
//!   and wants its row: the steady state) is padded to the smallest of [`decode_buckets`]
//!   holding it (1, 2, 4, then multiples of 8, then `min(slots, max_step_tokens)`); padding
//!   rows compute token 0 at position 0 of a scratch block (one block past the scheduler's
//!   pool, which no block table may name) and their rows are never read. The metadata layout
//!   and every launch's shape then depend on the bucket alone, so the whole pass is captured
//!   once per bucket as a CUDA graph and replayed: one launch per step instead of ~10 per
//!   layer. Only the metadata upload precedes it. Steps with prompt chunks run as plain
//!   launches. [`CudaBatchModel::set_decode_graphs`] chooses ([`DecodeGraphs`]); a failed
//!   capture turns graphs off and is reported by [`CudaBatchModel::graph_error`].
//! - **Batch independence.** Every kernel computes a token's values from that token's inputs
//!   alone, in a fixed order, so a sequence's logits are bit-for-bit the same whatever else is
//!   in the batch (the tests check this).
//!
//! A step with more tokens than [`CudaBatchOptions::max_step_tokens`] runs as several
//! consecutive batches (tokens in order, so a later chunk sees the K/V an earlier one wrote);
//! the logits still cross to the host once, at the end.
//!
//! Model support is the backend's: every weight type it loads (K-quants included, through
//! their `matmul_<type>` kernels) and Qwen3's per-head q/k norms (`qk_norm`, before RoPE).

use super::backend::{CudaBackend, CudaOptions, DecodeMatvec, Linear, SendGraph};
use super::checks::CheckResult;
use super::device::{Arg, CudaError, DevBuf, Gpu};
use super::kernels::{
    BLOCK_ELEMS, ELEMENTWISE_THREADS, MATVEC_THREADS, REDUCE_THREADS, RMSNORM_THREADS, Shape,
    WeightKind, attention_shape, check_model_limits, elementwise_shape, rope_kv_shape,
};
use super::weights::GpuMatrix;
use crate::backend::Backend;
use crate::error::InferenceError;
use crate::gguf::GgmlType;
use crate::model::RopeStyle;
use crate::sampling::SimpleSample;
use crate::scheduler::{BatchModel, RowOutput, SchedulerConfig, SeqWork};

/// Token rows per tile of `matmulq_<type>`: each weight block is read once per tile.
pub const MATMULQ_TOKENS_PER_TILE: u32 = 64;
/// Weight rows per thread block of `matmulq_<type>` (4 per warp).
pub const MATMULQ_ROWS_PER_BLOCK: u32 = 32;

/// Bytes between two token rows quantized by `quantize_rows` (the `quantize_act` layout of `k`
/// values, rounded up to 16 bytes so every row's int8 halves stay aligned).
pub fn act_q8_row_bytes(k: usize) -> usize {
    (k / BLOCK_ELEMS * 40).next_multiple_of(16)
}

/// Launch shape of `quantize_rows` for `t` rows of `k` values (one warp per 32-element block).
pub fn quantize_rows_shape(k: usize, t: usize) -> Shape {
    Shape {
        grid: (
            ((k / BLOCK_ELEMS) as u32)
                .div_ceil(MATVEC_THREADS / 32)
                .max(1),
            t.max(1) as u32,
            1,
        ),
        block: (MATVEC_THREADS, 1, 1),
        smem: 0,
    }
}

/// Launch shape of `matmulq_<type>` for `rows` weight rows times `t` token rows.
pub fn matmulq_shape(rows: usize, t: usize) -> Shape {
    Shape {
        grid: (
            (rows as u32).div_ceil(MATMULQ_ROWS_PER_BLOCK).max(1),
            (t as u32).div_ceil(MATMULQ_TOKENS_PER_TILE).max(1),
            1,
        ),
        block: (MATVEC_THREADS, 1, 1),
        smem: 0,
    }
}

/// Whether `kind` has a batched int8 product (`matmulq_<type>`).
pub fn has_matmulq(kind: WeightKind) -> bool {
    matches!(kind, WeightKind::Q8_0 | WeightKind::Q4_0 | WeightKind::Q4_1)
}

/// Sizes of a [`CudaBatchModel`], fixed at construction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaBatchOptions {
    /// Sequences in the running batch at once (the scheduler's KV slots).
    pub slots: usize,
    /// Positions per KV block (must equal [`SchedulerConfig::block_size`]).
    pub block_size: usize,
    /// Blocks in the pool of each layer (must equal [`SchedulerConfig::kv_blocks`]).
    pub kv_blocks: usize,
    /// Most positions one sequence may hold; `None` = the backend's context.
    pub max_context: Option<usize>,
    /// Tokens one batched pass processes (activation buffers are sized for it); a step with
    /// more tokens runs as several passes.
    pub max_step_tokens: usize,
}

impl CudaBatchOptions {
    /// Options matching a scheduler configuration: `slots` sequences, the scheduler's block
    /// size and pool, and room for every decode token plus one prefill chunk per pass.
    pub fn for_scheduler(slots: usize, cfg: &SchedulerConfig) -> Self {
        CudaBatchOptions {
            slots,
            block_size: cfg.block_size,
            kv_blocks: cfg.kv_blocks,
            max_context: None,
            max_step_tokens: slots + cfg.prefill_chunk,
        }
    }
}

/// How a decode-only step (every sequence of the step feeds one token and wants its pick or
/// logits: the steady state of a batch once the prompts are in) runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeGraphs {
    /// Like any other step: one pass over exactly the step's tokens.
    Off,
    /// Padded to its batch-size bucket (see [`decode_buckets`]), the layout a graph replays,
    /// with plain launches. For checking the padding where graphs do not exist (the emulator).
    Padded,
    /// Padded to its bucket and replayed from a CUDA graph captured the first time the bucket
    /// is used (one launch per step instead of ~10 per layer). The default where the device
    /// supports graphs.
    Graphs,
}

/// The batch sizes a decode-only step is padded to when at most `cap` sequences can decode
/// at once: 1, 2, 4, then every multiple of 8 below `cap`, then `cap`. A step of `n` sequences
/// runs as the smallest bucket of at least `n` (at most 7 padding rows above 8 sequences; a
/// padding row costs its share of compute only, the weights are read once per tile of 64
/// rows anyway).
pub fn decode_buckets(cap: usize) -> Vec<usize> {
    let mut b: Vec<usize> = [1, 2, 4]
        .into_iter()
        .chain((1..).map(|i| 8 * i))
        .take_while(|&v| v < cap)
        .collect();
    b.push(cap.max(1));
    b
}

/// The continuous-batching model over one [`CudaBackend`]'s weights (see the module docs).
pub struct CudaBatchModel {
    be: CudaBackend,
    slots: usize,
    block_size: usize,
    kv_blocks: usize,
    max_ctx: usize,
    max_t: usize,
    /// Per layer: K pool, V pool.
    pools: Vec<(DevBuf, DevBuf)>,
    x: DevBuf,
    xn: DevBuf,
    qkv: DevBuf,
    att: DevBuf,
    gu: DevBuf,
    act: DevBuf,
    /// Int8 activation rows for `matmulq` (`max(max_t, slots)` rows of the widest input).
    xq: DevBuf,
    /// Kernels of the quantized linear layers (int8 `matmulq` or f32 `matmul`).
    matmul_kind: DecodeMatvec,
    /// Fuse RMSNorm and SiLU gating into the int8 quantization of the next product.
    fused: bool,
    /// Normed rows that want logits (`slots x dim`).
    hn: DevBuf,
    /// Logits of those rows (`slots x vocab`).
    logits: DevBuf,
    /// Greedy or sampled picks of those rows (`slots` u32).
    picks: DevBuf,
    /// Per-row sampling specs for `sample_rows` (`slots` x 4 f32).
    spec: DevBuf,
    /// Per-pass metadata, i32: tokens | positions | block-table offsets | logit rows | blocks.
    meta: DevBuf,
    meta_host: Vec<i32>,
    /// How decode-only steps run.
    decode_graphs: DecodeGraphs,
    /// Their batch-size buckets ([`decode_buckets`] of `min(slots, max_t)`).
    buckets: Vec<usize>,
    /// Captured decode passes, by bucket.
    graphs: Vec<(usize, SendGraph)>,
    /// Why a capture failed (graphs are then off), if one did.
    graph_error: Option<String>,
}

impl std::fmt::Debug for CudaBatchModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBatchModel")
            .field("backend", &self.be)
            .field("slots", &self.slots)
            .field("block_size", &self.block_size)
            .field("kv_blocks", &self.kv_blocks)
            .field("max_context", &self.max_ctx)
            .field("max_step_tokens", &self.max_t)
            .field("decode_graphs", &self.decode_graphs)
            .finish()
    }
}

/// One pass's layout in `meta` (element offsets) and sizes.
#[derive(Debug, Clone, Copy)]
struct Pass {
    /// Tokens in the pass.
    t: usize,
    /// Rows that want logits.
    rows: usize,
    /// Index of the first of them in the step's logits.
    out_first: usize,
    pos_at: usize,
    bt_at: usize,
    rows_at: usize,
    blocks_at: usize,
}

fn too_big(what: &str) -> InferenceError {
    CudaError::Invalid(format!(
        "the {what} of the batched KV cache overflows the address space; lower kv_blocks, block_size or slots"
    ))
    .into()
}

impl CudaBatchModel {
    /// Builds the batch model over `backend` (its weights; its single-sequence KV cache is
    /// freed first, the batch keeps its own paged pools). Allocates the KV pools and every step
    /// buffer.
    pub fn new(backend: CudaBackend, opts: &CudaBatchOptions) -> Result<Self, InferenceError> {
        let mut be = backend;
        let c = be.cfg.clone();
        let gpu = be.gpu.clone();
        let slots = opts.slots.max(1);
        let block_size = opts.block_size.max(1);
        let kv_blocks = opts.kv_blocks;
        let max_ctx = opts.max_context.unwrap_or(be.max_context()).max(1);
        be.release_kv_cache()?;
        let max_t = opts.max_step_tokens.max(1);
        if kv_blocks == 0 || kv_blocks > i32::MAX as usize || max_ctx > i32::MAX as usize {
            return Err(CudaError::Invalid(format!(
                "kv_blocks {kv_blocks} must be between 1 and {}",
                i32::MAX
            ))
            .into());
        }
        // The attention kernel keeps one score per position in shared memory.
        check_model_limits(&[], c.head_dim, max_ctx).map_err(CudaError::Invalid)?;
        let kvdim = c.kv_dim();
        let qkv_w = c.q_dim() + 2 * kvdim;
        // One block more than the scheduler's pool: the scratch block padding rows of a
        // bucketed decode step write to and read from (block id `kv_blocks`, which no table
        // may name: `validate` refuses it).
        let pool_bytes = (kv_blocks + 1)
            .checked_mul(block_size)
            .and_then(|n| n.checked_mul(kvdim * 4))
            .ok_or_else(|| too_big("pool"))?;
        let max_blocks_per_seq = max_ctx.div_ceil(block_size);
        let meta_len = max_t
            .checked_mul(3)
            .and_then(|n| n.checked_add(slots))
            .and_then(|n| n.checked_add(slots.checked_mul(max_blocks_per_seq)?))
            .and_then(|n| n.checked_add(1)) // the scratch block's table entry
            .ok_or_else(|| too_big("metadata"))?;
        let mut pools = Vec::with_capacity(c.n_layers);
        for _ in 0..c.n_layers {
            pools.push((gpu.alloc(pool_bytes)?, gpu.alloc(pool_bytes)?));
        }
        let m = CudaBatchModel {
            x: gpu.alloc(max_t * c.dim * 4)?,
            xn: gpu.alloc(max_t * c.dim * 4)?,
            qkv: gpu.alloc(max_t * qkv_w * 4)?,
            att: gpu.alloc(max_t * c.q_dim() * 4)?,
            gu: gpu.alloc(max_t * 2 * c.ffn_dim * 4)?,
            act: gpu.alloc(max_t * c.ffn_dim * 4)?,
            xq: gpu
                .alloc(max_t.max(slots) * act_q8_row_bytes(c.dim.max(c.q_dim()).max(c.ffn_dim)))?,
            matmul_kind: be.decode_matvec().0,
            fused: true,
            hn: gpu.alloc(slots * c.dim * 4)?,
            logits: gpu.alloc(slots * c.vocab * 4)?,
            picks: gpu.alloc(slots * 4)?,
            spec: gpu.alloc(slots * 4 * 4)?,
            meta: gpu.alloc(meta_len * 4)?,
            meta_host: Vec::with_capacity(meta_len),
            decode_graphs: if gpu.supports_graphs() {
                DecodeGraphs::Graphs
            } else {
                DecodeGraphs::Off
            },
            buckets: decode_buckets(slots.min(max_t)),
            graphs: Vec::new(),
            graph_error: None,
            pools,
            be,
            slots,
            block_size,
            kv_blocks,
            max_ctx,
            max_t,
        };
        gpu.sync()?;
        Ok(m)
    }

    /// The backend whose weights this model runs.
    pub fn backend(&self) -> &CudaBackend {
        &self.be
    }

    /// Chooses the kernels of the quantized linear layers for every later pass: int8
    /// activations with `matmulq` (the default) or f32 activations with `matmul`.
    pub fn set_matmul(&mut self, kind: DecodeMatvec) {
        self.matmul_kind = kind;
        self.graphs.clear();
    }

    /// Turns the fused launches of the int8 path on (the default) or off: RMSNorm +
    /// quantization (`rmsnorm_quantize_rows`) and SiLU gating + quantization
    /// (`silu_mul_quantize_rows`), 3 launches fewer per layer. Both ways give the same bits.
    pub fn set_fused(&mut self, on: bool) {
        self.fused = on;
        self.graphs.clear();
    }

    /// Chooses how decode-only steps run (see [`DecodeGraphs`]); [`DecodeGraphs::Graphs`] on a
    /// device without graphs (the emulator) means [`DecodeGraphs::Padded`]. All three give the
    /// same bits for every real row.
    pub fn set_decode_graphs(&mut self, mode: DecodeGraphs) {
        self.decode_graphs = match mode {
            DecodeGraphs::Graphs if !self.be.gpu.supports_graphs() => DecodeGraphs::Padded,
            m => m,
        };
        self.graphs.clear();
    }

    /// How decode-only steps run.
    pub fn decode_graphs(&self) -> DecodeGraphs {
        self.decode_graphs
    }

    /// Decode graphs captured so far (one per batch-size bucket used).
    pub fn captured_graphs(&self) -> usize {
        self.graphs.len()
    }

    /// Why a decode-graph capture failed, if one did (decode steps then run without graphs).
    pub fn graph_error(&self) -> Option<&str> {
        self.graph_error.as_deref()
    }

    /// The kernels of the quantized linear layers.
    pub fn matmul_kind(&self) -> DecodeMatvec {
        self.matmul_kind
    }

    /// Bytes of the KV pools (all layers, K and V, with each pool's scratch block).
    pub fn kv_bytes(&self) -> usize {
        self.pools.iter().map(|(k, v)| k.len + v.len).sum()
    }

    /// Runs `sample_rows` on the first `n` rows of `self.logits` with one spec per row
    /// (`None`: the row is left alone) and returns the picks (0 for rows left alone).
    /// Sampled rows' logits are overwritten with their probabilities.
    fn sample_on_device(
        &mut self,
        specs: &[Option<SimpleSample>],
    ) -> Result<Vec<u32>, InferenceError> {
        let n = specs.len();
        let bytes: Vec<u8> = specs
            .iter()
            .flat_map(|s| sample_spec(*s))
            .flat_map(f32::to_le_bytes)
            .collect();
        self.be.gpu.write(&mut self.spec, 0, &bytes)?;
        self.be.gpu.launch(
            "sample_rows",
            Shape {
                grid: (n as u32, 1, 1),
                block: (REDUCE_THREADS, 1, 1),
                smem: 0,
            },
            &[
                Arg::Ptr(self.logits.ptr),
                Arg::I32(self.be.cfg.vocab as i32),
                Arg::Ptr(self.spec.ptr),
                Arg::Ptr(self.picks.ptr),
            ],
        )?;
        Ok(self.be.gpu.read_u32(&self.picks, 0, n)?)
    }

    /// Checks `work` against the model's limits, so no kernel can address outside a buffer.
    fn validate(&self, work: &[SeqWork<'_>]) -> Result<(), InferenceError> {
        let mut seen = vec![false; self.slots];
        let vocab = self.be.cfg.vocab;
        for w in work {
            let Some(s) = seen.get_mut(w.slot) else {
                return Err(InferenceError::InvalidArgument(format!(
                    "KV slot {} of {} does not exist",
                    w.slot, self.slots
                )));
            };
            if std::mem::replace(s, true) {
                return Err(InferenceError::InvalidArgument(format!(
                    "KV slot {} appears twice in one step",
                    w.slot
                )));
            }
            crate::backend::check_forward_args(w.tokens, w.start_pos, vocab, self.max_ctx)?;
            let end = w.start_pos + w.tokens.len();
            let need = end.div_ceil(self.block_size);
            if w.blocks.len() < need {
                return Err(InferenceError::InvalidArgument(format!(
                    "slot {}: {} KV blocks of {} positions cannot hold {end} positions; grow the block table first",
                    w.slot,
                    w.blocks.len(),
                    self.block_size
                )));
            }
            if let Some(b) = w.blocks[..need]
                .iter()
                .find(|&&b| b as usize >= self.kv_blocks)
            {
                return Err(InferenceError::InvalidArgument(format!(
                    "slot {}: KV block {b} is outside the pool of {} blocks (the scheduler's kv_blocks must match the model's)",
                    w.slot, self.kv_blocks
                )));
            }
        }
        Ok(())
    }

    /// Queues the whole step (in passes of at most `max_t` tokens); the logits of the rows
    /// that want them end up in `self.logits` in work order. Returns how many rows.
    fn enqueue_step(&mut self, work: &[SeqWork<'_>]) -> Result<usize, InferenceError> {
        self.validate(work)?;
        if self.decode_graphs != DecodeGraphs::Off
            && let Some(t) = self.decode_bucket(work)
        {
            self.enqueue_decode(work, t)?;
            return Ok(work.len());
        }
        let mut out = 0;
        let mut item = 0;
        let mut j = 0; // next token of work[item]
        while item < work.len() {
            // Gather one pass: tokens in work order, each item's table once.
            let mut tokens: Vec<i32> = Vec::new();
            let mut pos: Vec<i32> = Vec::new();
            let mut bt: Vec<i32> = Vec::new();
            let mut rows: Vec<i32> = Vec::new();
            let mut blocks: Vec<i32> = Vec::new();
            let out_first = out;
            while tokens.len() < self.max_t && item < work.len() {
                let w = &work[item];
                let take = (w.tokens.len() - j).min(self.max_t - tokens.len());
                let first = w.start_pos + j;
                let off = blocks.len() as i32;
                let need = (first + take).div_ceil(self.block_size);
                blocks.extend(w.blocks[..need].iter().map(|&b| b as i32));
                for k in 0..take {
                    tokens.push(w.tokens[j + k] as i32);
                    pos.push((first + k) as i32);
                    bt.push(off);
                }
                j += take;
                if j == w.tokens.len() {
                    if w.want_logits {
                        rows.push(tokens.len() as i32 - 1);
                        out += 1;
                    }
                    item += 1;
                    j = 0;
                }
            }
            let pass = self.upload_pass([&tokens, &pos, &bt, &rows, &blocks], out_first)?;
            self.enqueue_pass(&pass)?;
        }
        Ok(out)
    }

    /// Uploads one pass's metadata (`tokens`, `positions`, `block-table offsets`, `logit
    /// rows`, `blocks`, in that order and one copy) to `self.meta` and returns its layout.
    fn upload_pass(&mut self, parts: [&[i32]; 5], out_first: usize) -> Result<Pass, CudaError> {
        let [tokens, _, _, rows, _] = parts;
        let t = tokens.len();
        self.meta_host.clear();
        for part in parts {
            self.meta_host.extend_from_slice(part);
        }
        let bytes: Vec<u8> = self
            .meta_host
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        self.be.gpu.write(&mut self.meta, 0, &bytes)?;
        Ok(Pass {
            t,
            rows: rows.len(),
            out_first,
            pos_at: t,
            bt_at: 2 * t,
            rows_at: 3 * t,
            blocks_at: 3 * t + rows.len(),
        })
    }

    /// The bucket a decode-only step runs as: `None` unless every item feeds exactly one token
    /// and wants its row (and the step fits the largest bucket).
    fn decode_bucket(&self, work: &[SeqWork<'_>]) -> Option<usize> {
        let n = work.len();
        if n == 0 || !work.iter().all(|w| w.tokens.len() == 1 && w.want_logits) {
            return None;
        }
        self.buckets.iter().copied().find(|&b| b >= n)
    }

    /// Queues a decode-only step (validated) as one pass of `t` rows: the step's `n` tokens,
    /// then `t - n` padding rows (token 0 at position 0 of the scratch block, their logits
    /// land in rows `n..t` and are never read). The metadata layout depends on `t` only, so
    /// the pass is a fixed graph per bucket: replayed when graphs are on, captured on first
    /// use. The real rows' values are those of an unpadded pass (batch independence).
    fn enqueue_decode(&mut self, work: &[SeqWork<'_>], t: usize) -> Result<(), InferenceError> {
        let n = work.len();
        let mut tokens = Vec::with_capacity(t);
        let mut pos = Vec::with_capacity(t);
        let mut bt = Vec::with_capacity(t);
        let mut blocks: Vec<i32> = Vec::new();
        for w in work {
            bt.push(blocks.len() as i32);
            let need = (w.start_pos + 1).div_ceil(self.block_size);
            blocks.extend(w.blocks[..need].iter().map(|&b| b as i32));
            tokens.push(w.tokens[0] as i32);
            pos.push(w.start_pos as i32);
        }
        let scratch = blocks.len() as i32;
        blocks.push(self.kv_blocks as i32);
        tokens.resize(t, 0);
        pos.resize(t, 0);
        bt.resize(t, scratch);
        let rows: Vec<i32> = (0..t as i32).collect();
        debug_assert!(n <= t);
        let pass = self.upload_pass([&tokens, &pos, &bt, &rows, &blocks], 0)?;
        if self.decode_graphs == DecodeGraphs::Graphs {
            let at = match self.graphs.iter().position(|(b, _)| *b == t) {
                Some(i) => i,
                None => match self.capture_pass(&pass) {
                    Ok(g) => {
                        self.graphs.push((t, g));
                        self.graphs.len() - 1
                    }
                    Err(e) => {
                        // Fall back to plain launches for good, and say why.
                        self.graph_error = Some(e.to_string());
                        self.decode_graphs = DecodeGraphs::Off;
                        self.graphs.clear();
                        self.enqueue_pass(&pass)?;
                        return Ok(());
                    }
                },
            };
            self.graphs[at]
                .1
                .0
                .launch()
                .map_err(super::device::drv("cuGraphLaunch"))?;
            return Ok(());
        }
        self.enqueue_pass(&pass)?;
        Ok(())
    }

    /// Captures [`Self::enqueue_pass`]'s launches for `p` into a graph (nothing runs).
    fn capture_pass(&self, p: &Pass) -> Result<SendGraph, CudaError> {
        let g = &self.be.gpu;
        g.begin_capture()?;
        let r = self.enqueue_pass(p);
        let graph = g.end_capture();
        r?;
        Ok(SendGraph(graph?))
    }

    /// `y (= or +=) W x` for `t` token rows (`x` rows of the matrix width, `y` rows of `ldy`).
    fn matmul(
        &self,
        lin: &Linear,
        x: u64,
        y: u64,
        t: usize,
        ldy: usize,
        acc: bool,
    ) -> Result<(), CudaError> {
        let int8 = self.int8(lin);
        if int8 && let Some((m, _)) = lin.parts.first() {
            self.quantize_rows(x, m.k, t)?;
        }
        for (m, off) in &lin.parts {
            let y = y + 4 * *off as u64;
            if int8 {
                self.matmulq(m, y, t, ldy, acc)?;
            } else {
                self.matmul1(m, x, y, t, ldy, acc)?;
            }
        }
        Ok(())
    }

    /// Whether `lin` runs as int8 products (`matmulq`) in this model.
    fn int8(&self, lin: &Linear) -> bool {
        self.matmul_kind == DecodeMatvec::Int8 && lin.parts.iter().all(|(m, _)| has_matmulq(m.kind))
    }

    /// `y (= or +=) W xq` for every part of `lin`, its int8 rows already in `xq`.
    fn matmulq_parts(
        &self,
        lin: &Linear,
        y: u64,
        t: usize,
        ldy: usize,
        acc: bool,
    ) -> Result<(), CudaError> {
        for (m, off) in &lin.parts {
            self.matmulq(m, y + 4 * *off as u64, t, ldy, acc)?;
        }
        Ok(())
    }

    /// `y (= or +=) W rmsnorm(x, norm)`: with int8 products and fusion on, one
    /// `rmsnorm_quantize_rows` launch writes the int8 rows directly (no f32 normalized rows).
    #[allow(clippy::too_many_arguments)]
    fn norm_matmul(
        &self,
        x: u64,
        norm: u64,
        lin: &Linear,
        y: u64,
        t: usize,
        ldy: usize,
        acc: bool,
    ) -> Result<(), CudaError> {
        let c = &self.be.cfg;
        if self.fused && self.int8(lin) {
            self.be.gpu.launch(
                "rmsnorm_quantize_rows",
                Shape {
                    grid: (t as u32, 1, 1),
                    // The same block as `rmsnorm`: the sum of squares in the same order.
                    block: (RMSNORM_THREADS, 1, 1),
                    smem: 0,
                },
                &[
                    Arg::Ptr(x),
                    Arg::Ptr(norm),
                    Arg::Ptr(self.xq.ptr),
                    Arg::I32(c.dim as i32),
                    Arg::F32(c.rms_eps),
                ],
            )?;
            return self.matmulq_parts(lin, y, t, ldy, acc);
        }
        self.be.rmsnorm(x, norm, self.xn.ptr, t)?;
        self.matmul(lin, self.xn.ptr, y, t, ldy, acc)
    }

    /// `y += W_down (silu(gate) * up)` from the gate|up rows in `self.gu`: with int8 products
    /// and fusion on, one `silu_mul_quantize_rows` launch writes the int8 rows directly.
    fn silu_matmul(&self, down: &Linear, y: u64, t: usize, ldy: usize) -> Result<(), CudaError> {
        let ffn = self.be.cfg.ffn_dim;
        if self.fused && self.int8(down) {
            self.be.gpu.launch(
                "silu_mul_quantize_rows",
                quantize_rows_shape(ffn, t),
                &[
                    Arg::Ptr(self.gu.ptr),
                    Arg::Ptr(self.xq.ptr),
                    Arg::I32(ffn as i32),
                ],
            )?;
            return self.matmulq_parts(down, y, t, ldy, true);
        }
        self.be.gpu.launch(
            "silu_mul",
            elementwise_shape(ffn * t),
            &[
                Arg::Ptr(self.gu.ptr),
                Arg::Ptr(self.act.ptr),
                Arg::I32(ffn as i32),
                Arg::I32(t as i32),
            ],
        )?;
        self.matmul(down, self.act.ptr, y, t, ldy, true)
    }

    /// `y (= or +=) W x` for one matrix, with the int8 product when the model uses it.
    fn project1(
        &self,
        m: &GpuMatrix,
        x: u64,
        y: u64,
        t: usize,
        ldy: usize,
        acc: bool,
    ) -> Result<(), CudaError> {
        if self.matmul_kind == DecodeMatvec::Int8 && has_matmulq(m.kind) {
            self.quantize_rows(x, m.k, t)?;
            self.matmulq(m, y, t, ldy, acc)
        } else {
            self.matmul1(m, x, y, t, ldy, acc)
        }
    }

    /// `xq` row i = the int8 quantization of `x` row i (`t` rows of `k` floats).
    fn quantize_rows(&self, x: u64, k: usize, t: usize) -> Result<(), CudaError> {
        self.be.gpu.launch(
            "quantize_rows",
            quantize_rows_shape(k, t),
            &[
                Arg::Ptr(x),
                Arg::Ptr(self.xq.ptr),
                Arg::I32(k as i32),
                Arg::I32(k as i32),
            ],
        )
    }

    /// `y (= or +=) W xq` for the `t` int8 rows in `xq` (`matmulq_<type>`).
    fn matmulq(
        &self,
        m: &GpuMatrix,
        y: u64,
        t: usize,
        ldy: usize,
        acc: bool,
    ) -> Result<(), CudaError> {
        let (qs, d, mm) = m.ptrs();
        self.be
            .gpu
            .note(|| (format!("{}x{} T={t} int8", m.rows, m.k), m.bytes()));
        self.be.gpu.launch(
            &format!("matmulq_{}", m.kind.suffix()),
            matmulq_shape(m.rows, t),
            &[
                Arg::Ptr(qs),
                Arg::Ptr(d),
                Arg::Ptr(mm),
                Arg::Ptr(self.xq.ptr),
                Arg::Ptr(y),
                Arg::I32(m.rows as i32),
                Arg::I32(m.k as i32),
                Arg::I32(t as i32),
                Arg::I32(ldy as i32),
                Arg::I32(acc as i32),
            ],
        )
    }

    fn matmul1(
        &self,
        m: &GpuMatrix,
        x: u64,
        y: u64,
        t: usize,
        ldy: usize,
        acc: bool,
    ) -> Result<(), CudaError> {
        self.be
            .gpu
            .note(|| (format!("{}x{} T={t}", m.rows, m.k), m.bytes()));
        self.be.launch_matmul(m, x, y, t, ldy, acc)
    }

    /// Queues one batched pass over the metadata in `self.meta`.
    fn enqueue_pass(&self, p: &Pass) -> Result<(), CudaError> {
        let be = &self.be;
        let c = &be.cfg;
        let g = &be.gpu;
        let t = p.t;
        let (dim, kvdim, qdim) = (c.dim, c.kv_dim(), c.q_dim());
        let qkv_w = qdim + 2 * kvdim;
        let tokens = self.meta.ptr;
        let pos = self.meta.f32_at(p.pos_at);
        let bt = self.meta.f32_at(p.bt_at);
        let rows = self.meta.f32_at(p.rows_at);
        let blocks = self.meta.f32_at(p.blocks_at);
        let (eq, ed, em) = be.embed.ptrs();
        g.launch(
            &format!("embed_{}", be.embed.kind.suffix()),
            Shape {
                grid: (t as u32, 1, 1),
                block: (128, 1, 1),
                smem: 0,
            },
            &[
                Arg::Ptr(eq),
                Arg::Ptr(ed),
                Arg::Ptr(em),
                Arg::Ptr(tokens),
                Arg::Ptr(self.x.ptr),
                Arg::I32(dim as i32),
                Arg::I32(be.embed.rows as i32),
            ],
        )?;
        let neox = matches!(c.rope_style, RopeStyle::Neox) as i32;
        let ff = be.rope_ff.as_ref().map_or(0, |b| b.ptr);
        let scale = 1.0f32 / (c.head_dim as f32).sqrt();
        for (l, (kc, vc)) in be.layers.iter().zip(&self.pools) {
            self.norm_matmul(
                self.x.ptr,
                l.attn_norm.ptr,
                &l.qkv,
                self.qkv.ptr,
                t,
                qkv_w,
                false,
            )?;
            if let Some(b) = &l.qkv_bias {
                g.launch(
                    "bias_add",
                    elementwise_shape(qkv_w * t),
                    &[
                        Arg::Ptr(self.qkv.ptr),
                        Arg::Ptr(b.ptr),
                        Arg::I32(qkv_w as i32),
                        Arg::I32(t as i32),
                    ],
                )?;
            }
            // Qwen3: per-head q/k RMSNorm before RoPE.
            be.qk_norm_at(l, self.qkv.ptr, t, qkv_w)?;
            g.launch(
                "rope_kv_paged",
                rope_kv_shape(c.n_heads, c.n_kv_heads, c.head_dim, t),
                &[
                    Arg::Ptr(self.qkv.ptr),
                    Arg::Ptr(kc.ptr),
                    Arg::Ptr(vc.ptr),
                    Arg::Ptr(pos),
                    Arg::Ptr(bt),
                    Arg::Ptr(blocks),
                    Arg::I32(c.n_heads as i32),
                    Arg::I32(c.n_kv_heads as i32),
                    Arg::I32(c.head_dim as i32),
                    Arg::F32(c.rope_theta),
                    Arg::I32(neox),
                    Arg::Ptr(ff),
                    Arg::I32(self.block_size as i32),
                ],
            )?;
            g.launch(
                "attention_paged",
                attention_shape(c.n_heads, t, c.head_dim, self.max_ctx),
                &[
                    Arg::Ptr(self.qkv.ptr),
                    Arg::Ptr(kc.ptr),
                    Arg::Ptr(vc.ptr),
                    Arg::Ptr(self.att.ptr),
                    Arg::Ptr(pos),
                    Arg::Ptr(bt),
                    Arg::Ptr(blocks),
                    Arg::I32(c.n_heads as i32),
                    Arg::I32(c.n_kv_heads as i32),
                    Arg::I32(c.head_dim as i32),
                    Arg::I32(self.block_size as i32),
                    Arg::I32(self.max_ctx as i32),
                    Arg::F32(scale),
                ],
            )?;
            self.matmul(&l.wo, self.att.ptr, self.x.ptr, t, dim, true)?;
            self.norm_matmul(
                self.x.ptr,
                l.ffn_norm.ptr,
                &l.gate_up,
                self.gu.ptr,
                t,
                2 * c.ffn_dim,
                false,
            )?;
            self.silu_matmul(&l.down, self.x.ptr, t, dim)?;
        }
        if p.rows > 0 {
            g.launch(
                "rmsnorm_rows",
                Shape {
                    grid: (p.rows as u32, 1, 1),
                    block: (ELEMENTWISE_THREADS, 1, 1),
                    smem: 0,
                },
                &[
                    Arg::Ptr(self.x.ptr),
                    Arg::Ptr(rows),
                    Arg::Ptr(be.out_norm.ptr),
                    Arg::Ptr(self.hn.ptr),
                    Arg::I32(dim as i32),
                    Arg::F32(c.rms_eps),
                ],
            )?;
            self.project1(
                be.output(),
                self.hn.ptr,
                self.logits.f32_at(p.out_first * c.vocab),
                p.rows,
                c.vocab,
                false,
            )?;
        }
        Ok(())
    }
}

impl BatchModel for CudaBatchModel {
    fn name(&self) -> &str {
        "cuda-paged-batch"
    }

    fn vocab(&self) -> usize {
        self.be.cfg.vocab
    }

    fn max_context(&self) -> usize {
        self.max_ctx
    }

    fn slots(&self) -> usize {
        self.slots
    }

    fn step(&mut self, work: &[SeqWork<'_>]) -> Result<Vec<Option<Vec<f32>>>, InferenceError> {
        let n = self.enqueue_step(work)?;
        let vocab = self.be.cfg.vocab;
        // One device-to-host copy for every row that wants logits.
        let all = if n > 0 {
            self.be.gpu.read_f32(&self.logits, 0, n * vocab)?
        } else {
            Vec::new()
        };
        let mut rows = all.chunks_exact(vocab.max(1));
        Ok(work
            .iter()
            .map(|w| {
                if w.want_logits {
                    rows.next().map(<[f32]>::to_vec)
                } else {
                    None
                }
            })
            .collect())
    }

    /// The rows with a [`SimpleSample`] are sampled on the device (`sample_rows`: greedy, or
    /// temperature and top-p with the request's own draw) and only their token ids cross to the
    /// host; the logits of the other rows (constrained, logprobs, penalties) cross in one copy
    /// of the span that holds them.
    fn step_sampled(
        &mut self,
        work: &[SeqWork<'_>],
        picks: &[Option<SimpleSample>],
    ) -> Result<Vec<Option<RowOutput>>, InferenceError> {
        let n = self.enqueue_step(work)?;
        let vocab = self.be.cfg.vocab;
        // One spec per row that wants logits, in order.
        let specs: Vec<Option<SimpleSample>> = work
            .iter()
            .enumerate()
            .filter(|(_, w)| w.want_logits)
            .map(|(i, _)| picks.get(i).copied().flatten())
            .collect();
        debug_assert_eq!(specs.len(), n);
        let tokens = if specs.iter().any(Option::is_some) {
            self.sample_on_device(&specs)?
        } else {
            vec![0; n]
        };
        // The rows the host samples: one copy from the first to the last of them.
        let host_rows: Vec<usize> = (0..n).filter(|&r| specs[r].is_none()).collect();
        let (first, span) = match (host_rows.first(), host_rows.last()) {
            (Some(&a), Some(&b)) => (
                a,
                self.be
                    .gpu
                    .read_f32(&self.logits, a * vocab, (b + 1 - a) * vocab)?,
            ),
            _ => (0, Vec::new()),
        };
        let mut row = 0;
        Ok(work
            .iter()
            .map(|w| {
                if !w.want_logits {
                    return None;
                }
                let r = row;
                row += 1;
                Some(match specs[r] {
                    Some(_) => RowOutput::Token(tokens[r]),
                    None => {
                        let at = (r - first) * vocab;
                        RowOutput::Logits(span.get(at..at + vocab).unwrap_or_default().to_vec())
                    }
                })
            })
            .collect())
    }

    fn paged(&self) -> bool {
        // Every K/V read and write goes through the step's block tables.
        true
    }

    fn release(&mut self, _slot: usize) {
        // Nothing to do on the device: a sequence only ever reads positions it wrote itself
        // (attention covers 0..=pos of its own table), so recycled blocks need no clearing.
    }
}

/// One row's spec for `sample_rows`: `{mode, temperature, top_p, u}` (mode 0 = leave the row
/// alone, 1 = argmax, 2 = temperature + top-p with the draw `u`).
fn sample_spec(s: Option<SimpleSample>) -> [f32; 4] {
    match s {
        None => [0.0; 4],
        Some(SimpleSample::Greedy) => [1.0, 0.0, 0.0, 0.0],
        Some(SimpleSample::Nucleus {
            temperature,
            top_p,
            u,
        }) => [2.0, temperature, top_p, u],
    }
}

/// Checks `sample_rows` (the device sampling of [`CudaBatchModel::step_sampled`]) on `gpu`
/// against the host sampler ([`SimpleSample::pick`]) with rows of `vocab` logits: random rows
/// at several temperatures and top-p (top-p 1 walks in id order, below 1 most likely first),
/// rows built so the nucleus cut and the draw fall inside groups of exactly tied tokens, rows
/// with minus-infinity logits, greedy rows (argmax, lowest index on ties), and a row without a
/// spec that must come back untouched. A case whose host answer changes when the draw or
/// top-p moves by 1e-4 is within float rounding of a boundary (host and device sum in
/// different orders) and is counted, not compared; every other pick must be equal.
pub fn check_sample_rows(gpu: &Gpu, vocab: usize) -> CheckResult {
    let name = format!("sample_rows vocab={vocab} (device sampling = host)");
    match sample_rows_check(gpu, vocab) {
        Ok((compared, skipped, problems)) => CheckResult {
            passed: problems.is_empty() && compared >= 3 * skipped,
            max_abs: problems.len() as f64,
            max_rel: 0.0,
            tolerance: 0.0,
            detail: if problems.is_empty() {
                format!(
                    "{compared} rows equal to the host sampler, {skipped} within rounding of a boundary (not compared); untouched row kept"
                )
            } else {
                problems.join("; ")
            },
            name,
        },
        Err(e) => CheckResult {
            name,
            passed: false,
            max_abs: f64::NAN,
            max_rel: f64::NAN,
            tolerance: 0.0,
            detail: format!("error: {e}"),
        },
    }
}

/// The rows and specs of [`check_sample_rows`].
fn sample_rows_cases(vocab: usize) -> Vec<(Vec<f32>, Option<SimpleSample>)> {
    let mut rng = super::checks::Rng::new(41);
    let n = vocab.max(16);
    let nuc = |temperature: f32, top_p: f32, u: f32| {
        Some(SimpleSample::Nucleus {
            temperature,
            top_p,
            u,
        })
    };
    let mut cases = Vec::new();
    // Random rows: a peaked head over a flat tail, like real logits.
    for (k, (t, p)) in [
        (1.0, 1.0),
        (0.7, 0.9),
        (1.0, 0.95),
        (1.5, 0.5),
        (0.3, 0.8),
        (1.0, 0.0),
        (0.8, 1.0),
        (2.0, 0.99),
    ]
    .into_iter()
    .enumerate()
    {
        let mut l = rng.vec(n, 3.0);
        for v in l.iter_mut().take(8) {
            *v += 6.0;
        }
        if k % 3 == 0 {
            l[n / 2] = f32::NEG_INFINITY;
            l[1] = l[5]; // an exact tie in the head
        }
        let u = (rng.sym() + 1.0) * 0.5;
        cases.push((l, nuc(t, p, u.min(0.999))));
    }
    // Ties: four tokens of equal logit hold most of the mass. top_p 0.5 keeps 3 of them
    // (in id order), the draw lands in the middle one, or in the first of the tail.
    let mut tied = vec![-4.0f32; n];
    for &i in &[9usize, 3, 12, 7] {
        tied[i] = 4.0;
    }
    tied[n - 1] = 1.0;
    cases.push((tied.clone(), nuc(1.0, 0.5, 0.5)));
    cases.push((tied.clone(), nuc(1.0, 0.5, 0.1)));
    cases.push((tied.clone(), nuc(1.0, 1.0, 0.6)));
    cases.push((tied.clone(), nuc(1.0, 0.999, 0.9999)));
    // Greedy, ties at the maximum, a row of minus infinity but one.
    cases.push((tied.clone(), Some(SimpleSample::Greedy)));
    cases.push((rng.vec(n, 2.0), Some(SimpleSample::Greedy)));
    let mut lone = vec![f32::NEG_INFINITY; n];
    lone[n - 3] = 0.5;
    cases.push((lone.clone(), nuc(0.9, 0.9, 0.7)));
    cases.push((lone, nuc(0.9, 1.0, 0.2)));
    // No spec: left alone.
    cases.push((rng.vec(n, 1.0), None));
    cases
}

fn sample_rows_check(gpu: &Gpu, vocab: usize) -> Result<(usize, usize, Vec<String>), CudaError> {
    let cases = sample_rows_cases(vocab);
    let n = cases[0].0.len();
    let rows = cases.len();
    let flat: Vec<f32> = cases.iter().flat_map(|c| c.0.iter().copied()).collect();
    let spec: Vec<f32> = cases.iter().flat_map(|(_, s)| sample_spec(*s)).collect();
    let mut logits = gpu.upload_f32(&flat)?;
    let specs = gpu.upload_f32(&spec)?;
    let out = gpu.alloc(rows * 4)?;
    let mut run = || -> Result<Vec<u32>, CudaError> {
        // Sampled rows are overwritten with probabilities: start each run from the logits.
        gpu.write(&mut logits, 0, &f32_bytes(&flat))?;
        gpu.launch(
            "sample_rows",
            Shape {
                grid: (rows as u32, 1, 1),
                block: (REDUCE_THREADS, 1, 1),
                smem: 0,
            },
            &[
                Arg::Ptr(logits.ptr),
                Arg::I32(n as i32),
                Arg::Ptr(specs.ptr),
                Arg::Ptr(out.ptr),
            ],
        )?;
        gpu.read_u32(&out, 0, rows)
    };
    let got = run()?;
    let again = run()?;
    let mut problems = Vec::new();
    if got != again {
        problems.push(format!("not deterministic: {got:?} vs {again:?}"));
    }
    let (mut compared, mut skipped) = (0, 0);
    for (r, ((l, s), &tok)) in cases.iter().zip(&got).enumerate() {
        let Some(s) = *s else {
            let back = gpu.read_f32(&logits, r * n, n)?;
            if back.iter().zip(l).any(|(a, b)| a.to_bits() != b.to_bits()) {
                problems.push(format!("row {r} without a spec was changed"));
            }
            continue;
        };
        let want = s.pick(l);
        let ambiguous = match s {
            SimpleSample::Greedy => false,
            SimpleSample::Nucleus {
                temperature,
                top_p,
                u,
            } => [(-2e-5, 0.0), (2e-5, 0.0), (0.0, -2e-5), (0.0, 2e-5)]
                .iter()
                .any(|&(du, dp)| {
                    let moved = SimpleSample::Nucleus {
                        temperature,
                        top_p: if top_p >= 1.0 { top_p } else { top_p + dp },
                        u: (u + du).clamp(0.0, 0.999_999),
                    };
                    moved.pick(l) != want
                }),
        };
        if ambiguous {
            skipped += 1;
            eprintln!("sample_rows check: row {r} {s:?} is within rounding of a boundary");
            continue;
        }
        compared += 1;
        if tok != want {
            problems.push(format!("row {r} {s:?}: device {tok}, host {want}"));
        }
    }
    Ok((compared, skipped, problems))
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Checks [`CudaBatchModel`] on `gpu` with a tiny synthetic model of weight type `ty` and the
/// f32 products ([`DecodeMatvec::Float`]): three sequences in scattered, non-contiguous blocks;
/// a step of two prompts, then one mixing two decode tokens with a prompt chunk that wants no
/// logits, then the chunk's end with a decode token. Every returned row must equal its sequence
/// run alone: the f32 reference ([`crate::cpu::naive_forward`], relative tolerance 1e-3 of max
/// |logit|), for the first sequence the single-sequence [`CudaBackend`] with the float decode
/// mat-vec (1e-4), and bit for bit the same sequence's work run alone in a fresh batch model
/// (batch independence). A model limited to 3 tokens per pass must return the same logits bit
/// for bit, and greedy picks on the device ([`BatchModel::step_sampled`]) the argmax of the returned rows. (Used by the
/// tests on the emulator and by `gpu-check` on a GPU.)
pub fn check_batch_model(gpu: &Gpu, ty: GgmlType) -> CheckResult {
    check_batch_model_with(gpu, ty, DecodeMatvec::Float)
}

/// As [`check_batch_model`] with the kernels `kind`. With [`DecodeMatvec::Int8`] (int8
/// activations, `matmulq`, for quantized `ty`) the rows are compared with the CPU backend,
/// which quantizes activations the same way, within 1e-2 of max |logit| (an activation value
/// rounded to the other int8 step moves a logit by ~1e-3; the model checks allow 5e-2 between
/// f32 and quantized activations); the distance to the f32 reference is reported as max_abs. Split passes, batch independence and the device argmax are checked as there.
pub fn check_batch_model_with(gpu: &Gpu, ty: GgmlType, kind: DecodeMatvec) -> CheckResult {
    batch_check_result(gpu, ty, kind, &crate::model::LlamaConfig::tiny(), "")
}

/// [`check_batch_model`] on a Qwen3-shaped model (per-head q/k RMSNorm before RoPE, NEOX
/// RoPE, `q_dim` 128 != `dim` 64), f32 products.
pub fn check_batch_model_qwen3(gpu: &Gpu, ty: GgmlType) -> CheckResult {
    let mut cfg = crate::model::LlamaConfig::tiny();
    cfg.arch = "qwen3".into();
    cfg.rope_style = RopeStyle::Neox;
    cfg.head_dim = 32;
    batch_check_result(gpu, ty, DecodeMatvec::Float, &cfg, " qwen3")
}

fn batch_check_result(
    gpu: &Gpu,
    ty: GgmlType,
    kind: DecodeMatvec,
    cfg: &crate::model::LlamaConfig,
    label: &str,
) -> CheckResult {
    let int8 = kind == DecodeMatvec::Int8;
    let path = if int8 { "int8 matmulq" } else { "f32 matmul" };
    let name = format!("batched model{label} {ty} {path} (paged KV, 3 sequences)");
    let tol = if int8 { 1e-2 } else { 1e-3 };
    match batch_model_check(gpu, ty, kind, cfg) {
        Ok(r) => {
            let (main, other) = if int8 {
                (r.vs_cpu, r.vs_ref)
            } else {
                (r.vs_ref, r.vs_solo)
            };
            CheckResult {
                passed: r.problems.is_empty() && main <= tol && (int8 || other <= 1e-4),
                max_abs: other,
                max_rel: main,
                tolerance: tol,
                detail: if !r.problems.is_empty() {
                    r.problems.join("; ")
                } else if int8 {
                    "rel = |d| / max|logit| vs the CPU backend (int8 activations too); max_abs = rel vs the f32 reference (informative); rows alone, split passes, bucketed decode steps (graphs on a GPU) and device argmax identical".into()
                } else {
                    "rel = |d| / max|logit| vs the f32 reference; max_abs = rel vs CudaBackend alone (tol 1e-4); rows alone, split passes, bucketed decode steps (graphs on a GPU) and device argmax identical".into()
                },
                name,
            }
        }
        Err(e) => CheckResult {
            name,
            passed: false,
            max_abs: f64::NAN,
            max_rel: f64::NAN,
            tolerance: tol,
            detail: format!("error: {e}"),
        },
    }
}

/// |a - b| relative to max |b|.
fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs() as f64)).max(1e-6);
    super::checks::diff(a, b, 1.0).0 / scale
}

/// What [`batch_model_check`] found: worst relative differences and the problems.
struct BatchCheck {
    /// vs the f32 reference.
    vs_ref: f64,
    /// Sequence 0 vs the single-sequence backend (float decode mat-vec).
    vs_solo: f64,
    /// vs the CPU backend (int8 kind only; 0 otherwise).
    vs_cpu: f64,
    problems: Vec<String>,
}

fn batch_model_check(
    gpu: &Gpu,
    ty: GgmlType,
    kind: DecodeMatvec,
    cfg: &crate::model::LlamaConfig,
) -> Result<BatchCheck, String> {
    const CTX: usize = 32;
    let e = |x: InferenceError| x.to_string();
    let bytes = crate::synthetic::synthetic_gguf(cfg, ty, 7).map_err(e)?;
    let g = crate::gguf::Gguf::parse(&bytes).map_err(|x| x.to_string())?;
    let w = crate::model::LlamaWeights::from_gguf(&g).map_err(e)?;
    let load = || {
        CudaBackend::load_on(
            gpu.clone(),
            &w,
            &CudaOptions {
                ordinal: gpu.info.ordinal,
                max_context: Some(CTX),
                ..Default::default()
            },
        )
    };
    // Four slots (one never used) so a decode step of three sequences pads to a bucket of 4.
    let model = |max_step_tokens| -> Result<CudaBatchModel, InferenceError> {
        let mut m = CudaBatchModel::new(
            load()?,
            &CudaBatchOptions {
                slots: 4,
                block_size: 4,
                kv_blocks: 16,
                max_context: Some(CTX),
                max_step_tokens,
            },
        )?;
        m.set_matmul(kind);
        Ok(m)
    };
    let mut rng = super::checks::Rng::new(11);
    let vocab = cfg.vocab as u64;
    let mut seq =
        |n: usize| -> Vec<u32> { (0..n).map(|_| (rng.next_u64() % vocab) as u32).collect() };
    let seqs = [seq(8), seq(5), seq(6)];
    let tables: [&[u32]; 3] = [&[5, 2], &[9, 0], &[11, 3]];
    let item = |slot: usize, from: usize, to: usize, want: bool| SeqWork {
        slot,
        tokens: &seqs[slot][from..to],
        start_pos: from,
        blocks: tables[slot],
        want_logits: want,
    };
    let steps = [
        vec![item(0, 0, 6, true), item(1, 0, 3, true)],
        vec![
            item(1, 3, 4, true),
            item(0, 6, 7, true),
            item(2, 0, 4, false),
        ],
        vec![item(2, 4, 6, true), item(0, 7, 8, true)],
    ];
    let mut m = model(16).map_err(e)?;
    let mut split = model(3).map_err(e)?;
    let mut problems = Vec::new();
    let mut vs_ref = 0f64;
    let mut first_seq = Vec::new();
    let mut last_rows = Vec::new();
    // Rows per slot in step order, to compare with each sequence run alone.
    let mut per_slot: [Vec<Vec<f32>>; 3] = Default::default();
    let mut all_rows = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        let out = m.step(s).map_err(e)?;
        if split.step(s).map_err(e)? != out {
            problems.push(format!("step {i}: passes of 3 tokens changed the logits"));
        }
        last_rows.clear();
        for (wk, l) in s.iter().zip(out) {
            if l.is_some() != wk.want_logits {
                problems.push(format!(
                    "step {i} slot {}: logits returned {}",
                    wk.slot,
                    l.is_some()
                ));
            }
            let Some(l) = l else { continue };
            let prefix = &seqs[wk.slot][..wk.start_pos + wk.tokens.len()];
            let want = crate::cpu::naive_forward(&w, prefix).map_err(e)?;
            vs_ref = vs_ref.max(rel_diff(&l, &want));
            if wk.slot == 0 {
                first_seq.push(l.clone());
            }
            per_slot[wk.slot].push(l.clone());
            all_rows.push((prefix.to_vec(), l.clone()));
            last_rows.push(l);
        }
    }
    // Batch independence: each sequence's work alone, in a fresh model, step by step.
    for (slot, want) in per_slot.iter().enumerate() {
        let mut alone = model(16).map_err(e)?;
        let mut got = Vec::new();
        for s in &steps {
            let mine: Vec<SeqWork<'_>> = s.iter().filter(|w| w.slot == slot).copied().collect();
            if !mine.is_empty() {
                got.extend(alone.step(&mine).map_err(e)?.into_iter().flatten());
            }
        }
        if &got != want {
            problems.push(format!(
                "sequence {slot} alone differs from the same sequence in the batch"
            ));
        }
    }
    // Sequence 0 alone through the single-sequence backend (f32 activations throughout).
    let mut solo = load().map_err(e)?;
    let (_, bps) = solo.decode_matvec();
    solo.set_decode_matvec(DecodeMatvec::Float, bps);
    let a = &seqs[0];
    let alone = [
        solo.forward_logits(&a[..6], 0).map_err(e)?,
        solo.forward_logits(&a[6..7], 6).map_err(e)?,
        solo.forward_logits(&a[7..8], 7).map_err(e)?,
    ];
    if first_seq.len() != alone.len() {
        problems.push(format!(
            "sequence 0 got {} rows of logits, expected 3",
            first_seq.len()
        ));
    }
    let vs_solo = first_seq
        .iter()
        .zip(&alone)
        .map(|(o, s)| rel_diff(o, s))
        .fold(0f64, f64::max);
    // The CPU backend quantizes activations per 32 elements for quantized weights, as the
    // int8 path does.
    let mut vs_cpu = 0f64;
    if kind == DecodeMatvec::Int8 {
        let mut cpu = crate::cpu::CpuBackend::new(
            &w,
            &crate::cpu::CpuOptions {
                threads: 1,
                max_context: CTX,
                batch: 8,
            },
        )
        .map_err(e)?;
        for (prefix, l) in &all_rows {
            cpu.reset();
            let want = cpu.forward(prefix, 0).map_err(e)?;
            vs_cpu = vs_cpu.max(rel_diff(l, &want));
        }
    }
    // Rerunning the last step rewrites the same K/V: the picks must be the rows' argmax.
    let greedy = vec![Some(SimpleSample::Greedy); steps[2].len()];
    let picks: Vec<Option<u32>> = m
        .step_sampled(&steps[2], &greedy)
        .map_err(e)?
        .into_iter()
        .map(|o| match o {
            Some(RowOutput::Token(t)) => Some(t),
            _ => None,
        })
        .collect();
    let want: Vec<Option<u32>> = last_rows
        .iter()
        .map(|l| Some(super::checks::argmax_ref(l) as u32))
        .collect();
    if picks != want {
        problems.push(format!("device argmax {picks:?}, host argmax {want:?}"));
    }
    decode_graph_check(&seqs, &tables, &model, &mut problems).map_err(e)?;
    Ok(BatchCheck {
        vs_ref,
        vs_solo,
        vs_cpu,
        problems,
    })
}

/// Decode-only steps padded to their bucket (and replayed from graphs where the device has
/// them) must give the unpadded steps' logits bit for bit: a prefill step, then decode steps of
/// 3 (padded to 4), 2 and 1 sequences, then a mixed step (no padding) that reads the K/V the
/// padded steps wrote. Mismatches go to `problems`.
fn decode_graph_check(
    seqs: &[Vec<u32>; 3],
    tables: &[&[u32]; 3],
    model: &dyn Fn(usize) -> Result<CudaBatchModel, InferenceError>,
    problems: &mut Vec<String>,
) -> Result<(), InferenceError> {
    let item = |slot: usize, from: usize, to: usize| SeqWork {
        slot,
        tokens: &seqs[slot][from..to],
        start_pos: from,
        blocks: tables[slot],
        want_logits: true,
    };
    let steps = [
        vec![item(0, 0, 4), item(1, 0, 3), item(2, 0, 3)],
        vec![item(0, 4, 5), item(1, 3, 4), item(2, 3, 4)],
        vec![item(2, 4, 5), item(0, 5, 6)],
        vec![item(1, 4, 5)],
        vec![item(0, 6, 8), item(2, 5, 6)],
    ];
    let mut plain = model(16)?;
    plain.set_decode_graphs(DecodeGraphs::Off);
    let mut padded = model(16)?;
    padded.set_decode_graphs(DecodeGraphs::Graphs);
    let mode = padded.decode_graphs();
    for (i, s) in steps.iter().enumerate() {
        let want = plain.step(s)?;
        let got = padded.step(s)?;
        if got != want {
            problems.push(format!(
                "decode step {i} ({} sequences) as {mode:?} differs from the unpadded step",
                s.len()
            ));
        }
    }
    if let Some(err) = padded.graph_error() {
        problems.push(format!("decode graph capture failed: {err}"));
    } else if mode == DecodeGraphs::Graphs && padded.captured_graphs() != 3 {
        problems.push(format!(
            "{} decode graphs captured, expected 3 (buckets 4, 2, 1)",
            padded.captured_graphs()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! On the host kernel emulator (same kernel source, no GPU), with tiny synthetic models.
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::sync::Arc;

    use super::*;
    use crate::cpu::{CpuBackend, CpuOptions, naive_forward};
    use crate::cuda::{CudaOptions, Gpu};
    use crate::gguf::{GgmlType, Gguf};
    use crate::model::{LlamaConfig, LlamaWeights};
    use crate::sampling::SamplingParams;
    use crate::scheduler::{
        CpuBatchModel, Event, Request, RequestHandle, Scheduler, SchedulerConfig,
    };

    const CTX: usize = 32;

    fn emu() -> Option<Gpu> {
        match Gpu::emulated() {
            Ok(g) => Some(g),
            Err(e) => {
                eprintln!("SKIPPED: kernel emulator unavailable ({e}); batched CUDA model not run");
                None
            }
        }
    }

    fn backend(gpu: &Gpu, bytes: &[u8]) -> CudaBackend {
        let g = Gguf::parse(bytes).unwrap();
        let w = LlamaWeights::from_gguf(&g).unwrap();
        CudaBackend::load_on(
            gpu.clone(),
            &w,
            &CudaOptions {
                max_context: Some(CTX),
                ..Default::default()
            },
        )
        .unwrap()
    }

    fn model(gpu: &Gpu, bytes: &[u8], kv_blocks: usize, max_step_tokens: usize) -> CudaBatchModel {
        CudaBatchModel::new(
            backend(gpu, bytes),
            &CudaBatchOptions {
                slots: 3,
                block_size: 4,
                kv_blocks,
                max_context: Some(CTX),
                max_step_tokens,
            },
        )
        .unwrap()
    }

    /// The straightforward f32 forward pass of the whole sequence (last token's logits).
    fn reference(bytes: &[u8], tokens: &[u32]) -> Vec<f32> {
        let g = Gguf::parse(bytes).unwrap();
        naive_forward(&LlamaWeights::from_gguf(&g).unwrap(), tokens).unwrap()
    }

    /// The CPU backend's logits after `tokens` (activations quantized for quantized weights).
    fn cpu_logits(bytes: &[u8], tokens: &[u32]) -> Vec<f32> {
        let g = Gguf::parse(bytes).unwrap();
        let w = LlamaWeights::from_gguf(&g).unwrap();
        let mut cpu = CpuBackend::new(
            &w,
            &CpuOptions {
                threads: 1,
                max_context: CTX,
                batch: 8,
            },
        )
        .unwrap();
        cpu.forward(tokens, 0).unwrap()
    }

    fn work<'a>(
        slot: usize,
        seq: &'a [u32],
        from: usize,
        to: usize,
        blocks: &'a [u32],
        want: bool,
    ) -> SeqWork<'a> {
        SeqWork {
            slot,
            tokens: &seq[from..to],
            start_pos: from,
            blocks,
            want_logits: want,
        }
    }

    /// A quantized `rows x k` test matrix of `ty` on `gpu` and its dequantized dense values.
    fn quant_matrix(
        gpu: &Gpu,
        ty: GgmlType,
        rows: usize,
        k: usize,
        seed: u64,
    ) -> (GpuMatrix, Vec<f32>) {
        let mut rng = crate::cuda::checks::Rng::new(seed);
        let vals = rng.vec(rows * k, 1.0);
        let bytes = crate::quant::quantize(ty, &vals).unwrap();
        let dense = crate::quant::dequantize_vec(ty, &bytes, rows * k).unwrap();
        let t = crate::model::TensorRef {
            name: "w".into(),
            ty,
            dims: vec![k as u64, rows as u64],
            data: &bytes,
            offset: 0,
            size: bytes.len() as u64,
        };
        let r = crate::cuda::weights::repack(&[&t]).unwrap();
        (GpuMatrix::upload(gpu, &r).unwrap(), dense)
    }

    /// Runs `quantize_rows` then `matmulq_<type>` on the device for the `t` rows of `x`, into a
    /// `t x ldy` output starting as `y0`; returns the output and the quantized rows' bytes.
    #[allow(clippy::too_many_arguments)]
    fn run_matmulq(
        gpu: &Gpu,
        m: &GpuMatrix,
        x: &[f32],
        t: usize,
        ldy: usize,
        y0: &[f32],
        acc: bool,
    ) -> (Vec<f32>, Vec<u8>) {
        let k = m.k;
        let dx = gpu.upload_f32(&x[..t * k]).unwrap();
        let xq = gpu.alloc(t * act_q8_row_bytes(k)).unwrap();
        let dy = gpu.upload_f32(&y0[..t * ldy]).unwrap();
        gpu.launch(
            "quantize_rows",
            quantize_rows_shape(k, t),
            &[
                Arg::Ptr(dx.ptr),
                Arg::Ptr(xq.ptr),
                Arg::I32(k as i32),
                Arg::I32(k as i32),
            ],
        )
        .unwrap();
        let (qs, d, mm) = m.ptrs();
        gpu.launch(
            &format!("matmulq_{}", m.kind.suffix()),
            matmulq_shape(m.rows, t),
            &[
                Arg::Ptr(qs),
                Arg::Ptr(d),
                Arg::Ptr(mm),
                Arg::Ptr(xq.ptr),
                Arg::Ptr(dy.ptr),
                Arg::I32(m.rows as i32),
                Arg::I32(k as i32),
                Arg::I32(t as i32),
                Arg::I32(ldy as i32),
                Arg::I32(acc as i32),
            ],
        )
        .unwrap();
        gpu.sync().unwrap();
        (
            gpu.read_f32(&dy, 0, t * ldy).unwrap(),
            gpu.read(&xq, 0, t * act_q8_row_bytes(k)).unwrap(),
        )
    }

    /// `quantize_rows` + `matmulq_<type>` against the dequantized weights times each row
    /// quantized by the CPU kernels (f64 sums), for T in {1, 3, 8, 17, 64, 70}, stored and
    /// accumulated (into a wider output, at a column offset); every quantized row equals the CPU
    /// quantization bit for bit; and each row's output is bit-identical whatever T it ran in.
    #[test]
    fn matmulq_matches_reference_and_is_batch_independent() {
        let Some(gpu) = emu() else { return };
        // 40 rows: a partial row group; k = 96: an odd block count (row padding), one partial
        // chunk; k = 320: two chunks.
        for (ty, rows, k) in [
            (GgmlType::Q8_0, 40, 64),
            (GgmlType::Q4_0, 40, 96),
            (GgmlType::Q4_1, 33, 320),
        ] {
            let (m, dense) = quant_matrix(&gpu, ty, rows, k, 3 + k as u64);
            let mut rng = crate::cuda::checks::Rng::new(9);
            let tmax = 70;
            let x = rng.vec(tmax * k, 2.0);
            let ldy = rows + 5;
            let y0 = rng.vec(tmax * ldy, 1.0);
            // Reference per row: W q8(x_t), and sum |w v| for the error scale.
            let mut want = vec![0f64; tmax * rows];
            let mut mag = vec![0f64; tmax * rows];
            let mut want_q = Vec::new();
            for tt in 0..tmax {
                let mut blocks = vec![crate::kernels::BlockQ8::default(); k / 32];
                crate::kernels::quantize_q8(&x[tt * k..(tt + 1) * k], &mut blocks);
                let v: Vec<f32> = blocks
                    .iter()
                    .flat_map(|b| b.qs.iter().map(move |q| *q as f32 * b.d))
                    .collect();
                want_q.push(blocks);
                for r in 0..rows {
                    for (wv, xv) in dense[r * k..(r + 1) * k].iter().zip(&v) {
                        want[tt * rows + r] += *wv as f64 * *xv as f64;
                        mag[tt * rows + r] += (*wv as f64 * *xv as f64).abs();
                    }
                }
            }
            let (full, xq) = run_matmulq(&gpu, &m, &x, tmax, ldy, &y0, false);
            // The quantized rows: quantize_act's layout per row, rows act_q8_row_bytes apart.
            let nb = k / 32;
            let rb = act_q8_row_bytes(k);
            for (tt, blocks) in want_q.iter().enumerate() {
                let row = &xq[tt * rb..];
                let f = |o: usize| f32::from_le_bytes(row[o..o + 4].try_into().unwrap());
                for (b, blk) in blocks.iter().enumerate() {
                    assert_eq!(f(nb * 32 + 4 * b), blk.d, "{ty} row {tt} block {b} scale");
                    assert_eq!(f(nb * 36 + 4 * b), blk.s, "{ty} row {tt} block {b} sum");
                    for j in 0..32 {
                        let off = if j < 16 {
                            b * 16 + j
                        } else {
                            nb * 16 + b * 16 + j - 16
                        };
                        assert_eq!(row[off] as i8, blk.qs[j], "{ty} row {tt} block {b} [{j}]");
                    }
                }
            }
            for t in [1usize, 3, 8, 17, 64, 70] {
                for acc in [false, true] {
                    let (got, _) = run_matmulq(&gpu, &m, &x, t, ldy, &y0, acc);
                    let mut worst = 0f64;
                    for tt in 0..t {
                        for c in 0..ldy {
                            let g = got[tt * ldy + c];
                            if c >= rows {
                                assert_eq!(g, y0[tt * ldy + c], "{ty} T={t}: column {c} written");
                                continue;
                            }
                            let base = if acc { y0[tt * ldy + c] as f64 } else { 0.0 };
                            let d = (g as f64 - base - want[tt * rows + c]).abs();
                            worst = worst.max(d / (mag[tt * rows + c] + base.abs()).max(1e-9));
                            if !acc {
                                assert_eq!(
                                    g.to_bits(),
                                    full[tt * ldy + c].to_bits(),
                                    "{ty}: token {tt} row {c} differs between T={t} and T={tmax}"
                                );
                            }
                        }
                    }
                    eprintln!("matmulq {ty} {rows}x{k} T={t} acc={acc}: rel err {worst:.2e}");
                    assert!(
                        worst < 1e-5,
                        "{ty} {rows}x{k} T={t} acc={acc}: rel err {worst}"
                    );
                }
            }
            // A row alone (not the first of its pass) gives the same bits as in the batch.
            let (alone, _) = run_matmulq(&gpu, &m, &x[5 * k..6 * k], 1, ldy, &y0, false);
            for c in 0..rows {
                assert_eq!(
                    alone[c].to_bits(),
                    full[5 * ldy + c].to_bits(),
                    "{ty} row 5 alone"
                );
            }
        }
    }

    #[test]
    fn matmulq_launch_shapes() {
        assert_eq!(matmulq_shape(4096, 1).grid, (128, 1, 1));
        assert_eq!(matmulq_shape(4097, 64).grid, (129, 1, 1));
        assert_eq!(matmulq_shape(33, 65).grid, (2, 2, 1));
        assert_eq!(matmulq_shape(1, 0).grid, (1, 1, 1));
        assert_eq!(quantize_rows_shape(4096, 7).grid, (16, 7, 1));
        assert_eq!(act_q8_row_bytes(64), 80);
        assert_eq!(act_q8_row_bytes(96), 128);
        assert_eq!(act_q8_row_bytes(4096) % 16, 0);
        assert!(has_matmulq(crate::cuda::kernels::WeightKind::Q4_1));
        assert!(!has_matmulq(crate::cuda::kernels::WeightKind::F16));
    }

    /// The int8 path ([`check_batch_model_with`]): rows within the quantized tolerance of the
    /// CPU backend, each sequence alone bit-identical to the batch, split passes identical.
    #[test]
    fn int8_step_logits_match_cpu_and_each_sequence_alone() {
        let Some(gpu) = emu() else { return };
        // Q4_1 (scale and min); Q8_0 and Q4_0 run in the scheduler and recycling tests.
        let r = check_batch_model_with(&gpu, GgmlType::Q4_1, DecodeMatvec::Int8);
        eprintln!("{}", r.line());
        assert!(r.passed, "{}", r.line());
        assert!(r.name.contains("int8"));
        // The host emulator computes like the CPU backend: far inside the GPU tolerance.
        assert!(r.max_rel < 1e-4, "{}", r.line());
    }

    /// See [`check_batch_model`]: every row equals its sequence run alone, a pass limit
    /// changes nothing, the device argmax equals the host's.
    #[test]
    fn step_logits_match_each_sequence_alone() {
        let Some(gpu) = emu() else { return };
        let r = check_batch_model(&gpu, GgmlType::Q8_0);
        eprintln!("{}", r.line());
        assert!(r.passed, "{}", r.line());
        assert!(r.max_rel < 1e-3 && r.name.contains("Q8_0"));
    }

    /// The same on a Qwen3-shaped model: the per-head q/k norms run in the batched pass.
    #[test]
    fn qwen3_step_logits_match_each_sequence_alone() {
        let Some(gpu) = emu() else { return };
        let r = check_batch_model_qwen3(&gpu, GgmlType::Q8_0);
        eprintln!("{}", r.line());
        assert!(r.passed, "{}", r.line());
        assert!(r.name.contains("qwen3"));
    }

    /// The fused launches of the int8 path (`rmsnorm_quantize_rows`, `silu_mul_quantize_rows`)
    /// give bit for bit the logits of the separate norm / SiLU and quantization launches.
    #[test]
    fn fused_quantization_equals_the_separate_launches() {
        let Some(gpu) = emu() else { return };
        for ty in [GgmlType::Q8_0, GgmlType::Q4_1] {
            let bytes = crate::synthetic::synthetic_gguf(&LlamaConfig::tiny(), ty, 9).unwrap();
            let a: Vec<u32> = (10..19).collect();
            let b = [300u32, 7, 8];
            let run = |fused: bool| {
                let mut m = model(&gpu, &bytes, 8, 16);
                assert_eq!(m.matmul_kind(), DecodeMatvec::Int8);
                m.set_fused(fused);
                let first = m
                    .step(&[
                        work(0, &a, 0, 9, &[0, 1, 2], true),
                        work(1, &b, 0, 3, &[5], true),
                    ])
                    .unwrap();
                let second = m
                    .step(&[work(1, &[300, 7, 8, 42], 3, 4, &[5], true)])
                    .unwrap();
                (first, second)
            };
            let fused = run(true);
            let separate = run(false);
            let bits = |v: &[Option<Vec<f32>>]| -> Vec<Vec<u32>> {
                v.iter()
                    .map(|l| l.as_ref().unwrap().iter().map(|x| x.to_bits()).collect())
                    .collect()
            };
            assert_eq!(bits(&fused.0), bits(&separate.0), "{ty} prefill");
            assert_eq!(bits(&fused.1), bits(&separate.1), "{ty} decode");
        }
    }

    /// The backend's own single-sequence KV cache is freed when the batch model takes it over
    /// (the batch runs on its paged pools).
    #[test]
    fn the_single_sequence_cache_is_freed() {
        let Some(gpu) = emu() else { return };
        let bytes =
            crate::synthetic::synthetic_gguf(&LlamaConfig::tiny(), GgmlType::Q8_0, 1).unwrap();
        let be = backend(&gpu, &bytes);
        let c = LlamaConfig::tiny();
        let full = 2 * c.n_layers * CTX * c.kv_dim() * 4;
        assert_eq!(be.kv_cache_bytes(), full);
        let m = CudaBatchModel::new(
            be,
            &CudaBatchOptions {
                slots: 2,
                block_size: 4,
                kv_blocks: 4,
                max_context: None,
                max_step_tokens: 8,
            },
        )
        .unwrap();
        assert_eq!(m.backend().kv_cache_bytes(), 0);
        assert_eq!(
            m.max_context(),
            CTX,
            "the batch keeps the backend's context"
        );
        // 4 blocks of 4 positions, and the scratch block of bucketed decode steps.
        assert_eq!(m.kv_bytes(), 2 * c.n_layers * (4 + 1) * 4 * c.kv_dim() * 4);
    }

    /// A sequence in blocks that another, longer sequence filled and released computes exactly
    /// what it computes in a fresh pool: nothing of the old data is read.
    #[test]
    fn recycled_blocks_do_not_leak_old_data() {
        let Some(gpu) = emu() else { return };
        let bytes =
            crate::synthetic::synthetic_gguf(&LlamaConfig::tiny(), GgmlType::Q4_0, 3).unwrap();
        let old: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % 384).collect();
        let new: Vec<u32> = vec![17, 200, 3, 99, 250];
        let blocks = [2u32, 0, 1];
        let run_new = |m: &mut CudaBatchModel| -> Vec<Vec<f32>> {
            let mut v = Vec::new();
            for (from, to) in [(0, 5), (5, 6)] {
                let mut s = new.clone();
                s.push(42);
                let w = SeqWork {
                    slot: 1,
                    tokens: &s[from..to],
                    start_pos: from,
                    blocks: &blocks[..2],
                    want_logits: true,
                };
                v.push(m.step(&[w]).unwrap().remove(0).unwrap());
            }
            v
        };
        let mut used = model(&gpu, &bytes, 3, 16);
        used.step(&[SeqWork {
            slot: 0,
            tokens: &old,
            start_pos: 0,
            blocks: &blocks,
            want_logits: true,
        }])
        .unwrap();
        used.release(0);
        let recycled = run_new(&mut used);
        let fresh = run_new(&mut model(&gpu, &bytes, 3, 16));
        assert_eq!(recycled, fresh, "recycled blocks changed the logits");
        let mut full = new.clone();
        full.push(42);
        // The int8 products (the default for Q4_0) quantize activations as the CPU backend does.
        assert_eq!(used.matmul_kind(), DecodeMatvec::Int8);
        assert!(rel_diff(&recycled[1], &cpu_logits(&bytes, &full)) < 1e-4);
        assert!(rel_diff(&recycled[1], &reference(&bytes, &full)) < 5e-2);
    }

    /// Malformed work is refused before anything runs (no kernel may address outside the pool).
    #[test]
    fn invalid_work_is_refused() {
        let Some(gpu) = emu() else { return };
        let bytes =
            crate::synthetic::synthetic_gguf(&LlamaConfig::tiny(), GgmlType::Q8_0, 1).unwrap();
        let mut m = model(&gpu, &bytes, 4, 8);
        let t = [1u32, 2, 3, 4, 5];
        let ok = [0u32, 1];
        let cases: Vec<(Vec<SeqWork<'_>>, &str)> = vec![
            (vec![work(3, &t, 0, 1, &ok, true)], "does not exist"),
            (vec![work(0, &t, 0, 5, &ok[..1], true)], "cannot hold"),
            (vec![work(0, &t, 0, 5, &[0, 4], true)], "outside the pool"),
            (
                vec![work(1, &t, 0, 1, &ok, true), work(1, &t, 1, 2, &ok, true)],
                "twice",
            ),
            (vec![work(0, &[400], 0, 1, &ok, true)], "vocab"),
            (vec![work(0, &t, 0, 0, &ok, true)], "no tokens"),
        ];
        for (w, want) in cases {
            let e = m.step(&w).unwrap_err().to_string();
            assert!(e.to_lowercase().contains(want), "{e} (wanted {want:?})");
        }
        let long = [7u32; CTX + 1];
        let blocks: Vec<u32> = (0..4).collect();
        assert!(
            m.step(&[work(0, &long, 0, CTX + 1, &blocks, true)])
                .is_err()
        );
    }

    fn drain(h: &mut RequestHandle) -> Option<Vec<u32>> {
        while let Some(e) = h.try_recv() {
            match e {
                Event::Piece { .. } => {}
                Event::Finished(c) => return Some(c.tokens),
                Event::Failed(m) => panic!("request failed: {m}"),
            }
        }
        None
    }

    /// Drives `s` with requests joining at fixed steps; returns each request's tokens and the
    /// largest number of sequences that ran in one step.
    fn drive<M: BatchModel>(
        s: &mut Scheduler<M>,
        reqs: &[(Vec<u32>, usize)],
    ) -> (Vec<Vec<u32>>, usize) {
        drive_with(s, reqs, |_| SamplingParams::default())
    }

    /// [`drive`] with request `i`'s sampling parameters from `params(i)` (`max_tokens` set
    /// from the request).
    fn drive_with<M: BatchModel>(
        s: &mut Scheduler<M>,
        reqs: &[(Vec<u32>, usize)],
        params: impl Fn(usize) -> SamplingParams,
    ) -> (Vec<Vec<u32>>, usize) {
        let mut handles = Vec::new();
        let mut out: Vec<Option<Vec<u32>>> = vec![None; reqs.len()];
        let mut step = 0;
        let mut most = 0;
        while handles.len() < reqs.len() || !s.is_idle() {
            // Two at first, then one more every second step.
            while handles.len() < reqs.len() && (handles.len() < 2 || step % 2 == 1) {
                let (p, n) = &reqs[handles.len()];
                let params = SamplingParams {
                    max_tokens: *n,
                    ..params(handles.len())
                };
                handles.push(
                    s.submit(Request {
                        prompt: p.clone(),
                        params,
                    })
                    .unwrap(),
                );
                if handles.len() >= 2 {
                    break;
                }
            }
            let r = s.step().unwrap();
            most = most.max(r.decoded + usize::from(r.prefilled > 0));
            step += 1;
            assert!(step < 500, "the scheduler did not drain");
            for (h, o) in handles.iter_mut().zip(out.iter_mut()) {
                if o.is_none() {
                    *o = drain(h);
                }
            }
        }
        (out.into_iter().map(Option::unwrap).collect(), most)
    }

    /// The scheduler over the batched CUDA model gives token for token what it gives over the
    /// CPU reference (f32 weights: both compute in f32), with sequences of different prompt
    /// lengths and `max_tokens` joining and leaving mid-batch, chunked prefill, and a pool so
    /// small that later requests run in blocks earlier ones released.
    #[test]
    fn scheduler_over_cuda_batch_equals_cpu() {
        scheduler_equals_cpu(GgmlType::F32, 5, false);
    }

    /// As above with Q8_0 weights and the int8 products (both the CPU backend and `matmulq`
    /// quantize activations per 32 elements); each request's tokens are also the greedy
    /// tokens of the single-sequence CUDA backend (int8 decode mat-vec, fed one token at a time)
    /// run alone.
    #[test]
    fn scheduler_over_cuda_int8_batch_equals_cpu_and_solo() {
        let (reqs, got) = scheduler_equals_cpu(GgmlType::Q8_0, 6, true);
        let Some(gpu) = emu() else { return };
        let bytes =
            crate::synthetic::synthetic_gguf(&LlamaConfig::tiny(), GgmlType::Q8_0, 6).unwrap();
        let mut solo = backend(&gpu, &bytes);
        for ((prompt, n), toks) in reqs.iter().zip(&got) {
            solo.reset();
            // One token at a time, so every product is the int8 decode mat-vec (the backend's
            // prefill multiplies f32 activations, the batch model int8 ones).
            let mut seq = prompt.clone();
            let mut greedy = Vec::new();
            let mut l = Vec::new();
            for (pos, &t) in prompt.iter().enumerate() {
                l = solo.forward(&[t], pos).unwrap();
            }
            while greedy.len() < *n {
                if !greedy.is_empty() {
                    l = solo.forward(&seq[seq.len() - 1..], seq.len() - 1).unwrap();
                }
                let next = crate::cuda::checks::argmax_ref(&l) as u32;
                greedy.push(next);
                seq.push(next);
            }
            // The scheduler may stop early (end of sequence): its tokens are a prefix.
            assert_eq!(
                &greedy[..toks.len()],
                &toks[..],
                "prompt {prompt:?}: {greedy:?}"
            );
        }
    }

    #[test]
    fn decode_buckets_cover_every_batch_size() {
        assert_eq!(decode_buckets(1), vec![1]);
        assert_eq!(decode_buckets(3), vec![1, 2, 3]);
        assert_eq!(decode_buckets(4), vec![1, 2, 4]);
        assert_eq!(decode_buckets(20), vec![1, 2, 4, 8, 16, 20]);
        assert_eq!(
            decode_buckets(64),
            vec![1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
        );
        for cap in 1..80 {
            let b = decode_buckets(cap);
            assert!(b.windows(2).all(|w| w[0] < w[1]), "{b:?}");
            assert_eq!(b.last(), Some(&cap));
            // Never more than 7 padding rows above 8 sequences.
            for n in 9..=cap {
                let t = b.iter().copied().find(|&v| v >= n).unwrap();
                assert!(t - n < 8, "cap {cap}: {n} runs as {t}");
            }
        }
    }

    /// `sample_rows` picks what the host sampler picks (see [`check_sample_rows`]).
    #[test]
    fn sample_rows_equals_the_host_sampler() {
        let Some(gpu) = emu() else { return };
        // More tokens than threads (chunks of several per thread) and idle threads at the end.
        let r = check_sample_rows(&gpu, 3000);
        assert!(r.passed, "{}", r.line());
    }

    /// A batch model that hands every row's logits to the host (the default
    /// [`BatchModel::step_sampled`]) over the CUDA batch model's own logits.
    struct HostSampled(CudaBatchModel);

    impl BatchModel for HostSampled {
        fn name(&self) -> &str {
            "host-sampled"
        }
        fn vocab(&self) -> usize {
            self.0.vocab()
        }
        fn max_context(&self) -> usize {
            self.0.max_context()
        }
        fn slots(&self) -> usize {
            self.0.slots()
        }
        fn step(&mut self, work: &[SeqWork<'_>]) -> Result<Vec<Option<Vec<f32>>>, InferenceError> {
            self.0.step(work)
        }
        fn release(&mut self, slot: usize) {
            self.0.release(slot)
        }
    }

    /// Sampled requests (temperature, top-p, each its own seed) mixed with greedy ones and
    /// one asking for logprobs (which needs the host), two repeating another's prompt: the
    /// scheduler over the CUDA batch model, sampling on the device and sharing prompt blocks,
    /// gives the tokens the host sampler gives from logits computed without sharing.
    #[test]
    fn scheduler_samples_on_the_device_as_the_host_does() {
        let Some(gpu) = emu() else { return };
        let bytes =
            crate::synthetic::synthetic_gguf(&LlamaConfig::tiny(), GgmlType::Q8_0, 8).unwrap();
        let g = Gguf::parse(&bytes).unwrap();
        let (_, tok) = crate::engine::weights_and_tokenizer(&g).unwrap();
        let tok = Arc::new(tok);
        let cfg = SchedulerConfig {
            block_size: 4,
            kv_blocks: 12,
            prefill_chunk: 6,
            max_queued: 8,
        };
        // The last two repeat the first prompt (n choices): over the paged CUDA model they
        // read its first block from the first request's K/V instead of computing it.
        let reqs: Vec<Req> = vec![
            (vec![10, 20, 30, 40, 50, 60], 6),
            (vec![300, 7], 6),
            (vec![1, 2, 3, 4, 5, 6, 7, 8], 5),
            (vec![99, 98, 97], 6),
            (vec![10, 20, 30, 40, 50, 60], 5),
            (vec![10, 20, 30, 40, 50, 60], 5),
        ];
        let params = |i: usize| match i {
            4 => SamplingParams {
                temperature: 0.9,
                top_p: 0.8,
                seed: 15,
                ..Default::default()
            },
            5 => SamplingParams::default(),
            0 => SamplingParams {
                temperature: 0.9,
                top_p: 0.8,
                seed: 11,
                ..Default::default()
            },
            1 => SamplingParams {
                temperature: 1.2,
                seed: 12,
                ..Default::default()
            },
            2 => SamplingParams::default(),
            _ => SamplingParams {
                temperature: 0.7,
                top_p: 0.95,
                seed: 14,
                logprobs: Some(2),
                ..Default::default()
            },
        };
        let make = || {
            CudaBatchModel::new(
                backend(&gpu, &bytes),
                &CudaBatchOptions {
                    max_context: Some(CTX),
                    ..CudaBatchOptions::for_scheduler(3, &cfg)
                },
            )
            .unwrap()
        };
        let mut on_host = Scheduler::new(HostSampled(make()), tok.clone(), cfg.clone());
        let (want, _) = drive_with(&mut on_host, &reqs, params);
        let mut on_device = Scheduler::new(make(), tok.clone(), cfg.clone());
        let (got, most) = drive_with(&mut on_device, &reqs, params);
        assert_eq!(got, want);
        assert!(most >= 2, "sequences ran together");
        // The seeds matter: other seeds give other tokens somewhere.
        let mut reseeded = Scheduler::new(make(), tok, cfg);
        let (other, _) = drive_with(&mut reseeded, &reqs, |i| SamplingParams {
            seed: 1000 + i as u64,
            ..params(i)
        });
        assert_ne!(other, got);
    }

    /// A request: prompt and `max_tokens`.
    type Req = (Vec<u32>, usize);

    /// Runs the requests through the scheduler over the CPU and over the CUDA batch model (the
    /// default products for `ty`), asserts equal tokens; returns the requests and the tokens.
    /// `padded`: the CUDA model has 5 slots and pads decode-only steps to their bucket (a
    /// step of 3 sequences runs as 4 rows), as it does before replaying a graph on a GPU.
    fn scheduler_equals_cpu(ty: GgmlType, seed: u64, padded: bool) -> (Vec<Req>, Vec<Vec<u32>>) {
        let Some(gpu) = emu() else {
            return (Vec::new(), Vec::new());
        };
        let bytes = crate::synthetic::synthetic_gguf(&LlamaConfig::tiny(), ty, seed).unwrap();
        let g = Gguf::parse(&bytes).unwrap();
        let (w, tok) = crate::engine::weights_and_tokenizer(&g).unwrap();
        let tok = Arc::new(tok);
        let cfg = SchedulerConfig {
            block_size: 4,
            kv_blocks: 8,
            prefill_chunk: 5,
            max_queued: 8,
        };
        let reqs: Vec<(Vec<u32>, usize)> = vec![
            (vec![10, 20, 30, 40, 50, 60, 70], 5),
            (vec![300, 7], 6),
            (vec![1, 2, 3, 4, 5, 6, 7, 8, 9], 3),
            (vec![99, 98, 97, 96], 4),
        ];
        let total: usize = reqs.iter().map(|(p, n)| (p.len() + n).div_ceil(4)).sum();
        assert!(total > cfg.kv_blocks, "the test must recycle blocks");
        let cpu = CpuBackend::new(
            &w,
            &CpuOptions {
                threads: 1,
                max_context: CTX,
                batch: 8,
            },
        )
        .unwrap();
        let mut s_cpu = Scheduler::new(CpuBatchModel::new(cpu, 3), tok.clone(), cfg.clone());
        let (want, _) = drive(&mut s_cpu, &reqs);
        let mut cuda = CudaBatchModel::new(
            backend(&gpu, &bytes),
            &CudaBatchOptions {
                max_context: Some(CTX),
                ..CudaBatchOptions::for_scheduler(if padded { 5 } else { 3 }, &cfg)
            },
        )
        .unwrap();
        assert_eq!(
            cuda.decode_graphs(),
            DecodeGraphs::Off,
            "no graphs on the emulator"
        );
        if padded {
            cuda.set_decode_graphs(DecodeGraphs::Graphs);
            assert_eq!(cuda.decode_graphs(), DecodeGraphs::Padded);
        }
        let int8 = has_matmulq(cuda.backend().output().kind);
        assert_eq!(cuda.matmul_kind(), DecodeMatvec::Int8);
        assert_eq!(int8, ty != GgmlType::F32);
        let mut s_gpu = Scheduler::new(cuda, tok, cfg);
        let (got, most) = drive(&mut s_gpu, &reqs);
        assert_eq!(got, want, "{ty}");
        assert!(most >= 2, "sequences ran together");
        assert!(
            want.iter()
                .zip(&reqs)
                .all(|(t, r)| !t.is_empty() && t.len() <= r.1)
        );
        assert_eq!(s_gpu.free_blocks(), s_gpu.total_blocks());
        (reqs, got)
    }
}
