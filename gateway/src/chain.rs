//! The gateway's view of the root contract: one [`ChainList`] per list (image hashes, model
//! hashes), with the answers it got and when the chain gave them.
//!
//! Two ways to ask, for the two places that ask:
//!
//! - [`ChainList::check`] (blocking; the background worker checks run it on a blocking thread)
//!   asks the chain through `ton_root::RootAllowList` (whose own cache holds answers for half the
//!   freshness bound) and records the answer with the time the chain gave it;
//! - [`ChainList::fresh`] (never blocks; the TLS handshakes of forwarded requests run it inside
//!   the async runtime) only reads the recorded answers and accepts one younger than the
//!   freshness bound `max_age`. No fresh answer — the chain has not been reachable for `max_age`
//!   — is an error, so a new session to a worker is refused (fail closed) and the reason says so.
//!
//! [`BlockingView`] and [`FreshView`] present them as attestation's `AllowList`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use attestation::AllowList;
use attestation::allowlist::AllowListError;

/// Asks the chain about one hash: `(approved, when the chain answered)`, or why it could not.
pub type Checker = Arc<dyn Fn(&[u8; 32]) -> Result<(bool, SystemTime), String> + Send + Sync>;

/// A source of wall-clock time (injectable for tests).
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// One list of the root contract with its recorded answers.
pub struct ChainList {
    what: &'static str,
    root: String,
    checker: Checker,
    max_age: Duration,
    clock: Clock,
    answers: Mutex<HashMap<[u8; 32], (bool, SystemTime)>>,
}

impl std::fmt::Debug for ChainList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChainList")
            .field("what", &self.what)
            .field("root", &self.root)
            .field("max_age", &self.max_age)
            .finish_non_exhaustive()
    }
}

impl ChainList {
    /// A list named `what` ("image", "model") of the root `root`, asked through `checker`;
    /// answers are fresh for `max_age`.
    pub fn new(what: &'static str, root: String, checker: Checker, max_age: Duration) -> Self {
        ChainList {
            what,
            root,
            checker,
            max_age,
            clock: Arc::new(SystemTime::now),
            answers: Mutex::new(HashMap::new()),
        }
    }

    /// The root contract's list through toncenter: the `RootAllowList` reuses answers for half
    /// of `max_age`, so a recorded answer is never older than `max_age` while checks run at
    /// least every `max_age / 2`.
    pub fn from_root(
        what: &'static str,
        list: ton_root::RootAllowList<ton_root::Toncenter>,
        max_age: Duration,
    ) -> Self {
        let root = list.root();
        let list = list.with_max_age(max_age / 2);
        let checker: Checker = Arc::new(move |h| {
            list.check(h)
                .map(|a| (a.approved, a.checked_at))
                .map_err(|e| e.to_string())
        });
        Self::new(what, root, checker, max_age)
    }

    /// Use `clock` instead of the system clock (tests).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The root contract's address.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// The freshness bound.
    pub fn max_age(&self) -> Duration {
        self.max_age
    }

    /// Ask the chain (blocking) and record the answer.
    pub fn check(&self, h: &[u8; 32]) -> Result<bool, String> {
        let (approved, at) = (self.checker)(h).map_err(|e| {
            format!(
                "the root contract {} cannot be asked whether {} hash {} is approved ({e}); \
                 failing closed: no new sessions to workers that cannot be checked",
                self.root,
                self.what,
                hex::encode(h)
            )
        })?;
        if let Ok(mut a) = self.answers.lock() {
            a.insert(*h, (approved, at));
        }
        Ok(approved)
    }

    /// A recorded answer younger than `max_age`, without asking the chain.
    pub fn fresh(&self, h: &[u8; 32]) -> Result<bool, String> {
        let now = (self.clock)();
        let got = self.answers.lock().ok().and_then(|a| a.get(h).copied());
        match got {
            Some((approved, at)) if now.duration_since(at).is_ok_and(|age| age < self.max_age) => {
                Ok(approved)
            }
            Some((_, at)) => Err(format!(
                "the last answer of the root contract {} about {} hash {} is {} s old, older than \
                 --max-age {} s, and the chain has not answered since; failing closed",
                self.root,
                self.what,
                hex::encode(h),
                now.duration_since(at).map_or(0, |d| d.as_secs()),
                self.max_age.as_secs()
            )),
            None => Err(format!(
                "the root contract {} has not been asked about {} hash {} yet; failing closed \
                 until the gateway's background check gets an answer",
                self.root,
                self.what,
                hex::encode(h)
            )),
        }
    }
}

/// [`ChainList::check`] as an `AllowList` (blocking).
#[derive(Debug, Clone)]
pub struct BlockingView(pub Arc<ChainList>);

impl AllowList for BlockingView {
    fn contains(&self, h: &[u8; 32]) -> Result<bool, AllowListError> {
        self.0.check(h).map_err(AllowListError::Unavailable)
    }
}

/// [`ChainList::fresh`] as an `AllowList` (never blocks).
#[derive(Debug, Clone)]
pub struct FreshView(pub Arc<ChainList>);

impl AllowList for FreshView {
    fn contains(&self, h: &[u8; 32]) -> Result<bool, AllowListError> {
        self.0.fresh(h).map_err(AllowListError::Unavailable)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// A fake chain: listed hashes, an up/down switch, and a settable clock.
    fn fake() -> (ChainList, Arc<AtomicBool>, Arc<AtomicBool>, Arc<AtomicU64>) {
        let up = Arc::new(AtomicBool::new(true));
        let listed = Arc::new(AtomicBool::new(true));
        let secs = Arc::new(AtomicU64::new(1_000));
        let t = secs.clone();
        let clock: Clock = Arc::new(move || {
            SystemTime::UNIX_EPOCH + Duration::from_secs(t.load(Ordering::SeqCst))
        });
        let (u, l, c) = (up.clone(), listed.clone(), clock.clone());
        let checker: Checker = Arc::new(move |_| {
            if u.load(Ordering::SeqCst) {
                Ok((l.load(Ordering::SeqCst), c()))
            } else {
                Err("connection refused".into())
            }
        });
        let list = ChainList::new("image", "EQroot".into(), checker, Duration::from_secs(10))
            .with_clock(clock);
        (list, up, listed, secs)
    }

    #[test]
    fn fresh_answers_only_within_max_age_and_never_before_asking() {
        let (list, up, listed, secs) = fake();
        let h = [7; 32];
        let e = list.fresh(&h).unwrap_err();
        assert!(
            e.contains("not been asked") && e.contains("failing closed"),
            "{e}"
        );
        assert!(list.check(&h).unwrap());
        assert!(list.fresh(&h).unwrap());
        secs.fetch_add(9, Ordering::SeqCst);
        assert!(list.fresh(&h).unwrap(), "9 s old is still fresh");
        secs.fetch_add(1, Ordering::SeqCst);
        let e = list.fresh(&h).unwrap_err();
        assert!(e.contains("10 s old") && e.contains("--max-age 10"), "{e}");
        // The chain is down: checking fails closed and names the root; nothing fresh appears.
        up.store(false, Ordering::SeqCst);
        let e = list.check(&h).unwrap_err();
        assert!(e.contains("EQroot") && e.contains("failing closed"), "{e}");
        assert!(list.fresh(&h).is_err());
        // Back up, and the hash was removed: the new answer replaces the old one at once.
        up.store(true, Ordering::SeqCst);
        listed.store(false, Ordering::SeqCst);
        assert!(!list.check(&h).unwrap());
        assert!(!list.fresh(&h).unwrap());
        assert!(!FreshView(Arc::new(list)).contains(&h).unwrap());
    }
}
