//! Projected ServiceAccount tokens at the broker: the registry snapshot it verifies against,
//! and how that snapshot is kept fresh without a Kubernetes call on the credential path.
//!
//! The registry (the Clusters table) is read whole and kept in memory. The snapshot is re-read:
//! - when it is older than [`ProjectedSettings::registry_ttl`], so a removed cluster or a
//!   retired key stops working within that time;
//! - when a token names an issuer or key the snapshot does not hold (a cluster just registered,
//!   a key just rotated in), at most once per [`ProjectedSettings::refresh_interval`]: such a
//!   request waits for the next allowed read (never longer than the interval) instead of being
//!   refused, so a key registered a moment after the last read works at once, while a flood of
//!   forged tokens, concurrent or not, costs at most one read per interval.
//!
//! When a re-read fails the last good snapshot keeps serving (and the read is retried after the
//! refresh interval); with no snapshot at all the broker answers 503.

use std::sync::Arc;
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
    registry: Arc<dyn ClusterRegistry>,
    clock: Arc<dyn Clock>,
    settings: ProjectedSettings,
    verification: Verification,
    snapshot: RwLock<Option<Snapshot>>,
    reading: Mutex<()>,
}

impl ProjectedIdentities {
    /// A verifier over `registry`.
    pub fn new(
        registry: Arc<dyn ClusterRegistry>,
        clock: Arc<dyn Clock>,
        settings: ProjectedSettings,
    ) -> Self {
        let verification = Verification {
            audience: settings.audience.clone(),
            leeway: i64::try_from(settings.leeway.as_secs()).unwrap_or(i64::MAX),
        };
        Self {
            registry,
            clock,
            settings,
            verification,
            snapshot: RwLock::new(None),
            reading: Mutex::new(()),
        }
    }

    /// Verifies `token` and names the pod it is bound to.
    pub async fn identify(&self, token: &str) -> Result<PodIdentity, IdentifyError> {
        let now = self.clock.now();
        let view = self.fresh_snapshot(now).await?;
        match identify(
            token,
            &view.clusters,
            &self.verification,
            now.unix_timestamp(),
        ) {
            Err(JwtError::UnknownIssuer | JwtError::UnknownKey) => {
                let since = std::time::Duration::try_from(now - view.attempted_at)
                    .unwrap_or(std::time::Duration::ZERO);
                let wait = self.settings.refresh_interval.saturating_sub(since);
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                let view = self.read(view.attempts).await?;
                let now = self.clock.now().unix_timestamp();
                identify(token, &view.clusters, &self.verification, now)
                    .map_err(IdentifyError::Invalid)
            }
            other => other.map_err(IdentifyError::Invalid),
        }
    }

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

    #[tokio::test]
    async fn a_new_key_works_at_once_and_forged_kids_cost_one_read_per_interval() {
        let (registry, clock, identities) = setup();
        let old = Signer::new("old");
        register(&registry, "east", &[&old]);
        identities.identify(&token(&old, &clock)).await.unwrap();
        assert_eq!(registry.reads(), 1);

        // A key registered right after the read: its first token waits for the next allowed
        // read (here the whole interval, the wall clock being frozen) and is served.
        let new = Signer::new("new");
        register(&registry, "east", &[&old, &new]);
        let started = std::time::Instant::now();
        identities.identify(&token(&new, &clock)).await.unwrap();
        assert_eq!(registry.reads(), 2);
        assert!(started.elapsed() >= INTERVAL);

        // Twenty forged kids at once share one read.
        let forged: Vec<Signer> = (0..20)
            .map(|i| Signer::new(&format!("forged-{i}")))
            .collect();
        let tokens: Vec<String> = forged.iter().map(|s| token(s, &clock)).collect();
        let results =
            futures::future::join_all(tokens.iter().map(|t| identities.identify(t))).await;
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(IdentifyError::Invalid(JwtError::UnknownKey))))
        );
        assert_eq!(registry.reads(), 3);

        // One after the other, each waits an interval: one read per interval at most.
        let started = std::time::Instant::now();
        for signer in forged.iter().take(3) {
            assert!(identities.identify(&token(signer, &clock)).await.is_err());
        }
        assert_eq!(registry.reads(), 6);
        assert!(started.elapsed() >= 3 * INTERVAL);
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
