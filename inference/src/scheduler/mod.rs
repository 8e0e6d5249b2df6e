//! Continuous batching: a backend-agnostic scheduler that advances many requests together.
//!
//! Each [`Scheduler::step`]:
//! 1. drops cancelled requests (a dropped [`RequestHandle`]) and frees their KV blocks;
//! 2. admits waiting requests in arrival order while a KV slot is free and the block pool can
//!    still honour every admitted request's worst case (prompt + `max_tokens`, capped by the
//!    context), so a running sequence can always grow and nothing ever runs out of memory;
//! 3. forms the batch anew: every decoding sequence feeds its last sampled token, and the
//!    prefill token budget ([`SchedulerConfig::prefill_chunk`]) is spent on prompt chunks, oldest
//!    request first, so a long prompt is spread over several steps and never stalls the other
//!    streams for more than one step;
//!    With a paged model ([`BatchModel::paged`]) a prefilling sequence first takes the full
//!    prompt blocks that another running sequence already wrote for the same prefix (`n`
//!    choices of one request, a shared system prompt), or that the prefix cache kept from a
//!    sequence that ended (see below): they join its table (reference-counted by the
//!    [`BlockAllocator`]) and are not computed again; when such a block is still being
//!    written, the sequence waits a step for it rather than computing it twice;
//! 4. grows each sequence's [`BlockTable`] to cover its new positions (one block at a time,
//!    no per-token reallocation; when the free list is short, cached blocks are evicted) and
//!    runs the step on the [`BatchModel`];
//! 5. hands each sequence's logits to its own [`Continuation`] (the same per-sequence state
//!    machine the single-sequence engine runs: its own sampler with `temperature`, `top_p`,
//!    `seed` and penalties, an optional grammar constraint, stop tokens, stop strings,
//!    `max_tokens`, the context window, logprobs), so a request's output does not depend on
//!    what else is in the batch; text that became final goes out as [`Event::Piece`]s.
//!
//! **Prefix cache** (automatic prefix caching; paged models, on unless
//! [`Scheduler::set_prefix_cache`] turns it off). The shareable blocks are indexed by content:
//! key = (the previous block of the table, or none for the first, and the block's tokens), so
//! a key names a whole prefix exactly. Indexed are the full prompt blocks (when planned, marked
//! written when their step succeeds) and, with the cache on, the full blocks of generated
//! tokens once every position in them was fed (their K/V is the model's, like a prompt
//! block's; a multi-turn chat's next prompt repeats them). When a sequence ends — finished,
//! cancelled or failed — each block no other sequence holds stays in the pool as *cached*
//! (held by no table) if it is indexed, written and its previous block stays indexed (so a
//! kept block's whole chain is kept); the rest return to the pool and leave the index. A later
//! prefilling sequence adopts cached blocks by the same key walk as running-shared ones. When
//! a block must be handed out and the free list is empty, the least recently cached *leaf*
//! (no indexed block keyed on it) is evicted: it leaves the index, so no key ever names a
//! block id that was handed out again. Cached blocks never count against admission (only
//! reservations do), and a running sequence always finds a block (the argument is at
//! `Scheduler::grow`). The model keeps a block's K/V by block id, so a cached block is intact
//! after its writer's slot was reused ([`BatchModel::release`] only forgets the slot).
//! [`StepReport::cached`] counts prompt tokens taken from the cache.
//!
//! **Scopes.** Sharing (running or cached) shows in the time to the first token, so it tells a
//! client whether someone recently sent the same prefix. Each request has a [`CacheScope`]
//! ([`Scheduler::submit_scoped`]; the server derives it from `cache_salt`) and a first block's
//! key carries it, so chains, and with them every shared block, stay within one scope.
//! [`SHARED_SCOPE`] is the scope of requests submitted without one.
//!
//! Submission is typed: a request that can never fit the KV budget is refused with
//! [`SubmitError::TooLarge`] (a 4xx for the server), and when the waiting queue is at its bound
//! [`SubmitError::Busy`] carries a retry-after hint (429 + `Retry-After`).
//!
//! The scheduler is synchronous and single-threaded; a server drives it from one thread and
//! reads each request's [`Event`]s from its [`RequestHandle`] (a tokio channel, readable from
//! async code and from plain threads).

mod blocks;
mod model;

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

pub use blocks::{BlockAllocator, BlockTable};
pub use model::{BatchModel, CpuBatchModel, RowOutput, SeqWork, SerialBatchModel};

use crate::continuation::{Advance, Continuation};
use crate::engine::{FinishReason, GeneratedToken, Generation, Timings};
use crate::error::InferenceError;
use crate::grammar::TokenConstraint;
use crate::sampling::{SamplingParams, SimpleSample};
use crate::tokenizer::Tokenizer;

