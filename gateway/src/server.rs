//! The gateway's HTTP side: the OpenAI routes clients call, the forwarding with failover, the
//! status routes, and the connection loop.
//!
//! Forwarding ([`Gateway::forward`]): the body is read (size and time bounded), checked to be a
//! JSON object with a string `model` (and a boolean `stream`, if any) and otherwise forwarded
//! untouched. A worker is leased ([`Pool::acquire`]), a verified connection taken
//! ([`Gateway::conn_for`]), the request sent. Until the first output reaches the client — a
//! whole non-streamed answer, or the first event with a token — any failure (connection,
//! rejected certificate, 429/503, malformed answer, a stream that breaks) moves the request to
//! another verified worker. After that, a failure ends the client's stream with an OpenAI-style
//! error event (`data: {"error": ...}`), never a silent end; a stream is complete only with the
//! worker's `[DONE]`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use attestation::Verifier;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::{Value, json};

use crate::check::Verification;
use crate::log;
use crate::metrics::Metrics;
use crate::pool::{CheckOutcome, Lease, NoWorker, Pool, Reason, Status, Worker};
use crate::sse::{EventKind, SseParser};
use crate::upstream::{Conn, UpstreamError, connect};

/// Limits and timings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Most requests in flight per worker (the agent queues 8 behind the running one).
    pub max_in_flight: usize,
    /// How often every worker is verified again.
    pub check_interval: Duration,
    /// How long a successful verification is trusted without a newer one.
    pub verdict_ttl: Duration,
    /// TCP + TLS handshake with a worker.
    pub connect_timeout: Duration,
    /// A whole non-streamed request, or a stream's first token.
    pub request_timeout: Duration,
    /// Longest pause between two events of a stream.
    pub stream_idle_timeout: Duration,
    /// Longest wait for a free worker slot.
    pub queue_timeout: Duration,
    /// Largest request body.
    pub max_body: usize,
    /// Longest time to receive a request body.
    pub body_timeout: Duration,
    /// Longest time to receive a request head (also closes idle keep-alive connections).
    pub header_timeout: Duration,
    /// Idle connections to a worker are reused for at most this long.
    pub max_conn_age: Duration,
    /// Idle connections kept per worker.
    pub idle_per_worker: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_in_flight: 8,
            check_interval: Duration::from_secs(10),
            verdict_ttl: Duration::from_secs(60),
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(600),
            stream_idle_timeout: Duration::from_secs(120),
            queue_timeout: Duration::from_secs(120),
            max_body: 8 << 20,
            body_timeout: Duration::from_secs(30),
            header_timeout: Duration::from_secs(10),
            max_conn_age: Duration::from_secs(60),
            idle_per_worker: 16,
        }
    }
}

