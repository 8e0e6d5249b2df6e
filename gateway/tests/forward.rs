//! The gateway in front of in-process RA-TLS workers (simulated TEE, real TLS 1.3 on loopback)
//! that misbehave on purpose: failover before the first token, an error event after it, a
//! malformed event stream, and certificates that are simulated without the flag, expired, or
//! rotated to an untrusted key — each gives the client an OpenAI-style error (or another worker's
//! answer) and leaves other clients unaffected.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use attestation::https::AgentAttestation;
use attestation::tls::{RaTlsCertResolver, server_config};
use attestation::{Policy, RaTlsIdentity, SimulatedTee, TdRegisters, Verifier};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::{Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use gateway::check::Verification;
use gateway::pool::Status;
use gateway::{Gateway, Options};
use tower::ServiceExt as _;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Good,
    /// The role chunk, then the connection breaks (before any token).
    DieBeforeFirstToken,
    /// One token, then the connection breaks.
    DieAfterFirstToken,
    /// An event that is not JSON.
    Malformed,
}

struct Fake {
    url: String,
    tee: SimulatedTee,
    resolver: Arc<RaTlsCertResolver>,
    mode: Arc<Mutex<Mode>>,
}

fn now() -> u64 {
    attestation::verify::unix_secs(std::time::SystemTime::now())
}

const HOST_CONFIG: &[u8] = br#"{"model":"/m.gguf","model_sha256":"1111111111111111111111111111111111111111111111111111111111111111"}"#;

