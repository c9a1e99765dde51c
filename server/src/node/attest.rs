//! `Attest`: node attestation. The only call accepted without a client
//! certificate.
//!
//! Supported attestors: `join_token` (the payload is the token, UTF-8; no
//! challenge). The CSR is checked before the token is redeemed, so that a
//! malformed request does not burn a single-use token.

use std::sync::Arc;
use std::time::Duration;

use mayfly::entry::Assurance;
use mayfly::proto::node::{AttestParams, AttestResult, attest_request};
use mayfly::x509::VerifiedCsr;
use tonic::Streaming;
use zeroize::Zeroizing;

use super::{NodeCtx, blocking};
use crate::error::{ServiceError, ServiceResult};
use crate::service::tokens::INVALID_JOIN_TOKEN;
use crate::store::NodeRecord;

/// How long an agent has to send its first message.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// The name of the join token attestor.
pub const JOIN_TOKEN: &str = "join_token";

/// Runs an attestation conversation and returns its result.
pub async fn attest(
    ctx: Arc<NodeCtx>,
    mut inbound: Streaming<mayfly::proto::node::AttestRequest>,
) -> Result<AttestResult, tonic::Status> {
    let first = tokio::time::timeout(FIRST_MESSAGE_TIMEOUT, inbound.message())
        .await
        .map_err(|_| {
            tonic::Status::deadline_exceeded("no attestation parameters within 30 seconds")
        })??;
    let params = match first.and_then(|m| m.step) {
        Some(attest_request::Step::Params(p)) => p,
        Some(attest_request::Step::ChallengeResponse(_)) => {
            return Err(ServiceError::InvalidArgument(
                "the first attestation message must carry params, not a challenge response".into(),
            )
            .into());
        }
        None => {
            return Err(
                ServiceError::InvalidArgument("no attestation parameters sent".into()).into(),
            );
        }
    };
    tracing::Span::current().record("attestor", params.attestor.as_str());
    let result = match params.attestor.as_str() {
        JOIN_TOKEN => join_token(ctx, params).await?,
        other => {
            return Err(ServiceError::InvalidArgument(format!(
                "unknown node attestor {other:?}; this server supports {JOIN_TOKEN}"
            ))
            .into());
        }
    };
    Ok(result)
}

async fn join_token(ctx: Arc<NodeCtx>, params: AttestParams) -> ServiceResult<AttestResult> {
    let csr = VerifiedCsr::from_der(&params.csr)?;
    let payload = Zeroizing::new(params.payload);
    let token = std::str::from_utf8(&payload)
        .ok()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| Zeroizing::new(t.to_owned()))
        .ok_or_else(|| ServiceError::PermissionDenied(INVALID_JOIN_TOKEN.into()))?;
    drop(payload);

    let task_ctx = Arc::clone(&ctx);
    let (node, chain) = blocking(move || {
        let state = &task_ctx.state;
        let record = state.redeem_join_token(&token)?;
        let agent_id =
            mayfly::id::agent_id(state.trust_domain(), JOIN_TOKEN, &[record.id.as_str()])
                .map_err(|e| ServiceError::Internal(format!("agent id for a join token: {e}")))?;
        let key = agent_id.to_string();
        if state.store.get_node(&key)?.is_some_and(|n| n.banned) {
            return Err(ServiceError::PermissionDenied(super::auth::BANNED.into()));
        }
        let signed = state.sign_x509_svid(
            &agent_id,
            &csr,
            Some(state.config.agent_svid_ttl),
            &[],
        )?;
        let node = NodeRecord {
            spiffe_id: agent_id,
            attestor: JOIN_TOKEN.into(),
            assurance: Assurance::Low,
            selectors: Default::default(),
            enrolled_aliases: record.alias.iter().cloned().collect(),
            attested_at: state.now(),
            current_serial: signed.serial_hex(),
            next_serial: None,
            svid_expires_at: signed.not_after,
            banned: false,
            can_reattest: false,
        };
        if let Err(e) = state.decide_attestation(&node) {
            // The token is spent; the SVID just signed is never handed out.
            tracing::warn!(agent = %key, token_id = %record.id, "attestation refused by policy");
            return Err(e);
        }
        task_ctx.put_node(&node)?;
        tracing::info!(agent = %key, token_id = %record.id, serial = %node.current_serial, "agent attested");
        Ok((node, vec![signed.der]))
    })
    .await?;
    tracing::Span::current().record("agent", tracing::field::display(&node.spiffe_id));
    ctx.state.notify_node(&node.spiffe_id.to_string());
    Ok(AttestResult {
        spiffe_id: node.spiffe_id.to_string(),
        svid_chain: chain,
        node_selectors: node
            .selectors
            .iter()
            .map(|s| mayfly::proto::node::Selector {
                r#type: s.kind().to_owned(),
                value: s.value().to_owned(),
            })
            .collect(),
        bundle: Some(ctx.state.bundle().to_proto()),
        can_reattest: node.can_reattest,
    })
}
