//! The one place where server errors become HTTP responses: a status code
//! and the body `{"error":{"code":"...","message":"..."}}`.
//!
//! | [`ServiceError`]       | status | `code`                |
//! |------------------------|--------|-----------------------|
//! | `InvalidArgument`      | 400    | `invalid_argument`    |
//! | `Unauthenticated`      | 401    | `unauthenticated`     |
//! | `PermissionDenied`     | 403    | `permission_denied`   |
//! | `NotFound`             | 404    | `not_found`           |
//! | `AlreadyExists`        | 409    | `already_exists`      |
//! | `FailedPrecondition`   | 412    | `failed_precondition` |
//! | `Store`, `Internal`    | 500    | `internal`            |
//!
//! Request problems found before a handler runs (malformed JSON, unknown
//! fields, bad query strings, oversized bodies, unknown routes) use the same
//! body, with the codes `invalid_argument`, `payload_too_large`,
//! `not_found` and `method_not_allowed`.

use axum::Json;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::error::ServiceError;

/// An error as the admin API reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable machine-readable code (`invalid_argument`, `not_found`, ...).
    pub code: &'static str,
    /// Human-readable message; never contains secrets.
    pub message: String,
    /// Ids of the policies behind a policy denial (empty otherwise); sent
    /// in the body as `reasons` and recorded in the audit log.
    pub reasons: Vec<String>,
}

/// The `error` member of an error body (also used for per-item results).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorBody {
    /// Machine-readable code.
    pub code: &'static str,
    /// Human-readable message.
    pub message: String,
}

#[derive(Serialize)]
struct ErrorEnvelope {
    error: EnvelopeBody,
}

#[derive(Serialize)]
struct EnvelopeBody {
    code: &'static str,
    message: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    reasons: Vec<String>,
}

impl ApiError {
    /// A 400 `invalid_argument`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_argument",
            message: message.into(),
            reasons: Vec::new(),
        }
    }

    /// A 500 `internal`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "internal",
            message: message.into(),
            reasons: Vec::new(),
        }
    }

    /// The body's `error` member.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.code,
            message: self.message.clone(),
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        let (status, code) = match &e {
            ServiceError::InvalidArgument(_) => (StatusCode::BAD_REQUEST, "invalid_argument"),
            ServiceError::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "unauthenticated"),
            ServiceError::PermissionDenied(_) => (StatusCode::FORBIDDEN, "permission_denied"),
            ServiceError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ServiceError::AlreadyExists(_) => (StatusCode::CONFLICT, "already_exists"),
            ServiceError::FailedPrecondition(_) => {
                (StatusCode::PRECONDITION_FAILED, "failed_precondition")
            }
            ServiceError::PolicyDenied { .. } => (StatusCode::FORBIDDEN, "permission_denied"),
            ServiceError::ReattestRequired(_) => {
                (StatusCode::PRECONDITION_FAILED, "failed_precondition")
            }
            ServiceError::RateLimited(_) => (StatusCode::TOO_MANY_REQUESTS, "resource_exhausted"),
            ServiceError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            ServiceError::Store(_) | ServiceError::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "internal")
            }
        };
        if status.is_server_error() {
            tracing::error!(error = %e, "admin request failed");
        }
        let reasons = match &e {
            ServiceError::PolicyDenied { reasons, .. } => reasons.clone(),
            _ => Vec::new(),
        };
        Self {
            status,
            code,
            message: e.to_string(),
            reasons,
        }
    }
}

impl From<BytesRejection> for ApiError {
    fn from(r: BytesRejection) -> Self {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Self {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                code: "payload_too_large",
                message: format!(
                    "request body is larger than the limit of {} bytes",
                    super::BODY_LIMIT
                ),
                reasons: Vec::new(),
            }
        } else {
            Self::invalid(format!("cannot read the request body: {}", r.body_text()))
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        Self::invalid(format!("invalid query string: {}", r.body_text()))
    }
}

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        Self::invalid(format!("invalid path parameter: {}", r.body_text()))
    }
}

impl From<serde_json::Error> for ApiError {
    fn from(e: serde_json::Error) -> Self {
        Self::invalid(format!("invalid JSON body: {e}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ErrorEnvelope {
                error: EnvelopeBody {
                    code: self.code,
                    message: self.message,
                    reasons: self.reasons,
                },
            }),
        )
            .into_response()
    }
}

/// Fallback for paths that match no route.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        code: "not_found",
        message: format!("no route for {}", uri.path()),
        reasons: Vec::new(),
    }
}

/// Fallback for a known path called with the wrong method.
pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        code: "method_not_allowed",
        message: format!("{method} is not allowed on {}", uri.path()),
        reasons: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_service_error_has_its_status() {
        let cases = [
            (
                ServiceError::InvalidArgument("x".into()),
                400,
                "invalid_argument",
            ),
            (
                ServiceError::Unauthenticated("x".into()),
                401,
                "unauthenticated",
            ),
            (
                ServiceError::PermissionDenied("x".into()),
                403,
                "permission_denied",
            ),
            (ServiceError::NotFound("x".into()), 404, "not_found"),
            (
                ServiceError::AlreadyExists("x".into()),
                409,
                "already_exists",
            ),
            (
                ServiceError::FailedPrecondition("x".into()),
                412,
                "failed_precondition",
            ),
            (ServiceError::Internal("x".into()), 500, "internal"),
        ];
        for (e, status, code) in cases {
            let a = ApiError::from(e);
            assert_eq!(a.status.as_u16(), status);
            assert_eq!(a.code, code);
        }
    }
}