/// Scheduler settings, fixed at start.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Token positions per KV block.
    pub block_size: usize,
    /// Blocks in the KV pool: the memory budget (`block_size * kv_blocks` positions in all).
    pub kv_blocks: usize,
    /// Prompt tokens computed per step, over all prefilling sequences (at least 1).
    pub prefill_chunk: usize,
    /// Requests that may wait for admission beyond the free KV slots (those are admitted at the
    /// next step); one more is refused with [`SubmitError::Busy`].
    pub max_queued: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            block_size: 16,
            kv_blocks: 1024,
            prefill_chunk: 256,
            max_queued: 64,
        }
    }
}

/// A generation request.
#[derive(Debug, Clone)]
pub struct Request {
    /// Prompt token ids (not empty).
    pub prompt: Vec<u32>,
    /// Sampling and stopping parameters (`max_tokens`, `temperature`, `top_p`, `seed`, `stop`, …).
    pub params: SamplingParams,
}

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// The request can never fit the KV budget or the context window (a client error).
    #[error(
        "the request needs {needed} KV positions (prompt {prompt} + max_tokens {max_tokens}) but this worker holds at most {limit} per request; shorten the prompt or lower max_tokens"
    )]
    TooLarge {
        /// Positions the request needs (prompt + max_tokens, capped by the context window).
        needed: usize,
        /// Prompt tokens.
        prompt: usize,
        /// Requested new tokens.
        max_tokens: usize,
        /// Most positions one request can get (the smaller of the pool and the context).
        limit: usize,
    },
    /// The request itself is malformed (empty prompt, token outside the vocabulary).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The KV budget is in use and the waiting queue is full: retry later.
    #[error(
        "the worker is at capacity ({queued} requests waiting); retry after {} s",
        retry_after.as_secs()
    )]
    Busy {
        /// Requests already waiting.
        queued: usize,
        /// When a retry is likely to be admitted (whole seconds, at least 1).
        retry_after: Duration,
    },
}

/// What a request's handle receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Text that became final and the generated tokens that begin in it, with their logprobs
    /// when asked for (as [`crate::engine::Piece`]; stop strings are held back until ruled
    /// out, the final stop token is never reported).
    Piece {
        /// The text (may be empty when a token is only part of a character).
        text: String,
        /// The tokens that begin in it.
        tokens: Vec<GeneratedToken>,
    },
    /// The request ended; nothing follows. `timings.prefill_ms` is the time from admission to
    /// the first token, `decode_ms` the time after it.
    Finished(Generation),
    /// The model failed on this request's step, or its constraint rejected a token; nothing
    /// follows.
    Failed(String),
}

/// The submitter's side of a request: its events, and cancellation. Dropping the handle (the
/// client went away) cancels the request; its KV blocks are freed at the next step.
#[derive(Debug)]
pub struct RequestHandle {
    id: u64,
    rx: mpsc::UnboundedReceiver<Event>,
    cancel: Arc<AtomicBool>,
}

impl RequestHandle {
    /// The request's id (submission order).
    pub fn id(&self) -> u64 {
        self.id
    }
    /// Cancels the request (also done on drop).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }
    /// The next event if one is ready.
    pub fn try_recv(&mut self) -> Option<Event> {
        self.rx.try_recv().ok()
    }
    /// The next event, waiting for it (async).
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
}

impl Drop for RequestHandle {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// What one step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepReport {
    /// Sequences that fed one decode token.
    pub decoded: usize,
    /// Prompt tokens computed.
    pub prefilled: usize,
    /// Prompt tokens not computed because their K/V blocks were shared with another sequence
    /// holding the same prefix, or taken from the prefix cache.
    pub shared: usize,
    /// Of `shared`, the tokens taken from cached blocks (written by sequences that ended).
    pub cached: usize,
    /// Cached blocks evicted in the step (their space was needed).
    pub evicted: usize,
    /// Blocks in the prefix cache after the step (held by no sequence, reclaimable).
    pub cached_blocks: usize,
    /// Sequences in the batch after the step.
    pub running: usize,
    /// Requests still waiting after the step.
    pub waiting: usize,
    /// Requests that ended in the step (finished, cancelled or failed).
    pub ended: usize,
    /// Of those, requests cancelled by their client (handle dropped or cancelled).
    pub cancelled: usize,
}

struct Waiting {
    req: Request,
    constraint: Option<Box<dyn TokenConstraint>>,
    scope: CacheScope,
    reserve: usize,
    tx: mpsc::UnboundedSender<Event>,
    cancel: Arc<AtomicBool>,
}

