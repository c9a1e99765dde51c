//! `[server.node_attestors.k8s_psat]` and `[server.k8s_bundle]`: as written
//! (raw) and validated.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use mayfly::k8s_psat::{ClusterName, DEFAULT_AUDIENCE, ServiceAccount, is_dns_label};
use mayfly::template::{DEFAULT_PATH, IdentityTemplate, NamespaceGlob};
use mayfly::ttl::Ttl;
use serde::Deserialize;

use crate::config::ConfigError;

const CLUSTERS_KEY: &str = "server.node_attestors.k8s_psat.clusters";
const BUNDLE_KEY: &str = "server.k8s_bundle";

/// Namespaces the default pod identity template leaves out.
pub const DEFAULT_EXCLUDED_NAMESPACES: [&str; 3] =
    ["kube-system", "kube-public", "kube-node-lease"];

/// `[server.node_attestors.k8s_psat]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawK8sPsat {
    /// `[server.node_attestors.k8s_psat.clusters.<name>]`.
    #[serde(default)]
    pub clusters: BTreeMap<String, RawCluster>,
}

/// One cluster as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    /// `namespace:name` of the service accounts agents run as.
    pub service_account_allow_list: Option<Vec<String>>,
    /// The audience agent tokens must be bound to; default `mayfly-server`.
    pub audience: Option<String>,
    /// A kubeconfig for this cluster's API; in-cluster credentials otherwise.
    pub kubeconfig_path: Option<PathBuf>,
    /// Node label keys that become `agent_node_label` selectors.
    pub allowed_node_label_keys: Option<Vec<String>>,
    /// Agent pod label keys that become `agent_pod_label` selectors.
    pub allowed_pod_label_keys: Option<Vec<String>>,
    /// Automatic pod identities; one default template when absent, none when `[]`.
    pub pod_identities: Option<Vec<RawPodIdentity>>,
}

/// One `[[...pod_identities]]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPodIdentity {
    /// Namespace globs covered; default all.
    pub namespaces: Option<Vec<String>>,
    /// Namespace globs never covered.
    pub exclude_namespaces: Option<Vec<String>>,
    /// SPIFFE ID path template; default `ns/{namespace}/sa/{service_account}`.
    pub path: Option<String>,
    /// X.509-SVID lifetime of derived entries; the server default otherwise.
    pub x509_svid_ttl: Option<String>,
    /// JWT-SVID lifetime of derived entries; the server default otherwise.
    pub jwt_svid_ttl: Option<String>,
}

/// `[server.k8s_bundle]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawK8sBundle {
    /// Namespace of the ConfigMap.
    pub namespace: Option<String>,
    /// Name of the ConfigMap.
    pub configmap: Option<String>,
    /// Key the PEM bundle is written under; default `bundle.pem`.
    pub key: Option<String>,
    /// A kubeconfig; in-cluster credentials otherwise.
    pub kubeconfig_path: Option<PathBuf>,
}

/// One cluster, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// Its name (agents name it in their evidence).
    pub name: ClusterName,
    /// Service accounts agents may run as.
    pub service_account_allow_list: BTreeSet<ServiceAccount>,
    /// The audience tokens must be bound to.
    pub audience: String,
    /// Kubeconfig, or `None` for in-cluster credentials.
    pub kubeconfig_path: Option<PathBuf>,
    /// Node label keys that become selectors.
    pub allowed_node_label_keys: BTreeSet<String>,
    /// Agent pod label keys that become selectors.
    pub allowed_pod_label_keys: BTreeSet<String>,
    /// Automatic pod identity templates (ids `k8s.<cluster>.<index>`).
    pub pod_identities: Vec<IdentityTemplate>,
}

/// The `k8s_psat` attestor, validated: at least one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sPsatConfig {
    /// The clusters by name.
    pub clusters: BTreeMap<ClusterName, ClusterConfig>,
}

impl K8sPsatConfig {
    /// The cluster named `name`.
    pub fn cluster(&self, name: &str) -> Option<&ClusterConfig> {
        self.clusters
            .iter()
            .find(|(n, _)| n.as_str() == name)
            .map(|(_, c)| c)
    }
}

/// Where the trust bundle is published in Kubernetes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sBundleConfig {
    /// Namespace.
    pub namespace: String,
    /// ConfigMap name.
    pub configmap: String,
    /// Data key.
    pub key: String,
    /// Kubeconfig, or `None` for in-cluster credentials.
    pub kubeconfig_path: Option<PathBuf>,
}

