//! The JWT-SVIDs `FetchJWTSVID` hands out, kept per (entry, audience set) and reused until half
//! their lifetime, so that a workload asking often does not cost a server round trip each time,
//! while a token handed out always has at least half its life left.
//!
//! Every decision takes `now`; nothing here reads a clock. The cache is bounded: when full it
//! first forgets tokens past their reuse time, then the least recently used ones.

use std::collections::{BTreeSet, HashMap};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use mayfly::bundle::TrustBundle;
use mayfly::entry::EntryId;
use zeroize::Zeroizing;

/// Tokens kept at most by default.
pub const DEFAULT_CAPACITY: usize = 4096;

/// Identifies the tokens that may stand for each other: same entry, same audiences (order and
/// duplicates do not matter).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JwtKey {
    entry_id: EntryId,
    audience: Vec<String>,
}

impl JwtKey {
    /// The key for `entry_id` and `audience` (sorted and deduplicated here).
    pub fn new(entry_id: &EntryId, audience: &[String]) -> Self {
        let audience: BTreeSet<&String> = audience.iter().collect();
        Self {
            entry_id: entry_id.clone(),
            audience: audience.into_iter().cloned().collect(),
        }
    }
}

/// A token held, with what the reuse and taint decisions need.
struct Held {
    /// The compact token (a bearer credential: zeroized on drop, never logged).
    token: Zeroizing<String>,
    /// `kid` of its header, when it has one.
    key_id: Option<String>,
    /// `iat`, Unix seconds (when minted, if the token has none).
    issued_at: i64,
    /// `exp`, Unix seconds.
    expires_at: i64,
    /// Use counter value at last use (for LRU eviction).
    last_used: u64,
}

impl Held {
    /// The token may be handed out at `now` (Unix seconds): before half its lifetime.
    fn reusable_at(&self, now: i64) -> bool {
        now < reuse_until(self.issued_at, self.expires_at)
    }
}

/// The instant (Unix seconds) until which a token issued at `issued_at` and expiring at
/// `expires_at` is reused: half its lifetime, and never at or after its expiry.
pub fn reuse_until(issued_at: i64, expires_at: i64) -> i64 {
    let life = expires_at.saturating_sub(issued_at).max(0);
    issued_at.saturating_add(life / 2).min(expires_at)
}

/// The `kid` header and `iat` claim of a compact JWT, read without verifying it (the token
/// comes from the server over mutual TLS; these only steer caching).
pub fn peek(token: &str) -> (Option<String>, Option<i64>) {
    let mut parts = token.split('.');
    let decode = |part: Option<&str>| -> Option<serde_json::Value> {
        let bytes = URL_SAFE_NO_PAD.decode(part?).ok()?;
        serde_json::from_slice(&bytes).ok()
    };
    let header = decode(parts.next());
    let claims = decode(parts.next());
    let kid = header
        .as_ref()
        .and_then(|h| h.get("kid"))
        .and_then(|k| k.as_str())
        .map(str::to_owned);
    let iat = claims
        .as_ref()
        .and_then(|c| c.get("iat"))
        .and_then(serde_json::Value::as_i64);
    (kid, iat)
}

/// The cache. Not synchronised: the Workload API holds it behind a mutex, never across an
/// await.
pub struct JwtSvidCache {
    capacity: usize,
    held: HashMap<JwtKey, Held>,
    uses: u64,
    /// Sequence and tainted/known key ids of the bundle last applied.
    seen_bundle: Option<(u64, Vec<String>, Vec<String>)>,
}

impl std::fmt::Debug for JwtSvidCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSvidCache")
            .field("capacity", &self.capacity)
            .field("held", &self.held.len())
            .finish_non_exhaustive()
    }
}

impl Default for JwtSvidCache {
    fn default() -> Self {
        Self::new(DEFAULT_CAPACITY)
    }
}

