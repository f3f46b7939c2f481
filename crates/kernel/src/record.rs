//! Token records: the rows of the Authorizations table.

use std::time::Duration;

use time::OffsetDateTime;

use crate::allowance::{RoleArn, Subject};
use crate::token::{Token, TokenError, TokenHash};

/// What a token stands for. Stored under the token's hash, never the token itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// `token_hash`: lowercase hex SHA-256 of the token (the table's key).
    pub token_hash: TokenHash,
    /// The namespace and ServiceAccount the token was minted for.
    pub subject: Subject,
    /// The role the token's holder gets credentials for.
    pub role_arn: RoleArn,
    /// The Secret that holds the token, when the webhook made one.
    pub secret_name: Option<String>,
    /// The pod (or its `generateName` prefix) the token was minted for.
    pub pod_name: Option<String>,
    /// When the token was minted, epoch seconds.
    pub created_at: i64,
    /// When the broker last served credentials for it, epoch seconds.
    pub last_used: Option<i64>,
    /// When the record lapses (the table's TTL attribute), epoch seconds. Slides forward on use.
    pub expires: i64,
    /// When the record was retracted (epoch seconds): an undone admission or a deleted pod.
    /// A retracted record is a tombstone: it grants nothing, it keeps the key taken so a write
    /// that lands late cannot bring the token back, and it still names the Secret so the
    /// cleanup finds a Secret whose create landed late. It lapses [`TOMBSTONE_TTL`] after.
    pub retracted_at: Option<i64>,
}

/// How long a tombstone ([`TokenRecord::retracted_at`]) outlives its retraction: far longer
/// than any write still in flight can take to land (the Kubernetes API server gives up on a
/// request after 60 s, DynamoDB after its own request timeout), and longer than the sweep's
/// default grace, so the sweep sees it.
pub const TOMBSTONE_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

impl TokenRecord {
    /// Whether the record has lapsed at `now` (DynamoDB deletes expired items lazily, so an
    /// expired item may still be read and must be refused).
    pub fn is_expired(&self, now: OffsetDateTime) -> bool {
        self.expires <= now.unix_timestamp()
    }

    /// Whether the record is a tombstone (see [`TokenRecord::retracted_at`]).
    pub fn is_retracted(&self) -> bool {
        self.retracted_at.is_some()
    }

    /// This record as a tombstone retracted at `at` (epoch seconds), lapsing
    /// [`TOMBSTONE_TTL`] later.
    pub fn retracted(&self, at: i64) -> Self {
        let ttl = i64::try_from(TOMBSTONE_TTL.as_secs()).unwrap_or(i64::MAX);
        Self {
            retracted_at: Some(at),
            expires: at.saturating_add(ttl),
            ..self.clone()
        }
    }
}
/// A token record the Authorizations stream reports removed (TTL expiry or a revoke), as the
/// aws adapter decodes it from the record's old image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemovedRecord {
    /// `token_hash`.
    pub token_hash: String,
    /// `namespace`.
    pub namespace: String,
    /// `secret_name`.
    pub secret_name: String,
}

/// What to record for a newly minted token.
#[derive(Debug, Clone)]
pub struct Grant {
    /// Namespace and ServiceAccount.
    pub subject: Subject,
    /// The role.
    pub role_arn: RoleArn,
    /// The pod (or `generateName` prefix), if known.
    pub pod_name: Option<String>,
    /// The Secret that will hold the token, if any.
    pub secret_name: Option<String>,
}

/// Mints a token and the record that stands for it (not yet stored).
pub fn mint(
    grant: Grant,
    now: OffsetDateTime,
    ttl: Duration,
) -> Result<(Token, TokenRecord), TokenError> {
    let token = Token::mint()?;
    let record = TokenRecord {
        token_hash: token.hash(),
        subject: grant.subject,
        role_arn: grant.role_arn,
        secret_name: grant.secret_name,
        pod_name: grant.pod_name,
        created_at: now.unix_timestamp(),
        last_used: None,
        expires: now
            .unix_timestamp()
            .saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)),
        retracted_at: None,
    };
    Ok((token, record))
}
