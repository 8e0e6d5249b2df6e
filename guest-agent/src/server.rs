//! The agent's HTTP server (axum 0.8), served over RA-TLS in the image ([`crate::tls_listener`];
//! [`serve`] takes any axum listener, plain TCP in some tests).
//!
//! Routes: `GET /health` ([`worker_api::Health`]), `POST /shutdown` ([`worker_api::ShutdownAck`],
//! then a clean stop), `GET /attestation/ccel` (the TD's firmware event log, 404 outside a TD),
//! `GET /firmware/acpi` ([`worker_api::FirmwareAcpi`], 404 without fw_cfg),
//! `GET /attestation` ([`worker_api::AttestationInfo`]: RTMR3 events, registers, image hashes),
//! and JSON [`worker_api::ErrorBody`] answers for unknown paths and wrong
//! methods. Other routers (inference) are added with [`build_app`]'s `extra` argument, which is
//! merged before the JSON fallbacks are attached (axum forbids merging two routers that both have
//! a fallback).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::sync::watch;
use worker_api::{
    ATTESTATION_PATH, ErrorBody, FIRMWARE_ACPI_PATH, HEALTH_PATH, SHUTDOWN_PATH, ShutdownAck,
};

use crate::health::{AgentInfo, assemble, probe_tee};
use crate::paths::Paths;

/// How long a stop waits for open connections to finish before giving up on them.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the agent stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// `POST /shutdown`.
    Requested,
    /// A termination signal (SIGTERM, SIGINT).
    Signal(i32),
}

impl std::fmt::Display for StopReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StopReason::Requested => write!(f, "shutdown requested over HTTP"),
            StopReason::Signal(n) => write!(f, "received signal {n}"),
        }
    }
}

/// A clonable "stop now" switch shared by the server, signal handlers and the main loop.
#[derive(Debug, Clone)]
pub struct StopSwitch {
    tx: Arc<watch::Sender<Option<StopReason>>>,
}

impl Default for StopSwitch {
    fn default() -> Self {
        Self::new()
    }
}

impl StopSwitch {
    /// A switch that has not been flipped.
    pub fn new() -> Self {
        Self {
            tx: Arc::new(watch::Sender::new(None)),
        }
    }

    /// Flips the switch (the first reason wins).
    pub fn stop(&self, reason: StopReason) {
        self.tx.send_if_modified(|current| {
            if current.is_none() {
                *current = Some(reason);
                true
            } else {
                false
            }
        });
    }

    /// The reason, once flipped.
    pub fn reason(&self) -> Option<StopReason> {
        *self.tx.borrow()
    }

    /// Resolves once the switch is flipped, with the reason.
    pub async fn stopped(&self) -> StopReason {
        let mut rx = self.tx.subscribe();
        loop {
            if let Some(reason) = *rx.borrow_and_update() {
                return reason;
            }
            if rx.changed().await.is_err() {
                // The sender lives in `self`, so this cannot happen; treat it as a request.
                return StopReason::Requested;
            }
        }
    }
}

/// Everything the built-in handlers need.
#[derive(Debug, Clone)]
pub struct ServerContext {
    /// Facts fixed at start-up.
    pub info: AgentInfo,
    /// Where to probe the TEE interfaces.
    pub paths: Paths,
    /// Flipped by `POST /shutdown`.
    pub stop: StopSwitch,
    /// Whether a stop powers the machine off (PID 1) or only ends the process (`serve`).
    pub powers_off: bool,
    /// The attestation state (evidence kind, RTMR3 events, RA-TLS identity); `None` in tests
    /// that serve without it (`/attestation` then answers 404).
    pub attestation: Option<Arc<crate::attest::Attestor>>,
    /// The root-contract approval gate (reported by `/health`).
    pub approval: crate::approval::ApprovalGate,
}

/// The built-in routes with the JSON fallbacks, merged with `extra` (pass `Router::new()` for
/// none). `extra` must not define a fallback of its own.
pub fn build_app(ctx: ServerContext, extra: Router) -> Router {
    let ctx = Arc::new(ctx);
    Router::new()
        .route(HEALTH_PATH, get(health))
        .route(SHUTDOWN_PATH, post(shutdown))
        .route(FIRMWARE_ACPI_PATH, get(firmware_acpi))
        .route(ATTESTATION_PATH, get(attestation))
        .route(worker_api::CCEL_PATH, get(ccel))
        .with_state(ctx)
        .merge(extra)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
}

