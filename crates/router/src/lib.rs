//! The one HTTP router of iam-broker (README, "HTTP API"). The Lambda binary and
//! `iam-broker serve` both call [`router`]; no handler depends on Lambda-only extensions.
#![forbid(unsafe_code)]

mod error;
mod handlers;
pub mod metrics;
pub mod prometheus;

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse as _, Response};
use axum::routing::get;
use iam_broker_admission::webhook::Webhook;
use iam_broker_broker::Broker;
use iam_broker_kernel::text::clip;

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

/// How long a request body may take to arrive once its head has, set on the router by whoever
/// serves it over a network (`iam-broker serve --body-read-timeout-ms`) as a request extension:
/// a client that declares a body and sends it slowly is answered `408` and its connection
/// closed, instead of holding a connection (and, at the connection limit, the server).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyReadTimeout(pub std::time::Duration);

/// Set as a request extension by a server that terminates TLS itself (`iam-broker serve
/// --tls-cert`): the webhook's own URL, which pods are pointed at unless `BROKER_URL` is set,
/// is then `https://`, whatever `X-Forwarded-Proto` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServedOverTls;

/// [`BodyReadTimeout`] when none is set.
pub const DEFAULT_BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The largest request body read (an AdmissionReview of the largest Pod etcd stores, 1.5 MiB,
/// fits); a larger one is `413 PayloadTooLarge`.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;
/// The longest path and query; a longer one is `414 UriTooLong`.
pub const MAX_URI_BYTES: usize = 8 * 1024;
/// The most header bytes (names, values and separators); more is
/// `431 RequestHeaderFieldsTooLarge`.
pub const MAX_HEADER_BYTES: usize = 32 * 1024;
/// The most bytes of a request path a log line carries.
const MAX_LOGGED_PATH: usize = 256;
/// The most bytes of a request method a log line carries.
const MAX_LOGGED_METHOD: usize = 16;
/// The most bytes of a rejection's plain-text body carried into its JSON `Message`.
const MAX_REJECTION_TEXT: usize = 1024;

/// The router of README's "HTTP API": `GET /` and `GET /credentials` (broker), `POST /` and
/// `POST /mutate` (admission webhook), `GET /healthz`; JSON errors for anything else, including
/// the HTTP layer's own rejections (body, URI and header limits, malformed paths).
pub fn router(state: AppState) -> Router {
    let routes = Router::new()
        .route("/", get(handlers::credentials).post(handlers::admission))
        .route("/credentials", get(handlers::credentials))
        .route("/mutate", axum::routing::post(handlers::admission))
        .route(
            "/mutate/{secret}",
            axum::routing::post(handlers::admission_with_secret),
        )
        .route("/healthz", get(handlers::healthz))
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed);
    http_layers(routes).with_state(state)
}

/// The metrics listener's router (`serve --metrics-listen`): `GET /metrics`, the Prometheus
/// exposition, and nothing else; 404 when the state keeps no Prometheus metrics.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(handlers::prometheus_metrics))
        .fallback(handlers::not_found)
        .with_state(state)
}

/// What wraps every route, innermost first: the body limit, JSON for the HTTP layer's own
/// rejections, the URI and header limits, the access log.
fn http_layers<S: Clone + Send + Sync + 'static>(routes: Router<S>) -> Router<S> {
    routes
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(json_rejections))
        .layer(middleware::from_fn(request_limits))
        .layer(middleware::from_fn(access_log))
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
    // An extension method is any token the client likes: log a bounded prefix of it too.
    let method = clip(request.method().as_str(), MAX_LOGGED_METHOD);
    // The webhook's path carries its secret segment: never log it. Any other path is the
    // client's to choose: log a bounded prefix of it.
    let path = match request.uri().path() {
        p if p.starts_with("/mutate/") => "/mutate/<redacted>".to_owned(),
        p => clip(p, MAX_LOGGED_PATH),
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

/// `414` / `431` in the JSON shape, before any handler runs, for a URI or headers beyond the
/// limits. (hyper itself answers `431` with an empty body for a head beyond its buffer, before
/// this runs: README "Limits".)
async fn request_limits(request: Request, next: Next) -> Response {
    let uri_bytes = request
        .uri()
        .path_and_query()
        .map_or(0, |p| p.as_str().len());
    if uri_bytes > MAX_URI_BYTES {
        return ApiError::new(
            StatusCode::URI_TOO_LONG,
            "UriTooLong",
            format!("the request URI is longer than {MAX_URI_BYTES} bytes"),
        )
        .into_response();
    }
    let header_bytes: usize = request
        .headers()
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len() + 4)
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        return ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "RequestHeaderFieldsTooLarge",
            format!("the request headers are larger than {MAX_HEADER_BYTES} bytes"),
        )
        .into_response();
    }
    next.run(request).await
}

