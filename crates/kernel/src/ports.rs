//! Ports: the small traits, in domain words, that adapters (DynamoDB, STS, memory) implement.
//! No SDK type crosses them.

use std::time::Duration;

use async_trait::async_trait;

use crate::allowance::{Allowance, Row, Subject, UnreadableRow};
use crate::cluster::{ClusterName, RegisteredCluster};
use crate::credentials::Credentials;
use crate::record::TokenRecord;
use crate::token::TokenHash;

/// A session tag (key, value) for attribute-based access control.
pub type SessionTag = (&'static str, String);
/// A boxed error from an adapter's SDK, kept as the `source` of a domain error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of the stores.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store is down, throttling, refusing, or did not answer in time.
    #[error("{store} is unavailable")]
    Unavailable {
        /// Which store (its table name).
        store: String,
        /// Whether a write that failed this way may still have landed (or land later): `true`
        /// unless the store refused in a way no attempt could have got past (a missing table,
        /// denied access, an invalid request). An undo relies on it.
        maybe_written: bool,
        /// What the SDK said.
        #[source]
        source: BoxError,
    },
    /// A conditional insert found the key taken.
    #[error("a record with this key already exists")]
    AlreadyExists,
    /// A conditional update found no record.
    #[error("no such record")]
    NotFound,
    /// The store answered with an item this version cannot read.
    #[error("unreadable item in {store}: {message}")]
    Corrupt {
        /// Which store.
        store: String,
        /// What is wrong with the item.
        message: String,
    },
}

impl StoreError {
    /// Whether the write that failed with this error may exist in the store now or later (see
    /// [`StoreError::Unavailable::maybe_written`]). A conditional insert that found its key
    /// taken means an earlier attempt of the same insert landed.
    pub fn may_have_written(&self) -> bool {
        match self {
            Self::Unavailable { maybe_written, .. } => *maybe_written,
            Self::AlreadyExists => true,
            Self::NotFound | Self::Corrupt { .. } => false,
        }
    }
}

/// One [`AllowanceStore::allowance`] answer as a [`Row`]: an unreadable row is a value, an outage
/// stays an error.
pub fn as_row(
    subject: &Subject,
    read: Result<Option<Allowance>, StoreError>,
) -> Result<Row, StoreError> {
    match read {
        Ok(row) => Ok(row.into()),
        Err(StoreError::Corrupt { store, message }) => {
            Ok(Row::Unreadable(UnreadableRow::at(subject, store, message)))
        }
        Err(other) => Err(other),
    }
}

