//! The credential broker: token in, temporary credentials for the token's role out.
//!
//! The decision is: the token must be well formed, known and unexpired; its role must still be
//! allowed for its namespace / ServiceAccount (or the namespace's `*` row). Only then is STS
//! called. Revoking an allowance therefore takes effect at the next fetch.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use crate::allowance::{RoleArn, Subject, is_allowed};
use crate::clock::Clock;
use crate::credentials::{EcsCredentials, cache_max_age};
use crate::ports::{
    AllowanceStore, AssumeRoleRequest, BoxError, CredentialIssuer, IssueError, StoreError,
    TokenStore,
};
use crate::record::TokenRecord;
use crate::session::{role_session_name, session_tags};
use crate::token::{Token, TokenError};

/// Why the broker did not serve credentials. Each maps to one row of DESIGN.md's error table.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// 401 `MissingAuthorization`.
    #[error("an Authorization header with an iam-broker token is required")]
    MissingAuthorization,
    /// 403 `InvalidToken`: unknown, malformed, expired or retracted.
    #[error("the token is not valid ({0})")]
    InvalidToken(&'static str),
    /// 403 `InvalidToken` as well, to the client: the token's record cannot be read (a missing
    /// or mistyped attribute, a role that is not an ARN). A permanent data problem, not an
    /// outage: retrying cannot help, and nothing from the record reaches STS. Logged as an error
    /// and counted apart (`CorruptTokenRecords`) so an operator finds it.
    #[error("the token is not valid (its record is unreadable)")]
    CorruptRecord {
        /// The token hash's short form (never the token).
        token: String,
        /// What is wrong with the record.
        #[source]
        source: StoreError,
    },
    /// 403 `AllowanceRevoked`.
    #[error("role {role_arn} is no longer allowed for {subject}")]
    AllowanceRevoked {
        /// Who the token belongs to.
        subject: Subject,
        /// The role it names.
        role_arn: String,
    },
    /// 502 `AssumeRoleFailed`.
    #[error("sts:AssumeRole was refused: {code}: {message}")]
    AssumeRoleFailed {
        /// STS error code.
        code: String,
        /// STS error message.
        message: String,
    },
    /// 503 `ServiceUnavailable`.
    #[error("{what} is unavailable, retry later")]
    Unavailable {
        /// Which dependency.
        what: String,
        /// The underlying failure.
        #[source]
        source: BoxError,
    },
}

impl BrokerError {
    /// The `Code` of the JSON error body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingAuthorization => "MissingAuthorization",
            Self::InvalidToken(_) | Self::CorruptRecord { .. } => "InvalidToken",
            Self::AllowanceRevoked { .. } => "AllowanceRevoked",
            Self::AssumeRoleFailed { .. } => "AssumeRoleFailed",
            Self::Unavailable { .. } => "ServiceUnavailable",
        }
    }
}

impl From<StoreError> for BrokerError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable { store, source, .. } => Self::Unavailable {
                what: store,
                source,
            },
            StoreError::NotFound => Self::InvalidToken("unknown token"),
            other @ (StoreError::AlreadyExists | StoreError::Corrupt { .. }) => Self::Unavailable {
                what: "the token store".to_owned(),
                source: Box::new(other),
            },
        }
    }
}

/// Credentials ready to serve, with what the logs and headers need.
#[derive(Debug, Clone)]
pub struct BrokerAnswer {
    /// The JSON body.
    pub body: EcsCredentials,
    /// `Cache-Control: max-age` in seconds.
    pub max_age: u64,
    /// Who got them.
    pub subject: Subject,
    /// The pod named by the token record, if any.
    pub pod_name: Option<String>,
}

/// The broker: the ports it needs and its settings. Built once at start-up.
pub struct Broker {
    allowances: Arc<dyn AllowanceStore>,
    tokens: Arc<dyn TokenStore>,
    issuer: Arc<dyn CredentialIssuer>,
    clock: Arc<dyn Clock>,
    credential_duration: Duration,
    token_ttl: Duration,
    session_tags: bool,
}

/// Settings of the broker, from [`crate::Config`].
#[derive(Debug, Clone, Copy)]
pub struct BrokerSettings {
    /// `DurationSeconds` for `sts:AssumeRole`.
    pub credential_duration: Duration,
    /// How far each use slides a token's expiry.
    pub token_ttl: Duration,
    /// Whether to send session tags.
    pub session_tags: bool,
}

impl From<&crate::Config> for BrokerSettings {
    fn from(config: &crate::Config) -> Self {
        Self {
            credential_duration: config.credential_duration,
            token_ttl: config.token_ttl,
            session_tags: config.session_tags,
        }
    }
}

