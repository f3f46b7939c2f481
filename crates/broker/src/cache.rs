//! The broker's credential cache: one `AssumeRole` answer per pod and role, reused while it
//! still has more validity left than anyone asking would want refreshed.
//!
//! Why: in `direct` injection a pod's SDKs fetch from the broker with no sidecar in between, and
//! a pod running short-lived processes (every `aws` CLI call is a new process) fetches once per
//! process. Without a cache each fetch would be an `AssumeRole`.
//!
//! The rules:
//! - **What is checked is unchanged.** The broker verifies the token and re-reads the
//!   Allowances rows (and, in `secret` mode, the token record) on every request, before the
//!   cache is consulted: the cache only saves the `AssumeRole`. A refused allowance also drops
//!   every entry of its ServiceAccount at once ([`CredentialCache::forget`]).
//! - **Never shared between pods.** The key is the subject (cluster, namespace,
//!   ServiceAccount), the pod (its uid from a projected token, or the `secret`-mode token's
//!   hash), and a digest of the whole `AssumeRole` request (role, `ExternalId`, session name,
//!   tags, `SourceIdentity`, duration): two requests share an entry only if STS would have been
//!   asked exactly the same thing for the same pod.
//! - **Reused while more than the refresh point is left**: the sidecar's default window for the
//!   credentials' lifetime ([`Window::sidecar_default`]: 15 minutes, the SDKs' refresh point,
//!   plus 5 minutes, so 20 minutes of one-hour credentials; a third plus a sixth of shorter
//!   ones). An SDK refreshing 15 minutes ahead, or a sidecar refreshing ahead, therefore never
//!   gets back the credentials it is replacing.
//! - **Bounded**: at most `max_entries` entries, each at most [`MAX_ENTRY_BYTES`] of
//!   credentials (larger answers are served, not kept). When full, entries past their reuse
//!   point go first, then the one closest to expiry.
//! - **One `AssumeRole` at a time per entry**: concurrent misses for one pod and role wait for
//!   the first; a failure is not cached (the next request tries again).
//!
//! The cache is per process: per warm Lambda instance, or per `iam-broker serve` replica.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use iam_broker_kernel::allowance::Subject;
use iam_broker_kernel::clock::Clock;
use iam_broker_kernel::credentials::{Credentials, Window};
use iam_broker_kernel::ports::{AssumeRoleRequest, IssueError};

/// The largest credentials (access key id, secret and session token together) the cache keeps.
/// STS session tokens are usually well under 2 KiB; with session tags and a packed policy they
/// grow, and beyond this they are served but not kept, so the cache's memory stays bounded by
/// `max_entries × MAX_ENTRY_BYTES` plus a small overhead per entry.
pub const MAX_ENTRY_BYTES: usize = 8 * 1024;

/// Which pod a cache entry belongs to.
#[derive(Debug, Clone, Copy)]
pub enum Holder<'a> {
    /// A projected token's pod, by uid (stable across token rotations).
    PodUid(&'a str),
    /// A `secret`-mode token, by hash (one per pod).
    TokenHash(&'a str),
}

/// The key of one entry: who, which pod, and exactly what STS would be asked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    subject: Subject,
    entry: [u8; 32],
}

impl CacheKey {
    /// The key for `request`, made for `holder`, a pod of `subject`.
    pub fn new(subject: &Subject, holder: Holder<'_>, request: &AssumeRoleRequest) -> Self {
        let mut digest = Sha256::new();
        let mut field = |bytes: &[u8]| {
            // Length-prefixed, so no two different field lists hash the same bytes.
            digest.update((bytes.len() as u64).to_be_bytes());
            digest.update(bytes);
        };
        match holder {
            Holder::PodUid(uid) => {
                field(b"pod-uid");
                field(uid.as_bytes());
            }
            Holder::TokenHash(hash) => {
                field(b"token-hash");
                field(hash.as_bytes());
            }
        }
        field(request.role_arn.as_bytes());
        field(request.session_name.as_bytes());
        field(&request.duration.as_secs().to_be_bytes());
        field(&(request.tags.len() as u64).to_be_bytes());
        for (key, value) in &request.tags {
            field(key.as_bytes());
            field(value.as_bytes());
        }
        for optional in [
            &request.source_identity,
            &request.external_id,
            &request.policy,
        ] {
            match optional {
                Some(value) => {
                    field(b"some");
                    field(value.as_bytes());
                }
                None => field(b"none"),
            }
        }
        Self {
            subject: subject.clone(),
            entry: digest.finalize().into(),
        }
    }
}

