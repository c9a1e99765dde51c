//! Revocations of single credentials: an X.509-SVID by serial or a
//! JWT-SVID by `jti`, kept until the credential would have expired anyway.
//!
//! Pure: the current time is always passed in.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::proto::node as pb;

/// Errors reading revocations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RevocationError {
    /// The serial is not hexadecimal.
    #[error("serial {0:?} is not hexadecimal")]
    BadSerial(String),
    /// The `jti` is empty or too long.
    #[error("jti {0:?} is not valid (1 to 256 characters)")]
    BadJti(String),
    /// Neither or both of serial and jti were given.
    #[error("exactly one of serial and jti must be set")]
    NotExactlyOne,
    /// The reason is not one of the known ones.
    #[error(
        "unknown revocation reason {0:?} (expected task_ended, task_completed, entry_deleted, agent_banned, agent_evicted or operator)"
    )]
    BadReason(String),
    /// A timestamp is out of range.
    #[error("timestamp {0} is out of range")]
    BadTime(i64),
}

/// Which credential is revoked.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialId {
    /// An X.509-SVID, by serial (lower-case hex, no separators).
    Serial(String),
    /// A JWT-SVID, by `jti`.
    Jti(String),
}

impl CredentialId {
    /// An X.509 serial given as hex (upper or lower case, `:` separators
    /// allowed), normalised to lower-case hex without leading zero bytes
    /// beyond what DER needs (as `hex::encode` of the serial bytes).
    pub fn serial(text: &str) -> Result<Self, RevocationError> {
        let s: String = text
            .trim()
            .chars()
            .filter(|c| *c != ':')
            .collect::<String>()
            .to_ascii_lowercase();
        if s.is_empty() || s.len() > 80 || !s.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(RevocationError::BadSerial(text.to_owned()));
        }
        let s = if s.len() % 2 == 1 { format!("0{s}") } else { s };
        Ok(Self::Serial(s))
    }

    /// A JWT-SVID `jti`.
    pub fn jti(text: &str) -> Result<Self, RevocationError> {
        if text.is_empty() || text.len() > 256 {
            return Err(RevocationError::BadJti(text.to_owned()));
        }
        Ok(Self::Jti(text.to_owned()))
    }

    /// A stable key, `x509:<serial>` or `jwt:<jti>`, for stores and maps.
    pub fn key(&self) -> String {
        match self {
            Self::Serial(s) => format!("x509:{s}"),
            Self::Jti(j) => format!("jwt:{j}"),
        }
    }

    /// The serial's bytes (big-endian), when this is a serial.
    pub fn serial_bytes(&self) -> Option<Vec<u8>> {
        match self {
            Self::Serial(s) => hex::decode(s).ok(),
            Self::Jti(_) => None,
        }
    }
}

impl fmt::Display for CredentialId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Serial(s) => write!(f, "serial {s}"),
            Self::Jti(j) => write!(f, "jti {j}"),
        }
    }
}

/// Why a credential was revoked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Reason {
    /// The task's process exited.
    TaskEnded,
    /// The task called `Task/Complete`.
    TaskCompleted,
    /// The registration entry it was issued under was deleted.
    EntryDeleted,
    /// The agent it was issued to was banned.
    AgentBanned,
    /// The agent it was issued to was evicted.
    AgentEvicted,
    /// An operator revoked it.
    Operator,
}

impl Reason {
    /// The wire form (`task_ended`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TaskEnded => "task_ended",
            Self::TaskCompleted => "task_completed",
            Self::EntryDeleted => "entry_deleted",
            Self::AgentBanned => "agent_banned",
            Self::AgentEvicted => "agent_evicted",
            Self::Operator => "operator",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Reason {
    type Err = RevocationError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "task_ended" => Self::TaskEnded,
            "task_completed" => Self::TaskCompleted,
            "entry_deleted" => Self::EntryDeleted,
            "agent_banned" => Self::AgentBanned,
            "agent_evicted" => Self::AgentEvicted,
            "operator" => Self::Operator,
            other => return Err(RevocationError::BadReason(other.to_owned())),
        })
    }
}

/// One revoked credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// The credential.
    pub id: CredentialId,
    /// The X.509 authority id or JWT key id that signed it.
    pub authority_id: String,
    /// When the credential expires; the revocation is kept until then.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// Why.
    pub reason: Reason,
    /// When it was revoked.
    #[serde(with = "time::serde::rfc3339")]
    pub revoked_at: OffsetDateTime,
}

impl Revocation {
    /// Whether the credential has expired at `now` (so the revocation can go).
    pub fn expired(&self, now: OffsetDateTime) -> bool {
        self.expires_at <= now
    }

    /// The node API form.
    pub fn to_proto(&self) -> pb::Revocation {
        let (serial, jti) = match &self.id {
            CredentialId::Serial(s) => (s.clone(), String::new()),
            CredentialId::Jti(j) => (String::new(), j.clone()),
        };
        pb::Revocation {
            serial,
            jti,
            authority_id: self.authority_id.clone(),
            expires_at: self.expires_at.unix_timestamp(),
            reason: self.reason.as_str().to_owned(),
            revoked_at: self.revoked_at.unix_timestamp(),
        }
    }

    /// Reads the node API form.
    pub fn from_proto(p: &pb::Revocation) -> Result<Self, RevocationError> {
        let id = match (p.serial.is_empty(), p.jti.is_empty()) {
            (false, true) => CredentialId::serial(&p.serial)?,
            (true, false) => CredentialId::jti(&p.jti)?,
            _ => return Err(RevocationError::NotExactlyOne),
        };
        let at = |t: i64| {
            OffsetDateTime::from_unix_timestamp(t).map_err(|_| RevocationError::BadTime(t))
        };
        Ok(Self {
            id,
            authority_id: p.authority_id.clone(),
            expires_at: at(p.expires_at)?,
            reason: p.reason.parse()?,
            revoked_at: at(p.revoked_at)?,
        })
    }
}

