//! `k8s_psat` attestation: the agent sends its cluster name and a projected
//! service account token; the cluster's API vouches for it (see
//! [`crate::k8s::review`]). Medium assurance, re-attestable: an agent proves
//! itself again with a fresh token, keeps its agent ID (one per node) and
//! its record is refreshed.

use std::sync::Arc;

use mayfly::entry::Assurance;
use mayfly::proto::node::{AttestParams, AttestResult, K8sPsatEvidence};
use mayfly::x509::VerifiedCsr;
use prost::Message as _;
use zeroize::Zeroizing;

use super::NodeCtx;
use super::attest::{Attested, result_for, store_reattestable};
use crate::error::{ServiceError, ServiceResult};

/// The attestor's name.
pub const NAME: &str = mayfly::k8s_psat::NAME;

/// Attests an agent from its `K8sPsatEvidence`.
pub async fn attest(ctx: Arc<NodeCtx>, params: AttestParams) -> ServiceResult<AttestResult> {
    let csr = VerifiedCsr::from_der(&params.csr)?;
    let payload = Zeroizing::new(params.payload);
    let evidence = K8sPsatEvidence::decode(payload.as_slice()).map_err(|e| {
        ServiceError::InvalidArgument(format!("k8s_psat evidence does not decode: {e}"))
    })?;
    drop(payload);
    let token = Zeroizing::new(evidence.token);
    if token.trim().is_empty() {
        return Err(ServiceError::InvalidArgument(
            "k8s_psat evidence carries no token".into(),
        ));
    }
    let (cluster, client) = ctx.k8s.get(&evidence.cluster).ok_or_else(|| {
        ServiceError::PermissionDenied(format!(
            "k8s_psat: cluster {:?} is not configured on this server",
            evidence.cluster
        ))
    })?;
    let facts = crate::k8s::review::review(cluster, client, token.trim()).await?;
    drop(token);
    let agent_id = facts.agent_id(ctx.state.trust_domain()).map_err(|e| {
        ServiceError::PermissionDenied(format!("k8s_psat: no agent ID for this node: {e}"))
    })?;
    tracing::Span::current().record("agent", tracing::field::display(&agent_id));
    let selectors = facts.selectors();

    ctx.limits.check_attestation(&agent_id.to_string())?;
    let (node, chain) = store_reattestable(
        &ctx,
        Attested {
            agent_id,
            csr,
            attestor: NAME,
            assurance: Assurance::Medium,
            selectors,
        },
    )
    .await?;
    tracing::info!(agent = %node.spiffe_id, serial = %node.current_serial, cluster = %facts.cluster, node = %facts.node_name, "agent attested with k8s_psat");
    Ok(result_for(&ctx, &node, chain))
}
