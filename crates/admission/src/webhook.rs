//! The admission webhook. In `secret` mode CREATE mints a token, creates its Secret and record,
//! and answers the patch; DELETE removes the Secret and the record. Every multi-step write
//! completes or is undone. In `projected` mode CREATE only reads (the ServiceAccount, the
//! Allowances) and answers a patch that mounts a projected ServiceAccount token: it writes
//! nothing, not even an Event, so it can be registered with `sideEffects: None`. DELETE still
//! cleans up pods admitted in `secret` mode (a cluster moving to `projected` keeps its DELETE
//! rule until they are gone).
//!
//! The decision itself (pod in, patch out) is [`crate::patch`]; this module only sequences
//! the lookups and writes around it, under one deadline, and applies the failure policy.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, timeout_at};

use crate::events::{
    EVENT_BUDGET, EventLimiter, Notice, REASON_ALLOWANCE_UNREADABLE, REASON_DENIED,
    REASON_FAILED_OPEN, REASON_INVALID_ROLE_ANNOTATION, REASON_ROLE_NOT_ALLOWED, involved_object,
};
use crate::patch::{
    self, ANNOTATION_INJECTION, ANNOTATION_SECRET_NAME, ANNOTATION_TOKEN_HASH, InjectSettings,
    Injection, InjectionMode, LABEL_MANAGED_BY, MANAGED_BY, PodView, Via,
};
use crate::review::{AdmissionRequest, AdmissionResponse, Operation};
use iam_broker_kernel::allowance::{
    RoleArn, Subject, deciding_subjects, is_allowed, revoked, unreadable,
};
use iam_broker_kernel::clock::Clock;
use iam_broker_kernel::cluster::ClusterName;
use iam_broker_kernel::config::{Config, FailurePolicy, IdentityMode};
use iam_broker_kernel::ports::{
    AllowanceStore, Cluster, ClusterError, ClusterEvent, StoreError, TokenSecret, TokenStore,
};
use iam_broker_kernel::record::TokenRecord;
use iam_broker_kernel::record::{Grant, mint};
use iam_broker_kernel::text::{MAX_ECHO, MAX_MESSAGE, clip};
use iam_broker_kernel::token::{Token, TokenHash};

/// Lookups and writes of one admission must finish within this. With [`UNDO_BUDGET`] and the
/// Event's [`EVENT_BUDGET`] after it, the worst case is 8 s, inside the API server's own timeout
/// (`timeoutSeconds`, 10 in the rendered registration), so the webhook always answers and its
/// undo always gets to run.
pub const FORWARD_BUDGET: Duration = Duration::from_millis(5000);
/// Time an undo (compensation) may take after a failed write: a retraction and a Secret delete.
pub const UNDO_BUDGET: Duration = Duration::from_millis(2000);

/// Webhook settings, from [`Config`].
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// What to inject, and how pods reach the broker by default. Without `PROXY_IMAGE` only
    /// `direct` pods can be injected (a pod that needs the sidecar then gets nothing, and the
    /// failure policy decides).
    pub inject: InjectSettings,
    /// ServiceAccount annotation naming the role.
    pub role_annotation: String,
    /// `BROKER_URL`; when `None`, the URL the admission request came in on.
    pub broker_url: Option<String>,
    /// Sliding lifetime of token records.
    pub token_ttl: Duration,
    /// Open or closed.
    pub failure_policy: FailurePolicy,
    /// Budget of lookups and writes.
    pub forward_budget: Duration,
    /// Budget of an undo.
    pub undo_budget: Duration,
    /// When set, the webhook only answers at `POST /mutate/<secret>`.
    pub path_secret: Option<String>,
    /// What pods get: a Secret-held token or a projected ServiceAccount token.
    pub identity: WebhookIdentity,
    /// The cluster scope of this webhook's pods in the Allowances table (`None`: the default
    /// cluster's unprefixed rows).
    pub scope: Option<ClusterName>,
    /// The default cluster's name (`CLUSTER_NAME`): its pods are also covered by the rows
    /// written under that name (`allowance::deciding_subjects`).
    pub default_cluster: Option<ClusterName>,
    /// Whether the ServiceAccount is read from the cluster (`SERVICE_ACCOUNT_LOOKUP`); without,
    /// a `projected` webhook never calls the cluster ([`Webhook::admit`]).
    pub service_account_lookup: bool,
}

/// What the webhook gives pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookIdentity {
    /// `secret` mode: a minted token in a Secret, recorded in the Authorizations table.
    Secret,
    /// `projected` mode: a kubelet-rotated ServiceAccount token; nothing is written.
    Projected {
        /// The token's audience.
        audience: String,
        /// The token's `expirationSeconds`.
        expiration: Duration,
    },
}

impl From<&Config> for WebhookSettings {
    fn from(config: &Config) -> Self {
        Self {
            inject: InjectSettings {
                injection: config.injection,
                proxy_image: config.proxy_image.clone(),
                port: config.proxy_port,
                mode: config.sidecar_mode,
                token_file: config.inject_token_file,
                region: config.pod_aws_region.clone(),
                broker_ca_pem: config.proxy_broker_ca_pem.clone(),
            },
            role_annotation: config.role_arn_annotation.clone(),
            broker_url: config.broker_url.clone(),
            token_ttl: config.token_ttl,
            failure_policy: config.failure_policy,
            forward_budget: FORWARD_BUDGET,
            undo_budget: UNDO_BUDGET,
            path_secret: config.webhook_path_secret.clone(),
            identity: match config.identity_mode {
                IdentityMode::Secret => WebhookIdentity::Secret,
                IdentityMode::Projected => WebhookIdentity::Projected {
                    audience: config.projected_audience.clone(),
                    expiration: config.projected_token_expiration,
                },
            },
            scope: config
                .webhook_cluster
                .clone()
                .filter(|served| Some(served) != config.cluster_name.as_ref()),
            default_cluster: config.cluster_name.clone(),
            service_account_lookup: config.service_account_lookup,
        }
    }
}

/// What happened to one admission, for the decision log line and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Token, Secret and record written (or, on a dry run, would be) and the patch answered.
    Patched,
    /// Allowed without a patch: out of scope (not a pod, not annotated, not allowed, …).
    Skipped,
    /// DELETE: the Secret and record were removed.
    CleanedUp,
    /// A dependency failed; allowed without a patch (failure policy `open`).
    FailedOpen,
    /// A dependency failed; denied (failure policy `closed`).
    FailedClosed,
}

impl Decision {
    /// A stable name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Patched => "patched",
            Self::Skipped => "skipped",
            Self::CleanedUp => "cleaned_up",
            Self::FailedOpen => "failed_open",
            Self::FailedClosed => "failed_closed",
        }
    }
}

/// The answer to one admission request plus what to log about it (never the token).
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The AdmissionReview `response`.
    pub response: AdmissionResponse,
    /// What happened.
    pub decision: Decision,
    /// Why, in words.
    pub reason: String,
    /// The pod's ServiceAccount, when read.
    pub service_account: Option<String>,
    /// Why a CREATE left the pod without credentials, for a Kubernetes Event
    /// ([`crate::events`]); `None` when nobody needs telling.
    pub notice: Option<Notice>,
}

/// Why an admission could not be completed.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("the Kubernetes API failed: {0}")]
    Cluster(#[from] ClusterError),
    #[error("a DynamoDB table failed: {0}")]
    Store(#[from] StoreError),
    #[error("{0} did not answer within the admission deadline")]
    Deadline(&'static str),
    #[error("{0}")]
    Internal(String),
}

/// One CREATE that may need credentials: what every step of [`Webhook::inject`] reads.
struct Creation<'a> {
    request: &'a AdmissionRequest,
    pod: &'a serde_json::Value,
    view: &'a PodView,
    subject: Subject,
    inject: &'a InjectSettings,
    via: Via<'a>,
    broker_url: &'a str,
    deadline: Instant,
}

impl Creation<'_> {
    fn sa(&self) -> Option<String> {
        Some(self.view.service_account.clone())
    }

    /// `", direct"` when the pod gets no sidecar, for the decision's reason.
    fn direct_note(&self) -> &'static str {
        match self.via {
            Via::Direct => ", direct",
            Via::Sidecar { .. } => "",
        }
    }

    /// The patch for this pod with its Secret and record.
    fn patch(&self, secret_name: &str, record: &TokenRecord) -> json_patch::Patch {
        patch::patch(
            self.pod,
            self.view,
            self.inject,
            &Injection {
                secret_name,
                token_hash: record.token_hash.as_str(),
                broker_url: self.broker_url,
            },
            self.via,
        )
    }

    /// The Secret holding `token`, labelled for the sweep and annotated for people.
    fn secret(
        &self,
        name: &str,
        role: &RoleArn,
        record: &TokenRecord,
        token: Token,
    ) -> TokenSecret {
        TokenSecret {
            namespace: self.subject.namespace.clone(),
            name: name.to_owned(),
            labels: BTreeMap::from([(LABEL_MANAGED_BY.to_owned(), MANAGED_BY.to_owned())]),
            annotations: BTreeMap::from([
                (
                    ANNOTATION_TOKEN_HASH.to_owned(),
                    record.token_hash.as_str().to_owned(),
                ),
                (
                    "iam-broker.io/service-account".to_owned(),
                    self.subject.service_account.clone(),
                ),
                (
                    "iam-broker.io/role-arn".to_owned(),
                    role.as_str().to_owned(),
                ),
            ]),
            token,
        }
    }
}

/// What a CREATE may have written so far, for [`Webhook::undo`]. A write counts from the
/// moment its request may have left: an error, a reset or a timeout after that says nothing
/// about whether it landed.
#[derive(Debug, Default)]
struct Written {
    /// The Secret whose create was sent, with the record that names it (the tombstone's model).
    secret: Option<(String, TokenRecord)>,
    /// Whether the record's insert was sent.
    record_sent: bool,
}

/// The admission webhook over its ports.
pub struct Webhook {
    cluster: Arc<dyn Cluster>,
    allowances: Arc<dyn AllowanceStore>,
    tokens: Arc<dyn TokenStore>,
    clock: Arc<dyn Clock>,
    settings: WebhookSettings,
    events: EventLimiter,
}

