//! OpenAI-compatible HTTP API as an axum [`Router`] (to be merged into the guest agent's server).
//!
//! Endpoints: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`, with
//! `stream: true` served as server-sent events (`data: {chunk}` lines, then `data: [DONE]`).
//!
//! **No silent drops**: every request field is listed in [`CHAT_FIELDS`] or
//! [`COMPLETION_FIELDS`] as honoured, accepted only with the value that asks for nothing
//! (`tools: []`), accepted and ignored because it cannot change the output (`user`), or
//! rejected; a field in neither list is rejected too. A rejected field, a value of the wrong
//! type or out of range gets a 400 whose `param` names the field and whose message says what is
//! supported. The table with the reasons is in `inference/README.md` (a test keeps it in step).
//!
//! **Continuous batching**: one model runs on one dedicated thread, driven by a
//! [`crate::scheduler::Scheduler`]: requests join and leave the running batch at every step
//! (up to [`ServerOptions::max_batch`] sequences, within a KV budget fixed at start), long
//! prompts are prefilled in chunks between decode steps, and every sequence samples with its own
//! parameters, constraint and seed through the same [`crate::continuation::Continuation`] the
//! single-sequence engine uses, so a request gets the same output whatever else is running.
//! `n` > 1 choices run as n sequences of the batch; choice i uses the seed
//! [`crate::sampling::derive_seed`]`(seed, i)`; on a paged model (both backends' batch models)
//! the later choices share the first one's prompt KV blocks instead of computing them again.
//! Greedy and temperature + top-p requests are sampled inside the model where it can (on the
//! GPU: only token ids cross to the host); the others on the host, with the same result.
//!
//! **Back-pressure**: requests wait for a free sequence slot in a bounded queue
//! ([`ServerOptions::queue_depth`] beyond the free slots). When it is full the server answers
//! 429 at once, with a `Retry-After` header (seconds) estimated from the running sequences,
//! instead of piling up work; a request that can never fit the KV budget gets a 400
//! (`context_length_exceeded`). A client that disconnects cancels its request: its sequence
//! leaves the batch at the next step and its KV blocks are freed. Every error is JSON in
//! OpenAI's shape `{"error": {"message", "type", "param", "code"}}`; the server keeps serving
//! after bad requests, and one request's failure does not end the others'.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::{Stream, StreamExt};
use serde_json::{Map, Value, json};
use tokio::sync::{mpsc, oneshot};

use crate::engine::{Engine, FinishReason, GeneratedToken, Generation};
use crate::error::InferenceError;
use crate::grammar::{Grammar, Matcher, TokenConstraint, VocabIndex};
use crate::sampling::{SamplingParams, derive_seed};
use crate::scheduler::{self, BatchModel, RequestHandle, Scheduler, SchedulerConfig, SubmitError};
use crate::tokenizer::Tokenizer;

#[cfg(test)]
mod batch_tests;
mod request;
#[cfg(test)]
mod structured_tests;
#[cfg(test)]
mod tests;
mod tools;

use request::{Api, Parsed, ToolOut, parse_body, parse_chat, parse_completion};
pub use request::{CHAT_FIELDS, COMPLETION_FIELDS, FieldSupport, MAX_N, MAX_STOP};
pub use tools::{MAX_PARALLEL_CALLS, MAX_TOOLS};

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The model id clients must name (also listed by `/v1/models`).
    pub model_name: String,
    /// Sequences (choices) that may wait for a slot beyond the free ones; more get 429.
    pub queue_depth: usize,
    /// `max_tokens` when the request gives none.
    pub default_max_tokens: usize,
    /// Sequences decoded together (the backend's KV slots); a backend without batching runs
    /// one at a time whatever this says.
    pub max_batch: usize,
    /// Token positions per KV block.
    pub kv_block_size: usize,
    /// KV blocks in the budget; `None`: enough for every slot at the full context.
    pub kv_blocks: Option<usize>,
    /// Prompt tokens prefilled per step over all sequences (the rest waits for later steps).
    pub prefill_chunk: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            model_name: "smollm2-135m-instruct".into(),
            queue_depth: 64,
            default_max_tokens: 256,
            max_batch: 4,
            kv_block_size: 16,
            kv_blocks: None,
            prefill_chunk: 256,
        }
    }
}