struct Seq {
    slot: usize,
    /// Its prefix-sharing scope.
    scope: CacheScope,
    prompt_len: usize,
    /// Prompt + generated tokens.
    all: Vec<u32>,
    /// Positions in the KV cache.
    fed: usize,
    cont: Continuation<'static>,
    /// Set when generation ended; the sequence leaves at the end of the step.
    done: Option<FinishReason>,
    /// Its constraint failed ([`Event::Failed`] was sent): no `Finished` follows.
    failed: bool,
    reserve: usize,
    table: BlockTable,
    admitted: Instant,
    first_token: Option<Instant>,
    tx: mpsc::UnboundedSender<Event>,
    cancel: Arc<AtomicBool>,
}

impl Seq {
    fn generated(&self) -> usize {
        self.all.len() - self.prompt_len
    }
    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.tx.is_closed()
    }
}

/// Sends a sequence's pieces to its handle; `false` once the receiver is gone.
fn sender(tx: &mpsc::UnboundedSender<Event>) -> impl FnMut(&crate::engine::Piece<'_>) -> bool {
    move |p| {
        tx.send(Event::Piece {
            text: p.text.to_owned(),
            tokens: p.tokens.to_vec(),
        })
        .is_ok()
    }
}

/// The full blocks of K/V that sequences wrote, by content, for sharing (paged models only): a
/// block is keyed by the block before it in its table (so by the whole prefix, exactly, with no
/// hashing) and its own tokens. It holds the blocks of running sequences and, with the prefix
/// cache on, the cached blocks of ended ones (held by no table, see [`BlockAllocator`]).
///
/// Invariants: an indexed block's previous block is indexed (registered only then, kept in
/// position order, evicted only as a leaf, and on release forgotten after its successors), so
/// an indexed key never names a block id that was handed out again; every holder of an indexed
/// block at position `b` of its table holds the block its key names as previous at `b - 1` (it
/// registered the block after that one, or adopted it by a key naming its own block `b - 1`),
/// so a block's holders are a subset of its previous block's.
#[derive(Debug, Default)]
struct PrefixIndex {
    /// (previous block or [`NO_BLOCK`], the block's tokens) → (block, its K/V is written).
    by_key: HashMap<(u32, Vec<u32>), (u32, bool)>,
    /// block → its entry, to forget it when the block returns to the pool.
    blocks: HashMap<u32, Indexed>,
    /// Cached blocks that no indexed block names as previous (evictable), least recently
    /// cached first: (tick, block).
    lru: BTreeSet<(u64, u32)>,
    /// Ticks handed out so far (the LRU clock).
    tick: u64,
}

/// One indexed block.
#[derive(Debug)]
struct Indexed {
    key: (u32, Vec<u32>),
    /// Indexed blocks whose key names this one as previous.
    children: u32,
    /// When it became cached (`None`: a table holds it).
    cached_at: Option<u64>,
}

/// What [`Scheduler::adopt_prefix`] did.
struct Adopt {
    /// Positions taken from shared blocks (maybe 0).
    took: usize,
    /// Of those, positions taken from cached blocks.
    cached: usize,
    /// The next block is being written by another sequence: skip this sequence this step.
    wait: bool,
}

/// The "previous block" of a sequence's first block in [`PrefixIndex`] keys.
const NO_BLOCK: u32 = u32::MAX;

/// A prefix-sharing scope ([`Scheduler::submit_scoped`]): sequences share K/V blocks (running
/// or cached) only within one scope.
pub type CacheScope = u64;

/// The scope of [`Scheduler::submit`] and [`Scheduler::submit_constrained`]: every request
/// submitted without one shares with the others.
pub const SHARED_SCOPE: CacheScope = 0;

/// The [`PrefixIndex`] key of block `b` of a sequence in `scope` whose tokens are `all` and
/// whose table is `blocks` (at least `b` long): the previous block and the block's tokens. A
/// first block's key has no previous block; it carries the scope instead (two words before
/// the tokens, for any scope but [`SHARED_SCOPE`]), and every later key names its previous
/// block, so whole chains are per scope. Exact: keys of different scopes never compare equal.
fn block_key(
    scope: CacheScope,
    blocks: &[u32],
    all: &[u32],
    b: usize,
    bs: usize,
) -> (u32, Vec<u32>) {
    let tokens = &all[b * bs..(b + 1) * bs];
    if b > 0 {
        return (blocks[b - 1], tokens.to_vec());
    }
    let mut key = Vec::with_capacity(bs + 2);
    if scope != SHARED_SCOPE {
        key.extend([scope as u32, (scope >> 32) as u32]);
    }
    key.extend_from_slice(tokens);
    (NO_BLOCK, key)
}

