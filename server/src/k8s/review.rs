//! From a projected service account token to the facts of the agent's node.
//!
//! 1. `TokenReview` with the cluster's audience: the API server checks the
//!    signature, expiry, audience and that the pod the token is bound to
//!    still exists. Refused unless `status.authenticated` and the audience is
//!    echoed back in `status.audiences` (an API server that ignores
//!    audiences would otherwise accept a token minted for someone else).
//! 2. The user must be a service account on the cluster's allow list, and
//!    the token must be bound to a pod (`authentication.kubernetes.io/pod-name`
//!    and `pod-uid` in `status.user.extra`): only projected tokens are.
//! 3. The pod is read: its UID must be the bound one, and it names the node.
//! 4. The node is read for its UID and labels.
//!
//! The token is never logged.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;
use kube::api::PostParams;
use mayfly::k8s_psat::{NodeFacts, ServiceAccount};

use super::ClusterConfig;
use crate::error::ServiceError;

/// The `status.user.extra` key naming the pod a token is bound to.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// The `status.user.extra` key with the bound pod's UID.
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

fn denied(cluster: &ClusterConfig, why: impl std::fmt::Display) -> ServiceError {
    ServiceError::PermissionDenied(format!(
        "k8s_psat attestation refused (cluster {}): {why}",
        cluster.name
    ))
}

fn unavailable(cluster: &ClusterConfig, call: &str, e: impl std::fmt::Display) -> ServiceError {
    ServiceError::Unavailable(format!(
        "k8s_psat: the API of cluster {} failed on {call}: {e}",
        cluster.name
    ))
}

/// Reviews `token` with the cluster and reads the agent's pod and node.
/// `PermissionDenied` for a token the cluster does not accept or an agent
/// that is not allowed; `Unavailable` when the cluster's API fails.
pub async fn review(
    cluster: &ClusterConfig,
    client: &kube::Client,
    token: &str,
) -> Result<NodeFacts, ServiceError> {
    let request = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: Some(vec![cluster.audience.clone()]),
        },
        ..Default::default()
    };
    let reviews: Api<TokenReview> = Api::all(client.clone());
    let answer = reviews
        .create(&PostParams::default(), &request)
        .await
        .map_err(|e| unavailable(cluster, "TokenReview", e))?;
    let status = answer.status.unwrap_or_default();
    if status.authenticated != Some(true) {
        let why = status
            .error
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "no reason given".into());
        return Err(denied(
            cluster,
            format!("the cluster does not accept the token: {why}"),
        ));
    }
    if !status
        .audiences
        .unwrap_or_default()
        .iter()
        .any(|a| a == &cluster.audience)
    {
        return Err(denied(
            cluster,
            format!(
                "the token is not bound to the audience {:?} (the agent's projected token must \
                 request this audience)",
                cluster.audience
            ),
        ));
    }
    let user = status.user.unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let service_account =
        ServiceAccount::from_username(&username).map_err(|e| denied(cluster, e))?;
    if !cluster
        .service_account_allow_list
        .contains(&service_account)
    {
        return Err(denied(
            cluster,
            format!(
                "service account {service_account} is not in service_account_allow_list ({})",
                cluster
                    .service_account_allow_list
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ));
    }
    let extra = user.extra.unwrap_or_default();
    let one = |key: &str| {
        extra
            .get(key)
            .and_then(|v| v.first())
            .filter(|v| !v.is_empty())
            .cloned()
    };
    let (Some(pod_name), Some(pod_uid)) = (one(EXTRA_POD_NAME), one(EXTRA_POD_UID)) else {
        return Err(denied(
            cluster,
            "the token is not bound to a pod (use a projected service account token)",
        ));
    };

    let pods: Api<Pod> = Api::namespaced(client.clone(), &service_account.namespace);
    let pod = pods
        .get_opt(&pod_name)
        .await
        .map_err(|e| unavailable(cluster, "get pod", e))?
        .ok_or_else(|| {
            denied(
                cluster,
                format!(
                    "pod {}/{pod_name} the token is bound to does not exist",
                    service_account.namespace
                ),
            )
        })?;
    if pod.metadata.uid.as_deref() != Some(pod_uid.as_str()) {
        return Err(denied(
            cluster,
            format!(
                "pod {}/{pod_name} has UID {:?}, not the {pod_uid:?} the token is bound to",
                service_account.namespace,
                pod.metadata.uid.unwrap_or_default()
            ),
        ));
    }
    let node_name = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            denied(
                cluster,
                format!(
                    "pod {}/{pod_name} is not scheduled on a node",
                    service_account.namespace
                ),
            )
        })?;
    let nodes: Api<Node> = Api::all(client.clone());
    let node = nodes
        .get_opt(&node_name)
        .await
        .map_err(|e| unavailable(cluster, "get node", e))?
        .ok_or_else(|| denied(cluster, format!("node {node_name} does not exist")))?;
    let node_uid = node
        .metadata
        .uid
        .filter(|u| !u.is_empty())
        .ok_or_else(|| denied(cluster, format!("node {node_name} has no UID")))?;
    if !is_path_safe(&node_uid) {
        return Err(denied(
            cluster,
            format!("node {node_name} has a UID unusable in an agent ID: {node_uid:?}"),
        ));
    }
    Ok(NodeFacts {
        cluster: cluster.name.clone(),
        service_account,
        pod_name,
        pod_uid,
        node_name,
        node_uid,
        node_labels: allowed(node.metadata.labels, &cluster.allowed_node_label_keys),
        pod_labels: allowed(pod.metadata.labels, &cluster.allowed_pod_label_keys),
    })
}

/// A UID is a path segment of the agent ID: letters, digits, '-', '.', '_'.
fn is_path_safe(s: &str) -> bool {
    s.len() <= 128
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

fn allowed(
    labels: Option<BTreeMap<String, String>>,
    keys: &BTreeSet<String>,
) -> BTreeMap<String, String> {
    labels
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, v)| keys.contains(k) && !v.is_empty())
        .collect()
}
