#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;
use crate::cpu::{CpuBackend, CpuOptions};
use crate::engine::{Engine, load_cpu_from_bytes, weights_and_tokenizer};
use crate::gguf::{GgmlType, Gguf};
use crate::model::LlamaConfig;
use std::collections::{BTreeSet, HashMap};

const CTX: usize = 96;

fn model_bytes() -> Vec<u8> {
    crate::synthetic::synthetic_gguf(&LlamaConfig::tiny(), GgmlType::Q8_0, 5).unwrap()
}

fn opts() -> CpuOptions {
    CpuOptions {
        threads: 1,
        max_context: CTX,
        batch: 8,
    }
}

/// The single-sequence reference: today's engine on the same model.
fn reference() -> Engine {
    load_cpu_from_bytes(&model_bytes(), &opts()).unwrap()
}

fn scheduler(slots: usize, cfg: SchedulerConfig) -> Scheduler<CpuBatchModel> {
    let bytes = model_bytes();
    let g = Gguf::parse(&bytes).unwrap();
    let (w, tok) = weights_and_tokenizer(&g).unwrap();
    let backend = CpuBackend::new(&w, &opts()).unwrap();
    Scheduler::new(CpuBatchModel::new(backend, slots), Arc::new(tok), cfg)
}

fn cfg(block_size: usize, kv_blocks: usize, prefill_chunk: usize) -> SchedulerConfig {
    SchedulerConfig {
        block_size,
        kv_blocks,
        prefill_chunk,
        max_queued: 16,
    }
}

fn greedy(max_tokens: usize) -> SamplingParams {
    SamplingParams {
        max_tokens,
        ..Default::default()
    }
}

/// Collects a handle's events: (tokens streamed in pieces, the generation if it ended).
fn drain(h: &mut RequestHandle, tokens: &mut Vec<u32>) -> Option<Generation> {
    drain_text(h, tokens, &mut String::new())
}

/// [`drain`], also collecting the streamed text.
fn drain_text(
    h: &mut RequestHandle,
    tokens: &mut Vec<u32>,
    text: &mut String,
) -> Option<Generation> {
    while let Some(e) = h.try_recv() {
        match e {
            Event::Piece {
                text: t,
                tokens: ts,
            } => {
                text.push_str(&t);
                tokens.extend(ts.iter().map(|t| t.id));
            }
            Event::Finished(c) => return Some(c),
            Event::Failed(m) => panic!("request failed: {m}"),
        }
    }
    None
}

/// The engine's generation and the token ids its pieces reported.
fn engine_run(e: &mut Engine, p: &[u32], params: &SamplingParams) -> (Generation, Vec<u32>) {
    let mut ids = Vec::new();
    let g = e
        .generate_pieces(p, params, &mut |piece| {
            ids.extend(piece.tokens.iter().map(|t| t.id));
            true
        })
        .unwrap();
    (g, ids)
}

fn prompt(e: &Engine, text: &str) -> Vec<u32> {
    e.tokenizer().encode(text, false, true)
}

fn run_to_idle<M: BatchModel>(s: &mut Scheduler<M>) {
    for _ in 0..10_000 {
        if s.is_idle() {
            return;
        }
        s.step().unwrap();
    }
    panic!("scheduler did not drain");
}

#[test]
fn batched_greedy_equals_unbatched_with_sequences_joining_and_leaving() {
    let mut e = reference();
    let texts = [
        ("hello there", 12),
        ("the cat is on the mat and it is happy", 5),
        ("a", 9),
        ("one two three four five six seven eight nine ten", 14),
        ("xyz", 3),
        ("good morning to you all", 7),
    ];
    let reqs: Vec<(Vec<u32>, SamplingParams)> = texts
        .iter()
        .map(|(t, n)| (prompt(&e, t), greedy(*n)))
        .collect();
    let want: Vec<_> = reqs
        .iter()
        .map(|(p, params)| engine_run(&mut e, p, params))
        .collect();
    // 3 slots for 6 requests, chunked prefill of 4 tokens: requests join as others leave.
    let mut s = scheduler(3, cfg(4, 64, 4));
    let mut handles = Vec::new();
    let mut got: Vec<(Vec<u32>, String, Option<Generation>)> =
        vec![(Vec::new(), String::new(), None); reqs.len()];
    let mut steps = 0;
    let mut max_running = 0;
    while handles.len() < reqs.len() || !s.is_idle() {
        // Two requests at first, then one more every third step.
        if handles.len() < 2 || (steps % 3 == 0 && handles.len() < reqs.len()) {
            let (p, params) = &reqs[handles.len()];
            handles.push(
                s.submit(Request {
                    prompt: p.clone(),
                    params: params.clone(),
                })
                .unwrap(),
            );
            continue;
        }
        let r = s.step().unwrap();
        max_running = max_running.max(r.running + r.ended);
        steps += 1;
        for (h, (toks, text, done)) in handles.iter_mut().zip(got.iter_mut()) {
            if let Some(c) = drain_text(h, toks, text) {
                *done = Some(c);
            }
        }
        assert!(steps < 1000);
    }
    assert_eq!(max_running, 3, "the batch was full at some step");
    for (i, ((toks, text, done), (w, w_ids))) in got.iter().zip(&want).enumerate() {
        let c = done.as_ref().unwrap();
        assert_eq!(c.tokens, w.tokens, "request {i}");
        assert_eq!(toks, w_ids, "streamed tokens of request {i}");
        assert_eq!(c.text, w.text, "request {i}");
        assert_eq!(text, &w.text, "streamed text of request {i}");
        assert_eq!(c.finish_reason, w.finish_reason, "request {i}");
        assert_eq!(c.prompt_tokens, reqs[i].0.len());
    }
    assert_eq!(s.free_blocks(), s.total_blocks());
}

