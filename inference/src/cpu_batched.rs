//! [`CpuBatchedModel`]: the scheduler's [`BatchModel`] over the CPU backend with batched math.
//!
//! One scheduler step runs all of its tokens — the decode token of every decoding sequence and
//! the prompt chunks — as one batch through the layers ([`CpuBackend::forward_paged`]): every
//! weight matrix is read once per pass for all rows (decode on the CPU is bound by memory
//! bandwidth, so this is where batching pays), while rope, the KV write and attention use each
//! row's own position and its own sequence's KV blocks. The KV cache is a paged pool shaped like
//! the scheduler's block allocator (`block_size` x `kv_blocks`), so memory follows what the
//! running sequences use rather than `slots` x the context length. Logits are computed only for
//! the rows that want them.
//!
//! This is the CPU served path: [`Backend::into_batch_model`] of the CPU backend returns it.
//! It is a paged model ([`BatchModel::paged`]): sequences with one prompt prefix share its
//! written full blocks, and a sequence that adopted them starts after them. The K/V lives in
//! the pool by block id and [`BatchModel::release`] only resets the slot's fill count, so the
//! blocks the scheduler's prefix cache keeps after their writer ended (its slot reused since)
//! still hold that K/V when a later sequence adopts them.
//!
//! Batch independence: each row's arithmetic is the same as in the single-sequence
//! [`CpuBackend`] (per-row Q8 activations, rope, norms, attention over the same positions in
//! the same order, and per-row dot products: the quantized matmul's tiles of 8 and 4 rows give
//! each row the same accumulators and the same operation order as the one-token decode kernel,
//! see [`crate::packed`]), so a row's logits are bit-identical whatever else shares its pass
//! (how many rows, which sequences, where in the pass) and to
//! [`crate::scheduler::CpuBatchModel`]'s, the per-sequence reference. A greedy stream thus
//! generates the same tokens batched as alone. (Before the tiles matched the one-token kernel,
//! the rounding difference grew over SmolLM2-135M's 30 layers to ~13% relative and flipped a
//! greedy pick at a near-tie in 3 of 96 teacher-forced picks.)
//!
//! The tests below check this bit for bit: a row's logits in passes of 1 to 12 rows at every
//! place, mixed scheduler-like steps, and the scheduler's greedy generations (and every logits
//! vector) with streams joining and leaving, for Q8_0, Q4_0, Q4_1, Q4_K and float weights, and
//! four streams of the real SmolLM2 when it is present.

use crate::backend::Backend;
use crate::cpu::{CpuBackend, CpuPagedKv};
use crate::error::InferenceError;
use crate::scheduler::{BatchModel, SchedulerConfig, SeqWork};

/// Most rows one batched pass runs (a step with more rows runs several passes, in order).
pub const MAX_ROWS: usize = 512;

/// [`BatchModel`] over one [`CpuBackend`] (its weights) with batched passes and a paged KV pool.
#[derive(Debug)]
pub struct CpuBatchedModel {
    backend: CpuBackend,
    kv: CpuPagedKv,
    /// Positions written so far, per slot.
    filled: Vec<usize>,
}

impl CpuBatchedModel {
    /// `slots` sequences over `backend`, their KV in a pool of `cfg.kv_blocks` blocks of
    /// `cfg.block_size` positions: pass the same `cfg` to [`crate::scheduler::Scheduler::new`]
    /// (a step whose blocks do not fit the pool fails with an error). A pass runs up to
    /// `slots + cfg.prefill_chunk` rows (at most [`MAX_ROWS`]), so a full step is one pass.
    pub fn new(
        backend: CpuBackend,
        slots: usize,
        cfg: &SchedulerConfig,
    ) -> Result<Self, InferenceError> {
        let rows = slots.saturating_add(cfg.prefill_chunk);
        Self::with_max_rows(backend, slots, cfg, rows)
    }

    /// Like [`CpuBatchedModel::new`] with at most `max_rows` rows per pass (clamped to
    /// `1..=MAX_ROWS`).
    pub fn with_max_rows(
        backend: CpuBackend,
        slots: usize,
        cfg: &SchedulerConfig,
        max_rows: usize,
    ) -> Result<Self, InferenceError> {
        let slots = slots.max(1);
        let max_rows = max_rows.clamp(1, MAX_ROWS);
        let kv = backend.new_paged_kv(cfg.block_size, cfg.kv_blocks, max_rows, slots)?;
        Ok(CpuBatchedModel {
            backend,
            kv,
            filled: vec![0; slots],
        })
    }

