//! The served path under concurrency: continuous batching through the API, back-pressure,
//! KV budget refusals and client disconnects (tiny synthetic model, in process).

#![allow(clippy::unwrap_used)]
use super::tests::{COMPL, call, model_bytes, request, sse_chunks};
use super::*;
use crate::cpu::CpuOptions;
use crate::engine::load_cpu_from_bytes;
use http_body_util::BodyExt;
use std::time::{Duration, Instant};
use tower::ServiceExt;

fn engine() -> Engine {
    load_cpu_from_bytes(
        &model_bytes(),
        &CpuOptions {
            threads: 1,
            max_context: 64,
            batch: 16,
        },
    )
    .unwrap()
}

fn served(opts: ServerOptions) -> (Router, Arc<ServerStats>) {
    serve(
        engine(),
        ServerOptions {
            model_name: "tiny".into(),
            ..opts
        },
    )
    .unwrap()
}

/// The model, slowed down to `step` per scheduler step, so requests overlap however fast the
/// machine is.
struct Slow {
    inner: Box<dyn BatchModel>,
    step: Duration,
}

impl BatchModel for Slow {
    fn name(&self) -> &str {
        "slow"
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
    fn step(
        &mut self,
        work: &[crate::scheduler::SeqWork<'_>],
    ) -> Result<Vec<Option<Vec<f32>>>, InferenceError> {
        std::thread::sleep(self.step);
        self.inner.step(work)
    }
    fn release(&mut self, slot: usize) {
        self.inner.release(slot)
    }
    fn paged(&self) -> bool {
        self.inner.paged()
    }
    fn adopted(&mut self, slot: usize, positions: usize) {
        self.inner.adopted(slot, positions)
    }
}

fn served_slow(opts: ServerOptions) -> (Router, Arc<ServerStats>) {
    let cfg = scheduler_config(&opts, 64);
    let (inner, tok) = engine().into_batch_model(opts.max_batch, &cfg).unwrap();
    let slow = Slow {
        inner,
        step: Duration::from_millis(10),
    };
    serve_model(
        Box::new(slow),
        tok,
        ServerOptions {
            model_name: "tiny".into(),
            ..opts
        },
    )
}

/// The text of a streamed completion, and its finish reason.
fn streamed_text(body: &str) -> (String, String) {
    let mut text = String::new();
    let mut finish = String::new();
    for c in sse_chunks(body) {
        text.push_str(c["choices"][0]["text"].as_str().unwrap_or_default());
        if let Some(f) = c["choices"][0]["finish_reason"].as_str() {
            finish = f.to_owned();
        }
    }
    (text, finish)
}

/// Waits (up to a generous bound, not a timing claim) until `f` holds.
async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < Duration::from_secs(60), "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// 64 clients stream at once through a batch of 4 with a queue of 64: every stream is intact
/// (whole, in order, ending with `[DONE]`) and equals what the single-sequence engine
/// produces for the same prompt and seed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_concurrent_streams_stay_intact() {
    let (app, stats) = served(ServerOptions {
        max_batch: 4,
        queue_depth: 64,
        ..ServerOptions::default()
    });
    let bodies: Vec<Value> = (0..64)
        .map(|i| {
            let temp = if i % 2 == 0 { 0.0 } else { 0.8 };
            json!({"prompt": format!("client {i} says hello {}", "x ".repeat(i % 7)), "max_tokens": 4 + i % 9, "temperature": temp, "seed": i, "stream": true})
        })
        .collect();
    let want: Vec<(String, String)> = bodies
        .iter()
        .map(|b| {
            // A fresh engine per prompt: a reused prompt prefix changes the logits' last bits
            // (summation order), which can flip a sampled token. The batch prefills each
            // prompt whole too (the default prefill budget holds it).
            let mut e = engine();
            let prompt = e
                .tokenizer()
                .encode(b["prompt"].as_str().unwrap(), false, true);
            let params = SamplingParams {
                max_tokens: b["max_tokens"].as_u64().unwrap() as usize,
                temperature: b["temperature"].as_f64().unwrap() as f32,
                seed: derive_seed(b["seed"].as_u64().unwrap(), 0),
                ..SamplingParams::default()
            };
            let g = e.generate(&prompt, &params, &mut |_| true).unwrap();
            (g.text, finish_str(g.finish_reason).to_owned())
        })
        .collect();
    let mut tasks = Vec::new();
    for b in &bodies {
        let app = app.clone();
        let b = b.to_string();
        tasks.push(tokio::spawn(
            async move { call(&app, "POST", COMPL, &b).await },
        ));
    }
    for (i, (t, w)) in tasks.into_iter().zip(&want).enumerate() {
        let (s, body) = t.await.unwrap();
        assert_eq!(s, StatusCode::OK, "client {i}: {body}");
        assert_eq!(&streamed_text(&body), w, "client {i}");
    }
    assert!(stats.steps.load(Ordering::Relaxed) > 0 && stats.decoded.load(Ordering::Relaxed) > 0);
    eventually("the batch drains", || {
        stats.running.load(Ordering::Relaxed) == 0
            && stats.free_kv_blocks.load(Ordering::Relaxed)
                == stats.kv_blocks.load(Ordering::Relaxed)
    })
    .await;
    assert_eq!(stats.ended.load(Ordering::Relaxed), 64);
}

/// When the slots and the queue are full, the answer is 429 with a `Retry-After` header and an
/// OpenAI-shaped body; the admitted requests finish normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_429_with_retry_after() {
    // One slot and one waiting place; each request needs 40 steps of 10 ms.
    let (app, stats) = served_slow(ServerOptions {
        max_batch: 1,
        queue_depth: 1,
        ..ServerOptions::default()
    });
    let body = json!({"prompt": "go", "max_tokens": 40, "temperature": 0, "stream": true});
    let mut held = Vec::new();
    for _ in 0..2 {
        let app = app.clone();
        let b = body.to_string();
        held.push(tokio::spawn(
            async move { call(&app, "POST", COMPL, &b).await },
        ));
    }
    eventually("one running and one waiting", || {
        stats.running.load(Ordering::Relaxed) == 1 && stats.waiting.load(Ordering::Relaxed) == 1
    })
    .await;
    let req = request(COMPL, &body.to_string());
    let r = app.clone().oneshot(req).await.unwrap();
    assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
    let secs: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&secs), "{secs}");
    let b = r.into_body().collect().await.unwrap().to_bytes();
    let v: Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error");
    assert_eq!(v["error"]["code"], "queue_full");
    assert!(v["error"]["message"].as_str().unwrap().contains("retry"));
    // The admitted two finish whole.
    for h in held {
        let (s, body) = h.await.unwrap();
        assert_eq!(s, StatusCode::OK);
        assert_eq!(streamed_text(&body).1, "length");
    }
}