#[test]
fn seeded_sampling_is_reproducible_whatever_the_batch() {
    let mut e = reference();
    let p = prompt(&e, "the cat is");
    let params = SamplingParams {
        temperature: 0.9,
        top_p: 0.9,
        seed: 7,
        max_tokens: 12,
        ..Default::default()
    };
    let want = e.generate(&p, &params, &mut |_| true).unwrap();
    let alone = {
        let mut s = scheduler(4, cfg(4, 64, 8));
        let mut h = s
            .submit(Request {
                prompt: p.clone(),
                params: params.clone(),
            })
            .unwrap();
        run_to_idle(&mut s);
        drain(&mut h, &mut Vec::new()).unwrap()
    };
    let crowded = {
        let mut s = scheduler(4, cfg(4, 64, 8));
        let mut others = Vec::new();
        for (i, t) in ["hello", "one two three four", "zzz"].iter().enumerate() {
            others.push(
                s.submit(Request {
                    prompt: prompt(&e, t),
                    params: SamplingParams {
                        temperature: 1.0,
                        seed: 100 + i as u64,
                        max_tokens: 6 + 3 * i,
                        ..Default::default()
                    },
                })
                .unwrap(),
            );
        }
        s.step().unwrap();
        let mut h = s
            .submit(Request {
                prompt: p.clone(),
                params: params.clone(),
            })
            .unwrap();
        run_to_idle(&mut s);
        drain(&mut h, &mut Vec::new()).unwrap()
    };
    assert_eq!(alone.tokens, want.tokens);
    assert_eq!(crowded.tokens, want.tokens);
    let other_seed = {
        let mut s = scheduler(1, cfg(4, 64, 8));
        let mut h = s
            .submit(Request {
                prompt: p.clone(),
                params: SamplingParams {
                    seed: 8,
                    ..params.clone()
                },
            })
            .unwrap();
        run_to_idle(&mut s);
        drain(&mut h, &mut Vec::new()).unwrap()
    };
    assert_ne!(other_seed.tokens, want.tokens, "the seed matters");
}

#[test]
fn stop_strings_are_honoured_inside_the_batch() {
    let mut e = reference();
    let p = prompt(&e, "abc");
    let full = e.generate(&p, &greedy(20), &mut |_| true).unwrap();
    let chars: Vec<char> = full.text.chars().collect();
    assert!(chars.len() >= 6, "{:?}", full.text);
    let stop: String = chars[3..5].iter().collect();
    let params = SamplingParams {
        stop: vec![stop],
        ..greedy(20)
    };
    let want = e.generate(&p, &params, &mut |_| true).unwrap();
    assert_eq!(want.finish_reason, FinishReason::Stop);
    let mut s = scheduler(2, cfg(4, 64, 8));
    let mut other = s
        .submit(Request {
            prompt: prompt(&e, "hello there"),
            params: greedy(20),
        })
        .unwrap();
    let mut h = s.submit(Request { prompt: p, params }).unwrap();
    run_to_idle(&mut s);
    let c = drain(&mut h, &mut Vec::new()).unwrap();
    assert_eq!(c.text, want.text);
    assert_eq!(c.tokens, want.tokens);
    assert_eq!(c.finish_reason, FinishReason::Stop);
    assert!(drain(&mut other, &mut Vec::new()).is_some());
}

