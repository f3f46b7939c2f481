//! The credential broker: token in, temporary credentials for the token's role out.
//!
//! Two kinds of credential reach it:
//! - an `iamb_` token the webhook minted (`secret` mode): it must be well formed, known,
//!   unretracted and unexpired; its record names the role;
//! - a projected ServiceAccount token (`projected` mode): its signature must verify against a
//!   registered cluster's keys and its claims must name a pod (see [`crate::projected`]); the
//!   role is the one the request names (`?role=`, set by the webhook from the ServiceAccount's
//!   annotation), or the only role allowed.
//!
//! Either way the role must be allowed, now, for the cluster, namespace and ServiceAccount (or
//! the namespace's `*` row). Only then is STS called. Revoking an allowance therefore takes
//! effect at the next fetch.

use std::sync::Arc;
use std::time::Duration;

use crate::cache::{CacheKey, CredentialCache, Holder, Lookup};
use crate::projected::{IdentifyError, ProjectedIdentities};
use crate::session::{SessionContext, role_session_name, session_tags, source_identity};
use iam_broker_kernel::allowance::{
    Permitted, Refusal, Revoked, RoleArn, Row, Subject, UnreadableRow, deciding_subjects, permit,
    revoked,
};
use iam_broker_kernel::clock::Clock;
use iam_broker_kernel::cluster::ClusterName;
use iam_broker_kernel::credentials::{Credentials, EcsCredentials, cache_max_age};
use iam_broker_kernel::ports::{
    AllowanceStore, AssumeRoleRequest, BoxError, CredentialIssuer, IssueError, Stage,
    StageObserver, StoreError, StsRetryable, TokenStore,
};
use iam_broker_kernel::token::{Token, TokenError};

/// Why the broker did not serve credentials. Each maps to one row of the error table (ARCHITECTURE.md, "Error contract").
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
    /// 403 `AllowanceRevoked`: the role is not (or no longer) allowed for the token's
    /// cluster, namespace and ServiceAccount.
    #[error("role {role_arn} is not allowed for {subject}")]
    AllowanceRevoked {
        /// Who the token belongs to.
        subject: Subject,
        /// The role it names (or asked for).
        role_arn: String,
    },
    /// 403 `AllowanceUnreadable`: no readable Allowances row allows the role, and a row that
    /// might is unreadable (an attribute of the wrong type). Permanent until an administrator
    /// fixes or rewrites the row: retrying cannot help, so it is not a 503. Logged as an error
    /// naming the table and the row, and counted apart (`CorruptAllowanceRows`).
    #[error("role {role_arn} is not allowed for {subject}: {row}")]
    AllowanceUnreadable {
        /// Who asked.
        subject: Subject,
        /// The role it names (or asked for).
        role_arn: String,
        /// The row that cannot be read.
        row: UnreadableRow,
    },
    /// 403 `AllowanceRevoked` as well: the rows allow the role, but an operator revoked the
    /// sessions of the pod, its ServiceAccount or its namespace (`iam-broker sessions revoke`).
    #[error("{revoked}")]
    SessionsRevoked {
        /// Who asked.
        subject: Subject,
        /// The revocation that applies.
        revoked: Revoked,
    },
    /// 400 `RoleRequired`: a projected token's ServiceAccount is allowed several roles and the
    /// request named none.
    #[error("{subject} is allowed {count} roles; name one with ?role=<role ARN>")]
    RoleRequired {
        /// Who the token belongs to.
        subject: Subject,
        /// How many roles are allowed.
        count: usize,
    },
    /// 400 `InvalidRoleParameter`: `?role=` is not a role ARN.
    #[error("the role parameter is not valid: {0}")]
    InvalidRoleParameter(String),
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
            Self::AllowanceRevoked { .. } | Self::SessionsRevoked { .. } => "AllowanceRevoked",
            Self::AllowanceUnreadable { .. } => "AllowanceUnreadable",
            Self::RoleRequired { .. } => "RoleRequired",
            Self::InvalidRoleParameter(_) => "InvalidRoleParameter",
            Self::AssumeRoleFailed { .. } => "AssumeRoleFailed",
            Self::Unavailable { .. } => "ServiceUnavailable",
        }
    }
}

impl BrokerError {
    /// The STS error code behind this error, for metrics: STS's own code (`AccessDenied`,
    /// `Throttling`, ...), or `Unreachable` when STS did not answer; `None` when STS was not
    /// called.
    pub fn sts_error_code(&self) -> Option<&str> {
        match self {
            Self::AssumeRoleFailed { code, .. } => Some(code),
            Self::Unavailable { what, source } if what == STS => Some(
                source
                    .downcast_ref::<StsRetryable>()
                    .map_or("Unreachable", |r| r.code.as_str()),
            ),
            _ => None,
        }
    }

    /// The `Message` of the JSON error body. Every refused token gets the same one
    /// ([`INVALID_TOKEN_MESSAGE`]): whether an issuer or key is registered, a signature is bad
    /// or a claim is wrong is for the broker's log (the error's `Display`), not for whoever
    /// holds the token.
    pub fn public_message(&self) -> String {
        match self {
            Self::InvalidToken(_) | Self::CorruptRecord { .. } => INVALID_TOKEN_MESSAGE.to_owned(),
            other => other.to_string(),
        }
    }
}

/// The one `Message` of every `403 InvalidToken`.
pub const INVALID_TOKEN_MESSAGE: &str =
    "the token is not valid for this broker; its log says why (field \"error\")";

impl From<StoreError> for BrokerError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable { store, source, .. } => Self::Unavailable {
                what: store,
                source,
            },
            StoreError::NotFound => Self::InvalidToken("unknown token"),
            StoreError::Corrupt { ref store, .. } => Self::Unavailable {
                what: store.clone(),
                source: Box::new(error),
            },
            StoreError::AlreadyExists => Self::Unavailable {
                what: "a store".to_owned(),
                source: Box::new(error),
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
    /// The pod named by the token record or the projected token, if any.
    pub pod_name: Option<String>,
    /// The registered cluster of a projected token.
    pub cluster: Option<ClusterName>,
    /// Whether the credentials came from the broker's cache (no `AssumeRole`).
    pub lookup: Lookup,
}

