//! The Lambda side of iam-broker: one `bootstrap` binary, two handlers, picked by the function's
//! `Handler` setting (Lambda passes it as `_HANDLER`; see [`Handler`]):
//!
//! - `http`: the shared router under `lambda_http::run`, which turns API Gateway events into
//!   requests and answers into API Gateway responses (REST: `multiValueHeaders` only; the body
//!   encoded by content type). With [`ENV_IGNORE_STAGE_IN_PATH`] set, the path it routes on is
//!   the event's own, without the stage (`/Prod`); [`service`] records the stage and the request
//!   id for the router.
//! - `cleanup`: the Authorizations stream and the scheduled sweep, as typed events
//!   ([`CleanupEvent`]).
#![forbid(unsafe_code)]

use axum::Router;
use iam_broker_admission::cleanup::{Cleanup, Report};
use lambda_http::request::RequestContext;
use lambda_http::{Request, RequestExt};
use tower::ServiceBuilder;
use tower::util::MapRequest;

/// Set for every function (`template.yaml`, `Globals`): `lambda_http` then routes on the event's
/// own path, without the API Gateway stage (`/Prod`) it would otherwise put in front. The routes
/// of README.md do not include the stage. `bootstrap` refuses to start an `http` function
/// without it ([`check_environment`]).
pub const ENV_IGNORE_STAGE_IN_PATH: &str = "AWS_LAMBDA_HTTP_IGNORE_STAGE_IN_PATH";

/// The router, with API Gateway's request context recorded for it ([`gateway_context`]).
pub fn service(router: Router) -> MapRequest<Router, fn(Request) -> Request> {
    ServiceBuilder::new()
        .map_request(gateway_context as fn(Request) -> Request)
        .service(router)
}

/// Records the event's stage as the request's [`iam_broker_router::BasePath`] (the webhook tells
/// the sidecar where the broker is: this API's URL, stage included) and API Gateway's request
/// id as its [`iam_broker_router::RequestId`].
pub fn gateway_context(mut request: Request) -> Request {
    let (stage, request_id) = match request.request_context_ref() {
        Some(RequestContext::ApiGatewayV1(context)) => {
            (context.stage.clone(), context.request_id.clone())
        }
        Some(RequestContext::ApiGatewayV2(context)) => {
            (context.stage.clone(), context.request_id.clone())
        }
        _ => (None, None),
    };
    if let Some(id) = request_id {
        request
            .extensions_mut()
            .insert(iam_broker_router::RequestId(id));
    }
    if let Some(stage) = stage.filter(|s| !s.is_empty() && s != "$default") {
        request
            .extensions_mut()
            .insert(iam_broker_router::BasePath(format!("/{stage}")));
    }
    request
}

/// What `bootstrap` needs from its environment beyond [`iam_broker_kernel::Config`]: an `http`
/// function needs [`ENV_IGNORE_STAGE_IN_PATH`], or every route would answer 404.
pub fn check_environment(
    handler: Handler,
    lookup: impl Fn(&str) -> Option<String>,
) -> Result<(), MissingSetting> {
    if handler == Handler::Http && lookup(ENV_IGNORE_STAGE_IN_PATH).is_none() {
        return Err(MissingSetting(ENV_IGNORE_STAGE_IN_PATH));
    }
    Ok(())
}

/// A variable the function's environment lacks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0} is not set: lambda_http would route on the stage-prefixed path and every route would \
     answer 404 (template.yaml sets it for every function; set {0}=true)"
)]
pub struct MissingSetting(pub &'static str);

/// Which handler a function runs: its `Handler` setting in `template.yaml`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handler {
    /// `http`: API Gateway requests through the router (the broker and the webhook).
    Http,
    /// `cleanup`: the Authorizations stream and the scheduled sweep.
    Cleanup,
}

/// A `Handler` setting this binary does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown handler {0:?}: set the function's Handler (_HANDLER) to http or cleanup")]
pub struct UnknownHandler(pub String);

impl Handler {
    /// Reads the setting; unset or empty (a local `cargo lambda watch`) means `http`.
    pub fn from_setting(value: Option<&str>) -> Result<Self, UnknownHandler> {
        match value.map(str::trim).unwrap_or_default() {
            "" | "http" => Ok(Self::Http),
            "cleanup" => Ok(Self::Cleanup),
            other => Err(UnknownHandler(other.to_owned())),
        }
    }
}

/// What the cleanup function receives.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(untagged)]
pub enum CleanupEvent {
    /// A batch of the Authorizations table's stream (`REMOVE` records).
    Stream(aws_lambda_events::event::dynamodb::Event),
    /// The schedule's input, `{"iam-broker": "sweep"}`.
    Sweep(SweepRequest),
}

/// The schedule's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub struct SweepRequest {
    /// The one task there is.
    #[serde(rename = "iam-broker")]
    pub task: Task,
}

/// A scheduled task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// Remove orphaned Secrets and records.
    Sweep,
}

/// Why a cleanup invocation failed; the stream then retries the batch, the schedule the run.
#[derive(Debug, thiserror::Error)]
pub enum CleanupFailure {
    /// Some deletes failed; the report says how many.
    #[error(
        "cleanup incomplete: {} of the deletes failed (secrets deleted {}, records deleted {})",
        .0.failures, .0.secrets_deleted, .0.records_deleted
    )]
    Incomplete(Report),
    /// The sweep could not list what it sweeps.
    #[error(transparent)]
    Sweep(#[from] iam_broker_admission::cleanup::CleanupError),
}

impl From<CleanupFailure> for lambda_http::lambda_runtime::Diagnostic {
    fn from(failure: CleanupFailure) -> Self {
        let error_type = match &failure {
            CleanupFailure::Incomplete(_) => "CleanupIncomplete",
            CleanupFailure::Sweep(_) => "SweepFailed",
        };
        Self {
            error_type: error_type.to_owned(),
            error_message: failure.to_string(),
        }
    }
}

/// The cleanup handler: deletes the Secrets of removed token records, or sweeps.
pub async fn cleanup(cleanup: &Cleanup, event: CleanupEvent) -> Result<Report, CleanupFailure> {
    // One log line per invocation; the messages are the ones README's Observability names.
    let (decision, message, report) = match event {
        CleanupEvent::Stream(batch) => {
            let (removed, undecodable) = iam_broker_aws::stream::removed_records(&batch);
            (
                "stream_cleanup",
                "token records removed",
                cleanup.removed(&removed, undecodable).await,
            )
        }
        CleanupEvent::Sweep(SweepRequest { task: Task::Sweep }) => {
            ("sweep", "sweep done", cleanup.sweep().await?)
        }
    };
    tracing::info!(
        decision,
        secrets_deleted = report.secrets_deleted,
        already_gone = report.secrets_already_gone,
        records_deleted = report.records_deleted,
        skipped = report.skipped,
        failures = report.failures,
        "{message}"
    );
    if report.failures > 0 {
        return Err(CleanupFailure::Incomplete(report));
    }
    Ok(report)
}

/// The report as the function's answer.
pub fn report_json(report: &Report) -> serde_json::Value {
    serde_json::json!({
        "secretsDeleted": report.secrets_deleted,
        "secretsAlreadyGone": report.secrets_already_gone,
        "recordsDeleted": report.records_deleted,
        "skipped": report.skipped,
        "failures": report.failures,
    })
}
