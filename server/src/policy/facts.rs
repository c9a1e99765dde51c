//! The attribute values policies see, computed once.
//!
//! A node, an entry and a request context are turned into the plain values
//! of their Cedar attributes here, and only here: the Cedar entities
//! ([`super::request`]) and the pre-filter ([`super::prefilter`]) are both
//! built from these values, so that they can never disagree about what a
//! policy sees.

use mayfly::entry::{Assurance, Entry, Scope};
use time::OffsetDateTime;

use crate::store::NodeRecord;

/// The number policies see for an assurance level: 1 low, 2 medium, 3 high.
pub fn assurance_level(a: Assurance) -> i64 {
    match a {
        Assurance::Low => 1,
        Assurance::Medium => 2,
        Assurance::High => 3,
    }
}

/// Seconds since the node's last full attestation (0 if in the future).
pub fn attestation_age(node: &NodeRecord, now: OffsetDateTime) -> i64 {
    (now - node.attested_at).whole_seconds().max(0)
}

/// Seconds as a Cedar Long (saturating: Cedar's Long is an `i64`).
pub fn secs(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// The attributes of a `Mayfly::Node` entity (its id is `spiffe_id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts {
    /// The agent's SPIFFE ID; also the entity id.
    pub spiffe_id: String,
    /// Node attestor.
    pub attestor: String,
    /// [`assurance_level`].
    pub assurance: i64,
    /// Node selectors, `type:value`.
    pub selectors: Vec<String>,
    /// Last full attestation, unix seconds.
    pub attested_at: i64,
    /// [`attestation_age`] at the decision time.
    pub attestation_age: i64,
    /// Banned.
    pub banned: bool,
    /// Whether its attestor can prove itself again.
    pub can_reattest: bool,
}

impl NodeFacts {
    /// The facts of `node` at `now`.
    pub fn of(node: &NodeRecord, now: OffsetDateTime) -> Self {
        Self {
            spiffe_id: node.spiffe_id.to_string(),
            attestor: node.attestor.clone(),
            assurance: assurance_level(node.assurance),
            selectors: node.selectors.iter().map(ToString::to_string).collect(),
            attested_at: node.attested_at.unix_timestamp(),
            attestation_age: attestation_age(node, now),
            banned: node.banned,
            can_reattest: node.can_reattest,
        }
    }
}

/// The attributes of a `Mayfly::Entry` entity (its id is `id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryFacts {
    /// The entry id; the entity id.
    pub id: String,
    /// The SPIFFE ID it issues.
    pub spiffe_id: String,
    /// Its parent.
    pub parent_id: String,
    /// Its selectors, `type:value` (also the workload's `selectors`).
    pub selectors: Vec<String>,
    /// 0 none, else [`assurance_level`].
    pub min_assurance: i64,
    /// Seconds, 0 = none.
    pub max_attestation_age: i64,
    /// Admin entry.
    pub admin: bool,
    /// Downstream entry.
    pub downstream: bool,
    /// `task` or `shared`.
    pub scope: &'static str,
    /// Seconds, 0 = the server default.
    pub x509_svid_ttl: i64,
    /// Seconds, 0 = the server default.
    pub jwt_svid_ttl: i64,
}

impl EntryFacts {
    /// The facts of `entry`.
    pub fn of(entry: &Entry) -> Self {
        Self {
            id: entry.id.as_str().to_owned(),
            spiffe_id: entry.spiffe_id.to_string(),
            parent_id: entry.parent_id.to_string(),
            selectors: entry.selectors.iter().map(ToString::to_string).collect(),
            min_assurance: entry.min_assurance.map_or(0, assurance_level),
            max_attestation_age: secs(entry.max_attestation_age.map_or(0, |t| t.as_secs())),
            admin: entry.admin,
            downstream: entry.downstream,
            scope: match entry.scope {
                Scope::Shared => "shared",
                _ => "task",
            },
            x509_svid_ttl: secs(entry.x509_svid_ttl.map_or(0, |t| t.as_secs())),
            jwt_svid_ttl: secs(entry.jwt_svid_ttl.map_or(0, |t| t.as_secs())),
        }
    }
}

/// The request context (`Mayfly::RequestContext`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextFacts<'a> {
    /// Decision time, unix seconds.
    pub now: i64,
    /// Hour of `now`, UTC.
    pub hour: i64,
    /// ISO weekday of `now`, UTC (1 = Monday).
    pub weekday: i64,
    /// Seconds (0 when none).
    pub requested_ttl: i64,
    /// JWT audience, else empty.
    pub audience: &'a [String],
    /// True for `renew_agent`.
    pub renewal: bool,
    /// Seconds since the node's last full attestation (0 when it does not
    /// apply).
    pub attestation_age: i64,
}

impl<'a> ContextFacts<'a> {
    /// A context at `now` with the values that vary per action.
    pub fn at(
        now: OffsetDateTime,
        requested_ttl: u64,
        audience: &'a [String],
        renewal: bool,
        attestation_age: i64,
    ) -> Self {
        let utc = now.to_offset(time::UtcOffset::UTC);
        Self {
            now: utc.unix_timestamp(),
            hour: i64::from(utc.hour()),
            weekday: i64::from(utc.weekday().number_from_monday()),
            requested_ttl: secs(requested_ttl),
            audience,
            renewal,
            attestation_age,
        }
    }
}
