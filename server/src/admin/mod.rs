//! The admin REST API: JSON over HTTP/1.1 on a Unix socket that only the
//! server's user (and root) may connect to. Operators reach it through the
//! `mayfly-server` CLI or any HTTP client (`curl --unix-socket`).
//!
//! Every route, body and error is described by the OpenAPI document served
//! at `GET /v1/openapi.json` ([`openapi`]); errors are mapped in one place
//! ([`error`]). Handlers are thin: they parse the request, run the blocking
//! service method (`crate::service`) on the blocking pool, and shape JSON.

pub mod agents;
pub mod audit;
pub mod audit_log;
pub mod authorities;
pub mod bundle;
pub mod caller;
pub mod entries;
pub mod error;
pub mod extract;
pub mod health;
pub mod mint;
pub mod openapi;
pub mod policy;
pub mod revocations;
pub mod tokens;

use std::future::Future;
use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::response::Response;
use axum::routing::{MethodRouter, get, post};
use axum::serve::Listener;
use tokio::net::{UnixListener, UnixStream};
use tracing::Instrument as _;

use self::caller::AdminCaller;
use self::error::ApiError;
use crate::error::ServiceResult;
use crate::state::ServerState;

/// The largest request body accepted, in bytes (a batch of 1000 entries
/// fits comfortably).
pub const BODY_LIMIT: usize = 4 * 1024 * 1024;

/// Shared state of every handler.
pub type AppState = Arc<ServerState>;

/// Every route of the API, as `(path, method router)`. The router is built
/// from this table and the OpenAPI test walks it, so that the document
/// cannot silently miss a route.
pub fn routes() -> Vec<(&'static str, MethodRouter<AppState>)> {
    vec![
        ("/healthz", get(health::healthz)),
        ("/v1/openapi.json", get(openapi::document)),
        ("/v1/entries", post(entries::create).get(entries::list)),
        (
            "/v1/entries/{id}",
            get(entries::show)
                .put(entries::update)
                .delete(entries::delete),
        ),
        ("/v1/join-tokens", post(tokens::create)),
        ("/v1/agents", get(agents::list)),
        ("/v1/agents/{id}", get(agents::show)),
        ("/v1/agents/{id}/ban", post(agents::ban)),
        ("/v1/agents/{id}/evict", post(agents::evict)),
        ("/v1/agents/{id}/unban", post(agents::unban)),
        ("/v1/audit", get(audit_log::list)),
        ("/v1/audit/verify", get(audit_log::verify)),
        ("/v1/bundle", get(bundle::show)),
        ("/v1/authorities", get(authorities::list)),
        ("/v1/authorities/{type}/prepare", post(authorities::prepare)),
        (
            "/v1/authorities/{type}/activate",
            post(authorities::activate),
        ),
        ("/v1/authorities/{type}/taint", post(authorities::taint)),
        ("/v1/authorities/{type}/revoke", post(authorities::revoke)),
        ("/v1/x509/mint", post(mint::x509)),
        ("/v1/jwt/mint", post(mint::jwt)),
        (
            "/v1/revocations",
            post(revocations::revoke).get(revocations::list),
        ),
        ("/v1/policy/check", post(policy::check_handler)),
    ]
}

/// The admin API as an axum router. Every routed request is decided by
/// policy ([`policy::authorize`]) after its caller is attached.
pub fn router(state: Arc<ServerState>) -> Router {
    let audited = Arc::clone(&state);
    routes()
        .into_iter()
        .fold(Router::new(), |r, (path, mr)| {
            r.route(path, mr.fallback(error::method_not_allowed))
        })
        .route_layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            policy::authorize,
        ))
        .fallback(error::not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::from_fn_with_state(audited, audit::record))
        .layer(axum::middleware::from_fn(caller::attach))
        .layer(axum::middleware::from_fn(trace_request))
        .with_state(state)
}

/// A span per request (method, path) and one event with the status and
/// the time taken: warnings for server errors, debug otherwise.
async fn trace_request(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let span =
        tracing::info_span!("admin_request", method = %req.method(), path = %req.uri().path());
    let started = std::time::Instant::now();
    let resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    let elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    span.in_scope(|| {
        if resp.status().is_server_error() {
            tracing::warn!(status, elapsed_ms, "admin request failed");
        } else {
            tracing::debug!(status, elapsed_ms, "admin request");
        }
    });
    resp
}

/// Runs a blocking service call on the blocking pool.
pub(crate) async fn blocking<T, F>(state: AppState, f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce(&ServerState) -> ServiceResult<T> + Send + 'static,
{
    // Keep the request's span, so that service logs name the request.
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(|| f(&state)))
        .await
        .map_err(|e| ApiError::internal(format!("request handler failed: {e}")))?
        .map_err(ApiError::from)
}

/// RFC 3339 text of a timestamp, to the second (the precision of
/// certificates and JWTs).
pub(crate) fn rfc3339(t: time::OffsetDateTime) -> String {
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

/// Accepts only peers running as the server's own user or as root: a second
/// check behind the socket file's 0600 mode.
#[derive(Debug)]
struct OwnerOnly {
    inner: UnixListener,
    uid: u32,
}

impl Listener for OwnerOnly {
    type Io = UnixStream;
    type Addr = AdminCaller;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, _addr) = Listener::accept(&mut self.inner).await;
            match stream.peer_cred() {
                Ok(cred) if cred.uid() == self.uid || cred.uid() == 0 => {
                    return (stream, AdminCaller::unix(cred.uid(), cred.pid()));
                }
                Ok(cred) => {
                    tracing::warn!(
                        peer_uid = cred.uid(),
                        "refused an admin connection from another user"
                    );
                }
                Err(e) => {
                    tracing::warn!(error = %e, "refused an admin connection without peer credentials")
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        // The listening side has no peer; name the server's own user.
        Ok(AdminCaller::unix(self.uid, None))
    }
}

/// Binds the admin socket: refuses to take over a socket a live server is
/// listening on, removes a stale one, refuses to replace anything that is
/// not a socket, and makes the new socket owner-only (0600).
pub async fn bind(socket_path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = socket_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create directory {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(socket_path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(socket_path).await.is_ok() {
                anyhow::bail!(
                    "another process is serving the admin API on {}; stop it or choose another admin_socket_path",
                    socket_path.display()
                );
            }
            std::fs::remove_file(socket_path)
                .with_context(|| format!("cannot remove stale socket {}", socket_path.display()))?;
        }
        Ok(_) => anyhow::bail!(
            "{} exists and is not a socket; refusing to replace it",
            socket_path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(e).with_context(|| format!("cannot inspect {}", socket_path.display()));
        }
    }
    let listener = UnixListener::bind(socket_path)
        .with_context(|| format!("cannot bind the admin socket {}", socket_path.display()))?;
    std::fs::set_permissions(socket_path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {} to its owner", socket_path.display()))?;
    Ok(listener)
}

/// Serves the admin API on `socket_path` until `shutdown` completes, then
/// finishes in-flight requests and removes the socket file.
pub async fn serve(
    state: Arc<ServerState>,
    socket_path: &Path,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = bind(socket_path).await?;
    tracing::info!(path = %socket_path.display(), "admin API listening");
    let listener = OwnerOnly {
        inner: listener,
        uid: nix::unistd::geteuid().as_raw(),
    };
    let result = axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<AdminCaller>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
    .context("admin API server failed");
    if let Err(e) = std::fs::remove_file(socket_path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(path = %socket_path.display(), error = %e, "cannot remove the admin socket");
    }
    result
}

#[cfg(test)]
pub(crate) mod tests;
