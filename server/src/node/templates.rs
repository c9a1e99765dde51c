//! Identity templates on the server: which apply to an agent (sent with its
//! entries) and the entry a derived id names (checked before signing).

use mayfly::entry::Entry;
use mayfly::template::{DerivedId, IdentityTemplate};

use crate::config::ServerConfig;
use crate::store::NodeRecord;

/// The templates that apply to `node`: the pod identities of its cluster
/// when it attested with `k8s_psat`; none otherwise.
pub fn for_node<'a>(config: &'a ServerConfig, node: &NodeRecord) -> &'a [IdentityTemplate] {
    if node.attestor != mayfly::k8s_psat::NAME {
        return &[];
    }
    let cluster = mayfly::k8s_psat::cluster_of(&node.selectors);
    match (config.k8s_psat.as_ref(), cluster) {
        (Some(k), Some(c)) => k
            .cluster(c)
            .map_or(&[][..], |c| c.pod_identities.as_slice()),
        _ => &[],
    }
}

/// The entry `id` derives for `node`, if one of the node's templates
/// derives it (its namespace covered, its names valid).
pub fn derive(config: &ServerConfig, node: &NodeRecord, id: &DerivedId<'_>) -> Option<Entry> {
    for_node(config, node)
        .iter()
        .find(|t| t.id() == id.template)?
        .derive_for(
            &config.trust_domain,
            &node.spiffe_id,
            id.namespace,
            id.service_account,
        )
        .map_err(|e| tracing::debug!(error = %e, "derived entry refused"))
        .ok()
}