/// Credentials kept for reuse, with the window fixed when they arrived.
struct Cached {
    credentials: Credentials,
    window: Window,
}

impl Cached {
    /// Whether these may be handed out at `now`: more than the refresh point left.
    fn reusable(&self, now: OffsetDateTime) -> bool {
        self.credentials.expiration - now > span(self.window.refresh_point())
    }
}

/// One entry: its credentials once issued. The async lock makes concurrent misses wait for the
/// one `AssumeRole` in flight.
#[derive(Default)]
struct Slot {
    cached: Option<Cached>,
}

type SharedSlot = Arc<tokio::sync::Mutex<Slot>>;

#[derive(Default)]
struct Entries {
    by_subject: HashMap<Subject, HashMap<[u8; 32], SharedSlot>>,
    len: usize,
}

/// A hit or a miss, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Served from the cache: no `AssumeRole`.
    Hit,
    /// `AssumeRole` was called (the cache was empty for this key, past its reuse point, off, or
    /// full of entries in flight).
    Miss,
}

impl Lookup {
    /// `hit` or `miss`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
        }
    }
}

/// The broker's credential cache (see the module documentation).
pub struct CredentialCache {
    max_entries: usize,
    clock: Arc<dyn Clock>,
    entries: Mutex<Entries>,
}

impl CredentialCache {
    /// A cache of at most `max_entries` entries (`0`: nothing is ever kept).
    pub fn new(max_entries: usize, clock: Arc<dyn Clock>) -> Self {
        Self {
            max_entries,
            clock,
            entries: Mutex::new(Entries::default()),
        }
    }

