//! `/v1/entries`: registration entries.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use mayfly::entry::{Entry, EntrySpec};
use serde::{Deserialize, Serialize};

use super::error::{ApiError, ErrorBody};
use super::extract::{JsonBody, PathParam, QueryParams};
use super::{AppState, blocking};
use crate::service::entries::{EntryFilter, parse_entry_id};

/// `POST /v1/entries` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    /// The entries to create (1 to 1000).
    pub entries: Vec<EntrySpec>,
}

/// One item of a batch result: the created entry or why it was not.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum ItemResult {
    /// Created.
    Created {
        /// The entry as stored.
        entry: Box<Entry>,
    },
    /// Not created.
    Failed {
        /// Why.
        error: ErrorBody,
    },
}

#[derive(Debug, Serialize)]
struct CreateResponse {
    results: Vec<ItemResult>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ErrorBody>,
}

/// `POST /v1/entries`: creates a batch. Answers 201 when every entry was
/// created, 207 when some were, and the first failure's status (with an
/// `error` member beside `results`) when none were.
pub async fn create(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<CreateRequest>,
) -> Result<Response, ApiError> {
    let results = blocking(state, move |s| s.create_entries(req.entries)).await?;
    let total = results.len();
    let mut first_error: Option<ApiError> = None;
    let results: Vec<ItemResult> = results
        .into_iter()
        .map(|r| match r {
            Ok(entry) => ItemResult::Created {
                entry: Box::new(entry),
            },
            Err(e) => {
                let e = ApiError::from(e);
                let body = e.body();
                first_error.get_or_insert(e);
                ItemResult::Failed { error: body }
            }
        })
        .collect();
    let failed = results
        .iter()
        .filter(|r| matches!(r, ItemResult::Failed { .. }))
        .count();
    let (status, error) = match first_error {
        None => (StatusCode::CREATED, None),
        Some(_) if failed < total => (StatusCode::MULTI_STATUS, None),
        Some(e) => (e.status, Some(e.body())),
    };
    Ok((status, Json(CreateResponse { results, error })).into_response())
}

/// `GET /v1/entries` query.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only entries with this SPIFFE ID.
    pub spiffe_id: Option<String>,
    /// Only entries with this parent.
    pub parent_id: Option<String>,
    /// Only entries having this selector.
    pub selector: Option<String>,
    /// 1 to 1000; default 100.
    pub page_size: Option<usize>,
    /// `next_page_token` of the previous page.
    pub page_token: Option<String>,
}

#[derive(Debug, Serialize)]
struct ListResponse {
    entries: Vec<Entry>,
    next_page_token: Option<String>,
}

/// `GET /v1/entries`: one page of entries, ordered by id.
pub async fn list(
    State(state): State<AppState>,
    QueryParams(q): QueryParams<ListQuery>,
) -> Result<Json<impl Serialize>, ApiError> {
    let (entries, next_page_token) = blocking(state, move |s| {
        let filter = EntryFilter::parse(
            q.spiffe_id.as_deref(),
            q.parent_id.as_deref(),
            q.selector.as_deref(),
        )?;
        s.list_entries(&filter, q.page_size, q.page_token.as_deref())
    })
    .await?;
    Ok(Json(ListResponse {
        entries,
        next_page_token,
    }))
}

/// `GET /v1/entries/{id}`.
pub async fn show(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> Result<Json<Entry>, ApiError> {
    let entry = blocking(state, move |s| s.get_entry(&parse_entry_id(&id)?)).await?;
    Ok(Json(entry))
}

/// `PUT /v1/entries/{id}`: replaces the entry with the body (an entry
/// spec); the id is kept.
pub async fn update(
    State(state): State<AppState>,
    PathParam(id): PathParam,
    JsonBody(spec): JsonBody<EntrySpec>,
) -> Result<Json<Entry>, ApiError> {
    let entry = blocking(state, move |s| s.update_entry(&parse_entry_id(&id)?, &spec)).await?;
    Ok(Json(entry))
}

/// `DELETE /v1/entries/{id}`: answers with the deleted entry.
pub async fn delete(
    State(state): State<AppState>,
    PathParam(id): PathParam,
) -> Result<Json<Entry>, ApiError> {
    let entry = blocking(state, move |s| s.delete_entry(&parse_entry_id(&id)?)).await?;
    Ok(Json(entry))
}
