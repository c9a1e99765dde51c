//! `/v1/authorities`: the X.509 CAs and JWT keys, their phases, and the
//! manual steps of rotation (prepare, activate, taint, revoke).

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use serde::{Deserialize, Serialize};

use super::error::ApiError;
use super::extract::{JsonBody, PathParam};
use super::{AppState, blocking, rfc3339};
use crate::authority::{Authorities, AuthorityInfo, Kind};

/// One authority as the API shows it.
#[derive(Debug, Serialize)]
pub struct AuthorityBody {
    id: String,
    phase: String,
    tainted: bool,
    not_before: String,
    not_after: String,
}

impl From<AuthorityInfo> for AuthorityBody {
    fn from(a: AuthorityInfo) -> Self {
        Self {
            id: a.id,
            phase: a.phase.to_string(),
            tainted: a.tainted,
            not_before: rfc3339(a.not_before),
            not_after: rfc3339(a.not_after),
        }
    }
}

/// `{"x509":[...],"jwt":[...]}`.
#[derive(Debug, Serialize)]
pub struct AuthoritiesBody {
    x509: Vec<AuthorityBody>,
    jwt: Vec<AuthorityBody>,
}

/// Every authority of `a`, by kind, oldest first.
pub fn authorities_body(a: &Authorities) -> AuthoritiesBody {
    let list = |kind| a.list(kind).into_iter().map(AuthorityBody::from).collect();
    AuthoritiesBody {
        x509: list(Kind::X509),
        jwt: list(Kind::Jwt),
    }
}

/// `POST .../taint` and `.../revoke` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorityIdRequest {
    /// The authority's id, as `GET /v1/authorities` shows it.
    pub authority_id: String,
}

/// Prepare and activate take no parameters: no body, or an empty object.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

fn no_body(bytes: &Bytes) -> Result<(), ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    serde_json::from_slice::<Empty>(bytes)
        .map(|_| ())
        .map_err(|e| ApiError::invalid(format!("this request takes no parameters: {e}")))
}

fn kind(PathParam(k): &PathParam) -> Result<Kind, ApiError> {
    Ok(k.parse::<Kind>()?)
}

/// `GET /v1/authorities`.
pub async fn list(State(state): State<AppState>) -> Json<AuthoritiesBody> {
    Json(authorities_body(&state.authorities.snapshot()))
}

/// `POST /v1/authorities/{type}/prepare`: a new prepared authority,
/// published in the bundle at once, not signing yet.
pub async fn prepare(
    State(state): State<AppState>,
    path: PathParam,
    body: Bytes,
) -> Result<Json<AuthorityBody>, ApiError> {
    let kind = kind(&path)?;
    no_body(&body)?;
    let a = blocking(state, move |s| s.prepare_authority(kind)).await?;
    Ok(Json(a.into()))
}

/// `POST /v1/authorities/{type}/activate`: the prepared authority signs
/// from now on; the active one becomes old.
pub async fn activate(
    State(state): State<AppState>,
    path: PathParam,
    body: Bytes,
) -> Result<Json<AuthorityBody>, ApiError> {
    let kind = kind(&path)?;
    no_body(&body)?;
    let a = blocking(state, move |s| s.activate_authority(kind)).await?;
    Ok(Json(a.into()))
}

/// `POST /v1/authorities/{type}/taint`: agents replace every SVID the
/// (old) authority signed.
pub async fn taint(
    State(state): State<AppState>,
    path: PathParam,
    JsonBody(req): JsonBody<AuthorityIdRequest>,
) -> Result<Json<AuthorityBody>, ApiError> {
    let kind = kind(&path)?;
    let a = blocking(state, move |s| s.taint_authority(kind, &req.authority_id)).await?;
    Ok(Json(a.into()))
}

/// `POST /v1/authorities/{type}/revoke`: the (tainted) authority leaves
/// the bundle and its key is deleted.
pub async fn revoke(
    State(state): State<AppState>,
    path: PathParam,
    JsonBody(req): JsonBody<AuthorityIdRequest>,
) -> Result<Json<AuthorityBody>, ApiError> {
    let kind = kind(&path)?;
    let a = blocking(state, move |s| s.revoke_authority(kind, &req.authority_id)).await?;
    Ok(Json(a.into()))
}