impl Broker {
    /// Assembles a broker from its ports.
    pub fn new(
        allowances: Arc<dyn AllowanceStore>,
        tokens: Arc<dyn TokenStore>,
        issuer: Arc<dyn CredentialIssuer>,
        clock: Arc<dyn Clock>,
        settings: BrokerSettings,
    ) -> Self {
        Self {
            allowances,
            tokens,
            issuer,
            clock,
            credential_duration: settings.credential_duration,
            token_ttl: settings.token_ttl,
            session_tags: settings.session_tags,
        }
    }

    /// Serves credentials for the token in an `Authorization` header value.
    pub async fn credentials(
        &self,
        authorization: Option<&str>,
    ) -> Result<BrokerAnswer, BrokerError> {
        let token = Token::from_authorization(authorization).map_err(|e| match e {
            TokenError::Missing => BrokerError::MissingAuthorization,
            TokenError::Malformed | TokenError::Entropy(_) => {
                BrokerError::InvalidToken("malformed token")
            }
        })?;
        let hash = token.hash();
        let now = self.clock.now();
        let record = match self.tokens.record(&hash).await {
            Ok(record) => record.ok_or(BrokerError::InvalidToken("unknown token"))?,
            Err(source @ StoreError::Corrupt { .. }) => {
                return Err(BrokerError::CorruptRecord {
                    token: hash.short().to_owned(),
                    source,
                });
            }
            Err(other) => return Err(other.into()),
        };
        if record.is_retracted() {
            return Err(BrokerError::InvalidToken("retracted token"));
        }
        if record.is_expired(now) {
            return Err(BrokerError::InvalidToken("expired token"));
        }

        let subject = &record.subject;
        let wildcard = subject.wildcard();
        let (exact, namespace_wide) = futures::try_join!(
            self.allowances.allowance(subject),
            self.allowances.allowance(&wildcard),
        )?;
        if !is_allowed(&[exact, namespace_wide], record.role_arn.as_str()) {
            return Err(BrokerError::AllowanceRevoked {
                subject: subject.clone(),
                role_arn: record.role_arn.to_string(),
            });
        }

        let request = AssumeRoleRequest {
            role_arn: record.role_arn.to_string(),
            session_name: role_session_name(subject, record.pod_name.as_deref()),
            duration: self.credential_duration,
            tags: if self.session_tags {
                session_tags(subject, record.pod_name.as_deref())
            } else {
                Vec::new()
            },
        };
        let expires = now
            .unix_timestamp()
            .saturating_add(ttl_seconds(self.token_ttl));
        // The slide and STS run together: one round trip instead of two. A record deleted
        // meanwhile (revoked) wins: its credentials are dropped.
        let (touched, issued) = futures::join!(
            self.tokens.touch(&hash, now.unix_timestamp(), expires),
            self.issuer.assume_role(&request),
        );
        match touched {
            Ok(()) => {}
            Err(StoreError::NotFound) => return Err(BrokerError::InvalidToken("revoked token")),
            Err(error) => {
                // Serving still beats failing: the token was valid a moment ago; only its
                // expiry did not slide this time.
                tracing::warn!(
                    token_hash = hash.short(),
                    error = %error,
                    "could not slide the token's expiry"
                );
            }
        }
        let credentials = issued.map_err(|e| match e {
            IssueError::Refused { code, message } => {
                BrokerError::AssumeRoleFailed { code, message }
            }
            IssueError::Unavailable(source) => BrokerError::Unavailable {
                what: "STS".to_owned(),
                source,
            },
        })?;

        Ok(BrokerAnswer {
            max_age: cache_max_age(credentials.expiration, self.clock.now()),
            body: EcsCredentials::new(
                &credentials,
                record.role_arn.as_str(),
                record.role_arn.account_id(),
            ),
            subject: subject.clone(),
            pod_name: record.pod_name,
        })
    }
}

