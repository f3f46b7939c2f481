//! In-memory stores: the adapter for local experiments, tests of the domain and benchmarks of
//! the broker's own overhead. Same semantics as the DynamoDB adapter, no durability.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;

use iam_broker_kernel::allowance::{Allowance, Subject};
use iam_broker_kernel::clock::Clock;
use iam_broker_kernel::cluster::{ClusterName, RegisteredCluster};
use iam_broker_kernel::credentials::Credentials;
use iam_broker_kernel::ports::{
    AllowanceStore, AssumeRoleRequest, Cluster, ClusterError, ClusterEvent, ClusterRegistry,
    CredentialIssuer, IssueError, ManagedSecret, ServiceAccount, StoreError, TokenSecret,
    TokenStore,
};
use iam_broker_kernel::record::TokenRecord;
use iam_broker_kernel::token::TokenHash;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock cannot leave these maps half-updated (every update is one
    // map call), so a poisoned lock is still safe to use.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One call of the [`Cluster`] port, to make [`MemoryCluster`] fail it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ClusterCall {
    /// [`Cluster::service_account`].
    ServiceAccount,
    /// [`Cluster::create_secret`].
    CreateSecret,
    /// [`Cluster::delete_secret`].
    DeleteSecret,
    /// [`Cluster::managed_secrets`].
    ManagedSecrets,
    /// [`Cluster::record_event`].
    RecordEvent,
}

/// Allowances in a map.
#[derive(Debug, Default)]
pub struct MemoryAllowanceStore {
    rows: Mutex<BTreeMap<Subject, Allowance>>,
    /// Rows that read as corrupt, with what is wrong with them.
    unreadable: Mutex<BTreeMap<Subject, String>>,
}

impl MemoryAllowanceStore {
    /// Makes the row at `subject` unreadable (as a hand-edited row of the wrong type would be)
    /// until `allow` or `disallow` writes it.
    pub fn put_unreadable(&self, subject: &Subject, problem: &str) {
        lock(&self.rows).remove(subject);
        lock(&self.unreadable).insert(subject.clone(), problem.to_owned());
    }
}

#[async_trait]
impl AllowanceStore for MemoryAllowanceStore {
    async fn allowance(&self, subject: &Subject) -> Result<Option<Allowance>, StoreError> {
        if let Some(problem) = lock(&self.unreadable).get(subject) {
            return Err(StoreError::Corrupt {
                store: "memory table allowances".to_owned(),
                message: problem.clone(),
            });
        }
        Ok(lock(&self.rows).get(subject).cloned())
    }

    async fn allow_with(
        &self,
        subject: &Subject,
        role_arn: &str,
        terms: &iam_broker_kernel::allowance::RoleTerms,
    ) -> Result<Allowance, StoreError> {
        lock(&self.unreadable).remove(subject);
        let mut rows = lock(&self.rows);
        let row = rows
            .entry(subject.clone())
            .or_insert_with(|| Allowance::new(subject.clone(), BTreeSet::new()));
        row.allowed_roles.insert(role_arn.to_owned());
        match &terms.external_id {
            Some(id) => row.external_ids.insert(role_arn.to_owned(), id.clone()),
            None => row.external_ids.remove(role_arn),
        };
        match &terms.session_policy {
            Some(policy) => row
                .session_policies
                .insert(role_arn.to_owned(), policy.as_str().to_owned()),
            None => row.session_policies.remove(role_arn),
        };
        Ok(row.clone())
    }

    async fn disallow(
        &self,
        subject: &Subject,
        role_arn: Option<&str>,
    ) -> Result<Option<Allowance>, StoreError> {
        lock(&self.unreadable).remove(subject);
        let mut rows = lock(&self.rows);
        let Some(role_arn) = role_arn else {
            if let Some(row) = rows.get_mut(subject)
                && !row.revocation.is_empty()
            {
                row.allowed_roles.clear();
                row.external_ids.clear();
                row.session_policies.clear();
                return Ok(Some(row.clone()));
            }
            rows.remove(subject);
            return Ok(None);
        };
        let Some(row) = rows.get_mut(subject) else {
            return Ok(None);
        };
        row.allowed_roles.remove(role_arn);
        row.external_ids.remove(role_arn);
        row.session_policies.remove(role_arn);
        if row.allowed_roles.is_empty() && row.revocation.is_empty() {
            rows.remove(subject);
            return Ok(None);
        }
        Ok(Some(row.clone()))
    }