    /// Bytes of the KV pool.
    pub fn kv_bytes(&self) -> usize {
        self.kv.bytes()
    }

    /// Most rows per pass.
    pub fn max_rows(&self) -> usize {
        self.kv.max_rows()
    }

    /// Checks `work` before anything runs, so a refused step changes nothing.
    fn check(&self, work: &[SeqWork<'_>]) -> Result<(), InferenceError> {
        let bad = |m: String| Err(InferenceError::InvalidArgument(m));
        let slots = self.filled.len();
        let bs = self.kv.block_size();
        let mut seen = vec![false; slots];
        for w in work {
            if w.slot >= slots {
                return bad(format!("KV slot {} of {slots} does not exist", w.slot));
            }
            if std::mem::replace(&mut seen[w.slot], true) {
                return bad(format!("KV slot {} appears twice in one step", w.slot));
            }
            if w.tokens.is_empty() {
                return bad(format!("slot {}: no tokens to run", w.slot));
            }
            let filled = self.filled[w.slot];
            if w.start_pos > filled {
                return bad(format!(
                    "slot {}: start position {} is past the {filled} cached positions; positions must be contiguous",
                    w.slot, w.start_pos
                ));
            }
            let end = w.start_pos + w.tokens.len();
            if end > self.backend.max_context() {
                return Err(InferenceError::ContextOverflow {
                    needed: end,
                    max: self.backend.max_context(),
                });
            }
            if w.blocks.len() * bs < end {
                return bad(format!(
                    "slot {}: {} KV blocks of {bs} positions do not cover {end} positions; build the scheduler with the model's block size",
                    w.slot,
                    w.blocks.len()
                ));
            }
            if let Some(b) = w.blocks.iter().find(|&&b| b as usize >= self.kv.blocks()) {
                return bad(format!(
                    "KV block {b} is outside the pool of {} blocks; build the scheduler with the model's kv_blocks",
                    self.kv.blocks()
                ));
            }
        }
        Ok(())
    }
}

impl BatchModel for CpuBatchedModel {
    fn name(&self) -> &str {
        "cpu-batched"
    }

    fn vocab(&self) -> usize {
        self.backend.config().vocab
    }

    fn max_context(&self) -> usize {
        self.backend.max_context()
    }

    fn slots(&self) -> usize {
        self.filled.len()
    }

