//! `/v1/join-tokens`: single-use enrollment secrets for agents.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use mayfly::ttl::Ttl;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::JsonBody;
use super::{AppState, blocking, rfc3339};

/// `POST /v1/join-tokens` body. Both fields are optional; `{}` is valid.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    /// A SPIFFE ID the enrolled agent becomes an alias of.
    #[serde(default)]
    pub spiffe_id: Option<String>,
    /// Lifetime, e.g. `10m`; the server's `join_token_ttl` by default.
    #[serde(default)]
    pub ttl: Option<String>,
}

#[derive(Serialize)]
struct CreateResponse {
    token: String,
    id: String,
    spiffe_id: Option<String>,
    agent_id: String,
    expires_at: String,
}

/// `POST /v1/join-tokens`: a new token. The secret appears in this answer
/// only; the server keeps its hash.
pub async fn create(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<CreateRequest>,
) -> Result<(StatusCode, Json<impl Serialize>), ApiError> {
    let ttl = req
        .ttl
        .as_deref()
        .map(str::parse::<Ttl>)
        .transpose()
        .map_err(|e| ApiError::invalid(format!("ttl: {e}")))?;
    let td = state.trust_domain().to_string();
    let (token, record) = blocking(state, move |s| {
        s.create_join_token(req.spiffe_id.as_deref(), ttl)
    })
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(CreateResponse {
            token: token.as_str().to_owned(),
            agent_id: format!("spiffe://{td}/mayfly/agent/join_token/{}", record.id),
            id: record.id,
            spiffe_id: record.alias,
            expires_at: rfc3339(record.expires_at),
        }),
    ))
}
