//! The model side of the scheduler: [`BatchModel`] runs one scheduler step for a set of
//! sequences, each in its own KV slot, and [`CpuBatchModel`] implements it over the CPU
//! reference backend by running each sequence's work with the existing single-sequence code.

use crate::backend::{Backend, check_forward_args};
use crate::cpu::{CpuBackend, CpuKvCache};
use crate::error::InferenceError;
use crate::sampling::SimpleSample;

/// One sequence's work in a step: feed `tokens` at positions `start_pos..` into KV slot
/// `slot` (a prefill chunk, or the one token a decoding sequence sampled last step).
#[derive(Debug, Clone, Copy)]
pub struct SeqWork<'a> {
    /// The sequence's KV slot (`0..slots()`), fixed for its lifetime.
    pub slot: usize,
    /// Tokens to run (never empty).
    pub tokens: &'a [u32],
    /// Position of `tokens[0]`; positions before it were filled by earlier steps.
    pub start_pos: usize,
    /// The sequence's KV blocks in position order (already covering
    /// `start_pos + tokens.len()` positions), for backends that page their cache.
    pub blocks: &'a [u32],
    /// Whether the last token's logits are needed (the end of the prompt, or a decode step).
    pub want_logits: bool,
}

/// A model that advances several sequences per step.
pub trait BatchModel: Send {
    /// Short name for logs (e.g. `"cpu-per-sequence"`).
    fn name(&self) -> &str;
    /// Vocabulary size (length of each logits vector).
    fn vocab(&self) -> usize;
    /// Most positions one sequence may hold.
    fn max_context(&self) -> usize;
    /// KV slots: the most sequences that can be in the running batch at once.
    fn slots(&self) -> usize;
    /// Runs `work` (at most one item per slot); returns, in order, the last token's logits for
    /// the items with `want_logits` and `None` for the others.
    fn step(&mut self, work: &[SeqWork<'_>]) -> Result<Vec<Option<Vec<f32>>>, InferenceError>;
    /// Forgets slot `slot`'s cache (the sequence left the batch); cheap.
    fn release(&mut self, slot: usize);
    /// Whether the model reads and writes each sequence's K/V only through the block ids of
    /// [`SeqWork::blocks`] (a paged cache), so sequences with the same prompt prefix can share
    /// its full blocks: the scheduler then lets a sequence start after a prefix that another
    /// sequence's blocks already hold, or that the prefix cache kept after its writer ended.
    /// A paged model must therefore keep a block's K/V until a step writes that block again
    /// ([`BatchModel::release`] forgets the slot, never the blocks). `false` (the default) for
    /// per-slot caches.
    fn paged(&self) -> bool {
        false
    }
    /// Told when the sequence in `slot` took its first `positions` positions from shared
    /// blocks (only for a [`BatchModel::paged`] model); its next work starts there.
    fn adopted(&mut self, _slot: usize, _positions: usize) {}
    /// Runs `work` like [`BatchModel::step`], where `picks[i]` (for the items that want
    /// logits) may ask the model to take the sampling step itself: such a row returns
    /// [`RowOutput::Token`], the others [`RowOutput::Logits`]. The default samples on the
    /// host from [`BatchModel::step`]'s logits ([`SimpleSample::pick`]); a device model
    /// overrides it so only token ids cross to the host. `picks` shorter than `work` means
    /// `None` for the rest.
    fn step_sampled(
        &mut self,
        work: &[SeqWork<'_>],
        picks: &[Option<SimpleSample>],
    ) -> Result<Vec<Option<RowOutput>>, InferenceError> {
        let out = self.step(work)?;
        Ok(out
            .into_iter()
            .enumerate()
            .map(|(i, l)| {
                l.map(|l| match picks.get(i).copied().flatten() {
                    Some(s) => RowOutput::Token(s.pick(&l)),
                    None => RowOutput::Logits(l),
                })
            })
            .collect())
    }
}

/// What [`BatchModel::step_sampled`] returns for a row that wanted logits.
#[derive(Debug, Clone, PartialEq)]
pub enum RowOutput {
    /// The last token's logits (the caller samples).
    Logits(Vec<f32>),
    /// The token the model sampled with the row's [`SimpleSample`].
    Token(u32),
}

/// [`BatchModel`] over one [`CpuBackend`] (one copy of the weights) and one detached KV cache
/// per slot, all allocated at construction: a step swaps each sequence's cache into the backend
/// (O(1)) and runs its tokens with [`Backend::forward`], so every sequence computes exactly
/// what it would alone. It reads all the weights once per sequence per step; the CPU served
/// path is [`crate::cpu_batched::CpuBatchedModel`] (one pass over the weights for all
/// sequences, each row's logits bit-identical to this model's), and `cuda::batch` on a GPU.
/// This adapter is their correctness reference (tests) and the concurrency bench's baseline.
#[derive(Debug)]
pub struct CpuBatchModel {
    backend: CpuBackend,
    caches: Vec<CpuKvCache>,
}

impl CpuBatchModel {
    /// `slots` sequences over `backend` (each slot holds a full `max_context` cache).
    pub fn new(backend: CpuBackend, slots: usize) -> Self {
        let caches = (0..slots.max(1)).map(|_| backend.new_kv_cache()).collect();
        CpuBatchModel { backend, caches }
    }

    /// Bytes of KV cache allocated for all slots.
    pub fn kv_bytes(&self) -> usize {
        self.caches.iter().map(CpuKvCache::bytes).sum()
    }
}

impl BatchModel for CpuBatchModel {
    fn name(&self) -> &str {
        "cpu-per-sequence"
    }

    fn vocab(&self) -> usize {
        self.backend.config().vocab
    }

    fn max_context(&self) -> usize {
        self.backend.max_context()
    }

    fn slots(&self) -> usize {
        self.caches.len()
    }

    fn step(&mut self, work: &[SeqWork<'_>]) -> Result<Vec<Option<Vec<f32>>>, InferenceError> {
        let mut out = Vec::with_capacity(work.len());
        for w in work {
            let n = self.caches.len();
            let kv = self.caches.get_mut(w.slot).ok_or_else(|| {
                InferenceError::InvalidArgument(format!("KV slot {} of {n} does not exist", w.slot))
            })?;
            self.backend.swap_kv_cache(kv)?;
            let r = self.backend.forward(w.tokens, w.start_pos);
            // Swap back even on error so the slot keeps its own cache.
            self.backend.swap_kv_cache(kv)?;
            let logits = r?;
            out.push(w.want_logits.then_some(logits));
        }
        Ok(out)
    }

    fn release(&mut self, slot: usize) {
        if let Some(kv) = self.caches.get_mut(slot)
            && self.backend.swap_kv_cache(kv).is_ok()
        {
            self.backend.reset();
            // Same shapes (checked by the first swap), so this cannot fail.
            let _ = self.backend.swap_kv_cache(kv);
        }
    }
}

impl<M: BatchModel + ?Sized> BatchModel for Box<M> {
    fn name(&self) -> &str {
        (**self).name()
    }
    fn vocab(&self) -> usize {
        (**self).vocab()
    }
    fn max_context(&self) -> usize {
        (**self).max_context()
    }
    fn slots(&self) -> usize {
        (**self).slots()
    }
    fn step(&mut self, work: &[SeqWork<'_>]) -> Result<Vec<Option<Vec<f32>>>, InferenceError> {
        (**self).step(work)
    }
    fn release(&mut self, slot: usize) {
        (**self).release(slot)
    }
    fn step_sampled(
        &mut self,
        work: &[SeqWork<'_>],
        picks: &[Option<SimpleSample>],
    ) -> Result<Vec<Option<RowOutput>>, InferenceError> {
        (**self).step_sampled(work, picks)
    }
    fn paged(&self) -> bool {
        (**self).paged()
    }
    fn adopted(&mut self, slot: usize, positions: usize) {
        (**self).adopted(slot, positions)
    }
}

/// [`BatchModel`] with one slot over any [`Backend`] (its one KV cache): the scheduler then
/// runs one sequence at a time, with the same admission, back-pressure and cancellation as
/// a batching model. For backends without a batched path.
pub struct SerialBatchModel {
    backend: Box<dyn Backend>,
    name: String,
    vocab: usize,
}

impl std::fmt::Debug for SerialBatchModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialBatchModel")
            .field("backend", &self.backend.name())
            .finish()
    }
}

impl SerialBatchModel {
    /// One slot over `backend` whose vocabulary has `vocab` tokens.
    pub fn new(backend: Box<dyn Backend>, vocab: usize) -> Self {
        SerialBatchModel {
            name: format!("{}-serial", backend.name()),
            backend,
            vocab,
        }
    }
}

impl BatchModel for SerialBatchModel {
    fn name(&self) -> &str {
        &self.name
    }
    fn vocab(&self) -> usize {
        self.vocab
    }
    fn max_context(&self) -> usize {
        self.backend.max_context()
    }
    fn slots(&self) -> usize {
        1
    }
    fn step(&mut self, work: &[SeqWork<'_>]) -> Result<Vec<Option<Vec<f32>>>, InferenceError> {
        let mut out = Vec::with_capacity(work.len());
        for w in work {
            if w.slot != 0 {
                return Err(InferenceError::InvalidArgument(format!(
                    "KV slot {} of 1 does not exist",
                    w.slot
                )));
            }
            check_forward_args(
                w.tokens,
                w.start_pos,
                self.vocab,
                self.backend.max_context(),
            )?;
            let logits = self.backend.forward(w.tokens, w.start_pos)?;
            out.push(w.want_logits.then_some(logits));
        }
        Ok(out)
    }
    fn release(&mut self, _slot: usize) {
        self.backend.reset();
    }
}