impl PrefixIndex {
    /// Records `block` as holding `key`'s prefix, unless another block already does or the
    /// previous block is not indexed (a copy of an indexed block that nobody can adopt, nor
    /// then this one).
    fn register(&mut self, key: (u32, Vec<u32>), block: u32) {
        if self.blocks.contains_key(&block)
            || self.by_key.contains_key(&key)
            || (key.0 != NO_BLOCK && !self.blocks.contains_key(&key.0))
        {
            return;
        }
        if let Some(prev) = self.blocks.get_mut(&key.0) {
            prev.children += 1;
            if let Some(t) = prev.cached_at {
                // Not reached (the registering table holds its previous block); kept exact.
                self.lru.remove(&(t, key.0));
            }
        }
        self.by_key.insert(key.clone(), (block, false));
        self.blocks.insert(
            block,
            Indexed {
                key,
                children: 0,
                cached_at: None,
            },
        );
    }
    /// Marks `block`'s K/V as written (it may be shared from now on).
    fn written(&mut self, block: u32) {
        if let Some(ix) = self.blocks.get(&block)
            && let Some(e) = self.by_key.get_mut(&ix.key)
        {
            e.1 = true;
        }
    }
    /// Whether `block` is indexed with its K/V written and its previous block (if any) is
    /// indexed: what the cache may keep when the last table releases it.
    fn keepable(&self, block: u32) -> bool {
        let Some(ix) = self.blocks.get(&block) else {
            return false;
        };
        let written = self.by_key.get(&ix.key) == Some(&(block, true));
        written && (ix.key.0 == NO_BLOCK || self.blocks.contains_key(&ix.key.0))
    }
    /// Marks indexed `block` cached (no table holds it now).
    fn cache(&mut self, block: u32) {
        self.tick += 1;
        if let Some(ix) = self.blocks.get_mut(&block) {
            ix.cached_at = Some(self.tick);
            if ix.children == 0 {
                self.lru.insert((self.tick, block));
            }
        }
    }
    /// Marks `block` held again (a table adopted it from the cache).
    fn adopt(&mut self, block: u32) {
        if let Some(ix) = self.blocks.get_mut(&block)
            && let Some(t) = ix.cached_at.take()
        {
            self.lru.remove(&(t, block));
        }
    }
    /// Forgets `block` (it went back to the pool). Returns the cached blocks keyed on it that
    /// were forgotten with it, for the caller to free — none while the invariants hold (a
    /// block leaves the index only when no table holds it and it has no indexed successor).
    fn forget(&mut self, block: u32) -> Vec<u32> {
        let Some(ix) = self.blocks.remove(&block) else {
            return Vec::new();
        };
        self.by_key.remove(&ix.key);
        if let Some(t) = ix.cached_at {
            self.lru.remove(&(t, block));
        }
        if let Some(prev) = self.blocks.get_mut(&ix.key.0) {
            prev.children -= 1;
            if prev.children == 0
                && let Some(t) = prev.cached_at
            {
                self.lru.insert((t, ix.key.0));
            }
        }
        let mut orphans = Vec::new();
        if ix.children > 0 {
            debug_assert!(false, "block {block} left the index before its successors");
            let kids: Vec<u32> = self
                .blocks
                .iter()
                .filter(|(_, c)| c.key.0 == block)
                .map(|(&b, _)| b)
                .collect();
            for k in kids {
                if self.blocks.get(&k).is_some_and(|c| c.cached_at.is_some()) {
                    orphans.push(k);
                }
                orphans.extend(self.forget(k));
            }
        }
        orphans
    }
    /// Forgets the least recently cached leaf and returns it (`None`: no cached leaf).
    fn evict(&mut self) -> Option<u32> {
        let &(_, block) = self.lru.first()?;
        let orphans = self.forget(block);
        debug_assert!(orphans.is_empty(), "a leaf has no successors");
        Some(block)
    }
}

/// The continuous-batching scheduler over a [`BatchModel`].
pub struct Scheduler<M: BatchModel> {
    model: M,
    tokenizer: Arc<Tokenizer>,
    cfg: SchedulerConfig,
    alloc: BlockAllocator,
    /// Blocks promised to running sequences (their worst case), owned or not yet.
    committed: usize,
    waiting: VecDeque<Waiting>,
    running: Vec<Seq>,
    free_slots: Vec<usize>,
    next_id: u64,
    /// Smoothed step duration, for retry-after hints.
    step_time: Duration,
    /// Shareable blocks (empty unless the model is paged).
    prefix: PrefixIndex,
    /// Whether ended sequences' written blocks stay cached ([`Scheduler::set_prefix_cache`]).
    prefix_cache: bool,
    /// Cached blocks evicted since the report of the last step began.
    evicted: usize,
}

impl<M: BatchModel> std::fmt::Debug for Scheduler<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scheduler")
            .field("model", &self.model.name())
            .field("cfg", &self.cfg)
            .field("running", &self.running.len())
            .field("waiting", &self.waiting.len())
            .field("free_blocks", &self.alloc.free())
            .field("cached_blocks", &self.alloc.cached())
            .field("prefix_cache", &self.prefix_cache)
            .finish()
    }
}