/// The Allowances table: which roles a namespace / ServiceAccount may assume.
#[async_trait]
pub trait AllowanceStore: Send + Sync {
    /// The row for exactly this subject (no wildcard expansion).
    async fn allowance(&self, subject: &Subject) -> Result<Option<Allowance>, StoreError>;
    /// The rows that decide for `subject`, in one read where the store can: its exact row and
    /// its namespace's `*` row, in that order (what [`crate::allowance::permit`] takes). A row
    /// the store holds but cannot read is [`Row::Unreadable`], not an error: only an outage is.
    async fn rows_for(&self, subject: &Subject) -> Result<[Row; 2], StoreError> {
        let wildcard = subject.wildcard();
        let (exact, namespace_wide) =
            futures::join!(self.allowance(subject), self.allowance(&wildcard));
        Ok([as_row(subject, exact)?, as_row(&wildcard, namespace_wide)?])
    }
    /// [`Self::rows_for`] of each subject, in order (exact, `*`, exact, `*`, ...), in one read
    /// where the store can: what decides for a pod covered by several subjects
    /// ([`crate::allowance::deciding_subjects`]).
    async fn rows_for_all(&self, subjects: &[Subject]) -> Result<Vec<Row>, StoreError> {
        let all = futures::future::try_join_all(subjects.iter().map(|s| self.rows_for(s))).await?;
        Ok(all.into_iter().flatten().collect())
    }
    /// Adds `role_arn` to the subject's roles, creating the row if needed, in one write; with
    /// `external_id`, also sets the role's `ExternalId` (without, it clears any), and clears
    /// any session policy of the role. Returns the new row.
    async fn allow(
        &self,
        subject: &Subject,
        role_arn: &str,
        external_id: Option<&str>,
    ) -> Result<Allowance, StoreError> {
        let terms = crate::allowance::RoleTerms {
            external_id: external_id.map(str::to_owned),
            session_policy: None,
        };
        self.allow_with(subject, role_arn, &terms).await
    }
    /// Adds `role_arn` to the subject's roles with its terms (its `ExternalId` and session
    /// policy, each set or cleared), creating the row if needed, in one write. Returns the new
    /// row.
    async fn allow_with(
        &self,
        subject: &Subject,
        role_arn: &str,
        terms: &crate::allowance::RoleTerms,
    ) -> Result<Allowance, StoreError>;
    /// Removes `role_arn` from the subject's roles (the whole row when `None` or when no role is
    /// left); returns the row as it now stands, `None` when it is gone.
    async fn disallow(
        &self,
        subject: &Subject,
        role_arn: Option<&str>,
    ) -> Result<Option<Allowance>, StoreError>;
    /// All rows, or those of one partition ([`Subject::partition`]: a namespace, or
    /// `<cluster>/<namespace>`), sorted by subject.
    async fn list(&self, partition: Option<&str>) -> Result<Vec<Allowance>, StoreError>;
    /// Changes the row's [`crate::allowance::Revocation`] in one write, creating the row (with
    /// no roles) when a revocation needs one, and leaving its roles alone; returns the row as it
    /// now stands (`None` when it is gone or never was).
    async fn revise(
        &self,
        row: &Subject,
        change: &RevocationChange,
    ) -> Result<Option<Allowance>, StoreError>;
}

/// A change to one Allowances row's [`crate::allowance::Revocation`] (`iam-broker sessions`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevocationChange {
    /// Revoke the row's whole scope at `at` (Unix seconds); `denied_roles` got a deny.
    Scope {
        /// When.
        at: i64,
        /// Roles given a deny statement for it.
        denied_roles: Vec<String>,
    },
    /// Revoke one pod of the row's ServiceAccount; `denied_roles` got a deny.
    Pod {
        /// The pod's name.
        pod: String,
        /// Roles given a deny statement for it.
        denied_roles: Vec<String>,
    },
    /// Lift the scope's revocation (new credentials flow again).
    LiftScope,
    /// Lift one pod's revocation.
    LiftPod(String),
    /// These roles no longer hold a deny statement of the row's scope.
    Undenied(Vec<String>),
}

/// The Clusters table: the registered clusters whose projected tokens the broker accepts.
#[async_trait]
pub trait ClusterRegistry: Send + Sync {
    /// Every registered cluster (a small table, read whole). Rows this version cannot read are
    /// left out and logged, so one damaged row does not take every cluster down.
    async fn clusters(&self) -> Result<Vec<RegisteredCluster>, StoreError>;
    /// One cluster.
    async fn cluster(&self, name: &ClusterName) -> Result<Option<RegisteredCluster>, StoreError>;
    /// Registers a new cluster; [`StoreError::AlreadyExists`] if the name is taken.
    async fn insert(&self, cluster: &RegisteredCluster) -> Result<(), StoreError>;
    /// Replaces a registered cluster's issuer and keys; [`StoreError::NotFound`] if the name
    /// is not registered (it never creates one).
    async fn update(&self, cluster: &RegisteredCluster) -> Result<(), StoreError>;
    /// Removes a cluster; returns it if it existed.
    async fn remove(&self, name: &ClusterName) -> Result<Option<RegisteredCluster>, StoreError>;
}

