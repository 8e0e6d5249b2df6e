//! Constrained decoding: a grammar (from a JSON schema, "any JSON object", or a tool-call
//! format) compiled into a byte-level automaton, and per-state masks of the tokens of the
//! model's vocabulary that keep the output inside the grammar.
//!
//! - [`GrammarBuilder`] / [`Grammar::json_schema`] / [`Grammar::json_object`]: compile once per
//!   request (the schema subset and limits are in [`schema`]).
//! - [`Matcher`]: one sequence's position in the grammar. Per decode step the engine asks
//!   [`TokenConstraint::allowed`] for a [`TokenMask`], the sampler picks among those tokens
//!   ([`crate::sampling::Sampler::sample_masked`]), and [`TokenConstraint::accept`] advances.
//!   This is the per-step hook a batched scheduler calls per sequence.
//! - Masks are computed by one walk over a byte trie of the vocabulary ([`VocabIndex`], built
//!   once per model) and cached per automaton state in the [`Grammar`] (states repeat: every
//!   position inside a string of the same property is one state), so a step usually costs a
//!   hash lookup; tokens that span JSON structure (`"}`, `,"`, `": "`) and multi-byte UTF-8
//!   are handled byte by byte.
//!
//! **Termination.** Every state knows the length in bytes of its shortest completion
//! ([`Matcher::dist`]). Given the tokens left (`max_tokens` and the context window), a token
//! is only allowed when the output can still be completed in the tokens that remain after it
//! (each byte has a single-byte token in byte-level BPE vocabularies, so a completion of d
//! bytes needs at most d tokens). So a constrained output is complete JSON whenever
//! `max_tokens` leaves room for the shortest valid output; when it does not, the output is
//! cut and `finish_reason` is `length`. Whitespace runs (at most [`machine::MAX_WS`] bytes)
//! and number lengths are bounded; free-form strings are not, but the budget closes them.
//! Once the grammar is complete and nothing may follow, generation stops at once.

pub mod machine;
pub mod schema;
#[cfg(test)]
pub(crate) mod tests;
pub mod vocab;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use machine::{Frame, Node, Nodes, State, kmp_fail};
pub use machine::{MAX_WS, NodeId};
pub use vocab::{TokenMask, VocabIndex};

use crate::error::InferenceError;

/// A schema the compiler cannot turn into a grammar, with where in the schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{path}: {message}")]
pub struct GrammarError {
    /// JSON-pointer-like location inside the schema (prefixed by the caller's field path).
    pub path: String,
    /// What is wrong and what to do instead.
    pub message: String,
}

/// Bytes of cached masks one grammar may hold before its cache is emptied.
pub const MAX_CACHE_BYTES: usize = 64 << 20;

/// A per-sequence constraint on the next token: the per-step hook of the decode loop.
pub trait TokenConstraint: Send {
    /// The tokens allowed next, when `remaining` tokens (this one included) may still be
    /// generated.
    fn allowed(&mut self, remaining: usize) -> &TokenMask;
    /// Advances past `token` (which must have been allowed).
    fn accept(&mut self, token: u32) -> Result<(), InferenceError>;
    /// Whether nothing but a stop token can follow (generation may end here).
    fn is_terminal(&self) -> bool;
    /// Whether the output is complete here (more may follow, e.g. another tool call).
    fn is_complete(&self) -> bool;
}

/// A borrowed constraint is a constraint (the engine lends its caller's one to a
/// [`crate::continuation::Continuation`]).
impl<T: TokenConstraint + ?Sized> TokenConstraint for &mut T {
    fn allowed(&mut self, remaining: usize) -> &TokenMask {
        (**self).allowed(remaining)
    }
    fn accept(&mut self, token: u32) -> Result<(), InferenceError> {
        (**self).accept(token)
    }
    fn is_terminal(&self) -> bool {
        (**self).is_terminal()
    }
    fn is_complete(&self) -> bool {
        (**self).is_complete()
    }
}

