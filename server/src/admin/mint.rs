//! `/v1/x509/mint` and `/v1/jwt/mint`: SVIDs minted directly for an
//! operator, outside the entry model.

use axum::Json;
use axum::extract::State;
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use mayfly::ttl::Ttl;
use serde::{Deserialize, Serialize};

use super::bundle::bundle_pem;
use super::error::ApiError;
use super::extract::JsonBody;
use super::{AppState, blocking, rfc3339};

/// `POST /v1/x509/mint` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct X509Request {
    /// The identity.
    pub spiffe_id: String,
    /// A PKCS#10 request, PEM or base64 DER. Without it the server
    /// generates the key and returns it.
    #[serde(default)]
    pub csr: Option<String>,
    /// Lifetime, e.g. `1h`; the server's `default_x509_svid_ttl` by default.
    #[serde(default)]
    pub ttl: Option<String>,
    /// DNS SANs; the first is also the subject CN.
    #[serde(default)]
    pub dns_names: Vec<String>,
}

#[derive(Serialize)]
struct X509Response {
    spiffe_id: String,
    svid_chain_pem: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    private_key_pem: Option<String>,
    bundle_pem: String,
    serial: String,
    expires_at: String,
}

/// `POST /v1/jwt/mint` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtRequest {
    /// The identity (`sub`).
    pub spiffe_id: String,
    /// `aud`; at least one.
    pub audience: Vec<String>,
    /// Lifetime, e.g. `5m`; the server's `default_jwt_svid_ttl` by default.
    #[serde(default)]
    pub ttl: Option<String>,
}

#[derive(Serialize)]
struct JwtResponse {
    spiffe_id: String,
    token: String,
    jti: String,
    expires_at: String,
}

fn parse_ttl(v: Option<&str>) -> Result<Option<Ttl>, ApiError> {
    v.map(str::parse::<Ttl>)
        .transpose()
        .map_err(|e| ApiError::invalid(format!("ttl: {e}")))
}

/// Decodes a CSR given as PEM (`CERTIFICATE REQUEST`) or base64 DER.
pub fn decode_csr(text: &str) -> Result<Vec<u8>, ApiError> {
    let t = text.trim();
    if t.starts_with("-----BEGIN") {
        let p = pem::parse(t).map_err(|e| ApiError::invalid(format!("csr: invalid PEM: {e}")))?;
        return match p.tag() {
            "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST" => Ok(p.into_contents()),
            other => Err(ApiError::invalid(format!(
                "csr: expected a CERTIFICATE REQUEST PEM block, found {other}"
            ))),
        };
    }
    let compact: String = t.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    STANDARD
        .decode(&compact)
        .or_else(|_| URL_SAFE_NO_PAD.decode(compact.trim_end_matches('=')))
        .map_err(|_| ApiError::invalid("csr must be a PEM CERTIFICATE REQUEST or base64 DER"))
}

/// `POST /v1/x509/mint`.
pub async fn x509(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<X509Request>,
) -> Result<Json<impl Serialize>, ApiError> {
    let ttl = parse_ttl(req.ttl.as_deref())?;
    let csr = req.csr.as_deref().map(decode_csr).transpose()?;
    let (id, minted, bundle) = blocking(state, move |s| {
        let id = s.mintable_id(&req.spiffe_id)?;
        let minted = s.mint_x509(&id, csr.as_deref(), ttl, &req.dns_names)?;
        Ok((id, minted, s.bundle()))
    })
    .await?;
    let svid_chain_pem = minted
        .chain_der
        .iter()
        .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.clone())))
        .collect();
    let private_key_pem = minted
        .key_pkcs8
        .as_ref()
        .map(|k| pem::encode(&pem::Pem::new("PRIVATE KEY", k.to_vec())));
    Ok(Json(X509Response {
        spiffe_id: id.to_string(),
        svid_chain_pem,
        private_key_pem,
        bundle_pem: bundle_pem(&bundle),
        serial: minted.serial.clone(),
        expires_at: rfc3339(minted.expires_at),
    }))
}

/// `POST /v1/jwt/mint`.
pub async fn jwt(
    State(state): State<AppState>,
    JsonBody(req): JsonBody<JwtRequest>,
) -> Result<Json<impl Serialize>, ApiError> {
    let ttl = parse_ttl(req.ttl.as_deref())?;
    let (id, minted) = blocking(state, move |s| {
        let id = s.mintable_id(&req.spiffe_id)?;
        let minted = s.mint_jwt(&id, &req.audience, ttl)?;
        Ok((id, minted))
    })
    .await?;
    let expires_at = time::OffsetDateTime::from_unix_timestamp(minted.expires_at)
        .map(rfc3339)
        .map_err(|e| ApiError::internal(format!("token expiry out of range: {e}")))?;
    Ok(Json(JwtResponse {
        spiffe_id: id.to_string(),
        token: minted.token.as_str().to_owned(),
        jti: minted.jti.clone(),
        expires_at,
    }))
}