/// The gateway.
pub struct Gateway {
    /// The workers.
    pub pool: Arc<Pool>,
    /// Limits and timings.
    pub opts: Options,
    /// Verifies each new session's certificate on the request path (never blocks).
    forward_verifier: Verifier,
    /// Verifies workers completely (blocking).
    verification: Arc<Verification>,
    /// Counters.
    pub metrics: Metrics,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

/// An OpenAI-shaped error response.
pub fn api_error(
    status: StatusCode,
    kind: &str,
    code: Option<&str>,
    param: Option<&str>,
    message: impl Into<String>,
) -> Response {
    let body =
        json!({"error": {"message": message.into(), "type": kind, "param": param, "code": code}});
    (status, axum::Json(body)).into_response()
}

/// The bytes of an OpenAI-style error event.
fn error_event(code: &str, message: &str) -> Bytes {
    let e =
        json!({"error": {"message": message, "type": "server_error", "param": null, "code": code}});
    Bytes::from(format!("data: {e}\n\n"))
}

/// What one try on one worker gave.
enum Attempt {
    /// The answer for the client (committed: no failover any more).
    Done(Response),
    /// Nothing reached the client: try another worker (why).
    Retry(String),
}

/// The request's `model` and `stream`, or the 400 for the client.
pub fn validate(body: &[u8]) -> Result<(String, bool), Box<Response>> {
    let bad = |param: Option<&str>, code: Option<&str>, msg: String| {
        Box::new(api_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            code,
            param,
            msg,
        ))
    };
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        bad(
            None,
            None,
            format!("the request body is not valid JSON ({e}); send a JSON object such as {{\"model\": \"...\", \"messages\": [...]}}"),
        )
    })?;
    let o = v
        .as_object()
        .ok_or_else(|| bad(None, None, "the request body must be a JSON object".into()))?;
    let model = match o.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        None | Some(Value::Null) => {
            return Err(bad(
                Some("model"),
                Some("missing_required_parameter"),
                "you must provide a model parameter (GET /v1/models lists the models of the verified workers)".into(),
            ));
        }
        Some(other) => {
            return Err(bad(
                Some("model"),
                Some("invalid_type"),
                format!("'model' must be a non-empty string, not {other}"),
            ));
        }
    };
    let stream = match o.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(bad(
                Some("stream"),
                Some("invalid_type"),
                format!("'stream' must be a boolean, not {other}"),
            ));
        }
    };
    Ok((model, stream))
}

async fn read_body(body: Body, max: usize, timeout: Duration) -> Result<Bytes, Box<Response>> {
    let limited = Limited::new(body, max);
    match tokio::time::timeout(timeout, limited.collect()).await {
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e))
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(Box::new(api_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Some("request_too_large"),
                None,
                format!("the request body is larger than {max} bytes (the gateway's --max-body)"),
            )))
        }
        Ok(Err(e)) => Err(Box::new(api_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            None,
            format!("cannot read the request body: {e}"),
        ))),
        Err(_) => Err(Box::new(api_error(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            Some("request_timeout"),
            None,
            format!(
                "the request body did not arrive within {} s",
                timeout.as_secs()
            ),
        ))),
    }
}

