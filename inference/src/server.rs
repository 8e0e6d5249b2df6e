//! OpenAI-compatible HTTP API as an axum [`Router`] (to be merged into the guest agent's server).
//!
//! Endpoints: `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`, with
//! `stream: true` served as server-sent events (`data: {chunk}` lines, then `data: [DONE]`).
//! Supported fields: `model`, `messages` / `prompt`, `max_tokens` (or `max_completion_tokens`),
//! `temperature` (0..=2, 0 = greedy), `top_p` (0..=1), `seed`, `stop` (string or up to 4 strings),
//! `stream`, `n` (must be 1). Responses carry `usage` (prompt/completion/total tokens).
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
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::engine::{Engine, FinishReason, Generation};
use crate::error::InferenceError;
use crate::sampling::SamplingParams;
use crate::tokenizer::{ChatMessage, Tokenizer};

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
    param: Option<&'static str>,
}

impl ApiError {
    fn bad(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            code: None,
            param,
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
    Text(String),
    Done(Result<Generation, InferenceError>),
}

struct Job {
    prompt: Vec<u32>,
    params: SamplingParams,
    events: mpsc::UnboundedSender<JobEvent>,
}

struct Inner {
    opts: ServerOptions,
    tokenizer: Arc<Tokenizer>,
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

fn worker(mut engine: Engine, mut rx: mpsc::Receiver<Job>) {
    while let Some(job) = rx.blocking_recv() {
        if job.events.is_closed() {
            continue;
        }
        let events = job.events.clone();
        let result = engine.generate(&job.prompt, &job.params, &mut |t| {
            events.send(JobEvent::Text(t.to_owned())).is_ok()
        });
        let _ = job.events.send(JobEvent::Done(result));
    }
}

async fn models(State(st): State<AppState>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{"id": st.opts.model_name, "object": "model", "created": 0, "owned_by": "confidential-worker"}]
    }))
    .into_response()
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StopSpec {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct CommonParams {
    model: Option<String>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    seed: Option<u64>,
    stop: Option<StopSpec>,
    stream: Option<bool>,
    n: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct ChatRequest {
    messages: Vec<RawMessage>,
    #[serde(flatten)]
    common: CommonParams,
}

#[derive(Debug, Deserialize)]
struct RawMessage {
    role: String,
    content: Value,
}

#[derive(Debug, Deserialize)]
struct CompletionRequest {
    prompt: Value,
    #[serde(flatten)]
    common: CommonParams,
}

fn parse_json<T: serde::de::DeserializeOwned>(
    body: Result<Bytes, BytesRejection>,
) -> Result<T, ApiError> {
    let body =
        body.map_err(|e| ApiError::bad(format!("cannot read the request body: {e}"), None))?;
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad(
            format!("request body is not valid JSON for this endpoint: {e}; see the OpenAI API reference for the expected fields"),
            None,
        )
    })
}

fn validate(st: &Inner, c: &CommonParams, prompt_len: usize) -> Result<SamplingParams, ApiError> {
    if let Some(m) = &c.model
        && m != &st.opts.model_name
    {
        return Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "The model `{m}` does not exist; GET /v1/models lists `{}`",
                st.opts.model_name
            ),
            kind: "invalid_request_error",
            code: Some("model_not_found"),
            param: Some("model"),
        });
    }
    if c.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad("only n = 1 is supported", Some("n")));
    }
    let temperature = c.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad(
            "temperature must be between 0 and 2",
            Some("temperature"),
        ));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad("top_p must be in (0, 1]", Some("top_p")));
    }
    let stop = match &c.stop {
        None => vec![],
        Some(StopSpec::One(s)) => vec![s.clone()],
        Some(StopSpec::Many(v)) => v.clone(),
    };
    if stop.len() > 4 {
        return Err(ApiError::bad(
            "at most 4 stop sequences are allowed",
            Some("stop"),
        ));
    }
    if prompt_len >= st.max_context {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            message: format!(
                "This model's maximum context length is {} tokens, but the prompt has {prompt_len} tokens; shorten the prompt",
                st.max_context
            ),
            kind: "invalid_request_error",
            code: Some("context_length_exceeded"),
            param: Some("messages"),
        });
    }
    let room = st.max_context - prompt_len;
    let max_tokens = match c.max_completion_tokens.or(c.max_tokens) {
        Some(0) => {
            return Err(ApiError::bad(
                "max_tokens must be at least 1",
                Some("max_tokens"),
            ));
        }
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX).min(room),
        None => st.opts.default_max_tokens.min(room),
    };
    Ok(SamplingParams {
        temperature,
        top_p,
        seed: c.seed.unwrap_or_else(|| st.next_id.load(Ordering::Relaxed)),
        max_tokens,
        stop,
    })
}

