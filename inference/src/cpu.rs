//! The CPU reference backend.
//!
//! Weights are copied out of the GGUF mapping once (quantized matrices are repacked into 16-row
//! groups for the integer kernels, [`crate::packed`]; F16/BF16 matrices are widened to F32). A
//! forward pass runs SPMD on a team of `threads` scoped threads that move in lockstep through
//! the layer phases, separated by a spinning barrier; every matrix multiplication splits its
//! output row groups between the threads. Activations feeding quantized weights are quantized
//! to Q8 blocks once per matmul and dotted with integer arithmetic
//! ([`crate::packed::dot_group`], 8 or 4 prompt tokens per pass over the weights). All buffers
//! (activations, KV cache, per-thread attention scratch) are allocated at load time; a decode
//! step allocates only the returned logits vector. Prompts are processed in chunks of up to
//! [`CpuOptions::batch`] tokens so each weight row is reused across the chunk.
//!
//! The same pass also runs rows of many sequences at once ([`CpuBackend::forward_paged`], used
//! by [`crate::cpu_batched::CpuBatchedModel`], the served path): each row then has its own
//! position and its own sequence's blocks in a paged KV pool ([`CpuPagedKv`]); the matmuls are
//! shared by all rows. Every per-row computation is independent of the other rows of the pass
//! (bit for bit), so batching never changes a sequence's logits.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use crate::backend::{Backend, check_forward_args};
use crate::error::InferenceError;
#[cfg(test)]
use crate::gguf::GgmlType;
use crate::kernels::{BlockQ8, attention, attention_segments, dot_f32, quantize_q8, silu_mul};
use crate::model::{LlamaConfig, LlamaWeights, RopeStyle, TensorRef};
use crate::packed::{GROUP, PackedMatrix, dot_group, wide_tiles};
use crate::stream::{ReadAt, fetch};

/// Options for [`CpuBackend::new`].
#[derive(Debug, Clone)]
pub struct CpuOptions {
    /// Worker threads (>= 1).
    pub threads: usize,
    /// KV cache length; capped at the model's context length.
    pub max_context: usize,
    /// Tokens per prefill chunk.
    pub batch: usize,
}

impl Default for CpuOptions {
    fn default() -> Self {
        CpuOptions {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_context: 2048,
            batch: 32,
        }
    }
}

/// A weight matrix in CPU form.
#[derive(Debug)]
enum Matrix {
    /// Q4_0, Q4_1, Q8_0 and the K-quants repacked in groups of 16 rows ([`PackedMatrix`]).
    Quant(PackedMatrix),
    /// Row-major f32.
    F32 {
        data: Vec<f32>,
        rows: usize,
        cols: usize,
    },
}

impl Matrix {
    /// Repacks (or widens) tensor `t`, taking its bytes from `src` when given (see
    /// [`crate::stream::fetch`]); the raw bytes are dropped before this returns.
    fn from_tensor(t: &TensorRef<'_>, src: Option<&dyn ReadAt>) -> Result<Self, InferenceError> {
        let (rows, cols) = (t.rows(), t.cols());
        let bytes = fetch(src, t)?;
        Ok(match t.ty {
            ty if PackedMatrix::supports(ty) => {
                crate::quant::check_blocks(ty, &bytes)
                    .map_err(|e| InferenceError::Tensor(format!("{}: {e}", t.name)))?;
                let unit = ty.block_size();
                Matrix::Quant(PackedMatrix::pack(ty, &bytes, rows, cols).ok_or_else(|| {
                    InferenceError::Tensor(format!(
                        "{}: {ty} tensor of {rows}x{cols} has a width that is not a multiple of {unit} or too few bytes",
                        t.name
                    ))
                })?)
            }
            _ => Matrix::F32 {
                data: t.bytes_to_f32(&bytes)?,
                rows,
                cols,
            },
        })
    }
    fn rows(&self) -> usize {
        match self {
            Matrix::Quant(p) => p.rows(),
            Matrix::F32 { rows, .. } => *rows,
        }
    }
    fn cols(&self) -> usize {
        match self {
            Matrix::Quant(p) => p.cols(),
            Matrix::F32 { cols, .. } => *cols,
        }
    }
    /// Dequantizes row `r` into `out`.
    fn row_f32(&self, r: usize, out: &mut [f32]) {
        match self {
            Matrix::Quant(p) => p.row_f32(r, out),
            Matrix::F32 { data, cols, .. } => out.copy_from_slice(&data[r * cols..(r + 1) * cols]),
        }
    }
}

fn vec_f32(t: &TensorRef<'_>, src: Option<&dyn ReadAt>) -> Result<Vec<f32>, InferenceError> {
    t.bytes_to_f32(&fetch(src, t)?)
}

#[derive(Debug)]
struct Layer {
    attn_norm: Vec<f32>,
    wq: Matrix,
    wk: Matrix,
    wv: Matrix,
    wo: Matrix,
    bq: Option<Vec<f32>>,
    bk: Option<Vec<f32>>,
    bv: Option<Vec<f32>>,
    ffn_norm: Vec<f32>,
    w_gate: Matrix,
    w_up: Matrix,
    w_down: Matrix,
    /// Per-head q/k RMSNorm weights (qwen3).
    q_norm: Option<Vec<f32>>,
    k_norm: Option<Vec<f32>>,
}

/// Preallocated activations for a chunk of up to `batch` tokens.
#[derive(Debug)]
struct Scratch {
    x: Vec<f32>,      // batch x dim (residual)
    xb: Vec<f32>,     // batch x max(dim, q_dim) (normed input / attention output)
    xq: Vec<BlockQ8>, // batch x max(dim, q_dim, ffn)/32
    q: Vec<f32>,      // batch x q_dim
    k: Vec<f32>,      // batch x kv_dim
    v: Vec<f32>,      // batch x kv_dim
    tmp: Vec<f32>,    // batch x dim
    hb: Vec<f32>,     // batch x ffn
    hb2: Vec<f32>,    // batch x ffn
    cos: Vec<f32>,    // batch x head_dim/2
    sin: Vec<f32>,    // batch x head_dim/2
    logits: Vec<f32>, // logit rows x vocab
}

impl Scratch {
    /// Buffers for `batch` rows, `logit_rows` of which may want logits.
    fn new(cfg: &LlamaConfig, batch: usize, logit_rows: usize) -> Self {
        let half = cfg.head_dim / 2;
        let widest = cfg.dim.max(cfg.q_dim()).max(cfg.ffn_dim);
        Scratch {
            x: vec![0.0; batch * cfg.dim],
            xb: vec![0.0; batch * cfg.dim.max(cfg.q_dim())],
            xq: vec![BlockQ8::default(); batch * widest / 32],
            q: vec![0.0; batch * cfg.q_dim()],
            k: vec![0.0; batch * cfg.kv_dim()],
            v: vec![0.0; batch * cfg.kv_dim()],
            tmp: vec![0.0; batch * cfg.dim],
            hb: vec![0.0; batch * cfg.ffn_dim],
            hb2: vec![0.0; batch * cfg.ffn_dim],
            cos: vec![0.0; batch * half],
            sin: vec![0.0; batch * half],
            logits: vec![0.0; logit_rows * cfg.vocab],
        }
    }
}