/// An OpenAI-shaped error response.
#[derive(Debug, Clone)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    code: Option<&'static str>,
    param: Option<String>,
    /// `Retry-After` seconds (429).
    retry_after: Option<u64>,
}

impl ApiError {
    fn bad(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            code: None,
            param: param.map(str::to_owned),
            retry_after: None,
        }
    }
    /// A 400 about `field`, with OpenAI's `code` for such errors.
    fn field(field: &str, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code: Some(code),
            ..Self::bad(message, Some(field))
        }
    }
    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            r.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs),
            );
        }
        r
    }
}

enum JobEvent {
    Piece {
        choice: usize,
        text: String,
        tokens: Vec<GeneratedToken>,
    },
    Done {
        choice: usize,
        result: Result<Generation, InferenceError>,
    },
}

/// A sequence for the scheduler thread, answered with its handle or why it was refused.
struct Cmd {
    req: scheduler::Request,
    constraint: Option<Box<dyn TokenConstraint>>,
    scope: scheduler::CacheScope,
    reply: oneshot::Sender<Result<RequestHandle, SubmitError>>,
}

struct Inner {
    opts: ServerOptions,
    tokenizer: Arc<Tokenizer>,
    /// The vocabulary as constrained decoding sees it (built once).
    vocab: Arc<VocabIndex>,
    /// Recently compiled grammars by schema / tool set (see `request::cached_grammar`).
    grammars: std::sync::Mutex<Vec<(String, Arc<Grammar>)>>,
    max_context: usize,
    cmds: mpsc::Sender<Cmd>,
    next_id: AtomicU64,
}

type AppState = Arc<Inner>;

/// Live counters of a server's scheduler, updated after every step.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Sequences in the running batch.
    pub running: AtomicUsize,
    /// Sequences waiting for a slot.
    pub waiting: AtomicUsize,
    /// KV blocks not held by any sequence (free, or cached and reclaimable).
    pub free_kv_blocks: AtomicUsize,
    /// Of those, blocks the prefix cache keeps from ended sequences.
    pub cached_kv_blocks: AtomicUsize,
    /// KV blocks in the budget.
    pub kv_blocks: AtomicUsize,
    /// Most sequences the backend runs together.
    pub slots: AtomicUsize,
    /// Steps run.
    pub steps: AtomicU64,
    /// Decode tokens computed (one per decoding sequence per step).
    pub decoded: AtomicU64,
    /// Prompt tokens computed.
    pub prefilled: AtomicU64,
    /// Prompt tokens taken from another sequence's blocks instead (shared prefixes).
    pub shared: AtomicU64,
    /// Of those, prompt tokens taken from the prefix cache (blocks of ended sequences).
    pub cached: AtomicU64,
    /// Sequences that ended (finished, cancelled or failed).
    pub ended: AtomicU64,
    /// Of those, sequences whose client went away.
    pub cancelled: AtomicU64,
}

/// Builds the router; the engine moves to a dedicated scheduler thread that lives as long as
/// the router (and its clones) do. Fails when the backend cannot allocate the batch (its KV
/// budget); lower [`ServerOptions::max_batch`] or [`ServerOptions::kv_blocks`].
pub fn router(engine: Engine, opts: ServerOptions) -> Result<Router, InferenceError> {
    Ok(serve(engine, opts)?.0)
}

/// The scheduler settings `opts` give for a model of `max_context` positions.
pub fn scheduler_config(opts: &ServerOptions, max_context: usize) -> SchedulerConfig {
    let block = opts.kv_block_size.max(1);
    SchedulerConfig {
        block_size: block,
        kv_blocks: opts
            .kv_blocks
            .unwrap_or_else(|| opts.max_batch.max(1) * max_context.div_ceil(block))
            .max(1),
        prefill_chunk: opts.prefill_chunk.max(1),
        max_queued: opts.queue_depth,
    }
}

/// [`router`], and the scheduler's live counters.
pub fn serve(
    engine: Engine,
    opts: ServerOptions,
) -> Result<(Router, Arc<ServerStats>), InferenceError> {
    let cfg = scheduler_config(&opts, engine.max_context());
    let (model, tokenizer) = engine.into_batch_model(opts.max_batch.max(1), &cfg)?;
    Ok(serve_model(model, tokenizer, opts))
}