impl Webhook {
    /// A webhook over its ports.
    pub fn new(
        cluster: Arc<dyn Cluster>,
        allowances: Arc<dyn AllowanceStore>,
        tokens: Arc<dyn TokenStore>,
        clock: Arc<dyn Clock>,
        settings: WebhookSettings,
    ) -> Self {
        Self {
            cluster,
            allowances,
            tokens,
            clock,
            settings,
            events: EventLimiter::default(),
        }
    }

    /// Whether the webhook is only reachable under a secret path segment.
    pub fn requires_path_secret(&self) -> bool {
        self.settings.path_secret.is_some()
    }

    /// Whether `given` is the configured path secret, compared in constant time (over SHA-256
    /// digests, so neither content nor length leaks through timing). `false` when none is set.
    pub fn path_secret_matches(&self, given: &str) -> bool {
        self.settings
            .path_secret
            .as_deref()
            .is_some_and(|expected| constant_time_eq(expected, given))
    }

    /// Answers one admission request. `origin` is the URL the request came in on (scheme, host
    /// and API Gateway stage, ending in `/`), used as the broker URL unless `BROKER_URL` is set;
    /// `None` when the request did not say (no usable Host header).
    pub async fn admit(&self, request: &AdmissionRequest, origin: Option<&str>) -> Outcome {
        let mut outcome = self.decide(request, origin).await;
        // The reason and the ServiceAccount go to the decision log line: bound what a forged pod
        // can make them cost.
        iam_broker_kernel::text::clip_in_place(
            &mut outcome.reason,
            iam_broker_kernel::text::MAX_MESSAGE,
        );
        if let Some(sa) = outcome.service_account.as_mut() {
            iam_broker_kernel::text::clip_in_place(sa, iam_broker_kernel::text::MAX_ECHO);
        }
        outcome
    }

    async fn decide(&self, request: &AdmissionRequest, origin: Option<&str>) -> Outcome {
        if !request.is_pod() {
            return skipped(request, None, "not a Pod");
        }
        match request.operation {
            Operation::Create => {
                let outcome = self.create(request, origin).await;
                if self.settings.identity == WebhookIdentity::Secret {
                    self.notify(request, &outcome).await;
                }
                outcome
            }
            Operation::Delete => self.delete(request).await,
            other => skipped(request, None, &format!("{other} needs no action")),
        }
    }

    async fn create(&self, request: &AdmissionRequest, origin: Option<&str>) -> Outcome {
        let Some(pod) = request.object.as_ref() else {
            return skipped(request, None, "CREATE without an object");
        };
        let view = match patch::view(pod) {
            Ok(view) => view,
            Err(e) => return skipped(request, None, &e.to_string()),
        };
        let broker_url = self.settings.broker_url.as_deref().or(origin);
        let (mode, warnings) = self.injection_for(&view, broker_url);
        let mut outcome = self.create_via(request, pod, &view, mode, broker_url).await;
        for warning in warnings {
            tracing::warn!(
                namespace = %clip(&namespace_of(request, pod), MAX_ECHO),
                pod = %clip(view.name.as_deref().unwrap_or(""), MAX_ECHO),
                warning = %warning,
                "injection choice"
            );
            outcome.response = outcome.response.warn(format!("iam-broker: {warning}"));
        }
        outcome
    }

    /// How this pod reaches the broker: its [`ANNOTATION_INJECTION`], else `INJECTION`; `direct`
    /// only with an https broker URL (SDKs fetch plain http only from loopback), else the
    /// sidecar. Each departure from what was asked is a warning for the pod's creator.
    pub fn injection_for(
        &self,
        view: &PodView,
        broker_url: Option<&str>,
    ) -> (InjectionMode, Vec<String>) {
        let mut warnings = Vec::new();
        let asked = match &view.requested {
            None => self.settings.inject.injection,
            Some(Ok(mode)) => *mode,
            Some(Err(value)) => {
                warnings.push(format!(
                    "the pod's {ANNOTATION_INJECTION} annotation is {value}, not \"direct\" or \
                     \"sidecar\"; using the webhook's default, {}",
                    self.settings.inject.injection.as_str()
                ));
                self.settings.inject.injection
            }
        };
        match broker_url {
            Some(url) if asked == InjectionMode::Direct && !url.starts_with("https://") => {
                warnings.push(format!(
                    "direct injection needs an https broker URL, and this webhook's is {}: \
                     the pod gets the sidecar instead (set BROKER_URL to the broker's https URL)",
                    clip(url, MAX_ECHO)
                ));
                (InjectionMode::Sidecar, warnings)
            }
            _ => (asked, warnings),
        }
    }

    async fn create_via(
        &self,
        request: &AdmissionRequest,
        pod: &serde_json::Value,
        view: &PodView,
        mode: InjectionMode,
        broker_url: Option<&str>,
    ) -> Outcome {
        let sa = Some(view.service_account.clone());
        if let Some(skip) = view.skip(mode) {
            return Outcome {
                service_account: sa,
                ..skipped(request, None, &skip.to_string())
            };
        }
        let via = match (mode, self.settings.inject.proxy_image.as_deref()) {
            (InjectionMode::Direct, _) => Via::Direct,
            (InjectionMode::Sidecar, Some(image)) => Via::Sidecar { image },
            (InjectionMode::Sidecar, None) => {
                return self.fail(
                    request,
                    sa,
                    Failure::Internal(
                        "PROXY_IMAGE is not configured, so the webhook cannot inject the sidecar \
                         (INJECTION=direct needs none)"
                            .to_owned(),
                    ),
                );
            }
        };
        let Some(broker_url) = broker_url else {
            return self.fail(
                request,
                sa,
                Failure::Internal(
                    "BROKER_URL is not set and the request's own URL is unknown (no Host header)"
                        .to_owned(),
                ),
            );
        };
        let namespace = namespace_of(request, pod);
        let subject = match Subject::service_account(&namespace, &view.service_account) {
            Ok(subject) => subject.in_cluster(self.settings.scope.clone()),
            Err(e) => return skipped(request, sa, &e.to_string()),
        };
        let creation = Creation {
            request,
            pod,
            view,
            subject,
            inject: &self.settings.inject,
            via,
            broker_url,
            deadline: Instant::now() + self.settings.forward_budget,
        };
        match self.inject(&creation).await {
            Ok(outcome) => outcome,
            Err(failure) => self.fail(request, sa, failure),
        }
    }

    /// The steps of a CREATE that may need credentials: decide, then (unless a dry run) write
    /// the Secret and the record and answer the patch. Whatever was written before a failure is
    /// undone in one place.
    async fn inject(&self, c: &Creation<'_>) -> Result<Outcome, Failure> {
        let role = match self.role_for(c).await? {
            Ok(role) => role,
            Err(skip) => return Ok(skip),
        };
        if let WebhookIdentity::Projected {
            audience,
            expiration,
        } = &self.settings.identity
        {
            let patch = patch::patch_projected(
                c.pod,
                c.view,
                c.inject,
                &patch::ProjectedInjection {
                    audience,
                    expiration_seconds: expiration.as_secs(),
                    role_arn: role.as_str(),
                    broker_url: c.broker_url,
                },
                c.via,
            );
            let why = format!(
                "role {} (projected token{}, nothing written)",
                role.as_str(),
                c.direct_note()
            );
            return patched(c.request, c.sa(), &patch, &why);
        }
        let (token, record) = self.mint(c, &role)?;
        if c.request.dry_run {
            let patch = c.patch(&patch::secret_name(record.token_hash.as_str()), &record);
            return patched(
                c.request,
                c.sa(),
                &patch,
                "dry run: patch only, nothing written",
            );
        }
        let mut written = Written::default();
        let result = self.write(c, &role, token, record, &mut written).await;
        if result.is_err() {
            self.undo(&c.subject.namespace, &written).await;
        }
        result
    }