/// Rewrites any error answer that is not JSON (axum's extractor rejections are plain text: body
/// too large, a path segment that is not UTF-8) into the `{"Code","Message"}` shape with
/// `Cache-Control: no-store`, so every refusal has one shape.
async fn json_rejections(request: Request, next: Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let text = axum::body::to_bytes(response.into_body(), MAX_REJECTION_TEXT)
        .await
        .map(|bytes| String::from_utf8_lossy(&bytes).trim().to_owned())
        .unwrap_or_default();
    let message = if text.is_empty() {
        status.canonical_reason().unwrap_or("refused").to_owned()
    } else {
        clip(&text, MAX_REJECTION_TEXT)
    };
    ApiError::from_status(status, message).into_response()
}

#[cfg(test)]
mod tests {
    use axum::body::{Body, Bytes};
    use axum::extract::Path;
    use axum::http::{HeaderValue, Request, StatusCode, header};
    use axum::routing::post;
    use tower::ServiceExt as _;

    use super::*;

    /// Routes with the router's extractors (a body, a path segment), under the router's layers.
    fn app() -> Router {
        http_layers(
            Router::new()
                .route(
                    "/body",
                    post(|body: Bytes| async move { body.len().to_string() }),
                )
                .route(
                    "/mutate/{secret}",
                    post(|Path(secret): Path<String>| async move { secret }),
                ),
        )
    }

    async fn send(
        request: Request<Body>,
    ) -> (StatusCode, axum::http::HeaderMap, serde_json::Value) {
        let response = app().oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let json = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
        (status, headers, json)
    }

    fn assert_json_error(
        (status, headers, json): &(StatusCode, axum::http::HeaderMap, serde_json::Value),
        want: StatusCode,
        code: &str,
    ) {
        assert_eq!(*status, want, "{json}");
        assert_eq!(headers[header::CACHE_CONTROL], "no-store");
        assert_eq!(headers[header::CONTENT_TYPE], "application/json");
        assert_eq!(json["Code"], code, "{json}");
        assert!(
            json["Message"].as_str().is_some_and(|m| !m.is_empty()),
            "{json}"
        );
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_a_json_413() {
        let ok = Request::post("/body")
            .body(Body::from(vec![b'x'; MAX_BODY_BYTES]))
            .unwrap();
        assert_eq!(send(ok).await.0, StatusCode::OK);
        let big = Request::post("/body")
            .body(Body::from(vec![b'x'; MAX_BODY_BYTES + 1]))
            .unwrap();
        assert_json_error(
            &send(big).await,
            StatusCode::PAYLOAD_TOO_LARGE,
            "PayloadTooLarge",
        );
    }

    #[tokio::test]
    async fn a_uri_over_the_limit_is_a_json_414() {
        let uri = format!("/body?{}", "q".repeat(MAX_URI_BYTES));
        let request = Request::post(uri).body(Body::empty()).unwrap();
        assert_json_error(&send(request).await, StatusCode::URI_TOO_LONG, "UriTooLong");
    }

    #[tokio::test]
    async fn headers_over_the_limit_are_a_json_431() {
        let mut request = Request::post("/body").body(Body::empty()).unwrap();
        for i in 0..10 {
            let name = axum::http::HeaderName::try_from(format!("x-big-{i}")).unwrap();
            let value = HeaderValue::from_str(&"v".repeat(MAX_HEADER_BYTES / 9)).unwrap();
            request.headers_mut().insert(name, value);
        }
        assert_json_error(
            &send(request).await,
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "RequestHeaderFieldsTooLarge",
        );
    }

    #[tokio::test]
    async fn an_extractor_rejection_is_json() {
        // a path segment that is not UTF-8: axum's own plain-text 400
        let request = Request::post("/mutate/%FF%FE").body(Body::empty()).unwrap();
        assert_json_error(&send(request).await, StatusCode::BAD_REQUEST, "BadRequest");
    }

    #[test]
    fn logged_values_are_bounded() {
        assert_eq!(clip("short", 10), "short");
        let long = "é".repeat(300);
        let cut = clip(&long, MAX_LOGGED_PATH);
        // The cut keeps at most MAX_LOGGED_PATH bytes of the value and says how long it was.
        assert!(cut.len() <= MAX_LOGGED_PATH + 20, "{}", cut.len());
        assert!(cut.ends_with("…(600 bytes)"), "{cut}");
    }
}