/// [`serve`] over any [`BatchModel`] and its tokenizer.
pub fn serve_model(
    model: Box<dyn BatchModel>,
    tokenizer: Arc<Tokenizer>,
    opts: ServerOptions,
) -> (Router, Arc<ServerStats>) {
    let vocab = Arc::new(VocabIndex::from_tokenizer(&tokenizer));
    let max_context = model.max_context();
    let cfg = scheduler_config(&opts, max_context);
    let stats = Arc::new(ServerStats::default());
    stats.slots.store(model.slots(), Ordering::Relaxed);
    let sched = Scheduler::new(model, tokenizer.clone(), cfg);
    stats
        .kv_blocks
        .store(sched.total_blocks(), Ordering::Relaxed);
    stats
        .free_kv_blocks
        .store(sched.free_blocks(), Ordering::Relaxed);
    // Submissions wait at most one step for the scheduler thread; the bound only keeps a
    // flood of them from piling up in memory (the scheduler's own queue bound answers 429).
    let (tx, rx) = mpsc::channel::<Cmd>(opts.queue_depth.max(1) + 256);
    let inner = Arc::new(Inner {
        vocab,
        grammars: std::sync::Mutex::new(Vec::new()),
        tokenizer,
        max_context,
        opts,
        cmds: tx,
        next_id: AtomicU64::new(1),
    });
    let spawned = std::thread::Builder::new()
        .name("inference-scheduler".into())
        .spawn({
            let stats = stats.clone();
            move || run_scheduler(sched, rx, &stats)
        });
    if let Err(e) = spawned {
        // Without the thread every request fails with 503 (the command channel is closed).
        eprintln!("inference: cannot start the scheduler thread: {e}");
    }
    let r = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .with_state(inner);
    (r, stats)
}

/// The scheduler thread: takes submissions between steps, steps while anything runs or waits,
/// sleeps on the channel when idle, and ends when the router is gone and the work is done.
fn run_scheduler(
    mut sched: Scheduler<Box<dyn BatchModel>>,
    mut rx: mpsc::Receiver<Cmd>,
    stats: &ServerStats,
) {
    let take = |sched: &mut Scheduler<Box<dyn BatchModel>>, c: Cmd| {
        let r = sched.submit_scoped(c.req, c.constraint, c.scope);
        // The client may be gone already; dropping its handle cancels the request.
        let _ = c.reply.send(r);
    };
    let mut open = true;
    loop {
        if sched.is_idle() {
            if !open {
                return;
            }
            match rx.blocking_recv() {
                Some(c) => take(&mut sched, c),
                None => return,
            }
        }
        loop {
            match rx.try_recv() {
                Ok(c) => take(&mut sched, c),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        match sched.step() {
            Ok(r) => {
                stats.steps.fetch_add(1, Ordering::Relaxed);
                stats.decoded.fetch_add(r.decoded as u64, Ordering::Relaxed);
                stats
                    .prefilled
                    .fetch_add(r.prefilled as u64, Ordering::Relaxed);
                stats.shared.fetch_add(r.shared as u64, Ordering::Relaxed);
                stats.cached.fetch_add(r.cached as u64, Ordering::Relaxed);
                stats.ended.fetch_add(r.ended as u64, Ordering::Relaxed);
                stats
                    .cancelled
                    .fetch_add(r.cancelled as u64, Ordering::Relaxed);
            }
            // The step's requests got `Event::Failed` (a 500 or an error event); the others
            // and later requests go on.
            Err(e) => eprintln!("inference: a batch step failed: {e}"),
        }
        stats.running.store(sched.running(), Ordering::Relaxed);
        stats.waiting.store(sched.waiting(), Ordering::Relaxed);
        stats
            .free_kv_blocks
            .store(sched.free_blocks(), Ordering::Relaxed);
        stats
            .cached_kv_blocks
            .store(sched.cached_blocks(), Ordering::Relaxed);
    }
}

async fn models(State(st): State<AppState>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{"id": st.opts.model_name, "object": "model", "created": 0, "owned_by": "confidential-worker"}]
    }))
    .into_response()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop | FinishReason::Cancelled => "stop",
        FinishReason::Length => "length",
    }
}