    /// Reads the Allowances rows and (when it must) the ServiceAccount, concurrently, and
    /// decides: the role to inject, or the answer for a pod that gets none (`Err`, with the Event
    /// to record).
    ///
    /// The role is, in this order: in `projected` mode the pod's own [`patch::ANNOTATION_ROLE_ARN`];
    /// the ServiceAccount's role annotation (read from the cluster, which `secret` mode always
    /// does and `projected` mode only with `SERVICE_ACCOUNT_LOOKUP`); in `projected` mode, the one
    /// role the Allowances rows allow the ServiceAccount. Whichever names it, the rows must allow
    /// it. So a `projected` webhook can decide without calling the cluster at all.
    async fn role_for(&self, c: &Creation<'_>) -> Result<Result<RoleArn, Outcome>, Failure> {
        let (request, subject) = (c.request, &c.subject);
        let projected = matches!(self.settings.identity, WebhookIdentity::Projected { .. });
        let pod_role = c.view.requested_role.as_deref().filter(|_| projected);
        let lookup = self.settings.service_account_lookup && pod_role.is_none();
        let deciding = deciding_subjects(subject, self.settings.default_cluster.as_ref());
        let (account, rows) = timeout_at(c.deadline, async {
            futures::join!(
                async {
                    if lookup {
                        self.cluster
                            .service_account(&subject.namespace, &subject.service_account)
                            .await
                            .map(Some)
                    } else {
                        Ok(None)
                    }
                },
                self.allowances.rows_for_all(&deciding),
            )
        })
        .await
        .map_err(|_| Failure::Deadline("the ServiceAccount and Allowances lookups"))?;
        // `None`: not read; `Some(None)`: read, and there is none.
        let account = account?;
        let uid = account
            .as_ref()
            .and_then(|a| a.as_ref())
            .and_then(|a| a.uid.clone());
        let named = match (pod_role, &account) {
            (Some(role), _) => Some((role.to_owned(), patch::ANNOTATION_ROLE_ARN.to_owned())),
            (None, Some(None)) if !projected => {
                return Ok(Err(skipped(
                    request,
                    c.sa(),
                    "the ServiceAccount does not exist",
                )));
            }
            (None, Some(Some(account))) => {
                match account.annotations.get(&self.settings.role_annotation) {
                    Some(role) => Some((
                        role.clone(),
                        format!("the ServiceAccount's {}", self.settings.role_annotation),
                    )),
                    None if !projected => {
                        return Ok(Err(skipped(
                            request,
                            c.sa(),
                            "the ServiceAccount has no role annotation",
                        )));
                    }
                    None => None,
                }
            }
            (None, _) => None,
        };
        let rows = rows?;
        let role = match named {
            Some((text, source)) => match RoleArn::parse(&text) {
                Ok(role) => role,
                Err(e) => {
                    let why = format!("{source} annotation is not a role ARN: {e}");
                    let mut outcome = skipped(request, c.sa(), &why);
                    outcome.response = outcome.response.warn(format!("iam-broker: {why}"));
                    outcome.notice = Some(Notice {
                        reason: REASON_INVALID_ROLE_ANNOTATION,
                        message: format!("iam-broker: no AWS credentials injected: {why}"),
                        service_account_uid: uid,
                    });
                    return Ok(Err(outcome));
                }
            },
            // No role named: the one the rows allow (projected mode only).
            None => {
                let allowed: std::collections::BTreeSet<&String> = rows
                    .iter()
                    .filter_map(iam_broker_kernel::allowance::Row::allowance)
                    .flat_map(|a| a.allowed_roles.iter())
                    .collect();
                match allowed.into_iter().collect::<Vec<_>>().as_slice() {
                    [only] => match RoleArn::parse(only) {
                        Ok(role) => role,
                        Err(_) => return Ok(Err(self.not_allowed(c, &rows, None, uid))),
                    },
                    [] => return Ok(Err(self.not_allowed(c, &rows, None, uid))),
                    several => {
                        let why = format!(
                            "{subject} is allowed {} roles ({}): name one with the pod \
                             annotation {}: <role ARN>",
                            several.len(),
                            several
                                .iter()
                                .map(|r| r.as_str())
                                .collect::<Vec<_>>()
                                .join(", "),
                            patch::ANNOTATION_ROLE_ARN
                        );
                        let mut outcome = skipped(request, c.sa(), &why);
                        outcome.response = outcome
                            .response
                            .warn(format!("iam-broker: no AWS credentials injected: {why}"));
                        return Ok(Err(outcome));
                    }
                }
            }
        };
        if !is_allowed(&rows, role.as_str()) {
            return Ok(Err(self.not_allowed(c, &rows, Some(&role), uid)));
        }
        if let Some(revoked) = revoked(&rows, c.view.name.as_deref()) {
            // No credentials would be served: say so instead of injecting a pod that fails.
            let why = revoked.to_string();
            let mut outcome = skipped(request, c.sa(), &why);
            outcome.response = outcome
                .response
                .warn(format!("iam-broker: no AWS credentials injected: {why}"));
            return Ok(Err(outcome));
        }
        Ok(Ok(role))
    }

    /// The answer for a pod whose role (`None`: any role) the rows do not allow, naming an
    /// unreadable row when one may be why.
    fn not_allowed(
        &self,
        c: &Creation<'_>,
        rows: &[iam_broker_kernel::allowance::Row],
        role: Option<&RoleArn>,
        service_account_uid: Option<String>,
    ) -> Outcome {
        let (request, subject) = (c.request, &c.subject);
        let role_text = role.map_or("no role", RoleArn::as_str);
        let (why, reason) = match unreadable(rows) {
            Some(row) => {
                tracing::error!(
                    corrupt_row = true,
                    store = %row.store,
                    row_namespace = %row.partition,
                    row_service_account = %row.service_account,
                    problem = %row.problem,
                    role_arn = %role_text,
                    "an Allowances row is unreadable; pods of its ServiceAccount get no \
                     credentials until it is fixed or rewritten with iam-broker allow"
                );
                (
                    format!("role {role_text} is not allowed for {subject}: {row}"),
                    REASON_ALLOWANCE_UNREADABLE,
                )
            }
            None => (
                match role {
                    Some(role) => format!(
                        "role {} is not allowed for {subject} in the Allowances table",
                        role.as_str(),
                    ),
                    None => format!("no role is allowed for {subject} in the Allowances table"),
                },
                REASON_ROLE_NOT_ALLOWED,
            ),
        };
        let message = format!("iam-broker: no AWS credentials injected: {why}");
        let mut outcome = skipped(request, c.sa(), &why);
        outcome.response = outcome.response.warn(message.clone());
        outcome.notice = Some(Notice {
            reason,
            message,
            service_account_uid,
        });
        outcome
    }

    /// A fresh token and its record for this pod.
    fn mint(&self, c: &Creation<'_>, role: &RoleArn) -> Result<(Token, TokenRecord), Failure> {
        let grant = Grant {
            subject: c.subject.clone(),
            role_arn: role.clone(),
            pod_name: c.view.name.clone(),
            secret_name: None,
        };
        mint(grant, self.clock.now(), self.settings.token_ttl)
            .map_err(|e| Failure::Internal(e.to_string()))
    }

