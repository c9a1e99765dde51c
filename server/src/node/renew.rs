//! `Renew`: a new agent SVID with the same identity for a new key. Its
//! serial becomes the node's `next_serial`; the first call made with it
//! promotes it to current (see `auth`), which retires the old SVID.

use mayfly::proto::node::{RenewRequest, RenewResponse};
use mayfly::x509::VerifiedCsr;

use super::NodeCtx;
use super::auth::{self, Agent};
use crate::error::{ServiceError, ServiceResult};
use crate::policy::PolicyRequest;

/// Signs the renewed SVID and records its serial. Blocking.
pub fn renew(ctx: &NodeCtx, agent: &Agent, req: &RenewRequest) -> ServiceResult<RenewResponse> {
    let state = &ctx.state;
    let decision = state
        .policy
        .decide(&PolicyRequest::Renew(&agent.node), state.now());
    if !decision.allowed {
        tracing::warn!(reasons = %decision.reasons_text(), "policy denied agent renewal");
        return Err(ServiceError::PolicyDenied {
            message: format!(
                "policy denies renewing {}: {}",
                agent.spiffe_id,
                decision.reasons_text()
            ),
            reasons: decision.reasons,
        });
    }
    let csr = VerifiedCsr::from_der(&req.csr)?;
    let signed = state.sign_x509_svid(
        &agent.spiffe_id,
        &csr,
        Some(state.config.agent_svid_ttl),
        &[],
    )?;
    let serial = signed.serial_hex();
    ctx.update_node(&agent.spiffe_id.to_string(), |n| {
        auth::check_usable(n)?;
        n.next_serial = Some(serial.clone());
        Ok(())
    })?;
    tracing::info!(serial = %serial, not_after = %signed.not_after, "renewed agent SVID");
    Ok(RenewResponse {
        svid_chain: vec![signed.der],
    })
}