fn gen_error(e: &InferenceError) -> ApiError {
    match e {
        InferenceError::ContextOverflow { .. } => ApiError {
            status: StatusCode::BAD_REQUEST,
            message: e.to_string(),
            kind: "invalid_request_error",
            code: Some("context_length_exceeded"),
            param: None,
            retry_after: None,
        },
        _ => ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!("inference failed: {e}"),
            kind: "server_error",
            code: None,
            param: None,
            retry_after: None,
        },
    }
}

fn worker_gone() -> ApiError {
    gen_error(&InferenceError::Backend {
        backend: "worker".into(),
        message: "the worker stopped".into(),
    })
}

fn submit_error(e: SubmitError) -> ApiError {
    match e {
        SubmitError::TooLarge { .. } => ApiError {
            status: StatusCode::BAD_REQUEST,
            message: e.to_string(),
            kind: "invalid_request_error",
            code: Some("context_length_exceeded"),
            param: Some("max_tokens".into()),
            retry_after: None,
        },
        SubmitError::Invalid(_) => ApiError::bad(e.to_string(), None),
        SubmitError::Busy { retry_after, .. } => ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!("{e}; retry later"),
            kind: "rate_limit_error",
            code: Some("queue_full"),
            param: None,
            retry_after: Some(retry_after.as_secs().max(1)),
        },
    }
}

fn scheduler_gone() -> ApiError {
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: "the inference scheduler is not running; restart the service".into(),
        kind: "server_error",
        code: None,
        param: None,
        retry_after: None,
    }
}

/// Submits the `n` choices of a request as `n` sequences (choice i with the derived seed i),
/// all before awaiting any answer so the scheduler takes them in one step (the later choices
/// then share the first one's prompt blocks on a paged model), and returns their events,
/// choice after choice. If one choice is refused, the others are cancelled (their handles
/// dropped) and the refusal is the answer.
async fn submit(
    st: &Inner,
    prompt: Vec<u32>,
    params: SamplingParams,
    n: usize,
    grammar: Option<Arc<Grammar>>,
    scope: scheduler::CacheScope,
) -> Result<JobEvents, ApiError> {
    let mut answers = Vec::with_capacity(n);
    for choice in 0..n {
        let (reply, answer) = oneshot::channel();
        let cmd = Cmd {
            req: scheduler::Request {
                prompt: prompt.clone(),
                params: SamplingParams {
                    seed: derive_seed(params.seed, choice),
                    ..params.clone()
                },
            },
            constraint: grammar
                .clone()
                .map(|g| Box::new(Matcher::new(g)) as Box<dyn TokenConstraint>),
            scope,
            reply,
        };
        match st.cmds.try_send(cmd) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                return Err(submit_error(SubmitError::Busy {
                    queued: st.opts.queue_depth,
                    retry_after: std::time::Duration::from_secs(1),
                }));
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Err(scheduler_gone()),
        }
        answers.push(answer);
    }
    // An early return drops the remaining receivers: the scheduler thread's reply then fails
    // and it drops (cancels) those handles itself.
    let mut handles = Vec::with_capacity(n);
    for answer in answers {
        match answer.await {
            Ok(Ok(h)) => handles.push(h),
            Ok(Err(e)) => return Err(submit_error(e)),
            Err(_) => return Err(scheduler_gone()),
        }
    }
    let events =
        futures_util::stream::iter(handles.into_iter().enumerate()).flat_map(|(choice, h)| {
            futures_util::stream::unfold(Some(h), move |h| async move {
                let mut h = h?;
                let ev = match h.recv().await {
                    Some(scheduler::Event::Piece { text, tokens }) => {
                        return Some((
                            JobEvent::Piece {
                                choice,
                                text,
                                tokens,
                            },
                            Some(h),
                        ));
                    }
                    Some(scheduler::Event::Finished(g)) => JobEvent::Done {
                        choice,
                        result: Ok(g),
                    },
                    Some(scheduler::Event::Failed(message)) => JobEvent::Done {
                        choice,
                        result: Err(InferenceError::Backend {
                            backend: "scheduler".into(),
                            message,
                        }),
                    },
                    None => JobEvent::Done {
                        choice,
                        result: Err(InferenceError::Backend {
                            backend: "scheduler".into(),
                            message: "the scheduler stopped".into(),
                        }),
                    },
                };
                Some((ev, None))
            })
        });
    Ok(Box::pin(events))
}

