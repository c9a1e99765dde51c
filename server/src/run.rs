//! Starting and stopping a whole server: data directory, store, CA, state,
//! the node API (gRPC over TLS), the admin API (Unix socket) and the public
//! HTTP listener (CRLs, bundle, health).
//!
//! Used by `mayfly-server run` and by programs that embed a server (the
//! quickstart example, tests): nothing here exits the process; every
//! failure is returned.

use std::fs;
use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use mayfly::clock::SystemClock;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::authority::AuthorityManager;
use crate::config::ServerConfig;
use crate::state::ServerState;
use crate::store::sled_store::SledStore;

/// How long open connections get to close after shutdown is requested.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How often expired join tokens are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(600);
/// How often records of expired credentials are pruned and CRLs checked.
const PRUNE_REVOCATIONS_EVERY: Duration = Duration::from_secs(60);

/// A started server. Dropping it does not stop the server: call
/// [`RunningServer::shutdown`] (or let the shutdown future passed to
/// [`run`] complete), then [`RunningServer::wait`].
#[derive(Debug)]
pub struct RunningServer {
    node_addr: SocketAddr,
    http_addr: SocketAddr,
    state: Arc<ServerState>,
    bundle_path: PathBuf,
    stop: Arc<watch::Sender<bool>>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl RunningServer {
    /// The address the node API listens on (useful with port 0).
    pub fn node_addr(&self) -> SocketAddr {
        self.node_addr
    }

    /// The address the public HTTP listener (CRLs, bundle, health) is
    /// bound to (useful with port 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The server's shared state.
    pub fn state(&self) -> &Arc<ServerState> {
        &self.state
    }

    /// `<data_dir>/bundle.pem`: the CA certificates, for bootstrapping
    /// agents (`trust_bundle_path`).
    pub fn bundle_path(&self) -> &Path {
        &self.bundle_path
    }

    /// Asks the server to stop (as the shutdown future does).
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }

    /// Waits until the server has stopped: after shutdown was requested and
    /// connections drained (at most 10 seconds), or after an API failed.
    /// Returns that failure.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("the server task panicked")?
    }
}

/// Prepares everything from `config` and starts the server: creates the
/// data directory (mode 0700), opens the store at `<data_dir>/store`, loads
/// or creates the CA, writes `<data_dir>/bundle.pem`, and starts the node
/// API on `config.bind_address` and the admin API on
/// `config.admin_socket_path`. Returns once both are listening; the server
/// stops when `shutdown` completes (pass [`shutdown_signal`] for SIGINT and
/// SIGTERM) or [`RunningServer::shutdown`] is called.
pub async fn run(
    config: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<RunningServer> {
    let data_dir = config.data_dir.clone();
    let state = tokio::task::spawn_blocking(move || open_state(config))
        .await
        .context("opening the server state")??;
    tracing::info!(data_dir = %data_dir.display(), trust_domain = %state.trust_domain(), "server state ready");
    start(Arc::new(state), shutdown).await
}

/// Opens the data directory, store and authorities, and builds the state
/// with the system clock. Blocking.
pub fn open_state(config: ServerConfig) -> anyhow::Result<ServerState> {
    create_private_dir(&config.data_dir)?;
    let store_dir = config.data_dir.join("store");
    let store = SledStore::open(&store_dir)
        .with_context(|| format!("opening the store {}", store_dir.display()))?;
    let clock = Arc::new(SystemClock);
    let authorities = AuthorityManager::load_or_create(&config, mayfly::clock::Clock::now(&*clock))
        .context("loading the authorities")?;
    let sources = config.policy.clone();
    let state = ServerState::new(config, Arc::new(store), clock, authorities)?;
    let n = state
        .policy
        .configure(sources)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("loading the policy")?;
    tracing::info!(policies = n, "policy loaded");
    Ok(state)
}

/// Reloads the policy when its files change (polled every
/// `policy_reload_interval`) and on SIGHUP, until the server stops. A
/// rejected reload is logged and the previous policy stays in force.
async fn watch_policy(state: Arc<ServerState>, mut stop: watch::Receiver<bool>) {
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; policy reloads only on file change");
            None
        }
    };
    let mut tick = tokio::time::interval(Duration::from_secs(
        state.config.policy_reload_interval.as_secs().max(1),
    ));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let (why, only_if_changed) = tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tick.tick() => ("file change", true),
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => ("SIGHUP", false),
        };
        if only_if_changed && !state.policy.has_files() {
            continue;
        }
        let s = Arc::clone(&state);
        let _ =
            tokio::task::spawn_blocking(move || s.policy.reload_logged(why, only_if_changed)).await;
    }
}