    async fn list(&self, partition: Option<&str>) -> Result<Vec<Allowance>, StoreError> {
        Ok(lock(&self.rows)
            .values()
            .filter(|row| partition.is_none_or(|p| row.subject.partition() == p))
            .cloned()
            .collect())
    }

    async fn revise(
        &self,
        subject: &Subject,
        change: &iam_broker_kernel::ports::RevocationChange,
    ) -> Result<Option<Allowance>, StoreError> {
        use iam_broker_kernel::ports::RevocationChange as C;
        let mut rows = lock(&self.rows);
        let creates = matches!(change, C::Scope { .. } | C::Pod { .. });
        if !creates && !rows.contains_key(subject) {
            return Ok(None);
        }
        let row = rows
            .entry(subject.clone())
            .or_insert_with(|| Allowance::new(subject.clone(), BTreeSet::new()));
        let r = &mut row.revocation;
        match change {
            C::Scope { at, denied_roles } => {
                r.at = Some(*at);
                r.denied_roles.extend(denied_roles.iter().cloned());
            }
            C::Pod { pod, denied_roles } => {
                r.pods.insert(pod.clone());
                r.denied_roles.extend(denied_roles.iter().cloned());
            }
            C::LiftScope => r.at = None,
            C::LiftPod(pod) => {
                r.pods.remove(pod);
            }
            C::Undenied(roles) => r.denied_roles.retain(|d| !roles.contains(d)),
        }
        let row = row.clone();
        if row.allowed_roles.is_empty() && row.revocation.is_empty() {
            rows.remove(subject);
            return Ok(None);
        }
        Ok(Some(row))
    }
}

/// Registered clusters in a map, with a count of full reads (the broker's cache is tested on it).
#[derive(Debug, Default)]
pub struct MemoryClusterRegistry {
    clusters: Mutex<BTreeMap<ClusterName, RegisteredCluster>>,
    reads: std::sync::atomic::AtomicUsize,
    down: std::sync::atomic::AtomicBool,
    delay_ms: std::sync::atomic::AtomicU64,
}

impl MemoryClusterRegistry {
    /// Makes every full read take `delay` (a slow registry) before answering.
    pub fn set_delay(&self, delay: std::time::Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.delay_ms.store(ms, std::sync::atomic::Ordering::SeqCst);
    }