/// The CPU backend.
#[derive(Debug)]
pub struct CpuBackend {
    cfg: LlamaConfig,
    threads: usize,
    batch: usize,
    max_context: usize,
    token_embd: Matrix,
    output: Option<Matrix>,
    output_norm: Vec<f32>,
    inv_freq: Vec<f32>,
    layers: Vec<Layer>,
    key_cache: Vec<f32>, // layer x pos x kv_dim
    val_cache: Vec<f32>,
    filled: usize,
    scratch: Scratch,
    att: Vec<Vec<f32>>, // per thread, max_context
}

impl CpuBackend {
    /// Copies the weights and allocates all buffers.
    pub fn new(w: &LlamaWeights<'_>, opts: &CpuOptions) -> Result<Self, InferenceError> {
        Self::load(w, opts, None)
    }

    /// Like [`CpuBackend::new`] for weights described from the GGUF header alone: every tensor
    /// is read from `src` (one at a time, repacked, its raw bytes dropped), so memory holds one
    /// copy of the weights plus the tensor being repacked.
    pub fn from_source(
        w: &LlamaWeights<'_>,
        opts: &CpuOptions,
        src: &dyn ReadAt,
    ) -> Result<Self, InferenceError> {
        Self::load(w, opts, Some(src))
    }

    fn load(
        w: &LlamaWeights<'_>,
        opts: &CpuOptions,
        src: Option<&dyn ReadAt>,
    ) -> Result<Self, InferenceError> {
        let cfg = w.config.clone();
        let threads = opts.threads.clamp(1, 256);
        let batch = opts.batch.clamp(1, 512);
        let max_context = opts.max_context.clamp(1, cfg.context_len.max(1));
        for m in [&w.token_embd, &w.output] {
            if !m.cols().is_multiple_of(32) {
                return Err(InferenceError::Tensor(format!(
                    "{}: width {} is not a multiple of 32",
                    m.name,
                    m.cols()
                )));
            }
        }
        if !cfg.ffn_dim.is_multiple_of(32) || !cfg.q_dim().is_multiple_of(32) {
            return Err(InferenceError::Tensor(
                "ffn and attention widths must be multiples of 32 for the CPU backend".into(),
            ));
        }
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for l in &w.layers {
            let opt = |t: &Option<TensorRef<'_>>| t.as_ref().map(|t| vec_f32(t, src)).transpose();
            layers.push(Layer {
                attn_norm: vec_f32(&l.attn_norm, src)?,
                wq: Matrix::from_tensor(&l.attn_q, src)?,
                wk: Matrix::from_tensor(&l.attn_k, src)?,
                wv: Matrix::from_tensor(&l.attn_v, src)?,
                wo: Matrix::from_tensor(&l.attn_output, src)?,
                bq: opt(&l.attn_q_bias)?,
                bk: opt(&l.attn_k_bias)?,
                bv: opt(&l.attn_v_bias)?,
                ffn_norm: vec_f32(&l.ffn_norm, src)?,
                w_gate: Matrix::from_tensor(&l.ffn_gate, src)?,
                w_up: Matrix::from_tensor(&l.ffn_up, src)?,
                w_down: Matrix::from_tensor(&l.ffn_down, src)?,
                q_norm: opt(&l.attn_q_norm)?,
                k_norm: opt(&l.attn_k_norm)?,
            });
        }
        let half = cfg.head_dim / 2;
        let freq_factors =
            cfg.rope_freq_factors(w.rope_freqs.as_ref().map(|t| vec_f32(t, src)).transpose()?);
        let inv_freq: Vec<f32> = (0..half)
            .map(|i| {
                let f = cfg.rope_theta.powf(-2.0 * i as f32 / cfg.head_dim as f32);
                match &freq_factors {
                    Some(ff) => f / ff[i],
                    None => f,
                }
            })
            .collect();
        let kv_len = cfg.n_layers * max_context * cfg.kv_dim();
        let scratch = Scratch::new(&cfg, batch, 1);
        Ok(CpuBackend {
            threads,
            batch,
            max_context,
            token_embd: Matrix::from_tensor(&w.token_embd, src)?,
            output: if cfg.tied_embeddings {
                None
            } else {
                Some(Matrix::from_tensor(&w.output, src)?)
            },
            output_norm: vec_f32(&w.output_norm, src)?,
            inv_freq,
            layers,
            key_cache: vec![0.0; kv_len],
            val_cache: vec![0.0; kv_len],
            filled: 0,
            scratch,
            att: vec![vec![0.0; max_context]; threads],
            cfg,
        })
    }

    /// The model config.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Thread count.
    pub fn threads(&self) -> usize {
        self.threads
    }

    fn forward_chunk(&mut self, tokens: &[u32], start_pos: usize, want_logits: bool) {
        let barrier = SpinBarrier::new(self.threads);
        let shared = SharedState::new(&mut self.scratch, &mut self.key_cache, &mut self.val_cache);
        let last = [tokens.len() - 1];
        let ctx = Ctx {
            cfg: &self.cfg,
            layers: &self.layers,
            token_embd: &self.token_embd,
            output: self.output.as_ref().unwrap_or(&self.token_embd),
            output_norm: &self.output_norm,
            inv_freq: &self.inv_freq,
            tokens,
            rows: Rows::One {
                start: start_pos,
                max_context: self.max_context,
            },
            logit_rows: if want_logits { &last } else { &[] },
            n_threads: self.threads,
            barrier: &barrier,
            s: &shared,
        };
        ctx.run_team(&mut self.att);
    }
}

/// One sequence's KV cache detached from a [`CpuBackend`] (keys, values and the filled length),
/// so several sequences can share one copy of the weights: [`CpuBackend::swap_kv_cache`]
/// exchanges it with the backend's own cache in O(1) (buffers are swapped, never copied or
/// reallocated). Used by the scheduler's CPU adapter ([`crate::scheduler::CpuBatchModel`]).
#[derive(Debug)]
pub struct CpuKvCache {
    key: Vec<f32>,
    val: Vec<f32>,
    filled: usize,
}

impl CpuKvCache {
    /// Positions filled so far.
    pub fn filled(&self) -> usize {
        self.filled
    }
    /// Bytes this cache holds (keys and values).
    pub fn bytes(&self) -> usize {
        (self.key.len() + self.val.len()) * std::mem::size_of::<f32>()
    }
}

impl CpuBackend {
    /// A fresh, empty KV cache the size of this backend's own (allocated once, here).
    pub fn new_kv_cache(&self) -> CpuKvCache {
        CpuKvCache {
            key: vec![0.0; self.key_cache.len()],
            val: vec![0.0; self.val_cache.len()],
            filled: 0,
        }
    }

    /// Exchanges the backend's KV cache with `kv` (O(1)); swap back to restore. Fails if
    /// `kv` was not made by [`CpuBackend::new_kv_cache`] of a backend of the same shape.
    pub fn swap_kv_cache(&mut self, kv: &mut CpuKvCache) -> Result<(), InferenceError> {
        if kv.key.len() != self.key_cache.len() || kv.val.len() != self.val_cache.len() {
            return Err(InferenceError::InvalidArgument(format!(
                "KV cache of {} values does not fit this backend ({} values); make it with new_kv_cache",
                kv.key.len(),
                self.key_cache.len()
            )));
        }
        std::mem::swap(&mut self.key_cache, &mut kv.key);
        std::mem::swap(&mut self.val_cache, &mut kv.val);
        std::mem::swap(&mut self.filled, &mut kv.filled);
        Ok(())
    }
}