/// Starts the APIs over an existing state (for embedding with a custom
/// store or clock). See [`run`].
pub async fn start(
    state: Arc<ServerState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<RunningServer> {
    let config = &state.config;
    let bundle_path = state.bundle_pem_path();
    state
        .write_bundle_pem()
        .with_context(|| format!("writing {}", bundle_path.display()))?;
    tracing::info!(path = %bundle_path.display(), "wrote the trust bundle (PEM)");

    let (stop_tx, stop_rx) = watch::channel(false);
    let stop = Arc::new(stop_tx);

    let listener = crate::node::bind(config.bind_address).await?;
    let node_addr = listener
        .local_addr()
        .context("reading the node API address")?;
    let http_listener = crate::public::bind(config.http_address).await?;
    let http_addr = http_listener
        .local_addr()
        .context("reading the public HTTP address")?;
    // Kubernetes API clients: a bad kubeconfig or missing in-cluster
    // credentials stop the server here rather than at the first attestation.
    let clusters = crate::k8s::Clusters::connect(config.k8s_psat.as_ref())
        .await
        .context("server.node_attestors.k8s_psat")?;
    if let Some(bundle) = &config.k8s_bundle {
        let client = crate::k8s::client(bundle.kubeconfig_path.as_deref(), "server.k8s_bundle")
            .await
            .context("server.k8s_bundle")?;
        tokio::spawn(crate::k8s::bundle::run(
            Arc::clone(&state),
            client,
            bundle.clone(),
            stop_rx.clone(),
        ));
    }
    let node_task = crate::node::start(Arc::clone(&state), listener, clusters, stop_rx.clone())?;
    tracing::info!(addr = %node_addr, "node API listening on {node_addr}");

    let http_task = {
        let state = Arc::clone(&state);
        let signal = until_stopped(stop_rx.clone());
        tokio::spawn(async move { crate::public::serve(state, http_listener, signal).await })
    };
    tracing::info!(addr = %http_addr, "public HTTP listening on {http_addr} (CRLs, bundle)");

    // The admin API.
    let admin_task = {
        let state = Arc::clone(&state);
        let socket = config.admin_socket_path.clone();
        let signal = until_stopped(stop_rx.clone());
        tokio::spawn(async move { crate::admin::serve(state, &socket, signal).await })
    };

    tokio::spawn(prune_join_tokens(Arc::clone(&state), stop_rx.clone()));
    tokio::spawn(prune_revocations(Arc::clone(&state), stop_rx.clone()));
    tokio::spawn(watch_policy(Arc::clone(&state), stop_rx.clone()));
    tokio::spawn(crate::authority::rotate::run(
        Arc::clone(&state),
        stop_rx.clone(),
    ));

    let task = tokio::spawn(supervise(
        shutdown,
        Arc::clone(&stop),
        stop_rx,
        node_task,
        admin_task,
        http_task,
    ));
    Ok(RunningServer {
        node_addr,
        http_addr,
        state,
        bundle_path,
        stop,
        task,
    })
}

/// Raises the soft limit on open files to the hard limit: every agent
/// holds a connection (and its `Sync` stream) open, so the usual soft limit
/// of 1024 would cap a server at about a thousand agents. Returns the
/// limit in force.
pub fn raise_open_files_limit() -> std::io::Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(std::io::Error::from)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(std::io::Error::from)?;
        return Ok(hard);
    }
    Ok(soft)
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the server");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; shutting down"),
        () = terminate => tracing::info!("SIGTERM received; shutting down"),
    }
}

async fn until_stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

type ApiTask = JoinHandle<anyhow::Result<()>>;

fn outcome<E: Into<anyhow::Error>>(
    what: &str,
    joined: Result<Result<(), E>, tokio::task::JoinError>,
) -> anyhow::Result<()> {
    match joined {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.into().context(format!("{what} failed"))),
        Err(e) => Err(anyhow::anyhow!("{what} task failed: {e}")),
    }
}

/// Waits for a shutdown request or an API failure, then stops both APIs
/// and waits for them (bounded by [`DRAIN_TIMEOUT`]).
async fn supervise(
    shutdown: impl Future<Output = ()> + Send + 'static,
    stop: Arc<watch::Sender<bool>>,
    mut stop_rx: watch::Receiver<bool>,
    mut node_task: JoinHandle<Result<(), crate::node::NodeApiError>>,
    mut admin_task: ApiTask,
    mut http_task: ApiTask,
) -> anyhow::Result<()> {
    let mut node_done = None;
    let mut admin_done = None;
    let mut http_done = None;
    tokio::select! {
        () = shutdown => tracing::info!("shutdown requested"),
        _ = stop_rx.wait_for(|s| *s) => tracing::info!("shutdown requested"),
        r = &mut node_task => node_done = Some(outcome("node API", r).and_then(|()| Err(anyhow::anyhow!("node API stopped unexpectedly")))),
        r = &mut admin_task => admin_done = Some(outcome("admin API", r).and_then(|()| Err(anyhow::anyhow!("admin API stopped unexpectedly")))),
        r = &mut http_task => http_done = Some(outcome("public HTTP", r).and_then(|()| Err(anyhow::anyhow!("public HTTP listener stopped unexpectedly")))),
    }
    let _ = stop.send(true);
    let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    if node_done.is_none() {
        node_done = Some(
            match tokio::time::timeout_at(deadline, &mut node_task).await {
                Ok(r) => outcome("node API", r),
                Err(_) => {
                    tracing::warn!("node API connections did not close in time; closing them");
                    node_task.abort();
                    Ok(())
                }
            },
        );
    }
    if admin_done.is_none() {
        admin_done = Some(
            match tokio::time::timeout_at(deadline, &mut admin_task).await {
                Ok(r) => outcome("admin API", r),
                Err(_) => {
                    tracing::warn!("admin API connections did not close in time; closing them");
                    admin_task.abort();
                    Ok(())
                }
            },
        );
    }
    if http_done.is_none() {
        http_done = Some(
            match tokio::time::timeout_at(deadline, &mut http_task).await {
                Ok(r) => outcome("public HTTP", r),
                Err(_) => {
                    http_task.abort();
                    Ok(())
                }
            },
        );
    }
    let result = node_done
        .unwrap_or(Ok(()))
        .and(admin_done.unwrap_or(Ok(())))
        .and(http_done.unwrap_or(Ok(())));
    match &result {
        Ok(()) => tracing::info!("server stopped"),
        Err(e) => tracing::error!(error = format!("{e:#}"), "server stopped after a failure"),
    }
    result
}

