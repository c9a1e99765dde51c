//! `/healthz`: is the server up, and what is it serving.

use axum::Json;
use axum::extract::State;
use serde::Serialize;

use super::{AppState, rfc3339};

#[derive(Serialize)]
struct Health {
    status: &'static str,
    trust_domain: String,
    entries: usize,
    revision: u64,
    ca_not_after: String,
}

/// `GET /healthz`.
pub async fn healthz(State(state): State<AppState>) -> Json<impl Serialize> {
    Json(Health {
        status: "ok",
        trust_domain: state.trust_domain().to_string(),
        entries: state.with_index(|ix| ix.len()),
        revision: state.revision(),
        ca_not_after: rfc3339(state.authorities.x509.not_after()),
    })
}