/// A paged KV pool and activation buffers for running the tokens of many sequences as one
/// batch over a [`CpuBackend`]'s weights ([`CpuBackend::forward_paged`]): every weight matrix is
/// read once per pass for all rows, while each row keeps its own position and its own
/// sequence's KV blocks. The pool holds `blocks` blocks of `block_size` positions (per layer,
/// keys and values); all buffers are allocated once, by [`CpuBackend::new_paged_kv`].
#[derive(Debug)]
pub struct CpuPagedKv {
    key: Vec<f32>, // layer x block x block_size x kv_dim
    val: Vec<f32>,
    block_size: usize,
    blocks: usize,
    max_rows: usize,
    max_logit_rows: usize,
    vocab: usize,
    scratch: Scratch,
    att: Vec<Vec<f32>>,
    /// Cache slots written by the current pass (reused; for the no-overlap check).
    written: Vec<usize>,
}

impl CpuPagedKv {
    /// Positions per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    /// Blocks in the pool.
    pub fn blocks(&self) -> usize {
        self.blocks
    }
    /// Most rows one pass may run.
    pub fn max_rows(&self) -> usize {
        self.max_rows
    }
    /// Most rows of one pass that may want logits.
    pub fn max_logit_rows(&self) -> usize {
        self.max_logit_rows
    }
    /// Bytes of the KV pool (keys and values).
    pub fn bytes(&self) -> usize {
        (self.key.len() + self.val.len()) * std::mem::size_of::<f32>()
    }
    /// The logits of the `i`-th logit row of the last pass (`vocab` values).
    pub fn logits(&self, i: usize) -> &[f32] {
        &self.scratch.logits[i * self.vocab..(i + 1) * self.vocab]
    }
}

impl CpuBackend {
    /// A paged KV pool of `blocks` blocks of `block_size` positions and buffers for passes of up
    /// to `max_rows` rows, `max_logit_rows` of which may want logits (all at least 1).
    pub fn new_paged_kv(
        &self,
        block_size: usize,
        blocks: usize,
        max_rows: usize,
        max_logit_rows: usize,
    ) -> Result<CpuPagedKv, InferenceError> {
        let block_size = block_size.max(1);
        let (max_rows, max_logit_rows) =
            (max_rows.max(1), max_logit_rows.clamp(1, max_rows.max(1)));
        let len = [self.cfg.n_layers, blocks.max(1), block_size, self.cfg.kv_dim()]
            .iter()
            .try_fold(1usize, |a, &b| a.checked_mul(b))
            .filter(|&n| n <= isize::MAX as usize / 8)
            .ok_or_else(|| {
                InferenceError::InvalidArgument(format!(
                    "a KV pool of {blocks} blocks of {block_size} positions is too large; use fewer blocks"
                ))
            })?;
        Ok(CpuPagedKv {
            key: vec![0.0; len],
            val: vec![0.0; len],
            block_size,
            blocks: blocks.max(1),
            max_rows,
            max_logit_rows,
            vocab: self.cfg.vocab,
            scratch: Scratch::new(&self.cfg, max_rows, max_logit_rows),
            att: vec![vec![0.0; self.max_context]; self.threads],
            written: Vec::with_capacity(max_rows),
        })
    }