/// The Authorizations table: token records keyed by token hash.
#[async_trait]
pub trait TokenStore: Send + Sync {
    /// The record for a token hash.
    async fn record(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StoreError>;
    /// Inserts a new record; [`StoreError::AlreadyExists`] if the hash is taken.
    async fn insert(&self, record: &TokenRecord) -> Result<(), StoreError>;
    /// Slides an existing record's `last_used` and `expires`; [`StoreError::NotFound`] if the
    /// record is gone or retracted (it never creates one and never revives a tombstone).
    async fn touch(&self, hash: &TokenHash, last_used: i64, expires: i64)
    -> Result<(), StoreError>;
    /// Stores `tombstone` (a [`TokenRecord::retracted`] record) under its hash, whatever is
    /// there: a live record becomes a tombstone, and an [`insert`](Self::insert) of the hash
    /// that lands later fails instead of resurrecting the token.
    async fn retract(&self, tombstone: &TokenRecord) -> Result<(), StoreError>;
    /// Deletes a record; returns it if it existed.
    async fn delete(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StoreError>;
    /// Every record (administration; a full scan).
    async fn list(&self) -> Result<Vec<TokenRecord>, StoreError>;
}

/// What the broker asks STS for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssumeRoleRequest {
    /// The role to assume.
    pub role_arn: String,
    /// `RoleSessionName` (see `iam_broker_broker::session::role_session_name`).
    pub session_name: String,
    /// `DurationSeconds`.
    pub duration: Duration,
    /// Session tags; empty when tagging is off.
    pub tags: Vec<SessionTag>,
    /// `SourceIdentity`, when enabled.
    pub source_identity: Option<String>,
    /// `ExternalId`, when the allowance names one for the role.
    pub external_id: Option<String>,
    /// `Policy`: the allowance's session policy for the role, when it has one.
    pub policy: Option<String>,
}

/// Why credentials could not be issued.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// STS refused the request (its error code and message are kept).
    #[error("STS refused: {code}: {message}")]
    Refused {
        /// STS error code, e.g. `AccessDenied`.
        code: String,
        /// STS error message.
        message: String,
    },
    /// STS is down, throttling, or did not answer in time.
    #[error("STS is unavailable")]
    Unavailable(#[source] BoxError),
}

/// The source of an [`IssueError::Unavailable`] when STS answered, with an error code that
/// means "later" (throttling, its own outage): the code is kept for metrics and alarms.
#[derive(Debug, thiserror::Error)]
#[error("STS answered {code}")]
pub struct StsRetryable {
    /// STS's error code, e.g. `Throttling`.
    pub code: String,
    /// The SDK's error, explained.
    #[source]
    pub source: BoxError,
}

/// A stage of serving credentials, timed for metrics ([`StageObserver`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Verifying a projected ServiceAccount token (registry snapshot, signature, claims).
    TokenVerification,
    /// A DynamoDB read or write (the token record, the Allowances rows).
    DynamoDb,
    /// `sts:AssumeRole` (a cache miss).
    Sts,
}

impl Stage {
    /// The metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TokenVerification => "token_verification",
            Self::DynamoDb => "dynamodb",
            Self::Sts => "sts",
        }
    }
}

/// Told how long each stage of a request took (Prometheus histograms in `serve`).
pub trait StageObserver: Send + Sync {
    /// One stage finished after `elapsed`.
    fn observe(&self, stage: Stage, elapsed: Duration);
}

/// Issues temporary credentials for a role.
#[async_trait]
pub trait CredentialIssuer: Send + Sync {
    /// `sts:AssumeRole`.
    async fn assume_role(&self, request: &AssumeRoleRequest) -> Result<Credentials, IssueError>;
}

/// A ServiceAccount as the webhook needs it: its identity and annotations.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ServiceAccount {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `metadata.annotations` (the role annotation lives here).
    pub annotations: std::collections::BTreeMap<String, String>,
    /// `metadata.uid`, when the API server reported it.
    pub uid: Option<String>,
}

/// Data key of the token in a [`TokenSecret`].
pub const SECRET_TOKEN_KEY: &str = "token";

