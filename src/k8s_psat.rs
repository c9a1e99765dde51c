//! The parts of the `k8s_psat` node attestor that agent and server share: the
//! names, the agent ID, and the node selectors made from what the Kubernetes
//! API said about the agent's pod and node. Pure functions, no I/O; the
//! server does the TokenReview and the lookups.
//!
//! An agent presents a projected service account token of its own pod,
//! audience-bound to the server. The server asks the cluster (TokenReview)
//! whether the token is valid for that audience, which service account and
//! pod it belongs to, then reads the pod (for its node) and the node (for its
//! UID and labels). The agent's identity is its node:
//! `spiffe://<td>/mayfly/agent/k8s_psat/<cluster>/<node-uid>`.

use std::collections::BTreeMap;

use spiffe::SpiffeIdError;

use crate::selector::{Selector, SelectorSet};
use crate::{SpiffeId, TrustDomain};

/// The attestor's name on the wire, in agent IDs and as the selector type.
pub const NAME: &str = "k8s_psat";

/// The audience agents request for their token unless configured otherwise.
pub const DEFAULT_AUDIENCE: &str = "mayfly-server";

/// Why a cluster name or a reviewed identity was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum K8sPsatError {
    /// Not a DNS label (`[a-z0-9]([-a-z0-9]*[a-z0-9])?`, at most 63).
    #[error(
        "cluster name {0:?} must be a DNS label: lowercase letters, digits and '-', at most 63 \
         characters, starting and ending with a letter or digit"
    )]
    BadClusterName(String),
    /// The TokenReview's user name is not a service account's.
    #[error("the token belongs to {0:?}, not to a service account (system:serviceaccount:NS:NAME)")]
    NotAServiceAccount(String),
}

/// Whether `s` is a DNS-1123 label (namespaces, cluster names).
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Whether `s` is a DNS-1123 subdomain (service account and pod names).
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A cluster name as configured on the server and the agent: a DNS label,
/// so that it is a safe path segment of agent IDs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClusterName(String);

impl ClusterName {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for ClusterName {
    type Err = K8sPsatError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if is_dns_label(s) {
            Ok(Self(s.to_owned()))
        } else {
            Err(K8sPsatError::BadClusterName(s.to_owned()))
        }
    }
}

impl std::fmt::Display for ClusterName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A service account, `namespace:name`, as an allow list names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceAccount {
    /// Its namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl ServiceAccount {
    /// The service account a TokenReview's `status.user.username` names
    /// (`system:serviceaccount:<namespace>:<name>`).
    pub fn from_username(username: &str) -> Result<Self, K8sPsatError> {
        let bad = || K8sPsatError::NotAServiceAccount(username.to_owned());
        let rest = username
            .strip_prefix("system:serviceaccount:")
            .ok_or_else(bad)?;
        let (namespace, name) = rest.split_once(':').ok_or_else(bad)?;
        if !is_dns_label(namespace) || !is_dns_subdomain(name) {
            return Err(bad());
        }
        Ok(Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }
}

impl std::str::FromStr for ServiceAccount {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once(':') {
            Some((ns, name)) if is_dns_label(ns) && is_dns_subdomain(name) => Ok(Self {
                namespace: ns.to_owned(),
                name: name.to_owned(),
            }),
            _ => Err(format!(
                "{s:?} must be written namespace:name (for example mayfly:mayfly-agent)"
            )),
        }
    }
}

impl std::fmt::Display for ServiceAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.namespace, self.name)
    }
}

/// What the cluster said about an agent: from the TokenReview, the pod and
/// the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts {
    /// The cluster, as configured.
    pub cluster: ClusterName,
    /// The agent's service account.
    pub service_account: ServiceAccount,
    /// The agent's pod name.
    pub pod_name: String,
    /// The agent's pod UID.
    pub pod_uid: String,
    /// The node the pod runs on.
    pub node_name: String,
    /// The node's UID.
    pub node_uid: String,
    /// The node's labels whose keys are allowed to become selectors.
    pub node_labels: BTreeMap<String, String>,
    /// The pod's labels whose keys are allowed to become selectors.
    pub pod_labels: BTreeMap<String, String>,
}

impl NodeFacts {
    /// `spiffe://<td>/mayfly/agent/k8s_psat/<cluster>/<node-uid>`: one
    /// identity per node, whichever agent pod runs there.
    pub fn agent_id(&self, td: &TrustDomain) -> Result<SpiffeId, SpiffeIdError> {
        crate::id::agent_id(td, NAME, &[self.cluster.as_str(), self.node_uid.as_str()])
    }

