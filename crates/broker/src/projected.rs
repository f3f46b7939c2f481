//! Projected ServiceAccount tokens at the broker: the registry snapshot it verifies against,
//! and how that snapshot is kept fresh without a Kubernetes call on the credential path.
//!
//! The registry (the Clusters table) is read whole and kept in memory. The snapshot is re-read:
//! - when it is older than [`ProjectedSettings::registry_ttl`], so a removed cluster or a
//!   retired key stops working within that time (the request that finds it stale waits for the
//!   read, as the first request of an instance does);
//! - when a token names an issuer or key the snapshot does not hold (a cluster just registered,
//!   a key just rotated in). At most one such re-read runs at a time, and at most one per
//!   [`ProjectedSettings::refresh_interval`]: when the last attempt is an interval old, the
//!   request that found the unknown key does the read itself and is then served if the key is
//!   registered (so a key registered a moment ago works at once); every other such request is
//!   refused at once (`403 InvalidToken`), and, if it came within the interval, a re-read starts
//!   in the background when the interval has passed. A flood of forged tokens, concurrent or
//!   not, thus costs one signature check each plus at most one registry read per interval, and
//!   holds at most one request per interval (on Lambda, one invocation) for one read, never for
//!   the interval. On Lambda a background re-read may be frozen with the instance between
//!   invocations; it finishes (or fails its deadline, is logged, and is started again by the
//!   next unknown key) when the instance runs again.
//!
//! When a re-read fails the last good snapshot keeps serving (and the read is retried after the
//! refresh interval); with no snapshot at all the broker answers 503.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use time::OffsetDateTime;
use tokio::sync::{Mutex, RwLock};

use crate::identity::{PodIdentity, Verification, identify};
use iam_broker_kernel::clock::Clock;
use iam_broker_kernel::cluster::RegisteredCluster;
use iam_broker_kernel::jwt::JwtError;
use iam_broker_kernel::ports::{ClusterRegistry, StoreError};

/// Settings of projected-token verification, from [`iam_broker_kernel::Config`].
#[derive(Debug, Clone)]
pub struct ProjectedSettings {
    /// The audience tokens must carry.
    pub audience: String,
    /// Clock skew tolerated on `exp`, `nbf`, `iat`.
    pub leeway: Duration,
    /// The longest token lifetime (`exp - iat`) accepted.
    pub max_lifetime: Duration,
    /// Longest a registry snapshot is used.
    pub registry_ttl: Duration,
    /// Shortest time between two re-reads caused by unknown issuers or keys.
    pub refresh_interval: Duration,
}

/// Why a projected token got no identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentifyError {
    /// The token is refused (403 `InvalidToken`).
    #[error("{0}")]
    Invalid(JwtError),
    /// The registry could not be read and there is no snapshot to fall back on (503).
    #[error("the cluster registry is unavailable")]
    Unavailable(#[source] StoreError),
}

struct Snapshot {
    clusters: Arc<[RegisteredCluster]>,
    /// When the registry was last read successfully.
    read_at: OffsetDateTime,
    /// When it was last read, successfully or not.
    attempted_at: OffsetDateTime,
    /// Bumped at every attempt, so tasks that waited for a read do not repeat it.
    attempts: u64,
}

impl Snapshot {
    fn view(&self) -> View {
        View {
            clusters: self.clusters.clone(),
            attempted_at: self.attempted_at,
            attempts: self.attempts,
        }
    }
}

struct View {
    clusters: Arc<[RegisteredCluster]>,
    attempted_at: OffsetDateTime,
    attempts: u64,
}

/// Verifies projected tokens against a cached registry.
pub struct ProjectedIdentities {
    shared: Arc<Shared>,
    verification: Verification,
}

/// What the background re-read shares with the requests.
struct Shared {
    registry: Arc<dyn ClusterRegistry>,
    clock: Arc<dyn Clock>,
    settings: ProjectedSettings,
    snapshot: RwLock<Option<Snapshot>>,
    reading: Mutex<()>,
    /// A background re-read is under way.
    refreshing: AtomicBool,
    /// Registry reads that succeeded, and that failed (for metrics).
    reads_ok: AtomicU64,
    reads_failed: AtomicU64,
}