/// Builds a grammar out of schemas and literal pieces (tool-call formats).
#[derive(Debug)]
pub struct GrammarBuilder {
    nodes: Nodes,
}

impl Default for GrammarBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl GrammarBuilder {
    /// An empty builder.
    pub fn new() -> Self {
        GrammarBuilder {
            nodes: Nodes::new(),
        }
    }

    /// Compiles a JSON schema; errors name `path` + the place inside the schema.
    pub fn schema(
        &mut self,
        schema: &Value,
        strict: bool,
        path: &str,
    ) -> Result<NodeId, GrammarError> {
        schema::Compiler::new(&mut self.nodes, schema, strict).compile_root(path)
    }

    /// Any JSON object.
    pub fn any_object(&self) -> NodeId {
        self.nodes.any_object
    }

    /// Exactly these bytes.
    pub fn literal(&mut self, bytes: &[u8]) -> NodeId {
        self.nodes
            .push(Node::Lits(machine::LitTrie::new(&[(bytes.to_vec(), None)])))
    }

    /// One of several literal prefixes, each followed by its own node. The prefixes must not
    /// be prefixes of one another.
    pub fn switch(&mut self, branches: &[(Vec<u8>, NodeId)]) -> NodeId {
        let lits: Vec<(Vec<u8>, Option<u32>)> = branches
            .iter()
            .map(|(b, n)| (b.clone(), Some(*n)))
            .collect();
        self.nodes.push(Node::Lits(machine::LitTrie::new(&lits)))
    }

    /// The parts one after another.
    pub fn seq(&mut self, parts: Vec<NodeId>) -> NodeId {
        self.nodes.push(Node::Seq(parts))
    }

    /// `first`, then `more` repeatedly: `min..=max` repetitions in all.
    pub fn repeat(&mut self, first: NodeId, more: NodeId, min: u32, max: u32) -> NodeId {
        self.nodes.push(Node::Repeat {
            first,
            more,
            min,
            max,
        })
    }

    /// Free text; once `trigger` appears (at the very start, or `anywhere`), `then` follows.
    pub fn free_until(&mut self, trigger: &[u8], anywhere: bool, then: NodeId) -> NodeId {
        self.nodes.push(Node::Free {
            trigger: trigger.to_vec(),
            fail: kmp_fail(trigger),
            anywhere,
            then,
        })
    }

    /// Shortest complete text of a node, in bytes.
    pub fn min_len(&self, node: NodeId) -> u32 {
        self.nodes.min_len[node as usize]
    }

