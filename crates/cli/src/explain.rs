//! `iam-broker explain`: what the webhook and the broker would do for a pod (or a
//! ServiceAccount, or a token), and why, step by step.
//!
//! Nothing here decides on its own. The answer for a pod is the webhook's own [`Webhook::admit`]
//! on a dry-run CREATE (which writes nothing: no Secret, no record, no Event); the broker's is
//! its own [`Broker::authorize`] (which reads the token record, the registry and the
//! Allowances rows, and calls neither STS nor anything that writes). The steps before the
//! answer call the same functions those two call ([`patch::view`], [`Webhook::injection_for`],
//! [`patch::PodView::skip`], [`deciding_subjects`], [`AllowanceStore::rows_for_all`], [`permit`]) to
//! show what each one saw, plus what only the API server decides: whether the registration's
//! rules and selectors send the pod to the webhook at all ([`scope::pod_create_scope`]).
//!
//! Exit codes: 0 the pod (or token) gets credentials; 2 it does not, and the steps say why;
//! 1 the question could not be answered (bad input, a dependency unreachable).

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use base64::Engine as _;
use clap::Args;
use serde::Serialize;
use serde_json::{Value, json};

use iam_broker_admission::patch;
use iam_broker_admission::review::{AdmissionRequest, GroupVersionKind, Operation};
use iam_broker_admission::scope;
use iam_broker_admission::webhook::{Decision, Webhook};
use iam_broker_broker::broker::{Authorized, Broker, BrokerError, Credential};
use iam_broker_kernel::allowance::{Refusal, RoleArn, Row, Subject, deciding_subjects, permit};
use iam_broker_kernel::cluster::ClusterName;
use iam_broker_kernel::config::{Config, IdentityMode};
use iam_broker_kernel::ports::{AllowanceStore, Cluster};
use iam_broker_kube::KubeCluster;

use crate::stack::{Environment, OUTPUT_BROKER_URL};

/// Exit code: the answer is "no credentials".
pub const EXIT_NO: u8 = 2;

/// `explain` arguments.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The pod: a manifest file (JSON or YAML, as `kubectl get pod -o json` prints it), or `-`
    /// for stdin. Left out, --namespace and --service-account name who to explain.
    pod: Option<PathBuf>,
    /// The namespace (of a pod whose manifest has none, or of --service-account).
    #[arg(long)]
    namespace: Option<String>,
    /// Explain a ServiceAccount instead of a pod: which rows allow which roles, and what the
    /// broker would answer.
    #[arg(long, conflicts_with = "pod", requires = "namespace")]
    service_account: Option<String>,
    /// The registered cluster the pod runs in (its Allowances rows); left out, the cluster this
    /// configuration's webhook serves.
    #[arg(long, value_name = "NAME")]
    cluster: Option<String>,
    /// The role asked for (the broker's `?role=`); left out, the ServiceAccount's annotation or
    /// the only allowed role.
    #[arg(long, value_name = "ARN")]
    role: Option<String>,
    /// A token as the pod holds it (the projected token file, or the Secret's token): the broker
    /// verifies it and decides exactly as for a fetch, without calling STS.
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// The MutatingWebhookConfiguration whose selectors are checked (render-webhook --name).
    #[arg(long, default_value = "iam-broker", value_name = "NAME")]
    webhook_name: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = crate::Output::Table)]
    output: crate::Output,
}

/// The verdict of one step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum Verdict {
    /// The step lets the pod through.
    Pass,
    /// The step is why the pod gets nothing.
    Fail,
    /// Shown for information.
    Info,
    /// Could not be checked (unreachable, unknown).
    Unknown,
}