fn chunk(v: serde_json::Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

fn token(t: &str) -> Bytes {
    chunk(serde_json::json!({"choices":[{"index":0,"delta":{"content":t},"finish_reason":null}]}))
}

async fn chat(mode: Mode) -> Response {
    let role = chunk(
        serde_json::json!({"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}),
    );
    let broken = || Err::<Bytes, std::io::Error>(std::io::Error::other("worker died"));
    let items: Vec<Result<Bytes, std::io::Error>> = match mode {
        Mode::Good => vec![
            Ok(role),
            Ok(token("a")),
            Ok(token("b")),
            Ok(chunk(
                serde_json::json!({"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}),
            )),
            Ok(Bytes::from("data: [DONE]\n\n")),
        ],
        Mode::DieBeforeFirstToken => vec![Ok(role), broken()],
        Mode::DieAfterFirstToken => vec![Ok(role), Ok(token("a")), broken()],
        Mode::Malformed => vec![Ok(role), Ok(Bytes::from("data: {oops\n\n"))],
    };
    // A pause before each piece, so that what came before is on the wire before a failure.
    let s = futures_util::StreamExt::then(futures_util::stream::iter(items), |x| async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        x
    });
    let mut r = Response::new(Body::from_stream(s));
    r.headers_mut().insert(
        "content-type",
        axum::http::HeaderValue::from_static("text/event-stream"),
    );
    r
}

async fn start(seed: u8) -> Fake {
    let events = attestation::runtime::expected_events(Some(HOST_CONFIG));
    let mut regs = TdRegisters::default();
    regs.rtmr[3] = measurements::rtmr3::replay(&events).unwrap().0;
    regs.mrtd = [seed; 48];
    let tee = SimulatedTee::from_seed(&[seed; 32], regs).unwrap();
    let resolver =
        Arc::new(RaTlsCertResolver::new(RaTlsIdentity::generate(&tee, now()).unwrap()).unwrap());
    let mode = Arc::new(Mutex::new(Mode::Good));
    let doc = serde_json::to_value(AgentAttestation {
        tee: "simulated".into(),
        rtmr3_events: events,
        rtmr3_error: None,
    })
    .unwrap();
    let m = mode.clone();
    let app = Router::new()
        .route(
            "/attestation",
            get(move || async move { axum::Json(doc.clone()) }),
        )
        .route(
            "/v1/models",
            get(|| async { axum::Json(serde_json::json!({"object":"list","data":[{"id":"m"}]})) }),
        )
        .route(
            "/v1/chat/completions",
            post(move || {
                let mode = *m.lock().unwrap();
                async move { chat(mode).await.into_response() }
            }),
        );
    let cfg = Arc::new(server_config(resolver.clone(), None).unwrap());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let acc = tokio_rustls::TlsAcceptor::from(cfg);
        loop {
            let Ok((sock, _)) = l.accept().await else {
                return;
            };
            let acc = acc.clone();
            let app = app.clone();
            tokio::spawn(async move {
                let Ok(tls) = acc.accept(sock).await else {
                    return;
                };
                let svc = hyper_util::service::TowerToHyperService::new(app);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    Fake {
        url: format!("https://127.0.0.1:{port}"),
        tee,
        resolver,
        mode,
    }
}

fn gateway(fakes: &[&Fake], allow_simulated: bool) -> Arc<Gateway> {
    let mut v = Verifier::simulated(
        Policy::default().with_simulated(allow_simulated),
        fakes[0].tee.public_key(),
    )
    .with_expected_host_config(HOST_CONFIG.to_vec());
    for f in &fakes[1..] {
        v = v.with_simulated_key(f.tee.public_key());
    }
    let urls: Vec<String> = fakes.iter().map(|f| f.url.clone()).collect();
    Gateway::new(
        &urls,
        v.clone(),
        Verification {
            verifier: v,
            models: None,
            timeout: Duration::from_secs(10),
            client_identity: None,
        },
        Options {
            request_timeout: Duration::from_secs(20),
            queue_timeout: Duration::from_secs(2),
            ..Options::default()
        },
    )
    .unwrap()
}

async fn call(gw: &Arc<Gateway>, body: serde_json::Value) -> (StatusCode, String) {
    let req = Request::post("/v1/chat/completions")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = gw.router().oneshot(req).await.unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

fn stream_req() -> serde_json::Value {
    serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": true})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_requests_reuse_one_verified_session() {
    let a = start(7).await;
    let gw = gateway(&[&a], true);
    gw.check_all().await;
    for i in 0..10 {
        let (st, body) = call(&gw, stream_req()).await;
        assert_eq!(st, StatusCode::OK, "request {i}: {body}");
        assert!(body.contains("data: [DONE]"), "request {i}: {body}");
        // Let the forwarding task put the connection back (it does after the stream's end).
        for _ in 0..100 {
            if gw.pool.workers[0].idle_len() > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let sessions = gw.metrics.get(
        "gateway_sessions_total",
        &[("worker", &a.url), ("result", "accepted")],
    );
    assert_eq!(
        sessions, 1.0,
        "10 sequential requests must share one kept-alive RA-TLS session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_before_the_first_token_and_an_error_event_after_it() {
    let a = start(1).await;
    let b = start(2).await;
    let gw = gateway(&[&a, &b], true);
    gw.check_all().await;
    assert!(
        gw.pool
            .workers
            .iter()
            .all(|w| w.state().status == Status::Up)
    );

    // The first request goes to worker a (index 0, fewest in flight, first in turn), which
    // breaks before its first token: the client still gets b's complete stream.
    *a.mode.lock().unwrap() = Mode::DieBeforeFirstToken;
    let (st, body) = call(&gw, stream_req()).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(
        body.contains(r#""content":"a""#) && body.contains(r#""content":"b""#),
        "{body}"
    );
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    assert!(!body.contains("error"), "{body}");
    assert_eq!(gw.metrics.get("gateway_failovers_total", &[]), 1.0);
    // a was dropped at once: the next requests go to b without a failover.
    assert_eq!(gw.pool.workers[0].state().status, Status::Down);
    let (st, _) = call(&gw, stream_req()).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(gw.metrics.get("gateway_failovers_total", &[]), 1.0);

    // After the first token a failure can no longer move: the stream ends with an error event
    // naming the worker, never with [DONE].
    *b.mode.lock().unwrap() = Mode::DieAfterFirstToken;
    let (st, body) = call(&gw, stream_req()).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(body.contains(r#""content":"a""#), "{body}");
    assert!(!body.contains("[DONE]"), "{body}");
    let last = body.trim_end().lines().last().unwrap();
    let e: serde_json::Value = serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert!(
        e["error"]["message"].as_str().unwrap().contains(&b.url),
        "{e}"
    );
    assert_eq!(e["error"]["type"], "server_error");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_event_stream_moves_to_another_worker_or_is_a_clear_error() {
    let a = start(3).await;
    let b = start(4).await;
    let gw = gateway(&[&a, &b], true);
    gw.check_all().await;
    *a.mode.lock().unwrap() = Mode::Malformed;
    let (st, body) = call(&gw, stream_req()).await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(
        body.ends_with("data: [DONE]\n\n") && !body.contains("oops"),
        "{body}"
    );
    *b.mode.lock().unwrap() = Mode::Malformed;
    let (st, body) = call(&gw, stream_req()).await;
    assert_eq!(st, StatusCode::BAD_GATEWAY, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("malformed event stream") && msg.contains(&a.url) && msg.contains(&b.url),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_expired_and_untrusted_rotated_certificates_are_refused() {
    let a = start(5).await;
    let b = start(6).await;

    // Simulated evidence without the flag: never used, and the client is told why.
    let strict = gateway(&[&a], false);
    strict.check_all().await;
    let s = strict.pool.workers[0].state();
    assert_eq!(s.status, Status::Down);
    assert!(
        s.reasons.iter().any(|r| r.code == "simulated_not_allowed"),
        "{s:?}"
    );
    let (st, body) = call(&strict, stream_req()).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE);
    assert!(body.contains("simulated_not_allowed"), "{body}");

    let gw = gateway(&[&a, &b], true);
    gw.check_all().await;
    let wa = gw.pool.workers[0].clone();

    // A valid rotation (same TEE, new key): verified again, then used.
    a.resolver
        .rotate(RaTlsIdentity::generate(&a.tee, now()).unwrap())
        .unwrap();
    let (conn, reused) = gw.conn_for(&wa, true).await.unwrap();
    assert!(!reused);
    assert_eq!(wa.state().verified_keys.len(), 2);
    assert!(wa.key_verified(&conn.key));

    // An expired certificate: the new session is refused, the worker dropped, requests go to b.
    a.resolver
        .rotate(RaTlsIdentity::generate(&a.tee, now() - 3 * 86_400).unwrap())
        .unwrap();
    let e = gw.conn_for(&wa, true).await.unwrap_err();
    assert!(
        e.contains("certificate_expired") || e.contains("expired"),
        "{e}"
    );
    assert_eq!(wa.state().status, Status::Down);
    let (st, body) = call(&gw, stream_req()).await;
    assert_eq!(st, StatusCode::OK, "{body}");

    // Rotated to a key no trusted simulator signed: refused as well.
    let other = SimulatedTee::from_seed(&[99; 32], TdRegisters::default()).unwrap();
    a.resolver
        .rotate(RaTlsIdentity::generate(&other, now()).unwrap())
        .unwrap();
    let e = gw.conn_for(&wa, true).await.unwrap_err();
    assert!(e.contains("simulated"), "{e}");
    let (st, _) = call(&gw, stream_req()).await;
    assert_eq!(st, StatusCode::OK, "the other worker still serves");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors_without_reaching_a_worker() {
    let a = start(7).await;
    let gw = gateway(&[&a], true);
    gw.check_all().await;
    for (body, param, what) in [
        ("{not json", None, "not valid JSON"),
        ("[1]", None, "JSON object"),
        (r#"{"messages":[]}"#, Some("model"), "model parameter"),
        (
            r#"{"model":7}"#,
            Some("model"),
            "must be a non-empty string",
        ),
        (r#"{"model":"m","stream":"yes"}"#, Some("stream"), "boolean"),
    ] {
        let req = Request::post("/v1/chat/completions")
            .body(Body::from(body))
            .unwrap();
        let resp = gw.router().oneshot(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::BAD_REQUEST, "{body}");
        let b = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"].as_str(), param, "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(what),
            "{v}"
        );
    }
    let (st, body) = call(&gw, serde_json::json!({"model": "other", "messages": []})).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{body}");
    assert!(
        body.contains("model_not_found") && body.contains("available: m"),
        "{body}"
    );
    assert_eq!(
        gw.pool.workers[0]
            .requests
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// `--require-gpu` in the gateway: a CPU-only worker is never used (`gpu_evidence_missing`), a
/// worker whose certificate carries valid GPU evidence is, and a rotation to evidence of a GPU
/// that left CC mode is refused (`gpu_cc_mode_off`). The GPU evidence is made by the attestation
/// crate's TEST GPU: our own test CA and attestation key, not NVIDIA's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_gpu_uses_only_workers_with_valid_gpu_evidence() {
    use attestation::gpu::testing::TestGpu;
    let cpu = start(7).await;
    let gpu = start(8).await;
    let test_gpu = TestGpu::new().unwrap();
    gpu.resolver
        .rotate(RaTlsIdentity::generate_with_gpu(&gpu.tee, &test_gpu, now()).unwrap())
        .unwrap();

    let v = Verifier::simulated(Policy::default().with_simulated(true), cpu.tee.public_key())
        .with_simulated_key(gpu.tee.public_key())
        .with_expected_host_config(HOST_CONFIG.to_vec())
        .with_gpu_policy(test_gpu.policy(true).unwrap());
    let gw = Gateway::new(
        &[cpu.url.clone(), gpu.url.clone()],
        v.clone(),
        Verification {
            verifier: v,
            models: None,
            timeout: Duration::from_secs(10),
            client_identity: None,
        },
        Options {
            request_timeout: Duration::from_secs(20),
            queue_timeout: Duration::from_secs(2),
            ..Options::default()
        },
    )
    .unwrap();
    gw.check_all().await;
    let s = gw.pool.workers[0].state();
    assert_eq!(s.status, Status::Down);
    assert!(
        s.reasons.iter().any(|r| r.code == "gpu_evidence_missing"),
        "{s:?}"
    );
    let wg = gw.pool.workers[1].clone();
    assert_eq!(wg.state().status, Status::Up, "{:?}", wg.state());
    for _ in 0..3 {
        let (st, body) = call(&gw, stream_req()).await;
        assert_eq!(st, StatusCode::OK, "{body}");
    }

    // The GPU leaves CC mode: the next certificate's evidence says so and is refused.
    let mut off = test_gpu.clone();
    off.cc.cc_on = false;
    gpu.resolver
        .rotate(RaTlsIdentity::generate_with_gpu(&gpu.tee, &off, now()).unwrap())
        .unwrap();
    let e = gw.conn_for(&wg, true).await.unwrap_err();
    assert!(e.contains("gpu_cc_mode_off"), "{e}");
    let (st, body) = call(&gw, stream_req()).await;
    assert_eq!(st, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("gpu_"), "{body}");
}
