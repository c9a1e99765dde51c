//! Per-call agent authentication and authorization.
//!
//! The TLS layer has already verified the client certificate's chain to the
//! CA. Here, on every call, the server re-checks what the chain cannot say:
//! that the certificate is an agent SVID of this trust domain, that the node
//! is still attested and not banned, and that the certificate is the node's
//! current (or freshly renewed) SVID.

use std::sync::Arc;

use mayfly::SpiffeId;
use mayfly::entry::{Entry, EntryId};
use mayfly::matching::AgentView;
use mayfly::template::DerivedId;
use mayfly::ttl::Ttl;
use mayfly::x509::SvidInfo;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use x509_parser::extensions::ParsedExtension;

use super::NodeCtx;
use crate::authority::Kind;
use crate::error::{ServiceError, ServiceResult};
use crate::policy::{Issue, PolicyRequest};
use crate::store::NodeRecord;

/// "attest again": the node record is gone (evicted) or never existed.
pub const NOT_ATTESTED: &str = "agent is not attested; attest again";
/// The node is banned.
pub const BANNED: &str = "agent is banned";
/// The certificate is an older SVID of the node.
pub const SUPERSEDED: &str = "agent SVID has been superseded";

/// An agent that passed the per-call checks, with the node record as read
/// during those checks.
#[derive(Debug, Clone)]
pub struct Agent {
    /// The agent's SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// Its node record.
    pub node: NodeRecord,
    /// The aliases it was enrolled with, parsed.
    pub aliases: Vec<SpiffeId>,
}

impl Agent {
    fn from_node(node: NodeRecord) -> Self {
        // Aliases were validated when the token was created; one that no
        // longer parses grants nothing rather than failing every call.
        let aliases = node
            .enrolled_aliases
            .iter()
            .filter_map(|a| SpiffeId::new(a).ok())
            .collect();
        Self {
            spiffe_id: node.spiffe_id.clone(),
            node,
            aliases,
        }
    }

    /// The view the entry index authorizes against.
    pub fn view<'a>(&'a self, server_id: &'a SpiffeId) -> AgentView<'a> {
        AgentView {
            server_id,
            agent_id: &self.spiffe_id,
            node_selectors: &self.node.selectors,
            enrolled_aliases: &self.aliases,
        }
    }

    /// The entry `id` if it is authorized for this agent at `now` and
    /// policy allows the issuance, with the TTL to sign with (the entry's
    /// or the server default, capped by policy).
    ///
    /// Registration (the index's parent rule) is checked first:
    /// `PermissionDenied` naming the entry. Then policy: when it denies
    /// but would allow the same request after a fresh node attestation,
    /// `ReattestRequired` if the node can re-attest, else `PolicyDenied`
    /// explaining that its attestor cannot; otherwise `PolicyDenied` with
    /// the reasons.
    pub fn authorize(
        &self,
        ctx: &NodeCtx,
        id: &str,
        now: OffsetDateTime,
        ask: &IssueAsk<'_>,
    ) -> ServiceResult<Authorized> {
        let denied = || {
            ServiceError::PermissionDenied(format!(
                "entry {id:?} is not authorized for agent {}",
                self.spiffe_id
            ))
        };
        let state = &ctx.state;
        let entry = match DerivedId::parse(id) {
            // An entry derived from one of the agent's identity templates.
            Some(derived) => super::templates::derive(&state.config, &self.node, &derived)
                .map(Arc::new)
                .ok_or_else(denied)?,
            None => {
                let entry_id: EntryId = id.parse().map_err(|_| denied())?;
                state
                    .with_index(|i| i.is_authorized(&self.view(&state.server_id), &entry_id, now))
                    .ok_or_else(denied)?
            }
        };
        let requested = if ask.jwt {
            entry
                .jwt_svid_ttl
                .unwrap_or(state.config.default_jwt_svid_ttl)
        } else {
            entry
                .x509_svid_ttl
                .unwrap_or(state.config.default_x509_svid_ttl)
        };
        let issue = Issue {
            node: &self.node,
            entry: &entry,
            task_id: ask.task_id,
            audience: ask.audience,
            requested_ttl: requested.as_secs(),
            jwt: ask.jwt,
        };
        let engine = state.policy.engine();
        let decision = engine.decide(&PolicyRequest::Issue(issue), now);
        if decision.allowed {
            return Ok(Authorized {
                ttl: decision.cap(requested),
                entry,
            });
        }
        let kind = if ask.jwt { "JWT-SVID" } else { "X.509-SVID" };
        let reasons = decision.reasons_text();
        let why = self.unmet_entry_rules(&entry, now);
        tracing::warn!(entry = %entry.id, spiffe_id = %entry.spiffe_id, reasons = %reasons, "policy denied {kind}");
        let mut fresh = self.node.clone();
        fresh.attested_at = now;
        let fresh_issue = Issue {
            node: &fresh,
            ..issue
        };
        if engine
            .decide(&PolicyRequest::Issue(fresh_issue), now)
            .allowed
        {
            if self.node.can_reattest {
                return Err(ServiceError::ReattestRequired(format!(
                    "entry {id:?} ({}) needs a fresher node attestation{why} ({reasons}); attest again",
                    entry.spiffe_id
                )));
            }
            return Err(ServiceError::PolicyDenied {
                message: format!(
                    "entry {id:?} ({}) needs a fresher node attestation{why} ({reasons}), which \
                     this agent's attestor ({}) cannot give; enrol the agent with a re-attestable \
                     attestor such as x509pop, or relax the entry's max_attestation_age",
                    entry.spiffe_id, self.node.attestor
                ),
                reasons: decision.reasons,
            });
        }
        Err(ServiceError::PolicyDenied {
            message: format!(
                "policy denies a {kind} for entry {id:?} ({}){why}: {reasons}",
                entry.spiffe_id
            ),
            reasons: decision.reasons,
        })
    }