/// A request that can never fit the KV budget gets a 400 naming the limit, while a running
/// stream goes on untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_over_the_kv_budget_is_a_400_and_others_keep_running() {
    // 2 slots, 3 blocks of 8 positions: at most 24 positions per request.
    let (app, stats) = served(ServerOptions {
        max_batch: 2,
        kv_block_size: 8,
        kv_blocks: Some(3),
        ..ServerOptions::default()
    });
    let ok = json!({"prompt": "hi", "max_tokens": 16, "temperature": 0, "stream": true});
    let running = {
        let app = app.clone();
        let b = ok.to_string();
        tokio::spawn(async move { call(&app, "POST", COMPL, &b).await })
    };
    let big = json!({"prompt": "hello there", "max_tokens": 40, "temperature": 0});
    let (s, b) = call(&app, "POST", COMPL, &big.to_string()).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{b}");
    let v: Value = serde_json::from_str(&b).unwrap();
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    assert_eq!(v["error"]["param"], "max_tokens");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("at most 24"), "{msg}");
    let (s, body) = running.await.unwrap();
    assert_eq!(s, StatusCode::OK);
    let mut e = engine();
    let prompt = e.tokenizer().encode("hi", false, true);
    let g = e
        .generate(
            &prompt,
            &SamplingParams {
                max_tokens: 16,
                ..Default::default()
            },
            &mut |_| true,
        )
        .unwrap();
    assert_eq!(streamed_text(&body).0, g.text);
    eventually("blocks freed", || {
        stats.free_kv_blocks.load(Ordering::Relaxed) == 3
    })
    .await;
}

/// A client that goes away mid-stream cancels its sequence: it leaves the batch and its KV
/// blocks return to the pool, and the next request is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disconnect_cancels_the_sequence_and_frees_its_blocks() {
    let (app, stats) = served_slow(ServerOptions {
        max_batch: 2,
        ..ServerOptions::default()
    });
    let body = json!({"prompt": "tell me a long story", "max_tokens": 60, "temperature": 0, "stream": true});
    let req = request(COMPL, &body.to_string());
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body_stream = resp.into_body();
    // Read the first chunk, then hang up.
    let first = body_stream.frame().await.unwrap().unwrap();
    assert!(first.is_data());
    eventually("the sequence runs", || {
        stats.running.load(Ordering::Relaxed) == 1
    })
    .await;
    drop(body_stream);
    eventually("the sequence is cancelled", || {
        stats.cancelled.load(Ordering::Relaxed) == 1
            && stats.running.load(Ordering::Relaxed) == 0
            && stats.free_kv_blocks.load(Ordering::Relaxed)
                == stats.kv_blocks.load(Ordering::Relaxed)
    })
    .await;
    assert!(
        stats.decoded.load(Ordering::Relaxed) < 59,
        "the sequence left before its max_tokens"
    );
    let (s, _) = call(
        &app,
        "POST",
        COMPL,
        &json!({"prompt": "hi", "max_tokens": 3}).to_string(),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
}

