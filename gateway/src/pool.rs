//! The workers behind the gateway: their verification state (the verdict cache), in-flight
//! counts, idle verified connections, and the choice of a worker for a request.
//!
//! A worker is *usable* when its last verification succeeded ([`Status::Up`]) less than the
//! verdict's time to live ago. A request goes to a usable worker serving the requested model with
//! the fewest requests in flight (ties in turn), below `max_in_flight`; when every such worker is
//! at its limit the request waits for a slot ([`Pool::acquire`]) until its deadline. Workers
//! already tried by the request (failover) are skipped.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use attestation::Verdict;
use serde::Serialize;
use tokio::sync::Notify;

use crate::upstream::Conn;

/// At most this many verified keys are remembered per worker (the agent rotates hourly).
pub const MAX_KEYS: usize = 4;

/// A worker's verification status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Not checked yet.
    Unknown,
    /// Verified: requests may go there.
    Up,
    /// Verification failed or the worker is unreachable: no requests.
    Down,
}

/// One reason a worker is not used (a verdict reason or the gateway's own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reason {
    /// snake_case code (`image_hash_not_allowed`, `model_hash_not_allowed`, `unreachable`, ...).
    pub code: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl Reason {
    /// A reason.
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Reason {
            code: code.to_owned(),
            message: message.into(),
        }
    }
}

/// What a successful verification found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The full verdict (quote, image hash, RTMR3 replay).
    pub verdict: Verdict,
    /// The worker's verified RA-TLS public key (hex).
    pub key: String,
    /// cw-v1 (or cocoon-v1) image hash checked.
    pub image_hash: Option<String>,
    /// SHA-256 of the served model, from the RTMR3 `model` event (hex).
    pub model_hash: String,
    /// Model ids from `GET /v1/models`.
    pub models: Vec<String>,
}

/// The outcome of one verification of a worker.
#[derive(Debug, Clone)]
pub enum CheckOutcome {
    /// Accepted.
    Up(Box<Verified>),
    /// Not accepted: every reason, and the verdict when there was one.
    Down(Vec<Reason>, Option<Box<Verdict>>),
}

/// What the gateway knows about a worker (served by `/gateway/workers`).
#[derive(Debug, Clone, Serialize)]
pub struct WorkerState {
    /// Up, down or unknown.
    pub status: Status,
    /// Why it is down (empty when up).
    pub reasons: Vec<Reason>,
    /// The last verdict (accepted or not).
    pub verdict: Option<Verdict>,
    /// The image hash of its quote.
    pub image_hash: Option<String>,
    /// The model hash from its RTMR3 log.
    pub model_hash: Option<String>,
    /// The models it serves.
    pub models: Vec<String>,
    /// Its verified RA-TLS keys, newest last (connections pinned to other keys are re-verified).
    pub verified_keys: Vec<String>,
    /// When it was last checked (Unix seconds).
    pub last_check: Option<u64>,
    /// Number of checks, and how many failed.
    pub checks: u64,
    /// Failed checks.
    pub failed_checks: u64,
    #[serde(skip)]
    last_ok: Option<Instant>,
    #[serde(skip)]
    checked: Option<Instant>,
}

impl Default for WorkerState {
    fn default() -> Self {
        WorkerState {
            status: Status::Unknown,
            reasons: vec![Reason::new("not_checked", "not verified yet")],
            verdict: None,
            image_hash: None,
            model_hash: None,
            models: Vec::new(),
            verified_keys: Vec::new(),
            last_check: None,
            checks: 0,
            failed_checks: 0,
            last_ok: None,
            checked: None,
        }
    }
}

/// One worker.
#[derive(Debug)]
pub struct Worker {
    /// Its URL as given (`https://HOST:PORT`).
    pub url: String,
    /// Host to connect to.
    pub host: String,
    /// Port.
    pub port: u16,
    state: Mutex<WorkerState>,
    in_flight: AtomicUsize,
    idle: Mutex<Vec<Conn>>,
    /// Serialises verifications of this worker.
    pub checking: tokio::sync::Mutex<()>,
    /// Requests forwarded to it.
    pub requests: AtomicU64,
}