    /// The entry's own step-up rules this node does not meet, as a phrase
    /// for error messages (empty when it meets them): what the built-in
    /// policies enforce, said in words an operator can act on.
    fn unmet_entry_rules(&self, entry: &Entry, now: OffsetDateTime) -> String {
        let mut unmet = Vec::new();
        if let Some(min) = entry.min_assurance
            && self.node.assurance < min
        {
            unmet.push(format!(
                "it requires {min} assurance and the node has {} ({})",
                self.node.assurance, self.node.attestor
            ));
        }
        if let Some(age) = entry.max_attestation_age
            && now - self.node.attested_at > age.as_time()
        {
            unmet.push(format!(
                "it requires a node attestation within {age} and the node last attested at {}",
                self.node.attested_at
            ));
        }
        if unmet.is_empty() {
            String::new()
        } else {
            format!(": {}", unmet.join("; "))
        }
    }
}

/// What an issuance asks for, as policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct IssueAsk<'a> {
    /// JWT-SVID (else X.509-SVID).
    pub jwt: bool,
    /// JWT audience; empty for X.509.
    pub audience: &'a [String],
    /// The task asking; empty for shared entries.
    pub task_id: &'a str,
}

/// An issuance that registration and policy allow.
#[derive(Debug, Clone)]
pub struct Authorized {
    /// The entry.
    pub entry: Arc<Entry>,
    /// The TTL to sign with: the entry's or the default, capped by policy.
    pub ttl: Ttl,
}

/// The leaf of the client's verified chain, or `Unauthenticated`.
pub fn peer_leaf(certs: Option<&[CertificateDer<'static>]>) -> ServiceResult<SvidInfo> {
    let leaf = certs.and_then(<[_]>::first).ok_or_else(|| {
        ServiceError::Unauthenticated(
            "this call needs the agent's X.509-SVID as TLS client certificate".into(),
        )
    })?;
    SvidInfo::from_der(leaf).map_err(|e| {
        ServiceError::Unauthenticated(format!("the client certificate is not an SVID: {e}"))
    })
}

/// The issuer of the client's leaf must still be in the bundle: the TLS
/// handshake checked the chain against the bundle of that moment, and a
/// connection can outlive a revocation. The leaf names its CA by its
/// AuthorityKeyIdentifier (the CA's id), or else by issuer name. Returns
/// the CA's id when the leaf names it, so that long-lived streams can
/// re-check it when the bundle changes.
pub fn check_issuer(
    ctx: &NodeCtx,
    certs: Option<&[CertificateDer<'static>]>,
) -> ServiceResult<Option<String>> {
    let Some(leaf) = certs.and_then(<[_]>::first) else {
        return Ok(None); // peer_leaf reports the missing certificate
    };
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| {
        ServiceError::Unauthenticated(format!("the client certificate does not parse: {e}"))
    })?;
    let aki = cert
        .extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(aki) => {
                aki.key_identifier.as_ref().map(|k| hex::encode(k.0))
            }
            _ => None,
        });
    let trusted = match &aki {
        Some(aki) => issuer_trusted(ctx, aki),
        None => ctx.state.bundle().x509_authorities.iter().any(|ca| {
            x509_parser::parse_x509_certificate(ca)
                .is_ok_and(|(_, ca)| ca.subject().as_raw() == cert.issuer().as_raw())
        }),
    };
    if trusted {
        Ok(aki)
    } else {
        Err(untrusted_issuer())
    }
}