    /// How many entries are held (in flight or issued).
    pub fn len(&self) -> usize {
        self.lock().len
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes of credentials held (access key ids, secrets and session tokens), for the
    /// memory figures.
    pub fn credential_bytes(&self) -> usize {
        let slots: Vec<SharedSlot> = self
            .lock()
            .by_subject
            .values()
            .flat_map(|m| m.values().cloned())
            .collect();
        slots
            .iter()
            .filter_map(|slot| slot.try_lock().ok())
            .filter_map(|slot| slot.cached.as_ref().map(|c| size(&c.credentials)))
            .sum()
    }

    /// The credentials for `key`: the kept ones while reusable, else `issue()`'s, kept when
    /// they fit. Concurrent calls for one key share one `issue()`.
    pub async fn get_or_issue<F, Fut>(
        &self,
        key: CacheKey,
        issue: F,
    ) -> Result<(Credentials, Lookup), IssueError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Credentials, IssueError>>,
    {
        let Some(slot) = self.slot(&key) else {
            return issue().await.map(|c| (c, Lookup::Miss));
        };
        let mut guard = slot.lock().await;
        let now = self.clock.now();
        if let Some(cached) = guard.cached.as_ref().filter(|c| c.reusable(now)) {
            return Ok((cached.credentials.clone(), Lookup::Hit));
        }
        guard.cached = None;
        match issue().await {
            Ok(credentials) => {
                let now = self.clock.now();
                let lifetime =
                    Duration::try_from(credentials.expiration - now).unwrap_or(Duration::ZERO);
                let cached = Cached {
                    credentials,
                    window: Window::sidecar_default(lifetime),
                };
                let credentials = cached.credentials.clone();
                if cached.reusable(now) && size(&credentials) <= MAX_ENTRY_BYTES {
                    guard.cached = Some(cached);
                } else {
                    drop(guard);
                    self.remove(&key, &slot);
                }
                Ok((credentials, Lookup::Miss))
            }
            Err(error) => {
                drop(guard);
                self.remove(&key, &slot);
                Err(error)
            }
        }
    }

    /// Drops every entry of `subject` (its allowance was refused: nothing issued before may be
    /// handed out again, even if the allowance comes back).
    pub fn forget(&self, subject: &Subject) {
        let mut entries = self.lock();
        if let Some(removed) = entries.by_subject.remove(subject) {
            entries.len -= removed.len();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The entry for `key`, made (and room made for it) if needed; `None` when the cache is off
    /// or every entry is in flight.
    fn slot(&self, key: &CacheKey) -> Option<SharedSlot> {
        if self.max_entries == 0 {
            return None;
        }
        let mut entries = self.lock();
        if let Some(slot) = entries
            .by_subject
            .get(&key.subject)
            .and_then(|m| m.get(&key.entry))
        {
            return Some(Arc::clone(slot));
        }
        if entries.len >= self.max_entries {
            make_room(&mut entries, self.clock.now());
            if entries.len >= self.max_entries {
                return None;
            }
        }
        let slot = SharedSlot::default();
        entries
            .by_subject
            .entry(key.subject.clone())
            .or_default()
            .insert(key.entry, Arc::clone(&slot));
        entries.len += 1;
        Some(slot)
    }

    /// Removes `key`'s entry if it is still `slot` (not already replaced or forgotten).
    fn remove(&self, key: &CacheKey, slot: &SharedSlot) {
        let mut entries = self.lock();
        let Some(map) = entries.by_subject.get_mut(&key.subject) else {
            return;
        };
        if map.get(&key.entry).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            map.remove(&key.entry);
            let empty = map.is_empty();
            entries.len -= 1;
            if empty {
                entries.by_subject.remove(&key.subject);
            }
        }
    }
}

/// Frees at least one place: first every entry that can no longer be reused, then, if none,
/// the one closest to expiry. Entries in flight (locked) are left alone.
fn make_room(entries: &mut Entries, now: OffsetDateTime) {
    let mut soonest: Option<(OffsetDateTime, Subject, [u8; 32])> = None;
    let mut removed = 0;
    for (subject, map) in entries.by_subject.iter_mut() {
        map.retain(|entry, slot| {
            let Ok(slot) = slot.try_lock() else {
                return true;
            };
            match slot.cached.as_ref() {
                Some(cached) if cached.reusable(now) => {
                    let expiration = cached.credentials.expiration;
                    if soonest.as_ref().is_none_or(|(t, _, _)| expiration < *t) {
                        soonest = Some((expiration, subject.clone(), *entry));
                    }
                    true
                }
                // Past its reuse point, or never issued and not in flight (its request failed).
                _ => {
                    removed += 1;
                    false
                }
            }
        });
    }
    entries.by_subject.retain(|_, map| !map.is_empty());
    entries.len -= removed;
    if removed == 0
        && let Some((_, subject, entry)) = soonest
        && let Some(map) = entries.by_subject.get_mut(&subject)
        && map.remove(&entry).is_some()
    {
        entries.len -= 1;
        if map.is_empty() {
            entries.by_subject.remove(&subject);
        }
    }
}

fn size(credentials: &Credentials) -> usize {
    credentials.access_key_id.len()
        + credentials.secret_access_key.len()
        + credentials.session_token.len()
}

fn span(duration: Duration) -> time::Duration {
    time::Duration::try_from(duration).unwrap_or(time::Duration::MAX)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use time::macros::datetime;

    use super::*;

    const T0: OffsetDateTime = datetime!(2026-12-05 06:00:00 UTC);
    const ROLE: &str = "arn:aws:iam::123456789012:role/iam-broker/s3_reader";

    struct TestClock(StdMutex<OffsetDateTime>);
    impl Clock for TestClock {
        fn now(&self) -> OffsetDateTime {
            *self.0.lock().unwrap()
        }
    }
    impl TestClock {
        fn set(&self, t: OffsetDateTime) {
            *self.0.lock().unwrap() = t;
        }
    }

    /// An STS stand-in that counts calls and answers credentials of `lifetime` from now.
    struct Sts {
        clock: Arc<TestClock>,
        calls: AtomicUsize,
        lifetime: time::Duration,
        token_len: usize,
    }

    impl Sts {
        fn new(clock: &Arc<TestClock>, lifetime_seconds: i64) -> Self {
            Self {
                clock: Arc::clone(clock),
                calls: AtomicUsize::new(0),
                lifetime: time::Duration::seconds(lifetime_seconds),
                token_len: 800,
            }
        }

        async fn issue(&self) -> Result<Credentials, IssueError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            Ok(Credentials {
                access_key_id: format!("ASIA{n:016}"),
                secret_access_key: "s".repeat(40),
                session_token: "t".repeat(self.token_len),
                expiration: self.clock.now() + self.lifetime,
            })
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    fn setup(max: usize, lifetime: i64) -> (Arc<TestClock>, CredentialCache, Sts) {
        let clock = Arc::new(TestClock(StdMutex::new(T0)));
        let cache = CredentialCache::new(max, clock.clone());
        let sts = Sts::new(&clock, lifetime);
        (clock, cache, sts)
    }

    fn subject(sa: &str) -> Subject {
        Subject::service_account("team-a", sa).unwrap()
    }

    fn request(session: &str, external_id: Option<&str>) -> AssumeRoleRequest {
        AssumeRoleRequest {
            role_arn: ROLE.to_owned(),
            session_name: session.to_owned(),
            duration: Duration::from_secs(3600),
            tags: Vec::new(),
            source_identity: None,
            external_id: external_id.map(str::to_owned),
            policy: None,
        }
    }

    fn key(sa: &str, uid: &str) -> CacheKey {
        CacheKey::new(
            &subject(sa),
            Holder::PodUid(uid),
            &request(&format!("team-a_{sa}_{uid}"), None),
        )
    }

    async fn fetch(cache: &CredentialCache, sts: &Sts, key: CacheKey) -> (String, Lookup) {
        let (credentials, lookup) = cache.get_or_issue(key, || sts.issue()).await.unwrap();
        (credentials.access_key_id, lookup)
    }

    #[tokio::test]
    async fn one_hour_credentials_are_reused_while_more_than_twenty_minutes_are_left() {
        let (clock, cache, sts) = setup(10, 3600);
        let (first, lookup) = fetch(&cache, &sts, key("app", "uid-1")).await;
        assert_eq!(lookup, Lookup::Miss);

        // A new process every minute for 39 minutes: the same credentials, no STS call.
        for minute in 1..40 {
            clock.set(T0 + time::Duration::minutes(minute));
            assert_eq!(
                fetch(&cache, &sts, key("app", "uid-1")).await,
                (first.clone(), Lookup::Hit)
            );
        }
        clock.set(T0 + time::Duration::seconds(2399));
        assert_eq!(
            fetch(&cache, &sts, key("app", "uid-1")).await.1,
            Lookup::Hit
        );
        // Exactly 20 minutes left: an SDK refreshing 15 minutes ahead, or a sidecar refreshing
        // 5 minutes before that, must get new credentials, not these.
        clock.set(T0 + time::Duration::seconds(2400));
        let (second, lookup) = fetch(&cache, &sts, key("app", "uid-1")).await;
        assert_eq!(lookup, Lookup::Miss);
        assert_ne!(second, first);
        assert_eq!(sts.calls(), 2);
    }

    #[tokio::test]
    async fn fifteen_minute_credentials_are_reused_for_the_window_the_sidecar_uses() {
        // STS's shortest duration: a third plus a sixth (450 s) must be left.
        let (clock, cache, sts) = setup(10, 900);
        fetch(&cache, &sts, key("app", "uid-1")).await;
        clock.set(T0 + time::Duration::seconds(449));
        assert_eq!(
            fetch(&cache, &sts, key("app", "uid-1")).await.1,
            Lookup::Hit
        );
        clock.set(T0 + time::Duration::seconds(450));
        assert_eq!(
            fetch(&cache, &sts, key("app", "uid-1")).await.1,
            Lookup::Miss
        );
        assert_eq!(sts.calls(), 2);
    }

    #[tokio::test]
    async fn nothing_is_shared_between_pods_roles_or_external_ids() {
        let (_clock, cache, sts) = setup(10, 3600);
        let a = subject("app");
        let req = request("team-a_app_web-1", None);
        let keys = [
            CacheKey::new(&a, Holder::PodUid("uid-1"), &req),
            // Another pod of the same ServiceAccount, even with the same name (a new pod of a
            // StatefulSet gets a new uid).
            CacheKey::new(&a, Holder::PodUid("uid-2"), &req),
            // A Secret-mode token whose hash reads as the uid.
            CacheKey::new(&a, Holder::TokenHash("uid-1"), &req),
            // Another ExternalId or role.
            CacheKey::new(
                &a,
                Holder::PodUid("uid-1"),
                &request("team-a_app_web-1", Some("x")),
            ),
            CacheKey::new(
                &a,
                Holder::PodUid("uid-1"),
                &AssumeRoleRequest {
                    role_arn: "arn:aws:iam::123456789012:role/other".to_owned(),
                    ..req.clone()
                },
            ),
            // Another ServiceAccount.
            CacheKey::new(&subject("other"), Holder::PodUid("uid-1"), &req),
        ];
        let mut seen = std::collections::BTreeSet::new();
        for key in keys {
            let (id, lookup) = fetch(&cache, &sts, key).await;
            assert_eq!(lookup, Lookup::Miss);
            assert!(seen.insert(id));
        }
        assert_eq!(cache.len(), 6);
    }

    #[tokio::test]
    async fn concurrent_misses_for_one_pod_share_one_assume_role() {
        let (_clock, cache, sts) = setup(10, 3600);
        let slow = || async {
            tokio::task::yield_now().await;
            sts.issue().await
        };
        let results = futures::future::join_all(
            (0..10).map(|_| cache.get_or_issue(key("app", "uid-1"), slow)),
        )
        .await;
        assert_eq!(sts.calls(), 1);
        let ids: std::collections::BTreeSet<String> = results
            .into_iter()
            .map(|r| r.unwrap().0.access_key_id)
            .collect();
        assert_eq!(ids.len(), 1);
    }

    #[tokio::test]
    async fn a_failure_is_not_kept() {
        let (_clock, cache, sts) = setup(10, 3600);
        let refused = cache
            .get_or_issue(key("app", "uid-1"), || async {
                Err(IssueError::Refused {
                    code: "AccessDenied".to_owned(),
                    message: "no".to_owned(),
                })
            })
            .await;
        assert!(refused.is_err());
        assert_eq!(cache.len(), 0);
        assert_eq!(
            fetch(&cache, &sts, key("app", "uid-1")).await.1,
            Lookup::Miss
        );
        assert_eq!(sts.calls(), 1);
    }

    #[tokio::test]
    async fn a_refused_allowance_forgets_the_service_account() {
        let (_clock, cache, sts) = setup(10, 3600);
        fetch(&cache, &sts, key("app", "uid-1")).await;
        fetch(&cache, &sts, key("app", "uid-2")).await;
        fetch(&cache, &sts, key("other", "uid-3")).await;
        cache.forget(&subject("app"));
        assert_eq!(cache.len(), 1);
        assert_eq!(
            fetch(&cache, &sts, key("app", "uid-1")).await.1,
            Lookup::Miss
        );
        assert_eq!(
            fetch(&cache, &sts, key("other", "uid-3")).await.1,
            Lookup::Hit
        );
    }

    #[tokio::test]
    async fn the_cache_is_bounded_and_drops_what_cannot_be_reused_first() {
        let (clock, cache, sts) = setup(3, 3600);
        fetch(&cache, &sts, key("app", "old")).await;
        clock.set(T0 + time::Duration::minutes(30));
        fetch(&cache, &sts, key("app", "b")).await;
        clock.set(T0 + time::Duration::minutes(31));
        fetch(&cache, &sts, key("app", "c")).await;
        // "old" is past its reuse point at minute 41: it goes first.
        clock.set(T0 + time::Duration::minutes(41));
        fetch(&cache, &sts, key("app", "d")).await;
        assert_eq!(cache.len(), 3);
        assert_eq!(fetch(&cache, &sts, key("app", "b")).await.1, Lookup::Hit);
        // Full of reusable entries: the one closest to expiry ("b") makes room.
        clock.set(T0 + time::Duration::minutes(42));
        fetch(&cache, &sts, key("app", "e")).await;
        assert_eq!(cache.len(), 3);
        assert_eq!(fetch(&cache, &sts, key("app", "d")).await.1, Lookup::Hit);
        assert_eq!(fetch(&cache, &sts, key("app", "e")).await.1, Lookup::Hit);
        let calls = sts.calls();
        fetch(&cache, &sts, key("app", "b")).await;
        assert_eq!(sts.calls(), calls + 1, "b was evicted");
        assert_eq!(cache.len(), 3);
    }

    #[tokio::test]
    async fn oversized_answers_are_served_not_kept_and_zero_entries_keeps_nothing() {
        let (_clock, cache, mut sts) = setup(10, 3600);
        sts.token_len = MAX_ENTRY_BYTES;
        fetch(&cache, &sts, key("app", "uid-1")).await;
        assert_eq!(cache.len(), 0);
        assert_eq!(cache.credential_bytes(), 0);
        sts.token_len = 800;
        fetch(&cache, &sts, key("app", "uid-1")).await;
        assert_eq!(cache.credential_bytes(), 20 + 40 + 800);

        let (_clock, off, sts) = setup(0, 3600);
        fetch(&off, &sts, key("app", "uid-1")).await;
        fetch(&off, &sts, key("app", "uid-1")).await;
        assert_eq!(sts.calls(), 2);
        assert!(off.is_empty());
    }
}
