//! Revocations pushed by the server (`SyncResponse.revocations`): the serials and `jti`s the
//! agent must never serve or accept again, each kept until the credential would have expired
//! anyway.

use std::collections::BTreeMap;

use mayfly::proto::node as pb;
use time::OffsetDateTime;

/// The revoked credentials the agent knows of, with their expiry (Unix seconds).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Revocations {
    serials: BTreeMap<String, i64>,
    jtis: BTreeMap<String, i64>,
}

impl Revocations {
    /// Whether the X.509 serial (lower-case hex) is revoked.
    pub fn serial(&self, serial: &str) -> bool {
        self.serials.contains_key(serial)
    }

    /// Whether the JWT-SVID `jti` is revoked.
    pub fn jti(&self, jti: &str) -> bool {
        self.jtis.contains_key(jti)
    }

    /// How many revocations are held.
    pub fn len(&self) -> usize {
        self.serials.len() + self.jtis.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.serials.is_empty() && self.jtis.is_empty()
    }

    /// Adds a revoked serial (lower-case hex) until `expires_at`.
    pub fn add_serial(&mut self, serial: String, expires_at: i64) {
        self.serials.insert(serial.to_ascii_lowercase(), expires_at);
    }

    /// Adds a revoked `jti` until `expires_at`.
    pub fn add_jti(&mut self, jti: String, expires_at: i64) {
        self.jtis.insert(jti, expires_at);
    }

    /// Applies the revocations of one sync message at `now`: a full update replaces the set, a
    /// delta adds to it; those already expired are dropped. Returns whether the set changed.
    pub fn apply(&mut self, full: bool, list: &[pb::Revocation], now: OffsetDateTime) -> bool {
        let before = self.clone();
        if full {
            self.serials.clear();
            self.jtis.clear();
        }
        for r in list {
            if !r.serial.is_empty() {
                self.add_serial(r.serial.clone(), r.expires_at);
            } else if !r.jti.is_empty() {
                self.add_jti(r.jti.clone(), r.expires_at);
            }
        }
        self.prune(now);
        *self != before
    }

    /// Drops the revocations of credentials expired at `now`. Returns whether any was dropped.
    pub fn prune(&mut self, now: OffsetDateTime) -> bool {
        let now = now.unix_timestamp();
        let before = self.len();
        self.serials.retain(|_, exp| *exp > now);
        self.jtis.retain(|_, exp| *exp > now);
        before != self.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000 + s).unwrap()
    }

    fn serial(s: &str, exp: i64) -> pb::Revocation {
        pb::Revocation {
            serial: s.into(),
            expires_at: t(exp).unix_timestamp(),
            ..Default::default()
        }
    }

    fn jti(s: &str, exp: i64) -> pb::Revocation {
        pb::Revocation {
            jti: s.into(),
            expires_at: t(exp).unix_timestamp(),
            ..Default::default()
        }
    }

    #[test]
    fn full_replaces_delta_adds_expired_are_dropped() {
        let mut r = Revocations::default();
        assert!(r.apply(
            true,
            &[serial("AA01", 100), jti("j1", 100), serial("bb", -1)],
            t(0)
        ));
        assert!(r.serial("aa01"), "serials compare in lower case");
        assert!(r.jti("j1"));
        assert!(!r.serial("bb"), "already expired: not kept");
        assert!(r.apply(false, &[jti("j2", 50)], t(0)));
        assert!(r.jti("j1") && r.jti("j2") && r.serial("aa01"));
        assert!(!r.apply(false, &[], t(0)), "an empty delta changes nothing");
        // A full update is the complete set.
        assert!(r.apply(true, &[jti("j2", 50)], t(0)));
        assert!(!r.jti("j1") && !r.serial("aa01") && r.jti("j2"));
        // Past their natural expiry they are pruned.
        assert!(!r.prune(t(49)));
        assert!(r.prune(t(50)));
        assert!(r.is_empty());
    }
}
