//! Registration entries: which workloads, under which agents, get which
//! SPIFFE ID, for how long, and under what conditions.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use spiffe::{SpiffeId, TrustDomain};
use time::OffsetDateTime;

use crate::id;
use crate::proto::node as pb;
use crate::selector::{Selector, SelectorSet};
use crate::ttl::Ttl;

/// Why an entry (or an entry field) was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EntryError {
    /// An entry id is empty, too long or has characters outside `[A-Za-z0-9_-]`
    /// (and is not a `template:` id of a derived entry).
    #[error("entry id {0:?} must be 1-64 characters of letters, digits, '-' or '_'")]
    BadId(String),
    /// A SPIFFE ID field does not parse.
    #[error("{field} {value:?} is not a valid SPIFFE ID: {reason}")]
    BadSpiffeId {
        /// Which field.
        field: &'static str,
        /// What was given.
        value: String,
        /// Why it was rejected.
        reason: String,
    },
    /// A SPIFFE ID is outside the server's trust domain.
    #[error("{field} {value} is not in trust domain {trust_domain}")]
    ForeignTrustDomain {
        /// Which field.
        field: &'static str,
        /// The ID.
        value: String,
        /// The server's trust domain.
        trust_domain: String,
    },
    /// The SPIFFE ID is in the path space reserved for Mayfly itself.
    #[error("spiffe_id {0} is reserved for Mayfly's own identities (/mayfly/...)")]
    ReservedId(String),
    /// The entry has no selectors.
    #[error("an entry needs at least one selector")]
    NoSelectors,
    /// A selector does not parse.
    #[error(transparent)]
    Selector(#[from] crate::selector::SelectorError),
    /// A DNS name is not a valid host name.
    #[error("dns name {0:?} is not a valid DNS name")]
    BadDnsName(String),
    /// A federated trust domain name is invalid.
    #[error("federates_with {0:?} is not a valid trust domain")]
    BadFederatesWith(String),
    /// An enumerated field has an unknown value.
    #[error("{field} must be one of {allowed}, not {value:?}")]
    BadValue {
        /// Which field.
        field: &'static str,
        /// Allowed values.
        allowed: &'static str,
        /// What was given.
        value: String,
    },
    /// A TTL field is invalid.
    #[error(transparent)]
    Ttl(#[from] crate::ttl::TtlError),
    /// A timestamp is out of range.
    #[error("{0} is not a valid timestamp")]
    BadTimestamp(&'static str),
}

/// An entry's identifier: opaque, URL-safe, unique within the server.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EntryId(String);

impl EntryId {
    /// A new random id.
    pub fn random() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }

    /// The id as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for EntryId {
    type Err = EntryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(d) = crate::template::DerivedId::parse(s) {
            // An entry derived from an identity template (never stored).
            let ok = !d.template.is_empty()
                && d.template.bytes().all(|b| {
                    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.'
                })
                && crate::k8s_psat::is_dns_label(d.namespace)
                && crate::k8s_psat::is_dns_subdomain(d.service_account);
            return if ok {
                Ok(Self(s.to_owned()))
            } else {
                Err(EntryError::BadId(s.to_owned()))
            };
        }
        if s.is_empty()
            || s.len() > 64
            || !s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(EntryError::BadId(s.to_owned()));
        }
        Ok(Self(s.to_owned()))
    }
}

impl TryFrom<String> for EntryId {
    type Error = EntryError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<EntryId> for String {
    fn from(id: EntryId) -> Self {
        id.0
    }
}

impl fmt::Display for EntryId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How credentials for an entry are shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// One credential per task instance, revoked when the task ends.
    #[default]
    Task,
    /// One credential per entry per agent, shared by every matching task.
    Shared,
}

impl FromStr for Scope {
    type Err = EntryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "task" | "" => Ok(Self::Task),
            "shared" => Ok(Self::Shared),
            other => Err(EntryError::BadValue {
                field: "scope",
                allowed: "task, shared",
                value: other.to_owned(),
            }),
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Task => "task",
            Self::Shared => "shared",
        })
    }
}

/// How strongly a node proved its identity; set by its attestor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Assurance {
    /// A bearer secret, such as a join token.
    Low,
    /// A platform-signed token, such as a Kubernetes projected token.
    Medium,
    /// Proof of possession of a hardware- or CA-bound key.
    High,
}

