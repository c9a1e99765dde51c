//! Audit record types and their canonical hash.
//!
//! A record's `hash` is the lowercase hex SHA-256 of
//! `"mayfly-audit-v1\n"` followed by the compact JSON (no whitespace) of
//! these fields, in this order:
//!
//! `seq`, `time` (RFC 3339 text as stored), `actor` (`kind`, `id`,
//! `authenticated_by`), `action`, `target` (string or `null`), `decision`,
//! `reasons` (array), `result`, `message` (string or `null`), `details`
//! (an object, keys sorted), `prev_hash`.
//!
//! The encoding comes from serialising a struct (never a map), so the field
//! order is fixed by the code; `details` is re-sorted before hashing, so
//! that the hash does not depend on how a JSON library orders object keys.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;

/// The `prev_hash` of the first record: 64 zeros.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Domain separation prefix of the hashed bytes (and the format version).
const HASH_PREFIX: &[u8] = b"mayfly-audit-v1\n";

/// Who acted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActorKind {
    /// An attested agent (id: its SPIFFE ID) or one attesting.
    Agent,
    /// A person or program using the admin API (id: `unix:uid:<uid>`).
    Operator,
    /// The server itself (id: its SPIFFE ID).
    Server,
    /// A workload (id: its SPIFFE ID).
    Workload,
}

/// The actor of an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// What kind of actor.
    pub kind: ActorKind,
    /// Its identity: an agent SPIFFE ID, `unix:uid:<uid>`, the server ID.
    /// For an attestation that failed before an agent ID was known, the
    /// peer address.
    pub id: String,
    /// How that identity was established (`x509_svid`,
    /// `unix_peer_credentials`, `join_token`, `none`, ...).
    pub authenticated_by: String,
}

impl Actor {
    /// An actor.
    pub fn new(
        kind: ActorKind,
        id: impl Into<String>,
        authenticated_by: impl Into<String>,
    ) -> Self {
        Self {
            kind,
            id: id.into(),
            authenticated_by: authenticated_by.into(),
        }
    }
}

/// The authorization decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// Allowed (the operation may still have failed: see the result).
    Allow,
    /// Denied by policy, a ban, a bad credential or a registration rule.
    Deny,
}

/// How the operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// It succeeded.
    Ok,
    /// It failed (the message says why).
    Error,
}

/// What a caller hands to the audit log. Never put secrets here: no
/// tokens, keys or join-token values (a token's *id* is fine).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Who.
    pub actor: Actor,
    /// What, as a dotted name: `node.attest`, `x509.issue`, `agent.ban`,
    /// `admin.POST /v1/entries`, ...
    pub action: String,
    /// On what: a SPIFFE ID, entry id or agent id.
    pub target: Option<String>,
    /// Allowed or denied.
    pub decision: Decision,
    /// Why (policy ids, refusal reasons).
    pub reasons: Vec<String>,
    /// Whether it succeeded.
    pub result: Outcome,
    /// The error text when it failed.
    pub message: Option<String>,
    /// Small facts: serial, jti, task id, ttl, audience, attestor, ...
    pub details: BTreeMap<String, serde_json::Value>,
}

impl AuditEvent {
    /// An allowed, successful event with no target, reasons or details.
    pub fn ok(actor: Actor, action: impl Into<String>) -> Self {
        Self {
            actor,
            action: action.into(),
            target: None,
            decision: Decision::Allow,
            reasons: Vec::new(),
            result: Outcome::Ok,
            message: None,
            details: BTreeMap::new(),
        }
    }

    /// The event for an operation that failed with `error`: denied when the
    /// error is a refusal (policy, permission, authentication, ban), with
    /// the policy's reasons when it is a policy denial.
    pub fn failed(
        actor: Actor,
        action: impl Into<String>,
        error: &crate::error::ServiceError,
    ) -> Self {
        use crate::error::ServiceError as E;
        let (decision, reasons) = match error {
            E::PolicyDenied { reasons, .. } => (Decision::Deny, reasons.clone()),
            E::PermissionDenied(_)
            | E::Unauthenticated(_)
            | E::FailedPrecondition(_)
            | E::ReattestRequired(_)
            | E::RateLimited(_) => (Decision::Deny, Vec::new()),
            _ => (Decision::Allow, Vec::new()),
        };
        Self {
            decision,
            reasons,
            result: Outcome::Error,
            message: Some(error.to_string()),
            ..Self::ok(actor, action)
        }
    }

    /// Sets the target.
    #[must_use]
    pub fn target(mut self, target: impl Into<String>) -> Self {
        self.target = Some(target.into());
        self
    }

    /// Adds one detail.
    #[must_use]
    pub fn detail(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.details.insert(key.to_owned(), value.into());
        self
    }
}