/// How the registry snapshot fares, for metrics ([`ProjectedIdentities::stats`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryStats {
    /// Reads of the Clusters table that succeeded since start.
    pub reads_ok: u64,
    /// Reads that failed (the last snapshot kept serving, or there was none).
    pub reads_failed: u64,
    /// Seconds since the snapshot was last read successfully; `None` before the first read.
    pub snapshot_age_seconds: Option<i64>,
    /// Registered clusters in the snapshot.
    pub clusters: usize,
}

impl ProjectedIdentities {
    /// A verifier over `registry`.
    pub fn new(
        registry: Arc<dyn ClusterRegistry>,
        clock: Arc<dyn Clock>,
        settings: ProjectedSettings,
    ) -> Self {
        let seconds = |d: Duration| i64::try_from(d.as_secs()).unwrap_or(i64::MAX);
        let verification = Verification {
            audience: settings.audience.clone(),
            leeway: seconds(settings.leeway),
            max_lifetime: seconds(settings.max_lifetime),
        };
        Self {
            shared: Arc::new(Shared {
                registry,
                clock,
                settings,
                snapshot: RwLock::new(None),
                reading: Mutex::new(()),
                refreshing: AtomicBool::new(false),
                reads_ok: AtomicU64::new(0),
                reads_failed: AtomicU64::new(0),
            }),
            verification,
        }
    }

    /// Reads of the registry so far and the snapshot's age, for metrics. Reads nothing.
    pub async fn stats(&self) -> RegistryStats {
        let now = self.shared.clock.now();
        let snapshot = self.shared.snapshot.read().await;
        RegistryStats {
            reads_ok: self.shared.reads_ok.load(Ordering::Relaxed),
            reads_failed: self.shared.reads_failed.load(Ordering::Relaxed),
            snapshot_age_seconds: snapshot.as_ref().map(|s| (now - s.read_at).whole_seconds()),
            clusters: snapshot.as_ref().map_or(0, |s| s.clusters.len()),
        }
    }

    /// Verifies `token` and names the pod it is bound to.
    pub async fn identify(&self, token: &str) -> Result<PodIdentity, IdentifyError> {
        let now = self.shared.clock.now();
        let view = self.shared.fresh_snapshot(now).await?;
        let result = identify(
            token,
            &view.clusters,
            &self.verification,
            now.unix_timestamp(),
        );
        if let Err(JwtError::UnknownIssuer | JwtError::UnknownKey) = result
            && let Some(fresh) = self.refresh(&view, now).await
        {
            // Read on this request's path (the one request per interval allowed to): the key
            // may have been registered a moment ago.
            return identify(
                token,
                &fresh.clusters,
                &self.verification,
                now.unix_timestamp(),
            )
            .map_err(IdentifyError::Invalid);
        }
        result.map_err(IdentifyError::Invalid)
    }

    /// A token named an issuer or key that `view` lacks: re-reads the registry, unless a
    /// re-read is under way. When the last attempt is at least a refresh interval old, the
    /// calling request does the read and gets the new snapshot back (it is the only request of
    /// the interval that waits, and only for one registry read); otherwise the read is started
    /// in the background for when the interval has passed, and `None` says "refuse now".
    async fn refresh(&self, view: &View, now: OffsetDateTime) -> Option<View> {
        let since = std::time::Duration::try_from(now - view.attempted_at)
            .unwrap_or(std::time::Duration::ZERO);
        let wait = self.shared.settings.refresh_interval.saturating_sub(since);
        let claim = Refreshing::claim(&self.shared)?;
        if wait.is_zero() {
            let fresh = self.shared.read(view.attempts).await.ok();
            drop(claim);
            return fresh;
        }
        let shared = Arc::clone(&self.shared);
        let seen = view.attempts;
        tokio::spawn(async move {
            let _claim = claim;
            tokio::time::sleep(wait).await;
            // A failure is logged by `read` and leaves the last snapshot serving.
            let _ = shared.read(seen).await;
        });
        None
    }
}

