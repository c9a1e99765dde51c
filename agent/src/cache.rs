//! What the agent knows and serves: its authorized entries, the trust
//! bundle, and the X.509-SVIDs it holds for entries, published through a
//! `tokio::sync::watch` channel so that every open Workload API stream sees
//! each change at once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use mayfly::SpiffeId;
use mayfly::bundle::TrustBundle;
use mayfly::entry::{Entry, EntryId};
use time::OffsetDateTime;
use tokio::sync::watch;
use zeroize::Zeroizing;

use crate::revocation::Revocations;
use crate::task::TaskRegistry;

/// An X.509-SVID held for one entry.
pub struct CachedSvid {
    /// The entry it was issued for.
    pub entry_id: EntryId,
    /// Its SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// DER certificates, leaf first.
    pub chain_der: Vec<Vec<u8>>,
    /// PKCS#8 DER private key (secret; zeroized on drop, never logged).
    pub key_pkcs8: Zeroizing<Vec<u8>>,
    /// NotBefore of the leaf.
    pub not_before: OffsetDateTime,
    /// NotAfter of the leaf.
    pub expires_at: OffsetDateTime,
    /// When the agent received it (its own clock). Renewal counts the lifetime from here when
    /// this is later than `not_before`, because the CA backdates `not_before` a little to
    /// absorb clock skew, which would otherwise move the half-life point of a short-lived
    /// SVID into the past.
    pub received_at: OffsetDateTime,
    /// The entry's hint.
    pub hint: String,
}

impl CachedSvid {
    /// Whether the leaf may be handed out at `now`: past its NotBefore and before its NotAfter.
    pub fn is_valid_at(&self, now: OffsetDateTime) -> bool {
        self.not_before <= now && now < self.expires_at
    }
}

/// The serial (lower-case hex) of an SVID's leaf; `None` when it cannot be parsed.
pub fn svid_serial(svid: &CachedSvid) -> Option<String> {
    let leaf = svid.chain_der.first()?;
    mayfly::x509::SvidInfo::from_der(leaf)
        .ok()
        .map(|i| i.serial_hex.to_ascii_lowercase())
}

impl std::fmt::Debug for CachedSvid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedSvid")
            .field("entry_id", &self.entry_id)
            .field("spiffe_id", &self.spiffe_id)
            .field("not_before", &self.not_before)
            .field("expires_at", &self.expires_at)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// One consistent view of the agent's state.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// False until the first sync with the server completed (or a stored
    /// state was loaded); the Workload API answers `Unavailable` meanwhile.
    pub ready: bool,
    /// Entries authorized for this agent, by id.
    pub entries: BTreeMap<EntryId, Arc<Entry>>,
    /// The agent's own trust domain bundle.
    pub bundle: Option<Arc<TrustBundle>>,
    /// X.509-SVIDs by entry id. An entry without one here is still being signed.
    pub svids: BTreeMap<EntryId, Arc<CachedSvid>>,
    /// Registration revision last received from the server.
    pub revision: u64,
    /// Entries whose SVID expired before a new one could be obtained (the server was
    /// unreachable or refused): the Workload API tells their callers so instead of waiting.
    /// An entry leaves this set when it gets a new SVID or is removed.
    pub expired: BTreeSet<EntryId>,
    /// The tasks seen and their credentials (for task-scoped entries).
    pub tasks: TaskRegistry,
    /// Credentials revoked by the server, until they would have expired.
    pub revocations: Revocations,
    /// The current CRLs (DER) of the trust domain's X.509 authorities, handed to workloads.
    pub crls: Arc<Vec<Vec<u8>>>,
    /// Identity templates that apply to this agent (automatic pod identities).
    pub templates: Arc<Vec<mayfly::template::IdentityTemplate>>,
    /// This agent's SPIFFE ID as of the last sync (the parent of derived entries).
    pub agent_id: Option<mayfly::SpiffeId>,
}

/// The shared, watchable state.
#[derive(Debug, Clone)]
pub struct Cache {
    tx: Arc<watch::Sender<Arc<Snapshot>>>,
}

impl Default for Cache {
    fn default() -> Self {
        Self::new()
    }
}

impl Cache {
    /// An empty, not-ready cache.
    pub fn new() -> Self {
        let (tx, _) = watch::channel(Arc::new(Snapshot::default()));
        Self { tx: Arc::new(tx) }
    }

    /// The current state.
    pub fn current(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// Follows every change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// Applies a change and publishes the result to every subscriber.
    pub fn update(&self, f: impl FnOnce(&mut Snapshot)) {
        self.tx.send_modify(|current| {
            let mut next = (**current).clone();
            f(&mut next);
            *current = Arc::new(next);
        });
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An SVID for entry `entry` signed by a throwaway CA, and its serial.
    pub(crate) fn test_svid(entry: &str) -> (Arc<CachedSvid>, String) {
        use mayfly::x509::{CaParams, SvidParams, VerifiedCsr, X509Authority, new_key_and_csr};
        let td = mayfly::TrustDomain::new("example.org").unwrap();
        let now = OffsetDateTime::now_utc();
        let ca = X509Authority::generate(
            &CaParams {
                trust_domain: td,
                ttl: time::Duration::hours(1),
                subject: "Test".into(),
            },
            now,
        )
        .unwrap();
        let k = new_key_and_csr().unwrap();
        let id = SpiffeId::new(format!("spiffe://example.org/{entry}")).unwrap();
        let signed = ca
            .sign_svid(
                &VerifiedCsr::from_der(&k.csr_der).unwrap(),
                &SvidParams {
                    spiffe_id: &id,
                    dns_names: &[],
                    ttl: time::Duration::minutes(10),
                },
                now,
            )
            .unwrap();
        let serial = signed.serial_hex();
        let svid = CachedSvid {
            entry_id: entry.parse().unwrap(),
            spiffe_id: id,
            chain_der: vec![signed.der],
            key_pkcs8: k.key_pkcs8,
            not_before: now - time::Duration::seconds(10),
            expires_at: signed.not_after,
            received_at: now,
            hint: String::new(),
        };
        assert_eq!(svid_serial(&svid).as_deref(), Some(serial.as_str()));
        (Arc::new(svid), serial)
    }

    #[tokio::test]
    async fn subscribers_see_updates() {
        let cache = Cache::new();
        let mut rx = cache.subscribe();
        assert!(!cache.current().ready);
        cache.update(|s| {
            s.ready = true;
            s.revision = 3;
        });
        rx.changed().await.unwrap();
        assert!(rx.borrow().ready);
        assert_eq!(cache.current().revision, 3);
    }
}