/// What the broker decided for one credential, before STS ([`Broker::authorize`]).
#[derive(Debug, Clone)]
pub struct Authorized {
    /// Whose credential it is (in the scope whose Allowances rows decide).
    pub subject: Subject,
    /// The role it gets.
    pub role_arn: RoleArn,
    /// The `sts:AssumeRole` request that would be (or was) sent.
    pub request: AssumeRoleRequest,
    /// The registered cluster of a projected token.
    pub cluster: Option<ClusterName>,
    /// The pod named by the token record or the projected token, if any.
    pub pod_name: Option<String>,
    /// What kind of credential it was.
    pub credential: Credential,
}

/// The credential a request presented.
#[derive(Debug, Clone)]
pub enum Credential {
    /// A Secret-mode token, known by its hash.
    Secret {
        /// The token's hash (its record's key).
        hash: iam_broker_kernel::token::TokenHash,
        /// When its record expires (Unix seconds), before this use slides it.
        expires: i64,
    },
    /// A projected ServiceAccount token.
    Projected {
        /// The pod's uid (claim `kubernetes.io.pod.uid`).
        pod_uid: String,
        /// The token's `exp` (Unix seconds).
        expires: i64,
    },
}

/// The broker: the ports it needs and its settings. Built once at start-up.
pub struct Broker {
    allowances: Arc<dyn AllowanceStore>,
    tokens: Arc<dyn TokenStore>,
    issuer: Arc<dyn CredentialIssuer>,
    clock: Arc<dyn Clock>,
    settings: BrokerSettings,
    projected: Option<ProjectedIdentities>,
    cache: Option<CredentialCache>,
    observer: Option<Arc<dyn StageObserver>>,
}

/// `what` of a [`BrokerError::Unavailable`] caused by STS.
const STS: &str = "STS";

/// Settings of the broker, from [`iam_broker_kernel::Config`].
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// `DurationSeconds` for `sts:AssumeRole`.
    pub credential_duration: Duration,
    /// How far each use slides a token's expiry.
    pub token_ttl: Duration,
    /// Whether to send session tags.
    pub session_tags: bool,
    /// Whether to send `SourceIdentity`.
    pub source_identity: bool,
    /// The default cluster (`CLUSTER_NAME`): its allowances carry no cluster prefix, and it
    /// names Secret-mode sessions.
    pub cluster_name: Option<ClusterName>,
}

impl From<&iam_broker_kernel::Config> for BrokerSettings {
    fn from(config: &iam_broker_kernel::Config) -> Self {
        Self {
            credential_duration: config.credential_duration,
            token_ttl: config.token_ttl,
            session_tags: config.session_tags,
            source_identity: config.source_identity,
            cluster_name: config.cluster_name.clone(),
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
            settings,
            projected: None,
            cache: None,
            observer: None,
        }
    }