    /// One batched pass: row `t` feeds `tokens[t]` at position `pos[t]` of the sequence whose
    /// KV blocks (in position order) are `tables[t]`, attending to that sequence's positions
    /// `0..=pos[t]` (the earlier ones written by earlier passes or by earlier rows of this
    /// one). The logits of the rows `logit_rows` (in that order) are left in
    /// [`CpuPagedKv::logits`]. Each row's arithmetic is the same as in [`Backend::forward`]
    /// whatever the other rows are (the integer kernels' tiles compute each row exactly as the
    /// one-token kernel does), so a row's results are bit-identical to the single-sequence
    /// backend's and independent of the pass it runs in.
    pub fn forward_paged(
        &self,
        kv: &mut CpuPagedKv,
        tokens: &[u32],
        pos: &[usize],
        tables: &[&[u32]],
        logit_rows: &[usize],
    ) -> Result<(), InferenceError> {
        let nt = tokens.len();
        let bad = |m: String| Err(InferenceError::InvalidArgument(m));
        if nt == 0 || nt > kv.max_rows || pos.len() != nt || tables.len() != nt {
            return bad(format!(
                "a paged pass takes 1 to {} rows with one position and one block table each (got {nt} tokens, {} positions, {} tables)",
                kv.max_rows,
                pos.len(),
                tables.len()
            ));
        }
        if logit_rows.len() > kv.max_logit_rows || logit_rows.iter().any(|&r| r >= nt) {
            return bad(format!(
                "logit rows {logit_rows:?}: at most {} rows below {nt}",
                kv.max_logit_rows
            ));
        }
        let bs = kv.block_size;
        kv.written.clear();
        for t in 0..nt {
            if tokens[t] as usize >= self.cfg.vocab {
                return bad(format!(
                    "token id {} is outside the vocabulary (size {})",
                    tokens[t], self.cfg.vocab
                ));
            }
            let p = pos[t];
            if p >= self.max_context {
                return Err(InferenceError::ContextOverflow {
                    needed: p + 1,
                    max: self.max_context,
                });
            }
            let table = &tables[t][..tables[t].len().min((p + 1).div_ceil(bs))];
            if table.len() * bs <= p {
                return bad(format!(
                    "row {t}: {} KV blocks of {bs} positions do not cover position {p}; grow the block table first",
                    tables[t].len()
                ));
            }
            if let Some(b) = table.iter().find(|&&b| b as usize >= kv.blocks) {
                return bad(format!(
                    "KV block {b} is outside the pool of {} blocks; size the pool to the block allocator",
                    kv.blocks
                ));
            }
            kv.written.push(table[p / bs] as usize * bs + p % bs);
        }
        kv.written.sort_unstable();
        if kv.written.windows(2).any(|w| w[0] == w[1]) {
            return bad("two rows of one pass write the same KV position; a sequence may appear once per pass".into());
        }
        let barrier = SpinBarrier::new(self.threads);
        let shared = SharedState::new(&mut kv.scratch, &mut kv.key, &mut kv.val);
        let ctx = Ctx {
            cfg: &self.cfg,
            layers: &self.layers,
            token_embd: &self.token_embd,
            output: self.output.as_ref().unwrap_or(&self.token_embd),
            output_norm: &self.output_norm,
            inv_freq: &self.inv_freq,
            tokens,
            rows: Rows::Paged {
                pos,
                table: tables,
                block_size: bs,
                blocks: kv.blocks,
            },
            logit_rows,
            n_threads: self.threads,
            barrier: &barrier,
            s: &shared,
        };
        ctx.run_team(&mut kv.att);
        Ok(())
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &str {
        "cpu"
    }

    fn forward(&mut self, tokens: &[u32], start_pos: usize) -> Result<Vec<f32>, InferenceError> {
        check_forward_args(tokens, start_pos, self.cfg.vocab, self.max_context)?;
        if start_pos > self.filled {
            return Err(InferenceError::InvalidArgument(format!(
                "start position {start_pos} is past the {} cached positions; positions must be contiguous",
                self.filled
            )));
        }
        let mut pos = start_pos;
        let n_chunks = tokens.len().div_ceil(self.batch);
        for (i, chunk) in tokens.chunks(self.batch).enumerate() {
            self.forward_chunk(chunk, pos, i + 1 == n_chunks);
            pos += chunk.len();
        }
        self.filled = pos;
        Ok(self.scratch.logits.clone())
    }

    fn reset(&mut self) {
        self.filled = 0;
    }

    fn max_context(&self) -> usize {
        self.max_context
    }
    fn into_batch_model(
        self: Box<Self>,
        slots: usize,
        cfg: &crate::scheduler::SchedulerConfig,
    ) -> Result<Box<dyn crate::scheduler::BatchModel>, InferenceError> {
        Ok(Box::new(crate::cpu_batched::CpuBatchedModel::new(
            *self, slots, cfg,
        )?))
    }
}

/// A barrier that spins briefly, then sleeps on a condition variable (so an oversubscribed
/// machine is not burned by spinning). All participants are our own scoped threads.
struct SpinBarrier {
    n: usize,
    count: AtomicUsize,
    generation: AtomicUsize,
    poisoned: AtomicBool,
    lock: std::sync::Mutex<()>,
    cv: std::sync::Condvar,
}

impl SpinBarrier {
    fn new(n: usize) -> Self {
        SpinBarrier {
            n,
            count: AtomicUsize::new(0),
            generation: AtomicUsize::new(0),
            poisoned: AtomicBool::new(false),
            lock: std::sync::Mutex::new(()),
            cv: std::sync::Condvar::new(),
        }
    }
    fn wait(&self) {
        if self.n == 1 {
            return;
        }
        let generation = self.generation.load(Ordering::Acquire);
        if self.count.fetch_add(1, Ordering::AcqRel) + 1 == self.n {
            self.count.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::AcqRel);
            // Wake sleepers; taking the lock orders this after their check-then-wait.
            let _g = self
                .lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.cv.notify_all();
            return;
        }
        // Phases are short (tens of microseconds): spin briefly, then yield the core (cheap on
        // a dedicated machine, lets a descheduled partner run on an oversubscribed one), and
        // only then sleep.
        for i in 0..20_000u32 {
            if self.generation.load(Ordering::Acquire) != generation {
                return;
            }
            if i < 2_000 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        let mut g = self
            .lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while self.generation.load(Ordering::Acquire) == generation
            && !self.poisoned.load(Ordering::Relaxed)
        {
            g = match self
                .cv
                .wait_timeout(g, std::time::Duration::from_millis(50))
            {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }
}

/// Raw views of the shared buffers. Phases separated by barriers guarantee that while any
/// thread holds a mutable view of a region, no other thread accesses that region.
struct SharedState {
    x: RawBuf<f32>,
    xb: RawBuf<f32>,
    xq: RawBuf<BlockQ8>,
    q: RawBuf<f32>,
    k: RawBuf<f32>,
    v: RawBuf<f32>,
    tmp: RawBuf<f32>,
    hb: RawBuf<f32>,
    hb2: RawBuf<f32>,
    cos: RawBuf<f32>,
    sin: RawBuf<f32>,
    logits: RawBuf<f32>,
    kc: RawBuf<f32>,
    vc: RawBuf<f32>,
}

impl SharedState {
    fn new(s: &mut Scratch, kc: &mut [f32], vc: &mut [f32]) -> Self {
        SharedState {
            x: RawBuf::new(&mut s.x),
            xb: RawBuf::new(&mut s.xb),
            xq: RawBuf::new(&mut s.xq),
            q: RawBuf::new(&mut s.q),
            k: RawBuf::new(&mut s.k),
            v: RawBuf::new(&mut s.v),
            tmp: RawBuf::new(&mut s.tmp),
            hb: RawBuf::new(&mut s.hb),
            hb2: RawBuf::new(&mut s.hb2),
            cos: RawBuf::new(&mut s.cos),
            sin: RawBuf::new(&mut s.sin),
            logits: RawBuf::new(&mut s.logits),
            kc: RawBuf::new(kc),
            vc: RawBuf::new(vc),
        }
    }
}

/// A slice shared between the team's threads; see [`SharedState`].
struct RawBuf<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: RawBuf is only a pointer+length to a buffer that outlives the scoped threads
// (it is created from a `&mut` borrow held for the whole forward pass); access discipline
// (disjoint writes within a phase, barriers between phases) is enforced by `Ctx::run`.
unsafe impl<T: Send> Sync for RawBuf<T> {}
// SAFETY: see the `Sync` impl above.
unsafe impl<T: Send> Send for RawBuf<T> {}

impl<T> RawBuf<T> {
    fn new(s: &mut [T]) -> Self {
        RawBuf {
            ptr: s.as_mut_ptr(),
            len: s.len(),
        }
    }
    /// # Safety
    /// No other thread may write `start..start+len` during the current phase.
    unsafe fn get(&self, start: usize, len: usize) -> &[T] {
        assert!(start + len <= self.len, "shared buffer read out of bounds");
        // SAFETY: in bounds (checked above); the caller guarantees no concurrent writer.
        unsafe { std::slice::from_raw_parts(self.ptr.add(start), len) }
    }
    /// # Safety
    /// No other thread may access `start..start+len` during the current phase.
    #[allow(clippy::mut_from_ref)]
    unsafe fn get_mut(&self, start: usize, len: usize) -> &mut [T] {
        assert!(start + len <= self.len, "shared buffer write out of bounds");
        // SAFETY: in bounds (checked above); the caller guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(start), len) }
    }
}

struct Ctx<'a> {
    cfg: &'a LlamaConfig,
    layers: &'a [Layer],
    token_embd: &'a Matrix,
    output: &'a Matrix,
    output_norm: &'a [f32],
    inv_freq: &'a [f32],
    tokens: &'a [u32],
    rows: Rows<'a>,
    /// Rows whose logits are computed, in order, into `s.logits` (stride vocab).
    logit_rows: &'a [usize],
    n_threads: usize,
    barrier: &'a SpinBarrier,
    s: &'a SharedState,
}

/// Where the rows of a forward pass sit: each row's position, and where the keys and values of
/// its sequence live.
#[derive(Clone, Copy)]
enum Rows<'a> {
    /// One sequence, row `t` at position `start + t`, in a contiguous cache
    /// (layer x `max_context` x kv_dim).
    One { start: usize, max_context: usize },
    /// Rows of several sequences over a paged pool (layer x block x `block_size` x kv_dim):
    /// row `t` is at position `pos[t]` of the sequence whose blocks are `table[t]` (position
    /// `p` in block `table[t][p / block_size]` at offset `p % block_size`).
    Paged {
        pos: &'a [usize],
        table: &'a [&'a [u32]],
        block_size: usize,
        blocks: usize,
    },
}