impl<M: BatchModel> Scheduler<M> {
    /// A scheduler over `model`; `tokenizer` gives the stop tokens and the text for stop strings.
    pub fn new(model: M, tokenizer: Arc<Tokenizer>, cfg: SchedulerConfig) -> Self {
        let cfg = SchedulerConfig {
            block_size: cfg.block_size.max(1),
            prefill_chunk: cfg.prefill_chunk.max(1),
            ..cfg
        };
        let slots = model.slots();
        Scheduler {
            alloc: BlockAllocator::new(cfg.block_size, cfg.kv_blocks),
            model,
            tokenizer,
            cfg,
            committed: 0,
            waiting: VecDeque::new(),
            running: Vec::new(),
            free_slots: (0..slots).rev().collect(),
            next_id: 0,
            step_time: Duration::from_millis(50),
            prefix: PrefixIndex::default(),
            prefix_cache: true,
            evicted: 0,
        }
    }

    /// Turns the prefix cache on (the default) or off. On, the written full blocks of a
    /// sequence that ends stay in the pool as cached blocks that later requests with the same
    /// prefix adopt instead of computing them, until their space is needed (least recently
    /// used first); off, they return to the pool (sharing is then among running sequences
    /// only). Turning it off drops what is cached. No effect on a model that is not
    /// [`BatchModel::paged`].
    pub fn set_prefix_cache(&mut self, on: bool) {
        self.prefix_cache = on;
        if !on {
            while let Some(b) = self.prefix.evict() {
                self.alloc.uncache(b);
            }
        }
    }

    /// [`Scheduler::set_prefix_cache`], builder style.
    pub fn with_prefix_cache(mut self, on: bool) -> Self {
        self.set_prefix_cache(on);
        self
    }

    /// Whether the prefix cache is on.
    pub fn prefix_cache(&self) -> bool {
        self.prefix_cache
    }

    /// The block pool (free, cached and held counts).
    pub fn allocator(&self) -> &BlockAllocator {
        &self.alloc
    }

    /// The model.
    pub fn model(&self) -> &M {
        &self.model
    }
    /// KV blocks not owned by any sequence: free, or cached (reclaimable on demand).
    pub fn free_blocks(&self) -> usize {
        self.alloc.free() + self.alloc.cached()
    }
    /// KV blocks in the prefix cache: held by no sequence, their K/V kept for adoption.
    pub fn cached_blocks(&self) -> usize {
        self.alloc.cached()
    }
    /// KV blocks in the pool.
    pub fn total_blocks(&self) -> usize {
        self.alloc.total()
    }
    /// Sequences in the running batch.
    pub fn running(&self) -> usize {
        self.running.len()
    }
    /// Requests waiting for admission.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
    /// Nothing running and nothing waiting.
    pub fn is_idle(&self) -> bool {
        self.running.is_empty() && self.waiting.is_empty()
    }

    /// Queues a request. Refuses one that can never fit ([`SubmitError::TooLarge`]), a malformed
    /// one ([`SubmitError::Invalid`]) and, when the queue is at its bound, any
    /// ([`SubmitError::Busy`]).
    pub fn submit(&mut self, req: Request) -> Result<RequestHandle, SubmitError> {
        self.submit_constrained(req, None)
    }

    /// [`Scheduler::submit`] with a token constraint (structured output, tool calls) that
    /// masks every sampling step of this request.
    pub fn submit_constrained(
        &mut self,
        req: Request,
        constraint: Option<Box<dyn TokenConstraint>>,
    ) -> Result<RequestHandle, SubmitError> {
        self.submit_scoped(req, constraint, SHARED_SCOPE)
    }

