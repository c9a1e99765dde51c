//! `/v1/audit`: reading and verifying the audit log.

use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::QueryParams;
use super::{AppState, blocking};
use crate::audit::{AuditFilter, AuditRecord, DEFAULT_PAGE, VerifyReport};

/// `GET /v1/audit` query.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only records at or after this time (RFC 3339).
    pub since: Option<String>,
    /// Only records with a seq above this (the previous page's `next_after`).
    pub after: Option<u64>,
    /// 1 to 1000; default 100.
    pub limit: Option<usize>,
    /// Only this action or actions under this dotted prefix (`node`,
    /// `admin`, `x509.issue`).
    pub action: Option<String>,
}

#[derive(Debug, Serialize)]
struct ListResponse {
    records: Vec<AuditRecord>,
    next_after: Option<u64>,
}

/// `GET /v1/audit`: one page of records in seq order.
pub async fn list(
    State(state): State<AppState>,
    QueryParams(q): QueryParams<ListQuery>,
) -> Result<Json<impl Serialize>, ApiError> {
    let since =
        q.since
            .as_deref()
            .filter(|s| !s.is_empty())
            .map(|s| {
                time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
                    .map_err(|e| {
                        ApiError::invalid(format!(
                            "since {s:?} is not an RFC 3339 time (like 2026-01-02T15:04:05Z): {e}"
                        ))
                    })
            })
            .transpose()?;
    let filter = AuditFilter {
        since,
        action: q.action.filter(|a| !a.is_empty()),
    };
    let (records, next_after) = blocking(state, move |s| {
        s.list_audit(
            &filter,
            q.after.unwrap_or(0),
            q.limit.filter(|l| *l != 0).unwrap_or(DEFAULT_PAGE),
        )
    })
    .await?;
    Ok(Json(ListResponse {
        records,
        next_after,
    }))
}

/// `GET /v1/audit/verify`: checks the whole chain, its head and the
/// JSON-lines file. Appends wait while it runs.
pub async fn verify(State(state): State<AppState>) -> Result<Json<VerifyReport>, ApiError> {
    Ok(Json(blocking(state, |s| s.verify_audit()).await?))
}