fn content_text(v: &Value) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut s = String::new();
            for p in parts {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => s.push_str(t),
                    _ => {
                        return Err(ApiError::bad(
                            "only text content parts are supported",
                            Some("messages"),
                        ));
                    }
                }
            }
            Ok(s)
        }
        _ => Err(ApiError::bad(
            "message content must be a string or text parts",
            Some("messages"),
        )),
    }
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

fn submit(
    st: &Inner,
    prompt: Vec<u32>,
    params: SamplingParams,
) -> Result<mpsc::UnboundedReceiver<JobEvent>, ApiError> {
    let (etx, erx) = mpsc::unbounded_channel();
    match st.jobs.try_send(Job {
        prompt,
        params,
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

#[derive(Clone, Copy, PartialEq)]
enum Api {
    Chat,
    Completion,
}

async fn chat_completions(
    State(st): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = async {
        let req: ChatRequest = parse_json(body)?;
        if req.messages.is_empty() {
            return Err(ApiError::bad(
                "messages must not be empty",
                Some("messages"),
            ));
        }
        let mut msgs = Vec::with_capacity(req.messages.len());
        for m in &req.messages {
            if !matches!(
                m.role.as_str(),
                "system" | "user" | "assistant" | "developer"
            ) {
                return Err(ApiError::bad(
                    format!("unknown role {:?}", m.role),
                    Some("messages"),
                ));
            }
            let role = if m.role == "developer" {
                "system".into()
            } else {
                m.role.clone()
            };
            msgs.push(ChatMessage {
                role,
                content: content_text(&m.content)?,
            });
        }
        let prompt = st
            .tokenizer
            .encode_chat(&msgs)
            .map_err(|e| ApiError::bad(e.to_string(), Some("messages")))?;
        let params = validate(&st, &req.common, prompt.len())?;
        respond(
            &st,
            Api::Chat,
            prompt,
            params,
            req.common.stream.unwrap_or(false),
        )
        .await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(st): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let run = async {
        let req: CompletionRequest = parse_json(body)?;
        let text = match &req.prompt {
            Value::String(s) => s.clone(),
            Value::Array(a) if a.len() == 1 && a[0].is_string() => {
                a[0].as_str().unwrap_or_default().to_owned()
            }
            _ => return Err(ApiError::bad("prompt must be a string", Some("prompt"))),
        };
        let prompt = st.tokenizer.encode(&text, false, true);
        if prompt.is_empty() {
            return Err(ApiError::bad("prompt must not be empty", Some("prompt")));
        }
        let params = validate(&st, &req.common, prompt.len())?;
        respond(
            &st,
            Api::Completion,
            prompt,
            params,
            req.common.stream.unwrap_or(false),
        )
        .await
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

fn usage(g: &Generation) -> Value {
    let completion = g.tokens.len();
    json!({"prompt_tokens": g.prompt_tokens, "completion_tokens": completion, "total_tokens": g.prompt_tokens + completion})
}

async fn respond(
    st: &Inner,
    api: Api,
    prompt: Vec<u32>,
    params: SamplingParams,
    stream: bool,
) -> Result<Response, ApiError> {
    let serial = st.next_id.fetch_add(1, Ordering::Relaxed);
    let (id, object, chunk_object) = match api {
        Api::Chat => (
            format!("chatcmpl-{serial}"),
            "chat.completion",
            "chat.completion.chunk",
        ),
        Api::Completion => (
            format!("cmpl-{serial}"),
            "text_completion",
            "text_completion",
        ),
    };
    let created = now();
    let model = st.opts.model_name.clone();
    let mut rx = submit(st, prompt, params)?;
    if !stream {
        let mut result = None;
        while let Some(ev) = rx.recv().await {
            if let JobEvent::Done(r) = ev {
                result = Some(r);
                break;
            }
        }
        let g = match result {
            Some(Ok(g)) => g,
            Some(Err(e)) => return Err(gen_error(&e)),
            None => {
                return Err(gen_error(&InferenceError::Backend {
                    backend: "worker".into(),
                    message: "the worker stopped".into(),
                }));
            }
        };
        let choice = match api {
            Api::Chat => {
                json!({"index": 0, "message": {"role": "assistant", "content": g.text}, "finish_reason": finish_str(g.finish_reason)})
            }
            Api::Completion => {
                json!({"index": 0, "text": g.text, "logprobs": null, "finish_reason": finish_str(g.finish_reason)})
            }
        };
        return Ok(axum::Json(json!({
            "id": id, "object": object, "created": created, "model": model,
            "choices": [choice], "usage": usage(&g),
        }))
        .into_response());
    }
    let chunk = move |delta: Value, finish: Option<&str>, extra: Option<Value>| -> Event {
        let choice = match api {
            Api::Chat => json!({"index": 0, "delta": delta, "finish_reason": finish}),
            Api::Completion => {
                json!({"index": 0, "text": delta.get("content").cloned().unwrap_or(Value::String(String::new())), "logprobs": null, "finish_reason": finish})
            }
        };
        let mut v = json!({"id": id, "object": chunk_object, "created": created, "model": model, "choices": [choice]});
        if let Some(u) = extra {
            v["usage"] = u;
        }
        Event::default().data(v.to_string())
    };
    let first = match api {
        Api::Chat => vec![chunk(
            json!({"role": "assistant", "content": ""}),
            None,
            None,
        )],
        Api::Completion => vec![],
    };
    let events = futures_util::stream::unfold(Some(rx), move |state| {
        let chunk = chunk.clone();
        async move {
            let mut rx = state?;
            match rx.recv().await {
                Some(JobEvent::Text(t)) => {
                    Some((vec![chunk(json!({"content": t}), None, None)], Some(rx)))
                }
                Some(JobEvent::Done(Ok(g))) => Some((
                    vec![
                        chunk(
                            json!({}),
                            Some(finish_str(g.finish_reason)),
                            Some(usage(&g)),
                        ),
                        Event::default().data("[DONE]"),
                    ],
                    None,
                )),
                Some(JobEvent::Done(Err(e))) => Some((
                    vec![
                        Event::default().data(gen_error(&e).body().to_string()),
                        Event::default().data("[DONE]"),
                    ],
                    None,
                )),
                None => None,
            }
        }
    });
    let stream = futures_util::stream::iter(first)
        .chain(events.flat_map(futures_util::stream::iter))
        .map(Ok::<Event, std::convert::Infallible>);
    Ok(Sse::new(stream).into_response())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::cpu::CpuOptions;
    use crate::engine::load_cpu_from_bytes;
    use crate::gguf::GgmlType;
    use crate::model::LlamaConfig;
    use crate::synthetic::synthetic_gguf;
    use axum::body::Body;
    use axum::http::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn app(queue: usize) -> Router {
        let bytes = synthetic_gguf(&LlamaConfig::tiny(), GgmlType::Q8_0, 3).unwrap();
        let engine = load_cpu_from_bytes(
            &bytes,
            &CpuOptions {
                threads: 1,
                max_context: 64,
                batch: 16,
            },
        )
        .unwrap();
        router(
            engine,
            ServerOptions {
                model_name: "tiny".into(),
                queue_depth: queue,
                default_max_tokens: 8,
            },
        )
    }

    async fn call(app: &Router, method: &str, path: &str, body: &str) -> (StatusCode, String) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(Body::from(body.to_owned()))
            .unwrap();
        let resp = app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(bytes.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn models_and_chat() {
        let app = app(4);
        let (s, b) = call(&app, "GET", "/v1/models", "").await;
        assert_eq!(s, StatusCode::OK);
        let v: Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["data"][0]["id"], "tiny");
        let (s, b) = call(
            &app,
            "POST",
            "/v1/chat/completions",
            r#"{"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":5,"temperature":0}"#,
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{b}");
        let v: Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        let completion = v["usage"]["completion_tokens"].as_u64().unwrap();
        assert!((1..=5).contains(&completion));
        assert_eq!(
            v["usage"]["total_tokens"].as_u64().unwrap(),
            v["usage"]["prompt_tokens"].as_u64().unwrap() + completion
        );
        // Same request again (greedy) gives the same text.
        let (_, b2) = call(
            &app,
            "POST",
            "/v1/chat/completions",
            r#"{"model":"tiny","messages":[{"role":"user","content":"hi"}],"max_tokens":5,"temperature":0}"#,
        )
        .await;
        let v2: Value = serde_json::from_str(&b2).unwrap();
        assert_eq!(
            v["choices"][0]["message"]["content"],
            v2["choices"][0]["message"]["content"]
        );
    }

    #[tokio::test]
    async fn streaming_matches_non_streaming() {
        let app = app(4);
        let req = r#"{"prompt":"the cat","max_tokens":6,"temperature":0,"seed":1}"#;
        let (s, b) = call(&app, "POST", "/v1/completions", req).await;
        assert_eq!(s, StatusCode::OK, "{b}");
        let v: Value = serde_json::from_str(&b).unwrap();
        let text = v["choices"][0]["text"].as_str().unwrap().to_owned();
        let sreq = r#"{"prompt":"the cat","max_tokens":6,"temperature":0,"seed":1,"stream":true}"#;
        let (s, b) = call(&app, "POST", "/v1/completions", sreq).await;
        assert_eq!(s, StatusCode::OK);
        let datas: Vec<&str> = b.lines().filter_map(|l| l.strip_prefix("data: ")).collect();
        assert_eq!(datas.last(), Some(&"[DONE]"), "{b}");
        let mut streamed = String::new();
        let mut finish = None;
        for d in &datas[..datas.len() - 1] {
            let c: Value = serde_json::from_str(d).unwrap();
            assert_eq!(c["object"], "text_completion");
            streamed.push_str(c["choices"][0]["text"].as_str().unwrap());
            if let Some(f) = c["choices"][0]["finish_reason"].as_str() {
                finish = Some(f.to_owned());
                assert!(c["usage"]["total_tokens"].as_u64().unwrap() > 0);
            }
        }
        assert_eq!(streamed, text);
        assert!(finish.is_some());
        // Chat streaming: first chunk carries the role.
        let (s, b) = call(
            &app,
            "POST",
            "/v1/chat/completions",
            r#"{"messages":[{"role":"user","content":"x"}],"max_tokens":3,"stream":true}"#,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        let first: Value =
            serde_json::from_str(b.lines().find_map(|l| l.strip_prefix("data: ")).unwrap())
                .unwrap();
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        assert!(b.trim_end().ends_with("data: [DONE]"));
    }

    #[tokio::test]
    async fn bad_requests_are_json_errors_and_server_survives() {
        let app = app(4);
        let cases = [
            (
                "/v1/chat/completions",
                "{not json",
                StatusCode::BAD_REQUEST,
                None,
            ),
            (
                "/v1/chat/completions",
                r#"{"messages":"x"}"#,
                StatusCode::BAD_REQUEST,
                None,
            ),
            (
                "/v1/chat/completions",
                r#"{"messages":[]}"#,
                StatusCode::BAD_REQUEST,
                None,
            ),
            (
                "/v1/chat/completions",
                r#"{"model":"gpt-9","messages":[{"role":"user","content":"x"}]}"#,
                StatusCode::NOT_FOUND,
                Some("model_not_found"),
            ),
            (
                "/v1/completions",
                r#"{"prompt":"x","temperature":5}"#,
                StatusCode::BAD_REQUEST,
                None,
            ),
            (
                "/v1/completions",
                r#"{"prompt":"x","top_p":0}"#,
                StatusCode::BAD_REQUEST,
                None,
            ),
            (
                "/v1/completions",
                r#"{"prompt":"x","max_tokens":0}"#,
                StatusCode::BAD_REQUEST,
                None,
            ),
            (
                "/v1/completions",
                r#"{"prompt":"x","n":2}"#,
                StatusCode::BAD_REQUEST,
                None,
            ),
            (
                "/v1/completions",
                r#"{"prompt":""}"#,
                StatusCode::BAD_REQUEST,
                None,
            ),
        ];
        for (path, body, status, code) in cases {
            let (s, b) = call(&app, "POST", path, body).await;
            assert_eq!(s, status, "{body} -> {b}");
            let v: Value = serde_json::from_str(&b).unwrap();
            assert!(v["error"]["message"].as_str().unwrap().len() > 5);
            assert!(v["error"]["type"].is_string());
            if let Some(c) = code {
                assert_eq!(v["error"]["code"], c);
            }
        }
        // Too long a prompt: 64-token context.
        let long = "a ".repeat(200);
        let (s, b) = call(
            &app,
            "POST",
            "/v1/completions",
            &format!(r#"{{"prompt":"{long}"}}"#),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        let v: Value = serde_json::from_str(&b).unwrap();
        assert_eq!(v["error"]["code"], "context_length_exceeded");
        // Still serving.
        let (s, _) = call(
            &app,
            "POST",
            "/v1/completions",
            r#"{"prompt":"ok","max_tokens":2}"#,
        )
        .await;
        assert_eq!(s, StatusCode::OK);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn full_queue_gets_429() {
        let app = app(1);
        let body = r#"{"prompt":"go","max_tokens":60,"temperature":0}"#;
        let mut handles = Vec::new();
        for _ in 0..6 {
            let app = app.clone();
            handles.push(tokio::spawn(async move {
                call(&app, "POST", "/v1/completions", body).await
            }));
        }
        let mut statuses = Vec::new();
        for h in handles {
            let (s, b) = h.await.unwrap();
            if s == StatusCode::TOO_MANY_REQUESTS {
                let v: Value = serde_json::from_str(&b).unwrap();
                assert_eq!(v["error"]["code"], "queue_full");
            }
            statuses.push(s);
        }
        assert!(statuses.contains(&StatusCode::OK));
        assert!(
            statuses.contains(&StatusCode::TOO_MANY_REQUESTS),
            "{statuses:?}"
        );
    }
}
