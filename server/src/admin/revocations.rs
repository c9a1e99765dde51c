//! `/v1/revocations`: revoked credentials, and operator revocation.

use axum::Json;
use axum::extract::State;
use mayfly::SpiffeId;
use mayfly::revocation::{CredentialId, Revocation};
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::{JsonBody, QueryParams};
use super::{AppState, blocking, rfc3339};
use crate::revocation::OperatorTarget;

/// `GET /v1/revocations` query.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// 1 to 1000; default 100.
    pub page_size: Option<usize>,
    /// `next_page_token` of the previous page.
    pub page_token: Option<String>,
}

/// `POST /v1/revocations` body: exactly one of `serial`, `jti` and
/// `spiffe_id`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    /// An X.509-SVID serial (hex).
    #[serde(default)]
    pub serial: Option<String>,
    /// A JWT-SVID `jti`.
    #[serde(default)]
    pub jti: Option<String>,
    /// Every unexpired credential issued for this SPIFFE ID.
    #[serde(default)]
    pub spiffe_id: Option<String>,
    /// A note for the audit log; the revocation's reason is `operator`.
    #[serde(default)]
    pub reason: Option<String>,
}

/// One revocation as JSON.
#[derive(Debug, Serialize)]
pub struct RevocationJson {
    #[serde(skip_serializing_if = "Option::is_none")]
    serial: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    jti: Option<String>,
    authority_id: String,
    expires_at: String,
    reason: String,
    revoked_at: String,
}

impl From<&Revocation> for RevocationJson {
    fn from(r: &Revocation) -> Self {
        let (serial, jti) = match &r.id {
            CredentialId::Serial(s) => (Some(s.clone()), None),
            CredentialId::Jti(j) => (None, Some(j.clone())),
        };
        Self {
            serial,
            jti,
            authority_id: r.authority_id.clone(),
            expires_at: rfc3339(r.expires_at),
            reason: r.reason.as_str().to_owned(),
            revoked_at: rfc3339(r.revoked_at),
        }
    }
}

#[derive(Debug, Serialize)]
struct ListResponse {
    revocations: Vec<RevocationJson>,
    next_page_token: Option<String>,
}

#[derive(Debug, Serialize)]
struct RevokeResponse {
    revoked: Vec<RevocationJson>,
}

/// `GET /v1/revocations`: one page, ordered by credential.
pub async fn list(
    State(state): State<AppState>,
    QueryParams(q): QueryParams<ListQuery>,
) -> Result<Json<impl Serialize>, ApiError> {
    let (revocations, next_page_token) = blocking(state, move |s| {
        s.list_revocations(q.page_size, q.page_token.as_deref())
    })
    .await?;
    Ok(Json(ListResponse {
        revocations: revocations.iter().map(RevocationJson::from).collect(),
        next_page_token,
    }))
}

fn target(req: &RevokeRequest) -> Result<OperatorTarget, ApiError> {
    match (&req.serial, &req.jti, &req.spiffe_id) {
        (Some(s), None, None) => CredentialId::serial(s)
            .map(OperatorTarget::Credential)
            .map_err(|e| ApiError::invalid(format!("serial: {e}"))),
        (None, Some(j), None) => CredentialId::jti(j)
            .map(OperatorTarget::Credential)
            .map_err(|e| ApiError::invalid(format!("jti: {e}"))),
        (None, None, Some(id)) => SpiffeId::new(id)
            .map(OperatorTarget::SpiffeId)
            .map_err(|e| ApiError::invalid(format!("spiffe_id {id:?} is not valid: {e}"))),
        _ => Err(ApiError::invalid(
            "give exactly one of serial, jti and spiffe_id",
        )),
    }
}

/// `POST /v1/revocations`: answers with what was newly revoked.
pub async fn revoke(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<RevokeRequest>,
) -> Result<Json<impl Serialize>, ApiError> {
    let t = target(&req)?;
    let revoked = blocking(state, move |s| {
        s.revoke_by_operator(&t, req.reason.as_deref())
    })
    .await?;
    Ok(Json(RevokeResponse {
        revoked: revoked.iter().map(RevocationJson::from).collect(),
    }))
}