/// Whether X.509 authority `id` is still in the bundle.
pub fn issuer_trusted(ctx: &NodeCtx, id: &str) -> bool {
    ctx.state
        .authorities
        .snapshot()
        .list(Kind::X509)
        .iter()
        .any(|a| a.id == id)
}

/// The refusal of an SVID whose CA left the bundle.
pub fn untrusted_issuer() -> ServiceError {
    ServiceError::Unauthenticated(
        "the agent SVID was issued by an authority that is no longer trusted; attest again".into(),
    )
}

/// Checks the client SVID against the stored node without writing:
/// `Some` for the node's current SVID, `None` for its renewed SVID (whose
/// first use [`authenticate`] records). It reads the node record (a small,
/// hot tree, served from the store's cache), so that async handlers can
/// call it in place.
pub fn authenticate_current(ctx: &NodeCtx, svid: &SvidInfo) -> ServiceResult<Option<Agent>> {
    let state = &ctx.state;
    let id = &svid.spiffe_id;
    if !id.is_member_of(state.trust_domain()) || !mayfly::id::is_agent_id(id) {
        return Err(ServiceError::Unauthenticated(format!(
            "{id} is not an agent of trust domain {}",
            state.trust_domain()
        )));
    }
    if svid.not_after <= state.now() {
        return Err(ServiceError::Unauthenticated(
            "agent SVID has expired; attest again".into(),
        ));
    }
    let key = id.to_string();
    let node = state
        .store
        .get_node(&key)?
        .ok_or_else(|| ServiceError::Unauthenticated(NOT_ATTESTED.into()))?;
    check_usable(&node)?;
    if node.current_serial == svid.serial_hex {
        return Ok(Some(Agent::from_node(node)));
    }
    if node.next_serial.as_deref() != Some(svid.serial_hex.as_str()) {
        return Err(ServiceError::Unauthenticated(SUPERSEDED.into()));
    }
    Ok(None)
}

/// Checks the client SVID against the stored node. Blocking (it writes the
/// node when a renewed SVID is first used).
pub fn authenticate(ctx: &NodeCtx, svid: &SvidInfo) -> ServiceResult<Agent> {
    if let Some(agent) = authenticate_current(ctx, svid)? {
        return Ok(agent);
    }
    let id = &svid.spiffe_id;
    let key = id.to_string();
    // First use of a renewed SVID: it becomes current and the old one stops
    // working.
    let node = ctx.update_node(&key, |n| {
        if n.next_serial.as_deref() == Some(svid.serial_hex.as_str()) {
            n.current_serial = svid.serial_hex.clone();
            n.next_serial = None;
            n.svid_expires_at = svid.not_after;
            Ok(())
        } else if n.current_serial == svid.serial_hex {
            // Another call promoted it first.
            Ok(())
        } else {
            Err(ServiceError::Unauthenticated(SUPERSEDED.into()))
        }
    })?;
    tracing::info!(agent = %id, serial = %svid.serial_hex, "agent switched to its renewed SVID");
    Ok(Agent::from_node(node))
}

/// `PermissionDenied` for a banned node.
pub fn check_usable(node: &NodeRecord) -> ServiceResult<()> {
    if node.banned {
        return Err(ServiceError::PermissionDenied(BANNED.into()));
    }
    Ok(())
}

/// Re-reads the node of a long-lived stream: gone → `Unauthenticated`,
/// banned → `PermissionDenied`, else the agent with its current record.
/// Blocking.
pub fn recheck(ctx: &NodeCtx, spiffe_id: &SpiffeId) -> ServiceResult<Agent> {
    let node = ctx
        .state
        .store
        .get_node(&spiffe_id.to_string())?
        .ok_or_else(|| ServiceError::Unauthenticated(NOT_ATTESTED.into()))?;
    check_usable(&node)?;
    Ok(Agent::from_node(node))
}