    /// How many times [`ClusterRegistry::clusters`] was called.
    pub fn reads(&self) -> usize {
        self.reads.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Makes every call fail as unavailable (`true`) or work again (`false`).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }

    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(StoreError::Unavailable {
                store: "memory clusters".to_owned(),
                maybe_written: false,
                source: "the in-memory registry is down".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl ClusterRegistry for MemoryClusterRegistry {
    async fn clusters(&self) -> Result<Vec<RegisteredCluster>, StoreError> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let delay = self.delay_ms.load(std::sync::atomic::Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        self.check()?;
        Ok(lock(&self.clusters).values().cloned().collect())
    }

    async fn cluster(&self, name: &ClusterName) -> Result<Option<RegisteredCluster>, StoreError> {
        self.check()?;
        Ok(lock(&self.clusters).get(name).cloned())
    }

    async fn insert(&self, cluster: &RegisteredCluster) -> Result<(), StoreError> {
        self.check()?;
        let mut clusters = lock(&self.clusters);
        if clusters.contains_key(&cluster.name) {
            return Err(StoreError::AlreadyExists);
        }
        clusters.insert(cluster.name.clone(), cluster.clone());
        Ok(())
    }

    async fn update(&self, cluster: &RegisteredCluster) -> Result<(), StoreError> {
        self.check()?;
        match lock(&self.clusters).get_mut(&cluster.name) {
            Some(existing) => {
                *existing = cluster.clone();
                Ok(())
            }
            None => Err(StoreError::NotFound),
        }
    }

    async fn remove(&self, name: &ClusterName) -> Result<Option<RegisteredCluster>, StoreError> {
        self.check()?;
        Ok(lock(&self.clusters).remove(name))
    }
}

/// Token records in a map.
#[derive(Debug, Default)]
pub struct MemoryTokenStore {
    records: Mutex<BTreeMap<TokenHash, TokenRecord>>,
}

#[async_trait]
impl TokenStore for MemoryTokenStore {
    async fn record(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StoreError> {
        Ok(lock(&self.records).get(hash).cloned())
    }

    async fn insert(&self, record: &TokenRecord) -> Result<(), StoreError> {
        let mut records = lock(&self.records);
        if records.contains_key(&record.token_hash) {
            return Err(StoreError::AlreadyExists);
        }
        records.insert(record.token_hash.clone(), record.clone());
        Ok(())
    }

    async fn touch(
        &self,
        hash: &TokenHash,
        last_used: i64,
        expires: i64,
    ) -> Result<(), StoreError> {
        let mut records = lock(&self.records);
        let record = records
            .get_mut(hash)
            .filter(|r| !r.is_retracted())
            .ok_or(StoreError::NotFound)?;
        record.last_used = Some(last_used);
        record.expires = expires;
        Ok(())
    }

    async fn retract(&self, tombstone: &TokenRecord) -> Result<(), StoreError> {
        lock(&self.records).insert(tombstone.token_hash.clone(), tombstone.clone());
        Ok(())
    }

    async fn delete(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StoreError> {
        Ok(lock(&self.records).remove(hash))
    }

    async fn list(&self) -> Result<Vec<TokenRecord>, StoreError> {
        Ok(lock(&self.records).values().cloned().collect())
    }
}

/// A Kubernetes API in maps: ServiceAccounts and Secrets, with failure injection per call, for
/// unit tests of the webhook and local experiments.
#[derive(Debug, Default)]
pub struct MemoryCluster {
    service_accounts: Mutex<BTreeMap<(String, String), ServiceAccount>>,
    secrets: Mutex<BTreeMap<(String, String), TokenSecret>>,
    created: Mutex<BTreeMap<(String, String), i64>>,
    events: Mutex<Vec<ClusterEvent>>,
    failing: Mutex<BTreeSet<ClusterCall>>,
}

impl MemoryCluster {
    /// Adds or replaces a ServiceAccount.
    pub fn put_service_account(&self, account: ServiceAccount) {
        lock(&self.service_accounts)
            .insert((account.namespace.clone(), account.name.clone()), account);
    }

    /// The Secret stored under this name.
    pub fn secret(&self, namespace: &str, name: &str) -> Option<TokenSecret> {
        lock(&self.secrets)
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// Sets the `creationTimestamp` (epoch seconds) the listing reports for a Secret; unset,
    /// it reports none.
    pub fn set_created_at(&self, namespace: &str, name: &str, at: i64) {
        lock(&self.created).insert((namespace.to_owned(), name.to_owned()), at);
    }

    /// Every stored Secret.
    pub fn secrets(&self) -> Vec<TokenSecret> {
        lock(&self.secrets).values().cloned().collect()
    }

    /// Every Event recorded so far, oldest first.
    pub fn events(&self) -> Vec<ClusterEvent> {
        lock(&self.events).clone()
    }

    /// Makes every call of `operation` fail with [`ClusterError::Unavailable`] until [`Self::heal`].
    pub fn fail(&self, operation: ClusterCall) {
        lock(&self.failing).insert(operation);
    }

    /// Ends every injected failure.
    pub fn heal(&self) {
        lock(&self.failing).clear();
    }

    fn check(&self, operation: ClusterCall) -> Result<(), ClusterError> {
        if lock(&self.failing).contains(&operation) {
            Err(ClusterError::Unavailable(
                format!("injected failure of {operation:?}").into(),
            ))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl Cluster for MemoryCluster {
    async fn service_account(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<ServiceAccount>, ClusterError> {
        self.check(ClusterCall::ServiceAccount)?;
        Ok(lock(&self.service_accounts)
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned())
    }

    async fn create_secret(&self, secret: &TokenSecret) -> Result<(), ClusterError> {
        self.check(ClusterCall::CreateSecret)?;
        let mut secrets = lock(&self.secrets);
        let key = (secret.namespace.clone(), secret.name.clone());
        if secrets.contains_key(&key) {
            return Err(ClusterError::AlreadyExists);
        }
        secrets.insert(key, secret.clone());
        Ok(())
    }

    async fn delete_secret(&self, namespace: &str, name: &str) -> Result<bool, ClusterError> {
        self.check(ClusterCall::DeleteSecret)?;
        Ok(lock(&self.secrets)
            .remove(&(namespace.to_owned(), name.to_owned()))
            .is_some())
    }

    async fn managed_secrets(
        &self,
        label_selector: &str,
    ) -> Result<Vec<ManagedSecret>, ClusterError> {
        self.check(ClusterCall::ManagedSecrets)?;
        let (key, value) = label_selector
            .split_once('=')
            .unwrap_or((label_selector, ""));
        let created = lock(&self.created).clone();
        Ok(lock(&self.secrets)
            .values()
            .filter(|s| {
                s.labels
                    .get(key)
                    .is_some_and(|v| value.is_empty() || v == value)
            })
            .map(|s| ManagedSecret {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                annotations: s.annotations.clone(),
                created_at: created.get(&(s.namespace.clone(), s.name.clone())).copied(),
            })
            .collect())
    }

    async fn record_event(&self, event: &ClusterEvent) -> Result<(), ClusterError> {
        self.check(ClusterCall::RecordEvent)?;
        lock(&self.events).push(event.clone());
        Ok(())
    }
}

/// A credential issuer without STS: fixed keys, valid for the requested duration from its
/// clock's now. Remembers every request, and refuses them all with an STS error code when told
/// to (tests, benchmarks of the broker's own overhead).
pub struct MemoryIssuer {
    clock: std::sync::Arc<dyn Clock>,
    requests: Mutex<Vec<AssumeRoleRequest>>,
    refusal: Mutex<Option<String>>,
}

impl MemoryIssuer {
    /// An issuer whose credentials expire `DurationSeconds` after `clock`'s now.
    pub fn new(clock: std::sync::Arc<dyn Clock>) -> Self {
        Self {
            clock,
            requests: Mutex::new(Vec::new()),
            refusal: Mutex::new(None),
        }
    }

    /// From now on, refuse every request with this STS error code (e.g. `AccessDenied`).
    pub fn refuse(&self, code: &str) {
        *lock(&self.refusal) = Some(code.to_owned());
    }

    /// Every request so far, oldest first.
    pub fn requests(&self) -> Vec<AssumeRoleRequest> {
        lock(&self.requests).clone()
    }
}

#[async_trait]
impl CredentialIssuer for MemoryIssuer {
    async fn assume_role(&self, request: &AssumeRoleRequest) -> Result<Credentials, IssueError> {
        lock(&self.requests).push(request.clone());
        if let Some(code) = lock(&self.refusal).clone() {
            return Err(IssueError::Refused {
                code,
                message: "refused by the in-memory issuer".to_owned(),
            });
        }
        let seconds = i64::try_from(request.duration.as_secs()).unwrap_or(i64::MAX);
        Ok(Credentials {
            access_key_id: "ASIAMEMORYISSUER".to_owned(),
            secret_access_key: "memory-secret".to_owned(),
            session_token: "memory-session".to_owned(),
            expiration: self.clock.now() + time::Duration::seconds(seconds),
        })
    }
}