/// A response's events, choice after choice (the choices themselves run concurrently).
type JobEvents = Pin<Box<dyn Stream<Item = JobEvent> + Send>>;

async fn chat_completions(
    State(st): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = async {
        let parsed = parse_chat(&st, parse_body(body)?)?;
        respond(&st, Api::Chat, parsed).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(st): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let run = async {
        let parsed = parse_completion(&st, parse_body(body)?)?;
        respond(&st, Api::Completion, parsed).await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// OpenAI's stand-in for a logprob of minus infinity.
fn finite(lp: f32) -> f32 {
    if lp.is_finite() { lp } else { -9999.0 }
}

/// How one response is shaped (shared by its chunks).
struct Shape {
    api: Api,
    id: String,
    created: u64,
    model: String,
    tokenizer: Arc<Tokenizer>,
    logprobs: bool,
    echo: Option<String>,
    include_usage: bool,
    /// Tool calls are parsed out of the answers.
    tools: Option<ToolOut>,
    serial: u64,
}

/// An OpenAI tool call object (`index` for stream deltas).
fn tool_call_json(id: &str, call: &tools::ToolCall, index: Option<usize>) -> Value {
    let mut v = json!({"id": id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}});
    if let Some(i) = index {
        v["index"] = json!(i);
    }
    v
}

impl Shape {
    fn call_id(&self, choice: usize, i: usize) -> String {
        format!("call_{}_{choice}_{i}", self.serial)
    }

    /// A token's text (control tokens by name) and its bytes.
    fn token(&self, id: u32) -> (String, Vec<u8>) {
        let mut b = Vec::new();
        self.tokenizer.token_bytes(id, true, &mut b);
        (String::from_utf8_lossy(&b).into_owned(), b)
    }

    /// Chat: `{"content": [{token, logprob, bytes, top_logprobs}], "refusal": null}`.
    fn chat_logprobs(&self, tokens: &[GeneratedToken]) -> Value {
        let entry = |id: u32, lp: f32| {
            let (token, bytes) = self.token(id);
            json!({"token": token, "logprob": finite(lp), "bytes": bytes})
        };
        let content: Vec<Value> = tokens
            .iter()
            .filter_map(|t| t.logprob.as_ref())
            .map(|lp| {
                let mut e = entry(lp.id, lp.logprob);
                e["top_logprobs"] = lp.top.iter().map(|&(i, l)| entry(i, l)).collect();
                e
            })
            .collect();
        json!({"content": content, "refusal": null})
    }

    /// Completions: `{tokens, token_logprobs, top_logprobs, text_offset}`; `top_logprobs` maps
    /// token text to logprob and holds the k most likely plus the chosen token.
    fn completion_logprobs(&self, tokens: &[GeneratedToken]) -> Value {
        let base = self.echo.as_ref().map_or(0, |e| e.chars().count());
        let mut out_tokens = Vec::new();
        let mut token_logprobs = Vec::new();
        let mut top_logprobs = Vec::new();
        let mut offsets = Vec::new();
        for t in tokens {
            let Some(lp) = &t.logprob else { continue };
            let (text, _) = self.token(lp.id);
            let mut top = Map::new();
            for &(i, l) in &lp.top {
                top.entry(self.token(i).0).or_insert(json!(finite(l)));
            }
            top.entry(text.clone()).or_insert(json!(finite(lp.logprob)));
            out_tokens.push(json!(text));
            token_logprobs.push(json!(finite(lp.logprob)));
            top_logprobs.push(Value::Object(top));
            offsets.push(json!(base + t.text_offset));
        }
        json!({"tokens": out_tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets})
    }

    fn logprobs_value(&self, tokens: &[GeneratedToken]) -> Value {
        match (self.logprobs, self.api) {
            (false, _) => Value::Null,
            (true, Api::Chat) => self.chat_logprobs(tokens),
            (true, Api::Completion) => self.completion_logprobs(tokens),
        }
    }

    /// One choice of a non-streamed response.
    fn full_choice(&self, index: usize, g: &Generation) -> Value {
        let mut finish = finish_str(g.finish_reason);
        let logprobs = self.logprobs_value(&g.logprobs);
        match self.api {
            Api::Chat => {
                let mut message = json!({"role": "assistant", "content": g.text, "refusal": null});
                if let Some(t) = &self.tools {
                    let (content, calls) = tools::parse_output(&t.format, &t.names, &g.text);
                    if !calls.is_empty() {
                        message["content"] = json!(content);
                        message["tool_calls"] = calls
                            .iter()
                            .enumerate()
                            .map(|(i, c)| tool_call_json(&self.call_id(index, i), c, None))
                            .collect();
                        if g.finish_reason == FinishReason::Stop {
                            finish = "tool_calls";
                        }
                    }
                }
                json!({"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish})
            }
            Api::Completion => {
                let text = match &self.echo {
                    Some(p) => format!("{p}{}", g.text),
                    None => g.text.clone(),
                };
                json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish})
            }
        }
    }

    fn chunk(&self, choices: Vec<Value>) -> Event {
        let object = match self.api {
            Api::Chat => "chat.completion.chunk",
            Api::Completion => "text_completion",
        };
        let mut v = json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": choices});
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        Event::default().data(v.to_string())
    }

    /// The first chunk of a choice, if it has one (chat: the role; completions: the echo).
    fn start(&self, index: usize) -> Option<Event> {
        match (self.api, &self.echo) {
            (Api::Chat, _) => Some(self.chunk(vec![
                json!({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}),
            ])),
            (Api::Completion, Some(p)) => Some(self.chunk(vec![
                json!({"index": index, "text": p, "logprobs": null, "finish_reason": null}),
            ])),
            (Api::Completion, None) => None,
        }
    }

    fn piece(&self, index: usize, text: &str, tokens: &[GeneratedToken]) -> Option<Event> {
        if text.is_empty() && !(self.logprobs && tokens.iter().any(|t| t.logprob.is_some())) {
            return None;
        }
        let logprobs = self.logprobs_value(tokens);
        Some(self.chunk(vec![match self.api {
            Api::Chat => {
                json!({"index": index, "delta": {"content": text}, "logprobs": logprobs, "finish_reason": null})
            }
            Api::Completion => {
                json!({"index": index, "text": text, "logprobs": logprobs, "finish_reason": null})
            }
        }]))
    }

    /// Stream chunks of a finished tool-call answer: one `delta.tool_calls` chunk per call
    /// (the held tokens' logprobs ride on the first).
    fn tool_call_chunks(
        &self,
        index: usize,
        calls: &[tools::ToolCall],
        tokens: &[GeneratedToken],
    ) -> Vec<Event> {
        calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let logprobs = if i == 0 {
                    self.logprobs_value(tokens)
                } else {
                    Value::Null
                };
                self.chunk(vec![json!({"index": index, "delta": {"tool_calls": [tool_call_json(&self.call_id(index, i), c, Some(i))]}, "logprobs": logprobs, "finish_reason": null})])
            })
            .collect()
    }

    fn finish_with(&self, index: usize, reason: &str) -> Event {
        self.chunk(vec![match self.api {
            Api::Chat => {
                json!({"index": index, "delta": {}, "logprobs": null, "finish_reason": reason})
            }
            Api::Completion => {
                json!({"index": index, "text": "", "logprobs": null, "finish_reason": reason})
            }
        }])
    }

    /// `stream_options.include_usage`: the last chunk, with usage and no choices.
    fn usage_chunk(&self, usage: Value) -> Event {
        let object = match self.api {
            Api::Chat => "chat.completion.chunk",
            Api::Completion => "text_completion",
        };
        Event::default().data(
            json!({"id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [], "usage": usage})
                .to_string(),
        )
    }
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens})
}

