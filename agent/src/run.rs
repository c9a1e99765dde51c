//! `mayfly-agent run`: loads the stored state, attests when there is no
//! valid stored SVID (a restart needs no new join token while the SVID is
//! valid), then runs the sync task, the health endpoints and the Workload
//! API until shutdown. Usable in-process: it never exits the process.

use std::future::Future;
use std::sync::Arc;

use anyhow::{Context as _, bail};
use mayfly::clock::{Clock, SystemClock};
use tokio::sync::watch;
use zeroize::Zeroizing;

use crate::attest::{JoinToken, JoinTokenAttestor, K8sPsatAttestor, NodeAttestor, X509PopAttestor};
use crate::cache::Cache;
use crate::client::tls::TrustAnchors;
use crate::client::{ServerClient, TlsTransport};
use crate::config::{AgentConfig, NodeAttestorConfig};
use crate::health::{self, HealthState, OPERATOR_ACTION};
use crate::storage::{self, Storage};
use crate::sync::{self, Backoff, Syncer};
use crate::task::{PidfdWatcher, PodWatcher, TaskWatcher, TaskWatchers, Tasks};
use crate::workload::K8sAttestor;
use crate::workload::kubelet::{KubeletClient, PodLists};

/// The environment variable that carries a join token.
pub const JOIN_TOKEN_ENV: &str = "MAYFLY_JOIN_TOKEN";

