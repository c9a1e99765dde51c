//! `/v1/agents`: attested agents.
//!
//! `{id}` is either the agent's full SPIFFE ID or the path after
//! `spiffe://<trust domain>/`, percent-encoded as one path segment
//! (`spiffe%3A%2F%2Fexample.org%2Fmayfly%2Fagent%2Fjoin_token%2Fabc` or
//! `mayfly%2Fagent%2Fjoin_token%2Fabc`).

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::{PathParam, QueryParams};
use super::{AppState, blocking};
use crate::store::NodeRecord;

/// `GET /v1/agents` query.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// 1 to 1000; default 100.
    pub page_size: Option<usize>,
    /// `next_page_token` of the previous page.
    pub page_token: Option<String>,
}

#[derive(Debug, Serialize)]
struct ListResponse {
    agents: Vec<NodeRecord>,
    next_page_token: Option<String>,
}

/// `GET /v1/agents`: one page of agents, ordered by SPIFFE ID.
pub async fn list(
    State(state): State<AppState>,
    QueryParams(q): QueryParams<ListQuery>,
) -> Result<Json<impl Serialize>, ApiError> {
    let (agents, next_page_token) = blocking(state, move |s| {
        s.list_agents(q.page_size, q.page_token.as_deref())
    })
    .await?;
    Ok(Json(ListResponse {
        agents,
        next_page_token,
    }))
}

/// `GET /v1/agents/{id}`.
pub async fn show(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> Result<Json<NodeRecord>, ApiError> {
    let node = blocking(state, move |s| s.get_agent(&s.resolve_agent_id(&id)?)).await?;
    Ok(Json(node))
}

/// `POST /v1/agents/{id}/ban`: answers with the banned agent's record.
pub async fn ban(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> Result<Json<NodeRecord>, ApiError> {
    let node = blocking(state, move |s| s.ban_agent(&s.resolve_agent_id(&id)?)).await?;
    Ok(Json(node))
}

/// `POST /v1/agents/{id}/evict`: answers with the removed record.
pub async fn evict(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> Result<Json<NodeRecord>, ApiError> {
    let node = blocking(state, move |s| s.evict_agent(&s.resolve_agent_id(&id)?)).await?;
    Ok(Json(node))
}

/// `POST /v1/agents/{id}/unban`: lifts a ban; answers with the record. The
/// agent may call again with its current SVID (or attest again).
pub async fn unban(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> Result<Json<NodeRecord>, ApiError> {
    let node = blocking(state, move |s| s.unban_agent(&s.resolve_agent_id(&id)?)).await?;
    Ok(Json(node))
}