    /// Reuses issued credentials per pod and role (see [`crate::cache`]).
    pub fn with_cache(mut self, cache: CredentialCache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Tells `observer` how long each stage of each request takes.
    pub fn with_observer(mut self, observer: Arc<dyn StageObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// The projected-token verifier, when projected tokens are accepted.
    pub fn projected_identities(&self) -> Option<&ProjectedIdentities> {
        self.projected.as_ref()
    }

    /// Runs `work` as one `stage` for the observer.
    async fn timed<T>(&self, stage: Stage, work: impl Future<Output = T>) -> T {
        let Some(observer) = &self.observer else {
            return work.await;
        };
        let started = std::time::Instant::now();
        let result = work.await;
        observer.observe(stage, started.elapsed());
        result
    }

    /// The credential cache, when there is one.
    pub fn cache(&self) -> Option<&CredentialCache> {
        self.cache.as_ref()
    }

    /// The Allowances rows that decide for `subject`: its own, and for the default cluster also
    /// those written under its name (`allowance::deciding_subjects`), in one read.
    async fn rows_deciding(&self, subject: &Subject) -> Result<Vec<Row>, StoreError> {
        let subjects = deciding_subjects(subject, self.settings.cluster_name.as_ref());
        self.timed(Stage::DynamoDb, self.allowances.rows_for_all(&subjects))
            .await
    }

    /// `AssumeRole` for `request`, or the cached answer for the same pod and request.
    async fn issue(
        &self,
        subject: &Subject,
        holder: Holder<'_>,
        request: &AssumeRoleRequest,
    ) -> Result<(Credentials, Lookup), IssueError> {
        match &self.cache {
            Some(cache) => {
                let key = CacheKey::new(subject, holder, request);
                cache
                    .get_or_issue(key, || {
                        self.timed(Stage::Sts, self.issuer.assume_role(request))
                    })
                    .await
            }
            None => self
                .timed(Stage::Sts, self.issuer.assume_role(request))
                .await
                .map(|c| (c, Lookup::Miss)),
        }
    }

    /// The error for a role the Allowances rows do not grant; a revoked or unreadable
    /// allowance also drops what the cache holds for the subject.
    fn refused(
        &self,
        refusal: Refusal,
        subject: &Subject,
        requested: Option<&RoleArn>,
    ) -> BrokerError {
        if let (Some(cache), Refusal::NotAllowed | Refusal::Unreadable(_)) = (&self.cache, &refusal)
        {
            cache.forget(subject);
        }
        refused(refusal, subject, requested)
    }

    /// The refusal of a pod whose sessions an operator revoked (dropping what the cache holds
    /// for it); `None` when nothing is revoked.
    fn revocation(
        &self,
        rows: &[Row],
        subject: &Subject,
        pod: Option<&str>,
    ) -> Option<BrokerError> {
        let revoked = revoked(rows, pod)?;
        if let Some(cache) = &self.cache {
            cache.forget(subject);
        }
        Some(BrokerError::SessionsRevoked {
            subject: subject.clone(),
            revoked,
        })
    }

    /// Accepts projected ServiceAccount tokens, verified against `identities`.
    pub fn with_projected(mut self, identities: ProjectedIdentities) -> Self {
        self.projected = Some(identities);
        self
    }

    /// Serves credentials for the credential in an `Authorization` header value; `role` is the
    /// request's `?role=` (used by projected tokens; a Secret-mode token's record fixes its role).
    pub async fn credentials(
        &self,
        authorization: Option<&str>,
        role: Option<&str>,
    ) -> Result<BrokerAnswer, BrokerError> {
        let authorized = self.authorize(authorization, role).await?;
        let subject = &authorized.subject;
        let issued = match &authorized.credential {
            Credential::Projected { pod_uid, .. } => {
                self.issue(subject, Holder::PodUid(pod_uid), &authorized.request)
                    .await
            }
            Credential::Secret { hash, expires } => {
                let holder = Holder::TokenHash(hash.as_str());
                let now = self.clock.now();
                let ttl = ttl_seconds(self.settings.token_ttl);
                let slid = now.unix_timestamp().saturating_add(ttl);
                if slid.saturating_sub(*expires) >= slide_step(ttl) {
                    // The slide and STS run together: one round trip instead of two. A record
                    // deleted meanwhile (revoked) wins: its credentials are dropped.
                    let (touched, issued) = futures::join!(
                        self.timed(
                            Stage::DynamoDb,
                            self.tokens.touch(hash, now.unix_timestamp(), slid)
                        ),
                        self.issue(subject, holder, &authorized.request),
                    );
                    match touched {
                        Ok(()) => {}
                        Err(StoreError::NotFound) => {
                            return Err(BrokerError::InvalidToken("revoked token"));
                        }
                        Err(error) => {
                            // Serving still beats failing: the token was valid a moment ago;
                            // only its expiry did not slide this time.
                            tracing::warn!(
                                token_hash = hash.short(),
                                error = %error,
                                "could not slide the token's expiry"
                            );
                        }
                    }
                    issued
                } else {
                    self.issue(subject, holder, &authorized.request).await
                }
            }
        };
        let (credentials, lookup) = issued.map_err(issue_error)?;
        let role_arn = &authorized.role_arn;
        Ok(BrokerAnswer {
            max_age: cache_max_age(credentials.expiration, self.clock.now()),
            body: EcsCredentials::new(&credentials, role_arn.as_str(), role_arn.account_id()),
            subject: authorized.subject,
            pod_name: authorized.pod_name,
            cluster: authorized.cluster,
            lookup,
        })
    }

    /// Everything the broker decides before STS, for the credential in an `Authorization`
    /// header value and the request's `?role=`: whose it is, which role, and the exact
    /// `AssumeRole` request. Only reads (the token record, the registry, the Allowances rows):
    /// no slide, no STS, no cache. [`Self::credentials`] runs it first; `iam-broker explain`
    /// runs it alone.
    pub async fn authorize(
        &self,
        authorization: Option<&str>,
        role: Option<&str>,
    ) -> Result<Authorized, BrokerError> {
        if let Some(jwt) = iam_broker_kernel::token::bearer(authorization)
            .filter(|v| iam_broker_kernel::jwt::looks_like_jwt(v))
        {
            return self.authorize_projected(jwt, role).await;
        }
        let token = Token::from_authorization(authorization).map_err(|e| match e {
            TokenError::Missing => BrokerError::MissingAuthorization,
            TokenError::Malformed | TokenError::Entropy(_) => {
                BrokerError::InvalidToken("malformed token")
            }
        })?;
        let hash = token.hash();
        let now = self.clock.now();
        let record = match self.timed(Stage::DynamoDb, self.tokens.record(&hash)).await {
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

        let subject = record.subject;
        let rows = self.rows_deciding(&subject).await?;
        let permitted = permit(&rows, Some(&record.role_arn))
            .map_err(|refusal| self.refused(refusal, &subject, Some(&record.role_arn)))?;
        if let Some(refusal) = self.revocation(&rows, &subject, record.pod_name.as_deref()) {
            return Err(refusal);
        }
        let context = SessionContext {
            subject: &subject,
            cluster: self.settings.cluster_name.as_ref().map(ClusterName::as_str),
            pod_name: record.pod_name.as_deref(),
            pod_uid: None,
        };
        let request = self.assume_role_request(&record.role_arn, permitted, &context);
        Ok(Authorized {
            role_arn: record.role_arn,
            request,
            cluster: None,
            pod_name: record.pod_name,
            credential: Credential::Secret {
                hash,
                expires: record.expires,
            },
            subject,
        })
    }

    /// A projected ServiceAccount token: verify, find the pod's allowances in its cluster,
    /// choose the role. Nothing is written.
    async fn authorize_projected(
        &self,
        jwt: &str,
        role: Option<&str>,
    ) -> Result<Authorized, BrokerError> {
        let identities = self.projected.as_ref().ok_or(BrokerError::InvalidToken(
            "projected ServiceAccount tokens are not accepted by this broker",
        ))?;
        let requested = role
            .filter(|r| !r.is_empty())
            .map(RoleArn::parse)
            .transpose()
            .map_err(|e| BrokerError::InvalidRoleParameter(e.to_string()))?;
        let pod = self
            .timed(Stage::TokenVerification, identities.identify(jwt))
            .await
            .map_err(|e| match e {
                IdentifyError::Invalid(reason) => BrokerError::InvalidToken(jwt_reason(&reason)),
                IdentifyError::Unavailable(source) => BrokerError::Unavailable {
                    what: "the cluster registry".to_owned(),
                    source: Box::new(source),
                },
            })?;
        let scope = (self.settings.cluster_name.as_ref() != Some(&pod.cluster))
            .then(|| pod.cluster.clone());
        let subject = pod.subject.clone().in_cluster(scope);
        let rows = self.rows_deciding(&subject).await?;
        let permitted = permit(&rows, requested.as_ref())
            .map_err(|refusal| self.refused(refusal, &subject, requested.as_ref()))?;
        if let Some(refusal) = self.revocation(&rows, &subject, Some(&pod.claims.pod_name)) {
            return Err(refusal);
        }
        let context = SessionContext {
            subject: &subject,
            cluster: Some(pod.cluster.as_str()),
            pod_name: Some(&pod.claims.pod_name),
            pod_uid: Some(&pod.claims.pod_uid),
        };
        let role_arn = permitted.role_arn.clone();
        let request = self.assume_role_request(&role_arn, permitted, &context);
        Ok(Authorized {
            subject,
            role_arn,
            request,
            pod_name: Some(pod.claims.pod_name),
            credential: Credential::Projected {
                pod_uid: pod.claims.pod_uid,
                expires: pod.claims.expires_at,
            },
            cluster: Some(pod.cluster),
        })
    }

    fn assume_role_request(
        &self,
        role_arn: &RoleArn,
        permitted: Permitted,
        context: &SessionContext<'_>,
    ) -> AssumeRoleRequest {
        AssumeRoleRequest {
            role_arn: role_arn.to_string(),
            session_name: role_session_name(context),
            duration: self.settings.credential_duration,
            tags: if self.settings.session_tags {
                session_tags(context)
            } else {
                Vec::new()
            },
            source_identity: self
                .settings
                .source_identity
                .then(|| source_identity(context)),
            external_id: permitted.external_id,
            policy: permitted.session_policy,
        }
    }
}

/// The error for a role the Allowances rows do not grant.
fn refused(refusal: Refusal, subject: &Subject, requested: Option<&RoleArn>) -> BrokerError {
    let role_arn = requested.map_or_else(|| "(any)".to_owned(), ToString::to_string);
    match refusal {
        Refusal::NotAllowed => BrokerError::AllowanceRevoked {
            subject: subject.clone(),
            role_arn,
        },
        Refusal::Unreadable(row) => BrokerError::AllowanceUnreadable {
            subject: subject.clone(),
            role_arn,
            row,
        },
        Refusal::Ambiguous(count) => BrokerError::RoleRequired {
            subject: subject.clone(),
            count,
        },
    }
}

fn jwt_reason(error: &iam_broker_kernel::jwt::JwtError) -> &'static str {
    use iam_broker_kernel::jwt::JwtError as E;
    match error {
        E::Malformed => "malformed ServiceAccount token",
        E::UnsupportedAlgorithm => "unsupported signing algorithm",
        E::UnknownIssuer => "issuer of no registered cluster",
        E::UnknownKey => "signing key of no registered cluster",
        E::BadSignature => "bad signature",
        E::WrongAudience => "wrong audience",
        E::Expired => "expired ServiceAccount token",
        E::NotYetValid => "ServiceAccount token not yet valid",
        E::NotAServiceAccountToken => "not a ServiceAccount token",
        E::NotPodBound => "ServiceAccount token not bound to a pod",
        E::CriticalExtension => "critical header extensions (crit) are not understood",
        E::LifetimeTooLong => {
            "ServiceAccount token lifetime (exp - iat) longer than PROJECTED_MAX_TOKEN_LIFETIME_SECONDS, or no iat"
        }
    }
}

fn issue_error(error: IssueError) -> BrokerError {
    match error {
        IssueError::Refused { code, message } => BrokerError::AssumeRoleFailed { code, message },
        IssueError::Unavailable(source) => BrokerError::Unavailable {
            what: STS.to_owned(),
            source,
        },
    }
}

/// The least a use must move a token's expiry before the record is written: an hour, or a 24th
/// of the TTL when that is shorter. A token in steady use is then written at most once an hour
/// instead of at every fetch (one DynamoDB call of four), its `last_used` is exact to that step,
/// and its expiry never falls more than that step behind a full TTL. Revocation is unaffected:
/// every fetch reads the record (consistently) before STS is called, and a revoked or retracted
/// record refuses the token at that read.
pub const SLIDE_STEP: Duration = Duration::from_secs(3600);

fn slide_step(ttl: i64) -> i64 {
    ttl_seconds(SLIDE_STEP).min(ttl / 24)
}

fn ttl_seconds(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;
    use crate::cache::CredentialCache;
    use iam_broker_kernel::record::{Grant, TokenRecord, mint};
    use iam_broker_kernel::token::TokenHash;
    use iam_broker_testkit::FixedClock;
    use iam_broker_testkit::memory::{MemoryAllowanceStore, MemoryIssuer, MemoryTokenStore};
    use time::OffsetDateTime;

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
                source_identity: false,
                cluster_name: None,
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

    /// The broker's refusal of `token`.
    async fn refusal(f: &Fixture, token: &Token) -> BrokerError {
        f.broker
            .credentials(Some(token.expose()), None)
            .await
            .unwrap_err()
    }

    #[tokio::test]
    async fn the_allowances_session_policy_goes_to_sts_and_into_the_cache_key() {
        let f = fixture(false);
        let f = Fixture {
            broker: f
                .broker
                .with_cache(CredentialCache::new(100, Arc::new(FixedClock(NOW)))),
            ..f
        };
        let subject = Subject::service_account("team-a", "app").unwrap();
        let policy = iam_broker_kernel::allowance::SessionPolicy::parse(
            r#"{"Version":"2012-10-17","Statement":{"Effect":"Allow","Action":"s3:GetObject","Resource":"*"}}"#,
        )
        .unwrap();
        let terms = iam_broker_kernel::allowance::RoleTerms {
            external_id: None,
            session_policy: Some(policy.clone()),
        };
        f.allowances
            .allow_with(&subject, ROLE, &terms)
            .await
            .unwrap();
        let token = grant(&f, &subject, NOW).await;
        let fetch = || f.broker.credentials(Some(token.expose()), None);
        fetch().await.unwrap();
        assert_eq!(
            f.issuer.requests()[0].policy.as_deref(),
            Some(policy.as_str())
        );
        // The policy changed: what was cached under the old one is not served.
        f.allowances.allow(&subject, ROLE, None).await.unwrap();
        assert_eq!(fetch().await.unwrap().lookup, Lookup::Miss);
        assert_eq!(f.issuer.requests()[1].policy, None);
    }

    #[tokio::test]
    async fn the_default_clusters_named_rows_and_its_unprefixed_rows_both_decide() {
        // GIVEN CLUSTER_NAME=east, and a row written with `allow --cluster east`
        let f = fixture(false);
        let east = ClusterName::parse("east").unwrap();
        let f = Fixture {
            broker: Broker::new(
                f.allowances.clone(),
                f.tokens.clone(),
                f.issuer.clone(),
                Arc::new(FixedClock(NOW)),
                BrokerSettings {
                    cluster_name: Some(east.clone()),
                    ..f.broker.settings.clone()
                },
            ),
            ..f
        };
        let subject = Subject::service_account("team-a", "app").unwrap();
        f.allowances
            .allow(&subject.clone().in_cluster(Some(east)), ROLE, Some("named"))
            .await
            .unwrap();
        // WHEN a pod of the default cluster (its record unprefixed) asks
        let token = grant(&f, &subject, NOW).await;
        let answer = f
            .broker
            .credentials(Some(token.expose()), None)
            .await
            .unwrap();
        // THEN the named row grants it, with its ExternalId
        assert_eq!(answer.body.role_arn, ROLE);
        assert_eq!(f.issuer.requests()[0].external_id.as_deref(), Some("named"));
        // AND an unprefixed row alone grants it too (rows written before the name existed)
        let other = Subject::service_account("team-a", "other").unwrap();
        f.allowances.allow(&other, ROLE, None).await.unwrap();
        let token = grant(&f, &other, NOW).await;
        f.broker
            .credentials(Some(token.expose()), None)
            .await
            .unwrap();
        // AND another cluster's rows never do
        let west = Subject::service_account("team-a", "west-only").unwrap();
        f.allowances
            .allow(
                &west
                    .clone()
                    .in_cluster(Some(ClusterName::parse("west").unwrap())),
                ROLE,
                None,
            )
            .await
            .unwrap();
        let token = grant(&f, &west, NOW).await;
        assert_eq!(refusal(&f, &token).await.code(), "AllowanceRevoked");
    }

    #[tokio::test]
    async fn the_cache_saves_assume_role_but_every_fetch_is_still_checked() {
        // GIVEN a broker with a credential cache, and an allowed pod's token
        let f = fixture(false);
        let f = Fixture {
            broker: f
                .broker
                .with_cache(CredentialCache::new(100, Arc::new(FixedClock(NOW)))),
            ..f
        };
        let subject = Subject::service_account("team-a", "app").unwrap();
        f.allowances.allow(&subject, ROLE, None).await.unwrap();
        let token = grant(&f, &subject, NOW).await;
        let fetch = || f.broker.credentials(Some(token.expose()), None);

        // WHEN the pod fetches three times (three CLI processes)
        let first = fetch().await.unwrap();
        let second = fetch().await.unwrap();
        fetch().await.unwrap();
        // THEN STS was called once; the others were served from the cache
        assert_eq!(first.lookup, Lookup::Miss);
        assert_eq!(second.lookup, Lookup::Hit);
        assert_eq!(second.body.expiration, first.body.expiration);
        assert_eq!(f.issuer.requests().len(), 1);

        // AND another pod of the same ServiceAccount gets its own credentials
        let other_pod = grant(&f, &subject, NOW).await;
        let answer = f
            .broker
            .credentials(Some(other_pod.expose()), None)
            .await
            .unwrap();
        assert_eq!(answer.lookup, Lookup::Miss);
        assert_eq!(f.issuer.requests().len(), 2);

        // WHEN the allowance is revoked, cached credentials or not, the next fetch is refused
        f.allowances.disallow(&subject, Some(ROLE)).await.unwrap();
        assert_eq!(refusal(&f, &token).await.code(), "AllowanceRevoked");
        // AND what was cached for the ServiceAccount is gone: allowed again, STS is called
        f.allowances.allow(&subject, ROLE, None).await.unwrap();
        assert_eq!(fetch().await.unwrap().lookup, Lookup::Miss);
        assert_eq!(f.issuer.requests().len(), 3);

        // AND a deleted token record (the pod was deleted) is refused with credentials cached
        f.tokens.delete(&token.hash()).await.unwrap();
        assert_eq!(refusal(&f, &token).await.code(), "InvalidToken");
    }

    #[tokio::test]
    async fn serves_an_allowed_role_and_slides_the_record() {
        // GIVEN an allowed subject with a token minted an hour ago
        let f = fixture(false);
        let subject = Subject::service_account("team-a", "app").unwrap();
        f.allowances.allow(&subject, ROLE, None).await.unwrap();
        let token = grant(&f, &subject, NOW - time::Duration::hours(1)).await;

        // WHEN the token asks for credentials
        let answer = f
            .broker
            .credentials(Some(token.expose()), None)
            .await
            .unwrap();

        // THEN the role's credentials come back, cacheable until five minutes before expiry
        assert_eq!(answer.body.role_arn, ROLE);
        assert_eq!(answer.body.account_id, "123456789012");
        assert_eq!(answer.body.expiration, "2026-11-22T07:00:00Z");
        assert_eq!(answer.max_age, 3300);
        // AND STS heard who asked, never the token
        let request = f.issuer.requests()[0].clone();
        assert_eq!(request.session_name, "team-a_app_web-1");
        assert!(request.tags.is_empty());
        assert!(!request.session_name.contains(&token.expose()[5..]));
        // AND the record slid forward
        let record = f.tokens.record(&token.hash()).await.unwrap().unwrap();
        assert_eq!(record.last_used, Some(NOW.unix_timestamp()));
        assert_eq!(record.expires, NOW.unix_timestamp() + 86_400);
    }

    #[tokio::test]
    async fn an_unreadable_allowance_row_is_a_permanent_refusal_naming_it_not_a_503() {
        // GIVEN a token whose subject's only row is unreadable
        let f = fixture(false);
        let subject = Subject::service_account("team-a", "app").unwrap();
        f.allowances
            .put_unreadable(&subject, "allowed_roles is not a string set");
        let token = grant(&f, &subject, NOW).await;

        // WHEN it asks for credentials
        let err = refusal(&f, &token).await;

        // THEN the refusal is AllowanceUnreadable (403 upstream), naming the store and the row,
        // and STS is never called
        assert_eq!(err.code(), "AllowanceUnreadable");
        let text = err.to_string();
        assert!(text.contains("memory table allowances"), "{text}");
        assert!(
            text.contains(r#"namespace "team-a", service_account "app""#),
            "{text}"
        );
        assert!(text.contains("allowed_roles"), "{text}");
        assert!(f.issuer.requests().is_empty());
    }

    #[tokio::test]
    async fn a_valid_exact_row_works_beside_an_unreadable_namespace_row() {
        // GIVEN a valid exact row and an unreadable `*` row
        let f = fixture(false);
        let subject = Subject::service_account("team-a", "app").unwrap();
        f.allowances.allow(&subject, ROLE, None).await.unwrap();
        f.allowances
            .put_unreadable(&subject.wildcard(), "external_id:x is not a string");
        let token = grant(&f, &subject, NOW).await;

        // THEN the exact row's role is served
        let answer = f
            .broker
            .credentials(Some(token.expose()), None)
            .await
            .unwrap();
        assert_eq!(answer.body.role_arn, ROLE);

        // AND another ServiceAccount of the namespace, with only the `*` row, is refused
        // naming the `*` row
        let other = Subject::service_account("team-a", "other").unwrap();
        let token = grant(&f, &other, NOW).await;
        let err = refusal(&f, &token).await;
        assert_eq!(err.code(), "AllowanceUnreadable");
        assert!(err.to_string().contains(r#"service_account "*""#), "{err}");
    }

    #[tokio::test]
    async fn every_refused_token_gets_one_public_message_and_the_log_keeps_why() {
        let f = fixture(false);
        let subject = Subject::service_account("team-a", "app").unwrap();
        f.allowances.allow(&subject, ROLE, None).await.unwrap();
        let unknown = Token::parse("iamb_AQIDBAUGBwgJCgsMDQ4PEBESExQVFhcYGRobHB0eHyA").unwrap();
        let mut messages = std::collections::BTreeSet::new();
        let mut reasons = std::collections::BTreeSet::new();
        for presented in [
            unknown.expose().to_owned(),
            "iamb_malformed".to_owned(),
            "eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJ4In0.c2ln".to_owned(),
        ] {
            let err = f
                .broker
                .credentials(Some(&presented), None)
                .await
                .unwrap_err();
            assert_eq!(err.code(), "InvalidToken");
            messages.insert(err.public_message());
            reasons.insert(err.to_string());
        }
        assert_eq!(messages.len(), 1, "{messages:?}");
        assert_eq!(
            reasons.len(),
            3,
            "the log still tells them apart: {reasons:?}"
        );
        assert!(!messages.iter().next().unwrap().contains("unknown"));
    }

    #[tokio::test]
    async fn a_use_writes_the_record_only_when_it_moves_the_expiry_a_full_step() {
        // GIVEN a token minted 59 minutes ago (TTL one day: the step is an hour)
        let f = fixture(false);
        let subject = Subject::service_account("team-a", "app").unwrap();
        f.allowances.allow(&subject, ROLE, None).await.unwrap();
        let minted = NOW - time::Duration::minutes(59);
        let token = grant(&f, &subject, minted).await;

        // WHEN it fetches: served, but the record is not written (59 minutes < the step)
        f.broker
            .credentials(Some(token.expose()), None)
            .await
            .unwrap();
        let record = f.tokens.record(&token.hash()).await.unwrap().unwrap();
        assert_eq!(record.last_used, None);
        assert_eq!(record.expires, minted.unix_timestamp() + 86_400);

        // AND revocation still wins at the next fetch: the record is read every time
        f.tokens.delete(&token.hash()).await.unwrap();
        let err = refusal(&f, &token).await;
        assert_eq!(err.code(), "InvalidToken");
        assert_eq!(
            f.issuer.requests().len(),
            1,
            "STS is not called for a revoked token"
        );
        assert_eq!(slide_step(86_400), 3600);
        assert_eq!(slide_step(3600), 150, "a 24th of a short TTL");
    }

    #[tokio::test]
    async fn session_tags_when_enabled() {
        let f = fixture(true);
        let subject = Subject::service_account("team-a", "app").unwrap();
        f.allowances.allow(&subject, ROLE, None).await.unwrap();
        let token = grant(&f, &subject, NOW).await;
        f.broker
            .credentials(Some(token.expose()), None)
            .await
            .unwrap();
        let request = f.issuer.requests()[0].clone();
        assert_eq!(request.tags.len(), 3);
    }

    #[tokio::test]
    async fn wildcard_row_allows_every_service_account() {
        let f = fixture(false);
        let subject = Subject::service_account("team-a", "any-sa").unwrap();
        f.allowances
            .allow(&subject.wildcard(), ROLE, None)
            .await
            .unwrap();
        let token = grant(&f, &subject, NOW).await;
        assert!(
            f.broker
                .credentials(Some(token.expose()), None)
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn refusals_map_to_their_codes_and_write_nothing() {
        let f = fixture(false);
        let subject = Subject::service_account("team-a", "app").unwrap();
        f.allowances.allow(&subject, ROLE, None).await.unwrap();
        let expired = grant(&f, &subject, NOW - time::Duration::days(2)).await;
        let unknown = Token::mint().unwrap();
        let before = f.tokens.list().await.unwrap();

        let code = |r: Result<BrokerAnswer, BrokerError>| r.unwrap_err().code();
        assert_eq!(
            code(f.broker.credentials(None, None).await),
            "MissingAuthorization"
        );
        assert_eq!(
            code(f.broker.credentials(Some(""), None).await),
            "MissingAuthorization"
        );
        assert_eq!(
            code(f.broker.credentials(Some("garbage"), None).await),
            "InvalidToken"
        );
        assert_eq!(
            code(f.broker.credentials(Some(unknown.expose()), None).await),
            "InvalidToken"
        );
        assert_eq!(
            code(f.broker.credentials(Some(expired.expose()), None).await),
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
        f.allowances.allow(&subject, ROLE, None).await.unwrap();
        let token = grant(&f, &subject, NOW).await;
        assert!(
            f.broker
                .credentials(Some(token.expose()), None)
                .await
                .is_ok()
        );

        f.allowances.disallow(&subject, Some(ROLE)).await.unwrap();
        let err = refusal(&f, &token).await;
        assert_eq!(err.code(), "AllowanceRevoked");
    }

    #[tokio::test]
    async fn sts_refusal_is_assume_role_failed_with_its_code() {
        let f = fixture(false);
        f.issuer.refuse("AccessDenied");
        let subject = Subject::service_account("team-a", "app").unwrap();
        f.allowances.allow(&subject, ROLE, None).await.unwrap();
        let token = grant(&f, &subject, NOW).await;
        let err = refusal(&f, &token).await;
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
                source_identity: false,
                cluster_name: None,
            },
        );
        let token = Token::mint().unwrap();
        let err = broker
            .credentials(Some(token.expose()), None)
            .await
            .unwrap_err();
        assert!(matches!(err, BrokerError::CorruptRecord { .. }), "{err:?}");
        assert_eq!(err.code(), "InvalidToken");
        assert!(!err.to_string().contains(token.expose()));
        assert!(issuer.requests().is_empty(), "STS was not called");
    }

    #[tokio::test]
    async fn a_retracted_record_is_invalid_token_and_is_not_slid() {
        let f = fixture(false);
        let subject = Subject::service_account("team-a", "app").unwrap();
        f.allowances.allow(&subject, ROLE, None).await.unwrap();
        let token = grant(&f, &subject, NOW).await;
        let record = f.tokens.record(&token.hash()).await.unwrap().unwrap();
        let tombstone = record.retracted(NOW.unix_timestamp());
        f.tokens.retract(&tombstone).await.unwrap();
        let err = refusal(&f, &token).await;
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

    mod projected {
        use super::*;
        use crate::projected::ProjectedSettings;
        use iam_broker_kernel::cluster::RegisteredCluster;
        use iam_broker_kernel::ports::ClusterRegistry;
        use iam_broker_testkit::memory::MemoryClusterRegistry;
        use iam_broker_testkit::signer::{Signer, pod_claims};

        const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
        const OTHER: &str = "arn:aws:iam::210987654321:role/tenant/reader";

        struct World {
            f: Fixture,
            east: Signer,
            west: Signer,
        }

        /// Two clusters with the same issuer (kubeadm's default) and their own keys; `east` is
        /// the default cluster (unprefixed rows), `west` has `west/…` rows.
        async fn world(settings: BrokerSettings) -> World {
            let registry = Arc::new(MemoryClusterRegistry::default());
            let (east, west) = (Signer::new("east-key"), Signer::new("west-key"));
            for (name, signer) in [("east", &east), ("west", &west)] {
                let jwks = Signer::jwks(&[signer]);
                let cluster = RegisteredCluster::new(name, ISSUER, &jwks, "file t", 0).unwrap();
                registry.insert(&cluster).await.unwrap();
            }
            let mut f = fixture(false);
            let clock = Arc::new(FixedClock(NOW));
            f.broker = Broker::new(
                f.allowances.clone(),
                f.tokens.clone(),
                f.issuer.clone(),
                clock.clone(),
                settings,
            )
            .with_projected(ProjectedIdentities::new(
                registry,
                clock,
                ProjectedSettings {
                    audience: "iam-broker".to_owned(),
                    leeway: Duration::from_secs(60),
                    max_lifetime: Duration::from_secs(86_400),
                    registry_ttl: Duration::from_secs(60),
                    refresh_interval: Duration::from_millis(5),
                },
            ));
            World { f, east, west }
        }

        fn settings() -> BrokerSettings {
            BrokerSettings {
                credential_duration: Duration::from_secs(3600),
                token_ttl: Duration::from_secs(86_400),
                session_tags: true,
                source_identity: true,
                cluster_name: Some(ClusterName::parse("east").unwrap()),
            }
        }

        fn token(signer: &Signer, ns: &str, sa: &str) -> String {
            signer.sign(&pod_claims(ISSUER, ns, sa, "web-1", NOW.unix_timestamp()))
        }

        fn subject(ns: &str, sa: &str, cluster: Option<&str>) -> Subject {
            Subject::service_account(ns, sa)
                .unwrap()
                .in_cluster(cluster.map(|c| ClusterName::parse(c).unwrap()))
        }

        #[tokio::test]
        async fn a_verified_pod_gets_its_allowed_role_with_audit_grade_session() {
            let w = world(settings()).await;
            w.f.allowances
                .allow(&subject("team", "app", None), ROLE, None)
                .await
                .unwrap();
            let jwt = token(&w.east, "team", "app");
            let answer =
                w.f.broker
                    .credentials(Some(&format!("Bearer {jwt}")), None)
                    .await
                    .unwrap();
            assert_eq!(answer.body.role_arn, ROLE);
            assert_eq!(
                answer.cluster.as_ref().map(ClusterName::as_str),
                Some("east")
            );
            assert_eq!(answer.pod_name.as_deref(), Some("web-1"));

            let request = w.f.issuer.requests().pop().unwrap();
            assert_eq!(request.session_name, "team_app_web-1");
            assert_eq!(request.source_identity.as_deref(), Some("east_team_app"));
            assert_eq!(request.external_id, None);
            assert_eq!(
                request.tags,
                vec![
                    ("kubernetes-namespace", "team".to_owned()),
                    ("kubernetes-service-account", "app".to_owned()),
                    ("kubernetes-pod-name", "web-1".to_owned()),
                    ("kubernetes-pod-uid", "pod-uid-1".to_owned()),
                    ("eks-cluster-name", "east".to_owned()),
                ]
            );
            // Nothing was written: no token record.
            assert!(w.f.tokens.list().await.unwrap().is_empty());
        }

        #[tokio::test]
        async fn two_clusters_with_the_same_names_get_only_their_own_allowances() {
            let w = world(settings()).await;
            w.f.allowances
                .allow(&subject("team", "app", None), ROLE, None)
                .await
                .unwrap();
            w.f.allowances
                .allow(
                    &subject("team", "app", Some("west")),
                    OTHER,
                    Some("tenant-42"),
                )
                .await
                .unwrap();
            let from_east = token(&w.east, "team", "app");
            let from_west = token(&w.west, "team", "app");

            let east =
                w.f.broker
                    .credentials(Some(&from_east), None)
                    .await
                    .unwrap();
            assert_eq!(east.body.role_arn, ROLE);
            let west =
                w.f.broker
                    .credentials(Some(&from_west), None)
                    .await
                    .unwrap();
            assert_eq!(west.body.role_arn, OTHER);
            assert_eq!(west.body.account_id, "210987654321", "the role's account");
            let request = w.f.issuer.requests().pop().unwrap();
            assert_eq!(request.external_id.as_deref(), Some("tenant-42"));
            assert_eq!(request.source_identity.as_deref(), Some("west_team_app"));

            // Neither cluster can name the other's role.
            for (jwt, role) in [(&from_east, OTHER), (&from_west, ROLE)] {
                let err =
                    w.f.broker
                        .credentials(Some(jwt), Some(role))
                        .await
                        .unwrap_err();
                assert_eq!(err.code(), "AllowanceRevoked", "{err}");
            }
        }

        #[tokio::test]
        async fn namespace_a_cannot_get_namespace_b_role() {
            let w = world(settings()).await;
            w.f.allowances
                .allow(&subject("team-b", "app", None), ROLE, None)
                .await
                .unwrap();
            let jwt = token(&w.east, "team-a", "app");
            for role in [None, Some(ROLE)] {
                let err = w.f.broker.credentials(Some(&jwt), role).await.unwrap_err();
                assert_eq!(err.code(), "AllowanceRevoked", "{err}");
            }
            assert!(w.f.issuer.requests().is_empty(), "STS never called");
        }

        #[tokio::test]
        async fn the_role_parameter_chooses_among_allowed_roles_only() {
            let w = world(settings()).await;
            let app = subject("team", "app", None);
            w.f.allowances.allow(&app, ROLE, None).await.unwrap();
            w.f.allowances
                .allow(&app.wildcard(), OTHER, None)
                .await
                .unwrap();
            let jwt = token(&w.east, "team", "app");
            let err = w.f.broker.credentials(Some(&jwt), None).await.unwrap_err();
            assert_eq!(err.code(), "RoleRequired");
            let answer =
                w.f.broker
                    .credentials(Some(&jwt), Some(OTHER))
                    .await
                    .unwrap();
            assert_eq!(answer.body.role_arn, OTHER);
            let err =
                w.f.broker
                    .credentials(Some(&jwt), Some("not-an-arn"))
                    .await
                    .unwrap_err();
            assert_eq!(err.code(), "InvalidRoleParameter");
            let err =
                w.f.broker
                    .credentials(Some(&jwt), Some("arn:aws:iam::123456789012:role/admin"))
                    .await
                    .unwrap_err();
            assert_eq!(err.code(), "AllowanceRevoked");
        }

        #[tokio::test]
        async fn forged_expired_and_foreign_tokens_are_invalid() {
            let w = world(settings()).await;
            w.f.allowances
                .allow(&subject("team", "app", None), ROLE, None)
                .await
                .unwrap();
            let now = NOW.unix_timestamp();
            let mut expired = pod_claims(ISSUER, "team", "app", "web-1", now - 7200);
            expired["exp"] = serde_json::json!(now - 3600);
            let mut audience = pod_claims(ISSUER, "team", "app", "web-1", now);
            audience["aud"] = serde_json::json!(["https://kubernetes.default.svc"]);
            let mut century = pod_claims(ISSUER, "team", "app", "web-1", now);
            century["exp"] = serde_json::json!(now + 100 * 365 * 86_400);
            let valid = pod_claims(ISSUER, "team", "app", "web-1", now);
            let crit = serde_json::json!({ "alg": "ES256", "kid": w.east.kid,
                "crit": ["urn:example:must-understand"] });
            let cases = [
                ("expired", w.east.sign(&expired)),
                ("other audience", w.east.sign(&audience)),
                ("a hundred years", w.east.sign(&century)),
                ("critical extension", w.east.sign_with(&crit, &valid)),
                ("unknown key", Signer::new("no-such-key").sign(&valid)),
                (
                    "foreign key",
                    Signer::new("east-key").sign(&pod_claims(ISSUER, "team", "app", "p", now)),
                ),
                (
                    "unknown issuer",
                    w.east
                        .sign(&pod_claims("https://other", "team", "app", "p", now)),
                ),
            ];
            let mut messages = std::collections::BTreeSet::new();
            for (what, jwt) in cases {
                let err = w.f.broker.credentials(Some(&jwt), None).await.unwrap_err();
                assert_eq!(err.code(), "InvalidToken", "{what}: {err}");
                messages.insert(err.public_message());
            }
            assert!(w.f.issuer.requests().is_empty());
            // One message outward: no refusal tells what is registered.
            assert_eq!(
                messages.into_iter().collect::<Vec<_>>(),
                [INVALID_TOKEN_MESSAGE]
            );
            // The same token, signed properly, is served.
            assert!(
                w.f.broker
                    .credentials(Some(&w.east.sign(&valid)), None)
                    .await
                    .is_ok()
            );
        }

        #[tokio::test]
        async fn a_broker_without_a_registry_refuses_projected_tokens() {
            let f = fixture(false);
            let jwt = Signer::new("k").sign(&pod_claims(ISSUER, "team", "app", "p", 0));
            let err = f.broker.credentials(Some(&jwt), None).await.unwrap_err();
            assert_eq!(err.code(), "InvalidToken");
        }
    }
}