    /// The finished grammar over a model's vocabulary.
    pub fn build(self, root: NodeId, vocab: Arc<VocabIndex>) -> Grammar {
        Grammar {
            nodes: self.nodes,
            root,
            vocab,
            cache: Mutex::new(Cache::default()),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }
}

/// What is known about one automaton state.
#[derive(Debug)]
struct Entry {
    /// Tokens that keep the output in the grammar (stop tokens when it is complete).
    allowed: TokenMask,
    /// Shortest completion (bytes).
    d0: u32,
    /// Largest shortest-completion after any allowed token.
    max_after: u32,
    /// Allowed tokens after which the shortest completion is not `d0`.
    changed: Vec<(u32, u32)>,
}

impl Entry {
    fn bytes(&self) -> usize {
        self.allowed.len() / 8 + self.changed.len() * 8 + 64
    }
}

#[derive(Debug, Default)]
struct Cache {
    map: HashMap<State, Arc<Entry>>,
    bytes: usize,
}

/// A compiled grammar over one vocabulary, with its cache of per-state token masks. Shared
/// (behind an `Arc`) by the sequences of a request, and across requests with the same schema.
#[derive(Debug)]
pub struct Grammar {
    nodes: Nodes,
    root: NodeId,
    vocab: Arc<VocabIndex>,
    cache: Mutex<Cache>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl Grammar {
    /// The grammar of a JSON schema (`strict`: every object must say `additionalProperties:
    /// false`); `path` prefixes error locations (e.g. `response_format.json_schema.schema`).
    pub fn json_schema(
        schema: &Value,
        strict: bool,
        vocab: Arc<VocabIndex>,
        path: &str,
    ) -> Result<Grammar, GrammarError> {
        let mut b = GrammarBuilder::new();
        let root = b.schema(schema, strict, path)?;
        Ok(b.build(root, vocab))
    }

    /// Any JSON object (`response_format: {"type": "json_object"}`).
    pub fn json_object(vocab: Arc<VocabIndex>) -> Grammar {
        let b = GrammarBuilder::new();
        let root = b.any_object();
        b.build(root, vocab)
    }

    /// The vocabulary.
    pub fn vocab(&self) -> &Arc<VocabIndex> {
        &self.vocab
    }

    /// Bytes of the shortest output the grammar allows.
    pub fn min_output_bytes(&self) -> u32 {
        self.nodes.min_len[self.root as usize]
    }

    /// Cache hits and misses so far (for benchmarks and logs).
    pub fn cache_stats(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// Whether `text` is a complete output of this grammar (tests and checks).
    pub fn matches(&self, text: &[u8]) -> bool {
        let mut st = self.nodes.start(self.root);
        self.nodes.step_bytes(&mut st, text) && self.nodes.is_accepting(&st)
    }

    fn entry(&self, st: &State) -> Arc<Entry> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = cache.map.get(st) {
            self.hits.fetch_add(1, Ordering::Relaxed);
            return e.clone();
        }
        self.misses.fetch_add(1, Ordering::Relaxed);
        let e = Arc::new(self.compute(st));
        if cache.bytes + e.bytes() > MAX_CACHE_BYTES {
            cache.map.clear();
            cache.bytes = 0;
        }
        cache.bytes += e.bytes();
        cache.map.insert(st.clone(), e.clone());
        e
    }

    /// One walk over the vocabulary trie from `st`.
    fn compute(&self, st: &State) -> Entry {
        let v = &self.vocab;
        let accepting = self.nodes.is_accepting(st);
        let d0 = self.nodes.dist(st);
        let mut e = Entry {
            allowed: TokenMask::none(v.len()),
            d0,
            max_after: d0,
            changed: Vec::new(),
        };
        if accepting {
            for &s in v.stop_tokens() {
                e.allowed.insert(s);
                e.changed.push((s, 0));
            }
        }
        if matches!(st.frames.last(), Some(Frame::Free { .. })) {
            for &t in v.empty_tokens() {
                e.allowed.insert(t);
            }
        }
        let mut states = vec![st.clone()];
        self.walk(0, 0, &mut states, st, &mut e);
        // Stop tokens end the output: their "distance after" is 0, listed only when it differs.
        e.changed.retain(|&(_, d)| d != d0);
        e
    }

    fn walk(&self, node: u32, depth: usize, states: &mut Vec<State>, start: &State, e: &mut Entry) {
        let v = &self.vocab;
        let n = &v.nodes[node as usize];
        for ei in n.first_edge..n.first_edge + n.n_edges {
            let (b, child) = v.edges[ei as usize];
            if states.len() <= depth + 1 {
                states.push(start.clone());
            }
            let (lo, hi) = states.split_at_mut(depth + 1);
            let next = &mut hi[0];
            next.clone_from(&lo[depth]);
            if !self.nodes.step(next, b) {
                continue;
            }
            let c = &v.nodes[child as usize];
            if c.n_tokens > 0 {
                let d = if *next == *start {
                    e.d0
                } else {
                    self.nodes.dist(next)
                };
                e.max_after = e.max_after.max(d);
                for ti in c.first_token..c.first_token + c.n_tokens {
                    let t = v.token_ids[ti as usize];
                    e.allowed.insert(t);
                    if d != e.d0 {
                        e.changed.push((t, d));
                    }
                }
            }
            if c.n_edges > 0 {
                self.walk(child, depth + 1, states, start, e);
            }
        }
    }
}

/// One sequence's position in a [`Grammar`].
#[derive(Debug)]
pub struct Matcher {
    g: Arc<Grammar>,
    state: State,
    entry: Option<Arc<Entry>>,
    scratch: TokenMask,
    stopped: bool,
}

impl Matcher {
    /// At the start of the grammar.
    pub fn new(g: Arc<Grammar>) -> Self {
        let state = g.nodes.start(g.root);
        let scratch = TokenMask::none(g.vocab.len());
        Matcher {
            g,
            state,
            entry: None,
            scratch,
            stopped: false,
        }
    }

