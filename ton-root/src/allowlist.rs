//! The root contract as an allow-list: [`RootAllowList`] answers "is this hash approved?" from the
//! contract's get-methods (`worker_hash_is_valid`, `model_hash_is_valid`, ...) and implements
//! attestation's [`AllowList`] trait, so a verifier can take its image allow-list from the chain.
//!
//! Answers are cached per hash, positive and negative alike, and reused while younger than
//! `max_age` (default [`DEFAULT_MAX_AGE`]). Past that the chain is asked again; when it cannot be
//! reached (or answers something a root contract would not) and no fresh-enough answer exists,
//! the check fails with an error: a stale "approved" is never used, so a hash removed from the
//! root stops being accepted at most `max_age` after the removal, and a verifier that cannot check
//! rejects. [`RootAllowList::check`] also returns when the answer it used was obtained, for
//! reports (`checked_at`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use attestation::allowlist::{AllowList, AllowListError};
use tonlib_core::TonAddress;

use crate::publish::Publisher;
use crate::transport::Transport;
use crate::{Error, Hash256, HashKind};

/// How long an answer is reused unless configured otherwise.
pub const DEFAULT_MAX_AGE: Duration = Duration::from_secs(60);

/// A source of wall-clock time (injectable for tests).
pub type Clock = Arc<dyn Fn() -> SystemTime + Send + Sync>;

/// One answer of the root contract about one hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Answer {
    /// Whether the hash is listed.
    pub approved: bool,
    /// When the chain gave this answer (not when it was read from the cache).
    pub checked_at: SystemTime,
    /// Whether it came from the cache.
    pub cached: bool,
}

/// One list (`kind`) of one root contract, read through a [`Transport`], with a freshness-bounded
/// cache. See the module docs for the rules.
pub struct RootAllowList<T: Transport> {
    publisher: Publisher<T>,
    kind: HashKind,
    max_age: Duration,
    clock: Clock,
    cache: Mutex<HashMap<[u8; 32], (bool, SystemTime)>>,
}

impl<T: Transport> std::fmt::Debug for RootAllowList<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RootAllowList")
            .field("root", &self.root())
            .field("kind", &self.kind)
            .field("max_age", &self.max_age)
            .finish_non_exhaustive()
    }
}