async fn health(State(ctx): State<Arc<ServerContext>>) -> Json<worker_api::Health> {
    let mut tee = probe_tee(&ctx.paths);
    if let Some(a) = &ctx.attestation {
        tee.kind = a.kind().name().to_owned();
        tee.rtmr3_error = a.rtmr3_error().map(str::to_owned);
    }
    let mut h = assemble(&ctx.info, tee, Instant::now());
    h.approval = Some(ctx.approval.status());
    Json(h)
}

async fn attestation(State(ctx): State<Arc<ServerContext>>) -> Response {
    match &ctx.attestation {
        Some(a) => Json(a.info()).into_response(),
        None => error_response(
            StatusCode::NOT_FOUND,
            "this agent runs without attestation state".to_owned(),
        ),
    }
}

async fn shutdown(State(ctx): State<Arc<ServerContext>>) -> Json<ShutdownAck> {
    crate::log_line!("shutdown requested over HTTP");
    ctx.stop.stop(StopReason::Requested);
    Json(ShutdownAck {
        powering_off: ctx.powers_off,
    })
}

/// The TD's CCEL event log (read on each request: it is small and public).
async fn ccel(State(ctx): State<Arc<ServerContext>>) -> Response {
    use base64::Engine as _;
    let guest = attestation::guest::TdxGuest::with_paths(attestation::guest::TdxGuestPaths::under(
        ctx.paths.root(),
    ));
    match guest.ccel() {
        Ok(c) => Json(worker_api::CcelLog {
            table_base64: base64::engine::general_purpose::STANDARD.encode(&c.table),
            log_base64: base64::engine::general_purpose::STANDARD.encode(&c.log),
            log_bytes: c.log.len() as u64,
        })
        .into_response(),
        Err(e @ attestation::guest::GuestError::Unavailable { .. }) => error_response(
            StatusCode::NOT_FOUND,
            format!("no CCEL event log here ({e}); it exists only inside a TDX guest"),
        ),
        Err(e) => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot read the CCEL event log: {e}"),
        ),
    }
}