/// Drops the revocations whose credentials have expired at `now`; returns
/// how many were dropped.
pub fn prune(set: &mut Vec<Revocation>, now: OffsetDateTime) -> usize {
    let before = set.len();
    set.retain(|r| !r.expired(now));
    before - set.len()
}

/// Revocations indexed for lookup by serial or `jti`.
#[derive(Debug, Clone, Default)]
pub struct RevocationSet {
    by_id: HashMap<CredentialId, Revocation>,
}

impl RevocationSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a revocation; returns `false` (and keeps the first) when the
    /// credential was already revoked.
    pub fn insert(&mut self, r: Revocation) -> bool {
        if self.by_id.contains_key(&r.id) {
            return false;
        }
        self.by_id.insert(r.id.clone(), r);
        true
    }

    /// Whether this credential is revoked.
    pub fn contains(&self, id: &CredentialId) -> bool {
        self.by_id.contains_key(id)
    }

    /// Whether the X.509 serial (lower-case hex) is revoked.
    pub fn contains_serial(&self, serial_hex: &str) -> bool {
        self.by_id
            .contains_key(&CredentialId::Serial(serial_hex.to_owned()))
    }

    /// Whether the JWT `jti` is revoked.
    pub fn contains_jti(&self, jti: &str) -> bool {
        self.by_id.contains_key(&CredentialId::Jti(jti.to_owned()))
    }

    /// One revocation.
    pub fn get(&self, id: &CredentialId) -> Option<&Revocation> {
        self.by_id.get(id)
    }

    /// Drops expired revocations; returns them.
    pub fn prune(&mut self, now: OffsetDateTime) -> Vec<Revocation> {
        let gone: Vec<CredentialId> = self
            .by_id
            .values()
            .filter(|r| r.expired(now))
            .map(|r| r.id.clone())
            .collect();
        gone.iter().filter_map(|id| self.by_id.remove(id)).collect()
    }

    /// Every revocation, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Revocation> {
        self.by_id.values()
    }

    /// Every revocation, ordered by credential id.
    pub fn sorted(&self) -> Vec<&Revocation> {
        let mut v: Vec<&Revocation> = self.by_id.values().collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// How many.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }
}

impl FromIterator<Revocation> for RevocationSet {
    fn from_iter<I: IntoIterator<Item = Revocation>>(iter: I) -> Self {
        let mut s = Self::new();
        for r in iter {
            s.insert(r);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::Duration;

    fn now() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
    }

    fn rev(id: CredentialId, ttl: i64) -> Revocation {
        Revocation {
            id,
            authority_id: "ab".into(),
            expires_at: now() + Duration::seconds(ttl),
            reason: Reason::TaskEnded,
            revoked_at: now(),
        }
    }

    #[test]
    fn serials_are_normalised_and_checked() {
        assert_eq!(
            CredentialId::serial("0A:bC").unwrap(),
            CredentialId::Serial("0abc".into())
        );
        assert_eq!(
            CredentialId::serial("abc").unwrap(),
            CredentialId::Serial("0abc".into())
        );
        assert!(CredentialId::serial("xyz").is_err());
        assert!(CredentialId::serial("").is_err());
        assert!(CredentialId::jti("").is_err());
        assert_eq!(
            CredentialId::serial("0abc").unwrap().serial_bytes(),
            Some(vec![0x0a, 0xbc])
        );
    }

    #[test]
    fn reasons_round_trip() {
        for r in [
            Reason::TaskEnded,
            Reason::TaskCompleted,
            Reason::EntryDeleted,
            Reason::AgentBanned,
            Reason::AgentEvicted,
            Reason::Operator,
        ] {
            assert_eq!(r.as_str().parse::<Reason>().unwrap(), r);
        }
        assert!("nope".parse::<Reason>().is_err());
    }

    #[test]
    fn proto_round_trip_and_exactly_one_id() {
        for id in [
            CredentialId::Serial("01ff".into()),
            CredentialId::Jti("j1".into()),
        ] {
            let r = rev(id, 60);
            assert_eq!(Revocation::from_proto(&r.to_proto()).unwrap(), r);
        }
        let mut p = rev(CredentialId::Jti("j".into()), 1).to_proto();
        p.serial = "01".into();
        assert!(matches!(
            Revocation::from_proto(&p),
            Err(RevocationError::NotExactlyOne)
        ));
    }

    #[test]
    fn set_lookups_and_pruning() {
        let mut set: RevocationSet = [
            rev(CredentialId::Serial("01".into()), 10),
            rev(CredentialId::Jti("j".into()), 100),
        ]
        .into_iter()
        .collect();
        assert!(set.contains_serial("01"));
        assert!(set.contains_jti("j"));
        assert!(!set.contains_jti("01"));
        assert!(!set.insert(rev(CredentialId::Jti("j".into()), 5)));
        let gone = set.prune(now() + Duration::seconds(10));
        assert_eq!(gone.len(), 1);
        assert!(!set.contains_serial("01"));
        assert_eq!(set.len(), 1);

        let mut v = vec![
            rev(CredentialId::Jti("a".into()), 1),
            rev(CredentialId::Jti("b".into()), 3),
        ];
        assert_eq!(prune(&mut v, now() + Duration::seconds(2)), 1);
        assert_eq!(v.len(), 1);
    }
}