impl FromStr for Assurance {
    type Err = EntryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "low" => Ok(Self::Low),
            "medium" => Ok(Self::Medium),
            "high" => Ok(Self::High),
            other => Err(EntryError::BadValue {
                field: "min_assurance",
                allowed: "low, medium, high",
                value: other.to_owned(),
            }),
        }
    }
}

impl fmt::Display for Assurance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Low => "low",
            Self::Medium => "medium",
            Self::High => "high",
        })
    }
}

/// A registration entry, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Unique id.
    pub id: EntryId,
    /// The identity issued to matching workloads.
    #[serde(with = "spiffe_id_serde")]
    pub spiffe_id: SpiffeId,
    /// The agent (or node alias) under which the entry applies.
    #[serde(with = "spiffe_id_serde")]
    pub parent_id: SpiffeId,
    /// Selectors a workload must all have.
    pub selectors: SelectorSet,
    /// X.509-SVID lifetime; the server default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509_svid_ttl: Option<Ttl>,
    /// JWT-SVID lifetime; the server default when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_svid_ttl: Option<Ttl>,
    /// DNS SANs added to X.509-SVIDs (the first is also the subject CN).
    #[serde(default)]
    pub dns_names: Vec<String>,
    /// Trust domains whose bundles the workload also receives.
    #[serde(default)]
    pub federates_with: Vec<String>,
    /// Whether the identity may call the admin API.
    #[serde(default)]
    pub admin: bool,
    /// Whether the identity may act as a downstream (nested) CA.
    #[serde(default)]
    pub downstream: bool,
    /// A hint passed to workloads holding several SVIDs.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub hint: String,
    /// When the entry stops applying.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub expires_at: Option<OffsetDateTime>,
    /// Incremented on every change.
    #[serde(default)]
    pub revision: u64,
    /// Per-task or shared credentials.
    #[serde(default)]
    pub scope: Scope,
    /// The least node assurance required to receive this identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_assurance: Option<Assurance>,
    /// The node must have fully attested within this age (step-up).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attestation_age: Option<Ttl>,
}

/// The fields an operator sets when creating or replacing an entry; checked
/// by [`EntrySpec::validate`] before it becomes an [`Entry`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntrySpec {
    /// Optional id to use (a random one otherwise); ignored on update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The identity issued to matching workloads.
    pub spiffe_id: String,
    /// The agent or node alias under which the entry applies.
    pub parent_id: String,
    /// `type:value` selectors.
    pub selectors: Vec<String>,
    /// X.509-SVID TTL, e.g. `1h`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x509_svid_ttl: Option<String>,
    /// JWT-SVID TTL, e.g. `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_svid_ttl: Option<String>,
    /// DNS SANs.
    #[serde(default)]
    pub dns_names: Vec<String>,
    /// Federated trust domains.
    #[serde(default)]
    pub federates_with: Vec<String>,
    /// Admin flag.
    #[serde(default)]
    pub admin: bool,
    /// Downstream flag.
    #[serde(default)]
    pub downstream: bool,
    /// Hint.
    #[serde(default)]
    pub hint: String,
    /// Expiry, RFC 3339.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "time::serde::rfc3339::option"
    )]
    pub expires_at: Option<OffsetDateTime>,
    /// `task` (default) or `shared`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// `low`, `medium` or `high`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_assurance: Option<String>,
    /// Step-up age, e.g. `10m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attestation_age: Option<String>,
}

fn parse_id(field: &'static str, value: &str, td: &TrustDomain) -> Result<SpiffeId, EntryError> {
    let id = SpiffeId::new(value).map_err(|e| EntryError::BadSpiffeId {
        field,
        value: value.to_owned(),
        reason: e.to_string(),
    })?;
    if !id.is_member_of(td) {
        return Err(EntryError::ForeignTrustDomain {
            field,
            value: value.to_owned(),
            trust_domain: td.to_string(),
        });
    }
    Ok(id)
}