    /// The writes, Secret first and record second, then the patch. `written` says what may
    /// exist (a write that timed out may have landed) for the undo.
    async fn write(
        &self,
        c: &Creation<'_>,
        role: &RoleArn,
        token: Token,
        record: TokenRecord,
        written: &mut Written,
    ) -> Result<Outcome, Failure> {
        let (secret_name, record) = self
            .create_secret_avoiding_clash(c, role, token, record, written)
            .await?;
        written.record_sent = true;
        match timeout_at(c.deadline, self.tokens.insert(&record)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                // A refusal no attempt could have got past (e.g. a missing table) wrote nothing.
                written.record_sent = e.may_have_written();
                return Err(Failure::Store(e));
            }
            Err(_) => return Err(Failure::Deadline("the Authorizations write")),
        }
        let patch = c.patch(&secret_name, &record);
        let why = match c.via {
            Via::Direct => format!("role {} (direct)", role.as_str()),
            Via::Sidecar { .. } => format!("role {}", role.as_str()),
        };
        patched(c.request, c.sa(), &patch, &why)
    }

    /// Creates the pod's token Secret. A name clash (another token's Secret, or a leftover) gets
    /// one fresh token and name; the clashing Secret is not ours and is never undone.
    async fn create_secret_avoiding_clash(
        &self,
        c: &Creation<'_>,
        role: &RoleArn,
        token: Token,
        record: TokenRecord,
        written: &mut Written,
    ) -> Result<(String, TokenRecord), Failure> {
        let (mut token, mut record) = (token, record);
        for attempt in 1..=2 {
            let secret_name = patch::secret_name(record.token_hash.as_str());
            record.secret_name = Some(secret_name.clone());
            let secret = c.secret(&secret_name, role, &record, token.clone());
            written.secret = Some((secret_name.clone(), record.clone()));
            match timeout_at(c.deadline, self.cluster.create_secret(&secret)).await {
                Ok(Ok(())) => return Ok((secret_name, record)),
                Ok(Err(ClusterError::AlreadyExists)) if attempt < 2 => {
                    written.secret = None;
                    (token, record) = self.mint(c, role)?;
                }
                Ok(Err(ClusterError::AlreadyExists)) => {
                    written.secret = None;
                    return Err(ClusterError::AlreadyExists.into());
                }
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => return Err(Failure::Deadline("the Secret create")),
            }
        }
        Err(Failure::Internal(
            "no free Secret name after two tokens".to_owned(),
        ))
    }

    /// Undoes a half-done CREATE so that no Secret is left without a record and no live record
    /// without its Secret, whatever landed, lands late, or never lands:
    ///
    /// 1. Retract first: a tombstone replaces the record under its hash. A record that landed
    ///    stops granting; an insert still in flight fails its condition when it lands; and the
    ///    tombstone names the Secret, so a Secret create that lands after this undo still has
    ///    its record (the cleanup removes both when the tombstone lapses, the sweep sooner).
    /// 2. Then delete the Secret, but only once the retraction is known to have landed or the
    ///    record was never sent: deleting it while a live record may exist would leave that
    ///    record without its Secret. Kept, the pair grants nothing to any pod (the pod was not
    ///    patched) and lapses unused at its expiry.
    ///
    /// What cannot be done within [`UNDO_BUDGET`] is logged by name (never the token).
    async fn undo(&self, namespace: &str, written: &Written) {
        let Some((secret_name, record)) = &written.secret else {
            return;
        };
        let deadline = Instant::now() + self.settings.undo_budget;
        let hash = record.token_hash.short();
        let tombstone = record.retracted(self.clock.now().unix_timestamp());
        let retracted = match timeout_at(deadline, self.tokens.retract(&tombstone)).await {
            Ok(Ok(())) => true,
            Ok(Err(e)) => {
                tracing::error!(token_hash = hash, error = %e, "undo: could not retract the token record");
                false
            }
            Err(_) => {
                tracing::error!(
                    token_hash = hash,
                    "undo: retracting the token record timed out"
                );
                false
            }
        };
        if !retracted && written.record_sent {
            tracing::error!(namespace, secret = %secret_name, token_hash = hash,
                "undo: the token record may exist, so its Secret is kept with it; the pair \
                 grants nothing to any pod and lapses at its expiry");
            return;
        }
        match timeout_at(deadline, self.cluster.delete_secret(namespace, secret_name)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::error!(namespace, secret = %secret_name, error = %e,
                "undo: could not delete the Secret; its tombstone record names it for the cleanup"),
            Err(_) => tracing::error!(
                namespace,
                secret = %secret_name,
                "undo: the Secret delete timed out; its tombstone record names it for the cleanup"
            ),
        }
    }

    async fn delete(&self, request: &AdmissionRequest) -> Outcome {
        let Some(pod) = request.old_object.as_ref() else {
            return skipped(request, None, "DELETE without oldObject");
        };
        let annotations = pod["metadata"]["annotations"].as_object();
        let annotated = |key: &str| {
            annotations
                .and_then(|a| a.get(key))
                .and_then(serde_json::Value::as_str)
        };
        let (Some(secret_name), Some(hash)) = (
            annotated(ANNOTATION_SECRET_NAME),
            annotated(ANNOTATION_TOKEN_HASH),
        ) else {
            return skipped(request, None, "the pod carries no iam-broker token");
        };
        let namespace = namespace_of(request, pod);
        // The two annotations must belong together, or a pod could name another token.
        let Some(hash) =
            TokenHash::parse(hash).filter(|h| patch::secret_name(h.as_str()) == secret_name)
        else {
            tracing::warn!(
                namespace = %clip(&namespace, MAX_ECHO),
                secret = %clip(secret_name, MAX_ECHO),
                "DELETE: the pod's iam-broker annotations do not match; nothing removed"
            );
            return skipped(
                request,
                None,
                "the pod's iam-broker annotations do not match",
            );
        };
        if request.dry_run {
            return skipped(request, None, "dry run: nothing removed");
        }
        let deadline = Instant::now() + self.settings.forward_budget;
        let result: Result<bool, Failure> = async {
            let record = timeout_at(deadline, self.tokens.record(&hash))
                .await
                .map_err(|_| Failure::Deadline("the Authorizations read"))??;
            if let Some(record) = &record {
                // A record of another namespace or Secret is not this pod's to remove.
                if record.subject.namespace != namespace
                    || record.secret_name.as_deref() != Some(secret_name)
                {
                    return Ok(false);
                }
                // Retract rather than delete: until the Secret is gone the tombstone still names
                // it, so a Secret delete that fails leaves a Secret the cleanup finds through its
                // record, never one without a record.
                if !record.is_retracted() {
                    let tombstone = record.retracted(self.clock.now().unix_timestamp());
                    timeout_at(deadline, self.tokens.retract(&tombstone))
                        .await
                        .map_err(|_| Failure::Deadline("the Authorizations retraction"))??;
                }
            }
            timeout_at(
                deadline,
                self.cluster.delete_secret(&namespace, secret_name),
            )
            .await
            .map_err(|_| Failure::Deadline("the Secret delete"))??;
            Ok(true)
        }
        .await;
        // DELETE is always allowed: blocking a pod's deletion over cleanup would be worse than a
        // leftover, and the sweep removes leftovers.
        match result {
            Ok(true) => Outcome {
                response: AdmissionResponse::allow(&request.uid),
                decision: Decision::CleanedUp,
                reason: format!("removed Secret {secret_name} and retracted its token record"),
                service_account: None,
                notice: None,
            },
            Ok(false) => {
                tracing::warn!(
                    namespace = %clip(&namespace, MAX_ECHO),
                    secret = secret_name,
                    token = hash.short(),
                    "DELETE: the token record belongs to another namespace or Secret; nothing removed"
                );
                skipped(request, None, "the token record belongs to another pod")
            }
            Err(failure) => Outcome {
                response: AdmissionResponse::allow(&request.uid),
                decision: Decision::FailedOpen,
                reason: format!("cleanup failed, left for the sweep: {failure}"),
                service_account: None,
                notice: None,
            },
        }
    }

    fn fail(&self, request: &AdmissionRequest, sa: Option<String>, failure: Failure) -> Outcome {
        let reason = failure.to_string();
        let notice = |reason_code, message: &str| {
            Some(Notice {
                reason: reason_code,
                message: message.to_owned(),
                service_account_uid: None,
            })
        };
        match self.settings.failure_policy {
            FailurePolicy::Open => {
                let message = format!("iam-broker: no AWS credentials injected: {reason}");
                Outcome {
                    response: AdmissionResponse::allow(&request.uid).warn(message.clone()),
                    decision: Decision::FailedOpen,
                    notice: notice(REASON_FAILED_OPEN, &message),
                    reason,
                    service_account: sa,
                }
            }
            FailurePolicy::Closed => {
                let message = format!("iam-broker could not inject AWS credentials: {reason}");
                Outcome {
                    response: AdmissionResponse::deny(&request.uid, 503, message.clone()),
                    decision: Decision::FailedClosed,
                    notice: notice(REASON_DENIED, &message),
                    reason,
                    service_account: sa,
                }
            }
        }
    }

    /// Records the Event of a CREATE that left its pod without credentials: rate-limited, within
    /// [`EVENT_BUDGET`], never failing the admission (a failure is logged).
    async fn notify(&self, request: &AdmissionRequest, outcome: &Outcome) {
        let (Some(notice), Some(pod)) = (&outcome.notice, request.object.as_ref()) else {
            return;
        };
        if request.dry_run {
            return;
        }
        let namespace = namespace_of(request, pod);
        let service_account = outcome.service_account.as_deref().unwrap_or("default");
        let involved = involved_object(
            pod,
            &namespace,
            service_account,
            notice.service_account_uid.as_deref(),
        );
        let now = self.clock.now().unix_timestamp();
        if !self.events.allow(&involved, notice.reason, now) {
            return;
        }
        let event = ClusterEvent {
            involved,
            reason: notice.reason,
            message: iam_broker_kernel::text::clip(
                &notice.message,
                iam_broker_kernel::text::MAX_MESSAGE,
            ),
            at: now,
        };
        match tokio::time::timeout(EVENT_BUDGET, self.cluster.record_event(&event)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(reason = notice.reason,
                error = %clip(&error.to_string(), MAX_MESSAGE),
                "could not record the Kubernetes Event (RBAC: create events, deploy/components/rbac-secret/20-rbac.yaml)"),
            Err(_) => tracing::warn!(
                reason = notice.reason,
                "recording the Kubernetes Event timed out"
            ),
        }
    }
}