/// The `n` choices of one request share the prompt's KV blocks (the CPU batch model is paged):
/// the later choices compute only the prompt's last, partial block, the counters say how many
/// positions were shared, and every choice is still what a fresh engine gives for its seed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_share_the_prompt_blocks() {
    // Slowed steps: the first choice cannot finish before the others are taken.
    let (app, stats) = served_slow(ServerOptions {
        max_batch: 4,
        kv_block_size: 4,
        ..ServerOptions::default()
    });
    let text = "the cat sat on the mat and looked at the dog";
    let body = json!({"prompt": text, "max_tokens": 6, "temperature": 0.9, "seed": 31, "n": 3});
    let (s, out) = call(&app, "POST", COMPL, &body.to_string()).await;
    assert_eq!(s, StatusCode::OK, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let prompt = engine().tokenizer().encode(text, false, true);
    assert!(prompt.len() >= 9, "the prompt must span several blocks");
    for i in 0..3 {
        let mut e = engine();
        let params = SamplingParams {
            max_tokens: 6,
            temperature: 0.9,
            seed: derive_seed(31, i),
            ..SamplingParams::default()
        };
        let g = e.generate(&prompt, &params, &mut |_| true).unwrap();
        assert_eq!(v["choices"][i]["text"], json!(g.text), "choice {i}");
    }
    // Each later choice takes the full blocks before the prompt's last token (both of them
    // when the three are taken together, as the server submits them; at least one even if the
    // machine stalled the handler between two submissions), and every prompt position is
    // either computed or shared.
    let per_choice = (4 * ((prompt.len() - 1) / 4)) as u64;
    let shared = stats.shared.load(Ordering::Relaxed);
    assert!(
        shared == 2 * per_choice || shared == per_choice,
        "shared {shared}, per choice {per_choice}"
    );
    assert_eq!(
        stats.prefilled.load(Ordering::Relaxed) + shared,
        3 * prompt.len() as u64
    );
    eventually("the blocks come back", || {
        stats.free_kv_blocks.load(Ordering::Relaxed) == stats.kv_blocks.load(Ordering::Relaxed)
    })
    .await;
}

/// A prompt sent again after the first request finished takes its full blocks from the prefix
/// cache (the counters say how many positions), and the answer is still the engine's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_prompt_is_taken_from_the_prefix_cache() {
    let (app, stats) = served(ServerOptions {
        max_batch: 2,
        kv_block_size: 4,
        ..ServerOptions::default()
    });
    let text = "the cat sat on the mat and looked at the dog";
    let body = json!({"prompt": text, "max_tokens": 6, "temperature": 0});
    let prompt = engine().tokenizer().encode(text, false, true);
    let want = engine()
        .generate(
            &prompt,
            &SamplingParams {
                max_tokens: 6,
                ..Default::default()
            },
            &mut |_| true,
        )
        .unwrap();
    for round in 0..2 {
        let (s, out) = call(&app, "POST", COMPL, &body.to_string()).await;
        assert_eq!(s, StatusCode::OK, "{out}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["choices"][0]["text"], json!(want.text), "round {round}");
    }
    let per_request = (4 * ((prompt.len() - 1) / 4)) as u64;
    assert!(per_request >= 8, "the prompt must span several blocks");
    assert_eq!(stats.cached.load(Ordering::Relaxed), per_request);
    assert_eq!(stats.shared.load(Ordering::Relaxed), per_request);
    eventually("the blocks come back, cached", || {
        stats.cached_kv_blocks.load(Ordering::Relaxed) > 0
            && stats.free_kv_blocks.load(Ordering::Relaxed)
                == stats.kv_blocks.load(Ordering::Relaxed)
    })
    .await;
}

/// `cache_salt` scopes the prefix cache: a repeated prompt with another salt (or none) is
/// computed again, with its own salt it is taken from the cache; an empty salt is a 400.
#[tokio::test]
async fn cache_salt_keeps_cached_prefixes_apart() {
    let (app, stats) = served(ServerOptions {
        max_batch: 2,
        kv_block_size: 4,
        ..ServerOptions::default()
    });
    let text = "the cat sat on the mat and looked at the dog";
    let prompt = engine().tokenizer().encode(text, false, true);
    let per_request = (4 * ((prompt.len() - 1) / 4)) as u64;
    assert!(per_request >= 8, "the prompt must span several blocks");
    let body = |salt: Option<&str>| {
        let mut b = json!({"prompt": text, "max_tokens": 3, "temperature": 0});
        if let Some(s) = salt {
            b["cache_salt"] = json!(s);
        }
        b.to_string()
    };
    let mut texts = Vec::new();
    // (salt, prompt tokens taken from the cache in all after the request)
    for (salt, cached) in [
        (Some("tenant-a"), 0),
        (Some("tenant-b"), 0),
        (None, 0),
        (Some("tenant-a"), per_request),
        (None, 2 * per_request),
        (Some("tenant-b"), 3 * per_request),
    ] {
        let (s, out) = call(&app, "POST", COMPL, &body(salt)).await;
        assert_eq!(s, StatusCode::OK, "{out}");
        let v: Value = serde_json::from_str(&out).unwrap();
        texts.push(v["choices"][0]["text"].clone());
        assert_eq!(
            stats.cached.load(Ordering::Relaxed),
            cached,
            "after salt {salt:?}"
        );
    }
    assert!(texts.windows(2).all(|w| w[0] == w[1]), "{texts:?}");
    let (s, out) = call(&app, "POST", COMPL, &body(Some(""))).await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{out}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"]["param"], json!("cache_salt"), "{out}");
}