impl Rows<'_> {
    fn pos(&self, t: usize) -> usize {
        match self {
            Rows::One { start, .. } => start + t,
            Rows::Paged { pos, .. } => pos[t],
        }
    }

    /// Offset in the KV buffers of layer `li`'s row for position `p` of row `t`'s sequence.
    fn kv_offset(&self, li: usize, t: usize, p: usize, kvd: usize) -> usize {
        match *self {
            Rows::One { max_context, .. } => (li * max_context + p) * kvd,
            Rows::Paged {
                table,
                block_size: bs,
                blocks,
                ..
            } => ((li * blocks + table[t][p / bs] as usize) * bs + p % bs) * kvd,
        }
    }
}

fn rms_norm(out: &mut [f32], x: &[f32], w: &[f32], eps: f32) {
    let ss = dot_f32(x, x) / x.len() as f32;
    let scale = 1.0 / (ss + eps).sqrt();
    for ((o, &xi), &wi) in out.iter_mut().zip(x).zip(w) {
        *o = xi * scale * wi;
    }
}

/// [`rms_norm`] of `x` into itself (qwen3's per-head q/k norms).
fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let ss = dot_f32(x, x) / x.len() as f32;
    let scale = 1.0 / (ss + eps).sqrt();
    for (xi, &wi) in x.iter_mut().zip(w) {
        *xi *= scale * wi;
    }
}

fn split(n: usize, tid: usize, nt: usize) -> std::ops::Range<usize> {
    let per = n.div_ceil(nt);
    let a = (tid * per).min(n);
    let b = ((tid + 1) * per).min(n);
    a..b
}

