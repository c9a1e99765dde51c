//! The public HTTP listener (`http_address`): what relying parties fetch
//! without credentials — the CRL of each X.509 authority, the SPIFFE trust
//! bundle, and health endpoints. Plain HTTP: everything served is public
//! and signed (CRLs) or distributed out of band (the bundle).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;

use crate::state::ServerState;

/// The media type of a DER CRL (RFC 5280 §4.2.1.13, RFC 2585).
pub const CRL_CONTENT_TYPE: &str = "application/pkix-crl";

/// The public routes.
pub fn router(state: Arc<ServerState>) -> Router {
    Router::new()
        .route("/crl/{authority_id}", get(crl))
        .route("/bundle", get(bundle))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// `GET /crl/{authority_id}`: the current CRL (DER), 404 for an unknown id.
async fn crl(State(state): State<Arc<ServerState>>, Path(id): Path<String>) -> Response {
    match state.crl(&id) {
        Some(der) => (
            [
                (header::CONTENT_TYPE, CRL_CONTENT_TYPE),
                (header::CACHE_CONTROL, "no-cache"),
            ],
            der,
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            format!("no X.509 authority {id:?}\n"),
        )
            .into_response(),
    }
}

/// `GET /bundle`: the SPIFFE trust bundle (JWKS).
async fn bundle(State(state): State<Arc<ServerState>>) -> Response {
    match state.bundle().to_spiffe_json() {
        Ok(json) => ([(header::CONTENT_TYPE, "application/json")], json).into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode the trust bundle");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "cannot encode the trust bundle\n",
            )
                .into_response()
        }
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

/// Ready when there is an active X.509 authority and its CRL is signed.
async fn readyz(State(state): State<Arc<ServerState>>) -> Response {
    let active = state
        .authorities
        .snapshot()
        .active_x509()
        .map(|(id, _)| id.to_owned());
    match active {
        Some(id) if state.crl(&id).is_some() => "ok\n".into_response(),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response(),
    }
}

/// Binds the public listener.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (http_address)"))
}

/// Serves the public routes on `listener` until `shutdown` completes.
pub async fn serve(
    state: Arc<ServerState>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
        .context("public HTTP server failed")
}
