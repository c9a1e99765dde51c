//! `SignX509` and `MintJwt`: SVIDs for entries authorized for the calling
//! agent now. Identity, DNS names and lifetime come from the entry, never
//! from the request.

use mayfly::proto::node::{
    MintJwtRequest, MintJwtResponse, SignX509Request, SignX509Response, X509SignResult,
};
use mayfly::revocation::CredentialId;
use mayfly::x509::VerifiedCsr;
use time::OffsetDateTime;

use super::NodeCtx;
use super::auth::{Agent, Authorized, IssueAsk};
use crate::audit::AuditEvent;
use crate::error::{ServiceError, ServiceResult};
use crate::store::IssuedRecord;

fn issued(
    id: CredentialId,
    agent: &Agent,
    entry: &mayfly::entry::Entry,
    task_id: &str,
    authority_id: String,
    expires_at: OffsetDateTime,
) -> IssuedRecord {
    IssuedRecord {
        id,
        spiffe_id: entry.spiffe_id.to_string(),
        agent_id: Some(agent.spiffe_id.to_string()),
        entry_id: Some(entry.id.to_string()),
        task_id: (!task_id.is_empty()).then(|| task_id.to_owned()),
        authority_id,
        expires_at,
    }
}

/// The most items one `SignX509` call may carry.
pub const MAX_SIGN_ITEMS: usize = 256;

/// An answer that may be sent once its records are durable: the issued
/// credentials (so that they can be revoked) and the audit records of
/// their issuance, committed together by the caller.
#[derive(Debug)]
pub struct Signed<T> {
    /// The answer.
    pub response: T,
    /// One per credential in the answer.
    pub records: Vec<IssuedRecord>,
    /// The audit records of the issuance.
    pub events: Vec<AuditEvent>,
}

/// Signs every item or none: the first refused item fails the call,
/// naming its entry. No I/O: the caller commits the records (one durable
/// write for the batch and its audit records) before it answers, so that
/// every SVID can be revoked.
pub fn sign_x509(
    ctx: &NodeCtx,
    agent: &Agent,
    req: &SignX509Request,
) -> ServiceResult<Signed<SignX509Response>> {
    if req.items.is_empty() {
        return Err(ServiceError::InvalidArgument("no items to sign".into()));
    }
    if req.items.len() > MAX_SIGN_ITEMS {
        return Err(ServiceError::InvalidArgument(format!(
            "at most {MAX_SIGN_ITEMS} items per call, got {}",
            req.items.len()
        )));
    }
    ctx.limits
        .check_signing(&agent.spiffe_id.to_string(), req.items.len())?;
    let state = &ctx.state;
    let mut results = Vec::with_capacity(req.items.len());
    let mut records = Vec::with_capacity(req.items.len());
    for item in &req.items {
        let span = tracing::info_span!("item", entry = %item.entry_id, task = %item.task_id);
        let _enter = span.enter();
        let ask = IssueAsk {
            jwt: false,
            audience: &[],
            task_id: &item.task_id,
        };
        let Authorized { entry, ttl } = agent.authorize(ctx, &item.entry_id, state.now(), &ask)?;
        let csr = VerifiedCsr::from_der(&item.csr)
            .map_err(|e| ServiceError::InvalidArgument(format!("entry {}: {e}", item.entry_id)))?;
        let (signed, authority_id) =
            state.sign_x509_svid_by(&entry.spiffe_id, &csr, Some(ttl), &entry.dns_names)?;
        records.push(issued(
            CredentialId::Serial(signed.serial_hex()),
            agent,
            &entry,
            &item.task_id,
            authority_id,
            signed.not_after,
        ));
        tracing::debug!(spiffe_id = %entry.spiffe_id, serial = %signed.serial_hex(), not_after = %signed.not_after, "signed X.509-SVID");
        results.push(X509SignResult {
            entry_id: item.entry_id.clone(),
            svid_chain: vec![signed.der],
            expires_at: signed.not_after.unix_timestamp(),
            task_id: item.task_id.clone(),
        });
    }
    let events = super::audit::issued(agent, "x509.issue", &records, &[]);
    Ok(Signed {
        response: SignX509Response { results },
        records,
        events,
    })
}

/// Mints a JWT-SVID for the entry. No I/O: the caller commits the record
/// and its audit record before it answers (see [`sign_x509`]).
pub fn mint_jwt(
    ctx: &NodeCtx,
    agent: &Agent,
    req: &MintJwtRequest,
) -> ServiceResult<Signed<MintJwtResponse>> {
    ctx.limits.check_signing(&agent.spiffe_id.to_string(), 1)?;
    let state = &ctx.state;
    let ask = IssueAsk {
        jwt: true,
        audience: &req.audience,
        task_id: &req.task_id,
    };
    let Authorized { entry, ttl } = agent.authorize(ctx, &req.entry_id, state.now(), &ask)?;
    let (token, expires_at, jti, key_id) =
        state.mint_jwt_svid_by(&entry.spiffe_id, &req.audience, Some(ttl))?;
    let exp = OffsetDateTime::from_unix_timestamp(expires_at)
        .map_err(|e| ServiceError::Internal(format!("token expiry out of range: {e}")))?;
    let records = vec![issued(
        CredentialId::Jti(jti.clone()),
        agent,
        &entry,
        &req.task_id,
        key_id,
        exp,
    )];
    let events = super::audit::issued(
        agent,
        "jwt.issue",
        &records,
        &[("audience", req.audience.clone().into())],
    );
    tracing::debug!(spiffe_id = %entry.spiffe_id, task = %req.task_id, jti = %jti, audience = ?req.audience, expires_at, "minted JWT-SVID");
    Ok(Signed {
        response: MintJwtResponse {
            token,
            expires_at,
            jti,
        },
        records,
        events,
    })
}
