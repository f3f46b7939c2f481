//! [`ApiError`]: the one mapping from failures to the HTTP error contract (README, "HTTP API"; ARCHITECTURE.md, "Error contract").

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use iam_broker_broker::BrokerError;
use serde::Serialize;

/// Seconds a client should wait before retrying a 503.
const RETRY_AFTER_SECONDS: u32 = 2;

/// An error answer: status, `Code`, `Message`, and `Retry-After` for 503s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable code.
    pub code: &'static str,
    /// Human-readable message.
    pub message: String,
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct Body<'a> {
    code: &'a str,
    message: &'a str,
}

impl ApiError {
    /// Builds an error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
}

impl ApiError {
    /// An error for a status the HTTP layer chose (a limit, an extractor's rejection), with the
    /// status's own name as its `Code`.
    pub fn from_status(status: StatusCode, message: impl Into<String>) -> Self {
        let code = match status {
            StatusCode::BAD_REQUEST => "BadRequest",
            StatusCode::NOT_FOUND => "NotFound",
            StatusCode::REQUEST_TIMEOUT => "RequestTimeout",
            StatusCode::METHOD_NOT_ALLOWED => "MethodNotAllowed",
            StatusCode::PAYLOAD_TOO_LARGE => "PayloadTooLarge",
            StatusCode::URI_TOO_LONG => "UriTooLong",
            StatusCode::UNSUPPORTED_MEDIA_TYPE => "UnsupportedMediaType",
            StatusCode::UNPROCESSABLE_ENTITY => "UnprocessableEntity",
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "RequestHeaderFieldsTooLarge",
            StatusCode::SERVICE_UNAVAILABLE => "ServiceUnavailable",
            status if status.is_server_error() => "InternalError",
            _ => "BadRequest",
        };
        Self::new(status, code, message)
    }
}

impl From<&BrokerError> for ApiError {
    fn from(error: &BrokerError) -> Self {
        let status = match error {
            BrokerError::MissingAuthorization => StatusCode::UNAUTHORIZED,
            BrokerError::InvalidToken(_)
            | BrokerError::CorruptRecord { .. }
            | BrokerError::AllowanceRevoked { .. }
            | BrokerError::SessionsRevoked { .. }
            | BrokerError::AllowanceUnreadable { .. } => StatusCode::FORBIDDEN,
            BrokerError::RoleRequired { .. } | BrokerError::InvalidRoleParameter(_) => {
                StatusCode::BAD_REQUEST
            }
            BrokerError::AssumeRoleFailed { .. } => StatusCode::BAD_GATEWAY,
            BrokerError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        };
        Self::new(status, error.code(), error.public_message())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(Body {
                code: self.code,
                message: &self.message,
            }),
        )
            .into_response();
        let headers = response.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECONDS));
        }
        response
    }
}
