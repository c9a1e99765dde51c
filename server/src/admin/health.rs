//! `/healthz`: is the server up, and what is it serving (entries, the
//! authorities and their phases).

use axum::Json;
use axum::extract::State;
use serde::Serialize;

use super::authorities::{AuthoritiesBody, authorities_body};
use super::{AppState, rfc3339};

#[derive(Serialize)]
struct Health {
    status: &'static str,
    trust_domain: String,
    entries: usize,
    revision: u64,
    ca_not_after: Option<String>,
    bundle_sequence: u64,
    authorities: AuthoritiesBody,
}

/// `GET /healthz`.
pub async fn healthz(State(state): State<AppState>) -> Json<impl Serialize> {
    let authorities = state.authorities.snapshot();
    Json(Health {
        status: "ok",
        trust_domain: state.trust_domain().to_string(),
        entries: state.with_index(|ix| ix.len()),
        revision: state.revision(),
        ca_not_after: authorities
            .active_x509()
            .map(|(_, ca)| rfc3339(ca.not_after())),
        bundle_sequence: authorities.sequence(),
        authorities: authorities_body(&authorities),
    })
}
