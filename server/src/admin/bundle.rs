//! `/v1/bundle`: this trust domain's bundle.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::AppState;
use super::error::ApiError;
use super::extract::QueryParams;

/// `GET /v1/bundle` query.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundleQuery {
    /// `spiffe` (default): the SPIFFE bundle JSON; `pem`: the X.509 CA
    /// certificates as PEM.
    pub format: Option<String>,
}

/// The X.509 authorities of `bundle` as concatenated PEM certificates.
pub fn bundle_pem(bundle: &mayfly::bundle::TrustBundle) -> String {
    bundle
        .x509_authorities
        .iter()
        .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.clone())))
        .collect()
}

/// `GET /v1/bundle`.
pub async fn show(
    State(state): State<AppState>,
    QueryParams(q): QueryParams<BundleQuery>,
) -> Result<Response, ApiError> {
    let bundle = state.bundle();
    match q.format.as_deref().unwrap_or("spiffe") {
        "spiffe" => {
            let json = bundle
                .to_spiffe_json()
                .map_err(|e| ApiError::internal(format!("encoding the bundle: {e}")))?;
            Ok(([(header::CONTENT_TYPE, "application/json")], json).into_response())
        }
        "pem" => Ok((
            [(header::CONTENT_TYPE, "application/x-pem-file")],
            bundle_pem(&bundle),
        )
            .into_response()),
        other => Err(ApiError::invalid(format!(
            "format must be spiffe or pem, not {other:?}"
        ))),
    }
}
