//! Ports: the small traits, in domain words, that adapters (DynamoDB, STS, memory) implement.
//! No SDK type crosses them.

use std::time::Duration;

use async_trait::async_trait;

use crate::allowance::{Allowance, Subject};
use crate::credentials::Credentials;
use crate::record::TokenRecord;
use crate::session::SessionTag;
use crate::token::TokenHash;

/// A boxed error from an adapter's SDK, kept as the `source` of a domain error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of the stores.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store is down, throttling, or did not answer in time: retry later.
    #[error("{store} is unavailable")]
    Unavailable {
        /// Which store (its table name).
        store: String,
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

/// The Allowances table: which roles a namespace / ServiceAccount may assume.
#[async_trait]
pub trait AllowanceStore: Send + Sync {
    /// The row for exactly this subject (no wildcard expansion).
    async fn allowance(&self, subject: &Subject) -> Result<Option<Allowance>, StoreError>;
    /// Adds `role_arn` to the subject's roles, creating the row if needed; returns the new row.
    async fn allow(&self, subject: &Subject, role_arn: &str) -> Result<Allowance, StoreError>;
    /// Removes `role_arn` from the subject's roles (the whole row when `None` or when no role is
    /// left); returns the row as it now stands, `None` when it is gone.
    async fn disallow(
        &self,
        subject: &Subject,
        role_arn: Option<&str>,
    ) -> Result<Option<Allowance>, StoreError>;
    /// All rows, or those of one namespace, sorted by subject.
    async fn list(&self, namespace: Option<&str>) -> Result<Vec<Allowance>, StoreError>;
}

/// The Authorizations table: token records keyed by token hash.
#[async_trait]
pub trait TokenStore: Send + Sync {
    /// The record for a token hash.
    async fn record(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StoreError>;
    /// Inserts a new record; [`StoreError::AlreadyExists`] if the hash is taken.
    async fn insert(&self, record: &TokenRecord) -> Result<(), StoreError>;
    /// Slides an existing record's `last_used` and `expires`; [`StoreError::NotFound`] if the
    /// record is gone (it never creates one).
    async fn touch(&self, hash: &TokenHash, last_used: i64, expires: i64)
    -> Result<(), StoreError>;
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
    /// `RoleSessionName` (see [`crate::session::role_session_name`]).
    pub session_name: String,
    /// `DurationSeconds`.
    pub duration: Duration,
    /// Session tags; empty when tagging is off.
    pub tags: Vec<SessionTag>,
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

/// Issues temporary credentials for a role.
#[async_trait]
pub trait CredentialIssuer: Send + Sync {
    /// `sts:AssumeRole`.
    async fn assume_role(&self, request: &AssumeRoleRequest) -> Result<Credentials, IssueError>;
}