impl Worker {
    /// A worker at `url` (`https://HOST:PORT`).
    pub fn new(url: &str) -> Result<Self, String> {
        let (host, port) = crate::upstream::host_port(url)?;
        Ok(Worker {
            url: url.trim_end_matches('/').to_owned(),
            host,
            port,
            state: Mutex::new(WorkerState::default()),
            in_flight: AtomicUsize::new(0),
            idle: Mutex::new(Vec::new()),
            checking: tokio::sync::Mutex::new(()),
            requests: AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WorkerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of its state.
    pub fn state(&self) -> WorkerState {
        self.lock().clone()
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Whether requests may go there now (`ttl`: how long a verification stays valid).
    pub fn usable(&self, ttl: Duration) -> bool {
        let s = self.lock();
        s.status == Status::Up && s.last_ok.is_some_and(|t| t.elapsed() < ttl)
    }

    /// Whether it serves `model` (as of its last verification).
    pub fn serves(&self, model: &str) -> bool {
        self.lock().models.iter().any(|m| m == model)
    }

    /// Whether `key` is one of its verified keys (RTMR3 log and model hash checked for it).
    pub fn key_verified(&self, key: &str) -> bool {
        let s = self.lock();
        s.status == Status::Up && s.verified_keys.iter().any(|k| k == key)
    }

    /// Records a verification. Returns the previous status.
    pub fn record(&self, outcome: CheckOutcome) -> Status {
        let mut s = self.lock();
        let before = s.status;
        s.checks += 1;
        s.checked = Some(Instant::now());
        s.last_check = Some(attestation::verify::unix_secs(SystemTime::now()));
        match outcome {
            CheckOutcome::Up(v) => {
                s.status = Status::Up;
                s.reasons.clear();
                s.image_hash = v.image_hash.clone();
                s.model_hash = Some(v.model_hash.clone());
                s.models = v.models.clone();
                if !s.verified_keys.contains(&v.key) {
                    s.verified_keys.push(v.key.clone());
                    let n = s.verified_keys.len();
                    if n > MAX_KEYS {
                        s.verified_keys.drain(..n - MAX_KEYS);
                    }
                }
                s.verdict = Some(v.verdict);
                s.last_ok = Some(Instant::now());
            }
            CheckOutcome::Down(reasons, verdict) => {
                s.status = Status::Down;
                s.failed_checks += 1;
                s.reasons = reasons;
                if let Some(v) = verdict {
                    s.image_hash = v.image_hash_cw_v1.clone().or_else(|| s.image_hash.clone());
                    s.verdict = Some(*v);
                }
                // Nothing verified before stays trusted: every key must be verified again.
                s.verified_keys.clear();
                s.last_ok = None;
            }
        }
        let down = s.status == Status::Down;
        drop(s);
        if down {
            self.idle_clear();
        }
        before
    }

    /// Marks it down at once (a failed connection or a rejected certificate on the request
    /// path), until the next successful verification.
    pub fn mark_down(&self, reason: Reason) {
        let mut s = self.lock();
        s.status = Status::Down;
        s.failed_checks += 1;
        s.reasons = vec![reason];
        s.verified_keys.clear();
        s.last_ok = None;
        drop(s);
        self.idle_clear();
    }

    /// Whether a verification finished after `t`.
    pub fn checked_since(&self, t: Instant) -> bool {
        self.lock().checked.is_some_and(|c| c > t)
    }

    /// Takes an idle connection pinned to a still-verified key, if any.
    pub fn idle_take(&self, max_age: Duration) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(c) = idle.pop() {
            if c.reusable() && c.opened.elapsed() < max_age && self.key_verified(&c.key) {
                return Some(c);
            }
        }
        None
    }

    /// Idle kept-alive connections held for reuse.
    pub fn idle_len(&self) -> usize {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Returns a connection for reuse.
    pub fn idle_put(&self, c: Conn, cap: usize) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < cap && c.reusable() {
            idle.push(c);
        }
    }

    fn idle_clear(&self) {
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

/// Why no worker could be leased.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoWorker {
    /// No usable worker at all: each worker's reasons.
    Unavailable(String),
    /// Usable workers exist, but none serves the model: the models they serve.
    UnknownModel(Vec<String>),
    /// Every usable worker serving the model is at its limit (until the deadline).
    Busy,
    /// Every usable worker serving the model was already tried by this request.
    Exhausted,
}

/// The workers and the choice among them.
#[derive(Debug)]
pub struct Pool {
    /// The workers, in the order given.
    pub workers: Vec<Arc<Worker>>,
    /// Most requests in flight per worker.
    pub max_in_flight: usize,
    /// How long a verification stays valid.
    pub ttl: Duration,
    freed: Notify,
    turn: AtomicUsize,
}

/// A slot on one worker; dropping it frees the slot.
#[derive(Debug)]
pub struct Lease {
    pool: Arc<Pool>,
    /// Index of the worker in [`Pool::workers`].
    pub index: usize,
}

impl Lease {
    /// The worker.
    pub fn worker(&self) -> &Arc<Worker> {
        &self.pool.workers[self.index]
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.workers[self.index]
            .in_flight
            .fetch_sub(1, Ordering::SeqCst);
        self.pool.freed.notify_waiters();
    }
}

impl Pool {
    /// A pool of `workers`.
    pub fn new(workers: Vec<Arc<Worker>>, max_in_flight: usize, ttl: Duration) -> Arc<Self> {
        Arc::new(Pool {
            workers,
            max_in_flight: max_in_flight.max(1),
            ttl,
            freed: Notify::new(),
            turn: AtomicUsize::new(0),
        })
    }

    /// Why nothing is usable: one line per worker.
    pub fn unavailable_reasons(&self) -> String {
        self.workers
            .iter()
            .map(|w| {
                let s = w.state();
                let why = if s.status == Status::Up {
                    "its verification is older than the verdict's time to live (checks are failing \
                     or hanging)"
                        .to_owned()
                } else {
                    s.reasons
                        .iter()
                        .map(|r| format!("{}: {}", r.code, r.message))
                        .collect::<Vec<_>>()
                        .join("; ")
                };
                format!("{}: {why}", w.url)
            })
            .collect::<Vec<_>>()
            .join(" | ")
    }

    /// The models usable workers serve (sorted, deduplicated).
    pub fn models(&self) -> Vec<String> {
        let mut m: Vec<String> = self
            .workers
            .iter()
            .filter(|w| w.usable(self.ttl))
            .flat_map(|w| w.state().models)
            .collect();
        m.sort();
        m.dedup();
        m
    }

    /// One attempt to lease a worker for `model`, skipping `tried`.
    pub fn try_lease(self: &Arc<Self>, model: &str, tried: &[usize]) -> Result<Lease, NoWorker> {
        let usable: Vec<usize> = (0..self.workers.len())
            .filter(|&i| self.workers[i].usable(self.ttl))
            .collect();
        if usable.is_empty() {
            return Err(NoWorker::Unavailable(self.unavailable_reasons()));
        }
        let serving: Vec<usize> = usable
            .iter()
            .copied()
            .filter(|&i| self.workers[i].serves(model))
            .collect();
        if serving.is_empty() {
            return Err(NoWorker::UnknownModel(self.models()));
        }
        let left: Vec<usize> = serving.into_iter().filter(|i| !tried.contains(i)).collect();
        if left.is_empty() {
            return Err(NoWorker::Exhausted);
        }
        let n = self.workers.len();
        let start = self.turn.fetch_add(1, Ordering::Relaxed) % n;
        // Fewest in flight; among equals, the next in turn.
        let mut order = left;
        order.sort_by_key(|&i| (self.workers[i].in_flight(), (i + n - start) % n));
        for i in order {
            let w = &self.workers[i];
            let took = w
                .in_flight
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                    (c < self.max_in_flight).then_some(c + 1)
                })
                .is_ok();
            if took {
                w.requests.fetch_add(1, Ordering::Relaxed);
                return Ok(Lease {
                    pool: self.clone(),
                    index: i,
                });
            }
        }
        Err(NoWorker::Busy)
    }

    /// Leases a worker for `model`, waiting for a free slot until `deadline` when all are busy.
    pub async fn acquire(
        self: &Arc<Self>,
        model: &str,
        tried: &[usize],
        deadline: tokio::time::Instant,
    ) -> Result<Lease, NoWorker> {
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            match self.try_lease(model, tried) {
                Err(NoWorker::Busy) => {}
                other => return other,
            }
            // Wake on a freed slot, and at least every second (workers come back up).
            let wake = deadline.min(tokio::time::Instant::now() + Duration::from_secs(1));
            let _ = tokio::time::timeout_at(wake, freed).await;
            if tokio::time::Instant::now() >= deadline {
                return Err(NoWorker::Busy);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn up(w: &Worker, models: &[&str], key: &str) {
        w.record(CheckOutcome::Up(Box::new(Verified {
            verdict: Verdict {
                accepted: true,
                ..Verdict::default()
            },
            key: key.into(),
            image_hash: Some("aa".into()),
            model_hash: "bb".into(),
            models: models.iter().map(|m| m.to_string()).collect(),
        })));
    }

    fn pool(n: usize, max: usize) -> Arc<Pool> {
        let ws = (0..n)
            .map(|i| Arc::new(Worker::new(&format!("https://127.0.0.1:{}", 1000 + i)).unwrap()))
            .collect();
        Pool::new(ws, max, Duration::from_secs(60))
    }

    #[test]
    fn routes_by_model_and_balances_by_in_flight() {
        let p = pool(3, 2);
        up(&p.workers[0], &["a"], "k0");
        up(&p.workers[1], &["a", "b"], "k1");
        up(&p.workers[2], &["b"], "k2");
        // Model b: workers 1 and 2 only, alternating while their loads are equal.
        let l1 = p.try_lease("b", &[]).unwrap();
        let l2 = p.try_lease("b", &[]).unwrap();
        assert_ne!(l1.index, l2.index);
        assert!([1, 2].contains(&l1.index) && [1, 2].contains(&l2.index));
        // Model a: worker 1 has one in flight, worker 0 none: worker 0 first.
        let a1 = p.try_lease("a", &[]).unwrap();
        assert_eq!(a1.index, 0);
        let a2 = p.try_lease("a", &[]).unwrap();
        // Both now have one in flight.
        assert!([0, 1].contains(&a2.index));
        let _a3 = p.try_lease("a", &[]).unwrap();
        // Workers 0 and 1 full (2 each): model a is busy; model b still has worker 2.
        assert_eq!(p.try_lease("a", &[]).unwrap_err(), NoWorker::Busy);
        let b3 = p.try_lease("b", &[]).unwrap();
        assert_eq!(b3.index, 2);
        drop(a1);
        assert_eq!(
            p.try_lease("a", &[]).unwrap().index,
            0,
            "a freed slot is used"
        );
        // Unknown model: the models usable workers serve.
        assert_eq!(
            p.try_lease("c", &[]).unwrap_err(),
            NoWorker::UnknownModel(vec!["a".into(), "b".into()])
        );
    }

    #[test]
    fn failover_skips_tried_and_down_workers() {
        let p = pool(2, 4);
        up(&p.workers[0], &["m"], "k0");
        up(&p.workers[1], &["m"], "k1");
        let first = p.try_lease("m", &[]).unwrap().index;
        let second = p.try_lease("m", &[first]).unwrap().index;
        assert_ne!(first, second);
        assert_eq!(
            p.try_lease("m", &[first, second]).unwrap_err(),
            NoWorker::Exhausted
        );
        p.workers[0].mark_down(Reason::new("unreachable", "connection refused"));
        for _ in 0..4 {
            assert_eq!(p.try_lease("m", &[]).unwrap().index, 1);
        }
        p.workers[1].record(CheckOutcome::Down(
            vec![Reason::new(
                "allow_list_unavailable",
                "the root contract cannot be asked; failing closed",
            )],
            None,
        ));
        match p.try_lease("m", &[]).unwrap_err() {
            NoWorker::Unavailable(why) => {
                assert!(why.contains("https://127.0.0.1:1000: unreachable"), "{why}");
                assert!(why.contains("failing closed"), "{why}");
            }
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn verdict_cache_keys_expiry_and_drop() {
        let w = Worker::new("https://127.0.0.1:1").unwrap();
        assert!(!w.usable(Duration::from_secs(60)), "unknown is not usable");
        up(&w, &["m"], "k1");
        assert!(w.usable(Duration::from_secs(60)));
        assert!(
            !w.usable(Duration::ZERO),
            "an expired verification is not usable"
        );
        assert!(w.key_verified("k1") && !w.key_verified("k2"));
        // Rotation: a second key verified, both kept, bounded.
        for k in ["k2", "k3", "k4", "k5"] {
            up(&w, &["m"], k);
        }
        let s = w.state();
        assert_eq!(s.verified_keys, ["k2", "k3", "k4", "k5"]);
        assert!(!w.key_verified("k1"));
        // A failed verification forgets every key: nothing stays trusted.
        let before = w.record(CheckOutcome::Down(
            vec![Reason::new("image_hash_not_allowed", "removed")],
            None,
        ));
        assert_eq!(before, Status::Up);
        assert!(!w.key_verified("k5"));
        assert!(!w.usable(Duration::from_secs(60)));
        let s = w.state();
        assert_eq!(s.status, Status::Down);
        assert_eq!(s.reasons[0].code, "image_hash_not_allowed");
        assert_eq!((s.checks, s.failed_checks), (6, 1));
        let t = Instant::now();
        w.mark_down(Reason::new("unreachable", "refused"));
        assert!(!w.checked_since(t), "marking down is not a verification");
        up(&w, &["m"], "k6");
        assert!(w.checked_since(t));
    }

    #[tokio::test]
    async fn acquire_waits_for_a_free_slot_until_the_deadline() {
        let p = pool(1, 1);
        up(&p.workers[0], &["m"], "k");
        let held = p.try_lease("m", &[]).unwrap();
        let dl = tokio::time::Instant::now() + Duration::from_millis(200);
        assert_eq!(p.acquire("m", &[], dl).await.unwrap_err(), NoWorker::Busy);
        let p2 = p.clone();
        let waiter = tokio::spawn(async move {
            let dl = tokio::time::Instant::now() + Duration::from_secs(10);
            p2.acquire("m", &[], dl).await.map(|l| l.index)
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(held);
        assert_eq!(waiter.await.unwrap().unwrap(), 0);
        assert_eq!(p.workers[0].in_flight(), 0);
    }
}
