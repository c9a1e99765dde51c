//! The SPIFFE Workload API on the agent's Unix socket.
//!
//! - [`listener`] binds the socket and reads each caller's kernel credentials on accept;
//! - [`authority`] rewrites the HTTP/2 `:authority` so that every gRPC client is served;
//! - [`workload_api`] is the service itself, answered from the agent's [`Cache`];
//! - [`jwt_cache`] keeps the JWT-SVIDs it hands out for reuse until half their lifetime;
//! - with [`WorkloadApi::with_tasks`], `mayfly.task.v1.Task` is served on the same socket
//!   (see [`crate::task`]).
//!
//! [`serve`] puts them together.

pub mod authority;
pub mod jwt_cache;
pub mod listener;
pub mod workload_api;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use mayfly::TrustDomain;
use tokio::sync::oneshot;

use crate::cache::Cache;
use crate::workload::UnixAttestor;

pub use listener::{ListenerError, WorkloadConnection};
pub use workload_api::{
    ApiError, JwtMinter, MintedJwt, SECURITY_HEADER, StopStreams, WorkloadApi, token_jti,
};

/// After the shutdown signal, how long open connections get to finish before the server
/// stops waiting for them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Serves the Workload API on `socket_path` until `shutdown` completes, attesting callers with
/// the unix attestor, without tasks (every entry served from its per-entry SVID). The agent
/// itself uses [`serve_api`] with [`WorkloadApi::with_tasks`].
///
/// The socket is (re)created with mode 0777: the API authenticates callers by attestation.
/// On shutdown every open stream ends with `Unavailable` (clients reconnect), the server stops
/// accepting, and the socket file is removed.
pub async fn serve(
    socket_path: &Path,
    cache: Cache,
    minter: Arc<dyn JwtMinter>,
    trust_domain: TrustDomain,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let api = WorkloadApi::new(cache, Arc::new(UnixAttestor::new()), minter, trust_domain);
    serve_api(socket_path, api, shutdown).await
}

/// [`serve`] with a service built by the caller (another attestor, clock or wait bound).
pub async fn serve_api(
    socket_path: &Path,
    api: WorkloadApi,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let listener = listener::bind(socket_path)?;
    tracing::info!(socket = %socket_path.display(), "Workload API listening");
    let stop = api.stop_handle();
    let (stopped_tx, stopped_rx) = oneshot::channel::<()>();
    let signal = async move {
        shutdown.await;
        tracing::info!("Workload API shutting down");
        stop.stop();
        let _ = stopped_tx.send(());
    };
    // `mayfly.task.v1.Task` is a separate service on the same socket: the standard one is
    // never extended.
    let task_service = api.tasks().map(|t| t.service());
    let server = tonic::transport::Server::builder()
        .add_service(api.into_server())
        .add_optional_service(task_service)
        .serve_with_incoming_shutdown(listener::incoming(listener), signal);
    let grace = async move {
        if stopped_rx.await.is_ok() {
            tokio::time::sleep(SHUTDOWN_GRACE).await;
        } else {
            std::future::pending::<()>().await;
        }
    };
    let result = tokio::select! {
        r = server => r.context("Workload API server failed"),
        () = grace => {
            tracing::warn!("Workload API connections did not close in time; stopping anyway");
            Ok(())
        }
    };
    if let Err(e) = std::fs::remove_file(socket_path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        tracing::warn!(socket = %socket_path.display(), error = %e, "cannot remove the socket");
    }
    result
}

/// Opens a gRPC channel to a Workload API socket (for the CLI and tests). Requests sent on it
/// must carry the security header; see [`request`].
pub async fn connect(
    socket_path: &Path,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    let path = socket_path.to_owned();
    // The URI is required by the API but unused: the connector below ignores it.
    tonic::transport::Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
}

/// A Workload API request carrying the `workload.spiffe.io: true` metadata.
pub fn request<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        SECURITY_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    request
}

/// Why a `SPIFFE_ENDPOINT_SOCKET` value was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EndpointError {
    /// Not `unix:///path`, `unix:/path` or a plain absolute or relative path.
    #[error("endpoint {0:?} is not a Unix socket address (expected unix:///path or unix:/path)")]
    Unsupported(String),
}

/// The socket path of a Workload API address as `SPIFFE_ENDPOINT_SOCKET` spells it:
/// `unix:///run/agent.sock` and `unix:/run/agent.sock` both mean `/run/agent.sock`; a value
/// without a scheme is taken as a path. Other schemes (`tcp:`) and `unix://host/...` are
/// refused.
pub fn socket_path_from_endpoint(endpoint: &str) -> Result<PathBuf, EndpointError> {
    let unsupported = || EndpointError::Unsupported(endpoint.to_owned());
    let path = if let Some(rest) = endpoint.strip_prefix("unix://") {
        // `unix://` must be followed by an empty authority, i.e. an absolute path.
        rest.starts_with('/')
            .then_some(rest)
            .ok_or_else(unsupported)?
    } else if let Some(rest) = endpoint.strip_prefix("unix:") {
        rest
    } else if endpoint.contains("://") || endpoint.starts_with("tcp:") {
        return Err(unsupported());
    } else {
        endpoint
    };
    if path.is_empty() {
        return Err(unsupported());
    }
    Ok(PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_forms() {
        for (input, want) in [
            ("unix:///run/agent.sock", "/run/agent.sock"),
            ("unix:/run/agent.sock", "/run/agent.sock"),
            ("/run/agent.sock", "/run/agent.sock"),
            ("./.mayfly/agent/api.sock", "./.mayfly/agent/api.sock"),
        ] {
            assert_eq!(
                socket_path_from_endpoint(input).unwrap(),
                PathBuf::from(want)
            );
        }
        for bad in [
            "tcp://127.0.0.1:8081",
            "unix://host/run/agent.sock",
            "unix:",
            "",
            "http://x",
        ] {
            assert!(socket_path_from_endpoint(bad).is_err(), "{bad} accepted");
        }
    }
}
