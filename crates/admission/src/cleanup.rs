//! Cleanup of what pods leave behind: Secrets whose token record expired (DynamoDB stream
//! `REMOVE` records, which is how TTL expiry shows up) and, in a periodic sweep, records whose
//! Secret is gone and managed Secrets whose record is gone.
//!
//! Everything here tolerates junk: a stream record whose names do not belong together or a Secret
//! without annotations is counted and skipped, never a reason to fail the batch (a failing batch
//! would be retried by the stream). The stream's wire format is the aws adapter's business
//! (`iam_broker_aws::stream`); this module sees [`RemovedRecord`]s.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use crate::patch::{self, ANNOTATION_TOKEN_HASH, LABEL_MANAGED_BY, MANAGED_BY};
use iam_broker_kernel::clock::Clock;
use iam_broker_kernel::ports::{Cluster, ClusterError, StoreError, TokenStore};
use iam_broker_kernel::token::TokenHash;

/// The label selector of every Secret the webhook creates.
pub fn managed_selector() -> String {
    format!("{LABEL_MANAGED_BY}={MANAGED_BY}")
}

/// A Secret a removed token record pointed at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrphanSecret {
    /// Namespace.
    pub namespace: String,
    /// Secret name.
    pub name: String,
}

pub use iam_broker_kernel::record::RemovedRecord;

/// The Secrets the removed records pointed at, and how many records were skipped (names that do
/// not belong together). Only a Secret whose name is the one derived from the record's hash is
/// returned, so a forged record can never point the cleanup at someone else's Secret.
pub fn removed_secrets(records: &[RemovedRecord]) -> (Vec<OrphanSecret>, usize) {
    let mut secrets = Vec::new();
    let mut skipped = 0;
    for record in records {
        let hash = record.token_hash.as_str();
        if record.namespace.is_empty()
            || TokenHash::parse(hash).is_none()
            || patch::secret_name(hash) != record.secret_name
        {
            skipped += 1;
            continue;
        }
        secrets.push(OrphanSecret {
            namespace: record.namespace.clone(),
            name: record.secret_name.clone(),
        });
    }
    (secrets, skipped)
}

/// What one cleanup run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Secrets deleted.
    pub secrets_deleted: usize,
    /// Secrets that were already gone.
    pub secrets_already_gone: usize,
    /// Token records deleted.
    pub records_deleted: usize,
    /// Inputs skipped as junk or too young to judge.
    pub skipped: usize,
    /// Deletes that failed (logged; the next run tries again).
    pub failures: usize,
}