    /// The node selectors, spelled as SPIRE spells them:
    /// `k8s_psat:cluster:<name>`, `k8s_psat:agent_ns:<ns>`,
    /// `k8s_psat:agent_sa:<sa>`, `k8s_psat:agent_pod_name:<pod>`,
    /// `k8s_psat:agent_pod_uid:<uid>`, `k8s_psat:agent_node_name:<node>`,
    /// `k8s_psat:agent_node_uid:<uid>`, `k8s_psat:agent_node_label:<k>:<v>`
    /// and `k8s_psat:agent_pod_label:<k>:<v>`. Empty values are left out.
    pub fn selectors(&self) -> SelectorSet {
        let mut out = SelectorSet::new();
        let mut add = |v: String| {
            if let Ok(s) = Selector::new(NAME, v) {
                out.insert(s);
            }
        };
        add(format!("cluster:{}", self.cluster));
        add(format!("agent_ns:{}", self.service_account.namespace));
        add(format!("agent_sa:{}", self.service_account.name));
        for (k, v) in [
            ("agent_pod_name", &self.pod_name),
            ("agent_pod_uid", &self.pod_uid),
            ("agent_node_name", &self.node_name),
            ("agent_node_uid", &self.node_uid),
        ] {
            if !v.is_empty() {
                add(format!("{k}:{v}"));
            }
        }
        for (k, v) in &self.node_labels {
            add(format!("agent_node_label:{k}:{v}"));
        }
        for (k, v) in &self.pod_labels {
            add(format!("agent_pod_label:{k}:{v}"));
        }
        out
    }
}

/// The cluster a node selector set names (`k8s_psat:cluster:<name>`).
pub fn cluster_of(selectors: &SelectorSet) -> Option<&str> {
    selectors
        .iter()
        .find(|s| s.kind() == NAME && s.value().starts_with("cluster:"))
        .and_then(|s| s.value().strip_prefix("cluster:"))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn facts() -> NodeFacts {
        NodeFacts {
            cluster: "prod-eu".parse().unwrap(),
            service_account: "mayfly:mayfly-agent".parse().unwrap(),
            pod_name: "mayfly-agent-x7k2p".into(),
            pod_uid: "5e2a6f4c-1d7b-4f51-9a55-0a1c9f0e3b21".into(),
            node_name: "node-1".into(),
            node_uid: "a5b6c7d8-0000-4000-8000-000000000001".into(),
            node_labels: [("topology.kubernetes.io/zone".into(), "eu-1a".into())].into(),
            pod_labels: [("app".into(), "mayfly-agent".into())].into(),
        }
    }

    #[test]
    fn agent_id_names_cluster_and_node_uid() {
        let td = TrustDomain::new("example.org").unwrap();
        assert_eq!(
            facts().agent_id(&td).unwrap().to_string(),
            "spiffe://example.org/mayfly/agent/k8s_psat/prod-eu/a5b6c7d8-0000-4000-8000-000000000001"
        );
    }

    #[test]
    fn selectors_are_spelled_as_spire_spells_them() {
        let got: Vec<String> = facts().selectors().iter().map(|s| s.to_string()).collect();
        for want in [
            "k8s_psat:cluster:prod-eu",
            "k8s_psat:agent_ns:mayfly",
            "k8s_psat:agent_sa:mayfly-agent",
            "k8s_psat:agent_pod_name:mayfly-agent-x7k2p",
            "k8s_psat:agent_pod_uid:5e2a6f4c-1d7b-4f51-9a55-0a1c9f0e3b21",
            "k8s_psat:agent_node_name:node-1",
            "k8s_psat:agent_node_uid:a5b6c7d8-0000-4000-8000-000000000001",
            "k8s_psat:agent_node_label:topology.kubernetes.io/zone:eu-1a",
            "k8s_psat:agent_pod_label:app:mayfly-agent",
        ] {
            assert!(got.iter().any(|g| g == want), "{want} missing from {got:?}");
        }
        assert_eq!(got.len(), 9);
        assert_eq!(cluster_of(&facts().selectors()), Some("prod-eu"));
    }

    #[test]
    fn service_accounts_and_cluster_names_are_validated() {
        let sa =
            ServiceAccount::from_username("system:serviceaccount:mayfly:mayfly-agent").unwrap();
        assert_eq!(sa.to_string(), "mayfly:mayfly-agent");
        for bad in [
            "system:node:node-1",
            "admin",
            "system:serviceaccount:Mayfly:agent",
            "system:serviceaccount:mayfly",
            "system:serviceaccount:a/b:c",
        ] {
            assert!(ServiceAccount::from_username(bad).is_err(), "{bad}");
        }
        assert!("ns:name".parse::<ServiceAccount>().is_ok());
        assert!("ns".parse::<ServiceAccount>().is_err());
        assert!("prod".parse::<ClusterName>().is_ok());
        for bad in ["", "Prod", "a/b", "-a", "a..b", &"x".repeat(64)] {
            assert!(bad.parse::<ClusterName>().is_err(), "{bad}");
        }
    }
}