/// The message of a worker's error body (OpenAI's shape or plain text).
fn error_message(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned())
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl Gateway {
    /// A gateway for `workers` (`https://HOST:PORT` each).
    pub fn new(
        workers: &[String],
        forward_verifier: Verifier,
        verification: Verification,
        opts: Options,
    ) -> Result<Arc<Self>, String> {
        if workers.is_empty() {
            return Err("give at least one --worker https://HOST:PORT".into());
        }
        let ws = workers
            .iter()
            .map(|u| Worker::new(u).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Arc::new(Gateway {
            pool: Pool::new(ws, opts.max_in_flight, opts.verdict_ttl),
            opts,
            forward_verifier,
            verification: Arc::new(verification),
            metrics: Metrics::default(),
        }))
    }

    /// Verify `w` now (one verification at a time per worker; a request that waited for a
    /// verification started after it asked reuses that one).
    pub async fn recheck(self: &Arc<Self>, w: &Arc<Worker>) {
        let asked = Instant::now();
        let _g = w.checking.lock().await;
        if w.checked_since(asked) {
            return;
        }
        let v = self.verification.clone();
        let url = w.url.clone();
        let outcome = tokio::task::spawn_blocking(move || v.check(&url))
            .await
            .unwrap_or_else(|e| {
                CheckOutcome::Down(
                    vec![Reason::new("internal", format!("the check failed: {e}"))],
                    None,
                )
            });
        let result = match &outcome {
            CheckOutcome::Up(_) => "accepted",
            CheckOutcome::Down(..) => "rejected",
        };
        self.metrics.inc(
            "gateway_verifications_total",
            &[("worker", &w.url), ("result", result)],
        );
        let before = w.record(outcome);
        let after = w.state();
        match (before, after.status) {
            (b, Status::Up) if b != Status::Up => log!(
                "worker {} verified: image {}, model {} ({}), key {}",
                w.url,
                after.image_hash.as_deref().unwrap_or("?"),
                after.model_hash.as_deref().unwrap_or("?"),
                after.models.join(", "),
                after.verified_keys.last().map_or("?", String::as_str)
            ),
            (b, Status::Down) if b != Status::Down => log!(
                "worker {} dropped: {}",
                w.url,
                after
                    .reasons
                    .iter()
                    .map(|r| format!("{}: {}", r.code, r.message))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
            _ => {}
        }
    }

    /// Verifies every worker now and then every `check_interval`, in the background.
    pub fn spawn_checks(self: &Arc<Self>) {
        for w in self.pool.workers.clone() {
            let gw = self.clone();
            tokio::spawn(async move {
                loop {
                    gw.recheck(&w).await;
                    tokio::time::sleep(gw.opts.check_interval).await;
                }
            });
        }
    }

    /// Verifies every worker once (start-up, tests).
    pub async fn check_all(self: &Arc<Self>) {
        let mut tasks = Vec::new();
        for w in self.pool.workers.clone() {
            let gw = self.clone();
            tasks.push(tokio::spawn(async move { gw.recheck(&w).await }));
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    /// A verified connection to `w`: an idle one pinned to a verified key (unless `fresh`), or a
    /// new session whose certificate is checked in the handshake. A key not yet verified (the
    /// worker rotated its certificate) is verified completely (RTMR3 log, model hash) first.
    pub async fn conn_for(
        self: &Arc<Self>,
        w: &Arc<Worker>,
        fresh: bool,
    ) -> Result<(Conn, bool), String> {
        if !fresh && let Some(c) = w.idle_take(self.opts.max_conn_age) {
            return Ok((c, true));
        }
        let conn = match connect(
            &w.host,
            w.port,
            &self.forward_verifier,
            self.verification.client_identity.as_ref(),
            self.opts.connect_timeout,
        )
        .await
        {
            Ok(c) => c,
            Err(e) => {
                let (code, result) = match &e {
                    UpstreamError::Rejected(_) => ("certificate_rejected", "rejected"),
                    _ => ("unreachable", "failed"),
                };
                self.metrics.inc(
                    "gateway_sessions_total",
                    &[("worker", &w.url), ("result", result)],
                );
                let why = format!("a new RA-TLS session failed: {e}");
                log!("worker {}: {why}; not used until it verifies again", w.url);
                w.mark_down(Reason::new(code, why.clone()));
                let gw = self.clone();
                let w2 = w.clone();
                tokio::spawn(async move { gw.recheck(&w2).await });
                return Err(why);
            }
        };
        self.metrics.inc(
            "gateway_sessions_total",
            &[("worker", &w.url), ("result", "accepted")],
        );
        if !w.key_verified(&conn.key) {
            log!(
                "worker {} presents a certificate with a key not verified yet ({}): verifying its RTMR3 log and model again",
                w.url,
                conn.key
            );
            self.recheck(w).await;
            if !w.key_verified(&conn.key) {
                return Err(format!(
                    "its new certificate (key {}) could not be verified completely: {}",
                    conn.key,
                    self.pool.unavailable_reasons()
                ));
            }
        }
        Ok((conn, false))
    }

    /// One try of the request on the leased worker.
    async fn attempt(
        self: &Arc<Self>,
        lease: Lease,
        path: &'static str,
        body: &Bytes,
        stream: bool,
        started: Instant,
    ) -> Attempt {
        let w = lease.worker().clone();
        let deadline = tokio::time::Instant::from_std(started + self.opts.request_timeout);
        let mut resp = None;
        let mut last = String::new();
        // A reused connection may have been closed by the worker meanwhile: then once more on a
        // new session.
        for fresh in [false, true] {
            let (mut conn, reused) = match self.conn_for(&w, fresh).await {
                Ok(c) => c,
                Err(why) => return Attempt::Retry(why),
            };
            let req = hyper::Request::post(path)
                .header(header::HOST, format!("{}:{}", w.host, w.port))
                .header(header::CONTENT_TYPE, "application/json")
                .header(
                    header::ACCEPT,
                    if stream {
                        "text/event-stream"
                    } else {
                        "application/json"
                    },
                )
                .body(Full::new(body.clone()));
            let req = match req {
                Ok(r) => r,
                Err(e) => {
                    return Attempt::Done(api_error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "server_error",
                        None,
                        None,
                        format!("cannot build the request: {e}"),
                    ));
                }
            };
            match tokio::time::timeout_at(deadline, conn.send(req)).await {
                Ok(Ok(r)) => {
                    resp = Some((r, conn));
                    break;
                }
                Ok(Err(e)) => {
                    last = format!("the request failed: {e}");
                    if !reused {
                        w.mark_down(Reason::new("unreachable", last.clone()));
                        break;
                    }
                }
                Err(_) => {
                    return Attempt::Retry(format!(
                        "no answer within {} s",
                        self.opts.request_timeout.as_secs()
                    ));
                }
            }
        }
        let Some((resp, conn)) = resp else {
            return Attempt::Retry(last);
        };
        let status = resp.status();
        self.metrics.inc(
            "gateway_upstream_requests_total",
            &[("worker", &w.url), ("status", status.as_str())],
        );
        if !status.is_success() {
            let body = match tokio::time::timeout_at(
                deadline,
                Limited::new(resp.into_body(), 1 << 20).collect(),
            )
            .await
            {
                Ok(Ok(b)) => b.to_bytes(),
                _ => {
                    return Attempt::Retry(format!(
                        "answered HTTP {status} and its body could not be read"
                    ));
                }
            };
            w.idle_put(conn, self.opts.idle_per_worker);
            let msg = error_message(&body);
            if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE
            {
                return Attempt::Retry(format!("answered HTTP {status}: {msg}"));
            }
            // The worker's own answer (a 400 naming a field, ...): relayed as it is, in
            // OpenAI's shape.
            let is_openai =
                serde_json::from_slice::<Value>(&body).is_ok_and(|v| v["error"].is_object());
            if is_openai {
                let mut r = Response::new(Body::from(body));
                *r.status_mut() = status;
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                return Attempt::Done(r);
            }
            log!(
                "worker {} answered HTTP {status} without an OpenAI error body",
                w.url
            );
            return Attempt::Done(api_error(
                status,
                "server_error",
                Some("worker_error"),
                None,
                format!("the worker {} answered HTTP {status}: {msg}", w.url),
            ));
        }
        if stream {
            let is_sse = resp
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("text/event-stream"));
            if !is_sse {
                log!(
                    "worker {} answered a stream request without text/event-stream",
                    w.url
                );
                return Attempt::Retry("answered a stream request without an event stream".into());
            }
            return self
                .stream(lease, conn, resp.into_body(), started, deadline)
                .await;
        }
        let body = match tokio::time::timeout_at(
            deadline,
            Limited::new(resp.into_body(), 64 << 20).collect(),
        )
        .await
        {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) => {
                w.mark_down(Reason::new(
                    "unreachable",
                    format!("the answer broke off: {e}"),
                ));
                return Attempt::Retry(format!("the answer broke off: {e}"));
            }
            Err(_) => {
                return Attempt::Retry(format!(
                    "no complete answer within {} s",
                    self.opts.request_timeout.as_secs()
                ));
            }
        };
        if serde_json::from_slice::<Value>(&body).map_or(true, |v| !v.is_object()) {
            log!(
                "worker {} sent a malformed answer (not a JSON object): {}",
                w.url,
                String::from_utf8_lossy(&body[..body.len().min(200)])
            );
            return Attempt::Retry("sent a malformed answer (not a JSON object)".into());
        }
        w.idle_put(conn, self.opts.idle_per_worker);
        self.metrics
            .add("gateway_request_seconds_sum", &[], secs(started.elapsed()));
        self.metrics.inc("gateway_request_seconds_count", &[]);
        let mut r = Response::new(Body::from(body));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Attempt::Done(r)
    }

    /// A streamed answer: events are held back until the first output (failover still
    /// possible), then passed on as they arrive by a task that owns the lease.
    async fn stream(
        self: &Arc<Self>,
        lease: Lease,
        conn: Conn,
        mut body: hyper::body::Incoming,
        started: Instant,
        deadline: tokio::time::Instant,
    ) -> Attempt {
        let w = lease.worker().clone();
        let mut parser = SseParser::new();
        let mut held: Vec<u8> = Vec::new();
        let mut committed = false;
        while !committed {
            let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => {
                    return Attempt::Retry(format!(
                        "no first token within {} s",
                        self.opts.request_timeout.as_secs()
                    ));
                }
                Ok(None) => {
                    return Attempt::Retry("the stream ended before its first token".into());
                }
                Ok(Some(Err(e))) => {
                    w.mark_down(Reason::new(
                        "unreachable",
                        format!("the stream broke off: {e}"),
                    ));
                    return Attempt::Retry(format!(
                        "the stream broke off before its first token: {e}"
                    ));
                }
                Ok(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            match parser.push(&data) {
                Ok(events) => {
                    for (raw, kind) in events {
                        held.extend_from_slice(&raw);
                        if kind != EventKind::Other {
                            committed = true;
                        }
                    }
                }
                Err(e) => {
                    log!("worker {} sent a malformed event stream: {e}", w.url);
                    return Attempt::Retry(format!("sent a malformed event stream: {e}"));
                }
            }
        }
        self.metrics.add(
            "gateway_first_token_seconds_sum",
            &[],
            secs(started.elapsed()),
        );
        self.metrics.inc("gateway_first_token_seconds_count", &[]);
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
        let _ = tx.send(Bytes::from(held)).await;
        let gw = self.clone();
        tokio::spawn(async move {
            let _lease = lease;
            gw.pump(&w, conn, body, parser, tx, started).await;
        });
        let out = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
        });
        let mut r = Response::new(Body::from_stream(out));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        Attempt::Done(r)
    }

    /// Passes a committed stream on; ends it with an error event when the worker fails.
    async fn pump(
        self: &Arc<Self>,
        w: &Arc<Worker>,
        conn: Conn,
        mut body: hyper::body::Incoming,
        mut parser: SseParser,
        tx: tokio::sync::mpsc::Sender<Bytes>,
        started: Instant,
    ) {
        let fail = |code: &str, why: String| {
            log!("worker {}: stream ended with an error: {why}", w.url);
            self.metrics
                .inc("gateway_stream_errors_total", &[("worker", &w.url)]);
            error_event(
                code,
                &format!("the worker {} failed mid-stream: {why}", w.url),
            )
        };
        let mut complete = false;
        loop {
            let idle = self.opts.stream_idle_timeout;
            let frame = match tokio::time::timeout(idle, body.frame()).await {
                Err(_) => {
                    let _ = tx
                        .send(fail(
                            "worker_timeout",
                            format!("no data for {} s", idle.as_secs()),
                        ))
                        .await;
                    break;
                }
                Ok(None) => {
                    if let Err(e) = parser.finish() {
                        let _ = tx
                            .send(fail("worker_stream_truncated", e.to_string()))
                            .await;
                        w.mark_down(Reason::new(
                            "unreachable",
                            format!("a stream broke off: {e}"),
                        ));
                        let gw = self.clone();
                        let w2 = w.clone();
                        tokio::spawn(async move { gw.recheck(&w2).await });
                    } else {
                        complete = true;
                    }
                    break;
                }
                Ok(Some(Err(e))) => {
                    let _ = tx.send(fail("worker_stream_failed", e.to_string())).await;
                    w.mark_down(Reason::new(
                        "unreachable",
                        format!("a stream broke off: {e}"),
                    ));
                    let gw = self.clone();
                    let w2 = w.clone();
                    tokio::spawn(async move { gw.recheck(&w2).await });
                    break;
                }
                Ok(Some(Ok(f))) => f,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            match parser.push(&data) {
                Ok(events) => {
                    let mut out = Vec::new();
                    for (raw, _) in events {
                        out.extend_from_slice(&raw);
                    }
                    if !out.is_empty() && tx.send(Bytes::from(out)).await.is_err() {
                        // The client went away: dropping the connection stops the generation.
                        return;
                    }
                }
                Err(e) => {
                    log!("worker {} sent a malformed event stream: {e}", w.url);
                    let _ = tx
                        .send(fail("worker_stream_malformed", e.to_string()))
                        .await;
                    break;
                }
            }
        }
        self.metrics
            .add("gateway_request_seconds_sum", &[], secs(started.elapsed()));
        self.metrics.inc("gateway_request_seconds_count", &[]);
        if complete {
            w.idle_put(conn, self.opts.idle_per_worker);
        }
    }

    /// `POST /v1/chat/completions` and `/v1/completions`.
    pub async fn forward(self: &Arc<Self>, path: &'static str, req: Request) -> Response {
        let started = Instant::now();
        let resp = self.forward_inner(path, req, started).await;
        self.metrics.inc(
            "gateway_requests_total",
            &[("endpoint", path), ("status", resp.status().as_str())],
        );
        resp
    }

    async fn forward_inner(
        self: &Arc<Self>,
        path: &'static str,
        req: Request,
        started: Instant,
    ) -> Response {
        if let Some(n) = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            && n > self.opts.max_body as u64
        {
            return api_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Some("request_too_large"),
                None,
                format!(
                    "the request body ({n} bytes) is larger than {} bytes (the gateway's --max-body)",
                    self.opts.max_body
                ),
            );
        }
        let body =
            match read_body(req.into_body(), self.opts.max_body, self.opts.body_timeout).await {
                Ok(b) => b,
                Err(r) => return *r,
            };
        let (model, stream) = match validate(&body) {
            Ok(x) => x,
            Err(r) => return *r,
        };
        let queue_deadline = tokio::time::Instant::now() + self.opts.queue_timeout;
        let mut tried: Vec<usize> = Vec::new();
        let mut failures: Vec<String> = Vec::new();
        loop {
            let lease = match self.pool.acquire(&model, &tried, queue_deadline).await {
                Ok(l) => l,
                Err(e) => return self.no_worker(e, &model, &failures),
            };
            if !tried.is_empty() {
                self.metrics.inc("gateway_failovers_total", &[]);
            }
            tried.push(lease.index);
            let url = lease.worker().url.clone();
            match self.attempt(lease, path, &body, stream, started).await {
                Attempt::Done(r) => return r,
                Attempt::Retry(why) => {
                    log!("worker {url}: {why}; trying another verified worker");
                    failures.push(format!("{url}: {why}"));
                }
            }
        }
    }

    fn no_worker(&self, e: NoWorker, model: &str, failures: &[String]) -> Response {
        let tried = if failures.is_empty() {
            String::new()
        } else {
            format!(" Tried: {}.", failures.join(" | "))
        };
        match e {
            NoWorker::Unavailable(why) => api_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("no_verified_worker"),
                None,
                format!(
                    "no verified worker can take the request; the gateway fails closed and sends nothing to a worker it cannot verify.{tried} Workers: {why}"
                ),
            ),
            NoWorker::UnknownModel(models) => api_error(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
                Some("model"),
                format!(
                    "The model `{model}` is not served by any verified worker; available: {}",
                    if models.is_empty() {
                        "none".into()
                    } else {
                        models.join(", ")
                    }
                ),
            ),
            NoWorker::Busy => api_error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("workers_busy"),
                None,
                format!(
                    "every verified worker serving `{model}` has {} requests in flight and none freed up within {} s; retry later",
                    self.pool.max_in_flight,
                    self.opts.queue_timeout.as_secs()
                ),
            ),
            NoWorker::Exhausted => api_error(
                StatusCode::BAD_GATEWAY,
                "server_error",
                Some("workers_failed"),
                None,
                format!(
                    "every verified worker serving `{model}` failed before the first token.{tried}"
                ),
            ),
        }
    }

    /// `GET /gateway/workers`.
    pub fn workers_json(&self) -> Value {
        let ws: Vec<Value> = self
            .pool
            .workers
            .iter()
            .map(|w| {
                let s = w.state();
                let mut v = serde_json::to_value(&s).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("url".into(), w.url.clone().into());
                    o.insert("usable".into(), w.usable(self.pool.ttl).into());
                    o.insert("in_flight".into(), w.in_flight().into());
                    o.insert(
                        "requests".into(),
                        w.requests.load(std::sync::atomic::Ordering::Relaxed).into(),
                    );
                }
                v
            })
            .collect();
        json!({"workers": ws, "verdict_ttl_s": self.pool.ttl.as_secs(), "check_interval_s": self.opts.check_interval.as_secs()})
    }

    /// The router of the client side.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/v1/models", get(models))
            .route("/v1/chat/completions", post(chat))
            .route("/v1/completions", post(completions))
            .route("/gateway/workers", get(workers))
            .route("/metrics", get(metrics))
            .route("/health", get(health))
            .fallback(not_found)
            .method_not_allowed_fallback(not_allowed)
            .with_state(self.clone())
    }
}