#[test]
fn budget_exhaustion_gives_typed_errors_and_loses_no_stream() {
    let mut e = reference();
    // 8 blocks of 4 positions = 32 positions in all.
    let mut s = scheduler(
        4,
        SchedulerConfig {
            max_queued: 2,
            ..cfg(4, 8, 8)
        },
    );
    let a = prompt(&e, "hello there");
    // Never fits: prompt + max_tokens beyond the whole pool.
    let err = s
        .submit(Request {
            prompt: a.clone(),
            params: greedy(40),
        })
        .unwrap_err();
    assert!(
        matches!(err, SubmitError::TooLarge { limit: 32, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("lower max_tokens"));
    // A prompt longer than the context window.
    let err = s
        .submit(Request {
            prompt: vec![5; CTX + 1],
            params: greedy(1),
        })
        .unwrap_err();
    assert!(matches!(err, SubmitError::TooLarge { .. }), "{err:?}");
    assert!(matches!(
        s.submit(Request {
            prompt: Vec::new(),
            params: greedy(1),
        }),
        Err(SubmitError::Invalid(_))
    ));
    // Each of these reserves 16 positions (4 blocks): two fill the pool.
    let params = greedy(16 - a.len());
    let (want, want_ids) = engine_run(&mut e, &a, &params);
    let mut h1 = s
        .submit(Request {
            prompt: a.clone(),
            params: params.clone(),
        })
        .unwrap();
    let mut h2 = s
        .submit(Request {
            prompt: a.clone(),
            params: params.clone(),
        })
        .unwrap();
    s.step().unwrap();
    assert_eq!(s.running(), 2);
    // The pool is promised: the next ones wait (slots are free, blocks are not) …
    let mut h3 = s
        .submit(Request {
            prompt: a.clone(),
            params: params.clone(),
        })
        .unwrap();
    let mut h4 = s
        .submit(Request {
            prompt: a.clone(),
            params: params.clone(),
        })
        .unwrap();
    s.step().unwrap();
    assert_eq!((s.running(), s.waiting()), (2, 2));
    // … and with the queue at its bound, one more is refused with a retry-after hint.
    match s.submit(Request {
        prompt: a.clone(),
        params: params.clone(),
    }) {
        Err(SubmitError::Busy {
            queued,
            retry_after,
        }) => {
            assert_eq!(queued, 2);
            assert!(retry_after >= Duration::from_secs(1));
        }
        other => panic!("expected Busy, got {other:?}"),
    }
    run_to_idle(&mut s);
    for h in [&mut h1, &mut h2, &mut h3, &mut h4] {
        let mut toks = Vec::new();
        let c = drain(h, &mut toks).unwrap();
        assert_eq!(c.tokens, want.tokens);
        assert_eq!(toks, want_ids);
    }
    assert_eq!(s.free_blocks(), s.total_blocks());
}

#[test]
fn cancellation_frees_the_blocks_at_the_next_step() {
    let e = reference();
    let mut s = scheduler(3, cfg(4, 40, 64));
    let mut keep = s
        .submit(Request {
            prompt: prompt(&e, "hello there"),
            params: greedy(30),
        })
        .unwrap();
    let gone = s
        .submit(Request {
            prompt: prompt(&e, "the cat is on the mat and it is happy"),
            params: greedy(30),
        })
        .unwrap();
    for _ in 0..3 {
        s.step().unwrap();
    }
    let both = s.total_blocks() - s.free_blocks();
    drop(gone); // the client disconnected
    assert_eq!(
        s.total_blocks() - s.free_blocks(),
        both,
        "freed at the next step"
    );
    let r = s.step().unwrap();
    assert_eq!(r.ended, 1);
    assert_eq!(s.running(), 1);
    assert!(s.total_blocks() - s.free_blocks() < both);
    // A waiting request can be cancelled too: fill the pool, queue one, drop it.
    let filler = s
        .submit(Request {
            prompt: prompt(&e, "abc"),
            params: greedy(CTX),
        })
        .unwrap();
    s.step().unwrap();
    let queued = s
        .submit(Request {
            prompt: prompt(&e, "abc"),
            params: greedy(CTX),
        })
        .unwrap();
    s.step().unwrap();
    assert_eq!(s.waiting(), 1, "the pool is promised to the running two");
    drop(queued);
    s.step().unwrap();
    assert_eq!(s.waiting(), 0);
    drop(filler);
    run_to_idle(&mut s);
    assert!(drain(&mut keep, &mut Vec::new()).is_some());
    assert_eq!(s.free_blocks(), s.total_blocks());
}

#[test]
fn chunked_prefill_does_not_stall_a_decoding_stream() {
    let e = reference();
    let mut s = scheduler(2, cfg(4, 64, 4));
    let mut a = s
        .submit(Request {
            prompt: prompt(&e, "hi"),
            params: greedy(30),
        })
        .unwrap();
    // Until `a` decodes.
    while s.step().unwrap().decoded == 0 {}
    // A long prompt joins: 40 tokens at 4 per step.
    let long: Vec<u32> = (0..40).map(|i| 10 + i).collect();
    let mut b = s
        .submit(Request {
            prompt: long,
            params: greedy(3),
        })
        .unwrap();
    let mut prefill_steps = 0;
    loop {
        let r = s.step().unwrap();
        if r.prefilled == 0 {
            assert_eq!(r.decoded, 2, "both streams decode once b's prompt is in");
            break;
        }
        assert!(r.prefilled <= 4, "the prefill budget holds");
        assert_eq!(r.decoded, 1, "the decoding stream runs every step");
        prefill_steps += 1;
    }
    assert_eq!(prefill_steps, 10, "40 prompt tokens in chunks of 4");
    run_to_idle(&mut s);
    assert!(drain(&mut a, &mut Vec::new()).is_some());
    assert!(drain(&mut b, &mut Vec::new()).is_some());
}

#[test]
fn the_context_window_ends_a_generation_as_the_engine_does() {
    let mut e = reference();
    let p: Vec<u32> = (0..CTX as u32 - 4).map(|i| 20 + i % 300).collect();
    let want = e.generate(&p, &greedy(50), &mut |_| true).unwrap();
    assert_eq!(want.finish_reason, FinishReason::Length);
    assert!(
        want.tokens.len() < 50,
        "the window, not max_tokens, ended it"
    );
    let mut s = scheduler(2, cfg(8, 32, 16));
    let mut h = s
        .submit(Request {
            prompt: p,
            params: greedy(50),
        })
        .unwrap();
    run_to_idle(&mut s);
    let c = drain(&mut h, &mut Vec::new()).unwrap();
    assert_eq!(c.tokens, want.tokens);
    assert_eq!(c.finish_reason, want.finish_reason);
    assert_eq!(s.free_blocks(), s.total_blocks());
}

/// A model that declines every sampling step it is offered and returns logits: the scheduler
/// must then sample with the step it already drew (never draw twice), so the output is the same.
struct DeclinesPicks(CpuBatchModel);

impl BatchModel for DeclinesPicks {
    fn name(&self) -> &str {
        "declines-picks"
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
    fn step_sampled(
        &mut self,
        work: &[SeqWork<'_>],
        _picks: &[Option<crate::sampling::SimpleSample>],
    ) -> Result<Vec<Option<RowOutput>>, InferenceError> {
        Ok(self
            .0
            .step(work)?
            .into_iter()
            .map(|l| l.map(RowOutput::Logits))
            .collect())
    }
}

#[test]
fn a_model_may_decline_the_sampling_step() {
    let mut e = reference();
    let p = prompt(&e, "the cat is");
    let params = SamplingParams {
        temperature: 0.8,
        top_p: 0.9,
        seed: 21,
        max_tokens: 10,
        ..Default::default()
    };
    let want = e.generate(&p, &params, &mut |_| true).unwrap();
    let bytes = model_bytes();
    let g = Gguf::parse(&bytes).unwrap();
    let (w, tok) = weights_and_tokenizer(&g).unwrap();
    let model = DeclinesPicks(CpuBatchModel::new(CpuBackend::new(&w, &opts()).unwrap(), 2));
    let mut s = Scheduler::new(model, Arc::new(tok), cfg(4, 64, 8));
    let mut h = s.submit(Request { prompt: p, params }).unwrap();
    run_to_idle(&mut s);
    assert_eq!(drain(&mut h, &mut Vec::new()).unwrap().tokens, want.tokens);
}

/// A model that fails one step: the requests of that step end with `Event::Failed`, their
/// blocks come back, and the scheduler keeps serving.
struct FailOnce {
    inner: CpuBatchModel,
    fail_at: usize,
    steps: usize,
}

impl BatchModel for FailOnce {
    fn name(&self) -> &str {
        "fail-once"
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
        self.steps += 1;
        if self.steps == self.fail_at {
            return Err(InferenceError::Backend {
                backend: "fail-once".into(),
                message: "injected failure".into(),
            });
        }
        self.inner.step(work)
    }
    fn release(&mut self, slot: usize) {
        self.inner.release(slot)
    }
}

#[test]
fn a_failed_step_ends_its_requests_and_the_scheduler_goes_on() {
    let mut e = reference();
    let bytes = model_bytes();
    let g = Gguf::parse(&bytes).unwrap();
    let (w, tok) = weights_and_tokenizer(&g).unwrap();
    let inner = CpuBatchModel::new(CpuBackend::new(&w, &opts()).unwrap(), 2);
    let model = FailOnce {
        inner,
        fail_at: 3,
        steps: 0,
    };
    let mut s = Scheduler::new(model, Arc::new(tok), cfg(4, 64, 8));
    let p = prompt(&e, "hello there");
    let mut h = s
        .submit(Request {
            prompt: p.clone(),
            params: greedy(10),
        })
        .unwrap();
    s.step().unwrap();
    s.step().unwrap();
    let err = s.step().unwrap_err();
    assert!(err.to_string().contains("injected failure"));
    let mut failed = false;
    while let Some(ev) = h.try_recv() {
        failed |= matches!(ev, Event::Failed(ref m) if m.contains("injected failure"));
    }
    assert!(failed);
    assert!(s.is_idle());
    assert_eq!(s.free_blocks(), s.total_blocks());
    let mut h = s
        .submit(Request {
            prompt: p.clone(),
            params: greedy(10),
        })
        .unwrap();
    run_to_idle(&mut s);
    let want = e.generate(&p, &greedy(10), &mut |_| true).unwrap();
    assert_eq!(drain(&mut h, &mut Vec::new()).unwrap().tokens, want.tokens);
}

#[test]
fn the_scheduler_can_move_to_a_serving_thread() {
    fn send<T: Send>(_: &T) {}
    let s = scheduler(1, cfg(4, 8, 8));
    send(&s);
    let h = std::thread::spawn(move || s.is_idle()).join().unwrap();
    assert!(h);
}

/// Requests of every kind in one batch — a JSON-object grammar, logprobs with a stop string,
/// seeded sampling with penalties — each get exactly the engine's generation (tokens, text,
/// finish reason, logprobs) and the engine's pieces.
#[test]
fn constrained_logprob_and_stop_string_requests_in_one_batch_equal_the_engine() {
    use crate::grammar::{Grammar, Matcher, VocabIndex};
    let mut e = reference();
    let vocab = Arc::new(VocabIndex::from_tokenizer(e.tokenizer()));
    let grammar = Arc::new(Grammar::json_object(vocab));
    let p = prompt(&e, "give me json");
    let q = prompt(&e, "the cat is on the mat");
    let cases: Vec<(Vec<u32>, SamplingParams, bool)> = vec![
        (p.clone(), greedy(24), true),
        (
            q.clone(),
            SamplingParams {
                logprobs: Some(3),
                stop: vec!["e".into(), "at".into()],
                ..greedy(20)
            },
            false,
        ),
        (
            q.clone(),
            SamplingParams {
                temperature: 0.9,
                top_p: 0.9,
                seed: 42,
                presence_penalty: 0.5,
                logprobs: Some(0),
                ..greedy(16)
            },
            false,
        ),
        (
            p.clone(),
            SamplingParams {
                temperature: 1.2,
                seed: 7,
                ..greedy(30)
            },
            true,
        ),
    ];
    let want: Vec<(Generation, Vec<u32>, String)> = cases
        .iter()
        .map(|(p, params, constrained)| {
            let mut m = constrained.then(|| Matcher::new(grammar.clone()));
            let mut ids = Vec::new();
            let mut text = String::new();
            let g = e
                .generate_constrained(
                    p,
                    params,
                    m.as_mut()
                        .map(|m| m as &mut dyn crate::grammar::TokenConstraint),
                    &mut |piece| {
                        ids.extend(piece.tokens.iter().map(|t| t.id));
                        text.push_str(piece.text);
                        true
                    },
                )
                .unwrap();
            (g, ids, text)
        })
        .collect();
    // Whole prompts per step, as the engine prefills them (chunking would change the float
    // summation order of the prompt's last rows and with it the logprobs' last bits).
    let mut s = scheduler(4, cfg(4, 128, 64));
    let mut handles: Vec<RequestHandle> = cases
        .iter()
        .map(|(p, params, constrained)| {
            let c = constrained.then(|| {
                Box::new(Matcher::new(grammar.clone())) as Box<dyn crate::grammar::TokenConstraint>
            });
            s.submit_constrained(
                Request {
                    prompt: p.clone(),
                    params: params.clone(),
                },
                c,
            )
            .unwrap()
        })
        .collect();
    run_to_idle(&mut s);
    for (i, (h, (w, w_ids, w_text))) in handles.iter_mut().zip(&want).enumerate() {
        let (mut ids, mut text) = (Vec::new(), String::new());
        let g = drain_text(h, &mut ids, &mut text).unwrap();
        assert_eq!(g.tokens, w.tokens, "case {i}");
        assert_eq!(g.text, w.text, "case {i}");
        assert_eq!(g.finish_reason, w.finish_reason, "case {i}");
        // Same tokens and alternatives; values equal up to float summation order (the engine
        // reuses a cached prompt prefix and recomputes only the last prompt token).
        assert_eq!(g.logprobs.len(), w.logprobs.len(), "case {i}");
        for (a, b) in g.logprobs.iter().zip(&w.logprobs) {
            assert_eq!((a.id, a.text_offset), (b.id, b.text_offset), "case {i}");
            let (la, lb) = (a.logprob.as_ref().unwrap(), b.logprob.as_ref().unwrap());
            assert_eq!(la.id, lb.id, "case {i}");
            assert!(
                (la.logprob - lb.logprob).abs() < 1e-4,
                "case {i}: {la:?} {lb:?}"
            );
            let ids =
                |l: &crate::sampling::TokenLogprob| l.top.iter().map(|t| t.0).collect::<Vec<_>>();
            assert_eq!(ids(la), ids(lb), "case {i}");
        }
        assert_eq!(&ids, w_ids, "case {i}");
        assert_eq!(&text, w_text, "case {i}");
    }
    // The constrained answers are JSON objects (the grammar held inside the batch).
    for i in [0, 3] {
        let t = &want[i].0.text;
        if want[i].0.finish_reason == FinishReason::Stop {
            assert!(
                serde_json::from_str::<serde_json::Value>(t)
                    .unwrap()
                    .is_object(),
                "{t}"
            );
        }
    }
    assert!(!want[1].0.logprobs.is_empty(), "logprobs were asked for");
    assert_eq!(s.free_blocks(), s.total_blocks());
}

/// A toy paged model: the "K/V" of a position is its token, stored only in the block the work
/// names; a row's logits peak at a hash of every token it reads back through its block table
/// (an unwritten position is an error). Output therefore depends on exactly what the blocks
/// hold, so wrongly shared or recycled blocks change it.
struct ToyPaged {
    vocab: usize,
    block_size: usize,
    store: Vec<u32>,
    paged: bool,
    computed: usize,
    adopted: Vec<(usize, usize)>,
}

const UNWRITTEN: u32 = u32::MAX;

impl ToyPaged {
    fn new(vocab: usize, block_size: usize, kv_blocks: usize, paged: bool) -> Self {
        ToyPaged {
            vocab,
            block_size,
            store: vec![UNWRITTEN; block_size * kv_blocks],
            paged,
            computed: 0,
            adopted: Vec::new(),
        }
    }
    fn at(&self, blocks: &[u32], pos: usize) -> usize {
        blocks[pos / self.block_size] as usize * self.block_size + pos % self.block_size
    }
}

impl BatchModel for ToyPaged {
    fn name(&self) -> &str {
        "toy-paged"
    }
    fn vocab(&self) -> usize {
        self.vocab
    }
    fn max_context(&self) -> usize {
        CTX
    }
    fn slots(&self) -> usize {
        4
    }
    fn step(&mut self, work: &[SeqWork<'_>]) -> Result<Vec<Option<Vec<f32>>>, InferenceError> {
        let mut out = Vec::new();
        for w in work {
            for (k, &t) in w.tokens.iter().enumerate() {
                let i = self.at(w.blocks, w.start_pos + k);
                self.store[i] = t;
            }
            self.computed += w.tokens.len();
            if !w.want_logits {
                out.push(None);
                continue;
            }
            let mut h: u64 = 1469598103934665603;
            for pos in 0..w.start_pos + w.tokens.len() {
                let t = self.store[self.at(w.blocks, pos)];
                if t == UNWRITTEN {
                    return Err(InferenceError::InvalidArgument(format!(
                        "slot {} reads unwritten position {pos}",
                        w.slot
                    )));
                }
                h = (h ^ u64::from(t)).wrapping_mul(1099511628211);
            }
            let mut l = vec![0.0f32; self.vocab];
            // Tokens 3.. only (the low ids hold the tokenizer's special tokens).
            l[3 + (h % (self.vocab as u64 - 3)) as usize] = 5.0;
            out.push(Some(l));
        }
        Ok(out)
    }
    fn release(&mut self, _slot: usize) {}
    fn paged(&self) -> bool {
        self.paged
    }
    fn adopted(&mut self, slot: usize, positions: usize) {
        self.adopted.push((slot, positions));
    }
}

/// Runs `prompts` (submitted together, greedy, 6 tokens each) over a toy model; `cancel_first`
/// drops the first handle after the first step; `cache` turns the prefix cache on. Returns the tokens of each (None if
/// cancelled), the positions shared, the tokens computed and the per-step reports.
#[allow(clippy::type_complexity)]
fn run_toy(
    prompts: &[Vec<u32>],
    paged: bool,
    cancel_first: bool,
    cache: bool,
) -> (
    Vec<Option<Vec<u32>>>,
    usize,
    usize,
    Vec<StepReport>,
    Vec<(usize, usize)>,
) {
    let bytes = model_bytes();
    let g = Gguf::parse(&bytes).unwrap();
    let (_, tok) = weights_and_tokenizer(&g).unwrap();
    let vocab = tok.vocab_size();
    let c = cfg(4, 24, 64);
    let model = ToyPaged::new(vocab, c.block_size, c.kv_blocks, paged);
    let mut s = Scheduler::new(model, Arc::new(tok), c).with_prefix_cache(cache);
    let mut handles: Vec<Option<RequestHandle>> = prompts
        .iter()
        .map(|p| {
            Some(
                s.submit(Request {
                    prompt: p.clone(),
                    params: greedy(6),
                })
                .unwrap(),
            )
        })
        .collect();
    let mut reports = vec![s.step().unwrap()];
    if cancel_first {
        handles[0] = None;
    }
    while !s.is_idle() {
        reports.push(s.step().unwrap());
        assert!(reports.len() < 200);
    }
    assert_eq!(s.free_blocks(), s.total_blocks(), "every block came back");
    let out = handles
        .iter_mut()
        .map(|h| {
            h.as_mut()
                .map(|h| drain(h, &mut Vec::new()).unwrap().tokens)
        })
        .collect();
    let shared = reports.iter().map(|r| r.shared).sum();
    (
        out,
        shared,
        s.model().computed,
        reports,
        s.model().adopted.clone(),
    )
}

#[test]
fn sequences_with_one_prefix_share_its_written_blocks() {
    // Three requests with one 11-token prompt (n choices), one with a different prompt that
    // starts the same (its second block differs), one unrelated.
    let p: Vec<u32> = (20..31).collect();
    let mut q = p.clone();
    q[5] = 99;
    let prompts = vec![p.clone(), p.clone(), p.clone(), q, vec![7, 8, 9, 10, 11]];
    let (alone, shared0, computed0, _, adopted0) = run_toy(&prompts, false, false, true);
    assert_eq!(shared0, 0, "a model that is not paged never shares");
    assert!(adopted0.is_empty());
    let (got, shared, computed, reports, adopted) = run_toy(&prompts, true, false, true);
    assert_eq!(got, alone, "sharing changes no output");
    // The two later copies of p each take blocks 0-3 and 4-7 (8 positions; the last block is
    // partial and is computed), q takes block 0-3.
    assert_eq!(shared, 2 * 8 + 4);
    assert_eq!(computed, computed0 - shared);
    // Step 1 writes the blocks; the copies and q (same first block) wait for them rather
    // than computing them again (the unrelated prompt waits for a slot: 4 slots).
    assert_eq!(reports[0].shared, 0);
    assert_eq!(reports[0].prefilled, 11, "only the first copy of p");
    assert_eq!(reports[1].shared, 2 * 8 + 4);
    assert_eq!(adopted.len(), 3);
    assert!(adopted.iter().all(|&(_, n)| n == 8 || n == 4));
}

#[test]
fn a_cancelled_owner_leaves_shared_blocks_to_the_others() {
    let p: Vec<u32> = (40..53).collect();
    let prompts = vec![p.clone(), p.clone(), p];
    let (alone, ..) = run_toy(&prompts, false, false, true);
    // The owner of the blocks leaves after step 1: the blocks were written but nobody holds
    // them yet. Without the prefix cache they go back to the pool and the others compute the
    // prefix themselves.
    let (got, shared, ..) = run_toy(&prompts, true, true, false);
    assert_eq!(got[0], None);
    assert_eq!(&got[1..], &alone[1..]);
    // 13 tokens: the three full blocks (12 positions) are shareable.
    assert_eq!(
        shared, 12,
        "the third takes the second's blocks once written"
    );
    // With it they stay cached and both others adopt them.
    let (got, shared, _, reports, _) = run_toy(&prompts, true, true, true);
    assert_eq!(got[0], None);
    assert_eq!(&got[1..], &alone[1..]);
    assert_eq!(shared, 2 * 12);
    // The first takes them from the cache, the second then shares them with the first.
    assert_eq!(reports.iter().map(|r| r.cached).sum::<usize>(), 12);
}

/// Checks the block pool and the prefix index against each other and the running tables:
/// every block is exactly one of free, cached or held; a block's holders are the running
/// tables that hold it; the cached blocks are the index's cached entries; every indexed key
/// names an indexed previous block; the evictable set is exactly the cached leaves; held
/// blocks never exceed the reservations.
fn check_pool<M: BatchModel>(s: &Scheduler<M>) {
    let a = &s.alloc;
    let total = a.total() as u32;
    let mut tables: HashMap<u32, u32> = HashMap::new();
    for q in &s.running {
        for &b in q.table.blocks() {
            *tables.entry(b).or_default() += 1;
        }
    }
    let (mut held, mut cached) = (0, 0);
    for b in 0..total {
        assert_eq!(
            a.holders(b),
            tables.get(&b).copied().unwrap_or(0),
            "block {b}"
        );
        assert!(
            !(a.is_cached(b) && a.holders(b) > 0),
            "block {b} cached and held"
        );
        held += usize::from(a.holders(b) > 0);
        cached += usize::from(a.is_cached(b));
        let ix = s.prefix.blocks.get(&b);
        assert_eq!(
            a.is_cached(b),
            ix.is_some_and(|e| e.cached_at.is_some()),
            "block {b}: the pool and the index disagree on caching"
        );
    }
    assert_eq!(held + cached + a.free(), a.total(), "free + cached + held");
    assert_eq!((held, cached), (a.held(), a.cached()));
    assert!(
        held <= s.committed,
        "held {held} > reserved {}",
        s.committed
    );
    let mut children: HashMap<u32, u32> = HashMap::new();
    for (&b, e) in &s.prefix.blocks {
        assert!(b < total);
        assert_eq!(s.prefix.by_key.get(&e.key).map(|v| v.0), Some(b));
        if e.key.0 != NO_BLOCK {
            assert!(
                s.prefix.blocks.contains_key(&e.key.0),
                "block {b}'s key names block {} which is not indexed",
                e.key.0
            );
            *children.entry(e.key.0).or_default() += 1;
        }
        if e.cached_at.is_some() {
            assert!(s.prefix.by_key[&e.key].1, "a cached block is written");
        }
    }
    assert_eq!(s.prefix.by_key.len(), s.prefix.blocks.len());
    let mut leaves = BTreeSet::new();
    for (&b, e) in &s.prefix.blocks {
        assert_eq!(
            e.children,
            children.get(&b).copied().unwrap_or(0),
            "block {b}"
        );
        if let Some(t) = e.cached_at
            && e.children == 0
        {
            leaves.insert((t, b));
        }
    }
    assert_eq!(
        leaves, s.prefix.lru,
        "the evictable set is the cached leaves"
    );
}

/// The toy paged model's scheduler: 4 slots, `kv_blocks` blocks of 4 positions.
fn toy(kv_blocks: usize, prefill_chunk: usize, cache: bool) -> Scheduler<ToyPaged> {
    let bytes = model_bytes();
    let g = Gguf::parse(&bytes).unwrap();
    let (_, tok) = weights_and_tokenizer(&g).unwrap();
    let c = SchedulerConfig {
        max_queued: 64,
        ..cfg(4, kv_blocks, prefill_chunk)
    };
    let model = ToyPaged::new(tok.vocab_size(), c.block_size, c.kv_blocks, true);
    Scheduler::new(model, Arc::new(tok), c).with_prefix_cache(cache)
}

/// What a fresh scheduler (no cache, nothing else running) generates for `p`, greedy.
fn fresh(p: &[u32], max_tokens: usize) -> Vec<u32> {
    let mut s = toy(64, 64, false);
    let mut h = s
        .submit(Request {
            prompt: p.to_vec(),
            params: greedy(max_tokens),
        })
        .unwrap();
    run_to_idle(&mut s);
    drain(&mut h, &mut Vec::new()).unwrap().tokens
}

/// Runs one request alone to its end, checking the pool after every step; returns its tokens
/// and the summed report.
fn run_one<M: BatchModel>(
    s: &mut Scheduler<M>,
    p: &[u32],
    max_tokens: usize,
) -> (Vec<u32>, StepReport) {
    run_one_in(s, p, max_tokens, SHARED_SCOPE)
}

/// [`run_one`] in a prefix-sharing scope.
fn run_one_in<M: BatchModel>(
    s: &mut Scheduler<M>,
    p: &[u32],
    max_tokens: usize,
    scope: CacheScope,
) -> (Vec<u32>, StepReport) {
    let mut h = s
        .submit_scoped(
            Request {
                prompt: p.to_vec(),
                params: greedy(max_tokens),
            },
            None,
            scope,
        )
        .unwrap();
    let mut sum = StepReport::default();
    while !s.is_idle() {
        let r = s.step().unwrap();
        check_pool(s);
        sum.prefilled += r.prefilled;
        sum.shared += r.shared;
        sum.cached += r.cached;
        sum.evicted += r.evicted;
        sum.decoded += r.decoded;
        sum.cached_blocks = r.cached_blocks;
    }
    (drain(&mut h, &mut Vec::new()).unwrap().tokens, sum)
}

#[test]
fn a_finished_requests_prefix_is_adopted_from_the_cache() {
    let p: Vec<u32> = (60..74).collect(); // 14 tokens: blocks 0-2 full, 2 tokens after
    let mut s = toy(32, 64, true);
    let (first, r) = run_one(&mut s, &p, 6);
    assert_eq!(first, fresh(&p, 6));
    assert_eq!((r.shared, r.prefilled), (0, 14));
    // 14 + 5 fed positions: blocks 0-3 full (block 3 holds 2 prompt and 2 generated tokens).
    assert_eq!(s.cached_blocks(), 4);
    assert_eq!(
        s.free_blocks(),
        s.total_blocks(),
        "cached blocks count as free"
    );
    // The same prompt again: the three full blocks before the last token come from the cache.
    let computed = s.model().computed;
    let (again, r) = run_one(&mut s, &p, 6);
    assert_eq!(again, first, "a fresh run's tokens");
    assert_eq!((r.shared, r.cached, r.prefilled), (12, 12, 2));
    assert_eq!(
        s.model().computed - computed,
        2 + 5,
        "only the tail and the decode steps"
    );
    assert_eq!(s.model().adopted.last().map(|a| a.1), Some(12));
    // The next turn of the conversation: prompt + the fed answer + new tokens. The blocks of
    // generated tokens are adopted too (positions 0-15).
    let mut turn: Vec<u32> = p.clone();
    turn.extend(&first[..5]);
    turn.extend([300, 301, 302]);
    let computed = s.model().computed;
    let (next, r) = run_one(&mut s, &turn, 4);
    assert_eq!(next, fresh(&turn, 4));
    assert_eq!((r.cached, r.prefilled), (16, turn.len() - 16));
    assert_eq!(s.model().computed - computed, turn.len() - 16 + 3);
}

#[test]
fn cached_prefixes_are_shared_only_within_a_scope() {
    let p: Vec<u32> = (60..74).collect();
    let want = fresh(&p, 6);
    let mut s = toy(64, 64, true);
    // First of each scope (7, 8, the shared one): computed in full, none from another scope.
    for scope in [7, 8, SHARED_SCOPE] {
        let (toks, r) = run_one_in(&mut s, &p, 6, scope);
        assert_eq!(toks, want, "scope {scope}");
        assert_eq!(
            (r.shared, r.cached, r.prefilled),
            (0, 0, 14),
            "scope {scope}"
        );
    }
    // Again: each takes its own scope's cached blocks.
    for scope in [8, SHARED_SCOPE, 7] {
        let (toks, r) = run_one_in(&mut s, &p, 6, scope);
        assert_eq!(toks, want, "scope {scope}");
        assert_eq!(
            (r.shared, r.cached, r.prefilled),
            (12, 12, 2),
            "scope {scope}"
        );
    }
    // A scope whose two words look like prompt tokens does not match the unscoped key of a
    // prompt that starts with them.
    let scope = 60 | (61 << 32);
    let tail: Vec<u32> = (62..74).collect();
    let (_, r) = run_one_in(&mut s, &tail, 2, scope);
    assert_eq!(r.cached, 0);
}

#[test]
fn running_sequences_share_only_within_a_scope() {
    let p: Vec<u32> = (60..74).collect();
    for (a, b, shared) in [(3, 3, 12), (3, 4, 0), (SHARED_SCOPE, 4, 0)] {
        let mut s = toy(64, 4, false);
        let mut hs: Vec<_> = [a, b]
            .into_iter()
            .map(|scope| {
                s.submit_scoped(
                    Request {
                        prompt: p.clone(),
                        params: greedy(3),
                    },
                    None,
                    scope,
                )
                .unwrap()
            })
            .collect();
        let mut sum = 0;
        while !s.is_idle() {
            sum += s.step().unwrap().shared;
            check_pool(&s);
        }
        assert_eq!(sum, shared, "scopes {a} and {b}");
        for h in &mut hs {
            assert_eq!(drain(h, &mut Vec::new()).unwrap().tokens, fresh(&p, 3));
        }
    }
}

#[test]
fn with_the_cache_off_a_finished_prefix_is_computed_again() {
    let p: Vec<u32> = (60..74).collect();
    let mut s = toy(32, 64, false);
    assert!(!s.prefix_cache());
    let (first, _) = run_one(&mut s, &p, 6);
    assert_eq!(s.cached_blocks(), 0);
    assert_eq!(s.allocator().free(), s.total_blocks());
    let (again, r) = run_one(&mut s, &p, 6);
    assert_eq!(again, first);
    assert_eq!((r.shared, r.cached, r.prefilled), (0, 0, 14));
    assert!(s.prefix.blocks.is_empty(), "nothing indexed once idle");
    // Turning it off drops what was cached.
    let mut s = toy(32, 64, true);
    run_one(&mut s, &p, 6);
    assert!(s.cached_blocks() > 0);
    s.set_prefix_cache(false);
    assert_eq!(s.cached_blocks(), 0);
    assert_eq!(s.allocator().free(), s.total_blocks());
    check_pool(&s);
    let (again, r) = run_one(&mut s, &p, 6);
    assert_eq!((again, r.cached), (first, 0));
}

#[test]
fn eviction_takes_least_recently_cached_leaves_and_no_request_fails() {
    // 10 blocks of 4 positions. Each request leaves its whole chain cached.
    let mut s = toy(10, 64, true);
    let a: Vec<u32> = (100..108).collect();
    let b: Vec<u32> = (200..208).collect();
    let (out_a, _) = run_one(&mut s, &a, 5); // fed 12: 3 blocks cached
    let (out_b, _) = run_one(&mut s, &b, 5);
    assert_eq!(s.cached_blocks(), 6);
    assert_eq!(s.allocator().free(), 4);
    // 16 + 4 fed positions = 5 blocks: one eviction, a's last block (the older leaf).
    let e: Vec<u32> = (300..316).collect();
    let (out_e, r) = run_one(&mut s, &e, 5);
    assert_eq!(out_e, fresh(&e, 5));
    assert_eq!(r.evicted, 1);
    assert_eq!((s.cached_blocks(), s.allocator().free()), (10, 0));
    // b's next turn adopts b's three cached blocks and needs one more: the oldest leaf is now
    // a's second block (its first is not a leaf while the second is indexed).
    let mut b2 = b.clone();
    b2.extend(&out_b[..4]);
    b2.push(350);
    let (got, r) = run_one(&mut s, &b2, 2);
    assert_eq!(got, fresh(&b2, 2));
    assert_eq!((r.cached, r.evicted), (12, 1));
    // a's next turn finds only a's first block.
    let mut a2 = a.clone();
    a2.extend(&out_a[..4]);
    a2.push(351);
    let (got, r) = run_one(&mut s, &a2, 2);
    assert_eq!(got, fresh(&a2, 2));
    assert_eq!(r.cached, 4);
    assert!(r.evicted >= 2);
    // Every output equals a fresh run's, and the pool is whole.
    assert_eq!(out_a, fresh(&a, 5));
    assert_eq!(out_b, fresh(&b, 5));
    assert_eq!(s.free_blocks(), s.total_blocks());
}

#[test]
fn cancelling_a_sequence_that_adopted_cached_blocks_leaves_them_cached() {
    let p: Vec<u32> = (60..74).collect();
    let mut s = toy(32, 64, true);
    let (first, _) = run_one(&mut s, &p, 6);
    let cached = s.cached_blocks();
    let h = s
        .submit(Request {
            prompt: p.clone(),
            params: greedy(6),
        })
        .unwrap();
    let r = s.step().unwrap();
    assert_eq!(r.cached, 12);
    check_pool(&s);
    assert_eq!(s.cached_blocks(), cached - 3, "three blocks adopted");
    drop(h);
    let r = s.step().unwrap();
    assert_eq!(r.cancelled, 1);
    check_pool(&s);
    assert!(
        s.cached_blocks() >= cached,
        "the adopted blocks are cached again"
    );
    let (again, r) = run_one(&mut s, &p, 6);
    assert_eq!(again, first);
    assert_eq!(r.cached, 12);
}

/// A small deterministic generator (xorshift) for the randomized test.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn randomized_overlapping_prefixes_with_cancels_on_a_tiny_pool_equal_fresh_runs() {
    let bases: Vec<Vec<u32>> = (0..3)
        .map(|k| (0..9).map(|i| 50 + 40 * k + i).collect())
        .collect();
    let mut fresh_memo: HashMap<(Vec<u32>, usize), Vec<u32>> = HashMap::new();
    let mut totals = StepReport::default();
    for seed in 1..=6u64 {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed);
        // 14 blocks of 4: a request reserves at most 8 (prompt ≤ 24, max_tokens ≤ 8).
        let mut s = toy(14, 3 + rng.below(8), true);
        // (handle, prompt, max_tokens, tokens so far, cancel at step)
        type Live = (RequestHandle, Vec<u32>, usize, Vec<u32>, Option<usize>);
        let mut live: Vec<Live> = Vec::new();
        let mut done: Vec<(Vec<u32>, usize, Vec<u32>)> = Vec::new();
        let mut submitted = 0;
        let mut step = 0;
        while submitted < 40 || !s.is_idle() {
            if submitted < 40 && rng.below(3) > 0 {
                // A shared base, or a follow-up of a finished request, then a random tail.
                let mut p = if !done.is_empty() && rng.below(3) == 0 {
                    let (q, _, out) = &done[rng.below(done.len())];
                    let mut p = q.clone();
                    p.extend(&out[..out.len().saturating_sub(1)]);
                    p
                } else {
                    bases[rng.below(bases.len())][..3 + rng.below(7)].to_vec()
                };
                p.truncate(20);
                for _ in 0..1 + rng.below(4) {
                    p.push(10 + rng.below(300) as u32);
                }
                let n = 1 + rng.below(8);
                let cancel = (rng.below(5) == 0).then(|| step + rng.below(6));
                match s.submit(Request {
                    prompt: p.clone(),
                    params: greedy(n),
                }) {
                    Ok(h) => {
                        live.push((h, p, n, Vec::new(), cancel));
                        submitted += 1;
                    }
                    Err(SubmitError::Busy { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
                continue;
            }
            let r = s.step().unwrap();
            step += 1;
            assert!(step < 5000);
            check_pool(&s);
            totals.shared += r.shared;
            totals.cached += r.cached;
            totals.evicted += r.evicted;
            totals.prefilled += r.prefilled;
            let mut i = 0;
            while i < live.len() {
                let (h, _, _, toks, cancel) = &mut live[i];
                let finished = drain(h, toks);
                if let Some(g) = finished {
                    assert_eq!(&g.tokens, toks);
                    let (_, p, n, toks, _) = live.remove(i);
                    done.push((p, n, toks));
                    continue;
                }
                if cancel.is_some_and(|c| c <= step) {
                    // Whatever streamed before the cancel is a fresh run's beginning.
                    let (_, p, n, toks, _) = live.remove(i);
                    let want = fresh_memo
                        .entry((p.clone(), n))
                        .or_insert_with(|| fresh(&p, n));
                    assert!(want.starts_with(&toks), "cancelled {p:?}");
                    continue;
                }
                i += 1;
            }
        }
        assert!(live.is_empty());
        for (p, n, toks) in &done {
            let want = fresh_memo
                .entry((p.clone(), *n))
                .or_insert_with(|| fresh(p, *n));
            assert_eq!(toks, want, "seed {seed}: prompt {p:?}");
        }
        assert_eq!(s.free_blocks(), s.total_blocks());
        assert_eq!(s.allocator().held(), 0);
    }
    // The run exercised what it tests.
    assert!(totals.cached > 100, "{totals:?}");
    assert!(totals.evicted > 20, "{totals:?}");
    assert!(
        totals.shared > totals.cached,
        "running sequences shared too: {totals:?}"
    );
}

/// Through a real model: [`crate::cpu_batched::CpuBatchedModel`] over a synthetic model, a
/// conversation of three requests one after another (the second repeats the first's prompt,
/// the third continues the first's answer) gives token for token what it gives without the
/// cache, and with it the later ones take their prefix from the cache.
#[test]
fn the_cached_prefix_changes_no_output_of_the_batched_cpu_model() {
    let bytes = model_bytes();
    let g = Gguf::parse(&bytes).unwrap();
    let (w, tok) = weights_and_tokenizer(&g).unwrap();
    let tok = Arc::new(tok);
    let c = cfg(4, 40, 64);
    let run = |cache: bool| {
        let backend = CpuBackend::new(&w, &opts()).unwrap();
        let model = crate::cpu_batched::CpuBatchedModel::new(backend, 2, &c).unwrap();
        let mut s = Scheduler::new(model, tok.clone(), c.clone()).with_prefix_cache(cache);
        let p: Vec<u32> = (20..35).collect();
        let (a, ra) = run_one(&mut s, &p, 9);
        let (b, rb) = run_one(&mut s, &p, 9);
        let mut turn = p.clone();
        turn.extend(&a[..a.len() - 1]);
        turn.extend([40, 41, 42]);
        let (t, rt) = run_one(&mut s, &turn, 6);
        (vec![a, b, t], [ra.cached, rb.cached, rt.cached])
    };
    let (without, none) = run(false);
    let (with, cached) = run(true);
    assert_eq!(with, without);
    assert_eq!(none, [0, 0, 0]);
    assert_eq!(with[0], with[1]);
    assert_eq!(with[0].len(), 9, "the answer is long enough to fill blocks");
    // 15-token prompt: 12 positions adopted; the next turn also adopts the answer's blocks.
    assert_eq!(cached[..2], [0, 12]);
    assert!(cached[2] >= 20, "{cached:?}");
}
