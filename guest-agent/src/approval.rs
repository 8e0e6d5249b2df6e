//! The approval gate: the agent serves inference only while the root contract named in the host
//! config approves both its own image hash (cw-v1) and the hash of the model it serves.
//!
//! With `root_contract` in the host config the gate asks the chain through the host config's
//! `ton_rpc` (toncenter v2, plain http to an IP address: the guest has no DNS and no TLS client)
//! at start and again every [`DEFAULT_RECHECK`] in the background. Until both hashes are listed,
//! the inference routes answer 503 with an OpenAI-style error that says exactly what is not
//! approved and how the operator fixes it, and `/health` reports the state
//! ([`worker_api::ApprovalStatus`]). Each state change is logged once; a failing check never
//! stops the agent. Without `root_contract` nothing is checked and inference is served
//! ("not_configured").
//!
//! Trust: the agent reads the chain through an endpoint the host chose, so a malicious host can
//! make an unapproved worker believe it is approved (or the reverse). The gate protects honest
//! operators from serving by mistake; clients must still verify RA-TLS and the chain themselves.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use ton_root::wallet::{Network, parse_address};
use ton_root::{Answer, HashKind, RootAllowList, Toncenter, ToncenterConfig};
use worker_api::{
    APPROVAL_APPROVED, APPROVAL_CHECKING, APPROVAL_NOT_APPROVED, APPROVAL_NOT_CONFIGURED,
    APPROVAL_UNAVAILABLE, ApprovalStatus,
};

/// How often the gate asks the chain again.
pub const DEFAULT_RECHECK: Duration = Duration::from_secs(30);

/// Where the gate's answers come from (the chain, or a fake in tests).
pub trait ApprovalSource: Send + Sync {
    /// Whether `hash` is in the root's `kind` list, and when the chain said so.
    fn check(&self, kind: HashKind, hash: &[u8; 32]) -> Result<Answer, String>;
}

/// The root contract read through a toncenter v2 endpoint, one cached list per kind.
pub struct ChainSource {
    image: RootAllowList<Toncenter>,
    model: RootAllowList<Toncenter>,
}

impl ChainSource {
    /// Reads `root` through `rpc`; answers are reused for `max_age`. Rejects URLs the guest
    /// cannot use (no DNS, no TLS) with a message naming the fix.
    pub fn new(rpc: &str, root: &str, max_age: Duration) -> Result<Self, String> {
        check_guest_url(rpc)?;
        let root = parse_address(root, Network::Local)
            .map_err(|e| format!("root_contract in the host config: {e}"))?;
        let transport = || {
            let mut cfg = ToncenterConfig::new(rpc);
            cfg.timeout = Duration::from_secs(5);
            cfg.max_attempts = 2;
            Toncenter::new(cfg)
        };
        Ok(ChainSource {
            image: RootAllowList::new(transport(), root.clone(), HashKind::Image)
                .with_max_age(max_age),
            model: RootAllowList::new(transport(), root, HashKind::Model).with_max_age(max_age),
        })
    }
}

impl ApprovalSource for ChainSource {
    fn check(&self, kind: HashKind, hash: &[u8; 32]) -> Result<Answer, String> {
        let list = match kind {
            HashKind::Model => &self.model,
            _ => &self.image,
        };
        list.check(hash).map_err(|e| e.to_string())
    }
}