type St = State<Arc<Gateway>>;

async fn models(State(gw): St) -> Response {
    let data: Vec<Value> = gw
        .pool
        .models()
        .into_iter()
        .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "confidential-worker"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn chat(State(gw): St, req: Request) -> Response {
    gw.forward("/v1/chat/completions", req).await
}

async fn completions(State(gw): St, req: Request) -> Response {
    gw.forward("/v1/completions", req).await
}

async fn workers(State(gw): St) -> Response {
    axum::Json(gw.workers_json()).into_response()
}

async fn metrics(State(gw): St) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        gw.metrics.render(&gw.pool),
    )
        .into_response()
}

async fn health(State(gw): St) -> Response {
    let up = gw
        .pool
        .workers
        .iter()
        .filter(|w| w.usable(gw.pool.ttl))
        .count();
    let status = if up > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(json!({"workers_up": up, "workers": gw.pool.workers.len()})),
    )
        .into_response()
}

async fn not_found(req: Request) -> Response {
    api_error(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("unknown_url"),
        None,
        format!(
            "no route {} {}; the gateway serves GET /v1/models, POST /v1/chat/completions, POST /v1/completions, GET /gateway/workers, GET /metrics, GET /health",
            req.method(),
            req.uri().path()
        ),
    )
}

async fn not_allowed(req: Request) -> Response {
    api_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        Some("method_not_allowed"),
        None,
        format!("{} does not accept {}", req.uri().path(), req.method()),
    )
}

/// Serves `app` on `listener` (plain HTTP, or TLS with `tls`) until `stop` resolves. Each
/// connection gets `header_timeout` for every request head — idle keep-alive connections and
/// slow senders are closed after it — and a TLS handshake gets as long.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    header_timeout: Duration,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut last_error_log: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = &mut stop => return,
        };
        let (sock, _) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors or similar: keep serving the open connections.
                if last_error_log.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    log!("accept failed: {e} (too many open connections?); retrying");
                    last_error_log = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        let app = app.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let svc = hyper_util::service::TowerToHyperService::new(app);
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .keep_alive(true);
            match tls {
                None => {
                    let _ = b
                        .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                        .await;
                }
                Some(acc) => {
                    if let Ok(Ok(s)) = tokio::time::timeout(header_timeout, acc.accept(sock)).await
                    {
                        let _ = b
                            .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                            .await;
                    }
                }
            }
        });
    }
}