impl<T: Transport> RootAllowList<T> {
    /// The `kind` list of the root contract at `root`, through `transport`; answers are reused
    /// for [`DEFAULT_MAX_AGE`].
    pub fn new(transport: T, root: TonAddress, kind: HashKind) -> Self {
        RootAllowList {
            publisher: Publisher::new(transport, root),
            kind,
            max_age: DEFAULT_MAX_AGE,
            clock: Arc::new(SystemTime::now),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Reuse answers while younger than `max_age` (zero: always ask the chain).
    pub fn with_max_age(mut self, max_age: Duration) -> Self {
        self.max_age = max_age;
        self
    }

    /// Use `clock` instead of the system clock (tests).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// The freshness bound.
    pub fn max_age(&self) -> Duration {
        self.max_age
    }

    /// Which list this is.
    pub fn kind(&self) -> HashKind {
        self.kind
    }

    /// The root contract's address (base64url, as sent to the API).
    pub fn root(&self) -> String {
        self.publisher.root.to_base64_url()
    }

    /// Whether `hash` is approved: a cached answer younger than `max_age`, otherwise a fresh one
    /// from the chain. Errors when the chain cannot be asked or answers nonsense; never falls
    /// back to an older answer.
    pub fn check(&self, hash: &[u8; 32]) -> Result<Answer, Error> {
        let now = (self.clock)();
        if let Some((approved, at)) = self.cached(hash)
            && now.duration_since(at).is_ok_and(|age| age < self.max_age)
        {
            return Ok(Answer {
                approved,
                checked_at: at,
                cached: true,
            });
        }
        let approved = self.publisher.is_listed(self.kind, &Hash256(*hash))?;
        let checked_at = (self.clock)();
        if let Ok(mut c) = self.cache.lock() {
            c.insert(*hash, (approved, checked_at));
        }
        Ok(Answer {
            approved,
            checked_at,
            cached: false,
        })
    }

    /// When the answer currently cached for `hash` was obtained (fresh or not), if any.
    pub fn answer_time(&self, hash: &[u8; 32]) -> Option<SystemTime> {
        self.cached(hash).map(|(_, at)| at)
    }

    fn cached(&self, hash: &[u8; 32]) -> Option<(bool, SystemTime)> {
        // A poisoned lock only means another thread panicked mid-insert: ask the chain instead.
        self.cache.lock().ok().and_then(|c| c.get(hash).copied())
    }
}

impl<T: Transport + Send + Sync> AllowList for RootAllowList<T> {
    fn contains(&self, image_hash: &[u8; 32]) -> Result<bool, AllowListError> {
        self.check(image_hash)
            .map(|a| a.approved)
            .map_err(|e| {
                AllowListError::Unavailable(format!(
                    "cannot check the {} {} on root contract {}: {e}; the check fails closed (not approved) until the chain answers",
                    self.kind.noun(),
                    hex::encode(image_hash),
                    self.root()
                ))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{AddressInfo, GetMethodResult, StackEntry, WalletInfo};
    use crate::wallet::{Network, parse_address};
    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

    /// A scripted root: `listed` hashes answer -1, others 0; `down` fails like an unreachable
    /// endpoint; `garbage` answers what no root contract would. Counts get-method calls.
    #[derive(Default)]
    struct FakeRoot {
        listed: Mutex<Vec<String>>,
        down: std::sync::atomic::AtomicBool,
        garbage: std::sync::atomic::AtomicBool,
        calls: AtomicU32,
        methods: Mutex<Vec<String>>,
    }

    impl Transport for Arc<FakeRoot> {
        fn send_boc(&self, _boc: &[u8]) -> Result<(), Error> {
            Err(Error::Transport("read-only fake".into()))
        }
        fn run_get_method(
            &self,
            _address: &str,
            method: &str,
            int_args: &[String],
        ) -> Result<GetMethodResult, Error> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.methods.lock().expect("lock").push(method.to_string());
            if self.down.load(Ordering::SeqCst) {
                return Err(Error::Transport(
                    "http://10.0.2.2:8081/api/v2/runGetMethod: connection refused".into(),
                ));
            }
            if self.garbage.load(Ordering::SeqCst) {
                return Ok(GetMethodResult {
                    exit_code: 0,
                    stack: vec![StackEntry::Num(7)],
                });
            }
            let listed = self.listed.lock().expect("lock").contains(&int_args[0]);
            Ok(GetMethodResult {
                exit_code: 0,
                stack: vec![StackEntry::Num(if listed { -1 } else { 0 })],
            })
        }
        fn wallet_information(&self, _a: &str) -> Result<WalletInfo, Error> {
            Err(Error::Transport("unused".into()))
        }
        fn address_information(&self, _a: &str) -> Result<AddressInfo, Error> {
            Err(Error::Transport("unused".into()))
        }
    }

    const ROOT: &str = "0:0000000000000000000000000000000000000000000000000000000000000001";

    /// A list over a fake root with a manual clock (seconds since the epoch).
    fn list(kind: HashKind) -> (RootAllowList<Arc<FakeRoot>>, Arc<FakeRoot>, Arc<AtomicU64>) {
        let fake = Arc::new(FakeRoot::default());
        let secs = Arc::new(AtomicU64::new(1_000_000));
        let s = secs.clone();
        let clock: Clock = Arc::new(move || {
            SystemTime::UNIX_EPOCH + Duration::from_secs(s.load(Ordering::SeqCst))
        });
        let root = parse_address(ROOT, Network::Local).expect("root");
        let l = RootAllowList::new(fake.clone(), root, kind)
            .with_max_age(Duration::from_secs(60))
            .with_clock(clock);
        (l, fake, secs)
    }

    fn publish(fake: &FakeRoot, h: &[u8; 32]) {
        fake.listed
            .lock()
            .expect("lock")
            .push(Hash256(*h).to_stack_hex());
    }

    #[test]
    fn positive_answers_are_cached_until_max_age() {
        let (l, fake, secs) = list(HashKind::Image);
        let h = [0xab; 32];
        publish(&fake, &h);
        let a = l.check(&h).expect("check");
        assert!(a.approved && !a.cached);
        assert_eq!(
            a.checked_at,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000)
        );
        secs.fetch_add(59, Ordering::SeqCst);
        let b = l.check(&h).expect("cached");
        assert!(b.approved && b.cached);
        assert_eq!(b.checked_at, a.checked_at, "the time of the answer used");
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
        assert_eq!(l.answer_time(&h), Some(a.checked_at));

        // Removed on chain: still answered from the cache until max_age, then not approved.
        fake.listed.lock().expect("lock").clear();
        assert!(l.check(&h).expect("cached").approved);
        secs.fetch_add(1, Ordering::SeqCst);
        let c = l.check(&h).expect("expired: asks again");
        assert!(!c.approved && !c.cached);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
        assert_eq!(
            fake.methods.lock().expect("lock")[0],
            "worker_hash_is_valid"
        );
    }

    #[test]
    fn negative_answers_are_cached_too() {
        let (l, fake, secs) = list(HashKind::Model);
        let h = [0x01; 32];
        assert!(!l.check(&h).expect("check").approved);
        publish(&fake, &h);
        assert!(!l.check(&h).expect("cached no").approved);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 1);
        secs.fetch_add(60, Ordering::SeqCst);
        assert!(l.check(&h).expect("fresh").approved);
        assert_eq!(fake.methods.lock().expect("lock")[1], "model_hash_is_valid");
        // Another hash is its own cache entry.
        assert!(!l.check(&[0x02; 32]).expect("other").approved);
        assert_eq!(fake.calls.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn zero_max_age_always_asks() {
        let (l, fake, _) = list(HashKind::Image);
        let l = l.with_max_age(Duration::ZERO);
        let h = [3; 32];
        l.check(&h).expect("1");
        l.check(&h).expect("2");
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn unreachable_chain_is_an_error_unless_a_fresh_answer_exists() {
        let (l, fake, secs) = list(HashKind::Image);
        let h = [0x5a; 32];
        publish(&fake, &h);
        fake.down.store(true, Ordering::SeqCst);
        let e = l.check(&h).expect_err("down, nothing cached");
        assert!(matches!(e, Error::Transport(_)), "{e}");
        let e = AllowList::contains(&l, &h).expect_err("fails closed");
        assert!(matches!(e, AllowListError::Unavailable(_)), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("connection refused"), "{msg}");
        assert!(msg.contains(&hex::encode(h)), "{msg}");
        assert!(msg.contains("fails closed"), "{msg}");

        fake.down.store(false, Ordering::SeqCst);
        assert!(AllowList::contains(&l, &h).expect("up"));
        fake.down.store(true, Ordering::SeqCst);
        secs.fetch_add(30, Ordering::SeqCst);
        assert!(
            AllowList::contains(&l, &h).expect("fresh answer survives an outage"),
            "still approved within max_age"
        );
        secs.fetch_add(30, Ordering::SeqCst);
        assert!(
            AllowList::contains(&l, &h).is_err(),
            "a stale approval is never used"
        );
    }

    #[test]
    fn a_clock_going_backwards_is_treated_as_stale() {
        let (l, fake, secs) = list(HashKind::Image);
        let h = [9; 32];
        l.check(&h).expect("1");
        secs.fetch_sub(10, Ordering::SeqCst);
        l.check(&h).expect("2");
        assert_eq!(fake.calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_bad_get_method_reply_is_a_clear_error() {
        let (l, fake, _) = list(HashKind::Image);
        fake.garbage.store(true, Ordering::SeqCst);
        let e = l.check(&[1; 32]).expect_err("garbage");
        let msg = e.to_string();
        assert!(
            msg.contains("worker_hash_is_valid") && msg.contains("expected -1 or 0"),
            "{msg}"
        );
        let e = AllowList::contains(&l, &[1; 32]).expect_err("garbage");
        assert!(e.to_string().contains("expected -1 or 0"), "{e}");
        assert!(l.answer_time(&[1; 32]).is_none(), "nothing cached");
        assert!(format!("{l:?}").contains("RootAllowList"));
    }
}
