//! Audit records of node API calls: attestations, renewals, issued SVIDs,
//! task ends, and every refusal. Successful issuances are recorded before
//! the credential is returned (an unaudited SVID is never handed out);
//! refusals are recorded on the way out, and a failure to record them is
//! logged (the call fails anyway).

use mayfly::SpiffeId;
use mayfly::revocation::CredentialId;
use tonic::{Code, Status};

use super::NodeCtx;
use super::auth::Agent;
use crate::audit::{Actor, ActorKind, AuditEvent, Decision, Outcome};
use crate::error::{ServiceError, ServiceResult};
use crate::store::IssuedRecord;

/// How an authenticated agent proved itself on a call.
pub const BY_SVID: &str = "x509_svid";

/// The actor for an authenticated agent.
pub fn agent_actor(id: &SpiffeId) -> Actor {
    Actor::new(ActorKind::Agent, id.to_string(), BY_SVID)
}

/// One `x509.issue` / `jwt.issue` event per issued credential, to store
/// with the records (`ServerState::commit_issued`). `extra` adds
/// details to each (the JWT audience).
pub fn issued(
    agent: &Agent,
    action: &str,
    records: &[IssuedRecord],
    extra: &[(&str, serde_json::Value)],
) -> Vec<AuditEvent> {
    records
        .iter()
        .map(|r| {
            let mut e = AuditEvent::ok(agent_actor(&agent.spiffe_id), action)
                .target(r.spiffe_id.clone())
                .detail(
                    match &r.id {
                        CredentialId::Serial(_) => "serial",
                        CredentialId::Jti(_) => "jti",
                    },
                    match &r.id {
                        CredentialId::Serial(v) | CredentialId::Jti(v) => v.clone(),
                    },
                )
                .detail("authority_id", r.authority_id.clone())
                .detail(
                    "expires_at",
                    crate::audit::record::format_time(r.expires_at),
                );
            if let Some(entry) = &r.entry_id {
                e = e.detail("entry_id", entry.clone());
            }
            if let Some(task) = &r.task_id {
                e = e.detail("task_id", task.clone());
            }
            for (k, v) in extra {
                e = e.detail(k, v.clone());
            }
            e
        })
        .collect()
}

/// Records a refused or failed call (blocking; errors are logged).
pub fn refused(
    ctx: &NodeCtx,
    actor: Actor,
    action: &str,
    target: Option<String>,
    error: &ServiceError,
) {
    let mut event = AuditEvent::failed(actor, action, error);
    event.target = target;
    if let Err(e) = ctx.state.audit(event) {
        tracing::error!(error = %e, action, "cannot record a refused call in the audit log");
    }
}

/// [`refused`] for a call that failed with a gRPC status.
pub fn refused_status(
    ctx: &NodeCtx,
    actor: Actor,
    action: &str,
    target: Option<String>,
    status: &Status,
) {
    let denied = matches!(
        status.code(),
        Code::PermissionDenied | Code::Unauthenticated | Code::FailedPrecondition
    );
    let mut event = AuditEvent::ok(actor, action);
    event.target = target;
    event.decision = if denied {
        Decision::Deny
    } else {
        Decision::Allow
    };
    event.result = Outcome::Error;
    event.message = Some(status.message().to_owned());
    event = event.detail("code", format!("{:?}", status.code()));
    if let Err(e) = ctx.state.audit(event) {
        tracing::error!(error = %e, action, "cannot record a refused call in the audit log");
    }
}

/// The `node.attest` record of a successful attestation: the attestor and,
/// for a join token, the token's id (never the token), read from the
/// agent's SPIFFE ID (`/mayfly/agent/<attestor>/...`).
pub fn attested(
    ctx: &NodeCtx,
    agent_id: &str,
    peer: &str,
    can_reattest: bool,
) -> ServiceResult<()> {
    let mut parts = agent_id
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('/'))
        .map(|(_, path)| path.split('/'))
        .into_iter()
        .flatten()
        .skip(2);
    let attestor = parts.next().unwrap_or_default().to_owned();
    let mut event = AuditEvent::ok(
        Actor::new(ActorKind::Agent, agent_id, attestor.clone()),
        "node.attest",
    )
    .target(agent_id)
    .detail("attestor", attestor.clone())
    .detail("peer", peer)
    .detail("can_reattest", can_reattest);
    if attestor == super::attest::JOIN_TOKEN
        && let Some(token_id) = parts.next()
    {
        event = event.detail("token_id", token_id);
    }
    ctx.state.audit(event)
}

/// The actor of a call whose caller is not (yet) known: the peer address.
pub fn peer_actor(peer: &str) -> Actor {
    Actor::new(ActorKind::Agent, peer, "none")
}