/// A stored audit record: the event, its place in the chain, and hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Position, from 1, contiguous.
    pub seq: u64,
    /// When it was recorded (the server's injected clock).
    #[serde(with = "time::serde::rfc3339")]
    pub time: OffsetDateTime,
    /// The event.
    #[serde(flatten)]
    pub event: AuditEvent,
    /// Hash of the previous record ([`GENESIS_HASH`] for seq 1).
    pub prev_hash: String,
    /// Hash of this record (see the module documentation).
    pub hash: String,
}

/// The last record of a chain: what the store keeps beside the records so
/// that a truncated tail is detected.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHead {
    /// Seq of the last record (0 when empty).
    pub seq: u64,
    /// Its hash ([`GENESIS_HASH`] when empty).
    pub hash: String,
}

impl AuditHead {
    /// The head of an empty log.
    pub fn empty() -> Self {
        Self {
            seq: 0,
            hash: GENESIS_HASH.to_owned(),
        }
    }
}

/// The fields that are hashed, in their fixed order.
#[derive(Serialize)]
struct Hashed<'a> {
    seq: u64,
    time: &'a str,
    actor: &'a Actor,
    action: &'a str,
    target: &'a Option<String>,
    decision: Decision,
    reasons: &'a [String],
    result: Outcome,
    message: &'a Option<String>,
    details: BTreeMap<&'a str, Canonical<'a>>,
    prev_hash: &'a str,
}

/// A JSON value whose objects serialise with sorted keys.
struct Canonical<'a>(&'a serde_json::Value);

impl Serialize for Canonical<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            serde_json::Value::Object(m) => {
                let sorted: BTreeMap<&str, Canonical<'_>> =
                    m.iter().map(|(k, v)| (k.as_str(), Canonical(v))).collect();
                sorted.serialize(s)
            }
            serde_json::Value::Array(a) => {
                let items: Vec<Canonical<'_>> = a.iter().map(Canonical).collect();
                items.serialize(s)
            }
            other => other.serialize(s),
        }
    }
}

/// RFC 3339 text of a record time, as hashed and stored.
pub fn format_time(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

impl AuditRecord {
    /// Builds record `seq` after a record whose hash is `prev_hash`, and
    /// computes its hash. `time` is kept to the microsecond, so that it
    /// reads back exactly from its RFC 3339 text.
    pub fn new(seq: u64, time: OffsetDateTime, event: AuditEvent, prev_hash: String) -> Self {
        let micros = time.microsecond();
        let time = time.replace_microsecond(micros).unwrap_or(time);
        let mut r = Self {
            seq,
            time,
            event,
            prev_hash,
            hash: String::new(),
        };
        r.hash = r.compute_hash();
        r
    }

    /// The hash this record's fields give (compare with [`Self::hash`]).
    pub fn compute_hash(&self) -> String {
        let time = format_time(self.time);
        let e = &self.event;
        let hashed = Hashed {
            seq: self.seq,
            time: &time,
            actor: &e.actor,
            action: &e.action,
            target: &e.target,
            decision: e.decision,
            reasons: &e.reasons,
            result: e.result,
            message: &e.message,
            details: e
                .details
                .iter()
                .map(|(k, v)| (k.as_str(), Canonical(v)))
                .collect(),
            prev_hash: &self.prev_hash,
        };
        let mut h = Sha256::new();
        h.update(HASH_PREFIX);
        // Serialising plain structs, strings and JSON values cannot fail;
        // if it ever did, the empty encoding gives a hash that verify flags.
        h.update(serde_json::to_vec(&hashed).unwrap_or_default());
        hex::encode(h.finalize())
    }

    /// This record as the chain's head.
    pub fn head(&self) -> AuditHead {
        AuditHead {
            seq: self.seq,
            hash: self.hash.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_stable_across_a_json_round_trip_and_covers_every_field() {
        let now = OffsetDateTime::now_utc();
        let event = AuditEvent::ok(
            Actor::new(ActorKind::Operator, "unix:uid:1", "unix_peer_credentials"),
            "entry.create",
        )
        .target("spiffe://example.org/web")
        .detail("ttl", 3600)
        .detail(
            "nested",
            serde_json::json!({"b": 1, "a": [1, {"z": 0, "y": 1}]}),
        );
        let r = AuditRecord::new(1, now, event, GENESIS_HASH.into());
        let text = serde_json::to_string(&r).unwrap();
        let back: AuditRecord = serde_json::from_str(&text).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.compute_hash(), r.hash);

        let mut m = r.clone();
        m.event.decision = Decision::Deny;
        assert_ne!(m.compute_hash(), r.hash);
        let mut m = r.clone();
        m.event.details.insert("ttl".into(), 60.into());
        assert_ne!(m.compute_hash(), r.hash);
        let mut m = r.clone();
        m.prev_hash = "1".repeat(64);
        assert_ne!(m.compute_hash(), r.hash);
        let mut m = r.clone();
        m.time += time::Duration::microseconds(1);
        assert_ne!(m.compute_hash(), r.hash);
        let mut m = r;
        m.event.actor.id = "unix:uid:0".into();
        assert_ne!(m.compute_hash(), m.hash);
    }
}
