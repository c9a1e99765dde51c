//! `Attest`: node attestation. The only call accepted without a client
//! certificate.
//!
//! Supported attestors: `join_token` (the payload is the token, UTF-8; no
//! challenge; the CSR is checked before the token is redeemed, so that a
//! malformed request does not burn a single-use token) and, when configured,
//! `x509pop` (see [`super::x509pop`]: certificate chain, then a challenge
//! signed with the node key; re-attestable, so a node attesting again keeps
//! its agent ID and its record is refreshed).

use std::sync::Arc;
use std::time::Duration;

use mayfly::entry::Assurance;
use mayfly::proto::node::{
    AttestParams, AttestRequest, AttestResponse, AttestResult, X509PopEvidence, attest_request,
    attest_response,
};
use mayfly::x509::VerifiedCsr;
use prost::Message as _;
use tokio::sync::mpsc;
use tonic::Streaming;
use zeroize::Zeroizing;

use super::x509pop::{self, TrustedCas};
use super::{NodeCtx, blocking};
use crate::error::{ServiceError, ServiceResult};
use crate::service::tokens::INVALID_JOIN_TOKEN;
use crate::store::NodeRecord;

/// How long an agent has to send its first message.
const FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an agent has to answer a challenge.
const CHALLENGE_TIMEOUT: Duration = Duration::from_secs(30);

/// The name of the join token attestor.
pub const JOIN_TOKEN: &str = "join_token";

/// The name of the x509pop attestor.
pub const X509POP: &str = mayfly::x509pop::NAME;

/// The refusal of a banned node that tries to attest again.
pub const BANNED_FOREVER: &str = "agent is banned: banned agents can never attest again until an \
                                  operator lifts the ban";

/// Messages sent to the agent during the conversation (challenges).
pub type Outbound = mpsc::Sender<Result<AttestResponse, tonic::Status>>;

/// Runs an attestation conversation and returns its result. Challenges are
/// sent on `outbound`.
pub async fn attest(
    ctx: Arc<NodeCtx>,
    mut inbound: Streaming<AttestRequest>,
    outbound: &Outbound,
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
        X509POP if ctx.state.config.x509pop.is_some() => {
            x509pop_attest(ctx, params, &mut inbound, outbound).await?
        }
        super::k8s_psat::NAME if !ctx.k8s.is_empty() => {
            super::k8s_psat::attest(ctx, params).await?
        }
        other => {
            let mut supported = vec![JOIN_TOKEN];
            if ctx.state.config.x509pop.is_some() {
                supported.push(X509POP);
            }
            if !ctx.k8s.is_empty() {
                supported.push(super::k8s_psat::NAME);
            }
            let supported = match supported.split_last() {
                Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
                _ => JOIN_TOKEN.to_owned(),
            };
            return Err(ServiceError::InvalidArgument(format!(
                "unknown node attestor {other:?}; this server supports {supported}"
            ))
            .into());
        }
    };
    Ok(result)
}

/// A node that a re-attestable attestor has just verified.
pub(super) struct Attested {
    /// Its agent ID.
    pub agent_id: mayfly::SpiffeId,
    /// The CSR of its new agent SVID.
    pub csr: VerifiedCsr,
    /// The attestor's name.
    pub attestor: &'static str,
    /// The attestor's assurance.
    pub assurance: Assurance,
    /// The node selectors the attestor established.
    pub selectors: mayfly::selector::SelectorSet,
}

/// Signs the agent SVID and stores or refreshes the node record of a
/// re-attestable attestor (`x509pop`, `k8s_psat`): refused when banned
/// (checked again under the node lock, so that a concurrent ban wins) or
/// when policy denies the attestation (the stored record is then left
/// untouched). A node that attests again keeps its ID and is told to its
/// `Sync` stream.
pub(super) async fn store_reattestable(
    ctx: &Arc<NodeCtx>,
    a: Attested,
) -> ServiceResult<(NodeRecord, Vec<Vec<u8>>)> {
    let task_ctx = Arc::clone(ctx);
    let (node, chain, reattested) = blocking(move || {
        let state = &task_ctx.state;
        let key = a.agent_id.to_string();
        if state.store.get_node(&key)?.is_some_and(|n| n.banned) {
            return Err(ServiceError::PermissionDenied(BANNED_FOREVER.into()));
        }
        let signed =
            state.sign_x509_svid(&a.agent_id, &a.csr, Some(state.config.agent_svid_ttl), &[])?;
        let now = state.now();
        let refresh = |n: &mut NodeRecord| {
            n.attestor = a.attestor.into();
            n.assurance = a.assurance;
            n.selectors = a.selectors.clone();
            n.attested_at = now;
            n.current_serial = signed.serial_hex();
            n.next_serial = None;
            n.svid_expires_at = signed.not_after;
            n.can_reattest = true;
        };
        // Serialised with bans: a ban that lands first is seen here.
        let updated = state.update_node(&key, |n| {
            if n.banned {
                return Err(ServiceError::PermissionDenied(BANNED_FOREVER.into()));
            }
            refresh(n);
            // Policy decides on the record as it would be stored; a denial
            // leaves the stored record untouched.
            state.decide_attestation(n)
        })?;
        let (node, reattested) = match updated {
            Some(n) => (n, true),
            None => {
                let mut node = NodeRecord {
                    spiffe_id: a.agent_id.clone(),
                    attestor: a.attestor.into(),
                    assurance: a.assurance,
                    selectors: Default::default(),
                    enrolled_aliases: Vec::new(),
                    attested_at: now,
                    current_serial: String::new(),
                    next_serial: None,
                    svid_expires_at: signed.not_after,
                    banned: false,
                    can_reattest: true,
                };
                refresh(&mut node);
                state.decide_attestation(&node)?;
                task_ctx.put_node(&node)?;
                (node, false)
            }
        };
        Ok((node, vec![signed.der], reattested))
    })
    .await?;
    if reattested {
        ctx.state.notify_node(&node.spiffe_id.to_string());
    }
    Ok((node, chain))
}