/// State of one streamed response.
struct StreamState {
    rx: JobEvents,
    shape: Arc<Shape>,
    n: usize,
    prompt_tokens: usize,
    completion_tokens: usize,
    /// With tools: the current choice's hold-back and the tokens it holds.
    tool_stream: Option<(tools::ToolStream, Vec<GeneratedToken>)>,
}

impl StreamState {
    /// The events for one job event, and whether the stream goes on.
    fn events(&mut self, ev: JobEvent) -> (Vec<Event>, bool) {
        let sh = &self.shape;
        match ev {
            JobEvent::Piece {
                choice,
                text,
                tokens,
            } => match (&mut self.tool_stream, &sh.tools) {
                (Some((ts, held)), Some(_)) => {
                    held.extend(tokens);
                    let out = ts.push(&text);
                    if out.is_empty() {
                        return (Vec::new(), true);
                    }
                    let toks = std::mem::take(held);
                    (sh.piece(choice, &out, &toks).into_iter().collect(), true)
                }
                _ => (sh.piece(choice, &text, &tokens).into_iter().collect(), true),
            },
            JobEvent::Done {
                choice,
                result: Ok(g),
            } => {
                self.prompt_tokens = g.prompt_tokens;
                self.completion_tokens += g.tokens.len();
                let mut out = Vec::new();
                let mut reason = finish_str(g.finish_reason);
                if let (Some((ts, held)), Some(t)) = (&mut self.tool_stream, &sh.tools) {
                    let (rest, calls) = ts.finish(&t.names);
                    let toks = std::mem::take(held);
                    if calls.is_empty() {
                        out.extend(sh.piece(choice, &rest, &toks));
                    } else {
                        out.extend(sh.tool_call_chunks(choice, &calls, &toks));
                        if g.finish_reason == FinishReason::Stop {
                            reason = "tool_calls";
                        }
                    }
                    *ts = tools::ToolStream::new(t.format.clone());
                }
                out.push(sh.finish_with(choice, reason));
                if choice + 1 < self.n && g.finish_reason != FinishReason::Cancelled {
                    out.extend(sh.start(choice + 1));
                    return (out, true);
                }
                if sh.include_usage {
                    out.push(sh.usage_chunk(usage(self.prompt_tokens, self.completion_tokens)));
                }
                out.push(Event::default().data("[DONE]"));
                (out, false)
            }
            JobEvent::Done { result: Err(e), .. } => (
                vec![
                    Event::default().data(gen_error(&e).body().to_string()),
                    Event::default().data("[DONE]"),
                ],
                false,
            ),
        }
    }
}