/// A Secret that holds one pod's token (type `Opaque`, key [`SECRET_TOKEN_KEY`], no trailing
/// newline).
///
/// `Debug` is redacted: the token never reaches a log.
#[derive(Clone, PartialEq, Eq)]
pub struct TokenSecret {
    /// Namespace (the pod's).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `metadata.labels` (at least the managed-by label).
    pub labels: std::collections::BTreeMap<String, String>,
    /// `metadata.annotations` (e.g. the token hash, for the sweep).
    pub annotations: std::collections::BTreeMap<String, String>,
    /// The token, stored under data key `token`.
    pub token: crate::token::Token,
}

impl std::fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSecret")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("labels", &self.labels)
            .field("annotations", &self.annotations)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// A Secret managed by iam-broker, as listed for the sweep (no token in it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedSecret {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `metadata.annotations`.
    pub annotations: std::collections::BTreeMap<String, String>,
    /// `metadata.creationTimestamp`, epoch seconds, when the API server sent it.
    pub created_at: Option<i64>,
}

/// Errors of the Kubernetes API.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The API server could not be reached, answered 5xx or 429, or did not answer in time.
    #[error("the Kubernetes API is unavailable")]
    Unavailable(#[source] BoxError),
    /// The API server refused the webhook's credentials (401).
    #[error("the Kubernetes API refused the webhook's credentials")]
    Unauthorized(#[source] BoxError),
    /// RBAC refused the call (403); the message says which verb and resource.
    #[error("the Kubernetes API forbids this call: {0}")]
    Forbidden(String),
    /// A create found the name taken (409 AlreadyExists).
    #[error("an object with this name already exists")]
    AlreadyExists,
    /// Any other refusal (4xx), with the API server's message.
    #[error("the Kubernetes API refused the call ({status}): {message}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// `Status.message`.
        message: String,
    },
}

/// The Kubernetes API, in the webhook's words.
#[async_trait]
pub trait Cluster: Send + Sync {
    /// `GET /api/v1/namespaces/{namespace}/serviceaccounts/{name}`; `None` on 404.
    async fn service_account(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<Option<ServiceAccount>, ClusterError>;
    /// `POST /api/v1/namespaces/{namespace}/secrets`; [`ClusterError::AlreadyExists`] on 409.
    async fn create_secret(&self, secret: &TokenSecret) -> Result<(), ClusterError>;
    /// `DELETE /api/v1/namespaces/{namespace}/secrets/{name}`; `Ok(false)` when already gone.
    async fn delete_secret(&self, namespace: &str, name: &str) -> Result<bool, ClusterError>;
    /// Secrets in every namespace carrying `label_selector` (e.g.
    /// `app.kubernetes.io/managed-by=iam-broker`), for the sweep.
    async fn managed_secrets(
        &self,
        label_selector: &str,
    ) -> Result<Vec<ManagedSecret>, ClusterError>;
    /// `POST /api/v1/namespaces/{namespace}/events`: a Warning Event about `event.involved`, so
    /// `kubectl describe` on that object shows why a pod got no credentials.
    async fn record_event(&self, event: &ClusterEvent) -> Result<(), ClusterError>;
}

/// The object an Event is about (`involvedObject`): the pod's controller (ReplicaSet, Job,
/// StatefulSet, …) or its ServiceAccount, since the pod itself has no uid yet at admission.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    /// `apiVersion`, e.g. `apps/v1`.
    pub api_version: String,
    /// `kind`, e.g. `ReplicaSet`.
    pub kind: String,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// `uid`, when known (`kubectl describe` matches on it).
    pub uid: Option<String>,
}

/// A Warning Event the webhook records (core/v1 `Event`). Never holds a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterEvent {
    /// What it is about.
    pub involved: ObjectRef,
    /// `reason`, CamelCase (e.g. `RoleNotAllowed`).
    pub reason: &'static str,
    /// `message`, for people.
    pub message: String,
    /// When it happened (epoch seconds).
    pub at: i64,
}