pub(super) fn result_for(ctx: &NodeCtx, node: &NodeRecord, chain: Vec<Vec<u8>>) -> AttestResult {
    AttestResult {
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
    }
}

/// `x509pop`: verify the chain, rate-limit and ban-check the identity it
/// claims, challenge, verify the proof, then store or refresh the node.
async fn x509pop_attest(
    ctx: Arc<NodeCtx>,
    params: AttestParams,
    inbound: &mut Streaming<AttestRequest>,
    outbound: &Outbound,
) -> ServiceResult<AttestResult> {
    let csr = VerifiedCsr::from_der(&params.csr)?;
    let evidence = X509PopEvidence::decode(params.payload.as_slice()).map_err(|e| {
        ServiceError::InvalidArgument(format!("x509pop evidence does not decode: {e}"))
    })?;
    let task_ctx = Arc::clone(&ctx);
    let (verified, agent_id) = blocking(move || {
        let state = &task_ctx.state;
        let cfg = state.config.x509pop.as_ref().ok_or_else(|| {
            ServiceError::InvalidArgument("this server does not accept x509pop".into())
        })?;
        let cas = TrustedCas::load(&cfg.ca_bundle_path)?;
        let verified = x509pop::verify_chain(&cas, &evidence.chain, state.now())?;
        let agent_id = cfg
            .agent_path
            .agent_id(state.trust_domain(), &verified.path_facts())
            .map_err(|e| {
                ServiceError::PermissionDenied(format!(
                    "no agent ID for this node certificate (server.node_attestors.x509pop.agent_path): {e}"
                ))
            })?;
        let key = agent_id.to_string();
        task_ctx.limits.check_attestation(&key)?;
        if state.store.get_node(&key)?.is_some_and(|n| n.banned) {
            return Err(ServiceError::PermissionDenied(BANNED_FOREVER.into()));
        }
        Ok((verified, agent_id))
    })
    .await?;
    tracing::Span::current().record("agent", tracing::field::display(&agent_id));

    let challenge: [u8; mayfly::x509pop::CHALLENGE_LEN] = rand::random();
    outbound
        .send(Ok(AttestResponse {
            step: Some(attest_response::Step::Challenge(challenge.to_vec())),
        }))
        .await
        .map_err(|_| ServiceError::InvalidArgument("the agent left during attestation".into()))?;
    let answer = tokio::time::timeout(CHALLENGE_TIMEOUT, inbound.message())
        .await
        .map_err(|_| {
            ServiceError::InvalidArgument(
                "no answer to the x509pop challenge within 30 seconds".into(),
            )
        })?
        .map_err(|s| {
            ServiceError::InvalidArgument(format!("attestation stream: {}", s.message()))
        })?;
    let signature = match answer.and_then(|m| m.step) {
        Some(attest_request::Step::ChallengeResponse(sig)) => sig,
        _ => {
            return Err(ServiceError::InvalidArgument(
                "expected the answer to the x509pop challenge".into(),
            ));
        }
    };
    x509pop::verify_proof(&verified, &challenge, &params.csr, &signature)?;

    let selectors = verified.selectors.clone();
    let ca_fingerprint = verified.ca_fingerprint.clone();
    let (node, chain) = store_reattestable(
        &ctx,
        Attested {
            agent_id,
            csr,
            attestor: X509POP,
            assurance: Assurance::High,
            selectors,
        },
    )
    .await?;
    tracing::info!(agent = %node.spiffe_id, serial = %node.current_serial, ca = %ca_fingerprint, "agent attested with x509pop");
    Ok(result_for(&ctx, &node, chain))
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
        let record = match state.redeem_join_token(&token) {
            Ok(r) => r,
            Err(e) => {
                // Unknown, used or expired tokens share one bucket, so that
                // guessing is throttled without keying on the caller's address.
                task_ctx
                    .limits
                    .check_attestation(super::rate_limit::UNKNOWN_JOIN_TOKENS)?;
                return Err(e);
            }
        };
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
    Ok(result_for(&ctx, &node, chain))
}