impl JwtSvidCache {
    /// A cache holding at most `capacity` tokens (at least one).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            held: HashMap::new(),
            uses: 0,
            seen_bundle: None,
        }
    }

    /// Tokens held.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether no token is held.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// A held token for `key` that may still be handed out at `now` (Unix seconds). A token
    /// past its reuse time is forgotten.
    pub fn get(&mut self, key: &JwtKey, now: i64) -> Option<String> {
        let reusable = self.held.get(key).map(|h| h.reusable_at(now))?;
        if !reusable {
            self.held.remove(key);
            return None;
        }
        self.uses += 1;
        let uses = self.uses;
        let held = self.held.get_mut(key)?;
        held.last_used = uses;
        Some(held.token.to_string())
    }

    /// Keeps a freshly minted token (expiring at `expires_at`, Unix seconds, minted at `now`)
    /// for reuse; a token already past its reuse time is not kept.
    pub fn insert(&mut self, key: JwtKey, token: &str, expires_at: i64, now: i64) {
        let (key_id, iat) = peek(token);
        let held = Held {
            token: Zeroizing::new(token.to_owned()),
            key_id,
            // A token claiming to be issued in the future is counted from now.
            issued_at: iat.map_or(now, |i| i.min(now)),
            expires_at,
            last_used: 0,
        };
        if !held.reusable_at(now) {
            self.held.remove(&key);
            return;
        }
        if !self.held.contains_key(&key) && self.held.len() >= self.capacity {
            self.held.retain(|_, h| h.reusable_at(now));
            if self.held.len() >= self.capacity
                && let Some(oldest) = self
                    .held
                    .iter()
                    .min_by_key(|(_, h)| h.last_used)
                    .map(|(k, _)| k.clone())
            {
                self.held.remove(&oldest);
            }
        }
        self.uses += 1;
        self.held.insert(
            key,
            Held {
                last_used: self.uses,
                ..held
            },
        );
    }

    /// Follows a bundle change: forgets every token signed by a key the bundle lists as
    /// tainted, or by a key no longer in the bundle (revoked). Returns what was dropped, as
    /// (entry, key id), for the log. Cheap when the bundle did not change.
    pub fn apply_bundle(&mut self, bundle: &TrustBundle) -> Vec<(EntryId, String)> {
        let known: Vec<String> = bundle
            .jwt_authorities
            .iter()
            .map(|a| a.key_id.clone())
            .collect();
        let seen = (bundle.sequence, known, bundle.tainted_jwt_key_ids.clone());
        if self.seen_bundle.as_ref() == Some(&seen) {
            return Vec::new();
        }
        let (_, known, tainted) = &seen;
        let mut dropped = Vec::new();
        self.held.retain(|key, h| {
            let keep = h
                .key_id
                .as_ref()
                .is_none_or(|kid| known.contains(kid) && !tainted.contains(kid));
            if !keep {
                dropped.push((key.entry_id.clone(), h.key_id.clone().unwrap_or_default()));
            }
            keep
        });
        self.seen_bundle = Some(seen);
        dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mayfly::TrustDomain;
    use mayfly::jwt::{JwtClaims, JwtSigningKey};

    fn id(s: &str) -> EntryId {
        s.parse().unwrap()
    }

    fn token(key: &JwtSigningKey, iat: i64, exp: i64) -> String {
        key.mint(&JwtClaims {
            sub: "spiffe://example.org/a".into(),
            aud: vec!["x".into()],
            exp,
            iat,
            jti: uuid::Uuid::new_v4().to_string(),
            iss: None,
        })
        .unwrap()
    }

    fn bundle(keys: &[&JwtSigningKey], tainted: &[&JwtSigningKey], sequence: u64) -> TrustBundle {
        let mut b = TrustBundle::new(TrustDomain::new("example.org").unwrap());
        for k in keys {
            b.jwt_authorities.push(k.authority(None).unwrap());
        }
        b.tainted_jwt_key_ids = tainted.iter().map(|k| k.key_id().to_owned()).collect();
        b.sequence = sequence;
        b
    }

    #[test]
    fn the_audience_set_is_the_key_whatever_its_order() {
        let a = JwtKey::new(&id("e"), &["b".into(), "a".into(), "b".into()]);
        let b = JwtKey::new(&id("e"), &["a".into(), "b".into()]);
        assert_eq!(a, b);
        assert_ne!(a, JwtKey::new(&id("e"), &["a".into()]));
        assert_ne!(a, JwtKey::new(&id("f"), &["a".into(), "b".into()]));
    }

    #[test]
    fn reused_until_half_life_then_forgotten() {
        let k = JwtSigningKey::generate().unwrap();
        let t0 = 1_800_000_000;
        let t = token(&k, t0, t0 + 300);
        assert_eq!(peek(&t), (Some(k.key_id().to_owned()), Some(t0)));
        assert_eq!(reuse_until(t0, t0 + 300), t0 + 150);
        let mut c = JwtSvidCache::default();
        let key = JwtKey::new(&id("e"), &["x".into()]);
        c.insert(key.clone(), &t, t0 + 300, t0 + 1);
        assert_eq!(c.get(&key, t0 + 1).as_deref(), Some(t.as_str()));
        assert_eq!(c.get(&key, t0 + 149).as_deref(), Some(t.as_str()));
        assert_eq!(c.get(&key, t0 + 150), None, "half life reached");
        assert!(c.is_empty(), "a token past its reuse time is forgotten");
        // Never an expired token, even one minted long ago.
        c.insert(key.clone(), &t, t0 + 300, t0 + 400);
        assert!(c.is_empty());
        assert_eq!(c.get(&key, t0 + 400), None);
        // A token without iat counts from when it was minted.
        c.insert(key.clone(), "opaque", t0 + 100, t0);
        assert_eq!(c.get(&key, t0 + 49).as_deref(), Some("opaque"));
        assert_eq!(c.get(&key, t0 + 50), None);
    }

    #[test]
    fn bounded_dropping_stale_then_least_recently_used() {
        let t0 = 1_800_000_000;
        let mut c = JwtSvidCache::new(2);
        let (a, b, d) = (
            JwtKey::new(&id("a"), &["x".into()]),
            JwtKey::new(&id("b"), &["x".into()]),
            JwtKey::new(&id("d"), &["x".into()]),
        );
        c.insert(a.clone(), "ta", t0 + 100, t0);
        c.insert(b.clone(), "tb", t0 + 100, t0);
        assert!(c.get(&a, t0 + 1).is_some(), "a used last");
        c.insert(d.clone(), "td", t0 + 100, t0 + 2);
        assert_eq!(c.len(), 2);
        assert!(c.get(&b, t0 + 3).is_none(), "b was least recently used");
        assert!(c.get(&a, t0 + 3).is_some() && c.get(&d, t0 + 3).is_some());
        // Stale tokens go first.
        let mut c = JwtSvidCache::new(2);
        c.insert(a.clone(), "ta", t0 + 10, t0);
        c.insert(b.clone(), "tb", t0 + 100, t0);
        c.insert(d.clone(), "td", t0 + 100, t0 + 6);
        assert!(c.get(&a, t0 + 6).is_none());
        assert!(c.get(&b, t0 + 6).is_some());
    }

    #[test]
    fn tokens_of_tainted_or_removed_keys_are_dropped() {
        let (k1, k2) = (
            JwtSigningKey::generate().unwrap(),
            JwtSigningKey::generate().unwrap(),
        );
        let t0 = 1_800_000_000;
        let mut c = JwtSvidCache::default();
        let (a, b) = (
            JwtKey::new(&id("a"), &["x".into()]),
            JwtKey::new(&id("b"), &["x".into()]),
        );
        c.insert(a.clone(), &token(&k1, t0, t0 + 300), t0 + 300, t0);
        c.insert(b.clone(), &token(&k2, t0, t0 + 300), t0 + 300, t0);
        assert!(c.apply_bundle(&bundle(&[&k1, &k2], &[], 1)).is_empty());
        let dropped = c.apply_bundle(&bundle(&[&k1, &k2], &[&k1], 2));
        assert_eq!(dropped, vec![(id("a"), k1.key_id().to_owned())]);
        assert!(c.get(&a, t0 + 1).is_none());
        assert!(c.get(&b, t0 + 1).is_some());
        // k2 revoked: removed from the bundle.
        let dropped = c.apply_bundle(&bundle(&[&k1], &[&k1], 3));
        assert_eq!(dropped, vec![(id("b"), k2.key_id().to_owned())]);
        assert!(c.is_empty());
    }
}