async fn respond(st: &Inner, api: Api, req: Parsed) -> Result<Response, ApiError> {
    let serial = st.next_id.fetch_add(1, Ordering::Relaxed);
    let (id, object) = match api {
        Api::Chat => (format!("chatcmpl-{serial}"), "chat.completion"),
        Api::Completion => (format!("cmpl-{serial}"), "text_completion"),
    };
    let shape = Arc::new(Shape {
        api,
        id,
        created: now(),
        model: st.opts.model_name.clone(),
        tokenizer: st.tokenizer.clone(),
        logprobs: req.params.logprobs.is_some(),
        echo: req.echo,
        include_usage: req.include_usage,
        tools: req.tools,
        serial,
    });
    let n = req.n;
    let prompt_tokens = req.prompt.len();
    let mut rx = submit(st, req.prompt, req.params, n, req.grammar, req.scope).await?;
    if !req.stream {
        let mut choices = Vec::with_capacity(n);
        let mut completion_tokens = 0;
        while choices.len() < n {
            match rx.next().await {
                Some(JobEvent::Piece { .. }) => {}
                Some(JobEvent::Done { choice, result }) => {
                    let g = result.map_err(|e| gen_error(&e))?;
                    completion_tokens += g.tokens.len();
                    choices.push(shape.full_choice(choice, &g));
                }
                None => return Err(worker_gone()),
            }
        }
        return Ok(axum::Json(json!({
            "id": shape.id, "object": object, "created": shape.created, "model": shape.model,
            "choices": choices, "usage": usage(prompt_tokens, completion_tokens),
        }))
        .into_response());
    }
    let first: Vec<Event> = shape.start(0).into_iter().collect();
    let tool_stream = shape
        .tools
        .as_ref()
        .map(|t| (tools::ToolStream::new(t.format.clone()), Vec::new()));
    let state = StreamState {
        rx,
        shape,
        n,
        prompt_tokens,
        completion_tokens: 0,
        tool_stream,
    };
    let events = futures_util::stream::unfold(Some(state), |state| async move {
        let mut state = state?;
        let ev = state.rx.next().await?;
        let (out, more) = state.events(ev);
        Some((out, more.then_some(state)))
    });
    let stream = futures_util::stream::iter(first)
        .chain(events.flat_map(futures_util::stream::iter))
        .map(Ok::<Event, std::convert::Infallible>);
    Ok(Sse::new(stream).into_response())
}
