//! Token records: the rows of the Authorizations table.

use time::OffsetDateTime;

use crate::allowance::{RoleArn, Subject};
use crate::token::TokenHash;

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