fn ttl_seconds(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)
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
        expires: now.unix_timestamp().saturating_add(ttl_seconds(ttl)),
        retracted_at: None,
    };
    Ok((token, record))
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;
    use crate::clock::FixedClock;
    use crate::memory::{MemoryAllowanceStore, MemoryIssuer, MemoryTokenStore};
    use crate::token::TokenHash;

    const ROLE: &str = "arn:aws:iam::123456789012:role/iam-broker/s3_reader";
    const NOW: OffsetDateTime = datetime!(2026-11-22 06:00:00 UTC);

    struct Fixture {
        allowances: Arc<MemoryAllowanceStore>,
        tokens: Arc<MemoryTokenStore>,
        issuer: Arc<MemoryIssuer>,
        broker: Broker,
    }

    fn fixture(session_tags: bool) -> Fixture {
        let allowances = Arc::new(MemoryAllowanceStore::default());
        let tokens = Arc::new(MemoryTokenStore::default());
        let issuer = Arc::new(MemoryIssuer::new(Arc::new(FixedClock(NOW))));
        let broker = Broker::new(
            allowances.clone(),
            tokens.clone(),
            issuer.clone(),
            Arc::new(FixedClock(NOW)),
            BrokerSettings {
                credential_duration: Duration::from_secs(3600),
                token_ttl: Duration::from_secs(86_400),
                session_tags,
            },
        );
        Fixture {
            allowances,
            tokens,
            issuer,
            broker,
        }
    }

    async fn grant(f: &Fixture, subject: &Subject, at: OffsetDateTime) -> Token {
        let (token, record) = mint(
            Grant {
                subject: subject.clone(),
                role_arn: RoleArn::parse(ROLE).unwrap(),
                pod_name: Some("web-1".to_owned()),
                secret_name: None,
            },
            at,
            Duration::from_secs(86_400),
        )
        .unwrap();
        f.tokens.insert(&record).await.unwrap();
        token
    }

    #[tokio::test]
    async fn serves_an_allowed_role_and_slides_the_record() {
        // GIVEN an allowed subject with a token minted an hour ago
        let f = fixture(false);
        let subject = Subject::service_account("team-a", "app").unwrap();
        f.allowances.allow(&subject, ROLE).await.unwrap();
        let token = grant(&f, &subject, NOW - time::Duration::hours(1)).await;

        // WHEN the token asks for credentials
        let answer = f.broker.credentials(Some(token.expose())).await.unwrap();

        // THEN the role's credentials come back, cacheable until five minutes before expiry
        assert_eq!(answer.body.role_arn, ROLE);
        assert_eq!(answer.body.account_id, "123456789012");
        assert_eq!(answer.body.expiration, "2026-11-22T07:00:00Z");
        assert_eq!(answer.max_age, 3300);
        // AND STS heard who asked, never the token
        let request = f.issuer.requests()[0].clone();
        assert_eq!(request.session_name, "team-a.app.web-1");
        assert!(request.tags.is_empty());
        assert!(!request.session_name.contains(&token.expose()[5..]));
        // AND the record slid forward
        let record = f.tokens.record(&token.hash()).await.unwrap().unwrap();
        assert_eq!(record.last_used, Some(NOW.unix_timestamp()));
        assert_eq!(record.expires, NOW.unix_timestamp() + 86_400);
    }

    #[tokio::test]
    async fn session_tags_when_enabled() {
        let f = fixture(true);
        let subject = Subject::service_account("team-a", "app").unwrap();
        f.allowances.allow(&subject, ROLE).await.unwrap();
        let token = grant(&f, &subject, NOW).await;
        f.broker.credentials(Some(token.expose())).await.unwrap();
        let request = f.issuer.requests()[0].clone();
        assert_eq!(request.tags.len(), 3);
    }

    #[tokio::test]
    async fn wildcard_row_allows_every_service_account() {
        let f = fixture(false);
        let subject = Subject::service_account("team-a", "any-sa").unwrap();
        f.allowances.allow(&subject.wildcard(), ROLE).await.unwrap();
        let token = grant(&f, &subject, NOW).await;
        assert!(f.broker.credentials(Some(token.expose())).await.is_ok());
    }

    #[tokio::test]
    async fn refusals_map_to_their_codes_and_write_nothing() {
        let f = fixture(false);
        let subject = Subject::service_account("team-a", "app").unwrap();
        f.allowances.allow(&subject, ROLE).await.unwrap();
        let expired = grant(&f, &subject, NOW - time::Duration::days(2)).await;
        let unknown = Token::mint().unwrap();
        let before = f.tokens.list().await.unwrap();

        let code = |r: Result<BrokerAnswer, BrokerError>| r.unwrap_err().code();
        assert_eq!(
            code(f.broker.credentials(None).await),
            "MissingAuthorization"
        );
        assert_eq!(
            code(f.broker.credentials(Some("")).await),
            "MissingAuthorization"
        );
        assert_eq!(
            code(f.broker.credentials(Some("garbage")).await),
            "InvalidToken"
        );
        assert_eq!(
            code(f.broker.credentials(Some(unknown.expose())).await),
            "InvalidToken"
        );
        assert_eq!(
            code(f.broker.credentials(Some(expired.expose())).await),
            "InvalidToken"
        );

        assert_eq!(
            f.tokens.list().await.unwrap(),
            before,
            "nothing was written"
        );
        assert!(f.issuer.requests().is_empty(), "STS was never called");
    }

    #[tokio::test]
    async fn revoking_the_allowance_takes_effect_at_the_next_fetch() {
        let f = fixture(false);
        let subject = Subject::service_account("team-a", "app").unwrap();
        f.allowances.allow(&subject, ROLE).await.unwrap();
        let token = grant(&f, &subject, NOW).await;
        assert!(f.broker.credentials(Some(token.expose())).await.is_ok());

        f.allowances.disallow(&subject, Some(ROLE)).await.unwrap();
        let err = f
            .broker
            .credentials(Some(token.expose()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "AllowanceRevoked");
    }

    #[tokio::test]
    async fn sts_refusal_is_assume_role_failed_with_its_code() {
        let f = fixture(false);
        f.issuer.refuse("AccessDenied");
        let subject = Subject::service_account("team-a", "app").unwrap();
        f.allowances.allow(&subject, ROLE).await.unwrap();
        let token = grant(&f, &subject, NOW).await;
        let err = f
            .broker
            .credentials(Some(token.expose()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "AssumeRoleFailed");
        assert!(err.to_string().contains("AccessDenied"));
    }

    /// A token store whose every read finds an unreadable item.
    struct CorruptTokens;

    #[async_trait::async_trait]
    impl TokenStore for CorruptTokens {
        async fn record(&self, _: &TokenHash) -> Result<Option<TokenRecord>, StoreError> {
            Err(StoreError::Corrupt {
                store: "authorizations".to_owned(),
                message: "role_arn: not an ARN".to_owned(),
            })
        }
        async fn insert(&self, _: &TokenRecord) -> Result<(), StoreError> {
            unreachable!("the broker never inserts")
        }
        async fn touch(&self, _: &TokenHash, _: i64, _: i64) -> Result<(), StoreError> {
            unreachable!("an unreadable record is never slid")
        }
        async fn retract(&self, _: &TokenRecord) -> Result<(), StoreError> {
            unreachable!("the broker never retracts")
        }
        async fn delete(&self, _: &TokenHash) -> Result<Option<TokenRecord>, StoreError> {
            unreachable!("the broker never deletes")
        }
        async fn list(&self) -> Result<Vec<TokenRecord>, StoreError> {
            unreachable!("the broker never lists")
        }
    }

    #[tokio::test]
    async fn an_unreadable_record_is_invalid_token_and_never_reaches_sts() {
        let issuer = Arc::new(MemoryIssuer::new(Arc::new(FixedClock(NOW))));
        let broker = Broker::new(
            Arc::new(MemoryAllowanceStore::default()),
            Arc::new(CorruptTokens),
            issuer.clone(),
            Arc::new(FixedClock(NOW)),
            BrokerSettings {
                credential_duration: Duration::from_secs(3600),
                token_ttl: Duration::from_secs(86_400),
                session_tags: false,
            },
        );
        let token = Token::mint().unwrap();
        let err = broker.credentials(Some(token.expose())).await.unwrap_err();
        assert!(matches!(err, BrokerError::CorruptRecord { .. }), "{err:?}");
        assert_eq!(err.code(), "InvalidToken");
        assert!(!err.to_string().contains(token.expose()));
        assert!(issuer.requests().is_empty(), "STS was not called");
    }

    #[tokio::test]
    async fn a_retracted_record_is_invalid_token_and_is_not_slid() {
        let f = fixture(false);
        let subject = Subject::service_account("team-a", "app").unwrap();
        f.allowances.allow(&subject, ROLE).await.unwrap();
        let token = grant(&f, &subject, NOW).await;
        let record = f.tokens.record(&token.hash()).await.unwrap().unwrap();
        let tombstone = record.retracted(NOW.unix_timestamp());
        f.tokens.retract(&tombstone).await.unwrap();
        let err = f
            .broker
            .credentials(Some(token.expose()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), "InvalidToken");
        assert!(err.to_string().contains("retracted"));
        assert!(f.issuer.requests().is_empty());
        assert_eq!(
            f.tokens.record(&token.hash()).await.unwrap(),
            Some(tombstone)
        );
        // and a late insert of the same hash cannot bring it back
        assert!(matches!(
            f.tokens.insert(&record).await,
            Err(StoreError::AlreadyExists)
        ));
    }
}
