//! Publishes the trust bundle (PEM, the X.509 authorities) into a
//! ConfigMap, so that agents in the cluster can mount it as their
//! `trust_bundle_path` for their first attestation. Written at start and
//! after every bundle change; a failed write is retried with back-off.
//!
//! The ConfigMap is merge-patched (only our key changes), and created when it
//! does not exist. RBAC needs `get`/`patch` on that ConfigMap (and `create`
//! on ConfigMaps in its namespace only if it is not created beforehand; the
//! Helm chart creates it).

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use tokio::sync::{broadcast, watch};

use super::{K8sBundleConfig, K8sError};
use crate::state::{ChangeEvent, ServerState};

/// The longest wait between two attempts after failures.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Writes `pem` under the configured key, creating the ConfigMap if needed.
pub async fn write(
    client: &kube::Client,
    cfg: &K8sBundleConfig,
    pem: &str,
) -> Result<(), K8sError> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &cfg.namespace);
    let call = |what: &str, e: kube::Error| K8sError::Api {
        call: format!("{what} configmap {}/{}", cfg.namespace, cfg.configmap),
        message: e.to_string(),
    };
    let patch = serde_json::json!({ "data": { cfg.key.as_str(): pem } });
    match api
        .patch(
            &cfg.configmap,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(cfg.configmap.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    ..Default::default()
                },
                data: Some([(cfg.key.clone(), pem.to_owned())].into()),
                ..Default::default()
            };
            api.create(&PostParams::default(), &cm)
                .await
                .map(|_| ())
                .map_err(|e| call("create", e))
        }
        Err(e) => Err(call("patch", e)),
    }
}

/// Keeps the ConfigMap current until `stop` turns true.
pub async fn run(
    state: Arc<ServerState>,
    client: kube::Client,
    cfg: K8sBundleConfig,
    mut stop: watch::Receiver<bool>,
) {
    let mut events = state.subscribe();
    let mut backoff = Duration::from_secs(1);
    loop {
        let pem = state.bundle_pem_text();
        match write(&client, &cfg, &pem).await {
            Ok(()) => {
                backoff = Duration::from_secs(1);
                tracing::info!(namespace = %cfg.namespace, configmap = %cfg.configmap, key = %cfg.key, "published the trust bundle to the ConfigMap");
                // Wait for the next bundle change.
                loop {
                    tokio::select! {
                        _ = stop.wait_for(|s| *s) => return,
                        ev = events.recv() => match ev {
                            Ok(ChangeEvent::Bundle) | Err(broadcast::error::RecvError::Lagged(_)) => break,
                            Ok(_) => {}
                            Err(broadcast::error::RecvError::Closed) => return,
                        },
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, "cannot publish the trust bundle to Kubernetes");
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