async fn prune_join_tokens(state: Arc<ServerState>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep(PRUNE_EVERY) => {}
        }
        let s = Arc::clone(&state);
        match tokio::task::spawn_blocking(move || s.store.prune_join_tokens(s.now())).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(count = n, "deleted expired join tokens"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot delete expired join tokens"),
            Err(e) => tracing::warn!(error = %e, "join token pruning task failed"),
        }
    }
}

/// Prunes records of expired credentials and keeps the CRLs fresh: every
/// minute (or quarter of `crl_ttl`), and as soon as a revoked credential
/// expires, so that it leaves the CRLs on time.
async fn prune_revocations(state: Arc<ServerState>, mut stop: watch::Receiver<bool>) {
    let every = PRUNE_REVOCATIONS_EVERY
        .min(Duration::from_secs(state.config.crl_ttl.as_secs() / 4).max(Duration::from_secs(1)));
    let mut events = state.subscribe();
    let mut periodic = tokio::time::Instant::now() + every;
    loop {
        let deadline = match state.next_revocation_expiry() {
            Some(at) => {
                // A little after the expiry, so that it has surely passed.
                let left = Duration::try_from(at - state.now()).unwrap_or(Duration::ZERO)
                    + Duration::from_millis(200);
                periodic.min(tokio::time::Instant::now() + left)
            }
            None => periodic,
        };
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            () = tokio::time::sleep_until(deadline) => {}
            // A new revocation may expire sooner: recompute the deadline.
            ev = events.recv() => match ev {
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                _ => continue,
            },
        }
        if tokio::time::Instant::now() >= periodic {
            periodic = tokio::time::Instant::now() + every;
        }
        let s = Arc::clone(&state);
        match tokio::task::spawn_blocking(move || s.prune_revocations()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot prune revocations or re-sign the CRLs");
                // Do not spin on a failing store.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => tracing::warn!(error = %e, "revocation pruning task failed"),
        }
    }
}

/// Creates `dir` (and parents) owner-only, or tightens an existing one.
pub(crate) fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating the data directory {}", dir.display()))?;
    let mode = fs::metadata(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        tracing::warn!(dir = %dir.display(), mode = format!("{:o}", mode & 0o777), "data directory was accessible to others; setting it to 0700");
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("setting the mode of {}", dir.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_writes_the_bundle_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServerConfig::development();
        config.data_dir = dir.path().join("data");
        config.bind_address = "127.0.0.1:0".parse().unwrap();
        config.http_address = "127.0.0.1:0".parse().unwrap();
        config.admin_socket_path = dir.path().join("admin.sock");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = run(config, async move {
            let _ = rx.await;
        })
        .await
        .unwrap();
        assert_ne!(server.node_addr().port(), 0);
        let mode = fs::metadata(dir.path().join("data"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let pem_text = fs::read_to_string(server.bundle_path()).unwrap();
        let certs = pem::parse_many(&pem_text).unwrap();
        assert_eq!(certs.len(), 1);
        let authorities = server.state().authorities.snapshot();
        assert_eq!(
            certs[0].contents(),
            authorities.active_x509().unwrap().1.cert_der()
        );
        tokio::net::TcpStream::connect(server.node_addr())
            .await
            .unwrap();
        tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(15), server.wait())
            .await
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn a_busy_address_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut config = ServerConfig::development();
        config.data_dir = dir.path().to_owned();
        config.bind_address = taken.local_addr().unwrap();
        config.http_address = "127.0.0.1:0".parse().unwrap();
        config.admin_socket_path = dir.path().join("admin.sock");
        let err = run(config, std::future::pending()).await.unwrap_err();
        assert!(format!("{err:#}").contains("cannot listen on"), "{err:#}");
    }
}