    fn entry(&mut self) -> Arc<Entry> {
        match &self.entry {
            Some(e) => e.clone(),
            None => {
                let e = self.g.entry(&self.state);
                self.entry = Some(e.clone());
                e
            }
        }
    }

    /// Bytes of the shortest completion from here.
    pub fn dist(&self) -> u32 {
        self.g.nodes.dist(&self.state)
    }

    /// Whether the output may end here.
    pub fn is_accepting(&self) -> bool {
        self.g.nodes.is_accepting(&self.state)
    }

    /// The tokens allowed next (see [`TokenConstraint::allowed`]).
    pub fn allowed_tokens(&mut self, remaining: usize) -> &TokenMask {
        let e = self.entry();
        let limit = u32::try_from(remaining.saturating_sub(1)).unwrap_or(u32::MAX);
        if e.max_after <= limit {
            drop(e);
            return match &self.entry {
                Some(en) => &en.allowed,
                None => &self.scratch,
            };
        }
        // Near the end of the budget: only tokens after which the output can still be
        // completed in the tokens that remain.
        self.scratch.clear();
        if e.d0 <= limit {
            self.scratch.copy_from(&e.allowed);
            for &(t, d) in &e.changed {
                if d > limit {
                    self.scratch.remove(t);
                }
            }
        } else {
            for &(t, d) in &e.changed {
                if d <= limit {
                    self.scratch.insert(t);
                }
            }
        }
        if self.scratch.count() == 0 {
            // The budget is too small for any completion: make the most progress possible.
            let best = e.changed.iter().map(|&(_, d)| d).min().unwrap_or(e.d0);
            if best < e.d0 {
                for &(t, d) in &e.changed {
                    if d == best {
                        self.scratch.insert(t);
                    }
                }
            } else {
                self.scratch.copy_from(&e.allowed);
            }
        }
        &self.scratch
    }

    /// Advances past `token`; an error when the grammar does not allow it.
    pub fn advance(&mut self, token: u32) -> Result<(), GrammarError> {
        let v = self.g.vocab.clone();
        let refuse = |why: &str| GrammarError {
            path: "token".into(),
            message: format!("token {token} is not allowed here: {why}"),
        };
        if self.stopped {
            return Err(refuse("the output already ended"));
        }
        if v.is_stop(token) {
            if !self.is_accepting() {
                return Err(refuse("the output is not complete"));
            }
            self.stopped = true;
            return Ok(());
        }
        let bytes = v.bytes(token);
        if bytes.is_empty() {
            return if matches!(self.state.frames.last(), Some(Frame::Free { .. })) {
                Ok(())
            } else {
                Err(refuse("a control token inside structured output"))
            };
        }
        let mut next = self.state.clone();
        if !self.g.nodes.step_bytes(&mut next, bytes) {
            return Err(refuse("its text does not fit the grammar"));
        }
        self.state = next;
        self.entry = None;
        Ok(())
    }
}

impl TokenConstraint for Matcher {
    fn allowed(&mut self, remaining: usize) -> &TokenMask {
        self.allowed_tokens(remaining)
    }

    fn accept(&mut self, token: u32) -> Result<(), InferenceError> {
        self.advance(token)
            .map_err(|e| InferenceError::InvalidArgument(format!("constrained decoding: {e}")))
    }

    fn is_terminal(&self) -> bool {
        self.stopped || self.g.nodes.is_terminal(&self.state)
    }

    fn is_complete(&self) -> bool {
        self.stopped || self.is_accepting()
    }
}
