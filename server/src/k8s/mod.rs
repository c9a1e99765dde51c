//! Kubernetes: the API clients of the configured clusters, the `k8s_psat`
//! review (TokenReview, pod and node lookups) and the trust bundle
//! publication to a ConfigMap.
//!
//! - [`config`]: `[server.node_attestors.k8s_psat]` and `[server.k8s_bundle]`;
//! - [`review`]: from a projected service account token to the node's facts;
//! - [`bundle`]: keeps a ConfigMap holding the trust bundle (PEM) current.

pub mod bundle;
pub mod config;
pub mod review;

use std::collections::BTreeMap;
use std::path::Path;

use kube::config::{KubeConfigOptions, Kubeconfig};
use mayfly::k8s_psat::ClusterName;

pub use config::{ClusterConfig, K8sBundleConfig, K8sPsatConfig};

/// Why the Kubernetes API could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum K8sError {
    /// The client configuration (kubeconfig or in-cluster credentials) is
    /// unusable.
    #[error("Kubernetes API client for {what}: {message}")]
    Config {
        /// The cluster or purpose.
        what: String,
        /// What failed.
        message: String,
    },
    /// A call failed (network, TLS, HTTP status other than 404).
    #[error("Kubernetes API call {call} failed: {message}")]
    Api {
        /// The call (`TokenReview`, `get pod ns/name`, ...).
        call: String,
        /// What failed.
        message: String,
    },
}

/// A client for the API of one cluster: from `kubeconfig` (its current
/// context) or, when `None`, the in-cluster service account credentials.
pub async fn client(kubeconfig: Option<&Path>, what: &str) -> Result<kube::Client, K8sError> {
    let err = |message: String| K8sError::Config {
        what: what.to_owned(),
        message,
    };
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .map_err(|e| err(format!("reading {}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| err(format!("{}: {e}", path.display())))?
        }
        None => kube::Config::incluster().map_err(|e| {
            err(format!(
                "no in-cluster credentials ({e}); outside a cluster, set kubeconfig_path"
            ))
        })?,
    };
    kube::Client::try_from(config).map_err(|e| err(e.to_string()))
}

/// The API clients of the `k8s_psat` clusters, made once at start.
#[derive(Clone, Default)]
pub struct Clusters {
    clients: BTreeMap<ClusterName, (ClusterConfig, kube::Client)>,
}

impl std::fmt::Debug for Clusters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clusters")
            .field("clusters", &self.clients.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Clusters {
    /// Clients for every configured cluster (none when `k8s_psat` is off).
    /// Fails on an unusable kubeconfig or missing in-cluster credentials,
    /// so that a misconfiguration stops the server at start.
    pub async fn connect(config: Option<&K8sPsatConfig>) -> Result<Self, K8sError> {
        let mut clients = BTreeMap::new();
        for (name, c) in config.map(|c| &c.clusters).into_iter().flatten() {
            let client = client(c.kubeconfig_path.as_deref(), &format!("cluster {name}")).await?;
            clients.insert(name.clone(), (c.clone(), client));
        }
        Ok(Self { clients })
    }

    /// The configuration and client of cluster `name`.
    pub fn get(&self, name: &str) -> Option<(&ClusterConfig, &kube::Client)> {
        self.clients
            .iter()
            .find(|(n, _)| n.as_str() == name)
            .map(|(_, (c, k))| (c, k))
    }

    /// Whether no cluster is configured.
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }
}