    /// [`Scheduler::submit_constrained`] in a prefix-sharing scope: the request adopts (and
    /// leaves for others) only K/V blocks of requests in the same scope. Sharing is visible
    /// as time to first token, so a client that must not learn what other clients' prompts
    /// begin with gets a scope of its own (the server derives one from `cache_salt`).
    pub fn submit_scoped(
        &mut self,
        req: Request,
        constraint: Option<Box<dyn TokenConstraint>>,
        scope: CacheScope,
    ) -> Result<RequestHandle, SubmitError> {
        if req.prompt.is_empty() {
            return Err(SubmitError::Invalid("the prompt has no tokens".into()));
        }
        let vocab = self.model.vocab();
        if let Some(t) = req.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(SubmitError::Invalid(format!(
                "token id {t} is outside the vocabulary (size {vocab})"
            )));
        }
        let ctx = self.model.max_context();
        let pool = self.alloc.total() * self.alloc.block_size();
        let limit = ctx.min(pool);
        let wanted = req.prompt.len().saturating_add(req.params.max_tokens);
        // The context window ends a generation early (finish reason `length`), as the
        // single-sequence engine does, so only the prompt must fit it.
        let needed = wanted.min(ctx);
        if req.prompt.len() > ctx || needed > pool {
            return Err(SubmitError::TooLarge {
                needed: wanted,
                prompt: req.prompt.len(),
                max_tokens: req.params.max_tokens,
                limit,
            });
        }
        if self.waiting.len() >= self.cfg.max_queued {
            return Err(SubmitError::Busy {
                queued: self.waiting.len(),
                retry_after: self.retry_after_hint(),
            });
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let id = self.next_id;
        self.next_id += 1;
        self.waiting.push_back(Waiting {
            reserve: self.alloc.blocks_for(needed),
            req,
            constraint,
            scope,
            tx,
            cancel: cancel.clone(),
        });
        // Straight into the batch when a slot and the blocks are free (it starts at the next
        // step); otherwise it waits.
        self.admit();
        Ok(RequestHandle { id, rx, cancel })
    }

    /// Whole seconds until the running sequence closest to its end is likely done.
    fn retry_after_hint(&self) -> Duration {
        let steps = self
            .running
            .iter()
            .map(|s| {
                let left_prompt = s.prompt_len.saturating_sub(s.fed);
                let left_gen = s.cont.params().max_tokens.saturating_sub(s.generated());
                left_prompt.div_ceil(self.cfg.prefill_chunk) + left_gen
            })
            .min()
            .unwrap_or(1) as u32;
        let secs = (self.step_time * steps.max(1)).as_secs_f64().ceil();
        Duration::from_secs((secs as u64).clamp(1, 60))
    }

    /// Lets running sequence `i` (prefilling, paged model) start after the full prompt blocks
    /// that another sequence already wrote for the same prefix, or that the prefix cache
    /// kept. Waits (this step) when such a block is still being written. Always leaves at
    /// least one prompt token to compute (its logits start the generation).
    fn adopt_prefix(&mut self, i: usize) -> Adopt {
        let bs = self.cfg.block_size;
        let s = &mut self.running[i];
        let mut took = 0;
        let mut cached = 0;
        let mut wait = false;
        while s.fed.is_multiple_of(bs) && s.table.len() == s.fed / bs && s.fed + bs < s.prompt_len {
            let b = s.fed / bs;
            let key = block_key(s.scope, s.table.blocks(), &s.all, b, bs);
            match self.prefix.by_key.get(&key) {
                Some(&(block, true)) => {
                    let from_cache = self.alloc.is_cached(block);
                    if !self.alloc.share(&mut s.table, block) {
                        break;
                    }
                    if from_cache {
                        self.prefix.adopt(block);
                        cached += bs;
                    }
                    s.fed += bs;
                    took += bs;
                }
                Some(&(_, false)) => {
                    wait = true;
                    break;
                }
                _ => break,
            }
        }
        if took > 0 {
            self.model.adopted(s.slot, s.fed);
        }
        Adopt { took, cached, wait }
    }

    /// Grows running sequence `i`'s table to cover `positions`, evicting cached blocks when
    /// the free list is short.
    ///
    /// Why eviction always finds enough: a sequence's table never exceeds its reservation, so
    /// the held blocks number at most `committed` (each held block is in some table) minus what
    /// this growth still needs; `committed <= total` (admission), so free + cached covers the
    /// need. And every cached block either is a leaf (no indexed block names it as previous)
    /// or has an indexed successor that no table holds either — a table holding the successor
    /// would hold it too, since tables hold whole chains from their first block (see
    /// [`PrefixIndex`]) — so that successor is cached; following successors (positions grow
    /// along them, so this ends) reaches a cached leaf. Evicting that leaf keeps the rest a
    /// forest of cached chains, so `k` cached blocks can all be evicted, leaves first.
    fn grow(&mut self, i: usize, positions: usize) -> Result<(), InferenceError> {
        let s = &mut self.running[i];
        let need = self
            .alloc
            .blocks_for(positions)
            .saturating_sub(s.table.len());
        while self.alloc.free() < need {
            let Some(b) = self.prefix.evict() else { break };
            self.alloc.uncache(b);
            self.evicted += 1;
        }
        if self.alloc.grow(&mut s.table, positions) {
            Ok(())
        } else {
            Err(self.pool_bug())
        }
    }