/// Runs the agent until `shutdown` completes. `join_token` is the
/// `--join-token` flag; without it `MAYFLY_JOIN_TOKEN`, then the config
/// file's `join_token`, is used. The token is used only when there is no
/// valid stored agent SVID, or when the server rejects the stored one.
pub async fn run(
    config: AgentConfig,
    join_token: Option<Zeroizing<String>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    crate::logging::init(&config.log_level, config.log_format);
    // Each Workload API client holds a connection and each task a pidfd.
    match crate::limits::raise_open_files_limit() {
        Ok(l) if l.before != l.now => {
            tracing::info!(from = ?l.before, to = ?l.now, "raised the open-file limit to its hard limit");
        }
        Ok(l) => tracing::debug!(soft = ?l.now, hard = ?l.hard, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "keeping the open-file limit"),
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    let watcher = {
        let stop_tx = stop_tx.clone();
        tokio::spawn(async move {
            shutdown.await;
            stop_tx.send_replace(true);
        })
    };
    let result = run_until(config, join_token, stop_tx.clone(), stop_rx).await;
    stop_tx.send_replace(true);
    watcher.abort();
    result
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    sync::stop_requested(&mut rx).await;
}

/// Picks the join token: the flag, then the environment, then the file.
fn resolve_join_token(flag: Option<Zeroizing<String>>, config: &AgentConfig) -> Option<JoinToken> {
    if let Some(t) = flag.and_then(JoinToken::new) {
        tracing::debug!("join token from the command line");
        return Some(t);
    }
    if let Some(t) = std::env::var(JOIN_TOKEN_ENV)
        .ok()
        .and_then(|v| JoinToken::new(Zeroizing::new(v)))
    {
        tracing::debug!("join token from {JOIN_TOKEN_ENV}");
        return Some(t);
    }
    config.join_token.clone()
}

async fn run_until(
    config: AgentConfig,
    join_token: Option<Zeroizing<String>>,
    stop_tx: Arc<watch::Sender<bool>>,
    stop_rx: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let td = config.trust_domain.clone();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    // Built first, so that a wrong [agent.k8s] stops the agent before it attests.
    let (attestors, watcher) = workload_attestors(&config)?;
    let storage = Storage::open(&config.data_dir).context("agent data directory")?;
    let stored_bundle = storage.load_bundle(&td).context(
        "the stored trust bundle is unreadable; fix or delete it and restart with trust_bundle_path set",
    )?;
    config.check_bootstrap_trust(stored_bundle.is_some())?;

    let mut anchors_der = stored_bundle
        .as_ref()
        .map(|b| b.x509_authorities.clone())
        .unwrap_or_default();
    if let Some(path) = &config.trust_bundle_path {
        let certs = match storage::read_pem_certificates(path) {
            Ok(certs) => certs,
            // The stored bundle (kept current by the server) is enough.
            Err(e) if stored_bundle.is_some() && bundle_not_there_yet(path) => {
                tracing::warn!(error = %e, "agent.trust_bundle_path is not readable; using the stored trust bundle");
                Vec::new()
            }
            // In Kubernetes the server publishes the bundle into a ConfigMap
            // the agent mounts; on a first install the agent may start first.
            Err(_) if bundle_not_there_yet(path) => {
                match wait_for_bundle_file(path, stop_rx.clone()).await {
                    Some(certs) => certs,
                    None => return Ok(()),
                }
            }
            Err(e) => return Err(e).context("agent.trust_bundle_path"),
        };
        for der in certs {
            if !anchors_der.contains(&der) {
                anchors_der.push(der);
            }
        }
    }
    let anchors = TrustAnchors::new(anchors_der);
    let client = ServerClient::new(
        td.clone(),
        Arc::new(TlsTransport::new(&config, anchors.clone())),
    );
    let cache = Cache::new();
    if let Some(b) = stored_bundle {
        let b = Arc::new(b);
        cache.update(|s| s.bundle = Some(b));
    }

    let attestor: Option<Arc<dyn NodeAttestor>> = match &config.node_attestor {
        NodeAttestorConfig::JoinToken => resolve_join_token(join_token, &config)
            .map(|t| Arc::new(JoinTokenAttestor::new(t)) as Arc<dyn NodeAttestor>),
        NodeAttestorConfig::X509Pop {
            certificate_path,
            private_key_path,
        } => {
            if join_token.is_some() {
                tracing::warn!("ignoring --join-token: agent.node_attestor is x509pop");
            }
            Some(Arc::new(X509PopAttestor::new(
                certificate_path.clone(),
                private_key_path.clone(),
            )))
        }
        NodeAttestorConfig::K8sPsat {
            cluster,
            token_path,
        } => {
            if join_token.is_some() {
                tracing::warn!("ignoring --join-token: agent.node_attestor is k8s_psat");
            }
            Some(Arc::new(K8sPsatAttestor::new(
                cluster.clone(),
                token_path.clone(),
            )))
        }
    };
    // A re-attestable attestor is always available: for step-up, for
    // renewal (by proving again) and for recovery.
    let reattestable = attestor.clone().filter(|a| a.can_reattest());
    if let Some(a) = &reattestable {
        client.set_reattester(Arc::new(sync::Reenroll::new(
            storage.clone(),
            anchors.clone(),
            cache.clone(),
            Arc::clone(a),
        )));
    }
    let stored = match storage.load_agent_svid() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "ignoring the stored agent SVID");
            None
        }
    };
    let now = clock.now();
    let ours =
        stored.filter(|s| s.spiffe_id.is_member_of(&td) && mayfly::id::is_agent_id(&s.spiffe_id));
    let (reusable, expired) = match ours {
        Some(s) if s.is_valid_at(now) => (Some(s), None),
        Some(s) => {
            tracing::info!(
                agent_id = %s.spiffe_id,
                expires_at = %s.expires_at,
                "the stored agent SVID has expired"
            );
            (None, Some(s))
        }
        None => (None, None),
    };
    let recovery = match reusable {
        Some(svid) => {
            if anchors.is_empty() {
                bail!(
                    "a stored agent SVID exists but no trust bundle is stored in {}: set \
                     agent.trust_bundle_path to the server's CA certificates \
                     (`mayfly-server bundle show --format pem`)",
                    config.data_dir.display()
                );
            }
            tracing::info!(
                agent_id = %svid.spiffe_id,
                expires_at = %svid.expires_at,
                "reusing the stored agent SVID; no attestation needed"
            );
            client.set_identity(svid);
            // A token given anyway is kept for the case the server rejects
            // the stored identity.
            attestor
        }
        None if attestor.is_none() && expired.is_some() => {
            // An enrolled join-token agent whose SVID expired while it was down: it cannot
            // attest again by itself. It keeps running in that state (health endpoints and
            // `healthcheck` say what to do, the Workload API answers Unavailable) rather than
            // exit, so that supervisors do not restart it in a loop and the reason stays
            // visible; a restart with --join-token recovers.
            if let Some(svid) = expired {
                tracing::error!(
                    agent_id = %svid.spiffe_id,
                    operator_action = OPERATOR_ACTION,
                    "{}",
                    health::expired_join_token_message(svid.expires_at)
                );
                client.set_identity(svid);
            }
            None
        }
        None => {
            let Some(attestor) = attestor else {
                bail!(
                    "the agent has no valid SVID and no join token: create one with \
                     `mayfly-server token generate` and pass it with --join-token or {JOIN_TOKEN_ENV}"
                );
            };
            if !attest_until_done(
                &client,
                &storage,
                &anchors,
                &cache,
                attestor.as_ref(),
                stop_rx.clone(),
            )
            .await?
            {
                return Ok(());
            }
            None
        }
    };
    let recovery = recovery.or(reattestable);

    let health_listener = health::bind(config.health_address)
        .await
        .with_context(|| format!("agent.health_address {}", config.health_address))?;
    let syncer = Syncer::new(
        client.clone(),
        cache.clone(),
        storage.clone(),
        anchors.clone(),
        clock.clone(),
        recovery,
    );
    let sync_task = tokio::spawn(syncer.run(stop_rx.clone()));
    let health_task = tokio::spawn(health::serve(
        health_listener,
        HealthState {
            client: client.clone(),
            cache: cache.clone(),
            clock: clock.clone(),
        },
        stopped(stop_rx.clone()),
    ));
    let client = Arc::new(client);
    let tasks = Tasks::new(
        cache.clone(),
        watcher,
        client.clone(),
        &config.data_dir,
        clock.clone(),
    )
    .context("agent data directory")?;
    let tasks_task = tokio::spawn(tasks.clone().run(stop_rx.clone()));
    let minter: Arc<dyn crate::api::JwtMinter> = client;
    let api = crate::api::WorkloadApi::new(cache, Arc::new(attestors), minter, td)
        .with_clock(clock)
        .with_tasks(tasks);
    let served = crate::api::serve_api(&config.socket_path, api, stopped(stop_rx.clone())).await;
    // The Workload API ended (shutdown or failure): stop the rest.
    stop_tx.send_replace(true);
    if let Err(e) = sync_task.await {
        tracing::warn!(error = %e, "sync task ended abnormally");
    }
    if let Err(e) = tasks_task.await {
        tracing::warn!(error = %e, "task reporter ended abnormally");
    }
    match health_task.await {
        Ok(Err(e)) => tracing::warn!(error = %e, "health endpoints failed"),
        Err(e) => tracing::warn!(error = %e, "health task ended abnormally"),
        Ok(Ok(())) => {}
    }
    tracing::info!("agent stopped");
    served
}