impl Ctx<'_> {
    /// Rows `tid`'s share of each token: `out[t*rows + r] = W[r] . in[t]`, for `t < nt`.
    /// `inp` is the f32 input (width `W.cols()`, stride `in_stride`), `inq` its Q8 form.
    ///
    /// # Safety
    /// Phase contract: during this phase `out` rows of other threads are not touched by us, and
    /// nobody writes `inp`/`inq`.
    unsafe fn matmul(
        &self,
        tid: usize,
        w: &Matrix,
        inp: &RawBuf<f32>,
        in_stride: usize,
        out: &RawBuf<f32>,
        nt: usize,
    ) {
        let rows = w.rows();
        let cols = w.cols();
        match w {
            Matrix::Quant(p) => {
                let nb = cols / 32;
                // SAFETY: the Q8 input was written in the previous phase; read-only now.
                let xq = unsafe { self.s.xq.get(0, nt * nb) };
                let x = |t: usize| &xq[t * nb..(t + 1) * nb];
                let wide = wide_tiles();
                for g in split(p.groups(), tid, self.n_threads) {
                    let r0 = g * GROUP;
                    let n = GROUP.min(rows - r0);
                    // Eight or four tokens per pass: each weight block is unpacked once for all.
                    let mut t = 0;
                    while t + 8 <= nt && wide {
                        let v = dot_group::<8>(p, g, std::array::from_fn(|k| x(t + k)));
                        for (k, v) in v.iter().enumerate() {
                            // SAFETY: the rows of group g belong to this thread only.
                            unsafe { out.get_mut((t + k) * rows + r0, n) }.copy_from_slice(&v[..n]);
                        }
                        t += 8;
                    }
                    while t + 4 <= nt {
                        let v = dot_group::<4>(p, g, [x(t), x(t + 1), x(t + 2), x(t + 3)]);
                        for (k, v) in v.iter().enumerate() {
                            // SAFETY: the rows of group g belong to this thread only.
                            unsafe { out.get_mut((t + k) * rows + r0, n) }.copy_from_slice(&v[..n]);
                        }
                        t += 4;
                    }
                    for t in t..nt {
                        let [v] = dot_group::<1>(p, g, [x(t)]);
                        // SAFETY: the rows of group g belong to this thread only.
                        unsafe { out.get_mut(t * rows + r0, n) }.copy_from_slice(&v[..n]);
                    }
                }
            }
            Matrix::F32 { data, .. } => {
                for r in split(rows, tid, self.n_threads) {
                    let row = &data[r * cols..(r + 1) * cols];
                    for t in 0..nt {
                        // SAFETY: input is read-only in this phase.
                        let x = unsafe { inp.get(t * in_stride, cols) };
                        let v = dot_f32(row, x);
                        // SAFETY: row r belongs to this thread's range only.
                        unsafe { out.get_mut(t * rows + r, 1)[0] = v };
                    }
                }
            }
        }
    }

    /// Quantizes `width` values of token `t` from `src` (stride `stride`) into xq.
    ///
    /// # Safety
    /// The caller owns token `t`'s slots of `src` (read) and xq (write) in this phase.
    unsafe fn quantize_token(&self, src: &RawBuf<f32>, stride: usize, width: usize, t: usize) {
        let nb = width / 32;
        // SAFETY: per the function contract.
        let (x, q) = unsafe { (src.get(t * stride, width), self.s.xq.get_mut(t * nb, nb)) };
        quantize_q8(x, q);
    }

    fn run(&self, tid: usize, att: &mut [f32]) {
        // If this thread panics (a bug), release the others from the barrier instead of hanging.
        struct Guard<'b>(&'b SpinBarrier);
        impl Drop for Guard<'_> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0.poisoned.store(true, Ordering::Relaxed);
                }
            }
        }
        let _guard = Guard(self.barrier);
        let c = self.cfg;
        let nt = self.tokens.len();
        let (dim, qd, kvd, hd, ffn) = (c.dim, c.q_dim(), c.kv_dim(), c.head_dim, c.ffn_dim);
        let half = hd / 2;
        let nth = self.n_threads;
        let s = self.s;
        let my_tokens = || (tid..nt).step_by(nth);
        // Phase: embeddings + rope tables (per token).
        for t in my_tokens() {
            // SAFETY: token t's rows are owned by this thread in this phase.
            unsafe {
                self.token_embd
                    .row_f32(self.tokens[t] as usize, s.x.get_mut(t * dim, dim));
                let pos = self.rows.pos(t) as f32;
                let (cs, sn) = (s.cos.get_mut(t * half, half), s.sin.get_mut(t * half, half));
                for i in 0..half {
                    let (si, co) = (pos * self.inv_freq[i]).sin_cos();
                    cs[i] = co;
                    sn[i] = si;
                }
            }
        }
        self.barrier.wait();
        for (li, l) in self.layers.iter().enumerate() {
            // Phase: attention norm + quantize.
            for t in my_tokens() {
                // SAFETY: token t's slots are owned by this thread in this phase.
                unsafe {
                    rms_norm(
                        s.xb.get_mut(t * dim, dim),
                        s.x.get(t * dim, dim),
                        &l.attn_norm,
                        c.rms_eps,
                    );
                    self.quantize_token(&s.xb, dim, dim, t);
                }
            }
            self.barrier.wait();
            // Phase: q, k, v projections (row split).
            // SAFETY: xb/xq are read-only in this phase; each thread writes its own rows.
            unsafe {
                self.matmul(tid, &l.wq, &s.xb, dim, &s.q, nt);
                self.matmul(tid, &l.wk, &s.xb, dim, &s.k, nt);
                self.matmul(tid, &l.wv, &s.xb, dim, &s.v, nt);
            }
            self.barrier.wait();
            // Phase: biases, rope, store k/v into the cache (per token).
            for t in my_tokens() {
                let pos = self.rows.pos(t);
                // SAFETY: token t's slots and its cache position are owned by this thread (no
                // two rows share a cache position; checked by the callers).
                unsafe {
                    let q = s.q.get_mut(t * qd, qd);
                    let k = s.k.get_mut(t * kvd, kvd);
                    let v = s.v.get(t * kvd, kvd);
                    if let Some(b) = &l.bq {
                        q.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                    }
                    if let Some(b) = &l.bk {
                        k.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                    }
                    if let Some(w) = &l.q_norm {
                        q.chunks_exact_mut(hd)
                            .for_each(|h| rms_norm_in_place(h, w, c.rms_eps));
                    }
                    if let Some(w) = &l.k_norm {
                        k.chunks_exact_mut(hd)
                            .for_each(|h| rms_norm_in_place(h, w, c.rms_eps));
                    }
                    let cs = s.cos.get(t * half, half);
                    let sn = s.sin.get(t * half, half);
                    for head in q.chunks_exact_mut(hd).chain(k.chunks_exact_mut(hd)) {
                        rope(head, cs, sn, c.rope_style);
                    }
                    let off = self.rows.kv_offset(li, t, pos, kvd);
                    s.kc.get_mut(off, kvd).copy_from_slice(k);
                    let vc = s.vc.get_mut(off, kvd);
                    vc.copy_from_slice(v);
                    if let Some(b) = &l.bv {
                        vc.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                    }
                }
            }
            self.barrier.wait();
            // Phase: attention, split over (token, head) pairs; output into xb.
            let group = c.n_heads / c.n_kv_heads;
            let scale = 1.0 / (hd as f32).sqrt();
            for job in (tid..nt * c.n_heads).step_by(nth) {
                let (t, h) = (job / c.n_heads, job % c.n_heads);
                let pos = self.rows.pos(t);
                let kh = h / group;
                // SAFETY: the cache is read-only in this phase (written in the previous one);
                // q is read-only; xb slot (t, h) is written by exactly this job.
                unsafe {
                    let q = s.q.get(t * qd + h * hd, hd);
                    let out = s.xb.get_mut(t * qd + h * hd, hd);
                    match self.rows {
                        Rows::One { max_context, .. } => {
                            let off = li * max_context * kvd + kh * hd;
                            let len = pos * kvd + hd;
                            attention(
                                q,
                                s.kc.get(off, len),
                                s.vc.get(off, len),
                                kvd,
                                scale,
                                &mut att[..=pos],
                                out,
                            );
                        }
                        Rows::Paged {
                            table,
                            block_size: bs,
                            blocks,
                            ..
                        } => {
                            let n = pos + 1;
                            let base = li * blocks * bs * kvd + kh * hd;
                            let segments = table[t][..n.div_ceil(bs)]
                                .iter()
                                .enumerate()
                                .map(|(i, &b)| (base + b as usize * bs * kvd, bs.min(n - i * bs)));
                            attention_segments(
                                q,
                                s.kc.get(0, s.kc.len),
                                s.vc.get(0, s.vc.len),
                                segments,
                                kvd,
                                scale,
                                &mut att[..n],
                                out,
                            );
                        }
                    }
                }
            }
            self.barrier.wait();
            for t in my_tokens() {
                // SAFETY: token t's slots are owned by this thread in this phase.
                unsafe { self.quantize_token(&s.xb, qd, qd, t) };
            }
            self.barrier.wait();
            // SAFETY: row split; xb/xq read-only.
            unsafe { self.matmul(tid, &l.wo, &s.xb, qd, &s.tmp, nt) };
            self.barrier.wait();
            // Phase: residual + ffn norm + quantize.
            for t in my_tokens() {
                // SAFETY: token t's slots are owned by this thread in this phase.
                unsafe {
                    let x = s.x.get_mut(t * dim, dim);
                    x.iter_mut()
                        .zip(s.tmp.get(t * dim, dim))
                        .for_each(|(a, b)| *a += b);
                    rms_norm(s.xb.get_mut(t * dim, dim), x, &l.ffn_norm, c.rms_eps);
                    self.quantize_token(&s.xb, dim, dim, t);
                }
            }
            self.barrier.wait();
            // SAFETY: row split; xb/xq read-only.
            unsafe {
                self.matmul(tid, &l.w_gate, &s.xb, dim, &s.hb, nt);
                self.matmul(tid, &l.w_up, &s.xb, dim, &s.hb2, nt);
            }
            self.barrier.wait();
            for t in my_tokens() {
                // SAFETY: token t's slots are owned by this thread in this phase.
                unsafe {
                    let g = s.hb.get_mut(t * ffn, ffn);
                    silu_mul(g, s.hb2.get(t * ffn, ffn));
                    self.quantize_token(&s.hb, ffn, ffn, t);
                }
            }
            self.barrier.wait();
            // SAFETY: row split; hb/xq read-only.
            unsafe { self.matmul(tid, &l.w_down, &s.hb, ffn, &s.tmp, nt) };
            self.barrier.wait();
            for t in my_tokens() {
                // SAFETY: token t's slots are owned by this thread in this phase.
                unsafe {
                    let x = s.x.get_mut(t * dim, dim);
                    x.iter_mut()
                        .zip(s.tmp.get(t * dim, dim))
                        .for_each(|(a, b)| *a += b);
                }
            }
            self.barrier.wait();
        }
        let nl = self.logit_rows.len();
        if nl == 0 {
            return;
        }
        for (i, &t) in self.logit_rows.iter().enumerate().skip(tid).step_by(nth) {
            // SAFETY: logit row i (xb, xq slot i) is owned by this thread in this phase; x is
            // read-only.
            unsafe {
                rms_norm(
                    s.xb.get_mut(i * dim, dim),
                    s.x.get(t * dim, dim),
                    self.output_norm,
                    c.rms_eps,
                );
                self.quantize_token(&s.xb, dim, dim, i);
            }
        }
        self.barrier.wait();
        // SAFETY: row split over the vocabulary; xb/xq read-only.
        unsafe { self.matmul(tid, self.output, &s.xb, dim, &s.logits, nl) };
        self.barrier.wait();
    }

    /// Runs the pass on a team of `self.n_threads` scoped threads (one `att` scratch each).
    fn run_team(&self, att: &mut [Vec<f32>]) {
        let mut atts = att.iter_mut().take(self.n_threads);
        let first = atts.next();
        std::thread::scope(|scope| {
            for (tid, att) in atts.enumerate() {
                scope.spawn(move || self.run(tid + 1, att));
            }
            if let Some(att) = first {
                self.run(0, att);
            }
        });
    }
}

/// Applies rotary embedding to one head in place.
fn rope(x: &mut [f32], cos: &[f32], sin: &[f32], style: RopeStyle) {
    let half = x.len() / 2;
    match style {
        RopeStyle::Norm => {
            for i in 0..half {
                let (a, b) = (x[2 * i], x[2 * i + 1]);
                x[2 * i] = a * cos[i] - b * sin[i];
                x[2 * i + 1] = a * sin[i] + b * cos[i];
            }
        }
        RopeStyle::Neox => {
            for i in 0..half {
                let (a, b) = (x[i], x[i + half]);
                x[i] = a * cos[i] - b * sin[i];
                x[i + half] = a * sin[i] + b * cos[i];
            }
        }
    }
}

