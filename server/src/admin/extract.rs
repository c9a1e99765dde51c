//! Request extractors whose failures are API errors (`400
//! invalid_argument` with the parser's message, `413 payload_too_large`),
//! never axum's plain-text rejections.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use serde::de::DeserializeOwned;

use super::error::ApiError;

/// A JSON request body. The `Content-Type` header is not required (curl
/// users forget it); the body must parse as `T`, whose unknown fields are
/// rejected by `#[serde(deny_unknown_fields)]`.
#[derive(Debug, Clone)]
pub struct JsonBody<T>(pub T);

impl<T, S> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::invalid(
                "the request body is empty; a JSON object is required",
            ));
        }
        Ok(Self(serde_json::from_slice(&bytes)?))
    }
}

/// Query parameters; unknown or malformed ones are a 400.
#[derive(Debug, Clone)]
pub struct QueryParams<T>(pub T);

impl<T, S> FromRequestParts<S> for QueryParams<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Query(v) = axum::extract::Query::<T>::try_from_uri(&parts.uri)?;
        Ok(Self(v))
    }
}

/// One path parameter, percent-decoded.
#[derive(Debug, Clone)]
pub struct PathParam(pub String);

impl<S> FromRequestParts<S> for PathParam
where
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let axum::extract::Path(v) =
            axum::extract::Path::<String>::from_request_parts(parts, state).await?;
        Ok(Self(v))
    }
}