fn constant_time_eq(expected: &str, given: &str) -> bool {
    use sha2::{Digest as _, Sha256};
    let (a, b) = (Sha256::digest(expected), Sha256::digest(given));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

fn namespace_of(request: &AdmissionRequest, pod: &serde_json::Value) -> String {
    match &request.namespace {
        Some(namespace) => namespace.clone(),
        None => pod["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    }
}

fn skipped(request: &AdmissionRequest, sa: Option<String>, why: &str) -> Outcome {
    Outcome {
        response: AdmissionResponse::allow(&request.uid),
        decision: Decision::Skipped,
        reason: why.to_owned(),
        service_account: sa,
        notice: None,
    }
}

fn patched(
    request: &AdmissionRequest,
    sa: Option<String>,
    patch: &json_patch::Patch,
    why: &str,
) -> Result<Outcome, Failure> {
    let response = AdmissionResponse::patched(&request.uid, patch)
        .map_err(|e| Failure::Internal(format!("the patch could not be serialised: {e}")))?;
    Ok(Outcome {
        response,
        decision: Decision::Patched,
        reason: why.to_owned(),
        service_account: sa,
        notice: None,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    use async_trait::async_trait;
    use serde_json::{Value, json};
    use time::macros::datetime;

    use super::*;
    use crate::patch::{SIDECAR_NAME, SidecarMode};
    use crate::review;
    use iam_broker_kernel::ports::ServiceAccount;
    use iam_broker_kernel::record::TokenRecord;
    use iam_broker_testkit::FixedClock;
    use iam_broker_testkit::memory::{
        ClusterCall, MemoryAllowanceStore, MemoryCluster, MemoryTokenStore,
    };

    const ROLE: &str = "arn:aws:iam::123456789012:role/iam-broker/s3_reader";
    const ORIGIN: Option<&str> = Some("https://broker.example/Prod/");

    /// A token store whose writes can fail or stall.
    #[derive(Default)]
    struct FlakyTokens {
        inner: MemoryTokenStore,
        fail_insert: AtomicBool,
        stall_insert_ms: AtomicU64,
    }

    #[async_trait]
    impl TokenStore for FlakyTokens {
        async fn record(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StoreError> {
            self.inner.record(hash).await
        }
        async fn insert(&self, record: &TokenRecord) -> Result<(), StoreError> {
            let stall = self.stall_insert_ms.load(Ordering::SeqCst);
            if stall > 0 {
                // The write lands, but only after the deadline.
                tokio::time::sleep(Duration::from_millis(stall)).await;
                return self.inner.insert(record).await;
            }
            if self.fail_insert.load(Ordering::SeqCst) {
                return Err(StoreError::Unavailable {
                    store: "authorizations".to_owned(),
                    maybe_written: true,
                    source: "injected".into(),
                });
            }
            self.inner.insert(record).await
        }
        async fn touch(&self, hash: &TokenHash, l: i64, e: i64) -> Result<(), StoreError> {
            self.inner.touch(hash, l, e).await
        }
        async fn retract(&self, tombstone: &TokenRecord) -> Result<(), StoreError> {
            self.inner.retract(tombstone).await
        }
        async fn delete(&self, hash: &TokenHash) -> Result<Option<TokenRecord>, StoreError> {
            self.inner.delete(hash).await
        }
        async fn list(&self) -> Result<Vec<TokenRecord>, StoreError> {
            self.inner.list().await
        }
    }

    struct Fixture {
        cluster: Arc<MemoryCluster>,
        allowances: Arc<MemoryAllowanceStore>,
        tokens: Arc<FlakyTokens>,
        webhook: Webhook,
    }

    fn settings(policy: FailurePolicy) -> WebhookSettings {
        WebhookSettings {
            inject: InjectSettings {
                injection: InjectionMode::Sidecar,
                proxy_image: Some("proxy:1".to_owned()),
                port: 53080,
                mode: SidecarMode::Container,
                token_file: false,
                region: None,
                broker_ca_pem: None,
            },
            role_annotation: "eks.amazonaws.com/role-arn".to_owned(),
            broker_url: None,
            token_ttl: Duration::from_secs(86_400),
            failure_policy: policy,
            forward_budget: Duration::from_millis(300),
            undo_budget: Duration::from_millis(300),
            path_secret: None,
            identity: WebhookIdentity::Secret,
            scope: None,
            default_cluster: None,
            service_account_lookup: true,
        }
    }

    #[tokio::test]
    async fn path_secret_is_compared_exactly() {
        let mut s = settings(FailurePolicy::Open);
        assert!(
            !fixture_with(s.clone())
                .await
                .webhook
                .path_secret_matches("")
        );
        s.path_secret = Some("a".repeat(40));
        let f = fixture_with(s).await;
        assert!(f.webhook.requires_path_secret());
        assert!(f.webhook.path_secret_matches(&"a".repeat(40)));
        assert!(!f.webhook.path_secret_matches(&"a".repeat(39)));
        assert!(
            !f.webhook
                .path_secret_matches(&format!("{}b", "a".repeat(39)))
        );
        assert!(!f.webhook.path_secret_matches(""));
    }

    async fn fixture_with(settings: WebhookSettings) -> Fixture {
        let cluster = Arc::new(MemoryCluster::default());
        let allowances = Arc::new(MemoryAllowanceStore::default());
        let tokens = Arc::new(FlakyTokens::default());
        cluster.put_service_account(ServiceAccount {
            uid: None,
            namespace: "team".to_owned(),
            name: "reader".to_owned(),
            annotations: BTreeMap::from([(
                "eks.amazonaws.com/role-arn".to_owned(),
                ROLE.to_owned(),
            )]),
        });
        let subject = Subject::service_account("team", "reader").unwrap();
        allowances.allow(&subject, ROLE, None).await.unwrap();
        let webhook = Webhook::new(
            cluster.clone(),
            allowances.clone(),
            tokens.clone(),
            Arc::new(FixedClock(datetime!(2026-11-22 06:00:00 UTC))),
            settings,
        );
        Fixture {
            cluster,
            allowances,
            tokens,
            webhook,
        }
    }

    async fn fixture() -> Fixture {
        fixture_with(settings(FailurePolicy::Open)).await
    }

    fn pod(sa: &str) -> Value {
        json!({ "apiVersion": "v1", "kind": "Pod",
            "metadata": { "generateName": "app-", "namespace": "team" },
            "spec": { "serviceAccountName": sa, "containers": [{ "name": "app", "image": "a" }] } })
    }

    fn request(operation: &str, object: Value, dry_run: bool) -> AdmissionRequest {
        let (object, old_object) = if operation == "DELETE" {
            (Value::Null, object)
        } else {
            (object, Value::Null)
        };
        let body = json!({ "apiVersion": review::V1, "kind": "AdmissionReview", "request": {
            "uid": "uid-1", "kind": { "group": "", "version": "v1", "kind": "Pod" },
            "namespace": "team", "operation": operation, "object": object,
            "oldObject": old_object, "dryRun": dry_run } });
        review::parse(&serde_json::to_vec(&body).unwrap())
            .unwrap()
            .request
    }

    fn apply(pod: &Value, response: &AdmissionResponse) -> Value {
        use base64::Engine as _;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(response.patch.as_ref().unwrap())
            .unwrap();
        let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
        let mut patched = pod.clone();
        json_patch::patch(&mut patched, &patch).unwrap();
        patched
    }

    /// A Pod CREATE (not a dry run) through the webhook, as the API server sends it.
    async fn create(f: &Fixture, pod: Value) -> Outcome {
        f.webhook
            .admit(&request("CREATE", pod, false), ORIGIN)
            .await
    }

    /// The live records (tombstones grant nothing and are not counted).
    async fn records(f: &Fixture) -> Vec<TokenRecord> {
        let all = f.tokens.list().await.unwrap();
        all.into_iter().filter(|r| !r.is_retracted()).collect()
    }

    /// The tombstones.
    async fn tombstones(f: &Fixture) -> Vec<TokenRecord> {
        let all = f.tokens.list().await.unwrap();
        all.into_iter().filter(TokenRecord::is_retracted).collect()
    }

    #[tokio::test]
    async fn create_writes_secret_and_record_and_patches() {
        let f = fixture().await;
        let out = create(&f, pod("reader")).await;
        assert_eq!(out.decision, Decision::Patched, "{}", out.reason);
        // exactly one Secret and one record, and they belong together
        let secrets = f.cluster.secrets();
        let records = records(&f).await;
        assert_eq!((secrets.len(), records.len()), (1, 1));
        let (secret, record) = (&secrets[0], &records[0]);
        assert_eq!(secret.token.hash(), record.token_hash);
        assert_eq!(record.secret_name.as_deref(), Some(secret.name.as_str()));
        assert_eq!(record.pod_name.as_deref(), Some("app-"));
        assert_eq!(record.role_arn.as_str(), ROLE);
        assert_eq!(secret.labels[LABEL_MANAGED_BY], MANAGED_BY);
        // the token never appears in the answer
        let answer =
            serde_json::to_string(&out.response.clone().into_review(review::ApiVersion::V1))
                .unwrap();
        assert!(!answer.contains(secret.token.expose()));
        // the patch applies to the pod as sent
        let patched = apply(&pod("reader"), &out.response);
        assert_eq!(patched["spec"]["containers"][1]["name"], SIDECAR_NAME);
        assert_eq!(
            patched["spec"]["containers"][1]["env"][0]["value"],
            ORIGIN.unwrap()
        );
        // and the patched pod, admitted again, is not patched again and writes nothing
        let again = create(&f, patched).await;
        assert_eq!(again.decision, Decision::Skipped);
        assert!(again.response.patch.is_none());
        assert_eq!(f.cluster.secrets().len(), 1);
    }

    #[tokio::test]
    async fn dry_run_patches_without_writing() {
        let f = fixture().await;
        let out = f
            .webhook
            .admit(&request("CREATE", pod("reader"), true), ORIGIN)
            .await;
        assert_eq!(out.decision, Decision::Patched);
        assert!(out.response.patch.is_some());
        assert!(f.cluster.secrets().is_empty());
        assert!(records(&f).await.is_empty());
    }

    #[tokio::test]
    async fn rows_written_under_the_default_clusters_name_admit_its_pods() {
        // GIVEN CLUSTER_NAME=east and the only allowance written with `allow --cluster east`
        let f = fixture_with(WebhookSettings {
            default_cluster: Some(ClusterName::parse("east").unwrap()),
            ..settings(FailurePolicy::Closed)
        })
        .await;
        let subject = Subject::service_account("team", "reader").unwrap();
        f.allowances.disallow(&subject, None).await.unwrap();
        f.allowances
            .allow(
                &subject.in_cluster(Some(ClusterName::parse("east").unwrap())),
                ROLE,
                None,
            )
            .await
            .unwrap();
        // THEN the pod is injected
        let out = create(&f, pod("reader")).await;
        assert_eq!(out.decision, Decision::Patched, "{}", out.reason);
        // AND without the name, those rows are another cluster's: skipped
        let f = fixture().await;
        let subject = Subject::service_account("team", "reader").unwrap();
        f.allowances.disallow(&subject, None).await.unwrap();
        f.allowances
            .allow(
                &subject.in_cluster(Some(ClusterName::parse("east").unwrap())),
                ROLE,
                None,
            )
            .await
            .unwrap();
        assert_eq!(create(&f, pod("reader")).await.decision, Decision::Skipped);
    }

    #[tokio::test]
    async fn out_of_scope_pods_are_allowed_untouched() {
        let f = fixture().await;
        f.cluster.put_service_account(ServiceAccount {
            uid: None,
            namespace: "team".to_owned(),
            name: "plain".to_owned(),
            annotations: BTreeMap::new(),
        });
        f.cluster.put_service_account(ServiceAccount {
            uid: None,
            namespace: "team".to_owned(),
            name: "greedy".to_owned(),
            annotations: BTreeMap::from([(
                "eks.amazonaws.com/role-arn".to_owned(),
                "arn:aws:iam::123456789012:role/iam-broker/admin".to_owned(),
            )]),
        });
        for (sa, warns) in [("plain", false), ("missing", false), ("greedy", true)] {
            let out = create(&f, pod(sa)).await;
            assert_eq!(out.decision, Decision::Skipped, "{sa}");
            assert!(out.response.allowed && out.response.patch.is_none());
            assert_eq!(
                !out.response.warnings.is_empty(),
                warns,
                "{sa}: {:?}",
                out.response.warnings
            );
        }
        assert!(f.cluster.secrets().is_empty());
        assert!(records(&f).await.is_empty());
    }

    #[tokio::test]
    async fn wildcard_allowance_admits_every_service_account() {
        let f = fixture().await;
        let subject = Subject::service_account("team", "other").unwrap();
        f.cluster.put_service_account(ServiceAccount {
            uid: None,
            namespace: "team".to_owned(),
            name: "other".to_owned(),
            annotations: BTreeMap::from([(
                "eks.amazonaws.com/role-arn".to_owned(),
                ROLE.to_owned(),
            )]),
        });
        let out = create(&f, pod("other")).await;
        assert_eq!(out.decision, Decision::Skipped);
        f.allowances
            .allow(&subject.wildcard(), ROLE, None)
            .await
            .unwrap();
        let out = create(&f, pod("other")).await;
        assert_eq!(out.decision, Decision::Patched);
    }

    #[tokio::test]
    async fn host_network_pods_are_skipped_before_any_lookup() {
        let f = fixture().await;
        f.cluster.fail(ClusterCall::ServiceAccount);
        let mut host = pod("reader");
        host["spec"]["hostNetwork"] = json!(true);
        let out = create(&f, host).await;
        assert_eq!(out.decision, Decision::Skipped);
        assert!(out.reason.contains("hostNetwork"));
    }

    #[tokio::test]
    async fn a_failed_record_write_removes_the_secret() {
        let f = fixture().await;
        f.tokens.fail_insert.store(true, Ordering::SeqCst);
        let out = create(&f, pod("reader")).await;
        assert_eq!(out.decision, Decision::FailedOpen);
        assert!(out.response.allowed && out.response.patch.is_none());
        assert!(out.response.warnings[0].contains("DynamoDB"));
        assert!(f.cluster.secrets().is_empty(), "no Secret without a record");
        assert!(records(&f).await.is_empty());
    }

    #[tokio::test]
    async fn a_pod_that_cannot_take_the_patch_gets_no_secret_and_no_record() {
        // GIVEN an allowed, annotated ServiceAccount, and forged pods whose shape no patch fits
        let f = fixture().await;
        let mut annotations_string = pod("reader");
        annotations_string["metadata"]["annotations"] = json!("not an object");
        let mut env_object = pod("reader");
        env_object["spec"]["containers"][0]["env"] = json!({ "X": "1" });
        let mut volume_taken = pod("reader");
        volume_taken["spec"]["volumes"] = json!([{ "name": "iam-broker-token", "emptyDir": {} }]);
        for forged in [annotations_string, env_object, volume_taken] {
            // WHEN each is admitted
            let out = create(&f, forged.clone()).await;
            // THEN it is skipped before any write, without a patch
            assert_eq!(out.decision, Decision::Skipped, "{forged}: {}", out.reason);
            assert!(out.response.patch.is_none());
        }
        assert!(f.cluster.secrets().is_empty());
        assert!(
            f.tokens.list().await.unwrap().is_empty(),
            "not even a tombstone"
        );
    }

    #[test]
    fn production_budgets_let_the_undo_finish_inside_the_webhook_timeout() {
        // every call times out before the forward budget ends, so a failure always leaves time
        // for the undo; forward + undo + the Event stay inside the rendered timeoutSeconds
        let call = Duration::from_millis(iam_broker_kernel::config::DEFAULT_AWS_CALL_TIMEOUT_MS);
        assert!(call < FORWARD_BUDGET);
        let worst = FORWARD_BUDGET + UNDO_BUDGET + EVENT_BUDGET;
        let timeout = u64::from(crate::registration::DEFAULT_TIMEOUT_SECONDS);
        assert!(
            worst + Duration::from_secs(1) < Duration::from_secs(timeout),
            "{worst:?}"
        );
        assert!(
            UNDO_BUDGET >= Duration::from_millis(2 * 500),
            "room for two calls"
        );
    }

    #[tokio::test]
    async fn huge_user_values_are_clipped_in_warnings_reasons_and_events() {
        // GIVEN a ServiceAccount whose role annotation is 100 kB, and a pod naming a 100 kB
        // ServiceAccount
        let f = fixture().await;
        let huge = format!("arn:aws:iam::123456789012:role/{}", "x".repeat(100_000));
        f.cluster.put_service_account(ServiceAccount {
            uid: Some("sa-uid".to_owned()),
            namespace: "team".to_owned(),
            name: "huge".to_owned(),
            annotations: BTreeMap::from([("eks.amazonaws.com/role-arn".to_owned(), huge)]),
        });
        // WHEN both are admitted
        let bad_role = create(&f, pod("huge")).await;
        let bad_name = create(&f, pod(&"s".repeat(100_000))).await;
        // THEN nothing is written and every echo is bounded
        assert_eq!(bad_role.decision, Decision::Skipped);
        assert_eq!(bad_name.decision, Decision::Skipped);
        for out in [&bad_role, &bad_name] {
            assert!(
                out.reason.len() <= 600,
                "reason of {} bytes",
                out.reason.len()
            );
            assert!(out.response.warnings.iter().all(|w| w.len() <= 600));
            assert!(
                out.service_account
                    .as_ref()
                    .is_none_or(|sa| sa.len() <= 200)
            );
        }
        assert!(
            bad_role.reason.contains("(100031 bytes)"),
            "{}",
            bad_role.reason
        );
        let events = f.cluster.events();
        assert_eq!(events.len(), 1, "one InvalidRoleAnnotation Event");
        assert!(events[0].message.len() <= 600);
        assert!(f.cluster.secrets().is_empty() && records(&f).await.is_empty());
    }

    #[tokio::test]
    async fn a_record_write_past_the_deadline_is_undone() {
        let f = fixture().await;
        f.tokens.stall_insert_ms.store(400, Ordering::SeqCst);
        let out = create(&f, pod("reader")).await;
        assert_eq!(out.decision, Decision::FailedOpen);
        assert!(out.reason.contains("deadline"), "{}", out.reason);
        assert!(f.cluster.secrets().is_empty());
        // the stalled write cannot land after the answer: the timed-out future was dropped
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(records(&f).await.is_empty());
        // and had it been sent on the wire, it could not land either: the undo left a tombstone
        // under its hash, naming the Secret, and an insert of a taken hash fails
        let tombstones = tombstones(&f).await;
        assert_eq!(tombstones.len(), 1);
        let revived = TokenRecord {
            retracted_at: None,
            ..tombstones[0].clone()
        };
        assert!(matches!(
            f.tokens.inner.insert(&revived).await,
            Err(StoreError::AlreadyExists)
        ));
        assert!(tombstones[0].secret_name.is_some());
    }

    #[tokio::test]
    async fn a_failed_secret_create_writes_no_record_and_closed_policy_denies() {
        let f = fixture_with(settings(FailurePolicy::Closed)).await;
        f.cluster.fail(ClusterCall::CreateSecret);
        let out = create(&f, pod("reader")).await;
        assert_eq!(out.decision, Decision::FailedClosed);
        assert!(!out.response.allowed);
        let status = out.response.status.unwrap();
        assert_eq!(status.code, 503);
        assert!(status.message.contains("Kubernetes"));
        assert!(records(&f).await.is_empty());
    }

    #[tokio::test]
    async fn missing_proxy_image_follows_the_failure_policy() {
        let mut s = settings(FailurePolicy::Open);
        s.inject.proxy_image = None;
        let f = fixture_with(s).await;
        let out = create(&f, pod("reader")).await;
        assert_eq!(out.decision, Decision::FailedOpen);
        assert!(out.reason.contains("PROXY_IMAGE"));
        assert!(f.cluster.secrets().is_empty());
    }

    #[tokio::test]
    async fn delete_removes_secret_and_record() {
        let f = fixture().await;
        let out = create(&f, pod("reader")).await;
        let patched = apply(&pod("reader"), &out.response);
        // a dry-run DELETE removes nothing
        let dry = f
            .webhook
            .admit(&request("DELETE", patched.clone(), true), ORIGIN)
            .await;
        assert_eq!(dry.decision, Decision::Skipped);
        assert_eq!(f.cluster.secrets().len(), 1);
        let out = f
            .webhook
            .admit(&request("DELETE", patched.clone(), false), ORIGIN)
            .await;
        assert_eq!(out.decision, Decision::CleanedUp, "{}", out.reason);
        assert!(out.response.allowed && out.response.patch.is_none());
        assert!(f.cluster.secrets().is_empty());
        assert!(records(&f).await.is_empty());
        // already gone is fine
        let again = f
            .webhook
            .admit(&request("DELETE", patched, false), ORIGIN)
            .await;
        assert_eq!(again.decision, Decision::CleanedUp);
    }

    #[tokio::test]
    async fn delete_never_removes_another_pods_token() {
        let f = fixture().await;
        let out = create(&f, pod("reader")).await;
        let patched = apply(&pod("reader"), &out.response);
        let annotations = patched["metadata"]["annotations"].clone();
        // GIVEN a pod in another namespace that copied the annotations
        let mut forged = json!({ "metadata": { "namespace": "evil", "annotations": annotations },
            "spec": { "containers": [{ "name": "x" }] } });
        let mut req = request("DELETE", forged.clone(), false);
        req.namespace = Some("evil".to_owned());
        let out = f.webhook.admit(&req, ORIGIN).await;
        assert_eq!(out.decision, Decision::Skipped);
        assert_eq!(records(&f).await.len(), 1);
        // AND a pod whose two annotations do not belong together
        forged["metadata"]["annotations"][ANNOTATION_SECRET_NAME] = json!("some-other-secret");
        let out = f
            .webhook
            .admit(&request("DELETE", forged, false), ORIGIN)
            .await;
        assert_eq!(out.decision, Decision::Skipped);
        assert_eq!(f.cluster.secrets().len(), 1);
        assert_eq!(records(&f).await.len(), 1);
    }

    #[tokio::test]
    async fn delete_failures_still_allow() {
        let f = fixture().await;
        let out = create(&f, pod("reader")).await;
        let patched = apply(&pod("reader"), &out.response);
        f.cluster.fail(ClusterCall::DeleteSecret);
        let out = f
            .webhook
            .admit(&request("DELETE", patched, false), ORIGIN)
            .await;
        assert_eq!(out.decision, Decision::FailedOpen);
        assert!(out.response.allowed);
        // the record is gone (the token is dead at the broker) even though the Secret is left
        assert!(records(&f).await.is_empty());
    }

    #[tokio::test]
    async fn other_kinds_and_operations_pass() {
        let f = fixture().await;
        let mut req = request("UPDATE", pod("reader"), false);
        assert_eq!(
            f.webhook.admit(&req, ORIGIN).await.decision,
            Decision::Skipped
        );
        req.operation = Operation::Create;
        req.kind.kind = "ConfigMap".to_owned();
        assert_eq!(
            f.webhook.admit(&req, ORIGIN).await.decision,
            Decision::Skipped
        );
        assert!(f.cluster.secrets().is_empty());
    }

    fn replica_set_pod(sa: &str) -> Value {
        let mut p = pod(sa);
        p["metadata"]["ownerReferences"] = json!([{ "apiVersion": "apps/v1",
            "kind": "ReplicaSet", "name": "web-7d9f8b6c4", "uid": "rs-uid", "controller": true }]);
        p
    }

    #[tokio::test]
    async fn an_unreadable_allowance_row_injects_nothing_and_says_which_row() {
        // GIVEN the annotated ServiceAccount's exact row is unreadable, and a second
        // ServiceAccount whose exact row is valid while its namespace's `*` row is unreadable
        let f = fixture().await;
        let reader = Subject::service_account("team", "reader").unwrap();
        f.allowances
            .put_unreadable(&reader, "allowed_roles is not a string set");
        // WHEN a pod of it is created
        let out = create(&f, pod("reader")).await;
        // THEN nothing is injected or written, the Event and the warning name the row
        assert_eq!(out.decision, Decision::Skipped);
        assert!(
            f.tokens.inner.list().await.unwrap().is_empty(),
            "no token record"
        );
        let events = f.cluster.events();
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(events[0].reason, REASON_ALLOWANCE_UNREADABLE);
        assert!(
            events[0]
                .message
                .contains(r#"namespace "team", service_account "reader""#),
            "{}",
            events[0].message
        );
        assert!(
            out.reason.contains("allowed_roles is not a string set"),
            "{}",
            out.reason
        );

        // AND with the exact row valid again and the `*` row unreadable, pods are injected
        f.allowances.allow(&reader, ROLE, None).await.unwrap();
        f.allowances
            .put_unreadable(&reader.wildcard(), "allowed_roles is not a string set");
        let out = create(&f, pod("reader")).await;
        assert_eq!(out.decision, Decision::Patched, "{}", out.reason);
    }

    #[tokio::test]
    async fn a_role_that_is_not_allowed_is_told_to_the_pods_controller_once() {
        // GIVEN a ServiceAccount annotated with a role that Allowances does not allow
        let f = fixture().await;
        f.cluster.put_service_account(ServiceAccount {
            uid: Some("sa-uid".to_owned()),
            namespace: "team".to_owned(),
            name: "other".to_owned(),
            annotations: BTreeMap::from([(
                "eks.amazonaws.com/role-arn".to_owned(),
                "arn:aws:iam::123456789012:role/iam-broker/admin".to_owned(),
            )]),
        });
        // WHEN a ReplicaSet creates three pods, one of them a dry run first
        let dry = f
            .webhook
            .admit(&request("CREATE", replica_set_pod("other"), true), ORIGIN)
            .await;
        assert_eq!(dry.decision, Decision::Skipped);
        assert!(f.cluster.events().is_empty(), "a dry run records nothing");
        for _ in 0..3 {
            let out = create(&f, replica_set_pod("other")).await;
            assert_eq!(out.decision, Decision::Skipped);
        }
        // THEN one Warning Event on the ReplicaSet says why (rate-limited, not one per pod)
        let events = f.cluster.events();
        assert_eq!(events.len(), 1, "{events:?}");
        let event = &events[0];
        assert_eq!(event.reason, REASON_ROLE_NOT_ALLOWED);
        assert_eq!(
            (event.involved.kind.as_str(), event.involved.name.as_str()),
            ("ReplicaSet", "web-7d9f8b6c4")
        );
        assert_eq!(event.involved.namespace, "team");
        assert!(
            event
                .message
                .contains("role/iam-broker/admin is not allowed for team/other")
        );
        // AND a bare pod's Event goes on its ServiceAccount, with its uid
        let out = create(&f, pod("other")).await;
        assert_eq!(out.decision, Decision::Skipped);
        let events = f.cluster.events();
        assert_eq!(events.len(), 2);
        assert_eq!(
            (
                events[1].involved.kind.as_str(),
                events[1].involved.uid.as_deref()
            ),
            ("ServiceAccount", Some("sa-uid"))
        );
    }

    #[tokio::test]
    async fn failing_open_and_denying_are_recorded_and_success_is_not() {
        let f = fixture().await;
        let out = create(&f, replica_set_pod("reader")).await;
        assert_eq!(out.decision, Decision::Patched);
        assert!(f.cluster.events().is_empty(), "nothing to tell");

        f.cluster.fail(ClusterCall::ServiceAccount);
        let out = create(&f, replica_set_pod("reader")).await;
        assert_eq!(out.decision, Decision::FailedOpen);
        let events = f.cluster.events();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].reason, REASON_FAILED_OPEN);
        assert!(
            events[0].message.contains("Kubernetes API"),
            "{}",
            events[0].message
        );

        let closed = fixture_with(settings(FailurePolicy::Closed)).await;
        closed.cluster.fail(ClusterCall::ServiceAccount);
        let out = create(&closed, pod("reader")).await;
        assert_eq!(out.decision, Decision::FailedClosed);
        assert_eq!(closed.cluster.events()[0].reason, REASON_DENIED);
    }

    #[tokio::test]
    async fn an_event_that_cannot_be_recorded_changes_nothing() {
        let f = fixture().await;
        f.cluster.fail(ClusterCall::ServiceAccount);
        f.cluster.fail(ClusterCall::RecordEvent);
        let out = create(&f, pod("reader")).await;
        assert_eq!(out.decision, Decision::FailedOpen);
        assert!(out.response.allowed);
        assert!(f.cluster.events().is_empty());
    }

    #[tokio::test]
    async fn without_broker_url_or_origin_the_failure_policy_decides_and_nothing_is_written() {
        let f = fixture().await;
        let out = f
            .webhook
            .admit(&request("CREATE", pod("reader"), false), None)
            .await;
        assert_eq!(out.decision, Decision::FailedOpen);
        assert!(out.reason.contains("BROKER_URL"), "{}", out.reason);
        assert!(f.cluster.secrets().is_empty());
        assert!(records(&f).await.is_empty());
    }

    fn projected(scope: Option<&str>) -> WebhookSettings {
        WebhookSettings {
            identity: WebhookIdentity::Projected {
                audience: "iam-broker".to_owned(),
                expiration: Duration::from_secs(3600),
            },
            scope: scope.map(|c| ClusterName::parse(c).unwrap()),
            ..settings(FailurePolicy::Open)
        }
    }

    #[tokio::test]
    async fn projected_mode_patches_a_token_volume_and_writes_nothing() {
        let f = fixture_with(projected(None)).await;
        for dry_run in [false, true] {
            let out = f
                .webhook
                .admit(&request("CREATE", pod("reader"), dry_run), ORIGIN)
                .await;
            assert_eq!(out.decision, Decision::Patched, "{}", out.reason);
            let patched = apply(&pod("reader"), &out.response);
            let volume = &patched["spec"]["volumes"][0];
            assert_eq!(volume["name"], patch::TOKEN_VOLUME);
            assert_eq!(
                volume["projected"]["sources"][0]["serviceAccountToken"],
                json!({ "audience": "iam-broker", "expirationSeconds": 3600, "path": "token" })
            );
            let app = &patched["spec"]["containers"][0];
            let env: BTreeMap<&str, &Value> = app["env"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| (e["name"].as_str().unwrap(), &e["value"]))
                .collect();
            assert_eq!(
                env[patch::ENV_AUTHORIZATION_TOKEN_FILE],
                "/var/run/secrets/iam-broker/token"
            );
            assert!(!env.contains_key(patch::ENV_AUTHORIZATION_TOKEN));
            assert_eq!(
                app["volumeMounts"][0]["mountPath"],
                "/var/run/secrets/iam-broker"
            );
            let sidecar = &patched["spec"]["containers"][1];
            let broker_url = sidecar["env"][0]["value"].as_str().unwrap();
            assert!(
                broker_url.ends_with("?role=arn:aws:iam::123456789012:role/iam-broker/s3_reader"),
                "{broker_url}"
            );
            assert_eq!(
                patched["metadata"]["annotations"][patch::ANNOTATION_ROLE_ARN],
                ROLE
            );
            assert!(patched["metadata"]["annotations"][ANNOTATION_SECRET_NAME].is_null());
        }
        assert!(f.cluster.secrets().is_empty(), "no Secret");
        assert!(f.tokens.list().await.unwrap().is_empty(), "no record");
    }

    #[tokio::test]
    async fn projected_mode_records_no_event_for_a_pod_it_skips() {
        let f = fixture_with(projected(None)).await;
        let mut account = ServiceAccount {
            uid: Some("sa-uid".to_owned()),
            namespace: "team".to_owned(),
            name: "other".to_owned(),
            annotations: BTreeMap::new(),
        };
        account.annotations.insert(
            "eks.amazonaws.com/role-arn".to_owned(),
            "arn:aws:iam::123456789012:role/not-allowed".to_owned(),
        );
        f.cluster.put_service_account(account);
        let out = create(&f, pod("other")).await;
        assert_eq!(out.decision, Decision::Skipped);
        assert!(
            !out.response.warnings.is_empty(),
            "the client is still told why"
        );
        assert!(f.cluster.events().is_empty(), "sideEffects: None");
    }

    #[tokio::test]
    async fn projected_mode_checks_the_served_cluster_rows() {
        // The default cluster's row allows the role; a webhook serving cluster `west` reads
        // `west/team` rows and finds none.
        let f = fixture_with(projected(Some("west"))).await;
        let out = create(&f, pod("reader")).await;
        assert_eq!(out.decision, Decision::Skipped, "{}", out.reason);
        let west = Subject::service_account("team", "reader")
            .unwrap()
            .in_cluster(Some(ClusterName::parse("west").unwrap()));
        f.allowances.allow(&west, ROLE, None).await.unwrap();
        let out = create(&f, pod("reader")).await;
        assert_eq!(out.decision, Decision::Patched, "{}", out.reason);
    }

    /// A `projected` webhook that never reads the cluster (`SERVICE_ACCOUNT_LOOKUP=false`).
    fn cluster_free() -> WebhookSettings {
        WebhookSettings {
            service_account_lookup: false,
            ..projected(None)
        }
    }

    fn pod_asking(sa: &str, role: &str) -> Value {
        let mut pod = pod(sa);
        pod["metadata"]["annotations"] = json!({ patch::ANNOTATION_ROLE_ARN: role });
        pod
    }

    fn injected_role(out: &Outcome, pod: &Value) -> String {
        let patched = apply(pod, &out.response);
        patched["metadata"]["annotations"][patch::ANNOTATION_ROLE_ARN]
            .as_str()
            .unwrap()
            .to_owned()
    }

    #[tokio::test]
    async fn a_cluster_free_projected_webhook_decides_from_the_pod_and_the_rows_alone() {
        let f = fixture_with(cluster_free()).await;
        // Every call to the cluster fails: any call would make the admission fail open.
        for call in [ClusterCall::ServiceAccount, ClusterCall::RecordEvent] {
            f.cluster.fail(call);
        }
        let other = "arn:aws:iam::123456789012:role/iam-broker/other";
        // A ServiceAccount the cluster does not even know, with one allowed role: that role.
        let ghost = Subject::service_account("team", "ghost").unwrap();
        f.allowances.allow(&ghost, ROLE, None).await.unwrap();
        let out = create(&f, pod("ghost")).await;
        assert_eq!(out.decision, Decision::Patched, "{}", out.reason);
        assert_eq!(injected_role(&out, &pod("ghost")), ROLE);

        // Two allowed roles: the pod names one, else it is told to.
        f.allowances.allow(&ghost, other, None).await.unwrap();
        let out = create(&f, pod("ghost")).await;
        assert_eq!(out.decision, Decision::Skipped);
        assert!(out.reason.contains("is allowed 2 roles"), "{}", out.reason);
        assert!(
            out.reason.contains(patch::ANNOTATION_ROLE_ARN),
            "{}",
            out.reason
        );
        assert!(!out.response.warnings.is_empty());
        let asking = pod_asking("ghost", other);
        let out = create(&f, asking.clone()).await;
        assert_eq!(out.decision, Decision::Patched, "{}", out.reason);
        assert_eq!(injected_role(&out, &asking), other);

        // A role the rows do not allow, or no ARN at all: refused, and the pod is told why.
        let out = create(
            &f,
            pod_asking("ghost", "arn:aws:iam::123456789012:role/nope"),
        )
        .await;
        assert_eq!(out.decision, Decision::Skipped);
        assert!(
            out.reason.contains("is not allowed for team/ghost"),
            "{}",
            out.reason
        );
        let out = create(&f, pod_asking("ghost", "s3_reader")).await;
        assert_eq!(out.decision, Decision::Skipped);
        assert!(
            out.reason.contains("annotation is not a role ARN"),
            "{}",
            out.reason
        );
        // No row at all.
        let out = create(&f, pod("nobody")).await;
        assert_eq!(out.decision, Decision::Skipped);
        assert!(
            out.reason.contains("no role is allowed for team/nobody"),
            "{}",
            out.reason
        );
        assert!(f.cluster.events().is_empty());
    }

    #[tokio::test]
    async fn with_lookup_the_service_accounts_annotation_still_chooses_and_the_pods_wins() {
        let f = fixture_with(projected(None)).await;
        let reader = Subject::service_account("team", "reader").unwrap();
        let other = "arn:aws:iam::123456789012:role/iam-broker/other";
        f.allowances.allow(&reader, other, None).await.unwrap();
        // Two roles allowed; the ServiceAccount's annotation names ROLE.
        let out = create(&f, pod("reader")).await;
        assert_eq!(injected_role(&out, &pod("reader")), ROLE, "{}", out.reason);
        // The pod's own annotation wins, and then the cluster is not asked.
        f.cluster.fail(ClusterCall::ServiceAccount);
        let asking = pod_asking("reader", other);
        let out = create(&f, asking.clone()).await;
        assert_eq!(out.decision, Decision::Patched, "{}", out.reason);
        assert_eq!(injected_role(&out, &asking), other);
        // Secret mode ignores the pod's annotation: the ServiceAccount decides there.
        let f = fixture().await;
        let out = create(&f, pod_asking("reader", other)).await;
        assert_eq!(out.decision, Decision::Patched, "{}", out.reason);
        let records = records(&f).await;
        assert_eq!(records[0].role_arn.as_str(), ROLE);
    }

    fn direct(settings: WebhookSettings) -> WebhookSettings {
        WebhookSettings {
            inject: InjectSettings {
                injection: InjectionMode::Direct,
                proxy_image: None,
                ..settings.inject
            },
            ..settings
        }
    }

    fn annotated(sa: &str, injection: &str) -> Value {
        let mut pod = pod(sa);
        pod["metadata"]["annotations"] = json!({ patch::ANNOTATION_INJECTION: injection });
        pod
    }

    fn env_of(container: &Value) -> BTreeMap<String, Value> {
        container["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["name"].as_str().unwrap().to_owned(), e.clone()))
            .collect()
    }

    fn containers(pod: &Value) -> Vec<String> {
        ["initContainers", "containers"]
            .iter()
            .flat_map(|l| pod["spec"][l].as_array().cloned().unwrap_or_default())
            .map(|c| c["name"].as_str().unwrap().to_owned())
            .collect()
    }

    #[tokio::test]
    async fn direct_mode_points_the_sdks_at_the_broker_with_no_sidecar_and_no_image() {
        // GIVEN INJECTION=direct and no PROXY_IMAGE at all
        let f = fixture_with(direct(settings(FailurePolicy::Closed))).await;
        // WHEN a pod of an allowed ServiceAccount is created
        let out = create(&f, pod("reader")).await;
        assert_eq!(out.decision, Decision::Patched, "{}", out.reason);
        assert!(out.reason.contains("(direct)"), "{}", out.reason);
        assert!(out.response.warnings.is_empty());
        // THEN the Secret and record are written as in sidecar mode
        let secrets = f.cluster.secrets();
        assert_eq!((secrets.len(), records(&f).await.len()), (1, 1));
        // AND the app container calls the broker's https URL itself, with the Secret's token
        let patched = apply(&pod("reader"), &out.response);
        assert_eq!(containers(&patched), ["app"], "no sidecar");
        let env = env_of(&patched["spec"]["containers"][0]);
        assert_eq!(env[patch::ENV_FULL_URI]["value"], ORIGIN.unwrap());
        assert_eq!(
            env[patch::ENV_AUTHORIZATION_TOKEN]["valueFrom"]["secretKeyRef"]["name"],
            secrets[0].name
        );
        assert!(patched["spec"]["volumes"].is_null(), "no volume");
        // AND admitted again, it is not patched again (no sidecar to tell, the label does)
        let again = create(&f, patched).await;
        assert_eq!(again.decision, Decision::Skipped, "{}", again.reason);
        assert_eq!(f.cluster.secrets().len(), 1);
    }

    #[tokio::test]
    async fn direct_projected_mode_needs_only_the_token_volume_and_two_variables() {
        let f = fixture_with(direct(projected(None))).await;
        let out = create(&f, pod("reader")).await;
        assert_eq!(out.decision, Decision::Patched, "{}", out.reason);
        let patched = apply(&pod("reader"), &out.response);
        assert_eq!(containers(&patched), ["app"], "no sidecar");
        let env = env_of(&patched["spec"]["containers"][0]);
        assert_eq!(
            env[patch::ENV_FULL_URI]["value"],
            "https://broker.example/Prod/?role=arn:aws:iam::123456789012:role/iam-broker/s3_reader"
        );
        assert_eq!(
            env[patch::ENV_AUTHORIZATION_TOKEN_FILE]["value"],
            "/var/run/secrets/iam-broker/token"
        );
        assert!(!env.contains_key(patch::ENV_AUTHORIZATION_TOKEN));
        let volumes = patched["spec"]["volumes"].as_array().unwrap();
        assert_eq!(volumes.len(), 1);
        assert!(volumes[0]["projected"].is_object());
        assert!(f.cluster.secrets().is_empty() && f.tokens.list().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn the_pod_annotation_chooses_per_pod() {
        // A sidecar default, a pod that asks for direct: direct.
        let f = fixture().await;
        let out = create(&f, annotated("reader", "direct")).await;
        let patched = apply(&annotated("reader", "direct"), &out.response);
        assert_eq!(containers(&patched), ["app"]);
        // A direct default, a pod that asks for the sidecar: the sidecar.
        let mut s = direct(settings(FailurePolicy::Open));
        s.inject.proxy_image = Some("proxy:1".to_owned());
        let f = fixture_with(s).await;
        let out = create(&f, annotated("reader", "sidecar")).await;
        let patched = apply(&annotated("reader", "sidecar"), &out.response);
        assert_eq!(containers(&patched), ["app", SIDECAR_NAME]);
        // A value that is neither: the default, and the pod's creator is told.
        let out = create(&f, annotated("reader", "Direct ")).await;
        assert_eq!(out.decision, Decision::Patched);
        let patched = apply(&annotated("reader", "Direct "), &out.response);
        assert_eq!(containers(&patched), ["app"]);
        assert!(
            out.response.warnings[0].contains("iam-broker.io/injection annotation is \"Direct \""),
            "{:?}",
            out.response.warnings
        );
    }

    #[tokio::test]
    async fn direct_over_plain_http_falls_back_to_the_sidecar_with_a_warning() {
        // The annotation asks for direct, but the broker URL is http (an in-cluster Service
        // without TLS): SDKs would refuse it, so the pod gets the sidecar, and is told why.
        let mut s = settings(FailurePolicy::Open);
        s.broker_url = Some("http://iam-broker.iam-broker.svc:8080/".to_owned());
        let f = fixture_with(s).await;
        let out = create(&f, annotated("reader", "direct")).await;
        assert_eq!(out.decision, Decision::Patched, "{}", out.reason);
        let patched = apply(&annotated("reader", "direct"), &out.response);
        assert_eq!(containers(&patched), ["app", SIDECAR_NAME]);
        assert_eq!(out.response.warnings.len(), 1);
        let warning = &out.response.warnings[0];
        assert!(warning.contains("needs an https broker URL"), "{warning}");
        assert!(warning.contains("gets the sidecar instead"), "{warning}");
        // And without a proxy image there is nothing to fall back to: the failure policy.
        let mut s = direct(settings(FailurePolicy::Closed));
        s.broker_url = Some("http://iam-broker.iam-broker.svc:8080/".to_owned());
        let f = fixture_with(s).await;
        let out = create(&f, pod("reader")).await;
        assert_eq!(out.decision, Decision::FailedClosed, "{}", out.reason);
        assert!(out.reason.contains("PROXY_IMAGE"), "{}", out.reason);
        assert!(f.cluster.secrets().is_empty());
    }

    #[tokio::test]
    async fn a_host_network_pod_is_injected_direct_but_never_given_a_sidecar() {
        let mut host = pod("reader");
        host["spec"]["hostNetwork"] = json!(true);
        let f = fixture().await;
        assert_eq!(create(&f, host.clone()).await.decision, Decision::Skipped);
        let f = fixture_with(direct(settings(FailurePolicy::Open))).await;
        let out = create(&f, host.clone()).await;
        assert_eq!(out.decision, Decision::Patched, "{}", out.reason);
        assert_eq!(containers(&apply(&host, &out.response)), ["app"]);
    }
}