async fn firmware_acpi(State(ctx): State<Arc<ServerContext>>) -> Response {
    match crate::firmware::read_acpi(&ctx.paths) {
        Ok(acpi) => Json(acpi).into_response(),
        Err(e @ crate::firmware::FirmwareError::NotAvailable { .. }) => {
            error_response(StatusCode::NOT_FOUND, e.to_string())
        }
        Err(e) => error_response(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// A JSON error answer.
pub fn error_response(status: StatusCode, error: String) -> Response {
    (status, Json(ErrorBody { error })).into_response()
}

async fn not_found(method: Method, uri: Uri) -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        format!(
            "no endpoint {method} {}; the agent serves GET {HEALTH_PATH}, GET \
             {ATTESTATION_PATH}, GET {}, GET {FIRMWARE_ACPI_PATH} and POST {SHUTDOWN_PATH}",
            uri.path(),
            worker_api::CCEL_PATH
        ),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        format!(
            "{} does not accept {method}; the agent serves GET {HEALTH_PATH}, GET \
             {ATTESTATION_PATH}, GET {}, GET {FIRMWARE_ACPI_PATH} and POST {SHUTDOWN_PATH}",
            uri.path(),
            worker_api::CCEL_PATH
        ),
    )
}

/// The console line announcing readiness; contains [`worker_api::READY_MARKER`] once prefixed by
/// [`crate::console`].
pub fn ready_message(addr: SocketAddr) -> String {
    format!("ready on {addr}")
}

/// Longest a client may take to send a request head; idle keep-alive connections are closed
/// after it too (a slow or idle client cannot hold a connection forever).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(20);

/// Serves `app` on `listener` until `stop` is flipped, then drains open connections for at most
/// [`DRAIN_TIMEOUT`]. Returns the stop reason. Each connection is HTTP/1.1 (hyper) with
/// [`HEADER_TIMEOUT`] for every request head.
pub async fn serve<L>(mut listener: L, app: Router, stop: StopSwitch) -> std::io::Result<StopReason>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    // Connections hold a receiver of `shutdown` (graceful shutdown signal) and of `closed`
    // (dropped when the connection ends).
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let (closed_tx, closed_rx) = tokio::sync::watch::channel(());
    loop {
        let (io, _addr) = tokio::select! {
            x = listener.accept() => x,
            _ = stop.stopped() => break,
        };
        let svc = hyper_util::service::TowerToHyperService::new(app.clone());
        let mut shutdown = shutdown_rx.clone();
        let closed = closed_rx.clone();
        tokio::spawn(async move {
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let conn = b.serve_connection(hyper_util::rt::TokioIo::new(io), svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = async { let _ = shutdown.wait_for(|s| *s).await; } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            drop(closed);
        });
    }
    // Stop listening, let open requests finish (bounded).
    drop(listener);
    let _ = shutdown_tx.send(true);
    drop(closed_rx);
    if tokio::time::timeout(DRAIN_TIMEOUT, closed_tx.closed())
        .await
        .is_err()
    {
        crate::log_line!(
            "open connections did not finish within {} s; stopping anyway",
            DRAIN_TIMEOUT.as_secs()
        );
    }
    Ok(stop.reason().unwrap_or(StopReason::Requested))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::ReleaseSource;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;
    use worker_api::{Health, HostConfigStatus};

    /// Sends one raw HTTP/1.1 request and returns (status code, body).
    async fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(req.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.expect("read");
        let text = String::from_utf8(raw).expect("utf8");
        let (head, body) = text.split_once("\r\n\r\n").expect("header end");
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .expect("status")
            .parse()
            .expect("number");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{head}"
        );
        (status, body.to_string())
    }

    async fn start(
        powers_off: bool,
        root: &std::path::Path,
    ) -> (
        SocketAddr,
        StopSwitch,
        tokio::task::JoinHandle<std::io::Result<StopReason>>,
    ) {
        let stop = StopSwitch::new();
        let ctx = ServerContext {
            info: AgentInfo {
                release: ReleaseSource::Missing.release(),
                host_config: Some(HostConfigStatus {
                    sha384: "00".repeat(48),
                    error: None,
                }),
                started: Instant::now(),
                gpu: None,
            },
            paths: Paths::new(root),
            stop: stop.clone(),
            powers_off,
            attestation: None,
            approval: crate::approval::ApprovalGate::not_configured(),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let app = build_app(ctx, Router::new());
        let task = tokio::spawn(serve(listener, app, stop.clone()));
        (addr, stop, task)
    }

    #[tokio::test]
    async fn health_answers_the_contract_shape() {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(root.path().join("dev")).expect("mkdir");
        std::fs::write(root.path().join("dev/tdx_guest"), b"").expect("touch");
        let (addr, stop, task) = start(false, root.path()).await;

        let (status, body) = request(addr, "GET", "/health").await;
        assert_eq!(status, 200, "{body}");
        let health: Health = serde_json::from_str(&body).expect("Health JSON");
        assert_eq!(health.status, "ok");
        assert_eq!(health.image.name, "dev");
        assert!(health.tee.tdx_guest_device);
        assert_eq!(health.tee.kind, "tdx");
        assert!(!health.tee.configfs_tsm);
        assert_eq!(health.host_config.expect("host config").sha384.len(), 96);
        // The wire form has exactly the contract's top-level keys.
        let value: serde_json::Value = serde_json::from_str(&body).expect("json");
        let mut keys: Vec<_> = value.as_object().expect("object").keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "agent_version",
                "approval",
                "host_config",
                "image",
                "status",
                "tee",
                "uptime_secs"
            ]
        );

        stop.stop(StopReason::Signal(15));
        assert_eq!(
            task.await.expect("join").expect("serve"),
            StopReason::Signal(15)
        );
    }

    #[tokio::test]
    async fn unknown_path_and_wrong_method_are_json_errors() {
        let root = tempfile::tempdir().expect("tempdir");
        let (addr, stop, task) = start(false, root.path()).await;

        let (status, body) = request(addr, "GET", "/nope").await;
        assert_eq!(status, 404);
        let err: ErrorBody = serde_json::from_str(&body).expect("ErrorBody");
        assert!(err.error.contains("GET /nope"), "{}", err.error);
        assert!(err.error.contains("/health"), "{}", err.error);

        let (status, body) = request(addr, "GET", SHUTDOWN_PATH).await;
        assert_eq!(status, 405);
        let err: ErrorBody = serde_json::from_str(&body).expect("ErrorBody");
        assert!(err.error.contains("does not accept GET"), "{}", err.error);
        // A GET on /shutdown must not stop anything.
        assert_eq!(stop.reason(), None);

        stop.stop(StopReason::Requested);
        task.await.expect("join").expect("serve");
    }

    #[tokio::test]
    async fn shutdown_acknowledges_then_stops_the_server() {
        let root = tempfile::tempdir().expect("tempdir");
        let (addr, _stop, task) = start(false, root.path()).await;

        let (status, body) = request(addr, "POST", SHUTDOWN_PATH).await;
        assert_eq!(status, 200, "{body}");
        let ack: ShutdownAck = serde_json::from_str(&body).expect("ShutdownAck");
        assert!(!ack.powering_off, "serve mode only exits");

        let reason = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("server stops")
            .expect("join")
            .expect("serve");
        assert_eq!(reason, StopReason::Requested);
        // The listener is closed afterwards.
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn shutdown_in_init_mode_announces_power_off() {
        let root = tempfile::tempdir().expect("tempdir");
        let (addr, _stop, task) = start(true, root.path()).await;
        let (_, body) = request(addr, "POST", SHUTDOWN_PATH).await;
        let ack: ShutdownAck = serde_json::from_str(&body).expect("ShutdownAck");
        assert!(ack.powering_off);
        task.await.expect("join").expect("serve");
    }

    #[tokio::test]
    async fn extra_routes_are_merged_before_the_fallback() {
        let root = tempfile::tempdir().expect("tempdir");
        let stop = StopSwitch::new();
        let ctx = ServerContext {
            info: AgentInfo {
                release: ReleaseSource::Missing.release(),
                host_config: None,
                started: Instant::now(),
                gpu: None,
            },
            paths: Paths::new(root.path()),
            stop: stop.clone(),
            powers_off: false,
            attestation: None,
            approval: crate::approval::ApprovalGate::not_configured(),
        };
        let extra = Router::new().route(
            "/v1/ping",
            get(|| async { Json(serde_json::json!({"pong": true})) }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(serve(listener, build_app(ctx, extra), stop.clone()));
        let (status, body) = request(addr, "GET", "/v1/ping").await;
        assert_eq!((status, body.as_str()), (200, r#"{"pong":true}"#));
        let (status, _) = request(addr, "GET", "/v1/missing").await;
        assert_eq!(status, 404);
        let (status, body) = request(addr, "GET", HEALTH_PATH).await;
        assert_eq!(status, 200);
        let health: Health = serde_json::from_str(&body).expect("Health");
        assert_eq!(health.host_config, None);
        stop.stop(StopReason::Requested);
        task.await.expect("join").expect("serve");
    }

    #[tokio::test]
    async fn firmware_acpi_serves_the_blobs_or_a_json_404() {
        let root = tempfile::tempdir().expect("tempdir");
        let (addr, stop, task) = start(false, root.path()).await;
        let (status, body) = request(addr, "GET", FIRMWARE_ACPI_PATH).await;
        assert_eq!(status, 404, "{body}");
        let err: ErrorBody = serde_json::from_str(&body).expect("ErrorBody");
        assert!(err.error.contains("qemu_fw_cfg"), "{}", err.error);

        crate::firmware::tests::fake_fw_cfg(root.path());
        let (status, body) = request(addr, "GET", FIRMWARE_ACPI_PATH).await;
        assert_eq!(status, 200, "{body}");
        let acpi: worker_api::FirmwareAcpi = serde_json::from_str(&body).expect("FirmwareAcpi");
        assert_eq!(acpi.rsdp.name, "etc/acpi/rsdp");
        assert_eq!(acpi.rsdp.size, 20);
        assert_eq!(acpi.table_loader.size, 128);

        let (status, _) = request(addr, "POST", FIRMWARE_ACPI_PATH).await;
        assert_eq!(status, 405);
        stop.stop(StopReason::Requested);
        task.await.expect("join").expect("serve");
    }

    #[tokio::test]
    async fn ccel_serves_the_event_log_or_a_json_404() {
        use base64::Engine as _;
        let root = tempfile::tempdir().expect("tempdir");
        let (addr, stop, task) = start(false, root.path()).await;
        let (status, body) = request(addr, "GET", worker_api::CCEL_PATH).await;
        assert_eq!(status, 404, "{body}");
        let err: ErrorBody = serde_json::from_str(&body).expect("ErrorBody");
        assert!(
            err.error.contains("only inside a TDX guest"),
            "{}",
            err.error
        );

        let tables = root.path().join("sys/firmware/acpi/tables");
        std::fs::create_dir_all(tables.join("data")).expect("mkdir");
        let mut table = vec![0u8; 56];
        table[..4].copy_from_slice(b"CCEL");
        table[40..48].copy_from_slice(&65536u64.to_le_bytes());
        std::fs::write(tables.join("CCEL"), &table).expect("table");
        std::fs::write(tables.join("data/CCEL"), b"event log bytes").expect("log");
        let (status, body) = request(addr, "GET", worker_api::CCEL_PATH).await;
        assert_eq!(status, 200, "{body}");
        let c: worker_api::CcelLog = serde_json::from_str(&body).expect("CcelLog");
        let b64 = base64::engine::general_purpose::STANDARD;
        assert_eq!(b64.decode(&c.log_base64).expect("b64"), b"event log bytes");
        assert_eq!(b64.decode(&c.table_base64).expect("b64"), table);
        assert_eq!(c.log_bytes, 15);

        std::fs::write(tables.join("CCEL"), b"XXXX").expect("bad table");
        let (status, body) = request(addr, "GET", worker_api::CCEL_PATH).await;
        assert_eq!(status, 500, "{body}");
        stop.stop(StopReason::Requested);
        task.await.expect("join").expect("serve");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn all_routes_are_served_over_ratls() {
        let root = tempfile::tempdir().expect("tempdir");
        let now = attestation::verify::unix_secs(std::time::SystemTime::now());
        let att = Arc::new(
            crate::attest::Attestor::setup(
                &Paths::new(root.path()),
                Some(b"{}"),
                crate::attest::DevOptions { simulate_tee: true },
                now,
            )
            .expect("attestor"),
        );
        let key = att.simulator_public_key().expect("key");
        let stop = StopSwitch::new();
        let ctx = ServerContext {
            info: AgentInfo {
                release: ReleaseSource::Missing.release(),
                host_config: None,
                started: Instant::now(),
                gpu: None,
            },
            paths: Paths::new(root.path()),
            stop: stop.clone(),
            powers_off: false,
            attestation: Some(att.clone()),
            approval: crate::approval::ApprovalGate::not_configured(),
        };
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let cfg = attestation::tls::server_config(att.resolver(), None).expect("config");
        let tls = crate::tls_listener::TlsListener::new(tcp, Arc::new(cfg)).expect("tls");
        let port = axum::serve::Listener::local_addr(&tls)
            .expect("addr")
            .port();
        let task = tokio::spawn(serve(tls, build_app(ctx, Router::new()), stop.clone()));
        let base = format!("https://127.0.0.1:{port}");
        let results = tokio::task::spawn_blocking(move || {
            let t = Duration::from_secs(20);
            let strict = attestation::RaTlsHttpClient::new(attestation::Verifier::simulated(
                attestation::Policy::default(),
                key,
            ));
            let refused = strict.get(&format!("{base}{HEALTH_PATH}"), t);
            let client = attestation::RaTlsHttpClient::new(
                attestation::Verifier::simulated(
                    attestation::Policy::default().with_simulated(true),
                    key,
                )
                .with_expected_host_config(b"{}".to_vec()),
            );
            let health = client
                .get(&format!("{base}{HEALTH_PATH}"), t)
                .expect("health");
            let attested = client.attest(&base, t).expect("attest");
            let missing = client.get(&format!("{base}/nope"), t).expect("404");
            let bye = client
                .post_json(&format!("{base}{SHUTDOWN_PATH}"), b"", t)
                .expect("shutdown");
            (refused, health, attested, missing, bye)
        })
        .await
        .expect("client");
        let (refused, health, attested, missing, bye) = results;
        let e = refused.expect_err("simulated refused by default");
        assert!(
            e.verdict()
                .expect("verdict")
                .has(attestation::ReasonCode::SimulatedNotAllowed)
        );
        assert_eq!(health.status, 200);
        let h: Health = serde_json::from_slice(&health.body).expect("Health");
        assert_eq!(h.tee.kind, "simulated");
        assert!(attested.verdict.accepted, "{:?}", attested.verdict.reasons);
        assert_eq!(attested.attestation.expect("doc").tee, "simulated");
        assert_eq!(missing.status, 404);
        assert_eq!(bye.status, 200);
        let reason = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("stops")
            .expect("join")
            .expect("serve");
        assert_eq!(reason, StopReason::Requested);
    }

    #[test]
    fn ready_line_carries_the_marker() {
        let line = crate::console::format_line(
            Duration::from_secs(1),
            format_args!("{}", ready_message("0.0.0.0:8443".parse().expect("addr"))),
        );
        assert!(line.contains(worker_api::READY_MARKER), "{line}");
    }

    #[tokio::test]
    async fn stop_switch_keeps_the_first_reason() {
        let s = StopSwitch::new();
        assert_eq!(s.reason(), None);
        s.stop(StopReason::Signal(2));
        s.stop(StopReason::Requested);
        assert_eq!(s.stopped().await, StopReason::Signal(2));
    }
}