    fn step(&mut self, work: &[SeqWork<'_>]) -> Result<Vec<Option<Vec<f32>>>, InferenceError> {
        self.check(work)?;
        // The step's rows, in work order: (item, token, position).
        let rows: Vec<(usize, u32, usize)> = work
            .iter()
            .enumerate()
            .flat_map(|(i, w)| {
                w.tokens
                    .iter()
                    .enumerate()
                    .map(move |(j, &t)| (i, t, w.start_pos + j))
            })
            .collect();
        let mut out: Vec<Option<Vec<f32>>> = vec![None; work.len()];
        let (mut tokens, mut pos, mut tables, mut logit_rows, mut logit_items) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for pass in rows.chunks(self.kv.max_rows()) {
            tokens.clear();
            pos.clear();
            tables.clear();
            logit_rows.clear();
            logit_items.clear();
            for (r, &(i, t, p)) in pass.iter().enumerate() {
                let w = &work[i];
                tokens.push(t);
                pos.push(p);
                tables.push(w.blocks);
                if w.want_logits && p + 1 == w.start_pos + w.tokens.len() {
                    logit_rows.push(r);
                    logit_items.push(i);
                }
            }
            self.backend
                .forward_paged(&mut self.kv, &tokens, &pos, &tables, &logit_rows)?;
            for (k, &i) in logit_items.iter().enumerate() {
                out[i] = Some(self.kv.logits(k).to_vec());
            }
        }
        for w in work {
            self.filled[w.slot] = w.start_pos + w.tokens.len();
        }
        Ok(out)
    }

    fn release(&mut self, slot: usize) {
        if let Some(f) = self.filled.get_mut(slot) {
            *f = 0;
        }
    }

    fn paged(&self) -> bool {
        // Every K/V read and write goes through the step's block tables.
        true
    }

    fn adopted(&mut self, slot: usize, positions: usize) {
        // The shared blocks hold positions 0..positions (written by another sequence with the
        // same prefix, running or ended: bit-identical K/V, since a row's values do not depend
        // on its pass).
        if let Some(f) = self.filled.get_mut(slot) {
            *f = positions;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::sync::Arc;

    use super::*;
    use crate::cpu::CpuOptions;
    use crate::engine::weights_and_tokenizer;
    use crate::gguf::{GgmlType, Gguf};
    use crate::model::LlamaConfig;
    use crate::sampling::SamplingParams;
    use crate::scheduler::{CpuBatchModel, Event, Request, Scheduler};

    fn backend(bytes: &[u8], threads: usize, batch: usize) -> CpuBackend {
        let g = Gguf::parse(bytes).unwrap();
        let (w, _) = weights_and_tokenizer(&g).unwrap();
        let opts = CpuOptions {
            threads,
            max_context: 64,
            batch,
        };
        CpuBackend::new(&w, &opts).unwrap()
    }

    fn cfg(block_size: usize, kv_blocks: usize, prefill_chunk: usize) -> SchedulerConfig {
        SchedulerConfig {
            block_size,
            kv_blocks,
            prefill_chunk,
            max_queued: 16,
        }
    }

    /// One sequence's script: its prompt is fed in these chunk sizes, then it decodes.
    struct Script {
        slot: usize,
        tokens: Vec<u32>,
        blocks: Vec<u32>,
        fed: usize,
    }

    /// Each value's bits (so `-0.0 != 0.0` and a NaN equals itself).
    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
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

    /// Runs the same mixed steps (prefill chunks beside decode tokens, sequences starting at
    /// different steps, a slot reused after a release) through the per-sequence reference and
    /// the batched model: every logits vector must be bit-identical, whatever the weight type
    /// (a row's arithmetic does not depend on the other rows of its pass).
    fn compare(ty: GgmlType, cfg_model: &LlamaConfig, threads: usize, max_rows: usize) {
        let bytes = crate::synthetic::synthetic_gguf(cfg_model, ty, 3).unwrap();
        let sc = cfg(4, 40, 64);
        let mut reference = CpuBatchModel::new(backend(&bytes, threads, 4), 3);
        let mut batched =
            CpuBatchedModel::with_max_rows(backend(&bytes, threads, 4), 3, &sc, max_rows).unwrap();
        let toks = |seed: u32, n: usize| -> Vec<u32> {
            (0..n as u32)
                .map(|i| (seed * 31 + i * 17) % 380 + 1)
                .collect()
        };
        // Blocks scattered over the pool, out of order.
        let mut seqs = [
            Script {
                slot: 0,
                tokens: toks(1, 30),
                blocks: vec![9, 2, 30, 4, 17, 8, 21, 1],
                fed: 0,
            },
            Script {
                slot: 1,
                tokens: toks(2, 30),
                blocks: vec![3, 39, 11, 0, 25, 6, 13, 7],
                fed: 0,
            },
            Script {
                slot: 2,
                tokens: toks(3, 30),
                blocks: vec![5, 12, 14, 15, 16, 18, 19, 20],
                fed: 0,
            },
        ];
        // Per step: (sequence, tokens this step) — chunks of 5, 1 (decode), 7, …
        let plan: &[&[(usize, usize)]] = &[
            &[(0, 5)],
            &[(0, 1), (1, 7)],
            &[(0, 1), (1, 1), (2, 3)],
            &[(2, 6), (0, 1), (1, 1)],
            &[(1, 9), (2, 1), (0, 1)],
            &[(0, 1), (1, 1), (2, 1)],
            &[(2, 1)],
            &[(0, 4), (1, 1), (2, 1)],
        ];
        let mut compared = 0;
        for (step, items) in plan.iter().enumerate() {
            if step == 5 {
                // Sequence 0 leaves; a new one takes its slot (and other blocks) from position 0.
                reference.release(0);
                batched.release(0);
                seqs[0] = Script {
                    slot: 0,
                    tokens: toks(4, 30),
                    blocks: vec![22, 23, 24, 26, 27, 28, 29, 31],
                    fed: 0,
                };
            }
            let work: Vec<SeqWork<'_>> = items
                .iter()
                .map(|&(s, n)| {
                    let q = &seqs[s];
                    SeqWork {
                        slot: q.slot,
                        tokens: &q.tokens[q.fed..q.fed + n],
                        start_pos: q.fed,
                        blocks: &q.blocks[..(q.fed + n).div_ceil(4)],
                        want_logits: n == 1 || s != 1,
                    }
                })
                .collect();
            let want = reference.step(&work).unwrap();
            let got = batched.step(&work).unwrap();
            assert_eq!(want.len(), got.len());
            for (k, (w, g)) in want.iter().zip(&got).enumerate() {
                assert_eq!(w.is_some(), g.is_some(), "step {step} item {k}");
                if let (Some(w), Some(g)) = (w, g) {
                    let what = format!("{ty} t{threads} rows{max_rows}: step {step} item {k}");
                    assert_eq!(bits(g), bits(w), "{what}");
                    compared += 1;
                }
            }
            for &(s, n) in items.iter() {
                seqs[s].fed += n;
            }
        }
        assert!(compared >= 15, "{compared}");
    }

    #[test]
    fn logits_equal_the_per_sequence_model() {
        let tiny = LlamaConfig::tiny();
        for ty in [GgmlType::F32, GgmlType::Q8_0, GgmlType::Q4_1] {
            compare(ty, &tiny, 1, 64);
        }
        compare(GgmlType::F32, &tiny, 2, 3);
        // Threads, and passes so small that a prompt chunk spans several of them.
        compare(GgmlType::Q4_0, &tiny, 2, 3);
        compare(GgmlType::Q8_0, &tiny, 3, 5);
        // Qwen-like: NEOX rope, biases, tied embeddings.
        let mut qwen = LlamaConfig::tiny();
        qwen.arch = "qwen2".into();
        qwen.rope_style = crate::model::RopeStyle::Neox;
        qwen.tied_embeddings = true;
        compare(GgmlType::Q8_0, &qwen, 2, 64);
        // A K-quant, and the unquantized types widened to f32.
        compare(GgmlType::Q4_K, &k_shape(), 2, 64);
        compare(GgmlType::F16, &tiny, 1, 64);
        compare(GgmlType::BF16, &tiny, 2, 5);
    }

    /// One sequence's logits, computed in passes of 1 to 12 rows with the sequence's rows at
    /// different places in the pass (so in different positions of the integer kernels' tiles of
    /// 8 and 4 rows, or alone): bit-identical every time, and to the per-sequence model's.
    /// Checked for a decode row and for a whole prompt (several rows of one sequence).
    #[test]
    fn a_rows_logits_do_not_depend_on_the_pass() {
        let tiny = LlamaConfig::tiny();
        for (ty, shape, threads) in [
            (GgmlType::Q8_0, &tiny, 1),
            (GgmlType::Q4_0, &tiny, 2),
            (GgmlType::Q4_1, &tiny, 1),
            (GgmlType::Q4_K, &k_shape(), 2),
            (GgmlType::F32, &tiny, 1),
        ] {
            pass_independence(ty, shape, threads);
        }
    }

    fn pass_independence(ty: GgmlType, shape: &LlamaConfig, threads: usize) {
        let bytes = crate::synthetic::synthetic_gguf(shape, ty, 7).unwrap();
        let prompt: Vec<u32> = vec![17, 250, 3, 99, 42, 311];
        let next = 77u32;
        // The per-sequence reference: the whole prompt in one step, then one decode token.
        let mut reference = CpuBatchModel::new(backend(&bytes, threads, 4), 1);
        fn w<'a>(
            slot: usize,
            tokens: &'a [u32],
            start_pos: usize,
            blocks: &'a [u32],
        ) -> SeqWork<'a> {
            SeqWork {
                slot,
                tokens,
                start_pos,
                blocks,
                want_logits: true,
            }
        }
        let blocks: Vec<Vec<u32>> = (0..12u32).map(|s| vec![2 * s, 2 * s + 1]).collect();
        let want_prompt = reference.step(&[w(0, &prompt, 0, &blocks[0])]).unwrap();
        let want_prompt = bits(want_prompt[0].as_ref().unwrap());
        let want_next = reference
            .step(&[w(0, std::slice::from_ref(&next), prompt.len(), &blocks[0])])
            .unwrap();
        let want_next = bits(want_next[0].as_ref().unwrap());
        assert_ne!(want_prompt, want_next);

        // Slot 0 is the sequence under test; slots 1..12 are other sequences, each with a
        // 5-token prompt, that fill the passes with one decode row each.
        let mut m =
            CpuBatchedModel::with_max_rows(backend(&bytes, threads, 4), 12, &cfg(4, 24, 64), 32)
                .unwrap();
        let fillers: Vec<Vec<u32>> = (1..12u32)
            .map(|s| (0..6).map(|i| (s * 37 + i * 11) % 380 + 1).collect())
            .collect();
        let filler_prefill: Vec<SeqWork<'_>> = (1..12)
            .map(|s| w(s, &fillers[s - 1][..5], 0, &blocks[s][..]))
            .collect();
        m.step(&filler_prefill).unwrap();
        let filler = |s: usize| w(s, &fillers[s - 1][5..], 5, &blocks[s][..]);
        let mut checked = 0;
        // The prompt after `before` other rows and before `after` more (each pass rewrites
        // the same KV positions with the same values, so the passes can be repeated).
        for (before, after) in [(0, 0), (1, 0), (2, 3), (3, 5), (5, 1), (7, 4)] {
            let mut work: Vec<SeqWork<'_>> = (1..=before).map(filler).collect();
            work.push(w(0, &prompt, 0, &blocks[0]));
            work.extend((before + 1..=before + after).map(filler));
            let out = m.step(&work).unwrap();
            let got = bits(out[before].as_ref().unwrap());
            assert_eq!(
                got,
                want_prompt,
                "{ty} t{threads}: prompt rows {before}..{} of {}",
                before + prompt.len(),
                before + prompt.len() + after
            );
            checked += 1;
        }
        // The decode row alone and at every place of passes of 2, 3, 5, 8 and 12 rows.
        for rows in [1usize, 2, 3, 5, 8, 12] {
            for at in 0..rows {
                let mut work: Vec<SeqWork<'_>> = (1..=at).map(filler).collect();
                work.push(w(0, std::slice::from_ref(&next), prompt.len(), &blocks[0]));
                work.extend((at + 1..rows).map(filler));
                let out = m.step(&work).unwrap();
                let got = bits(out[at].as_ref().unwrap());
                assert_eq!(
                    got, want_next,
                    "{ty} t{threads}: decode row {at} of a pass of {rows}"
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 6 + 1 + 2 + 3 + 5 + 8 + 12);
    }

    #[test]
    fn refuses_bad_work_and_changes_nothing() {
        let bytes =
            crate::synthetic::synthetic_gguf(&LlamaConfig::tiny(), GgmlType::Q8_0, 3).unwrap();
        let mut m = CpuBatchedModel::new(backend(&bytes, 1, 4), 2, &cfg(4, 4, 8)).unwrap();
        let w = |slot, tokens: &'static [u32], start_pos, blocks: &'static [u32]| SeqWork {
            slot,
            tokens,
            start_pos,
            blocks,
            want_logits: true,
        };
        let err =
            |m: &mut CpuBatchedModel, work: &[SeqWork<'_>]| m.step(work).unwrap_err().to_string();
        assert!(err(&mut m, &[w(2, &[1], 0, &[0])]).contains("does not exist"));
        assert!(err(&mut m, &[w(0, &[1], 0, &[0]), w(0, &[2], 1, &[0])]).contains("twice"));
        assert!(err(&mut m, &[w(0, &[1], 1, &[0])]).contains("contiguous"));
        assert!(err(&mut m, &[w(0, &[1, 2, 3, 4, 5], 0, &[0])]).contains("block size"));
        assert!(err(&mut m, &[w(0, &[1], 0, &[4])]).contains("kv_blocks"));
        assert!(err(&mut m, &[w(0, &[100_000], 0, &[0])]).contains("vocabulary"));
        // A good step after the refusals: nothing was recorded by them.
        let out = m
            .step(&[w(0, &[1, 2], 0, &[0]), w(1, &[3], 0, &[1])])
            .unwrap();
        assert_eq!(out.iter().filter(|o| o.is_some()).count(), 2);
        assert!(err(&mut m, &[w(0, &[1], 3, &[0])]).contains("contiguous"));
        m.release(0);
        assert!(
            m.step(&[w(0, &[1], 0, &[2])]).is_ok(),
            "a released slot starts over"
        );
    }

    /// Per step, per item: the bits of the logits a model returned.
    type StepLog = Arc<std::sync::Mutex<Vec<Vec<Option<Vec<u32>>>>>>;

    /// A model that records the bits of every logits vector it returns, step by step.
    struct Recorder<M> {
        inner: M,
        log: StepLog,
    }

    impl<M: BatchModel> BatchModel for Recorder<M> {
        fn name(&self) -> &str {
            self.inner.name()
        }
        fn vocab(&self) -> usize {
            self.inner.vocab()
        }
        fn max_context(&self) -> usize {
            self.inner.max_context()
        }
        fn slots(&self) -> usize {
            self.inner.slots()
        }
        fn step(&mut self, work: &[SeqWork<'_>]) -> Result<Vec<Option<Vec<f32>>>, InferenceError> {
            let out = self.inner.step(work)?;
            let step = out.iter().map(|l| l.as_deref().map(bits)).collect();
            self.log.lock().unwrap().push(step);
            Ok(out)
        }
        fn release(&mut self, slot: usize) {
            self.inner.release(slot)
        }
    }

    /// Greedy generations of several requests joining and leaving a running batch (prompt
    /// chunks beside decode rows, passes of changing sizes) equal the per-sequence model's and
    /// a fresh single-sequence engine's per prompt, token for token; and every logits vector of
    /// every step is bit-identical to the per-sequence model's (greedy picks alone would hide a
    /// rounding difference that does not flip a pick on a small model).
    #[test]
    fn scheduler_greedy_equals_the_per_sequence_model() {
        for (ty, shape) in [
            (GgmlType::Q4_1, LlamaConfig::tiny()),
            (GgmlType::Q8_0, LlamaConfig::tiny()),
            (GgmlType::Q4_K, k_shape()),
        ] {
            scheduler_greedy(ty, &shape);
        }
    }

    fn scheduler_greedy(ty: GgmlType, shape: &LlamaConfig) {
        let bytes = crate::synthetic::synthetic_gguf(shape, ty, 5).unwrap();
        let g = Gguf::parse(&bytes).unwrap();
        let (_, tok) = weights_and_tokenizer(&g).unwrap();
        let tok = Arc::new(tok);
        let sc = cfg(4, 64, 6);
        let prompts: Vec<(Vec<u32>, usize)> = [
            ("hello there", 12),
            ("the cat is on the mat and it is happy", 5),
            ("a", 9),
            ("one two three four five six seven eight nine ten", 14),
            ("xyz", 3),
            ("good morning to you all", 7),
        ]
        .iter()
        .map(|(t, n)| (tok.encode(t, false, true), *n))
        .collect();
        fn run<M: BatchModel>(
            s: &mut Scheduler<M>,
            prompts: &[(Vec<u32>, usize)],
        ) -> Vec<Vec<u32>> {
            let mut handles = Vec::new();
            let mut steps = 0;
            let mut max_running = 0;
            while handles.len() < prompts.len() || !s.is_idle() {
                if handles.len() < 2 || (steps % 2 == 0 && handles.len() < prompts.len()) {
                    let (p, n) = &prompts[handles.len()];
                    let params = SamplingParams {
                        max_tokens: *n,
                        ..Default::default()
                    };
                    let req = Request {
                        prompt: p.clone(),
                        params,
                    };
                    handles.push(s.submit(req).unwrap());
                    if handles.len() <= 2 {
                        continue;
                    }
                }
                let r = s.step().unwrap();
                max_running = max_running.max(r.running + r.ended);
                steps += 1;
                assert!(steps < 1000);
            }
            assert_eq!(max_running, 3, "the batch was full at some step");
            handles
                .iter_mut()
                .map(|h| {
                    let mut toks = Vec::new();
                    while let Some(e) = h.try_recv() {
                        match e {
                            Event::Piece { tokens, .. } => {
                                toks.extend(tokens.iter().map(|t| t.id));
                            }
                            Event::Finished(c) => {
                                // The final stop token, if any, comes only in the completion.
                                assert!(c.tokens.starts_with(&toks));
                                toks = c.tokens;
                            }
                            Event::Failed(m) => panic!("request failed: {m}"),
                        }
                    }
                    toks
                })
                .collect()
        }
        let (want_log, got_log) = (StepLog::default(), StepLog::default());
        let per_seq = Recorder {
            inner: CpuBatchModel::new(backend(&bytes, 2, 4), 3),
            log: Arc::clone(&want_log),
        };
        let mut per_seq = Scheduler::new(per_seq, tok.clone(), sc.clone());
        let want = run(&mut per_seq, &prompts);
        let batched = Recorder {
            inner: CpuBatchedModel::new(backend(&bytes, 2, 4), 3, &sc).unwrap(),
            log: Arc::clone(&got_log),
        };
        let mut batched = Scheduler::new(batched, tok, sc);
        let got = run(&mut batched, &prompts);
        // A fresh single-sequence engine per prompt (whole-prompt prefill, then decode).
        let engine: Vec<Vec<u32>> = prompts
            .iter()
            .map(|(p, n)| {
                let opts = CpuOptions {
                    threads: 1,
                    max_context: 64,
                    batch: 16,
                };
                let mut e = crate::engine::load_cpu_from_bytes(&bytes, &opts).unwrap();
                let params = SamplingParams {
                    max_tokens: *n,
                    ..Default::default()
                };
                e.generate(p, &params, &mut |_| true).unwrap().tokens
            })
            .collect();
        for (i, ((w, g), (_, n))) in want.iter().zip(&got).zip(&prompts).enumerate() {
            assert_eq!(g, w, "{ty} request {i}: batched vs per-sequence");
            assert_eq!(g, &engine[i], "{ty} request {i}: batched vs engine");
            assert!(!g.is_empty() && g.len() <= *n);
        }
        let (want_log, got_log) = (want_log.lock().unwrap(), got_log.lock().unwrap());
        assert_eq!(want_log.len(), got_log.len(), "{ty}: steps");
        let mut compared = 0;
        for (step, (w, g)) in want_log.iter().zip(got_log.iter()).enumerate() {
            assert_eq!(w.len(), g.len(), "{ty} step {step}");
            for (k, (w, g)) in w.iter().zip(g).enumerate() {
                assert!(w == g, "{ty} step {step} item {k}: logits differ");
                compared += usize::from(w.is_some());
            }
        }
        assert!(compared > 40, "{ty}: {compared} logits vectors compared");
        assert_eq!(batched.free_blocks(), batched.total_blocks());
    }

    /// Sequences with one prompt prefix (n choices, a shared system prompt) share its written
    /// KV blocks on this paged model: the prefix is computed once, and every sequence still
    /// generates exactly what the per-sequence model (which never shares) generates.
    #[test]
    fn shared_prefix_blocks_change_no_output() {
        let bytes =
            crate::synthetic::synthetic_gguf(&LlamaConfig::tiny(), GgmlType::Q4_1, 9).unwrap();
        let g = Gguf::parse(&bytes).unwrap();
        let (_, tok) = weights_and_tokenizer(&g).unwrap();
        let tok = Arc::new(tok);
        let sc = cfg(4, 48, 64);
        let p: Vec<u32> = (20..33).collect();
        let mut q = p.clone();
        q[6] = 99;
        let prompts = [p.clone(), p.clone(), p, q, vec![7, 8, 9]];
        fn run<M: BatchModel>(
            s: &mut Scheduler<M>,
            prompts: &[Vec<u32>],
        ) -> (Vec<Vec<u32>>, usize) {
            let mut handles: Vec<_> = prompts
                .iter()
                .map(|p| {
                    let params = SamplingParams {
                        max_tokens: 8,
                        ..Default::default()
                    };
                    s.submit(Request {
                        prompt: p.clone(),
                        params,
                    })
                    .unwrap()
                })
                .collect();
            let mut shared = 0;
            while !s.is_idle() {
                shared += s.step().unwrap().shared;
            }
            let out = handles
                .iter_mut()
                .map(|h| {
                    let mut toks = None;
                    while let Some(e) = h.try_recv() {
                        match e {
                            Event::Finished(c) => toks = Some(c.tokens),
                            Event::Failed(m) => panic!("request failed: {m}"),
                            Event::Piece { .. } => {}
                        }
                    }
                    toks.unwrap()
                })
                .collect();
            (out, shared)
        }
        let per_seq = CpuBatchModel::new(backend(&bytes, 2, 4), 5);
        let (want, none) = run(
            &mut Scheduler::new(per_seq, tok.clone(), sc.clone()),
            &prompts,
        );
        assert_eq!(none, 0, "the per-sequence model is not paged");
        let batched = CpuBatchedModel::new(backend(&bytes, 2, 4), 5, &sc).unwrap();
        let mut s = Scheduler::new(batched, tok, sc);
        let (got, shared) = run(&mut s, &prompts);
        assert_eq!(got, want);
        assert!(shared >= 2 * 12, "prefix positions shared: {shared}");
        assert_eq!(s.free_blocks(), s.total_blocks());
    }

    fn real_model() -> Option<(crate::model::ModelFile, CpuOptions)> {
        let path = crate::test_support::real_model_path()?;
        let opts = CpuOptions {
            threads: 2,
            max_context: 128,
            batch: 32,
        };
        Some((crate::model::ModelFile::open(&path).unwrap(), opts))
    }

    /// Teacher-forced steps of `prompts` (one stream per slot, prompts prefilled in one step,
    /// then decoded together, each fed the per-sequence model's greedy token): per step and
    /// stream, whether the batched logits are bit-identical to the per-sequence model's, and
    /// whether the greedy pick differs.
    fn teacher_forced(prompts: &[&str], steps: usize) -> Option<Vec<(bool, bool)>> {
        let (file, opts) = real_model()?;
        let g = Gguf::parse(file.bytes()).unwrap();
        let (w, tok) = weights_and_tokenizer(&g).unwrap();
        let n = prompts.len();
        let sc = cfg(16, 8 * n, 64);
        let mut reference = CpuBatchModel::new(CpuBackend::new(&w, &opts).unwrap(), n);
        let mut batched =
            CpuBatchedModel::new(CpuBackend::new(&w, &opts).unwrap(), n, &sc).unwrap();
        let mut seqs: Vec<Vec<u32>> = prompts.iter().map(|t| tok.encode(t, false, true)).collect();
        let blocks: Vec<Vec<u32>> = (0..n as u32)
            .map(|s| (8 * s..8 * s + 8).collect())
            .collect();
        let mut fed = vec![0usize; n];
        let mut out = Vec::new();
        for _ in 0..steps {
            let work: Vec<SeqWork<'_>> = (0..n)
                .map(|s| SeqWork {
                    slot: s,
                    tokens: &seqs[s][fed[s]..],
                    start_pos: fed[s],
                    blocks: &blocks[s],
                    want_logits: true,
                })
                .collect();
            let want = reference.step(&work).unwrap();
            let got = batched.step(&work).unwrap();
            for s in 0..n {
                let (w, g) = (want[s].as_ref().unwrap(), got[s].as_ref().unwrap());
                let (tw, tg) = (crate::sampling::argmax(w), crate::sampling::argmax(g));
                out.push((bits(g) == bits(w), tw != tg));
                fed[s] = seqs[s].len();
                seqs[s].push(tw);
            }
        }
        Some(out)
    }

    /// On the real SmolLM2, one stream alone: the paged KV, positions and attention give
    /// bit-identical logits.
    #[test]
    fn real_model_single_stream_is_bit_identical() {
        let Some(r) = teacher_forced(&["The capital of France is"], 20) else {
            return;
        };
        assert_eq!(r.len(), 20);
        for (step, &(same, _)) in r.iter().enumerate() {
            assert!(same, "step {step}");
        }
    }

    /// On the real SmolLM2 (30 layers, Q4_1 weights, Q8 activations, where any rounding
    /// difference grows over the layers and flips greedy picks at near-ties), four streams
    /// batched together, prompts of different lengths prefilled in one pass and then decoded
    /// four rows a pass: every logits vector bit-identical to the per-sequence model's.
    #[test]
    fn real_model_streams_are_bit_identical() {
        let prompts = [
            "The capital of France is",
            "Once upon a time, in a small village,",
            "def fibonacci(n):",
            "The three primary colors are",
        ];
        let Some(r) = teacher_forced(&prompts, 24) else {
            return;
        };
        assert_eq!(r.len(), 96);
        for (i, &(same, flipped)) in r.iter().enumerate() {
            assert!(
                same && !flipped,
                "step {} stream {}: logits differ (greedy pick flipped: {flipped})",
                i / 4,
                i % 4
            );
        }
    }
}