/// Validates `[server.node_attestors.k8s_psat]`.
pub fn k8s_psat(raw: RawK8sPsat, path: &Path) -> Result<K8sPsatConfig, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        path: path.to_owned(),
        key: CLUSTERS_KEY,
        message,
    };
    if raw.clusters.is_empty() {
        return Err(invalid(
            "needs at least one cluster: [server.node_attestors.k8s_psat.clusters.<name>] \
             (remove the k8s_psat table to disable the attestor)"
                .into(),
        ));
    }
    let mut clusters = BTreeMap::new();
    for (name, c) in raw.clusters {
        let cluster: ClusterName = name.parse().map_err(|e| invalid(format!("{e}")))?;
        let at = |what: &str, message: String| invalid(format!("{name}.{what}: {message}"));
        let allow = c.service_account_allow_list.unwrap_or_default();
        if allow.is_empty() {
            return Err(at(
                "service_account_allow_list",
                "is required: the namespace:name of the service account the agents run as".into(),
            ));
        }
        let service_account_allow_list = allow
            .iter()
            .map(|s| s.parse::<ServiceAccount>())
            .collect::<Result<_, _>>()
            .map_err(|e| at("service_account_allow_list", e))?;
        let audience = c.audience.unwrap_or_else(|| DEFAULT_AUDIENCE.into());
        if audience.trim().is_empty() {
            return Err(at("audience", "must not be empty".into()));
        }
        let templates = match c.pod_identities {
            None => vec![RawPodIdentity::default()],
            Some(v) => v,
        };
        let mut pod_identities = Vec::new();
        for (i, t) in templates.into_iter().enumerate() {
            let key = format!("pod_identities[{i}]");
            let globs = |v: Vec<String>| {
                v.iter()
                    .map(|g| g.parse::<NamespaceGlob>())
                    .collect::<Result<Vec<_>, _>>()
            };
            let namespaces =
                globs(t.namespaces.unwrap_or_default()).map_err(|e| at(&key, e.to_string()))?;
            let exclude = match t.exclude_namespaces {
                Some(v) => globs(v),
                None => globs(DEFAULT_EXCLUDED_NAMESPACES.map(String::from).to_vec()),
            }
            .map_err(|e| at(&key, e.to_string()))?;
            let ttl = |v: Option<String>, what: &str| -> Result<Option<Ttl>, ConfigError> {
                v.map(|s| s.parse::<Ttl>())
                    .transpose()
                    .map_err(|e| at(&format!("{key}.{what}"), e.to_string()))
            };
            let template = IdentityTemplate::new(
                &format!("k8s.{cluster}.{i}"),
                t.path.as_deref().unwrap_or(DEFAULT_PATH),
                namespaces,
                exclude,
                ttl(t.x509_svid_ttl, "x509_svid_ttl")?,
                ttl(t.jwt_svid_ttl, "jwt_svid_ttl")?,
            )
            .map_err(|e| at(&key, e.to_string()))?;
            pod_identities.push(template);
        }
        clusters.insert(
            cluster.clone(),
            ClusterConfig {
                name: cluster,
                service_account_allow_list,
                audience,
                kubeconfig_path: c.kubeconfig_path,
                allowed_node_label_keys: c
                    .allowed_node_label_keys
                    .unwrap_or_default()
                    .into_iter()
                    .collect(),
                allowed_pod_label_keys: c
                    .allowed_pod_label_keys
                    .unwrap_or_default()
                    .into_iter()
                    .collect(),
                pod_identities,
            },
        );
    }
    Ok(K8sPsatConfig { clusters })
}