/// Why a sweep could not even start.
#[derive(Debug, thiserror::Error)]
pub enum CleanupError {
    /// The Kubernetes API failed.
    #[error("listing managed Secrets failed: {0}")]
    Cluster(#[from] ClusterError),
    /// The Authorizations table failed.
    #[error("listing token records failed: {0}")]
    Store(#[from] StoreError),
}

/// Cleanup over its ports.
pub struct Cleanup {
    cluster: Arc<dyn Cluster>,
    tokens: Arc<dyn TokenStore>,
    clock: Arc<dyn Clock>,
    grace: Duration,
}

impl Cleanup {
    /// `grace`: how old a record or Secret must be before the sweep judges it (the webhook writes
    /// the Secret a moment before the record; a young one may be mid-admission).
    pub fn new(
        cluster: Arc<dyn Cluster>,
        tokens: Arc<dyn TokenStore>,
        clock: Arc<dyn Clock>,
        grace: Duration,
    ) -> Self {
        Self {
            cluster,
            tokens,
            clock,
            grace,
        }
    }

    /// Deletes the Secrets named by removed token records; `undecodable` stream records (not a
    /// `REMOVE`, no old image) count as skipped.
    pub async fn removed(&self, records: &[RemovedRecord], undecodable: usize) -> Report {
        let (secrets, skipped) = removed_secrets(records);
        let mut report = Report {
            skipped: skipped + undecodable,
            ..Report::default()
        };
        for secret in secrets {
            self.delete_secret(&secret.namespace, &secret.name, &mut report)
                .await;
        }
        report
    }

    /// The sweep: removes expired records (TTL deletion can lag by days) with their Secrets,
    /// records whose Secret is gone, and managed Secrets whose record is gone, each only once
    /// older than the grace period.
    pub async fn sweep(&self) -> Result<Report, CleanupError> {
        let now = self.clock.now().unix_timestamp();
        let grace = i64::try_from(self.grace.as_secs()).unwrap_or(i64::MAX);
        let old_enough = |created: i64| now.saturating_sub(created) >= grace;
        let records = self.tokens.list().await?;
        let secrets = self.cluster.managed_secrets(&managed_selector()).await?;
        let existing: BTreeSet<(&str, &str)> = secrets
            .iter()
            .map(|s| (s.namespace.as_str(), s.name.as_str()))
            .collect();
        let mut report = Report::default();

        // Records: expired, or webhook-made and their Secret gone.
        let mut live: BTreeMap<&str, (&str, &str)> = BTreeMap::new();
        for record in &records {
            let secret = record.secret_name.as_deref();
            let namespace = record.subject.namespace.as_str();
            let expired = record.is_expired(self.clock.now());
            let secret_gone = secret.is_some_and(|name| !existing.contains(&(namespace, name)));
            // A tombstone is judged by when it was retracted: until then it may have been live.
            let since = record.retracted_at.unwrap_or(record.created_at);
            if expired || (secret_gone && old_enough(since)) {
                match self.tokens.delete(&record.token_hash).await {
                    Ok(_) => report.records_deleted += 1,
                    Err(e) => {
                        report.failures += 1;
                        tracing::warn!(token = record.token_hash.short(), error = %e,
                            "sweep: could not delete a token record");
                    }
                }
                if let Some(name) = secret.filter(|_| expired && !secret_gone) {
                    self.delete_secret(namespace, name, &mut report).await;
                }
                continue;
            }
            // A tombstone's Secret is not owned: it goes once old enough (below).
            if let Some(name) = secret.filter(|_| !record.is_retracted()) {
                live.insert(record.token_hash.as_str(), (namespace, name));
            }
        }

        // Secrets: their record (by the hash annotation) is gone or names another Secret.
        for secret in &secrets {
            let hash = secret.annotations.get(ANNOTATION_TOKEN_HASH);
            let owned = hash.is_some_and(|h| {
                live.get(h.as_str()) == Some(&(secret.namespace.as_str(), secret.name.as_str()))
            });
            if owned {
                continue;
            }
            match secret.created_at {
                Some(created) if old_enough(created) => {
                    self.delete_secret(&secret.namespace, &secret.name, &mut report)
                        .await;
                }
                // Too young, or no creation time to judge by: leave it for a later run.
                _ => report.skipped += 1,
            }
        }
        Ok(report)
    }

    async fn delete_secret(&self, namespace: &str, name: &str, report: &mut Report) {
        match self.cluster.delete_secret(namespace, name).await {
            Ok(true) => report.secrets_deleted += 1,
            Ok(false) => report.secrets_already_gone += 1,
            Err(e) => {
                report.failures += 1;
                tracing::warn!(namespace, secret = name, error = %e,
                    "cleanup: could not delete a Secret");
            }
        }
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use iam_broker_kernel::allowance::{RoleArn, Subject};
    use iam_broker_kernel::ports::TokenSecret;
    use iam_broker_kernel::record::TokenRecord;
    use iam_broker_kernel::token::Token;
    use iam_broker_testkit::FixedClock;
    use iam_broker_testkit::memory::{ClusterCall, MemoryCluster, MemoryTokenStore};

    const NOW: i64 = 1_795_000_000;

    fn removed(hash: &str, namespace: &str, secret: &str) -> RemovedRecord {
        RemovedRecord {
            token_hash: hash.to_owned(),
            namespace: namespace.to_owned(),
            secret_name: secret.to_owned(),
        }
    }

    #[test]
    fn only_a_secret_named_after_its_records_hash_is_cleaned_up() {
        let token = Token::mint().unwrap();
        let hash = token.hash();
        let name = patch::secret_name(hash.as_str());
        let records = [
            removed(hash.as_str(), "team-a", &name),
            // a forged or damaged record pointing at someone else's Secret
            removed(hash.as_str(), "team-a", "someone-elses-secret"),
            removed("not-a-hash", "team-a", &name),
            removed(hash.as_str(), "", &name),
        ];
        let (secrets, skipped) = removed_secrets(&records);
        assert_eq!(
            secrets,
            vec![OrphanSecret {
                namespace: "team-a".into(),
                name
            }]
        );
        assert_eq!(skipped, 3);
        assert_eq!(removed_secrets(&[]), (vec![], 0));
    }

    struct World {
        cluster: Arc<MemoryCluster>,
        tokens: Arc<MemoryTokenStore>,
        cleanup: Cleanup,
    }

    fn world() -> World {
        let cluster = Arc::new(MemoryCluster::default());
        let tokens = Arc::new(MemoryTokenStore::default());
        let now = time::OffsetDateTime::from_unix_timestamp(NOW).unwrap();
        let cleanup = Cleanup::new(
            cluster.clone(),
            tokens.clone(),
            Arc::new(FixedClock(now)),
            Duration::from_secs(600),
        );
        World {
            cluster,
            tokens,
            cleanup,
        }
    }

    /// A webhook-made pair: a Secret and (optionally) its record, created `age` seconds ago.
    async fn pair(w: &World, namespace: &str, age: i64, record: bool, expired: bool) -> String {
        let token = Token::mint().unwrap();
        let hash = token.hash();
        let name = patch::secret_name(hash.as_str());
        w.cluster
            .create_secret(&TokenSecret {
                namespace: namespace.into(),
                name: name.clone(),
                labels: [(LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned())].into(),
                annotations: [(ANNOTATION_TOKEN_HASH.to_owned(), hash.as_str().to_owned())].into(),
                token,
            })
            .await
            .unwrap();
        w.cluster.set_created_at(namespace, &name, NOW - age);
        if record {
            w.tokens
                .insert(&TokenRecord {
                    token_hash: hash,
                    subject: Subject::service_account(namespace, "app").unwrap(),
                    role_arn: RoleArn::parse("arn:aws:iam::123456789012:role/iam-broker/r")
                        .unwrap(),
                    secret_name: Some(name.clone()),
                    pod_name: None,
                    created_at: NOW - age,
                    last_used: None,
                    expires: if expired { NOW - 1 } else { NOW + 86_400 },
                    retracted_at: None,
                })
                .await
                .unwrap();
        }
        name
    }

    #[tokio::test]
    async fn stream_removal_deletes_the_secret_once() {
        let w = world();
        let name = pair(&w, "team-a", 0, false, false).await;
        let hash = w.cluster.secrets()[0].token.hash();
        let records = [removed(hash.as_str(), "team-a", &name)];
        let report = w.cleanup.removed(&records, 1).await;
        assert_eq!(report.secrets_deleted, 1);
        assert_eq!(
            report.skipped, 1,
            "the undecodable stream record is counted"
        );
        assert!(w.cluster.secrets().is_empty());
        // a redelivered batch is harmless
        let again = w.cleanup.removed(&records, 0).await;
        assert_eq!((again.secrets_deleted, again.secrets_already_gone), (0, 1));
    }

    #[tokio::test]
    async fn sweep_keeps_pairs_and_removes_orphans_after_the_grace_period() {
        let w = world();
        // a healthy pair, an expired pair, a Secret without record (old and young),
        // and a record whose Secret is gone (old and young)
        let healthy = pair(&w, "a", 3600, true, false).await;
        let expired = pair(&w, "b", 3600, true, true).await;
        let orphan_old = pair(&w, "c", 3600, true, false).await;
        let orphan_young = pair(&w, "f", 10, true, false).await;
        for (ns, name) in [("c", &orphan_old), ("f", &orphan_young)] {
            let hash = w.cluster.secret(ns, name).unwrap().token.hash();
            w.tokens.delete(&hash).await.unwrap();
        }
        let gone_old = pair(&w, "d", 3600, true, false).await;
        w.cluster.delete_secret("d", &gone_old).await.unwrap();
        let gone_young = pair(&w, "e", 10, true, false).await;
        w.cluster.delete_secret("e", &gone_young).await.unwrap();
        // and a managed Secret nobody annotated, with no creation time: left alone
        w.cluster
            .create_secret(&TokenSecret {
                namespace: "g".into(),
                name: "iam-broker-token-unknown".into(),
                labels: [(LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned())].into(),
                annotations: BTreeMap::new(),
                token: Token::mint().unwrap(),
            })
            .await
            .unwrap();

        let report = w.cleanup.sweep().await.unwrap();

        // records: the expired one and the old one whose Secret is gone
        assert_eq!(report.records_deleted, 2, "{report:?}");
        let left: Vec<_> = w.tokens.list().await.unwrap();
        let namespaces: BTreeSet<_> = left.iter().map(|r| r.subject.namespace.clone()).collect();
        assert_eq!(namespaces, ["a".to_owned(), "e".to_owned()].into());
        // Secrets: the expired pair's and the old record-less one; the young record-less one and
        // the one without a creation time stay for a later run
        assert_eq!(report.secrets_deleted, 2, "{report:?}");
        assert_eq!(report.skipped, 2, "{report:?}");
        assert!(w.cluster.secret("a", &healthy).is_some());
        assert!(w.cluster.secret("b", &expired).is_none());
        assert!(w.cluster.secret("c", &orphan_old).is_none());
        assert!(w.cluster.secret("f", &orphan_young).is_some());
        assert_eq!(w.cluster.secrets().len(), 3);
        // a second sweep finds nothing more to do
        let again = w.cleanup.sweep().await.unwrap();
        assert_eq!((again.records_deleted, again.secrets_deleted), (0, 0));
    }

    #[tokio::test]
    async fn sweep_removes_a_tombstones_secret_and_then_the_tombstone() {
        // GIVEN an undone admission whose Secret create landed late: a Secret whose record is a
        // tombstone, both older than the grace period; and a fresh tombstone with its Secret
        let w = world();
        let late = pair(&w, "a", 3600, true, false).await;
        let fresh = pair(&w, "b", 10, true, false).await;
        for (ns, name, retracted_at) in [("a", &late, NOW - 3000), ("b", &fresh, NOW - 10)] {
            let hash = w.cluster.secret(ns, name).unwrap().token.hash();
            let record = w.tokens.record(&hash).await.unwrap().unwrap();
            w.tokens
                .retract(&record.retracted(retracted_at))
                .await
                .unwrap();
        }
        // WHEN the sweep runs twice
        let first = w.cleanup.sweep().await.unwrap();
        let second = w.cleanup.sweep().await.unwrap();
        // THEN the old Secret goes first (a tombstone owns nothing), then its tombstone; the
        // young Secret waits for the grace period
        assert_eq!(
            (first.secrets_deleted, first.records_deleted),
            (1, 0),
            "{first:?}"
        );
        assert!(w.cluster.secret("a", &late).is_none());
        assert!(w.cluster.secret("b", &fresh).is_some());
        assert_eq!(
            (second.secrets_deleted, second.records_deleted),
            (0, 1),
            "{second:?}"
        );
        let left = w.tokens.list().await.unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].subject.namespace, "b");
    }

    #[tokio::test]
    async fn sweep_fails_cleanly_when_a_listing_fails() {
        let w = world();
        pair(&w, "a", 3600, true, false).await;
        w.cluster.fail(ClusterCall::ManagedSecrets);
        assert!(matches!(
            w.cleanup.sweep().await,
            Err(CleanupError::Cluster(_))
        ));
        assert_eq!(w.tokens.list().await.unwrap().len(), 1, "nothing deleted");
    }
}