/// The workload attestors and the task watcher: `unix` and `systemd` with processes as tasks,
/// plus `k8s` with pods as tasks when `[agent.k8s]` is set.
fn workload_attestors(
    config: &AgentConfig,
) -> anyhow::Result<(crate::workload::Attestors, Arc<dyn TaskWatcher>)> {
    let attestors = crate::workload::Attestors::host_defaults();
    let processes: Arc<dyn TaskWatcher> = Arc::new(PidfdWatcher::new());
    let Some(k8s) = &config.k8s else {
        return Ok((attestors, processes));
    };
    let kubelet = KubeletClient::new(k8s).context("agent.k8s")?;
    let pods = Arc::new(PodLists::new(Arc::new(kubelet)));
    let attestors = attestors.with(Arc::new(
        K8sAttestor::new(pods.clone(), k8s.max_poll_attempts, k8s.poll_retry_interval)
            .with_node_name(k8s.node_name.clone()),
    ));
    let watcher = TaskWatchers::new(vec![processes, Arc::new(PodWatcher::new(pods))]);
    tracing::info!(
        kubelet_url = %k8s.kubelet_url,
        node_name = k8s.node_name.as_deref().unwrap_or(""),
        "k8s workload attestor enabled; pods are tasks"
    );
    Ok((attestors, Arc::new(watcher)))
}

