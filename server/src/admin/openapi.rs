//! The OpenAPI 3.1 document of the admin API, written by hand in
//! `openapi.json` beside this file and served at `GET /v1/openapi.json`.
//! A test checks that every route of the router is documented and that
//! every documented operation is routed.

use axum::http::header;
use axum::response::IntoResponse;

/// The document, as served.
pub const DOCUMENT: &str = include_str!("openapi.json");

/// `GET /v1/openapi.json`.
pub async fn document() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], DOCUMENT)
}