/// A straightforward single-threaded f32 implementation of the same model, used by tests as
/// an independent check of [`CpuBackend`] (no batching, no quantized activations).
pub fn naive_forward(w: &LlamaWeights<'_>, tokens: &[u32]) -> Result<Vec<f32>, InferenceError> {
    let c = &w.config;
    let (dim, qd, hd) = (c.dim, c.q_dim(), c.head_dim);
    let mat = |t: &TensorRef<'_>, x: &[f32]| -> Result<Vec<f32>, InferenceError> {
        let m = t.to_f32()?;
        Ok(m.chunks_exact(t.cols())
            .map(|row| dot_f32(row, x))
            .collect())
    };
    let norm = |x: &[f32], t: &TensorRef<'_>| -> Result<Vec<f32>, InferenceError> {
        let mut o = vec![0.0; x.len()];
        rms_norm(&mut o, x, &t.to_f32()?, c.rms_eps);
        Ok(o)
    };
    let embd = w.token_embd.to_f32()?;
    let mut kc = vec![vec![Vec::<f32>::new(); tokens.len()]; c.n_layers];
    let mut vc = kc.clone();
    let mut x = Vec::new();
    let ff = c.rope_freq_factors(w.rope_freqs.as_ref().map(TensorRef::to_f32).transpose()?);
    for (pos, &tok) in tokens.iter().enumerate() {
        x = embd[tok as usize * dim..(tok as usize + 1) * dim].to_vec();
        let half = hd / 2;
        let (cs, sn): (Vec<f32>, Vec<f32>) = (0..half)
            .map(|i| {
                let mut f = c.rope_theta.powf(-2.0 * i as f32 / hd as f32);
                if let Some(ff) = &ff {
                    f /= ff[i];
                }
                let (s, co) = (pos as f32 * f).sin_cos();
                (co, s)
            })
            .unzip();
        for (li, l) in w.layers.iter().enumerate() {
            let xb = norm(&x, &l.attn_norm)?;
            let mut q = mat(&l.attn_q, &xb)?;
            let mut k = mat(&l.attn_k, &xb)?;
            let mut v = mat(&l.attn_v, &xb)?;
            for (vec, b) in [
                (&mut q, &l.attn_q_bias),
                (&mut k, &l.attn_k_bias),
                (&mut v, &l.attn_v_bias),
            ] {
                if let Some(b) = b {
                    vec.iter_mut().zip(b.to_f32()?).for_each(|(a, b)| *a += b);
                }
            }
            for (v, t) in [(&mut q, &l.attn_q_norm), (&mut k, &l.attn_k_norm)] {
                if let Some(t) = t {
                    let w = t.to_f32()?;
                    for h in v.chunks_exact_mut(hd) {
                        let o = {
                            let mut o = vec![0.0; hd];
                            rms_norm(&mut o, h, &w, c.rms_eps);
                            o
                        };
                        h.copy_from_slice(&o);
                    }
                }
            }
            for h in q.chunks_exact_mut(hd).chain(k.chunks_exact_mut(hd)) {
                rope(h, &cs, &sn, c.rope_style);
            }
            kc[li][pos] = k;
            vc[li][pos] = v;
            let mut out = vec![0.0; qd];
            let group = c.n_heads / c.n_kv_heads;
            for h in 0..c.n_heads {
                let kh = h / group;
                let qh = &q[h * hd..(h + 1) * hd];
                let sc: Vec<f32> = (0..=pos)
                    .map(|p| dot_f32(qh, &kc[li][p][kh * hd..(kh + 1) * hd]) / (hd as f32).sqrt())
                    .collect();
                let m = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = sc.iter().map(|s| (s - m).exp()).collect();
                let z: f32 = e.iter().sum();
                for p in 0..=pos {
                    for i in 0..hd {
                        out[h * hd + i] += e[p] / z * vc[li][p][kh * hd + i];
                    }
                }
            }
            let o = mat(&l.attn_output, &out)?;
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let xb = norm(&x, &l.ffn_norm)?;
            let g = mat(&l.ffn_gate, &xb)?;
            let u = mat(&l.ffn_up, &xb)?;
            let hbuf: Vec<f32> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let d = mat(&l.ffn_down, &hbuf)?;
            x.iter_mut().zip(&d).for_each(|(a, b)| *a += b);
        }
    }
    let xb = norm(&x, &w.output_norm)?;
    mat(&w.output, &xb)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::gguf::Gguf;
    use crate::model::LlamaConfig;
    use crate::synthetic::synthetic_gguf;

    fn rel_err(a: &[f32], b: &[f32]) -> f32 {
        let num: f32 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
        let den: f32 = b.iter().map(|y| y * y).sum();
        (num / den.max(1e-12)).sqrt()
    }

    fn check(cfg: &LlamaConfig, ty: GgmlType, tol: f32) {
        let bytes = synthetic_gguf(cfg, ty, 11).unwrap();
        let g = Gguf::parse(&bytes).unwrap();
        let w = LlamaWeights::from_gguf(&g).unwrap();
        // 19 tokens: the batched prefill takes the 8- and 4-token kernel paths and a remainder.
        let tokens = [
            5u32, 77, 300, 9, 42, 100, 1, 2, 3, 250, 17, 18, 19, 200, 201, 33, 34, 35, 36,
        ];
        let reference = naive_forward(&w, &tokens).unwrap();
        for threads in [1, 2, 3] {
            for batch in [1, 4, 32] {
                let mut b = CpuBackend::new(
                    &w,
                    &CpuOptions {
                        threads,
                        max_context: 64,
                        batch,
                    },
                )
                .unwrap();
                let logits = b.forward(&tokens, 0).unwrap();
                let e = rel_err(&logits, &reference);
                assert!(e < tol, "{ty} threads={threads} batch={batch}: rel err {e}");
                // Incremental decode gives the same result as one prefill.
                b.reset();
                b.forward(&tokens[..3], 0).unwrap();
                b.forward(&tokens[3..5], 3).unwrap();
                let inc = b.forward(&tokens[5..], 5).unwrap();
                let e = rel_err(&inc, &logits);
                assert!(
                    e < 1e-4,
                    "{ty} t{threads} b{batch}: incremental differs by {e}"
                );
            }
        }
    }

    #[test]
    fn detached_kv_caches_keep_their_sequences_apart() {
        let bytes = synthetic_gguf(&LlamaConfig::tiny(), GgmlType::Q8_0, 11).unwrap();
        let g = Gguf::parse(&bytes).unwrap();
        let w = LlamaWeights::from_gguf(&g).unwrap();
        let opts = |max_context| CpuOptions {
            threads: 1,
            max_context,
            batch: 4,
        };
        let mut b = CpuBackend::new(&w, &opts(32)).unwrap();
        let (x, y) = ([5u32, 77, 300, 9], [42u32, 100, 1]);
        let want_x = b.forward(&x, 0).unwrap();
        b.reset();
        let want_y = b.forward(&y, 0).unwrap();
        b.reset();
        // Interleave x and y through two detached caches.
        let (mut kx, mut ky) = (b.new_kv_cache(), b.new_kv_cache());
        let run = |b: &mut CpuBackend, kv: &mut CpuKvCache, t: &[u32], pos| {
            b.swap_kv_cache(kv).unwrap();
            let l = b.forward(t, pos).unwrap();
            b.swap_kv_cache(kv).unwrap();
            l
        };
        run(&mut b, &mut kx, &x[..2], 0);
        run(&mut b, &mut ky, &y[..1], 0);
        let got_x = run(&mut b, &mut kx, &x[2..], 2);
        let got_y = run(&mut b, &mut ky, &y[1..], 1);
        assert_eq!((kx.filled(), ky.filled()), (4, 3));
        assert!(rel_err(&got_x, &want_x) < 1e-5 && rel_err(&got_y, &want_y) < 1e-5);
        // A cache of another shape is refused.
        let mut other = CpuBackend::new(&w, &opts(16)).unwrap().new_kv_cache();
        let e = b.swap_kv_cache(&mut other).unwrap_err().to_string();
        assert!(e.contains("new_kv_cache"), "{e}");
    }

    #[test]
    fn matches_naive_reference_all_types() {
        let cfg = LlamaConfig::tiny();
        check(&cfg, GgmlType::F32, 1e-4);
        check(&cfg, GgmlType::F16, 1e-4);
        check(&cfg, GgmlType::BF16, 1e-4);
        check(&cfg, GgmlType::Q8_0, 0.03);
        check(&cfg, GgmlType::Q4_0, 0.03);
        check(&cfg, GgmlType::Q4_1, 0.03);
    }

    /// A shape whose every matrix width is a multiple of the 256-value K-quant super-block.
    fn k_shape() -> LlamaConfig {
        LlamaConfig {
            dim: 256,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 64,
            ffn_dim: 512,
            ..LlamaConfig::tiny()
        }
    }

    #[test]
    fn k_quants_match_naive_reference() {
        let cfg = k_shape();
        check(&cfg, GgmlType::Q4_K, 0.03);
        check(&cfg, GgmlType::Q5_K, 0.03);
        check(&cfg, GgmlType::Q6_K, 0.03);
    }

    #[test]
    fn damaged_k_block_names_the_tensor() {
        let bytes = synthetic_gguf(&k_shape(), GgmlType::Q4_K, 5).unwrap();
        let g = Gguf::parse(&bytes).unwrap();
        let t = g.tensor("blk.1.ffn_down.weight").unwrap();
        let off = g.tensor_file_offset(t) as usize + 3 * 144;
        let mut bad = bytes.clone();
        bad[off..off + 2].copy_from_slice(&0x7c00u16.to_le_bytes()); // d = +inf
        let g = Gguf::parse(&bad).unwrap();
        let w = LlamaWeights::from_gguf(&g).unwrap();
        let err = CpuBackend::new(&w, &CpuOptions::default())
            .unwrap_err()
            .to_string();
        assert!(err.contains("blk.1.ffn_down.weight"), "{err}");
        assert!(err.contains("block 3") && err.contains("damaged"), "{err}");
    }

    #[test]
    fn qwen3_per_head_norms() {
        // Qwen3-shaped: NEOX rope, q/k RMSNorm per head, head_dim * n_heads != dim, tied.
        let mut cfg = LlamaConfig::tiny();
        cfg.arch = "qwen3".into();
        cfg.rope_style = RopeStyle::Neox;
        cfg.head_dim = 32;
        cfg.tied_embeddings = true;
        check(&cfg, GgmlType::Q8_0, 0.03);
        check(&cfg, GgmlType::F32, 1e-4);
        // The norms are applied: the same weights read as qwen2-without-biases differ.
        let bytes = synthetic_gguf(&cfg, GgmlType::F32, 11).unwrap();
        let g = Gguf::parse(&bytes).unwrap();
        let mut w = LlamaWeights::from_gguf(&g).unwrap();
        let tokens = [5u32, 77, 300, 9];
        let with = naive_forward(&w, &tokens).unwrap();
        for l in &mut w.layers {
            l.attn_q_norm = None;
            l.attn_k_norm = None;
        }
        let without = naive_forward(&w, &tokens).unwrap();
        assert!(rel_err(&without, &with) > 1e-3);
    }

    #[test]
    fn rope_scaling_through_the_backend() {
        use crate::model::RopeScaling;
        for scaling in [
            RopeScaling::Linear { factor: 4.0 },
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_context: 64.0,
            },
        ] {
            let cfg = LlamaConfig {
                rope_scaling: scaling,
                ..LlamaConfig::tiny()
            };
            // F32: with Q8 activations one-shot and incremental prefill may round an
            // activation differently and drift apart by more than `check` allows.
            check(&cfg, GgmlType::F32, 1e-4);
            // Scaling changes the result (positions up to 18 of a 64-token original context).
            let scaled = synthetic_gguf(&cfg, GgmlType::F32, 11).unwrap();
            let plain = synthetic_gguf(&LlamaConfig::tiny(), GgmlType::F32, 11).unwrap();
            let run = |b: &[u8]| {
                let g = Gguf::parse(b).unwrap();
                naive_forward(
                    &LlamaWeights::from_gguf(&g).unwrap(),
                    &[5, 77, 300, 9, 42, 100],
                )
                .unwrap()
            };
            assert!(rel_err(&run(&scaled), &run(&plain)) > 1e-4, "{scaling:?}");
        }
    }

    #[test]
    fn qwen2_neox_and_tied() {
        let mut cfg = LlamaConfig::tiny();
        cfg.arch = "qwen2".into();
        cfg.rope_style = RopeStyle::Neox;
        cfg.tied_embeddings = true;
        check(&cfg, GgmlType::Q8_0, 0.03);
    }

    #[test]
    fn argument_errors() {
        let bytes = synthetic_gguf(&LlamaConfig::tiny(), GgmlType::Q8_0, 1).unwrap();
        let g = Gguf::parse(&bytes).unwrap();
        let w = LlamaWeights::from_gguf(&g).unwrap();
        let mut b = CpuBackend::new(
            &w,
            &CpuOptions {
                threads: 1,
                max_context: 8,
                batch: 4,
            },
        )
        .unwrap();
        assert!(b.forward(&[], 0).is_err());
        assert!(b.forward(&[100_000], 0).is_err());
        assert!(matches!(
            b.forward(&[1; 9], 0),
            Err(InferenceError::ContextOverflow { .. })
        ));
        assert!(b.forward(&[1], 3).is_err(), "gap in positions");
        assert_eq!(b.forward(&[1; 8], 0).unwrap().len(), 384);
        assert!(b.forward(&[1], 8).is_err());
    }

    #[test]
    fn rope_styles() {
        let mut x = [1.0, 0.0, 0.0, 1.0];
        rope(&mut x, &[0.0, 1.0], &[1.0, 0.0], RopeStyle::Norm);
        assert_eq!(x, [0.0, 1.0, 0.0, 1.0]);
        let mut x = [1.0, 0.0, 0.0, 1.0];
        rope(&mut x, &[0.0, 1.0], &[1.0, 0.0], RopeStyle::Neox);
        assert_eq!(x, [0.0, 0.0, 1.0, 1.0]);
    }
}