/// Attests, retrying with backoff while the server is unreachable. Returns
/// false when shutdown came first; a refusal (bad token) is an error.
async fn attest_until_done(
    client: &ServerClient,
    storage: &Storage,
    anchors: &TrustAnchors,
    cache: &Cache,
    attestor: &dyn NodeAttestor,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<bool> {
    let mut backoff = Backoff::new(sync::BACKOFF_MIN, sync::BACKOFF_MAX);
    loop {
        let attempt = tokio::select! {
            () = sync::stop_requested(&mut stop) => return Ok(false),
            r = sync::enroll(client, storage, anchors, cache, attestor) => r,
        };
        let err = match attempt {
            Ok(()) => return Ok(true),
            Err(e) => e,
        };
        let unreachable = err
            .downcast_ref::<crate::client::ClientError>()
            .is_some_and(crate::client::ClientError::is_unavailable);
        if !unreachable {
            let hint = match attestor.name() {
                mayfly::x509pop::NAME => {
                    "check the node certificate and key files and that the server trusts their \
                     CA (server.node_attestors.x509pop.ca_bundle_path)"
                }
                mayfly::k8s_psat::NAME => {
                    "check that agent.k8s_psat.cluster names a cluster configured on the server, \
                     that the projected token requests the server's audience, and that the \
                     agent's service account is in that cluster's service_account_allow_list"
                }
                _ => {
                    "if the join token was used or has expired, create a new one with \
                     `mayfly-server token generate`"
                }
            };
            return Err(err.context(format!(
                "node attestation ({}) failed; {hint}",
                attestor.name()
            )));
        }
        let delay = backoff.next_delay(rand::random());
        tracing::warn!(error = %err, retry_in = ?delay, "cannot reach the server to attest; retrying");
        tokio::select! {
            () = sync::stop_requested(&mut stop) => return Ok(false),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Whether the bootstrap bundle file is missing or empty (not yet written),
/// as opposed to present and wrong.
fn bundle_not_there_yet(path: &std::path::Path) -> bool {
    match std::fs::metadata(path) {
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
        Ok(m) => m.len() == 0,
    }
}

/// How often a missing bootstrap bundle file is looked for.
const BUNDLE_WAIT_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Waits until `path` holds certificates (or stop is requested: `None`),
/// saying so once: a first install in Kubernetes starts agents before the
/// server has published its bundle.
async fn wait_for_bundle_file(
    path: &std::path::Path,
    mut stop: watch::Receiver<bool>,
) -> Option<Vec<Vec<u8>>> {
    tracing::warn!(
        path = %path.display(),
        "waiting for the trust bundle file (agent.trust_bundle_path) to appear; in Kubernetes the \
         server publishes it to the ConfigMap this file is mounted from"
    );
    loop {
        match storage::read_pem_certificates(path) {
            Ok(certs) => {
                tracing::info!(path = %path.display(), certificates = certs.len(), "trust bundle file found");
                return Some(certs);
            }
            Err(e) if !bundle_not_there_yet(path) => {
                // Present but being written (or wrong): look again shortly;
                // a wrong file is reported each time.
                tracing::warn!(error = %e, "the trust bundle file is not usable yet");
            }
            Err(_) => {}
        }
        tokio::select! {
            () = sync::stop_requested(&mut stop) => return None,
            () = tokio::time::sleep(BUNDLE_WAIT_POLL) => {}
        }
    }
}
