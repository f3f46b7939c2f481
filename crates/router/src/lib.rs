//! The one HTTP router of iam-broker (DESIGN.md "HTTP routes"). The Lambda binary and
//! `iam-broker serve` both call [`router`]; no handler depends on Lambda-only extensions.
#![forbid(unsafe_code)]

mod error;
mod handlers;
pub mod metrics;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use iam_broker_core::Broker;
use iam_broker_core::webhook::Webhook;

pub use error::ApiError;

/// What the handlers share, built once at start-up.
#[derive(Clone)]
pub struct AppState {
    /// The credential broker.
    pub broker: Arc<Broker>,
    /// The admission webhook.
    pub webhook: Arc<Webhook>,
    /// Where CloudWatch EMF metrics go.
    pub metrics: metrics::Metrics,
}

/// A path prefix in front of the routes (API Gateway's stage, e.g. `/Prod`), set as a request
/// extension by whoever strips it. The webhook uses it to tell the sidecar the broker's URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BasePath(pub String);

/// The router of DESIGN.md: `GET /` and `GET /credentials` (broker), `POST /` and
/// `POST /mutate` (admission webhook), `GET /healthz`; JSON errors for anything else.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(handlers::credentials).post(handlers::admission))
        .route("/credentials", get(handlers::credentials))
        .route("/mutate", axum::routing::post(handlers::admission))
        .route(
            "/mutate/{secret}",
            axum::routing::post(handlers::admission_with_secret),
        )
        .route("/healthz", get(handlers::healthz))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        .layer(middleware::from_fn(access_log))
        .with_state(state)
}

/// The id of one request, carried on every log line it causes (the `request` span's
/// `request_id`): API Gateway's request id when the Lambda runner sets this extension, else an
/// `X-Request-Id` header of reasonable shape, else a fresh random id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

fn request_id(request: &Request) -> String {
    if let Some(RequestId(id)) = request.extensions().get::<RequestId>() {
        return id.clone();
    }
    let header = request
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 128
                && v.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        });
    match header {
        Some(id) => id.to_owned(),
        None => {
            let mut bytes = [0u8; 8];
            // A failing OS RNG only costs log correlation, never a request.
            let _ = getrandom::fill(&mut bytes);
            hex::encode(bytes)
        }
    }
}

/// One JSON log line per request: request id, method, path (the webhook's secret segment
/// redacted), status, latency; every line logged while handling it carries the same
/// `request_id`. Headers (which carry tokens) are never logged.
async fn access_log(request: Request, next: Next) -> Response {
    use tracing::Instrument as _;
    let id = request_id(&request);
    let span = tracing::info_span!("request", request_id = %id);
    async move { logged(request, next).await }
        .instrument(span)
        .await
}

async fn logged(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    // The webhook's path carries its secret segment: never log it.
    let path = match request.uri().path() {
        p if p.starts_with("/mutate/") => "/mutate/<redacted>".to_owned(),
        p => p.to_owned(),
    };
    let response = next.run(request).await;
    tracing::info!(
        method = %method,
        path = %path,
        status = response.status().as_u16(),
        latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX),
        "request"
    );
    response
}

pub mod telemetry {
    //! Logging set-up shared by the binaries: one JSON object per line on stderr, level from
    //! `RUST_LOG` (default `info`).

    use tracing_subscriber::EnvFilter;

    /// Installs the JSON log subscriber. Safe to call once per process.
    pub fn init_json_logging() {
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        // A second installation (e.g. from a test) is harmless; ignore its error.
        let _ = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_target(false)
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .try_init();
    }
}
