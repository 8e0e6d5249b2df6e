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
//! Sampling (see [`crate::sampling`] for the order of the steps) runs on the host for every
//! backend (each returns raw logits from `Backend::forward`), so the CPU and CUDA backends honour
//! the same fields. `n` > 1 choices are generated one after another on the one sequence; each
//! reuses the prompt's KV cache (only the prompt's last token is recomputed) and choice i uses
//! the seed [`crate::sampling::derive_seed`]`(seed, i)`.
//!
//! One model runs on one dedicated thread; requests wait in a bounded queue
//! ([`ServerOptions::queue_depth`]). When it is full the server answers 429 at once instead of
//! piling up work. Every error is JSON in OpenAI's shape
//! `{"error": {"message", "type", "param", "code"}}`; the server keeps serving after bad requests.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use crate::engine::{Engine, FinishReason, GeneratedToken, Generation};
use crate::error::InferenceError;
use crate::grammar::{Grammar, Matcher, TokenConstraint, VocabIndex};
use crate::sampling::{SamplingParams, derive_seed};
use crate::tokenizer::Tokenizer;

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
    /// Requests that may wait while one is running; more get 429.
    pub queue_depth: usize,
    /// `max_tokens` when the request gives none.
    pub default_max_tokens: usize,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            model_name: "smollm2-135m-instruct".into(),
            queue_depth: 8,
            default_max_tokens: 256,
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
}

impl ApiError {
    fn bad(message: impl Into<String>, param: Option<&str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            code: None,
            param: param.map(str::to_owned),
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
        (self.status, axum::Json(self.body())).into_response()
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

struct Job {
    prompt: Vec<u32>,
    params: SamplingParams,
    n: usize,
    grammar: Option<Arc<Grammar>>,
    events: mpsc::UnboundedSender<JobEvent>,
}

struct Inner {
    opts: ServerOptions,
    tokenizer: Arc<Tokenizer>,
    /// The vocabulary as constrained decoding sees it (built once).
    vocab: Arc<VocabIndex>,
    /// Recently compiled grammars by schema / tool set (see `request::cached_grammar`).
    grammars: std::sync::Mutex<Vec<(String, Arc<Grammar>)>>,
    max_context: usize,
    jobs: mpsc::Sender<Job>,
    next_id: AtomicU64,
}

type AppState = Arc<Inner>;

/// Builds the router; the engine moves to a dedicated worker thread that lives as long as the
/// router (and its clones) do.
pub fn router(engine: Engine, opts: ServerOptions) -> Router {
    let (tx, rx) = mpsc::channel::<Job>(opts.queue_depth.max(1));
    let inner = Arc::new(Inner {
        vocab: Arc::new(VocabIndex::from_tokenizer(engine.tokenizer())),
        grammars: std::sync::Mutex::new(Vec::new()),
        tokenizer: engine.tokenizer().clone(),
        max_context: engine.max_context(),
        opts,
        jobs: tx,
        next_id: AtomicU64::new(1),
    });
    let spawned = std::thread::Builder::new()
        .name("inference-worker".into())
        .spawn(move || worker(engine, rx));
    if let Err(e) = spawned {
        // Without a worker every request fails with 503 (the job channel is closed).
        eprintln!("inference: cannot start the worker thread: {e}");
    }
    Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .with_state(inner)
}

/// Runs the jobs one at a time; a job's `n` choices run one after another (the engine's prefix
/// reuse keeps the prompt's KV cache between them).
fn worker(mut engine: Engine, mut rx: mpsc::Receiver<Job>) {
    while let Some(job) = rx.blocking_recv() {
        for choice in 0..job.n {
            if job.events.is_closed() {
                break;
            }
            let params = SamplingParams {
                seed: derive_seed(job.params.seed, choice),
                ..job.params.clone()
            };
            let events = job.events.clone();
            let mut matcher = job.grammar.clone().map(Matcher::new);
            let constraint = matcher.as_mut().map(|m| m as &mut dyn TokenConstraint);
            let result = engine.generate_constrained(&job.prompt, &params, constraint, &mut |p| {
                events
                    .send(JobEvent::Piece {
                        choice,
                        text: p.text.to_owned(),
                        tokens: p.tokens.to_vec(),
                    })
                    .is_ok()
            });
            let stop = match &result {
                Ok(g) => g.finish_reason == FinishReason::Cancelled,
                Err(_) => true,
            };
            let _ = job.events.send(JobEvent::Done { choice, result });
            if stop {
                break;
            }
        }
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
        },
        _ => ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!("inference failed: {e}"),
            kind: "server_error",
            code: None,
            param: None,
        },
    }
}

fn worker_gone() -> ApiError {
    gen_error(&InferenceError::Backend {
        backend: "worker".into(),
        message: "the worker stopped".into(),
    })
}

fn submit(
    st: &Inner,
    prompt: Vec<u32>,
    params: SamplingParams,
    n: usize,
    grammar: Option<Arc<Grammar>>,
) -> Result<mpsc::UnboundedReceiver<JobEvent>, ApiError> {
    let (etx, erx) = mpsc::unbounded_channel();
    match st.jobs.try_send(Job {
        prompt,
        params,
        n,
        grammar,
        events: etx,
    }) {
        Ok(()) => Ok(erx),
        Err(mpsc::error::TrySendError::Full(_)) => Err(ApiError {
            status: StatusCode::TOO_MANY_REQUESTS,
            message: format!(
                "the server is busy ({} requests queued); retry later",
                st.opts.queue_depth
            ),
            kind: "rate_limit_error",
            code: Some("queue_full"),
            param: None,
        }),
        Err(mpsc::error::TrySendError::Closed(_)) => Err(ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: "the inference worker is not running; restart the service".into(),
            kind: "server_error",
            code: None,
            param: None,
        }),
    }
}

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
    rx: mpsc::UnboundedReceiver<JobEvent>,
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
    let mut rx = submit(st, req.prompt, req.params, n, req.grammar)?;
    if !req.stream {
        let mut choices = Vec::with_capacity(n);
        let mut completion_tokens = 0;
        while choices.len() < n {
            match rx.recv().await {
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
        let ev = state.rx.recv().await?;
        let (out, more) = state.events(ev);
        Some((out, more.then_some(state)))
    });
    let stream = futures_util::stream::iter(first)
        .chain(events.flat_map(futures_util::stream::iter))
        .map(Ok::<Event, std::convert::Infallible>);
    Ok(Sse::new(stream).into_response())
}