/// Whether `name` is a DNS host name (optionally a leading `*.` wildcard).
pub fn is_dns_name(name: &str) -> bool {
    let name = name.strip_prefix("*.").unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

impl EntrySpec {
    /// Checks every field and builds the entry. `id` is the entry's id
    /// (a new one for creation, the existing one for an update).
    pub fn validate(
        &self,
        td: &TrustDomain,
        id: EntryId,
        revision: u64,
    ) -> Result<Entry, EntryError> {
        let spiffe_id = parse_id("spiffe_id", &self.spiffe_id, td)?;
        if id::is_reserved(&spiffe_id) {
            return Err(EntryError::ReservedId(spiffe_id.to_string()));
        }
        let parent_id = parse_id("parent_id", &self.parent_id, td)?;
        if self.selectors.is_empty() {
            return Err(EntryError::NoSelectors);
        }
        let selectors = self
            .selectors
            .iter()
            .map(|s| s.parse::<Selector>())
            .collect::<Result<SelectorSet, _>>()?;
        for name in &self.dns_names {
            if !is_dns_name(name) {
                return Err(EntryError::BadDnsName(name.clone()));
            }
        }
        for fed in &self.federates_with {
            let name = fed.strip_prefix("spiffe://").unwrap_or(fed);
            if TrustDomain::new(name).is_err() {
                return Err(EntryError::BadFederatesWith(fed.clone()));
            }
        }
        let ttl = |v: &Option<String>| v.as_deref().map(str::parse::<Ttl>).transpose();
        Ok(Entry {
            id,
            spiffe_id,
            parent_id,
            selectors,
            x509_svid_ttl: ttl(&self.x509_svid_ttl)?,
            jwt_svid_ttl: ttl(&self.jwt_svid_ttl)?,
            dns_names: self.dns_names.clone(),
            federates_with: self.federates_with.clone(),
            admin: self.admin,
            downstream: self.downstream,
            hint: self.hint.clone(),
            expires_at: self.expires_at,
            revision,
            scope: self.scope.as_deref().unwrap_or("task").parse()?,
            min_assurance: self.min_assurance.as_deref().map(str::parse).transpose()?,
            max_attestation_age: ttl(&self.max_attestation_age)?,
        })
    }
}

impl Entry {
    /// Whether the entry has expired at `now`.
    pub fn is_expired(&self, now: OffsetDateTime) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }

    /// The entry as an operator would write it, for updates.
    pub fn to_spec(&self) -> EntrySpec {
        EntrySpec {
            id: Some(self.id.to_string()),
            spiffe_id: self.spiffe_id.to_string(),
            parent_id: self.parent_id.to_string(),
            selectors: self.selectors.iter().map(ToString::to_string).collect(),
            x509_svid_ttl: self.x509_svid_ttl.map(|t| t.to_string()),
            jwt_svid_ttl: self.jwt_svid_ttl.map(|t| t.to_string()),
            dns_names: self.dns_names.clone(),
            federates_with: self.federates_with.clone(),
            admin: self.admin,
            downstream: self.downstream,
            hint: self.hint.clone(),
            expires_at: self.expires_at,
            scope: Some(self.scope.to_string()),
            min_assurance: self.min_assurance.map(|a| a.to_string()),
            max_attestation_age: self.max_attestation_age.map(|t| t.to_string()),
        }
    }

    /// The wire form used by the node API.
    pub fn to_proto(&self) -> pb::Entry {
        let secs = |t: Option<Ttl>| t.map_or(0, |t| i64::try_from(t.as_secs()).unwrap_or(i64::MAX));
        pb::Entry {
            id: self.id.to_string(),
            spiffe_id: self.spiffe_id.to_string(),
            parent_id: self.parent_id.to_string(),
            selectors: self
                .selectors
                .iter()
                .map(|s| pb::Selector {
                    r#type: s.kind().to_owned(),
                    value: s.value().to_owned(),
                })
                .collect(),
            x509_svid_ttl_seconds: secs(self.x509_svid_ttl),
            jwt_svid_ttl_seconds: secs(self.jwt_svid_ttl),
            dns_names: self.dns_names.clone(),
            federates_with: self.federates_with.clone(),
            admin: self.admin,
            downstream: self.downstream,
            hint: self.hint.clone(),
            expires_at: self.expires_at.map_or(0, OffsetDateTime::unix_timestamp),
            revision: self.revision,
            scope: self.scope.to_string(),
            min_assurance: self
                .min_assurance
                .map(|a| a.to_string())
                .unwrap_or_default(),
            max_attestation_age_seconds: secs(self.max_attestation_age),
        }
    }

    /// Parses the node API wire form, validating every field.
    pub fn from_proto(p: &pb::Entry) -> Result<Self, EntryError> {
        let id_of = |field: &'static str, v: &str| {
            SpiffeId::new(v).map_err(|e| EntryError::BadSpiffeId {
                field,
                value: v.to_owned(),
                reason: e.to_string(),
            })
        };
        let ttl = |s: i64| u64::try_from(s).ok().and_then(Ttl::from_secs);
        Ok(Self {
            id: p.id.parse()?,
            spiffe_id: id_of("spiffe_id", &p.spiffe_id)?,
            parent_id: id_of("parent_id", &p.parent_id)?,
            selectors: p
                .selectors
                .iter()
                .map(|s| Selector::new(s.r#type.clone(), s.value.clone()))
                .collect::<Result<_, _>>()?,
            x509_svid_ttl: ttl(p.x509_svid_ttl_seconds),
            jwt_svid_ttl: ttl(p.jwt_svid_ttl_seconds),
            dns_names: p.dns_names.clone(),
            federates_with: p.federates_with.clone(),
            admin: p.admin,
            downstream: p.downstream,
            hint: p.hint.clone(),
            expires_at: match p.expires_at {
                0 => None,
                t => Some(
                    OffsetDateTime::from_unix_timestamp(t)
                        .map_err(|_| EntryError::BadTimestamp("expires_at"))?,
                ),
            },
            revision: p.revision,
            scope: p.scope.parse()?,
            min_assurance: match p.min_assurance.as_str() {
                "" => None,
                a => Some(a.parse()?),
            },
            max_attestation_age: ttl(p.max_attestation_age_seconds),
        })
    }
}

/// Serde for [`SpiffeId`] as its string form.
pub mod spiffe_id_serde {
    use serde::{Deserialize, Deserializer, Serializer};
    use spiffe::SpiffeId;

    /// Serializes as `spiffe://...`.
    pub fn serialize<S: Serializer>(id: &SpiffeId, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&id.to_string())
    }

    /// Parses and validates.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SpiffeId, D::Error> {
        let s = String::deserialize(d)?;
        SpiffeId::new(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn spec() -> EntrySpec {
        EntrySpec {
            spiffe_id: "spiffe://example.org/web".into(),
            parent_id: "spiffe://example.org/mayfly/agent/join_token/a".into(),
            selectors: vec!["unix:uid:1000".into()],
            x509_svid_ttl: Some("1h".into()),
            ..Default::default()
        }
    }

    #[test]
    fn validates_a_good_spec_and_round_trips() {
        let e = spec().validate(&td(), EntryId::random(), 1).unwrap();
        assert_eq!(e.scope, Scope::Task);
        assert_eq!(e.x509_svid_ttl.unwrap().as_secs(), 3600);
        assert_eq!(Entry::from_proto(&e.to_proto()).unwrap(), e);
        let json = serde_json::to_string(&e).unwrap();
        assert_eq!(serde_json::from_str::<Entry>(&json).unwrap(), e);
        assert_eq!(e.to_spec().validate(&td(), e.id.clone(), 1).unwrap(), e);
    }

    #[test]
    fn rejects_bad_specs() {
        let bad = |f: fn(&mut EntrySpec)| {
            let mut s = spec();
            f(&mut s);
            s.validate(&td(), EntryId::random(), 1).unwrap_err()
        };
        assert!(matches!(
            bad(|s| s.spiffe_id = "http://x".into()),
            EntryError::BadSpiffeId { .. }
        ));
        assert!(matches!(
            bad(|s| s.spiffe_id = "spiffe://other.org/x".into()),
            EntryError::ForeignTrustDomain { .. }
        ));
        assert!(matches!(
            bad(|s| s.spiffe_id = "spiffe://example.org/mayfly/agent/x".into()),
            EntryError::ReservedId(_)
        ));
        assert!(matches!(
            bad(|s| s.selectors.clear()),
            EntryError::NoSelectors
        ));
        assert!(matches!(
            bad(|s| s.selectors = vec!["nope".into()]),
            EntryError::Selector(_)
        ));
        assert!(matches!(
            bad(|s| s.dns_names = vec!["bad name".into()]),
            EntryError::BadDnsName(_)
        ));
        assert!(matches!(
            bad(|s| s.scope = Some("global".into())),
            EntryError::BadValue { .. }
        ));
        assert!(matches!(
            bad(|s| s.x509_svid_ttl = Some("soon".into())),
            EntryError::Ttl(_)
        ));
        assert!(
            serde_json::from_str::<EntrySpec>(
                r#"{"spiffe_id":"a","parent_id":"b","selectors":[],"colour":1}"#
            )
            .is_err()
        );
    }

    #[test]
    fn entry_ids() {
        assert!("abc-DEF_1".parse::<EntryId>().is_ok());
        assert!("".parse::<EntryId>().is_err());
        assert!("a/b".parse::<EntryId>().is_err());
    }
}