/// `ton_rpc` must be `http://<IPv4 or [IPv6]>[:port]/...`: the guest has no resolver and no TLS.
pub fn check_guest_url(rpc: &str) -> Result<(), String> {
    let Some(rest) = rpc.strip_prefix("http://") else {
        return Err(format!(
            "ton_rpc {rpc:?} is not a plain http:// URL: the guest has no TLS client; the host must pass \
             an http://IP:PORT/api/v2 endpoint (host-launcher run --rpc / --guest-rpc)"
        ));
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let host = if authority.starts_with('[') {
        authority
            .split_once(']')
            .map(|(h, _)| &h[1..])
            .unwrap_or_default()
    } else {
        authority.split(':').next().unwrap_or_default()
    };
    if host.parse::<std::net::IpAddr>().is_err() {
        return Err(format!(
            "ton_rpc {rpc:?} does not name an IP address: the guest has no DNS; the host must pass \
             http://IP:PORT/api/v2 (10.0.2.2 is the host under QEMU user networking)"
        ));
    }
    Ok(())
}

struct Inner {
    root: Option<String>,
    rpc: Option<String>,
    image_hash: Option<[u8; 32]>,
    /// `None`: no model configured; `Some(Err)`: configured with an unusable digest.
    model_hash: Option<Result<[u8; 32], String>>,
    source: Result<Arc<dyn ApprovalSource>, String>,
    status: RwLock<ApprovalStatus>,
}

/// The gate; cheap to clone (shared state).
#[derive(Clone)]
pub struct ApprovalGate {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ApprovalGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApprovalGate")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn parse_model_hash(hex_digest: &str) -> Result<[u8; 32], String> {
    hex::decode(hex_digest.trim())
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
        .ok_or_else(|| {
            format!("model_sha256 {hex_digest:?} is not 64 hex digits; fix the host config")
        })
}

impl ApprovalGate {
    /// A gate without a root contract: serves, reports "not_configured".
    pub fn not_configured() -> Self {
        Self::new(None, None, Err("no root contract".into()), None, None)
    }

    /// The gate for a host config: `root_contract` and `ton_rpc` from it, the agent's own cw-v1
    /// `image_hash` (`None` when it has no TEE evidence to compute it from), the served model's
    /// expected SHA-256 (hex, `None` without a model); answers reused for `max_age`.
    pub fn from_host_config(
        config: Option<&worker_api::HostConfig>,
        image_hash: Option<[u8; 32]>,
        model_sha256: Option<&str>,
        max_age: Duration,
    ) -> Self {
        let root = config.and_then(|c| c.root_contract.clone());
        let rpc = config.and_then(|c| c.ton_rpc.clone());
        let source: Result<Arc<dyn ApprovalSource>, String> = match (&root, &rpc) {
            (None, _) => Err("no root contract".into()),
            (Some(_), None) => Err(
                "the host config names a root_contract but no ton_rpc, so the agent cannot read \
                 the chain; launch with `host-launcher run --rpc URL` (or --guest-rpc)"
                    .into(),
            ),
            (Some(root), Some(rpc)) => {
                ChainSource::new(rpc, root, max_age).map(|s| Arc::new(s) as Arc<dyn ApprovalSource>)
            }
        };
        Self::new(root, rpc, source, image_hash, model_sha256)
    }

    /// A gate over any [`ApprovalSource`] (tests use a fake chain).
    pub fn new(
        root: Option<String>,
        rpc: Option<String>,
        source: Result<Arc<dyn ApprovalSource>, String>,
        image_hash: Option<[u8; 32]>,
        model_sha256: Option<&str>,
    ) -> Self {
        let model_hash = model_sha256.map(parse_model_hash);
        let status = ApprovalStatus {
            state: if root.is_some() {
                APPROVAL_CHECKING
            } else {
                APPROVAL_NOT_CONFIGURED
            }
            .into(),
            root: root.clone(),
            image_hash: image_hash.map(hex::encode),
            model_hash: model_hash
                .as_ref()
                .and_then(|m| m.as_ref().ok())
                .map(hex::encode),
            checked_at: None,
            reason: if root.is_some() {
                Some("the first check against the root contract has not finished yet".into())
            } else {
                Some(
                    "no root_contract in the host config: approval is not checked; inference is served"
                        .into(),
                )
            },
        };
        ApprovalGate {
            inner: Arc::new(Inner {
                root,
                rpc,
                image_hash,
                model_hash,
                source,
                status: RwLock::new(status),
            }),
        }
    }

    /// The current state, as `/health` reports it.
    pub fn status(&self) -> ApprovalStatus {
        match self.inner.status.read() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Whether inference may be served now.
    pub fn allows_serving(&self) -> bool {
        let s = self.status();
        s.state == APPROVAL_APPROVED || s.state == APPROVAL_NOT_CONFIGURED
    }

    /// Asks the chain (blocking: call from a blocking thread), stores and returns the new state;
    /// logs one line when the state or its reason changed.
    pub fn check_now(&self) -> ApprovalStatus {
        let new = self.evaluate();
        let changed = {
            let mut guard = match self.inner.status.write() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            let changed = guard.state != new.state || guard.reason != new.reason;
            *guard = new.clone();
            changed
        };
        if changed {
            match &new.reason {
                Some(r) => crate::log_line!("approval: {}: {r}", new.state),
                None => crate::log_line!(
                    "approval: {}: image {} and model {} are approved by root {}",
                    new.state,
                    new.image_hash.as_deref().unwrap_or("-"),
                    new.model_hash.as_deref().unwrap_or("(none)"),
                    new.root.as_deref().unwrap_or("-")
                ),
            }
        }
        new
    }

    fn evaluate(&self) -> ApprovalStatus {
        let i = &self.inner;
        let mut status = self.status();
        let Some(root) = &i.root else {
            return status;
        };
        let publish_hint = |list: &str, what: &str| {
            format!(
                "publish it with `host-launcher publish {list} {what} --root {root} --rpc URL \
                 --mnemonic-file TEAM_WALLET` (the team's owner wallet), then wait for the next check"
            )
        };
        let source = match &i.source {
            Ok(s) => s,
            Err(why) => {
                status.state = APPROVAL_UNAVAILABLE.into();
                status.reason = Some(why.clone());
                return status;
            }
        };
        let mut not_approved = Vec::new();
        let mut unavailable = Vec::new();
        let mut oldest: Option<SystemTime> = None;
        let mut note = |a: &Answer| {
            oldest = Some(oldest.map_or(a.checked_at, |o| o.min(a.checked_at)));
        };
        let rpc = i.rpc.as_deref().unwrap_or("-");
        match &i.image_hash {
            None => not_approved.push(
                "the agent cannot determine its own image hash (no TEE evidence: no TDX quote and \
                 no simulated TEE), so it cannot be approved; run the image in a TD"
                    .to_string(),
            ),
            Some(h) => match source.check(HashKind::Image, h) {
                Ok(a) => {
                    note(&a);
                    if !a.approved {
                        not_approved.push(format!(
                            "image hash {} is not approved by root {root}; {}",
                            hex::encode(h),
                            publish_hint("image-hash", "<image dir or hash>")
                        ));
                    }
                }
                Err(e) => unavailable.push(format!(
                    "cannot read the image list of root {root} through ton_rpc {rpc}: {e}"
                )),
            },
        }
        match &i.model_hash {
            None => {}
            Some(Err(why)) => not_approved.push(why.clone()),
            Some(Ok(h)) => match source.check(HashKind::Model, h) {
                Ok(a) => {
                    note(&a);
                    if !a.approved {
                        not_approved.push(format!(
                            "model hash {} is not approved by root {root}; {}",
                            hex::encode(h),
                            publish_hint("model-hash", &hex::encode(h))
                        ));
                    }
                }
                Err(e) => unavailable.push(format!(
                    "cannot read the model list of root {root} through ton_rpc {rpc}: {e}"
                )),
            },
        }
        status.checked_at = oldest.map(unix_secs);
        if !not_approved.is_empty() {
            status.state = APPROVAL_NOT_APPROVED.into();
            not_approved.extend(unavailable);
            status.reason = Some(format!(
                "not serving inference: {}",
                not_approved.join("; ")
            ));
        } else if !unavailable.is_empty() {
            status.state = APPROVAL_UNAVAILABLE.into();
            status.reason = Some(format!(
                "not serving inference until the chain answers: {}; the host must give the guest \
                 a reachable ton_rpc (http://IP:PORT/api/v2)",
                unavailable.join("; ")
            ));
        } else {
            status.state = APPROVAL_APPROVED.into();
            status.reason = None;
        }
        status
    }

    /// Checks at once and then every `every`, in the background, for the life of the runtime.
    /// Does nothing without a root contract.
    pub fn spawn(&self, every: Duration) {
        if self.inner.root.is_none() {
            return;
        }
        let gate = self.clone();
        tokio::spawn(async move {
            loop {
                let g = gate.clone();
                if let Err(e) = tokio::task::spawn_blocking(move || g.check_now()).await {
                    crate::log_line!("approval: the check failed unexpectedly ({e}); retrying");
                }
                tokio::time::sleep(every).await;
            }
        });
    }

    /// `router` (the inference routes) answering 503 while the gate does not allow serving.
    /// An empty router (no model served) stays empty.
    pub fn guard(&self, router: Router) -> Router {
        if !router.has_routes() {
            // axum panics on a route_layer without routes.
            return router;
        }
        router.route_layer(axum::middleware::from_fn_with_state(self.clone(), gate))
    }
}

async fn gate(State(g): State<ApprovalGate>, req: Request, next: Next) -> Response {
    if g.allows_serving() {
        return next.run(req).await;
    }
    let s = g.status();
    let message = s
        .reason
        .unwrap_or_else(|| "this worker is not approved by its root contract".into());
    (
        StatusCode::SERVICE_UNAVAILABLE,
        axum::Json(serde_json::json!({"error": {
            "message": message,
            "type": "server_error",
            "param": null,
            "code": format!("worker_{}", s.state),
        }})),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A fake root: hashes per kind; `down` makes every call fail.
    #[derive(Default)]
    struct FakeChain {
        listed: Mutex<BTreeSet<(bool, [u8; 32])>>,
        down: AtomicBool,
    }

    impl ApprovalSource for FakeChain {
        fn check(&self, kind: HashKind, hash: &[u8; 32]) -> Result<Answer, String> {
            if self.down.load(Ordering::SeqCst) {
                return Err("transport: connection refused".into());
            }
            Ok(Answer {
                approved: self
                    .listed
                    .lock()
                    .expect("lock")
                    .contains(&(kind == HashKind::Model, *hash)),
                checked_at: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
                cached: false,
            })
        }
    }

    const IMAGE: [u8; 32] = [0x11; 32];
    const MODEL: [u8; 32] = [0x22; 32];
    const ROOT: &str = "EQroot";

    fn gate_with(image: Option<[u8; 32]>, model: Option<&str>) -> (ApprovalGate, Arc<FakeChain>) {
        let chain = Arc::new(FakeChain::default());
        let g = ApprovalGate::new(
            Some(ROOT.into()),
            Some("http://10.0.2.2:8081/api/v2".into()),
            Ok(chain.clone() as Arc<dyn ApprovalSource>),
            image,
            model,
        );
        (g, chain)
    }

    fn list(chain: &FakeChain, model: bool, h: [u8; 32]) {
        chain.listed.lock().expect("lock").insert((model, h));
    }

    #[test]
    fn nothing_is_served_until_image_and_model_are_both_approved() {
        let model_hex = hex::encode(MODEL);
        let (g, chain) = gate_with(Some(IMAGE), Some(&model_hex));
        assert_eq!(g.status().state, APPROVAL_CHECKING);
        assert!(!g.allows_serving(), "not before the first check");

        let s = g.check_now();
        assert_eq!(s.state, APPROVAL_NOT_APPROVED);
        let r = s.reason.expect("reason");
        assert!(
            r.contains(&format!(
                "image hash {} is not approved by root {ROOT}",
                hex::encode(IMAGE)
            )),
            "{r}"
        );
        assert!(
            r.contains(&format!("model hash {model_hex} is not approved")),
            "{r}"
        );
        assert!(r.contains("host-launcher publish image-hash"), "{r}");
        assert!(
            r.contains(&format!("host-launcher publish model-hash {model_hex}")),
            "{r}"
        );
        assert_eq!(s.checked_at, Some(1_700_000_000));
        assert_eq!(s.image_hash.as_deref(), Some(hex::encode(IMAGE).as_str()));
        assert_eq!(s.model_hash.as_deref(), Some(model_hex.as_str()));

        list(&chain, false, IMAGE);
        let s = g.check_now();
        assert_eq!(s.state, APPROVAL_NOT_APPROVED);
        let r = s.reason.expect("reason");
        assert!(!r.contains("image hash"), "image is approved now: {r}");
        assert!(r.contains("model hash"), "{r}");

        list(&chain, true, MODEL);
        let s = g.check_now();
        assert_eq!(s.state, APPROVAL_APPROVED);
        assert_eq!(s.reason, None);
        assert!(g.allows_serving());

        // Removed again: the next check stops serving.
        chain.listed.lock().expect("lock").clear();
        assert_eq!(g.check_now().state, APPROVAL_NOT_APPROVED);
        assert!(!g.allows_serving());
    }

    #[test]
    fn an_image_listed_as_a_model_does_not_count() {
        let (g, chain) = gate_with(Some(IMAGE), None);
        list(&chain, true, IMAGE);
        assert_eq!(g.check_now().state, APPROVAL_NOT_APPROVED);
        list(&chain, false, IMAGE);
        assert_eq!(
            g.check_now().state,
            APPROVAL_APPROVED,
            "no model: image only"
        );
    }

    #[test]
    fn without_its_own_image_hash_the_agent_is_never_approved() {
        let (g, chain) = gate_with(None, None);
        list(&chain, false, IMAGE);
        let s = g.check_now();
        assert_eq!(s.state, APPROVAL_NOT_APPROVED);
        assert!(
            s.reason
                .expect("reason")
                .contains("cannot determine its own image hash (no TEE evidence")
        );
    }

    #[test]
    fn an_unreachable_chain_fails_closed_and_recovers() {
        let (g, chain) = gate_with(Some(IMAGE), None);
        list(&chain, false, IMAGE);
        assert_eq!(g.check_now().state, APPROVAL_APPROVED);
        chain.down.store(true, Ordering::SeqCst);
        let s = g.check_now();
        assert_eq!(s.state, APPROVAL_UNAVAILABLE);
        let r = s.reason.expect("reason");
        assert!(
            r.contains("connection refused") && r.contains("ton_rpc"),
            "{r}"
        );
        assert!(!g.allows_serving());
        chain.down.store(false, Ordering::SeqCst);
        assert_eq!(g.check_now().state, APPROVAL_APPROVED);
    }

    #[test]
    fn not_configured_serves_and_misconfiguration_explains() {
        let g = ApprovalGate::not_configured();
        assert!(g.allows_serving());
        assert_eq!(g.check_now().state, APPROVAL_NOT_CONFIGURED);

        let cfg = worker_api::HostConfig {
            root_contract: Some(
                "0:0000000000000000000000000000000000000000000000000000000000000001".into(),
            ),
            ..Default::default()
        };
        let g = ApprovalGate::from_host_config(Some(&cfg), Some(IMAGE), None, DEFAULT_RECHECK);
        let s = g.check_now();
        assert_eq!(s.state, APPROVAL_UNAVAILABLE);
        assert!(s.reason.expect("reason").contains("no ton_rpc"));

        for (url, want) in [
            ("https://10.0.2.2/api/v2", "no TLS client"),
            ("http://toncenter.example/api/v2", "no DNS"),
        ] {
            let cfg = worker_api::HostConfig {
                ton_rpc: Some(url.into()),
                ..cfg.clone()
            };
            let g = ApprovalGate::from_host_config(Some(&cfg), Some(IMAGE), None, DEFAULT_RECHECK);
            let r = g.check_now().reason.expect("reason");
            assert!(r.contains(want), "{url}: {r}");
        }
        assert!(check_guest_url("http://10.0.2.2:8081/api/v2").is_ok());
        assert!(check_guest_url("http://[fd00::2]:8081/api/v2").is_ok());

        let (g, _) = gate_with(Some(IMAGE), Some("abc"));
        let r = g.check_now().reason.expect("reason");
        assert!(
            r.contains("model_sha256 \"abc\" is not 64 hex digits"),
            "{r}"
        );
    }

    #[tokio::test]
    async fn guarded_routes_answer_503_with_the_reason_until_approved() {
        use axum::body::Body;
        use axum::routing::get;
        use tower::ServiceExt as _;

        let (g, chain) = gate_with(Some(IMAGE), None);
        let app = g.guard(Router::new().route("/v1/models", get(|| async { "models" })));
        let call = |app: Router| async move {
            let resp = app
                .oneshot(
                    axum::http::Request::get("/v1/models")
                        .body(Body::empty())
                        .expect("request"),
                )
                .await
                .expect("infallible");
            let status = resp.status();
            let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .expect("body");
            (status, String::from_utf8_lossy(&body).to_string())
        };
        let (status, body) = call(app.clone()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["error"]["code"], "worker_checking");
        g.check_now();
        let (status, body) = call(app.clone()).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["error"]["code"], "worker_not_approved");
        assert!(
            v["error"]["message"]
                .as_str()
                .expect("message")
                .contains("host-launcher publish image-hash"),
            "{v}"
        );
        list(&chain, false, IMAGE);
        g.check_now();
        assert_eq!(call(app).await, (StatusCode::OK, "models".to_string()));
        // No model served: nothing to guard (and no panic).
        assert!(!g.guard(Router::new()).has_routes());
    }
}
