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
}

impl TokenRecord {
    /// Whether the record has lapsed at `now` (DynamoDB deletes expired items lazily, so an
    /// expired item may still be read and must be refused).
    pub fn is_expired(&self, now: OffsetDateTime) -> bool {
        self.expires <= now.unix_timestamp()
    }
}