    /// Releases a table that leaves the batch. With the prefix cache on (paged models), each
    /// block no other sequence holds stays cached when it is indexed, written, and its previous
    /// block stays indexed (decided in position order, so a kept block's chain is kept); the
    /// others go back to the pool and leave the index.
    fn release_table(&mut self, table: &mut BlockTable) {
        let keep_on = self.prefix_cache && self.model.paged();
        let prefix = &mut self.prefix;
        let mut dropped = Vec::new();
        let mut dropped_set = HashSet::new();
        self.alloc.release_keeping(table, |b| {
            let prev_dropped = prefix
                .blocks
                .get(&b)
                .is_some_and(|ix| dropped_set.contains(&ix.key.0));
            if keep_on && !prev_dropped && prefix.keepable(b) {
                prefix.cache(b);
                true
            } else {
                dropped.push(b);
                dropped_set.insert(b);
                false
            }
        });
        // Successors first: a block leaves the index after the blocks keyed on it.
        let mut orphans = Vec::new();
        for &b in dropped.iter().rev() {
            orphans.extend(self.prefix.forget(b));
        }
        for b in orphans {
            self.alloc.uncache(b);
        }
    }

    fn pool_bug(&self) -> InferenceError {
        InferenceError::Backend {
            backend: self.model.name().to_owned(),
            message: "KV block pool exhausted despite the admission reservation (a scheduler bug)"
                .into(),
        }
    }

    fn end(&mut self, i: usize, event: Event) {
        let mut s = self.running.remove(i);
        self.release_table(&mut s.table);
        self.committed -= s.reserve;
        self.model.release(s.slot);
        self.free_slots.push(s.slot);
        let _ = s.tx.send(event); // the receiver may be gone (cancelled)
    }

    fn finish(&mut self, i: usize, reason: FinishReason) {
        let mut s = self.running.remove(i);
        self.release_table(&mut s.table);
        self.committed -= s.reserve;
        self.model.release(s.slot);
        self.free_slots.push(s.slot);
        let now = Instant::now();
        let first = s.first_token.unwrap_or(now);
        let timings = Timings {
            prefill_tokens: s.prompt_len,
            prefill_ms: first.duration_since(s.admitted).as_secs_f64() * 1000.0,
            decode_tokens: s.generated().saturating_sub(1),
            decode_ms: now.duration_since(first).as_secs_f64() * 1000.0,
        };
        if s.failed {
            return;
        }
        let tx = s.tx.clone();
        let g = s.cont.finish(reason, timings, &mut sender(&tx));
        let _ = tx.send(Event::Finished(g)); // the receiver may be gone (cancelled)
    }

    /// Moves waiting requests into the batch, in arrival order, while a slot is free and the
    /// pool can honour their worst case.
    fn admit(&mut self) {
        while let Some(w) = self.waiting.front() {
            if self.free_slots.is_empty() || self.committed + w.reserve > self.alloc.total() {
                break;
            }
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            let Some(slot) = self.free_slots.pop() else {
                break;
            };
            self.committed += w.reserve;
            let cont = Continuation::new(
                self.tokenizer.clone(),
                &w.req.prompt,
                w.req.params,
                w.constraint,
                self.model.max_context(),
            );
            self.running.push(Seq {
                slot,
                scope: w.scope,
                prompt_len: w.req.prompt.len(),
                all: w.req.prompt,
                fed: 0,
                done: cont.start(),
                failed: false,
                cont,
                reserve: w.reserve,
                table: BlockTable::default(),
                admitted: Instant::now(),
                first_token: None,
                tx: w.tx,
                cancel: w.cancel,
            });
        }
    }