impl Verdict {
    fn mark(self) -> &'static str {
        match self {
            Self::Pass => "ok",
            Self::Fail => "NO",
            Self::Info => "--",
            Self::Unknown => "??",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
struct Step {
    step: String,
    verdict: Verdict,
    detail: String,
}

/// The whole explanation.
#[derive(Debug, Default, Serialize)]
struct Explanation {
    /// Who: `[cluster/]namespace/serviceaccount`.
    subject: Option<String>,
    steps: Vec<Step>,
    /// The webhook's dry-run answer, for a pod.
    #[serde(skip_serializing_if = "Option::is_none")]
    webhook: Option<Value>,
    /// The broker's decision, when asked (a token, a role, or a ServiceAccount).
    #[serde(skip_serializing_if = "Option::is_none")]
    broker: Option<Value>,
    /// `true`: credentials; `false`: none; `null`: could not tell.
    credentials: Option<bool>,
    /// The answer in one sentence.
    answer: String,
}

impl Explanation {
    fn step(&mut self, step: &str, verdict: Verdict, detail: impl Into<String>) {
        self.steps.push(Step {
            step: step.to_owned(),
            verdict,
            detail: detail.into(),
        });
    }

    fn finish(&mut self, credentials: Option<bool>, answer: impl Into<String>) {
        self.credentials = credentials;
        self.answer = answer.into();
    }
}

/// What `explain` works with: the webhook and broker as deployed, and direct readers.
struct World {
    config: Config,
    broker_url: Option<String>,
    webhook: Arc<Webhook>,
    broker: Arc<Broker>,
    allowances: Arc<dyn AllowanceStore>,
    cluster: KubeCluster,
}

/// Runs `explain`; the exit code is 0 (credentials), [`EXIT_NO`] (none) or 1 (error).
pub async fn explain(args: ExplainArgs, environment: &Environment) -> anyhow::Result<u8> {
    let mut config = environment.config()?;
    if let Some(name) = &args.cluster {
        let name = ClusterName::parse(name).map_err(|e| anyhow::anyhow!("--cluster: {e}"))?;
        config.webhook_cluster = Some(name);
    }
    let token = match &args.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the token file {}", path.display()))?
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    let pod = match &args.pod {
        Some(path) => Some(read_pod(path)?),
        None => None,
    };
    if pod.is_none() && args.service_account.is_none() && token.is_none() {
        bail!(
            "name a pod (a manifest file, or - for stdin), --namespace with --service-account, or --token-file"
        );
    }
    let sdk = iam_broker_aws::load_sdk_config(config.aws_call_timeout).await;
    let aws = iam_broker_app::AwsAdapters::new(&config, &sdk);
    let cluster = KubeCluster::new(aws.cluster_source(&config), config.aws_call_timeout);
    let allowances: Arc<dyn AllowanceStore> = aws.allowances.clone();
    let app = iam_broker_app::build_with(&config, &sdk);
    let world = World {
        broker_url: config
            .broker_url
            .clone()
            .or_else(|| environment.output(OUTPUT_BROKER_URL).map(str::to_owned)),
        config,
        webhook: app.state.webhook,
        broker: app.state.broker,
        allowances,
        cluster,
    };

    let mut explanation = Explanation::default();
    match (&pod, &args.service_account) {
        (Some(pod), _) => {
            explain_pod(&world, &args, pod, token.as_deref(), &mut explanation).await?
        }
        (None, Some(sa)) => {
            let namespace = args.namespace.as_deref().unwrap_or_default();
            explain_service_account(
                &world,
                &args,
                namespace,
                sa,
                token.as_deref(),
                &mut explanation,
            )
            .await?;
        }
        (None, None) => {
            let token = token.as_deref().unwrap_or_default();
            explain_token(&world, token, args.role.as_deref(), &mut explanation).await;
        }
    }
    print(&explanation, args.output)?;
    Ok(match explanation.credentials {
        Some(true) => 0,
        Some(false) => EXIT_NO,
        None => 1,
    })
}

fn read_pod(path: &std::path::Path) -> anyhow::Result<Value> {
    let text = if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the pod from stdin")?;
        text
    } else {
        std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the pod manifest {}", path.display()))?
    };
    match serde_json::from_str(&text) {
        Ok(value) => Ok(value),
        Err(_) => serde_saphyr::from_str::<Value>(&text)
            .map_err(|e| anyhow::anyhow!("the pod manifest is neither JSON nor YAML: {e}")),
    }
}

async fn explain_pod(
    world: &World,
    args: &ExplainArgs,
    pod: &Value,
    token: Option<&str>,
    out: &mut Explanation,
) -> anyhow::Result<()> {
    let kind = pod.get("kind").and_then(Value::as_str).unwrap_or("Pod");
    if kind != "Pod" {
        out.step("object", Verdict::Fail, format!("a {kind}, not a Pod: the webhook only injects pods (explain the pod its controller creates: kubectl get pod -o json)"));
        out.finish(Some(false), "not a Pod");
        return Ok(());
    }
    let Some(namespace) = pod["metadata"]["namespace"]
        .as_str()
        .or(args.namespace.as_deref())
        .map(str::to_owned)
    else {
        bail!("the pod has no metadata.namespace: pass --namespace");
    };
    let view = match patch::view(pod) {
        Ok(view) => view,
        Err(e) => {
            out.step("pod", Verdict::Fail, e.to_string());
            out.finish(Some(false), format!("the webhook skips the pod: {e}"));
            return Ok(());
        }
    };
    out.subject = Some(format!("{namespace}/{}", view.service_account));
    out.step(
        "pod",
        Verdict::Info,
        format!(
            "{} in namespace {namespace}, ServiceAccount {}, containers that would get credentials: {}",
            view.name.as_deref().unwrap_or("(unnamed)"),
            view.service_account,
            if view.eligible.is_empty() {
                "none".to_owned()
            } else {
                view.eligible.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ")
            }
        ),
    );

    let called = registration(world, args, pod, &namespace, out).await;

    let (mode, warnings) = world
        .webhook
        .injection_for(&view, world.broker_url.as_deref());
    let mut injection = format!(
        "{} (INJECTION={}",
        mode.as_str(),
        world.config.injection.as_str()
    );
    if let Some(asked) = &view.requested {
        injection.push_str(&format!(
            ", pod annotation {}: {}",
            patch::ANNOTATION_INJECTION,
            match asked {
                Ok(m) => m.as_str().to_owned(),
                Err(v) => v.clone(),
            }
        ));
    }
    injection.push(')');
    for warning in &warnings {
        injection.push_str(&format!("; warning: {warning}"));
    }
    out.step("injection", Verdict::Info, injection);

    match view.skip(mode) {
        Some(skip) => out.step("pod checks", Verdict::Fail, skip.to_string()),
        None => out.step(
            "pod checks",
            Verdict::Pass,
            "not injected yet, not excluded by annotation, no name the injection adds is in use",
        ),
    }

    let subject = Subject::service_account(&namespace, &view.service_account)
        .map(|s| s.in_cluster(webhook_scope(&world.config)));
    let projected = world.config.identity_mode == IdentityMode::Projected;
    if projected && let Some(role) = &view.requested_role {
        out.step(
            "pod annotation",
            Verdict::Info,
            format!(
                "{}: {role} (chooses among the allowed roles)",
                patch::ANNOTATION_ROLE_ARN
            ),
        );
    }
    let annotation_role = match &subject {
        Ok(subject) if world.config.service_account_lookup => {
            let role = service_account_step(world, subject, out).await;
            allowance_steps(world, subject, out).await;
            role
        }
        Ok(subject) => {
            out.step(
                "service account",
                Verdict::Info,
                format!(
                    "not read (SERVICE_ACCOUNT_LOOKUP is off): the webhook never calls the \
                     cluster; the role is the pod's {} annotation, else the one role the rows \
                     allow",
                    patch::ANNOTATION_ROLE_ARN
                ),
            );
            allowance_steps(world, subject, out).await;
            None
        }
        Err(e) => {
            out.step("service account", Verdict::Fail, e.to_string());
            None
        }
    };

    // The answer: the webhook's own, on a dry run.
    let request = AdmissionRequest {
        uid: "iam-broker-explain".to_owned(),
        kind: GroupVersionKind {
            group: String::new(),
            version: "v1".to_owned(),
            kind: "Pod".to_owned(),
        },
        sub_resource: String::new(),
        name: view.name.clone().unwrap_or_default(),
        namespace: Some(namespace.clone()),
        operation: Operation::Create,
        object: Some(pod.clone()),
        old_object: None,
        dry_run: true,
    };
    let outcome = world
        .webhook
        .admit(&request, world.broker_url.as_deref())
        .await;
    let patched = outcome
        .response
        .patch
        .as_deref()
        .and_then(|p| base64::engine::general_purpose::STANDARD.decode(p).ok())
        .and_then(|p| serde_json::from_slice::<json_patch::Patch>(&p).ok())
        .and_then(|p| {
            let mut pod = pod.clone();
            json_patch::patch(&mut pod, &p).ok().map(|()| pod)
        });
    let credentialed = patched
        .as_ref()
        .map(credentialed_containers)
        .unwrap_or_default();
    let verdict = match outcome.decision {
        Decision::Patched => Verdict::Pass,
        Decision::FailedOpen | Decision::FailedClosed => Verdict::Unknown,
        _ => Verdict::Fail,
    };
    out.step(
        "webhook",
        verdict,
        format!("{}: {}", outcome.decision.as_str(), outcome.reason),
    );
    out.webhook = Some(json!({
        "decision": outcome.decision.as_str(),
        "reason": outcome.reason,
        "allowed": outcome.response.allowed,
        "warnings": outcome.response.warnings,
        "event": outcome.notice.as_ref().map(|n| json!({"reason": n.reason, "message": n.message})),
        "credentialed_containers": credentialed,
        "sidecar": patched.as_ref().is_some_and(has_sidecar),
    }));

    let webhook_role = patched.as_ref().and_then(injected_role).or(annotation_role);
    let broker_ok = match (outcome.decision, token) {
        (Decision::Patched, Some(token)) => {
            explain_token(
                world,
                token,
                args.role.as_deref().or(webhook_role.as_deref()),
                out,
            )
            .await;
            out.credentials
        }
        _ => Some(true),
    };
    match outcome.decision {
        Decision::Patched if called == Some(false) => out.finish(
            Some(false),
            "the webhook would inject, but its registration does not send this pod to it (see registration)",
        ),
        Decision::Patched if broker_ok == Some(false) => {
            let why = out.answer.clone();
            out.finish(Some(false), format!("injected, but the broker refuses the token: {why}"));
        }
        Decision::Patched => out.finish(
            broker_ok,
            format!(
                "injected ({}): {}",
                mode.as_str(),
                if credentialed.is_empty() {
                    "no container".to_owned()
                } else {
                    credentialed.join(", ")
                }
            ),
        ),
        Decision::FailedOpen | Decision::FailedClosed => {
            // A dependency explain could not read either is an outage: no answer. Otherwise the
            // failure is the configuration's, and the pod gets nothing (or is refused).
            let outage = out.steps.iter().any(|s| s.verdict == Verdict::Unknown && s.step != "registration matchConditions");
            let policy = if outcome.decision == Decision::FailedOpen {
                "failure policy open: the pod starts without credentials"
            } else {
                "failure policy closed: the pod is refused"
            };
            out.finish(
                (!outage).then_some(false),
                format!("the webhook fails ({policy}): {}", outcome.reason),
            );
        }
        _ => out.finish(Some(false), format!("not injected: {}", outcome.reason)),
    }
    Ok(())
}

/// The cluster scope the webhook decides in (what `WebhookSettings::from` computes).
fn webhook_scope(config: &Config) -> Option<ClusterName> {
    config
        .webhook_cluster
        .clone()
        .filter(|served| Some(served) != config.cluster_name.as_ref())
}

/// Whether the registration sends this pod's CREATE to the webhook (`None`: unknown).
async fn registration(
    world: &World,
    args: &ExplainArgs,
    pod: &Value,
    namespace: &str,
    out: &mut Explanation,
) -> Option<bool> {
    let configuration = match world
        .cluster
        .mutating_webhook_configuration(&args.webhook_name)
        .await
    {
        Ok(Some(c)) => c,
        Ok(None) => {
            out.step(
                "registration",
                Verdict::Fail,
                format!(
                    "no MutatingWebhookConfiguration {} in the cluster: the API server calls no \
                     webhook (iam-broker render-webhook | kubectl apply -f -)",
                    args.webhook_name
                ),
            );
            return Some(false);
        }
        Err(e) => {
            out.step(
                "registration",
                Verdict::Unknown,
                format!("could not read it from the cluster: {e}"),
            );
            return None;
        }
    };
    let namespace_labels = match world.cluster.namespace_labels(namespace).await {
        Ok(labels) => labels,
        Err(e) => {
            out.step(
                "namespace",
                Verdict::Unknown,
                format!("could not read namespace {namespace}'s labels: {e}"),
            );
            None
        }
    };
    let pod_labels: BTreeMap<String, String> = pod["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default();
    let scopes = scope::pod_create_scope(
        &configuration,
        namespace,
        namespace_labels.as_ref(),
        &pod_labels,
    );
    // Webhooks for other operations (the secret-mode DELETE cleanup) do not decide a CREATE.
    let covering: Vec<&scope::WebhookScope> = scopes
        .iter()
        .filter(|s| s.checks.first().is_some_and(|c| c.passes == Some(true)))
        .collect();
    if covering.is_empty() {
        out.step(
            "registration",
            Verdict::Fail,
            format!(
                "no webhook of {} covers CREATE of pods: the API server never calls the webhook \
                 for new pods",
                args.webhook_name
            ),
        );
        return Some(false);
    }
    let mut any_call = false;
    for s in covering {
        any_call |= s.calls;
        for check in &s.checks {
            let verdict = match check.passes {
                Some(true) => Verdict::Pass,
                Some(false) => Verdict::Fail,
                None => Verdict::Unknown,
            };
            out.step(
                &format!("registration {}", check.check),
                verdict,
                format!("{}: {}", s.webhook, check.detail),
            );
        }
    }
    Some(any_call)
}

/// The ServiceAccount and its role annotation, as the webhook reads them.
async fn service_account_step(
    world: &World,
    subject: &Subject,
    out: &mut Explanation,
) -> Option<String> {
    let annotation = &world.config.role_arn_annotation;
    match world
        .cluster
        .service_account(&subject.namespace, &subject.service_account)
        .await
    {
        Ok(Some(account)) => match account.annotations.get(annotation) {
            Some(role) => match RoleArn::parse(role) {
                Ok(_) => {
                    out.step(
                        "service account",
                        Verdict::Pass,
                        format!("annotated {annotation}: {role}"),
                    );
                    Some(role.clone())
                }
                Err(e) => {
                    out.step(
                        "service account",
                        Verdict::Fail,
                        format!("annotation {annotation} is not a role ARN: {e}"),
                    );
                    None
                }
            },
            None => {
                out.step(
                    "service account",
                    Verdict::Fail,
                    format!("exists, without the {annotation} annotation"),
                );
                None
            }
        },
        Ok(None) => {
            out.step(
                "service account",
                Verdict::Fail,
                format!(
                    "{} does not exist in namespace {}",
                    subject.service_account, subject.namespace
                ),
            );
            None
        }
        Err(e) => {
            out.step(
                "service account",
                Verdict::Unknown,
                format!("could not read it: {e}"),
            );
            None
        }
    }
}

/// Every Allowances row that decides for `subject`, as the webhook and the broker read them.
async fn allowance_steps(
    world: &World,
    subject: &Subject,
    out: &mut Explanation,
) -> Option<Vec<Row>> {
    let subjects = deciding_subjects(subject, world.config.cluster_name.as_ref());
    let rows = match world.allowances.rows_for_all(&subjects).await {
        Ok(rows) => rows,
        Err(e) => {
            out.step(
                "allowances",
                Verdict::Unknown,
                format!("could not read the Allowances table: {e}"),
            );
            return None;
        }
    };
    let keys = subjects.iter().flat_map(|s| [s.clone(), s.wildcard()]);
    for (key, row) in keys.zip(&rows) {
        let which = format!("row {} {}", key.partition(), key.service_account);
        match row {
            Row::Absent => out.step("allowances", Verdict::Info, format!("{which}: none")),
            Row::Found(a) => out.step(
                "allowances",
                Verdict::Info,
                format!(
                    "{which}: allows {}{}{}",
                    a.allowed_roles
                        .iter()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", "),
                    if a.external_ids.is_empty() {
                        ""
                    } else {
                        " (with ExternalId)"
                    },
                    if a.session_policies.is_empty() {
                        ""
                    } else {
                        " (with session policy)"
                    },
                ),
            ),
            Row::Unreadable(u) => out.step("allowances", Verdict::Fail, format!("{which}: {u}")),
        }
    }
    Some(rows)
}

async fn explain_service_account(
    world: &World,
    args: &ExplainArgs,
    namespace: &str,
    service_account: &str,
    token: Option<&str>,
    out: &mut Explanation,
) -> anyhow::Result<()> {
    let subject = Subject::service_account(namespace, service_account)
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .in_cluster(webhook_scope(&world.config));
    out.subject = Some(subject.to_string());
    let annotation_role =
        if world.config.identity_mode == IdentityMode::Secret || args.cluster.is_none() {
            service_account_step(world, &subject, out).await
        } else {
            None
        };
    let Some(rows) = allowance_steps(world, &subject, out).await else {
        out.finish(None, "could not read the Allowances table");
        return Ok(());
    };
    if let Some(token) = token {
        explain_token(
            world,
            token,
            args.role.as_deref().or(annotation_role.as_deref()),
            out,
        )
        .await;
        return Ok(());
    }
    let requested = match args
        .role
        .as_deref()
        .or(annotation_role.as_deref())
        .map(RoleArn::parse)
    {
        Some(Ok(role)) => Some(role),
        Some(Err(e)) => bail!("--role: {e}"),
        None => None,
    };
    // The broker's own decision over the same rows.
    match permit(&rows, requested.as_ref()) {
        Ok(permitted) => {
            out.step(
                "broker",
                Verdict::Pass,
                format!("would assume {}", permitted.role_arn.as_str()),
            );
            out.broker = Some(json!({
                "decision": "served",
                "role_arn": permitted.role_arn.as_str(),
                "external_id": permitted.external_id.is_some(),
                "session_policy": permitted.session_policy,
            }));
            out.finish(
                Some(true),
                format!("{subject} gets {}", permitted.role_arn.as_str()),
            );
        }
        Err(refusal) => {
            let why = match &refusal {
                Refusal::NotAllowed => format!(
                    "AllowanceRevoked: {} is not allowed for {subject}",
                    requested.as_ref().map_or("no role", RoleArn::as_str)
                ),
                Refusal::Ambiguous(n) => format!(
                    "RoleRequired: {subject} is allowed {n} roles; the pod must name one (?role=, set from the ServiceAccount's annotation)"
                ),
                Refusal::Unreadable(row) => format!("AllowanceUnreadable: {row}"),
            };
            out.step("broker", Verdict::Fail, why.clone());
            out.broker = Some(json!({ "decision": "refused", "reason": why }));
            out.finish(Some(false), why);
        }
    }
    Ok(())
}

/// The broker's decision for a token, exactly as for a fetch, without STS.
async fn explain_token(world: &World, token: &str, role: Option<&str>, out: &mut Explanation) {
    if iam_broker_kernel::jwt::looks_like_jwt(token) {
        let header = iam_broker_kernel::jwt::Unverified::parse(token);
        out.step(
            "token",
            Verdict::Info,
            match &header {
                Ok(h) => format!(
                    "projected ServiceAccount token: issuer {}, key id {}, {}",
                    h.issuer(),
                    h.kid().unwrap_or("(none)"),
                    h.algorithm().as_str()
                ),
                Err(e) => format!("a JWT that cannot be read: {e}"),
            },
        );
    } else {
        out.step("token", Verdict::Info, "an iam-broker (secret-mode) token");
    }
    match world.broker.authorize(Some(token), role).await {
        Ok(authorized) => {
            let described = describe_authorized(&authorized);
            out.step(
                "broker",
                Verdict::Pass,
                format!(
                    "would assume {} as session {}",
                    authorized.role_arn.as_str(),
                    authorized.request.session_name
                ),
            );
            out.subject
                .get_or_insert_with(|| authorized.subject.to_string());
            out.broker = Some(described);
            out.finish(
                Some(true),
                format!(
                    "the broker serves {} to {}",
                    authorized.role_arn.as_str(),
                    authorized.subject
                ),
            );
        }
        Err(error) => {
            // The operator sees the detail the client never does (one InvalidToken outward).
            let verdict = match error {
                BrokerError::Unavailable { .. } => Verdict::Unknown,
                _ => Verdict::Fail,
            };
            let why = format!(
                "{}: {}",
                error.code(),
                iam_broker_kernel::text::error_chain(&error)
            );
            out.step("broker", verdict, why.clone());
            out.broker =
                Some(json!({ "decision": "refused", "code": error.code(), "reason": why }));
            out.finish((verdict == Verdict::Fail).then_some(false), why);
        }
    }
}

fn describe_authorized(a: &Authorized) -> Value {
    let (kind, expires) = match &a.credential {
        Credential::Secret { expires, .. } => ("secret", *expires),
        Credential::Projected { expires, .. } => ("projected", *expires),
    };
    json!({
        "decision": "served",
        "credential": kind,
        "credential_expires": expires,
        "cluster": a.cluster.as_ref().map(ClusterName::as_str),
        "subject": a.subject.to_string(),
        "pod": a.pod_name,
        "role_arn": a.role_arn.as_str(),
        "session_name": a.request.session_name,
        "source_identity": a.request.source_identity,
        "session_tags": a.request.tags.iter().map(|(k, v)| json!({"Key": k, "Value": v})).collect::<Vec<_>>(),
        "duration_seconds": a.request.duration.as_secs(),
        "external_id": a.request.external_id.is_some(),
        "session_policy": a.request.policy,
    })
}

/// Containers of a patched pod that carry the credentials URI.
fn credentialed_containers(pod: &Value) -> Vec<String> {
    ["initContainers", "containers"]
        .iter()
        .flat_map(|list| pod["spec"][list].as_array().into_iter().flatten())
        .filter(|c| {
            c["env"].as_array().is_some_and(|env| {
                env.iter()
                    .any(|e| e["name"] == "AWS_CONTAINER_CREDENTIALS_FULL_URI")
            })
        })
        .filter_map(|c| c["name"].as_str().map(str::to_owned))
        .collect()
}

fn has_sidecar(pod: &Value) -> bool {
    ["initContainers", "containers"].iter().any(|list| {
        pod["spec"][list]
            .as_array()
            .is_some_and(|cs| cs.iter().any(|c| c["name"] == patch::SIDECAR_NAME))
    })
}

/// The role the patch names (`?role=` in the credentials URI), for the broker step.
fn injected_role(pod: &Value) -> Option<String> {
    ["initContainers", "containers"]
        .iter()
        .flat_map(|list| pod["spec"][list].as_array().into_iter().flatten())
        .flat_map(|c| c["env"].as_array().into_iter().flatten())
        .filter(|e| {
            matches!(
                e["name"].as_str(),
                Some("AWS_CONTAINER_CREDENTIALS_FULL_URI" | "IAM_BROKER_URL")
            )
        })
        .filter_map(|e| e["value"].as_str())
        .find_map(|url| {
            let (_, query) = url.split_once("?role=")?;
            let encoded = query.split('&').next()?;
            Some(iam_broker_kernel::text::percent_decode(encoded))
        })
}

fn print(explanation: &Explanation, output: crate::Output) -> anyhow::Result<()> {
    match output {
        crate::Output::Json => println!("{}", serde_json::to_string_pretty(explanation)?),
        crate::Output::Table => {
            if let Some(subject) = &explanation.subject {
                println!("explain {subject}");
            }
            let width = explanation
                .steps
                .iter()
                .map(|s| s.step.len())
                .max()
                .unwrap_or(0);
            for (n, step) in explanation.steps.iter().enumerate() {
                println!(
                    "{:>2}. [{}] {:<width$}  {}",
                    n + 1,
                    step.verdict.mark(),
                    step.step,
                    step.detail
                );
            }
            let verdict = match explanation.credentials {
                Some(true) => "CREDENTIALS",
                Some(false) => "NO CREDENTIALS",
                None => "UNKNOWN",
            };
            println!("=> {verdict}: {}", explanation.answer);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_role_is_read_back_from_the_injected_url() {
        let pod = json!({"spec": {"containers": [{"name": "app", "env": [
            {"name": "AWS_CONTAINER_CREDENTIALS_FULL_URI",
             "value": "https://b.example/Prod/?role=arn%3Aaws%3Aiam%3A%3A111122223333%3Arole%2Fapp"}
        ]}]}});
        assert_eq!(
            injected_role(&pod).as_deref(),
            Some("arn:aws:iam::111122223333:role/app")
        );
        assert_eq!(credentialed_containers(&pod), vec!["app".to_owned()]);
        assert!(!has_sidecar(&pod));
        assert_eq!(injected_role(&json!({"spec": {}})), None);
    }
}