/// The one re-read under way for unknown issuers or keys; released when dropped, so a
/// request cancelled in the middle of its read does not stop every later re-read.
struct Refreshing(Arc<Shared>);

impl Refreshing {
    fn claim(shared: &Arc<Shared>) -> Option<Self> {
        shared
            .refreshing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| Self(Arc::clone(shared)))
    }
}

impl Drop for Refreshing {
    fn drop(&mut self) {
        self.0.refreshing.store(false, Ordering::Release);
    }
}

impl Shared {
    async fn fresh_snapshot(&self, now: OffsetDateTime) -> Result<View, IdentifyError> {
        let seen = {
            let snapshot = self.snapshot.read().await;
            match snapshot.as_ref() {
                Some(s)
                    if now - s.read_at < self.settings.registry_ttl
                        || now - s.attempted_at < self.settings.refresh_interval =>
                {
                    return Ok(s.view());
                }
                Some(s) => s.attempts,
                None => 0,
            }
        };
        self.read(seen).await
    }

    /// Re-reads the registry unless another task attempted it since attempt `seen`.
    async fn read(&self, seen: u64) -> Result<View, IdentifyError> {
        let _one_reader = self.reading.lock().await;
        if let Some(s) = self.snapshot.read().await.as_ref()
            && s.attempts != seen
        {
            return Ok(s.view());
        }
        let result = self.registry.clusters().await;
        let counter = if result.is_ok() {
            &self.reads_ok
        } else {
            &self.reads_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let now = self.clock.now();
        let mut snapshot = self.snapshot.write().await;
        match (result, snapshot.as_mut()) {
            (Ok(clusters), _) => {
                let fresh = Snapshot {
                    clusters: clusters.into(),
                    read_at: now,
                    attempted_at: now,
                    attempts: seen.wrapping_add(1),
                };
                let view = fresh.view();
                *snapshot = Some(fresh);
                Ok(view)
            }
            (Err(error), Some(stale)) => {
                tracing::warn!(
                    error = %error,
                    clusters = stale.clusters.len(),
                    "could not re-read the cluster registry; serving the last snapshot"
                );
                stale.attempted_at = now;
                stale.attempts = seen.wrapping_add(1);
                Ok(stale.view())
            }
            (Err(error), None) => Err(IdentifyError::Unavailable(error)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use time::macros::datetime;

    use super::*;
    use iam_broker_testkit::memory::MemoryClusterRegistry;
    use iam_broker_testkit::signer::{Signer, pod_claims};

    const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

    struct TestClock(StdMutex<OffsetDateTime>);
    impl Clock for TestClock {
        fn now(&self) -> OffsetDateTime {
            *self.0.lock().unwrap()
        }
    }
    impl TestClock {
        fn advance(&self, seconds: i64) {
            *self.0.lock().unwrap() += time::Duration::seconds(seconds);
        }
        fn advance_by(&self, duration: Duration) {
            *self.0.lock().unwrap() += duration;
        }
    }

    /// Short, so that the waits below take real time without slowing the suite (and without
    /// tokio's paused clock, whose `test-util` feature would split every build of the
    /// workspace's dependencies in two: one for tests, one for binaries).
    const INTERVAL: Duration = Duration::from_millis(50);

    fn setup() -> (
        Arc<MemoryClusterRegistry>,
        Arc<TestClock>,
        ProjectedIdentities,
    ) {
        let registry = Arc::new(MemoryClusterRegistry::default());
        let clock = Arc::new(TestClock(StdMutex::new(datetime!(2027-01-01 00:00 UTC))));
        let identities = ProjectedIdentities::new(
            registry.clone(),
            clock.clone(),
            ProjectedSettings {
                audience: "iam-broker".to_owned(),
                leeway: Duration::from_secs(60),
                max_lifetime: Duration::from_secs(86_400),
                registry_ttl: Duration::from_secs(60),
                refresh_interval: INTERVAL,
            },
        );
        (registry, clock, identities)
    }

    fn register(registry: &MemoryClusterRegistry, name: &str, signers: &[&Signer]) {
        let cluster =
            RegisteredCluster::new(name, ISSUER, &Signer::jwks(signers), "file t", 0).unwrap();
        futures::executor::block_on(async {
            match registry.insert(&cluster).await {
                Err(StoreError::AlreadyExists) => registry.update(&cluster).await,
                other => other,
            }
        })
        .unwrap();
    }

    fn token(signer: &Signer, clock: &TestClock) -> String {
        signer.sign(&pod_claims(
            ISSUER,
            "ns",
            "sa",
            "web-1",
            clock.now().unix_timestamp(),
        ))
    }

    #[tokio::test]
    async fn the_registry_is_read_once_per_ttl() {
        let (registry, clock, identities) = setup();
        let key = Signer::new("k1");
        register(&registry, "east", &[&key]);
        for _ in 0..5 {
            let pod = identities.identify(&token(&key, &clock)).await.unwrap();
            assert_eq!(pod.cluster.as_str(), "east");
        }
        assert_eq!(registry.reads(), 1);
        clock.advance(61);
        identities.identify(&token(&key, &clock)).await.unwrap();
        assert_eq!(registry.reads(), 2);
    }

    /// Waits (real time, bounded) until the registry has been read `reads` times.
    async fn reads_reach(registry: &MemoryClusterRegistry, reads: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while registry.reads() < reads {
            assert!(
                std::time::Instant::now() < deadline,
                "the background re-read never came: {} reads",
                registry.reads()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_key_registered_a_moment_ago_works_at_once() {
        let (registry, clock, identities) = setup();
        let old = Signer::new("old");
        register(&registry, "east", &[&old]);
        identities.identify(&token(&old, &clock)).await.unwrap();
        assert_eq!(registry.reads(), 1);

        // `cluster refresh` registers a rotated key; the last read is an interval old, so the
        // first token signed with it reads the registry on its own path and is served.
        clock.advance_by(INTERVAL);
        let new = Signer::new("new");
        register(&registry, "east", &[&old, &new]);
        let pod = identities.identify(&token(&new, &clock)).await.unwrap();
        assert_eq!(pod.cluster.as_str(), "east");
        assert_eq!(registry.reads(), 2);
    }

    #[tokio::test]
    async fn an_unknown_key_within_the_interval_is_refused_at_once_and_read_in_the_background() {
        let (registry, clock, identities) = setup();
        let old = Signer::new("old");
        register(&registry, "east", &[&old]);
        identities.identify(&token(&old, &clock)).await.unwrap();
        assert_eq!(registry.reads(), 1);

        // A key registered right after the read: its first token is refused without waiting
        // (not even for the refresh interval), and the re-read comes in the background once
        // the interval has passed; the key's next token is served.
        let new = Signer::new("new");
        register(&registry, "east", &[&old, &new]);
        let started = std::time::Instant::now();
        assert!(matches!(
            identities.identify(&token(&new, &clock)).await,
            Err(IdentifyError::Invalid(JwtError::UnknownKey))
        ));
        assert!(started.elapsed() < INTERVAL, "the request waited");
        assert_eq!(registry.reads(), 1, "not read on the request's path");
        clock.advance_by(INTERVAL);
        reads_reach(&registry, 2).await;
        let pod = identities.identify(&token(&new, &clock)).await.unwrap();
        assert_eq!(pod.cluster.as_str(), "east");
        assert_eq!(registry.reads(), 2);
    }

    #[tokio::test]
    async fn a_cancelled_read_does_not_stop_later_re_reads() {
        let (registry, clock, identities) = setup();
        let key = Signer::new("k1");
        register(&registry, "east", &[&key]);
        identities.identify(&token(&key, &clock)).await.unwrap();
        clock.advance_by(INTERVAL);

        // A forged token's request is dropped while it holds the one re-read (the registry is
        // slow): the claim goes with it, and a later rotated-in key is still read.
        registry.set_delay(Duration::from_secs(5));
        let forged = token(&Signer::new("forged"), &clock);
        let cancelled =
            tokio::time::timeout(Duration::from_millis(20), identities.identify(&forged)).await;
        assert!(cancelled.is_err(), "the read should still be under way");
        registry.set_delay(Duration::ZERO);
        let new = Signer::new("new");
        register(&registry, "east", &[&key, &new]);
        clock.advance_by(INTERVAL);
        let pod = identities.identify(&token(&new, &clock)).await.unwrap();
        assert_eq!(pod.cluster.as_str(), "east");
    }

    #[tokio::test]
    async fn forged_kids_cost_no_wait_and_at_most_one_read_per_interval() {
        let (registry, clock, identities) = setup();
        let key = Signer::new("k1");
        register(&registry, "east", &[&key]);
        identities.identify(&token(&key, &clock)).await.unwrap();
        clock.advance_by(INTERVAL);

        // Twenty forged kids at once: all refused, with one registry read between them (done
        // by the first, the interval having passed; the others do not wait for it).
        let forged: Vec<Signer> = (0..20)
            .map(|i| Signer::new(&format!("forged-{i}")))
            .collect();
        let tokens: Vec<String> = forged.iter().map(|s| token(s, &clock)).collect();
        let started = std::time::Instant::now();
        let results =
            futures::future::join_all(tokens.iter().map(|t| identities.identify(t))).await;
        assert!(started.elapsed() < INTERVAL, "forged tokens waited");
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(IdentifyError::Invalid(JwtError::UnknownKey))))
        );
        reads_reach(&registry, 2).await;

        // One after the other within the interval: refused at once; the one re-read they ask
        // for waits for the interval, in the background.
        let started = std::time::Instant::now();
        for t in &tokens {
            assert!(identities.identify(t).await.is_err());
        }
        assert!(started.elapsed() < INTERVAL, "forged tokens waited");
        assert_eq!(registry.reads(), 2, "read again before the interval passed");
        reads_reach(&registry, 3).await;
        tokio::time::sleep(INTERVAL * 3).await;
        assert_eq!(
            registry.reads(),
            3,
            "one read for twenty tokens, not one each"
        );
    }

    #[tokio::test]
    async fn a_removed_cluster_stops_working_within_the_ttl() {
        let (registry, clock, identities) = setup();
        let key = Signer::new("k1");
        register(&registry, "east", &[&key]);
        identities.identify(&token(&key, &clock)).await.unwrap();
        let name = iam_broker_kernel::cluster::ClusterName::parse("east").unwrap();
        registry.remove(&name).await.unwrap();
        clock.advance(61);
        assert!(matches!(
            identities.identify(&token(&key, &clock)).await,
            Err(IdentifyError::Invalid(JwtError::UnknownIssuer))
        ));
    }

    #[tokio::test]
    async fn an_unreadable_registry_serves_the_last_snapshot_or_503() {
        let (registry, clock, identities) = setup();
        let key = Signer::new("k1");
        register(&registry, "east", &[&key]);
        registry.set_down(true);
        assert!(matches!(
            identities.identify(&token(&key, &clock)).await,
            Err(IdentifyError::Unavailable(_))
        ));
        registry.set_down(false);
        identities.identify(&token(&key, &clock)).await.unwrap();
        registry.set_down(true);
        clock.advance(61);
        let reads = registry.reads();
        identities.identify(&token(&key, &clock)).await.unwrap();
        identities.identify(&token(&key, &clock)).await.unwrap();
        assert_eq!(
            registry.reads(),
            reads + 1,
            "retried once, then after the interval"
        );
        clock.advance(1);
        identities.identify(&token(&key, &clock)).await.unwrap();
        assert_eq!(registry.reads(), reads + 2);
    }
}