/// Validates `[server.k8s_bundle]`.
pub fn k8s_bundle(raw: RawK8sBundle, path: &Path) -> Result<K8sBundleConfig, ConfigError> {
    let invalid = |message: String| ConfigError::Invalid {
        path: path.to_owned(),
        key: BUNDLE_KEY,
        message,
    };
    let namespace = raw
        .namespace
        .ok_or_else(|| invalid("namespace is required".into()))?;
    if !is_dns_label(&namespace) {
        return Err(invalid(format!(
            "namespace {namespace:?} is not a Kubernetes namespace name"
        )));
    }
    let configmap = raw
        .configmap
        .ok_or_else(|| invalid("configmap is required (the ConfigMap's name)".into()))?;
    if !mayfly::k8s_psat::is_dns_subdomain(&configmap) {
        return Err(invalid(format!(
            "configmap {configmap:?} is not a Kubernetes object name"
        )));
    }
    let key = raw.key.unwrap_or_else(|| "bundle.pem".into());
    if key.is_empty()
        || key.len() > 253
        || !key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(invalid(format!(
            "key {key:?} must be letters, digits, '-', '_' or '.' (a ConfigMap data key)"
        )));
    }
    Ok(K8sBundleConfig {
        namespace,
        configmap,
        key,
        kubeconfig_path: raw.kubeconfig_path,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn parse(text: &str) -> Result<K8sPsatConfig, ConfigError> {
        #[derive(Deserialize)]
        struct W {
            k8s_psat: RawK8sPsat,
        }
        let w: W = toml::from_str(text).unwrap();
        k8s_psat(w.k8s_psat, Path::new("s.toml"))
    }

    #[test]
    fn a_cluster_with_defaults() {
        let c =
            parse("[k8s_psat.clusters.prod]\nservice_account_allow_list = [\"mayfly:agent\"]\n")
                .unwrap();
        let p = c.cluster("prod").unwrap();
        assert_eq!(p.audience, "mayfly-server");
        assert_eq!(p.kubeconfig_path, None);
        assert_eq!(p.pod_identities.len(), 1);
        let t = &p.pod_identities[0];
        assert_eq!(t.id(), "k8s.prod.0");
        assert_eq!(t.path(), DEFAULT_PATH);
        assert!(t.covers("payments") && !t.covers("kube-system"));
    }

    #[test]
    fn templates_can_be_configured_or_turned_off() {
        let c = parse(
            "[k8s_psat.clusters.prod]\nservice_account_allow_list = [\"mayfly:agent\"]\npod_identities = []\n",
        )
        .unwrap();
        assert!(c.cluster("prod").unwrap().pod_identities.is_empty());
        let c = parse(
            "[k8s_psat.clusters.prod]\nservice_account_allow_list = [\"mayfly:agent\"]\n\
             [[k8s_psat.clusters.prod.pod_identities]]\nnamespaces = [\"team-*\"]\nexclude_namespaces = []\n\
             path = \"k8s/prod/{namespace}/{service_account}\"\nx509_svid_ttl = \"10m\"\n",
        )
        .unwrap();
        let t = &c.cluster("prod").unwrap().pod_identities[0];
        assert!(t.covers("team-a") && !t.covers("default"));
    }

    #[test]
    fn mistakes_are_named() {
        for (text, needle) in [
            ("[k8s_psat]\n", "at least one cluster"),
            ("[k8s_psat.clusters.prod]\n", "service_account_allow_list"),
            (
                "[k8s_psat.clusters.Prod]\nservice_account_allow_list = [\"a:b\"]\n",
                "DNS label",
            ),
            (
                "[k8s_psat.clusters.prod]\nservice_account_allow_list = [\"agent\"]\n",
                "namespace:name",
            ),
            (
                "[k8s_psat.clusters.prod]\nservice_account_allow_list = [\"a:b\"]\n[[k8s_psat.clusters.prod.pod_identities]]\npath = \"x/{service_account}\"\n",
                "pod_identities[0]",
            ),
            (
                "[k8s_psat.clusters.prod]\nservice_account_allow_list = [\"a:b\"]\n[[k8s_psat.clusters.prod.pod_identities]]\nnamespaces = [\"A\"]\n",
                "namespace pattern",
            ),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn bundle_publication() {
        let b = k8s_bundle(
            RawK8sBundle {
                namespace: Some("mayfly".into()),
                configmap: Some("mayfly-bundle".into()),
                ..Default::default()
            },
            Path::new("s.toml"),
        )
        .unwrap();
        assert_eq!(b.key, "bundle.pem");
        assert!(k8s_bundle(RawK8sBundle::default(), Path::new("s.toml")).is_err());
        assert!(
            k8s_bundle(
                RawK8sBundle {
                    namespace: Some("mayfly".into()),
                    configmap: Some("b".into()),
                    key: Some("a/b".into()),
                    ..Default::default()
                },
                Path::new("s.toml")
            )
            .is_err()
        );
    }
}