    /// Runs one step (see the module docs). Errors from the model end the requests of the
    /// step with [`Event::Failed`] and are returned; the scheduler stays usable.
    pub fn step(&mut self) -> Result<StepReport, InferenceError> {
        let t0 = Instant::now();
        let mut report = StepReport::default();
        // 1. Cancellations.
        self.waiting
            .retain(|w| !w.cancel.load(Ordering::Relaxed) && !w.tx.is_closed());
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].cancelled() {
                self.finish(i, FinishReason::Cancelled);
                report.ended += 1;
                report.cancelled += 1;
            } else {
                i += 1;
            }
        }
        // 2. Admission, in arrival order.
        self.admit();
        // 3. The batch: every decoding sequence, then prompt chunks within the budget.
        // (index in running, tokens, want_logits)
        let mut plan: Vec<(usize, usize, bool)> = Vec::new();
        let mut budget = self.cfg.prefill_chunk;
        for (i, s) in self.running.iter().enumerate() {
            if s.done.is_none() && s.fed >= s.prompt_len {
                plan.push((i, 1, true));
                report.decoded += 1;
            }
        }
        let paged = self.model.paged();
        for i in 0..self.running.len() {
            if self.running[i].done.is_some() || self.running[i].fed >= self.running[i].prompt_len {
                continue;
            }
            if paged {
                let a = self.adopt_prefix(i);
                report.shared += a.took;
                report.cached += a.cached;
                if a.wait {
                    continue;
                }
            }
            if budget > 0 {
                let s = &self.running[i];
                let n = (s.prompt_len - s.fed).min(budget);
                let fed = s.fed;
                budget -= n;
                plan.push((i, n, fed + n == s.prompt_len));
                report.prefilled += n;
                if paged {
                    // Its blocks now, so the full prompt blocks it writes in this step are
                    // known (as being written) to the sequences planned after it.
                    self.grow(i, fed + n)?;
                    let s = &self.running[i];
                    let bs = self.cfg.block_size;
                    let blocks = s.table.blocks();
                    for b in s.fed / bs..((s.fed + n).min(s.prompt_len) / bs) {
                        self.prefix
                            .register(block_key(s.scope, blocks, &s.all, b, bs), blocks[b]);
                    }
                }
            }
        }
        // 4. Blocks for the new positions (guaranteed by the admission reservation).
        for &(i, n, _) in &plan {
            let fed = self.running[i].fed;
            self.grow(i, fed + n)?;
        }
        // The rows whose sampling step the model may take (drawn now, in the same order
        // as sampling from logits would draw).
        let picks: Vec<Option<SimpleSample>> = plan
            .iter()
            .map(|&(i, _, want_logits)| {
                if want_logits {
                    self.running[i].cont.simple_step()
                } else {
                    None
                }
            })
            .collect();
        let work: Vec<SeqWork<'_>> = plan
            .iter()
            .map(|&(i, n, want_logits)| {
                let s = &self.running[i];
                SeqWork {
                    slot: s.slot,
                    tokens: &s.all[s.fed..s.fed + n],
                    start_pos: s.fed,
                    blocks: s.table.blocks(),
                    want_logits,
                }
            })
            .collect();
        let result = if work.is_empty() {
            Ok(Vec::new())
        } else {
            self.model.step_sampled(&work, &picks)
        };
        drop(work);
        let outputs = match result {
            Ok(o) => o,
            Err(e) => {
                let mut idx: Vec<usize> = plan.iter().map(|p| p.0).collect();
                idx.sort_unstable_by_key(|&i| std::cmp::Reverse(i));
                for i in idx {
                    self.end(i, Event::Failed(e.to_string()));
                }
                return Err(e);
            }
        };
        // 5. Sampling and stopping, each sequence by its own continuation.
        for (&(i, n, _), out) in plan.iter().zip(outputs) {
            let s = &mut self.running[i];
            if paged {
                // The full blocks this step completed are written. With the prefix cache on,
                // a block of generated tokens is indexed now (every position in it was fed,
                // so its K/V is the model's, as a prompt block's is): a later prompt that
                // repeats the conversation so far adopts it.
                let bs = self.cfg.block_size;
                let end = if self.prefix_cache {
                    s.fed + n
                } else {
                    (s.fed + n).min(s.prompt_len)
                };
                let blocks = s.table.blocks();
                for b in s.fed / bs..end / bs {
                    if (b + 1) * bs > s.prompt_len {
                        self.prefix
                            .register(block_key(s.scope, blocks, &s.all, b, bs), blocks[b]);
                    }
                    self.prefix.written(blocks[b]);
                }
            }
            s.fed += n;
            let Some(out) = out else { continue };
            let tx = s.tx.clone();
            let advanced = match out {
                RowOutput::Logits(logits) => s.cont.advance(&logits, s.fed, &mut sender(&tx)),
                RowOutput::Token(id) => s.cont.advance_picked(id, s.fed, &mut sender(&tx)),
            };
            match advanced {
                Ok(Advance::Feed(next)) => {
                    s.all.push(next);
                    s.first_token.get_or_insert_with(Instant::now);
                }
                Ok(Advance::Done(reason)) => {
                    s.first_token.get_or_insert_with(Instant::now);
                    s.done = Some(reason);
                }
                Err(e) => {
                    // Only this request's constraint failed; the others go on.
                    s.done = Some(FinishReason::Cancelled);
                    s.failed = true;
                    let _ = tx.send(Event::Failed(e.to_string()));
                }
            }
        }
        let mut i = self.running.len();
        while i > 0 {
            i -= 1;
            if let Some(reason) = self.running[i].done {
                if reason == FinishReason::Cancelled && !self.running[i].failed {
                    // The client went away while its text was being sent.
                    report.cancelled += 1;
                }
                self.finish(i, reason);
                report.ended += 1;
            }
        }
        report.running = self.running.len();
        report.waiting = self.waiting.len();
        report.evicted = std::mem::take(&mut self.evicted);
        report.cached_blocks = self.alloc.cached();
        let dt = t0.elapsed();
        self.step_time = (self.step_time * 7 + dt) / 8;
        Ok(report)
    }
}

#[cfg(test)]
mod tests;
