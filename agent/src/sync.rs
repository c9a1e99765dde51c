//! The sync task: keeps one `Sync` stream open to the server, applies its
//! snapshots and deltas to the [`Cache`] (entries, bundle, revocations and
//! CRLs), keeps an X.509-SVID for every authorized `shared` entry (signed
//! through `SignX509`, renewed at half life; `task` entries get one per task,
//! see [`crate::task`]), and renews the agent's own SVID. It reconnects with exponential backoff and
//! jitter when the stream breaks, and never crashes the agent: when the
//! server refuses the agent itself it says in the log what an operator must
//! do and keeps retrying slowly.
//!
//! Every decision (what a message changes, which SVIDs to sign now, when to
//! wake up) is a pure function of the snapshot and `now`, tested without a
//! network; the task only does the I/O around them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration as StdDuration;

use mayfly::TrustDomain;
use mayfly::bundle::TrustBundle;
use mayfly::clock::Clock;
use mayfly::entry::{Entry, EntryId};
use mayfly::proto::node as pb;
use mayfly::x509::{KeyAndCsr, SvidInfo};
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;
use tokio::sync::watch;
use tonic::Code;

use crate::attest::{AgentSvid, NodeAttestor};
use crate::cache::{Cache, CachedSvid, Snapshot, svid_serial};
use crate::client::tls::TrustAnchors;
use crate::client::{ClientError, ServerClient};
use crate::storage::Storage;

/// CSRs per `SignX509` call.
pub const SIGN_BATCH: usize = 100;
/// First reconnect delay.
pub const BACKOFF_MIN: StdDuration = StdDuration::from_millis(250);
/// Longest reconnect delay.
pub const BACKOFF_MAX: StdDuration = StdDuration::from_secs(30);
/// Retry interval while the server refuses the agent itself.
pub const REJECTED_RETRY: StdDuration = StdDuration::from_secs(60);
/// Retry delay after a failed `SignX509` (server unreachable).
const SIGN_RETRY: time::Duration = time::Duration::seconds(5);
/// Retry delay after the server refused to sign an entry.
const SIGN_REFUSED_RETRY: time::Duration = time::Duration::seconds(60);
/// Retry delay after a failed agent SVID renewal.
const RENEW_RETRY: time::Duration = time::Duration::seconds(10);
/// The longest single sleep, so that a wall clock jump is noticed.
const MAX_SLEEP: StdDuration = StdDuration::from_secs(60);
/// Rotation happens at half life ± this fraction of the lifetime.
pub const JITTER: f64 = 0.1;

// ---------------------------------------------------------------------------
// Pure decisions
// ---------------------------------------------------------------------------

/// What applying one `SyncResponse` changed.
#[derive(Debug, Default)]
pub struct Applied {
    /// The new bundle, when the message carried one for our trust domain.
    pub bundle: Option<Arc<TrustBundle>>,
    /// Entries whose SVID no longer matches the entry (identity, DNS names,
    /// TTL or hint changed) and must be signed again.
    pub changed: Vec<EntryId>,
    /// SVIDs dropped because their entry is gone.
    pub dropped_svids: Vec<EntryId>,
    /// Parts of the message that were ignored, and why.
    pub warnings: Vec<String>,
}

/// Whether an entry change needs a new SVID.
fn svid_affected(old: &Entry, new: &Entry) -> bool {
    old.spiffe_id != new.spiffe_id
        || old.dns_names != new.dns_names
        || old.x509_svid_ttl != new.x509_svid_ttl
        || old.hint != new.hint
}

/// Whether a bundle changed in a way that matters (authorities or sequence);
/// representation details such as JWK members added by the JSON form do not
/// count.
fn bundle_differs(old: &TrustBundle, new: &TrustBundle) -> bool {
    let kids = |b: &TrustBundle| {
        b.jwt_authorities
            .iter()
            .map(|a| a.key_id.clone())
            .collect::<Vec<_>>()
    };
    old.trust_domain != new.trust_domain
        || old.sequence != new.sequence
        || old.x509_authorities != new.x509_authorities
        || kids(old) != kids(new)
        || old.tainted_x509_authorities != new.tainted_x509_authorities
        || old.tainted_jwt_key_ids != new.tainted_jwt_key_ids
}

/// Applies a `SyncResponse` to a snapshot: a full update replaces the
/// entries (and marks the snapshot ready), a delta upserts and removes; SVIDs
/// of entries no longer present are dropped. Malformed entries are skipped
/// and reported in [`Applied::warnings`].
pub fn apply_sync_response(
    snap: &mut Snapshot,
    resp: &pb::SyncResponse,
    trust_domain: &TrustDomain,
) -> Applied {
    apply_sync_response_as(snap, resp, trust_domain, None)
}

/// [`apply_sync_response`] for the agent `agent_id`: a full update also
/// replaces the identity templates, and keeps the entries derived from the
/// ones still sent (see [`crate::templates`]).
pub fn apply_sync_response_as(
    snap: &mut Snapshot,
    resp: &pb::SyncResponse,
    trust_domain: &TrustDomain,
    agent_id: Option<&mayfly::SpiffeId>,
) -> Applied {
    let mut applied = Applied::default();
    let mut upserts = Vec::with_capacity(resp.upserted.len());
    for p in &resp.upserted {
        match Entry::from_proto(p) {
            Ok(e) => upserts.push(e),
            Err(e) => applied
                .warnings
                .push(format!("entry {:?} ignored: {e}", p.id)),
        }
    }
    let mut next: BTreeMap<EntryId, Arc<Entry>> = if resp.full {
        BTreeMap::new()
    } else {
        snap.entries.clone()
    };
    if !resp.full {
        for raw in &resp.removed_entry_ids {
            match raw.parse::<EntryId>() {
                Ok(id) => {
                    next.remove(&id);
                }
                Err(e) => applied
                    .warnings
                    .push(format!("removed entry id {raw:?} ignored: {e}")),
            }
        }
    }
    if resp.full {
        let (templates, warnings) = crate::templates::parse(&resp.templates);
        applied.warnings.extend(warnings);
        if let Some(agent) = agent_id {
            crate::templates::carry_over(&mut next, &snap.entries, &templates, trust_domain, agent);
            snap.agent_id = Some(agent.clone());
        }
        snap.templates = Arc::new(templates);
    }
    for e in upserts {
        if let Some(old) = snap.entries.get(&e.id)
            && snap.svids.contains_key(&e.id)
            && svid_affected(old, &e)
        {
            applied.changed.push(e.id.clone());
        }
        next.insert(e.id.clone(), Arc::new(e));
    }
    let gone: Vec<EntryId> = snap
        .svids
        .keys()
        .filter(|id| !next.contains_key(*id))
        .cloned()
        .collect();
    for id in &gone {
        snap.svids.remove(id);
    }
    applied.dropped_svids = gone;
    snap.expired.retain(|id| next.contains_key(id));
    snap.tasks.retain_entries(|id| next.contains_key(id));
    snap.entries = next;
    snap.revision = resp.revision;
    if resp.full {
        snap.ready = true;
    }
    if let Some(b) = &resp.bundle {
        match TrustBundle::from_proto(b) {
            Ok(bundle) if &bundle.trust_domain != trust_domain => applied.warnings.push(format!(
                "bundle for {} ignored: this agent is in {trust_domain}",
                bundle.trust_domain
            )),
            Ok(bundle) if bundle.x509_authorities.is_empty() => applied
                .warnings
                .push("bundle without X.509 authorities ignored".into()),
            Ok(bundle) => {
                let bundle = Arc::new(bundle);
                if snap
                    .bundle
                    .as_deref()
                    .is_none_or(|old| bundle_differs(old, &bundle))
                {
                    applied.bundle = Some(bundle.clone());
                }
                snap.bundle = Some(bundle);
            }
            Err(e) => applied.warnings.push(format!("bundle ignored: {e}")),
        }
    }
    applied
}

/// When a credential valid from `not_before` to `not_after` is renewed: at
/// half its lifetime, moved by `jitter` (a fraction of the lifetime, clamped
/// to ±[`JITTER`]) so that many SVIDs issued together are not renewed at
/// the same instant.
pub fn renew_at(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    jitter: f64,
) -> OffsetDateTime {
    let life = not_after - not_before;
    not_before + life * (0.5 + jitter.clamp(-JITTER, JITTER))
}

/// The renewal deadline of a credential valid from `not_before` to
/// `not_after`: half its lifetime ± [`JITTER`] of it, the jitter derived from
/// `seed` (the certificate's bytes), so that the deadline of one credential
/// never moves and a fleet's credentials issued together spread out.
pub fn renewal_deadline(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    seed: &[u8],
) -> OffsetDateTime {
    renew_at(not_before, not_after, jitter_for(seed))
}

/// Whether a credential valid from `not_before` to `not_after` (jitter
/// `seed`) must be renewed at `now`: past its [`renewal_deadline`], or
/// expired.
pub fn renewal_due(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    seed: &[u8],
    now: OffsetDateTime,
) -> bool {
    now >= not_after || now >= renewal_deadline(not_before, not_after, seed)
}

/// A stable jitter in ±[`JITTER`] for one certificate (derived from its
/// bytes, so that the renewal time does not move between wake-ups).
pub fn jitter_for(cert_der: &[u8]) -> f64 {
    let digest = Sha256::digest(cert_der);
    let mut eight = [0u8; 8];
    eight.copy_from_slice(&digest[..8]);
    let unit = u64::from_be_bytes(eight) as f64 / u64::MAX as f64;
    (unit * 2.0 - 1.0) * JITTER
}

/// When a cached SVID is due for renewal; `None` when it has no leaf (it is
/// then replaced at once). The lifetime counts from when the agent received
/// it if that is later than its (backdated) NotBefore.
pub fn svid_renew_at(svid: &CachedSvid) -> Option<OffsetDateTime> {
    let leaf = svid.chain_der.first()?;
    let from = svid.not_before.max(svid.received_at).min(svid.expires_at);
    Some(renewal_deadline(from, svid.expires_at, leaf))
}

/// Whether `leaf_der` was signed by one of the CA certificates `cas_der`
/// (its signature verifies with the CA's public key). Unparsable input is
/// "not signed by".
pub fn signed_by_any(leaf_der: &[u8], cas_der: &[Vec<u8>]) -> bool {
    let Ok((_, leaf)) = x509_parser::parse_x509_certificate(leaf_der) else {
        return false;
    };
    cas_der.iter().any(|ca_der| {
        x509_parser::parse_x509_certificate(ca_der).is_ok_and(|(_, ca)| {
            leaf.issuer() == ca.subject() && leaf.verify_signature(Some(ca.public_key())).is_ok()
        })
    })
}

/// The cached SVIDs whose leaf was signed by an authority the bundle lists
/// as tainted: they must be replaced now.
pub fn tainted_svids(snap: &Snapshot, bundle: &TrustBundle) -> Vec<EntryId> {
    if bundle.tainted_x509_authorities.is_empty() {
        return Vec::new();
    }
    snap.svids
        .iter()
        .filter(|(_, s)| {
            s.chain_der
                .first()
                .is_some_and(|leaf| signed_by_any(leaf, &bundle.tainted_x509_authorities))
        })
        .map(|(id, _)| id.clone())
        .collect()
}

/// When the agent SVID is due for renewal. Like workload SVIDs, its
/// lifetime counts from when the agent first held it (`held_since`) if that
/// is later than its NotBefore, which the server backdates for clock skew:
/// otherwise a short-lived SVID would look half used when it arrives and be
/// renewed in a loop.
pub fn agent_renew_at(svid: &AgentSvid, held_since: Option<OffsetDateTime>) -> OffsetDateTime {
    let jitter = svid.chain_der.first().map_or(0.0, |d| jitter_for(d));
    let from = held_since
        .map_or(svid.not_before, |t| svid.not_before.max(t))
        .min(svid.expires_at);
    renew_at(from, svid.expires_at, jitter)
}

/// The entries that need an X.509-SVID signed now: every live entry with no
/// SVID, an expired one, one past its renewal time, one for another SPIFFE
/// ID, or one marked `stale` by an entry change.
pub fn entries_to_sign(
    snap: &Snapshot,
    stale: &BTreeSet<EntryId>,
    now: OffsetDateTime,
) -> Vec<EntryId> {
    snap.entries
        .values()
        .filter(|e| !e.is_expired(now))
        .filter(|e| match snap.svids.get(&e.id) {
            None => true,
            Some(svid) => {
                stale.contains(&e.id)
                    || svid.spiffe_id != e.spiffe_id
                    || svid.expires_at <= now
                    || svid_renew_at(svid).is_none_or(|at| at <= now)
            }
        })
        .map(|e| e.id.clone())
        .collect()
}

/// Removes what must no longer be served at `now`: expired entries (and
/// their SVIDs) and expired SVIDs; an entry that lives on without a valid
/// SVID is recorded in [`Snapshot::expired`]. Returns whether anything was
/// removed.
pub fn prune_expired(snap: &mut Snapshot, now: OffsetDateTime) -> bool {
    let before = (snap.entries.len(), snap.svids.len());
    let revocations_pruned = snap.revocations.prune(now);
    let task_creds_dropped = snap.tasks.drop_revoked(&snap.revocations, now) > 0;
    snap.entries.retain(|_, e| !e.is_expired(now));
    let entries = &snap.entries;
    let mut expired = Vec::new();
    snap.svids.retain(|id, s| {
        let live = entries.contains_key(id);
        if live && s.expires_at <= now {
            expired.push(id.clone());
        }
        s.expires_at > now && live
    });
    snap.expired.extend(expired);
    snap.expired.retain(|id| entries.contains_key(id));
    before != (snap.entries.len(), snap.svids.len()) || revocations_pruned || task_creds_dropped
}

/// Applies the revocations and CRLs of a sync message at `now` (a full update replaces them,
/// a delta adds revocations; CRLs, when present, replace the list) and drops every cached
/// credential that is now revoked. Returns the entries whose SVID was dropped (to be signed
/// again) and whether anything changed.
pub fn apply_revocations(
    snap: &mut Snapshot,
    resp: &pb::SyncResponse,
    now: OffsetDateTime,
) -> (Vec<EntryId>, bool) {
    let mut changed = snap.revocations.apply(resp.full, &resp.revocations, now);
    if (resp.full || !resp.crls.is_empty()) && *snap.crls != resp.crls {
        snap.crls = Arc::new(resp.crls.clone());
        changed = true;
    }
    let revoked: Vec<EntryId> = snap
        .svids
        .iter()
        .filter(|(_, s)| svid_serial(s).is_some_and(|x| snap.revocations.serial(&x)))
        .map(|(id, _)| id.clone())
        .collect();
    for id in &revoked {
        snap.svids.remove(id);
    }
    if snap.tasks.drop_revoked(&snap.revocations, now) > 0 {
        changed = true;
    }
    (revoked, changed)
}

/// The next instant after `now` at which something in the snapshot is due
/// (an SVID renewal or expiry, an entry expiry), or one of `extra`.
pub fn next_wakeup(
    snap: &Snapshot,
    now: OffsetDateTime,
    extra: impl IntoIterator<Item = OffsetDateTime>,
) -> Option<OffsetDateTime> {
    let svid_times = snap
        .svids
        .values()
        .flat_map(|s| [svid_renew_at(s), Some(s.expires_at)])
        .flatten();
    let entry_times = snap.entries.values().filter_map(|e| e.expires_at);
    svid_times
        .chain(entry_times)
        .chain(extra)
        .filter(|t| *t > now)
        .min()
}

/// Exponential backoff with jitter between [`BACKOFF_MIN`] and
/// [`BACKOFF_MAX`] (or other bounds).
#[derive(Debug, Clone)]
pub struct Backoff {
    min: StdDuration,
    max: StdDuration,
    attempt: u32,
}

impl Backoff {
    /// A backoff from `min` doubling up to `max`.
    pub fn new(min: StdDuration, max: StdDuration) -> Self {
        Self {
            min,
            max,
            attempt: 0,
        }
    }

    /// Back to the first delay (after a success).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// The next delay: `min·2^attempt` capped at `max`, then scaled into
    /// `[½, 1]` of that by `unit` (a random number in `[0, 1)`).
    pub fn next_delay(&mut self, unit: f64) -> StdDuration {
        let base = self
            .min
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        base.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }
}

/// Completes when `stop` turns true or its sender is gone. (The guard that
/// `wait_for` returns is dropped here, so that callers stay `Send`.)
pub async fn stop_requested(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn sleep_for(now: OffsetDateTime, until: OffsetDateTime) -> StdDuration {
    StdDuration::try_from(until - now)
        .unwrap_or(StdDuration::ZERO)
        .min(MAX_SLEEP)
}

// ---------------------------------------------------------------------------
// The task
// ---------------------------------------------------------------------------

/// Why a sync session ended in error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SyncError {
    /// A node API call failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The agent SVID expired before it could be renewed.
    #[error("the agent SVID {spiffe_id} expired at {expired_at}")]
    AgentSvidExpired {
        /// The agent's ID.
        spiffe_id: String,
        /// NotAfter.
        expired_at: OffsetDateTime,
    },
}

impl SyncError {
    /// Whether only an operator (or a new enrollment) can fix this.
    fn needs_operator(&self) -> bool {
        match self {
            Self::Client(e) => e.is_agent_rejected() || matches!(e, ClientError::NoIdentity),
            Self::AgentSvidExpired { .. } => true,
        }
    }
}

enum SessionEnd {
    Shutdown,
    /// Reconnect at once (the agent SVID changed).
    Reconnect,
    /// The server ended the stream cleanly.
    StreamEnded,
}

/// Attests with `attestor`, stores the new agent SVID and bundle, trusts the
/// bundle, and switches the client to the new identity.
pub async fn enroll(
    client: &ServerClient,
    storage: &Storage,
    anchors: &TrustAnchors,
    cache: &Cache,
    attestor: &dyn NodeAttestor,
) -> anyhow::Result<()> {
    let attested = client.attest(attestor).await?;
    storage.save_agent_svid(&attested.svid)?;
    storage.save_bundle(&attested.bundle)?;
    anchors.replace(attested.bundle.x509_authorities.clone());
    let bundle = Arc::new(attested.bundle);
    cache.update(|s| s.bundle = Some(bundle));
    tracing::info!(
        agent_id = %attested.svid.spiffe_id,
        expires_at = %attested.svid.expires_at,
        attestor = attestor.name(),
        node_selectors = ?attested.node_selectors,
        can_reattest = attested.can_reattest,
        "node attested"
    );
    if !attested.can_reattest {
        tracing::info!(
            attestor = attestor.name(),
            "this agent renews its SVID while it can reach the server, but cannot attest again by \
             itself: if the SVID expires or is rejected, it needs a new join token from an operator"
        );
    }
    client.set_identity(attested.svid);
    Ok(())
}

/// Attests again with a re-attestable attestor and stores the result: the
/// client's [`crate::client::Reattest`] for step-up and renewal.
#[derive(Debug)]
pub struct Reenroll {
    storage: Storage,
    anchors: TrustAnchors,
    cache: Cache,
    attestor: Arc<dyn NodeAttestor>,
}

impl Reenroll {
    /// Re-attests with `attestor`, storing into `storage`, `anchors` and `cache`.
    pub fn new(
        storage: Storage,
        anchors: TrustAnchors,
        cache: Cache,
        attestor: Arc<dyn NodeAttestor>,
    ) -> Self {
        Self {
            storage,
            anchors,
            cache,
            attestor,
        }
    }
}

#[tonic::async_trait]
impl crate::client::Reattest for Reenroll {
    async fn reattest(&self, client: &ServerClient) -> Result<(), ClientError> {
        enroll(
            client,
            &self.storage,
            &self.anchors,
            &self.cache,
            self.attestor.as_ref(),
        )
        .await
        .map_err(|e| match e.downcast::<ClientError>() {
            Ok(c) => c,
            Err(other) => ClientError::Reattest(format!("{other:#}")),
        })
    }
}

/// The long-running sync task. Build it with [`Syncer::new`] and run it
/// with [`Syncer::run`].
pub struct Syncer {
    client: ServerClient,
    cache: Cache,
    storage: Storage,
    anchors: TrustAnchors,
    clock: Arc<dyn Clock>,
    recovery: Option<Arc<dyn NodeAttestor>>,
    stale: BTreeSet<EntryId>,
    sign_retry_at: Option<OffsetDateTime>,
    renew_retry_at: Option<OffsetDateTime>,
    /// The agent SVID was signed by a tainted authority: renew it now.
    force_agent_renew: bool,
    // (serial, when this task first saw it) for the current agent SVID.
    agent_held_since: Option<(String, OffsetDateTime)>,
    /// The tainted list the agent SVID was last renewed for, so that a
    /// server still signing with a tainted authority cannot make the agent
    /// renew in a loop.
    agent_taint_handled: Vec<Vec<u8>>,
}

impl std::fmt::Debug for Syncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Syncer")
            .field("data_dir", &self.storage.dir())
            .field("recovery", &self.recovery.as_ref().map(|a| a.name()))
            .finish_non_exhaustive()
    }
}

impl Syncer {
    /// A sync task for an attested `client`. `recovery` is an attestor to
    /// attest again with if the server rejects the identity or it expires:
    /// a join token given at start while a stored SVID was reused is tried
    /// once; a re-attestable attestor (x509pop) every time.
    pub fn new(
        client: ServerClient,
        cache: Cache,
        storage: Storage,
        anchors: TrustAnchors,
        clock: Arc<dyn Clock>,
        recovery: Option<Arc<dyn NodeAttestor>>,
    ) -> Self {
        Self {
            client,
            cache,
            storage,
            anchors,
            clock,
            recovery,
            stale: BTreeSet::new(),
            sign_retry_at: None,
            renew_retry_at: None,
            force_agent_renew: false,
            agent_held_since: None,
            agent_taint_handled: Vec::new(),
        }
    }

    /// Runs until `shutdown` turns true (or its sender is dropped).
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        loop {
            let outcome = self.session(&mut shutdown, &mut backoff).await;
            let delay = match outcome {
                Ok(SessionEnd::Shutdown) => return,
                Ok(SessionEnd::Reconnect) => {
                    backoff.reset();
                    continue;
                }
                Ok(SessionEnd::StreamEnded) => {
                    self.client.mark_unreachable();
                    let delay = backoff.next_delay(rand::random());
                    tracing::info!(retry_in = ?delay, "the server closed the sync stream; reconnecting");
                    delay
                }
                Err(e) if e.needs_operator() => {
                    if let Some(attestor) = self.recovery.clone() {
                        // A join token is used up by trying; a re-attestable
                        // attestor stays available for the next time.
                        if !attestor.can_reattest() {
                            self.recovery = None;
                        }
                        tracing::warn!(
                            error = %e,
                            attestor = attestor.name(),
                            "the server does not accept the agent identity (or it expired); \
                             attesting again"
                        );
                        // Through the client's single-flight path when it has one,
                        // so that a concurrent step-up does not attest twice.
                        let attempt = if attestor.can_reattest() && self.client.can_reattest() {
                            let stale = self.client.identity().map(|s| s.serial_hex.clone());
                            self.client
                                .reattest_after(stale.as_deref())
                                .await
                                .map_err(anyhow::Error::from)
                        } else {
                            enroll(
                                &self.client,
                                &self.storage,
                                &self.anchors,
                                &self.cache,
                                attestor.as_ref(),
                            )
                            .await
                        };
                        match attempt {
                            Ok(()) => {
                                backoff.reset();
                                continue;
                            }
                            Err(err)
                                if err
                                    .downcast_ref::<ClientError>()
                                    .is_some_and(ClientError::is_unavailable) =>
                            {
                                // Not used up: keep it for the next attempt.
                                self.recovery = Some(attestor);
                                let delay = backoff.next_delay(rand::random());
                                tracing::warn!(error = %err, retry_in = ?delay, "cannot reach the server to attest; retrying");
                                if self.wait(delay, &mut shutdown).await {
                                    return;
                                }
                                continue;
                            }
                            Err(err) => tracing::error!(
                                error = %err,
                                attestor = attestor.name(),
                                "attesting again failed"
                            ),
                        }
                    }
                    self.report_rejection(&e);
                    REJECTED_RETRY.mul_f64(0.9 + 0.2 * rand::random::<f64>())
                }
                Err(e) => {
                    self.client.mark_unreachable();
                    let delay = backoff.next_delay(rand::random());
                    tracing::warn!(error = %e, retry_in = ?delay, "sync with the server failed; retrying");
                    delay
                }
            };
            if self.wait(delay, &mut shutdown).await {
                return;
            }
        }
    }

    /// Waits `delay` while still dropping credentials as they expire.
    /// Returns true on shutdown.
    async fn wait(&mut self, delay: StdDuration, shutdown: &mut watch::Receiver<bool>) -> bool {
        let deadline = tokio::time::Instant::now() + delay;
        loop {
            let now = self.clock.now();
            let prune_in = next_wakeup(&self.cache.current(), now, [])
                .map_or(MAX_SLEEP, |t| sleep_for(now, t));
            let until = deadline.min(tokio::time::Instant::now() + prune_in);
            tokio::select! {
                () = stop_requested(shutdown) => return true,
                () = tokio::time::sleep_until(until) => {}
            }
            self.publish_pruned();
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
        }
    }

    /// Publishes the sync task's changes made on a copy of the snapshot. The task registry is
    /// not copied back: tasks come and go on the Workload API side meanwhile (while this task
    /// awaited the server), so only the changes the sync task owns are applied to the live
    /// registry (credentials of removed entries, revoked or expired ones are dropped).
    fn publish(&self, next: Snapshot) {
        let now = self.clock.now();
        self.cache.update(|s| {
            let tasks = std::mem::take(&mut s.tasks);
            *s = next;
            s.tasks = tasks;
            let entries = &s.entries;
            s.tasks.retain_entries(|id| entries.contains_key(id));
            s.tasks.drop_revoked(&s.revocations, now);
        });
    }

    fn publish_pruned(&self) {
        let now = self.clock.now();
        let mut next = (*self.cache.current()).clone();
        if prune_expired(&mut next, now) {
            tracing::info!("dropped expired credentials");
            self.publish(next);
        }
    }

    fn report_rejection(&self, e: &SyncError) {
        let agent = self
            .client
            .identity()
            .map_or_else(|| "<none>".to_owned(), |s| s.spiffe_id.to_string());
        let dir = self.storage.dir().display();
        let new_token = "create a new join token with `mayfly-server token generate` and restart the \
                         agent with --join-token <token> (or MAYFLY_JOIN_TOKEN)";
        match e {
            SyncError::Client(ClientError::NotAttested(m)) => tracing::error!(
                agent_id = %agent, server_message = %m,
                "the server has no record of this agent (it was evicted, or the server lost its data). \
                 A join token works only once: {new_token}. Retrying every minute meanwhile."
            ),
            SyncError::Client(ClientError::Superseded(m)) => tracing::error!(
                agent_id = %agent, server_message = %m,
                "the server replaced this agent's SVID with a newer one: another agent is running \
                 with the data directory {dir}, or it was restored from an old copy. Stop the other \
                 agent, or enrol this node again: {new_token}. Retrying every minute meanwhile."
            ),
            SyncError::Client(ClientError::Banned(m)) => tracing::error!(
                agent_id = %agent, server_message = %m,
                "this agent is banned by the server and gets no credentials. An operator must lift \
                 the ban, or enrol the node anew: {new_token}. Retrying every minute meanwhile."
            ),
            SyncError::AgentSvidExpired { expired_at, .. } => tracing::error!(
                agent_id = %agent, %expired_at,
                operator_action = crate::health::OPERATOR_ACTION,
                "{}",
                crate::health::expired_join_token_message(*expired_at)
            ),
            other => tracing::error!(
                agent_id = %agent, error = %other,
                "the agent has no usable identity: {new_token}. Retrying every minute meanwhile."
            ),
        }
    }

    async fn session(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
        backoff: &mut Backoff,
    ) -> Result<SessionEnd, SyncError> {
        if let Some(end) = self.maybe_renew_agent().await? {
            return Ok(end);
        }
        let mut stream = self.client.sync().await?;
        tracing::debug!("sync stream open");
        loop {
            let now = self.clock.now();
            let wake = self.next_maintenance(now);
            let sleep = tokio::time::sleep(wake.map_or(MAX_SLEEP, |t| sleep_for(now, t)));
            tokio::select! {
                () = stop_requested(shutdown) => return Ok(SessionEnd::Shutdown),
                msg = self.client.next_sync(&mut stream) => match msg? {
                    Some(resp) => {
                        backoff.reset();
                        self.on_message(&resp).await?;
                        if self.force_agent_renew
                            && let Some(end) = self.maybe_renew_agent().await?
                        {
                            return Ok(end);
                        }
                    }
                    None => return Ok(SessionEnd::StreamEnded),
                },
                () = sleep => {
                    if let Some(end) = self.maybe_renew_agent().await? {
                        return Ok(end);
                    }
                    self.maintain().await?;
                }
            }
        }
    }

    fn held_since(&self, svid: &AgentSvid) -> Option<OffsetDateTime> {
        self.agent_held_since
            .as_ref()
            .filter(|(serial, _)| *serial == svid.serial_hex)
            .map(|(_, at)| *at)
    }

    fn next_maintenance(&self, now: OffsetDateTime) -> Option<OffsetDateTime> {
        let agent = self
            .client
            .identity()
            .map(|s| [agent_renew_at(&s, self.held_since(&s)), s.expires_at]);
        let extra = agent
            .into_iter()
            .flatten()
            .chain(self.sign_retry_at)
            .chain(self.renew_retry_at);
        next_wakeup(&self.cache.current(), now, extra)
    }

    /// Renews the agent SVID when it is due. `Some(Reconnect)` after a
    /// renewal: the stream must move to a connection that presents it.
    async fn maybe_renew_agent(&mut self) -> Result<Option<SessionEnd>, SyncError> {
        let svid = self.client.identity().ok_or(ClientError::NoIdentity)?;
        let now = self.clock.now();
        if now >= svid.expires_at {
            return Err(SyncError::AgentSvidExpired {
                spiffe_id: svid.spiffe_id.to_string(),
                expired_at: svid.expires_at,
            });
        }
        let held_since = match self.held_since(&svid) {
            Some(t) => t,
            None => {
                self.agent_held_since = Some((svid.serial_hex.clone(), now));
                now
            }
        };
        let due = self.force_agent_renew || now >= agent_renew_at(&svid, Some(held_since));
        if !due || self.renew_retry_at.is_some_and(|t| now < t) {
            return Ok(None);
        }
        if self.client.can_reattest() {
            // Re-attestable attestors renew by proving the node again, which
            // also refreshes the node's attestation time on the server.
            return match self.client.reattest_after(Some(&svid.serial_hex)).await {
                Ok(()) => {
                    self.renew_retry_at = None;
                    self.force_agent_renew = false;
                    tracing::info!("renewed the agent SVID by attesting again");
                    Ok(Some(SessionEnd::Reconnect))
                }
                Err(e) if e.is_agent_rejected() => Err(e.into()),
                Err(e) => {
                    self.renew_retry_at = Some(now + RENEW_RETRY);
                    tracing::warn!(error = %e, expires_at = %svid.expires_at, "renewing the agent SVID by attesting again failed; retrying");
                    Ok(None)
                }
            };
        }
        match self.client.renew().await {
            Ok(new) => {
                self.renew_retry_at = None;
                if std::mem::take(&mut self.force_agent_renew) {
                    tracing::warn!(
                        old_serial = %svid.serial_hex,
                        new_serial = %new.serial_hex,
                        "replaced the agent SVID signed by a tainted authority"
                    );
                }
                if let Err(e) = self.storage.save_agent_svid(&new) {
                    tracing::error!(
                        error = %e,
                        "cannot store the renewed agent SVID; after a restart the agent will need a new join token"
                    );
                }
                tracing::info!(
                    agent_id = %new.spiffe_id,
                    serial = %new.serial_hex,
                    expires_at = %new.expires_at,
                    "renewed the agent SVID"
                );
                self.client.set_identity(new);
                Ok(Some(SessionEnd::Reconnect))
            }
            Err(e) if e.is_agent_rejected() => Err(e.into()),
            Err(e) => {
                self.renew_retry_at = Some(now + RENEW_RETRY);
                tracing::warn!(error = %e, expires_at = %svid.expires_at, "agent SVID renewal failed; retrying");
                Ok(None)
            }
        }
    }

    async fn on_message(&mut self, resp: &pb::SyncResponse) -> Result<(), SyncError> {
        let now = self.clock.now();
        let current = self.cache.current();
        let mut next = (*current).clone();
        let agent_id = self.client.identity().map(|i| i.spiffe_id.clone());
        let applied = apply_sync_response_as(
            &mut next,
            resp,
            self.client.trust_domain(),
            agent_id.as_ref(),
        );
        for w in &applied.warnings {
            tracing::warn!(revision = resp.revision, "sync: {w}");
        }
        tracing::debug!(
            revision = resp.revision,
            full = resp.full,
            upserted = resp.upserted.len(),
            removed = resp.removed_entry_ids.len(),
            dropped_svids = applied.dropped_svids.len(),
            "sync update"
        );
        for id in &applied.dropped_svids {
            self.stale.remove(id);
        }
        if let Some(bundle) = &applied.bundle {
            self.anchors.replace(bundle.x509_authorities.clone());
            if let Err(e) = self.storage.save_bundle(bundle) {
                tracing::error!(error = %e, "cannot store the trust bundle");
            }
            tracing::info!(
                sequence = bundle.sequence,
                x509_authorities = bundle.x509_authorities.len(),
                jwt_authorities = bundle.jwt_authorities.len(),
                tainted_x509_authorities = bundle.tainted_x509_authorities.len(),
                tainted_jwt_key_ids = ?bundle.tainted_jwt_key_ids,
                "trust bundle updated"
            );
        }
        self.stale.extend(applied.changed);
        let (revoked, _) = apply_revocations(&mut next, resp, now);
        for id in &revoked {
            tracing::info!(entry_id = %id, "dropped a revoked X.509-SVID; signing a new one");
        }
        if !resp.revocations.is_empty() || !resp.crls.is_empty() {
            tracing::info!(
                revocations = next.revocations.len(),
                crls = next.crls.len(),
                full = resp.full,
                "revocations updated"
            );
        }
        if (applied.bundle.is_some() || resp.full)
            && let Some(bundle) = next.bundle.clone()
        {
            self.check_taint(&next, &bundle);
        }
        prune_expired(&mut next, now);
        let signed = self.sign_due(&mut next, now).await;
        let became_ready = next.ready && !current.ready;
        let entries = next.entries.len();
        let svids = next.svids.len();
        self.publish(next);
        if became_ready {
            tracing::info!(
                entries,
                svids,
                revision = resp.revision,
                "synced with the server"
            );
        }
        signed
    }

    /// Marks every SVID signed by a tainted authority for renewal in this
    /// round (and the agent SVID too), logging each at WARN.
    fn check_taint(&mut self, snap: &Snapshot, bundle: &TrustBundle) {
        let tainted = tainted_svids(snap, bundle);
        if !tainted.is_empty() {
            for id in &tainted {
                if let Some(svid) = snap.svids.get(id) {
                    tracing::warn!(
                        entry_id = %id,
                        spiffe_id = %svid.spiffe_id,
                        expires_at = %svid.expires_at,
                        "X.509-SVID signed by a tainted authority; replacing it now"
                    );
                }
            }
            // Do not let an earlier failure's retry delay hold this back.
            self.sign_retry_at = None;
            self.stale.extend(tainted);
        }
        if let Some(agent) = self.client.identity()
            && self.agent_taint_handled != bundle.tainted_x509_authorities
            && agent
                .chain_der
                .first()
                .is_some_and(|leaf| signed_by_any(leaf, &bundle.tainted_x509_authorities))
        {
            tracing::warn!(
                agent_id = %agent.spiffe_id,
                serial = %agent.serial_hex,
                "the agent SVID was signed by a tainted authority; renewing it now"
            );
            self.agent_taint_handled = bundle.tainted_x509_authorities.clone();
            self.force_agent_renew = true;
            self.renew_retry_at = None;
        }
    }

    async fn maintain(&mut self) -> Result<(), SyncError> {
        let now = self.clock.now();
        let mut next = (*self.cache.current()).clone();
        let pruned = prune_expired(&mut next, now);
        let before = next.svids.clone();
        let signed = self.sign_due(&mut next, now).await;
        let changed = pruned
            || next.svids.len() != before.len()
            || next
                .svids
                .iter()
                .any(|(id, s)| before.get(id).is_none_or(|b| !Arc::ptr_eq(b, s)));
        if changed {
            self.publish(next);
        }
        signed
    }

    /// Signs every SVID that is due, in batches, into `next`. Only a refusal
    /// of the agent itself is an error; other failures are logged and
    /// retried later.
    async fn sign_due(
        &mut self,
        next: &mut Snapshot,
        now: OffsetDateTime,
    ) -> Result<(), SyncError> {
        if self.sign_retry_at.is_some_and(|t| now < t) {
            return Ok(());
        }
        // Task-scoped entries get an SVID per task, signed on demand (see `task`).
        let due: Vec<EntryId> = entries_to_sign(next, &self.stale, now)
            .into_iter()
            .filter(|id| {
                next.entries
                    .get(id)
                    .is_some_and(|e| e.scope == mayfly::entry::Scope::Shared)
            })
            .collect();
        if due.is_empty() {
            return Ok(());
        }
        self.sign_retry_at = None;
        let mut retry: Option<time::Duration> = None;
        for chunk in due.chunks(SIGN_BATCH) {
            match self.sign_batch(next, chunk).await {
                Ok(()) => {}
                Err(e) if e.is_agent_rejected() => return Err(e.into()),
                Err(ClientError::Refused { code, .. })
                    if chunk.len() > 1 && refusal_is_per_entry(code) =>
                {
                    // One entry may have been deauthorized since the last
                    // sync message: sign the rest one by one.
                    for id in chunk {
                        match self.sign_batch(next, std::slice::from_ref(id)).await {
                            Ok(()) => {}
                            Err(e) if e.is_agent_rejected() => return Err(e.into()),
                            Err(e) => {
                                tracing::warn!(entry_id = %id, error = %e, "cannot get an X.509-SVID for entry");
                                retry = Some(
                                    retry.map_or(SIGN_REFUSED_RETRY, |r| r.min(SIGN_REFUSED_RETRY)),
                                );
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, entries = chunk.len(), "cannot get X.509-SVIDs; retrying");
                    let delay = if e.is_unavailable() {
                        SIGN_RETRY
                    } else {
                        SIGN_REFUSED_RETRY
                    };
                    retry = Some(retry.map_or(delay, |r| r.min(delay)));
                }
            }
        }
        self.sign_retry_at = retry.map(|r| now + r);
        Ok(())
    }

    async fn sign_batch(
        &mut self,
        next: &mut Snapshot,
        ids: &[EntryId],
    ) -> Result<(), ClientError> {
        let count = ids.len();
        let keys = tokio::task::spawn_blocking(move || {
            (0..count)
                .map(|_| mayfly::x509::new_key_and_csr())
                .collect::<Result<Vec<KeyAndCsr>, _>>()
        })
        .await
        .map_err(|e| ClientError::Key(e.to_string()))?
        .map_err(|e| ClientError::Key(e.to_string()))?;
        let items = ids
            .iter()
            .zip(&keys)
            .map(|(id, k)| pb::X509SignItem {
                entry_id: id.to_string(),
                csr: k.csr_der.clone(),
                task_id: String::new(),
            })
            .collect();
        let results = self.client.sign_x509(items).await?;
        let mut keys: BTreeMap<&EntryId, KeyAndCsr> = ids.iter().zip(keys).collect();
        for r in results {
            let Ok(id) = r.entry_id.parse::<EntryId>() else {
                tracing::warn!(entry_id = %r.entry_id, "SignX509 answered for an invalid entry id");
                continue;
            };
            let (Some(key), Some(entry)) = (keys.remove(&id), next.entries.get(&id)) else {
                tracing::warn!(entry_id = %id, "SignX509 answered for an entry that was not asked for");
                continue;
            };
            match cached_svid(entry, r.svid_chain, key, self.clock.now()) {
                Ok(svid) => {
                    tracing::debug!(entry_id = %id, spiffe_id = %svid.spiffe_id, expires_at = %svid.expires_at, "X.509-SVID signed");
                    self.stale.remove(&id);
                    next.expired.remove(&id);
                    next.svids.insert(id, Arc::new(svid));
                }
                Err(message) => {
                    tracing::warn!(entry_id = %id, "SignX509 returned an unusable SVID: {message}")
                }
            }
        }
        if !keys.is_empty() {
            tracing::warn!(
                missing = keys.len(),
                "SignX509 returned fewer SVIDs than asked for"
            );
            self.sign_retry_at = Some(self.clock.now() + SIGN_RETRY);
        }
        Ok(())
    }
}

/// Refusals that concern one entry rather than the whole call.
fn refusal_is_per_entry(code: Code) -> bool {
    matches!(
        code,
        Code::PermissionDenied | Code::NotFound | Code::InvalidArgument | Code::FailedPrecondition
    )
}

/// Checks a signed chain against its entry and key and builds the cached
/// SVID.
pub(crate) fn cached_svid(
    entry: &Entry,
    chain: Vec<Vec<u8>>,
    key: KeyAndCsr,
    received_at: OffsetDateTime,
) -> Result<CachedSvid, String> {
    let leaf = chain.first().ok_or("empty chain")?;
    let info = SvidInfo::from_der(leaf).map_err(|e| e.to_string())?;
    if info.spiffe_id != entry.spiffe_id {
        return Err(format!(
            "it is for {}, the entry is for {}",
            info.spiffe_id, entry.spiffe_id
        ));
    }
    let pair = rcgen::KeyPair::try_from(key.key_pkcs8.as_slice()).map_err(|e| e.to_string())?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| e.to_string())?;
    if cert.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&pair).as_slice() {
        return Err("it is not for the key that was sent".into());
    }
    Ok(CachedSvid {
        entry_id: entry.id.clone(),
        spiffe_id: info.spiffe_id,
        chain_der: chain,
        key_pkcs8: key.key_pkcs8,
        not_before: info.not_before,
        expires_at: info.not_after,
        received_at,
        hint: entry.hint.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use mayfly::entry::EntrySpec;
    use mayfly::x509::{CaParams, SvidParams, VerifiedCsr, X509Authority, new_key_and_csr};
    use time::Duration;

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn t0() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap()
    }

    fn ca() -> X509Authority {
        X509Authority::generate(
            &CaParams {
                trust_domain: td(),
                ttl: Duration::days(2),
                subject: "Test".into(),
            },
            t0() - Duration::hours(1),
        )
        .unwrap()
    }

    fn entry(id: &str, path: &str) -> Entry {
        EntrySpec {
            spiffe_id: format!("spiffe://example.org/{path}"),
            parent_id: "spiffe://example.org/mayfly/agent/join_token/a".into(),
            selectors: vec!["unix:uid:1000".into()],
            ..Default::default()
        }
        .validate(&td(), id.parse().unwrap(), 1)
        .unwrap()
    }

    /// An SVID for `e` issued at `issued` for one hour.
    fn svid(ca: &X509Authority, e: &Entry, issued: OffsetDateTime) -> Arc<CachedSvid> {
        let k = new_key_and_csr().unwrap();
        let signed = ca
            .sign_svid(
                &VerifiedCsr::from_der(&k.csr_der).unwrap(),
                &SvidParams {
                    spiffe_id: &e.spiffe_id,
                    dns_names: &e.dns_names,
                    ttl: Duration::hours(1),
                },
                issued,
            )
            .unwrap();
        Arc::new(cached_svid(e, vec![signed.der], k, issued).unwrap())
    }

    fn snapshot_with(ca: &X509Authority, entries: &[Entry]) -> Snapshot {
        let mut s = Snapshot::default();
        for e in entries {
            s.entries.insert(e.id.clone(), Arc::new(e.clone()));
            s.svids.insert(e.id.clone(), svid(ca, e, t0()));
        }
        s
    }

    fn ids(v: &[&str]) -> Vec<EntryId> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn bundle_proto(ca: &X509Authority, td: &str) -> pb::Bundle {
        pb::Bundle {
            trust_domain: td.into(),
            x509_authorities: vec![ca.cert_der().to_vec()],
            sequence: 2,
            ..Default::default()
        }
    }

    #[test]
    fn a_full_update_replaces_everything_and_drops_svids_of_missing_entries() {
        let ca = ca();
        let (a, b, c) = (entry("a", "a"), entry("b", "b"), entry("c", "c"));
        let mut snap = snapshot_with(&ca, &[a.clone(), b.clone()]);
        let kept = snap.svids[&b.id].clone();
        let resp = pb::SyncResponse {
            revision: 7,
            full: true,
            upserted: vec![b.to_proto(), c.to_proto()],
            removed_entry_ids: vec![],
            bundle: Some(bundle_proto(&ca, "example.org")),
            ..Default::default()
        };
        let applied = apply_sync_response(&mut snap, &resp, &td());
        assert!(snap.ready);
        assert_eq!(snap.revision, 7);
        assert_eq!(
            snap.entries.keys().cloned().collect::<Vec<_>>(),
            ids(&["b", "c"])
        );
        assert_eq!(snap.svids.keys().cloned().collect::<Vec<_>>(), ids(&["b"]));
        assert!(
            Arc::ptr_eq(&snap.svids[&b.id], &kept),
            "an unchanged entry keeps its SVID"
        );
        assert_eq!(applied.dropped_svids, ids(&["a"]));
        assert!(applied.changed.is_empty());
        assert_eq!(applied.bundle.as_ref().unwrap().sequence, 2);
        assert_eq!(
            snap.bundle.as_ref().unwrap().x509_authorities[0],
            ca.cert_der()
        );
        // c has no SVID yet: it is the one to sign.
        assert_eq!(entries_to_sign(&snap, &BTreeSet::new(), t0()), ids(&["c"]));

        // The same bundle again is not reported as a change.
        let again = apply_sync_response(&mut snap, &resp, &td());
        assert!(again.bundle.is_none());
    }

    #[test]
    fn a_delta_upserts_and_removes_and_a_removed_entry_drops_its_svid() {
        let ca = ca();
        let (a, b, c) = (entry("a", "a"), entry("b", "b"), entry("c", "c"));
        let mut snap = snapshot_with(&ca, &[a.clone(), b.clone()]);
        snap.ready = true;
        let mut b2 = b.clone();
        b2.spiffe_id = mayfly::SpiffeId::new("spiffe://example.org/b2").unwrap();
        b2.revision = 2;
        let resp = pb::SyncResponse {
            revision: 8,
            full: false,
            upserted: vec![b2.to_proto(), c.to_proto()],
            removed_entry_ids: vec!["a".into()],
            bundle: None,
            ..Default::default()
        };
        let applied = apply_sync_response(&mut snap, &resp, &td());
        assert_eq!(
            snap.entries.keys().cloned().collect::<Vec<_>>(),
            ids(&["b", "c"])
        );
        assert_eq!(snap.entries[&b.id].spiffe_id, b2.spiffe_id);
        assert!(
            !snap.svids.contains_key(&a.id),
            "removed entry's SVID is dropped"
        );
        assert_eq!(applied.dropped_svids, ids(&["a"]));
        assert_eq!(applied.changed, ids(&["b"]), "b's identity changed");
        assert!(applied.bundle.is_none());
        assert_eq!(snap.revision, 8);
        // b must be signed again (its SVID is for the old ID), c for the first time.
        let stale: BTreeSet<EntryId> = applied.changed.into_iter().collect();
        assert_eq!(entries_to_sign(&snap, &stale, t0()), ids(&["b", "c"]));
        // Even without the stale mark, an SVID for another ID is replaced.
        assert_eq!(
            entries_to_sign(&snap, &BTreeSet::new(), t0()),
            ids(&["b", "c"])
        );

        // A delta changing only selectors keeps the SVID.
        let mut c2 = c.clone();
        c2.selectors = ["unix:uid:2000".parse().unwrap()].into_iter().collect();
        snap.svids.insert(c.id.clone(), svid(&ca, &c, t0()));
        let applied = apply_sync_response(
            &mut snap,
            &pb::SyncResponse {
                revision: 9,
                upserted: vec![c2.to_proto()],
                ..Default::default()
            },
            &td(),
        );
        assert!(applied.changed.is_empty());
        assert!(snap.svids.contains_key(&c.id));
    }

    #[test]
    fn malformed_parts_are_skipped_with_a_warning() {
        let ca = ca();
        let good = entry("good", "good");
        let mut bad = entry("bad", "bad").to_proto();
        bad.spiffe_id = "not a spiffe id".into();
        let mut snap = Snapshot::default();
        let applied = apply_sync_response(
            &mut snap,
            &pb::SyncResponse {
                revision: 1,
                full: true,
                upserted: vec![good.to_proto(), bad],
                removed_entry_ids: vec![],
                bundle: Some(bundle_proto(&ca, "other.org")),
                ..Default::default()
            },
            &td(),
        );
        assert_eq!(
            snap.entries.keys().cloned().collect::<Vec<_>>(),
            ids(&["good"])
        );
        assert_eq!(applied.warnings.len(), 2, "{:?}", applied.warnings);
        assert!(
            snap.bundle.is_none(),
            "a foreign trust domain's bundle is not ours"
        );
    }

    #[test]
    fn an_svid_past_half_its_lifetime_needs_renewal() {
        let ca = ca();
        let e = entry("a", "a");
        let snap = snapshot_with(&ca, std::slice::from_ref(&e));
        let s = &snap.svids[&e.id];
        let none = BTreeSet::new();
        // Issued at t0 (backdated 10 s) for one hour: renewal falls between
        // 40% and 60% of the lifetime.
        let at = svid_renew_at(s).unwrap();
        assert!(
            at >= t0() + Duration::minutes(23) && at <= t0() + Duration::minutes(37),
            "{at}"
        );
        assert!(entries_to_sign(&snap, &none, t0() + Duration::minutes(20)).is_empty());
        assert!(entries_to_sign(&snap, &none, at - Duration::seconds(1)).is_empty());
        assert_eq!(entries_to_sign(&snap, &none, at), ids(&["a"]));
        assert_eq!(
            entries_to_sign(&snap, &none, t0() + Duration::minutes(40)),
            ids(&["a"])
        );
        // Expired: needs a new one too.
        assert_eq!(
            entries_to_sign(&snap, &none, t0() + Duration::hours(2)),
            ids(&["a"])
        );
        // Marked stale by an entry change: needs a new one now.
        let stale: BTreeSet<EntryId> = ids(&["a"]).into_iter().collect();
        assert_eq!(entries_to_sign(&snap, &stale, t0()), ids(&["a"]));
        // The next wake-up is its renewal time.
        assert_eq!(next_wakeup(&snap, t0(), []), Some(at));
        assert_eq!(next_wakeup(&snap, at, []), Some(s.expires_at));
        let sooner = t0() + Duration::minutes(1);
        assert_eq!(next_wakeup(&snap, t0(), [sooner]), Some(sooner));
    }

    #[test]
    fn renewal_time_is_half_life_with_bounded_stable_jitter() {
        let nb = t0();
        let na = t0() + Duration::hours(1);
        assert_eq!(renew_at(nb, na, 0.0), t0() + Duration::minutes(30));
        assert_eq!(renew_at(nb, na, 0.1), t0() + Duration::minutes(36));
        assert_eq!(
            renew_at(nb, na, -5.0),
            t0() + Duration::minutes(24),
            "clamped"
        );
        for i in 0..200u32 {
            let j = jitter_for(&i.to_be_bytes());
            assert!((-JITTER..=JITTER).contains(&j), "{j}");
            assert_eq!(j, jitter_for(&i.to_be_bytes()), "stable");
        }
    }

    #[test]
    fn expired_entries_and_svids_are_pruned() {
        let ca = ca();
        let mut a = entry("a", "a");
        a.expires_at = Some(t0() + Duration::minutes(5));
        let b = entry("b", "b");
        let mut snap = snapshot_with(&ca, &[a.clone(), b.clone()]);
        assert!(!prune_expired(&mut snap, t0()));
        assert_eq!(
            next_wakeup(&snap, t0(), []),
            Some(t0() + Duration::minutes(5))
        );
        assert!(prune_expired(&mut snap, t0() + Duration::minutes(5)));
        assert_eq!(
            snap.entries.keys().cloned().collect::<Vec<_>>(),
            ids(&["b"])
        );
        assert_eq!(snap.svids.keys().cloned().collect::<Vec<_>>(), ids(&["b"]));
        // An expired entry is never signed.
        let mut snap2 = Snapshot::default();
        snap2.entries.insert(a.id.clone(), Arc::new(a));
        assert!(entries_to_sign(&snap2, &BTreeSet::new(), t0() + Duration::hours(1)).is_empty());
        // An SVID past its NotAfter is dropped even if its entry lives.
        assert!(prune_expired(&mut snap, t0() + Duration::hours(2)));
        assert!(snap.svids.is_empty() && snap.entries.len() == 1);
    }

    #[test]
    fn renewal_deadline_is_a_pure_function_of_validity_seed_and_now() {
        let nb = t0();
        let na = t0() + Duration::seconds(100);
        for seed in [&b"a"[..], b"b", b"cert bytes", b""] {
            let at = renewal_deadline(nb, na, seed);
            assert_eq!(at, renewal_deadline(nb, na, seed), "stable for one seed");
            assert!(
                at >= t0() + Duration::seconds(40) && at <= t0() + Duration::seconds(60),
                "half life ±10%: {at}"
            );
            assert!(!renewal_due(nb, na, seed, at - Duration::milliseconds(1)));
            assert!(renewal_due(nb, na, seed, at));
            assert!(renewal_due(nb, na, seed, na), "expired is always due");
        }
        // Different seeds spread out.
        let spread: BTreeSet<OffsetDateTime> = (0..50u32)
            .map(|i| renewal_deadline(nb, na, &i.to_be_bytes()))
            .collect();
        assert!(spread.len() > 10, "{}", spread.len());
    }

    #[test]
    fn a_short_lived_agent_svid_is_renewed_at_half_of_the_time_it_was_held() {
        // The agent SVID is backdated like any other: with a 6 s TTL its
        // NotBefore-based half-life point lies before it was issued.
        let ca = ca();
        let k = new_key_and_csr().unwrap();
        let id = mayfly::SpiffeId::new("spiffe://example.org/mayfly/agent/join_token/x").unwrap();
        let signed = ca
            .sign_svid(
                &VerifiedCsr::from_der(&k.csr_der).unwrap(),
                &SvidParams {
                    spiffe_id: &id,
                    dns_names: &[],
                    ttl: Duration::seconds(6),
                },
                t0(),
            )
            .unwrap();
        let svid = AgentSvid {
            spiffe_id: id,
            chain_der: vec![signed.der.clone()],
            key_pkcs8: k.key_pkcs8,
            not_before: t0() - Duration::seconds(10),
            expires_at: signed.not_after,
            serial_hex: signed.serial_hex(),
        };
        assert!(
            agent_renew_at(&svid, None) <= t0(),
            "the old rule renews at once"
        );
        let at = agent_renew_at(&svid, Some(t0()));
        assert!(
            at >= t0() + Duration::milliseconds(2400) && at <= t0() + Duration::milliseconds(3600),
            "{at}"
        );
        // Held since before NotBefore (clock skew): NotBefore wins.
        let early = agent_renew_at(&svid, Some(t0() - Duration::seconds(60)));
        assert!(early < at);
    }

    #[test]
    fn a_short_lived_svid_is_renewed_at_half_of_the_time_it_was_held() {
        // TTL 4 s, NotBefore backdated 10 s by the CA: counted from NotBefore, its half-life
        // point would be in the past when it arrives and it would be renewed in a loop.
        let ca = ca();
        let e = entry("a", "a");
        let k = new_key_and_csr().unwrap();
        let signed = ca
            .sign_svid(
                &VerifiedCsr::from_der(&k.csr_der).unwrap(),
                &SvidParams {
                    spiffe_id: &e.spiffe_id,
                    dns_names: &[],
                    ttl: Duration::seconds(4),
                },
                t0(),
            )
            .unwrap();
        let s = cached_svid(&e, vec![signed.der], k, t0()).unwrap();
        assert_eq!(s.not_before, t0() - Duration::seconds(10));
        let at = svid_renew_at(&s).unwrap();
        assert!(
            at >= t0() + Duration::milliseconds(1600) && at <= t0() + Duration::milliseconds(2400),
            "{at}"
        );
        let mut snap = Snapshot::default();
        snap.entries.insert(e.id.clone(), Arc::new(e.clone()));
        snap.svids.insert(e.id.clone(), Arc::new(s));
        assert!(entries_to_sign(&snap, &BTreeSet::new(), t0()).is_empty());
        assert_eq!(entries_to_sign(&snap, &BTreeSet::new(), at), ids(&["a"]));
    }

    #[test]
    fn svids_signed_by_a_tainted_authority_are_found() {
        let (old, new) = (ca(), ca());
        let (a, b) = (entry("a", "a"), entry("b", "b"));
        let mut snap = snapshot_with(&old, std::slice::from_ref(&a));
        snap.entries.insert(b.id.clone(), Arc::new(b.clone()));
        snap.svids.insert(b.id.clone(), svid(&new, &b, t0()));
        let mut bundle = TrustBundle::new(td());
        bundle.x509_authorities = vec![old.cert_der().to_vec(), new.cert_der().to_vec()];
        assert!(tainted_svids(&snap, &bundle).is_empty(), "nothing tainted");
        bundle.tainted_x509_authorities = vec![old.cert_der().to_vec()];
        assert_eq!(tainted_svids(&snap, &bundle), ids(&["a"]));
        // Same subject name, different key: only the signature decides.
        let leaf = &snap.svids[&a.id].chain_der[0];
        assert!(signed_by_any(leaf, &[old.cert_der().to_vec()]));
        assert!(!signed_by_any(leaf, &[new.cert_der().to_vec()]));
        assert!(!signed_by_any(b"junk", &[old.cert_der().to_vec()]));
        // A tainted list change is a bundle change even when the keys stay.
        let mut before = bundle.clone();
        before.tainted_x509_authorities.clear();
        assert!(bundle_differs(&before, &bundle));
    }

    #[test]
    fn an_expired_svid_is_recorded_until_replaced_or_its_entry_goes() {
        let ca = ca();
        let (a, b) = (entry("a", "a"), entry("b", "b"));
        let mut snap = snapshot_with(&ca, &[a.clone(), b.clone()]);
        assert!(prune_expired(&mut snap, t0() + Duration::hours(2)));
        assert!(snap.svids.is_empty());
        assert_eq!(
            snap.expired.iter().cloned().collect::<Vec<_>>(),
            ids(&["a", "b"])
        );
        // b is removed from the registration: no longer "expired", just gone.
        apply_sync_response(
            &mut snap,
            &pb::SyncResponse {
                revision: 2,
                removed_entry_ids: vec!["b".into()],
                ..Default::default()
            },
            &td(),
        );
        assert_eq!(
            snap.expired.iter().cloned().collect::<Vec<_>>(),
            ids(&["a"])
        );
    }

    #[test]
    fn revocations_drop_revoked_svids_and_crls_replace_only_when_sent() {
        let ca = ca();
        let (a, b) = (entry("a", "a"), entry("b", "b"));
        let mut snap = snapshot_with(&ca, &[a.clone(), b.clone()]);
        let serial_a = svid_serial(&snap.svids[&a.id]).unwrap();
        let far = (t0() + Duration::hours(1)).unix_timestamp();
        let revoke = |serial: &str, jti: &str, expires_at: i64| pb::Revocation {
            serial: serial.into(),
            jti: jti.into(),
            expires_at,
            ..Default::default()
        };
        // A delta revoking a's serial and a jti, with a CRL.
        let (dropped, changed) = apply_revocations(
            &mut snap,
            &pb::SyncResponse {
                revision: 2,
                revocations: vec![revoke(&serial_a, "", far), revoke("", "j1", far)],
                crls: vec![b"crl".to_vec()],
                ..Default::default()
            },
            t0(),
        );
        assert!(changed);
        assert_eq!(dropped, ids(&["a"]));
        assert!(!snap.svids.contains_key(&a.id) && snap.svids.contains_key(&b.id));
        assert!(snap.revocations.jti("j1"));
        assert_eq!(*snap.crls, vec![b"crl".to_vec()]);
        // a is signed again.
        assert_eq!(entries_to_sign(&snap, &BTreeSet::new(), t0()), ids(&["a"]));
        // A delta without CRLs keeps them; nothing new is no change.
        let (_, changed) = apply_revocations(
            &mut snap,
            &pb::SyncResponse {
                revision: 3,
                ..Default::default()
            },
            t0(),
        );
        assert!(!changed);
        assert_eq!(snap.crls.len(), 1);
        // Past their expiry, revocations are pruned (time is injected).
        assert!(prune_expired(&mut snap, t0() + Duration::minutes(61)));
        assert!(snap.revocations.is_empty());
        // A full update replaces both (here: with nothing).
        snap.revocations.add_jti("j2".into(), far);
        let (_, changed) = apply_revocations(
            &mut snap,
            &pb::SyncResponse {
                revision: 4,
                full: true,
                ..Default::default()
            },
            t0(),
        );
        assert!(changed);
        assert!(snap.revocations.is_empty() && snap.crls.is_empty());
    }

    #[test]
    fn backoff_doubles_from_250ms_to_30s_with_jitter() {
        let mut b = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
        let top: Vec<_> = (0..10).map(|_| b.next_delay(1.0)).collect();
        assert_eq!(top[0], StdDuration::from_millis(250));
        assert_eq!(top[1], StdDuration::from_millis(500));
        assert_eq!(top[2], StdDuration::from_secs(1));
        assert_eq!(top[9], StdDuration::from_secs(30));
        assert_eq!(
            b.next_delay(0.0),
            StdDuration::from_secs(15),
            "jitter: half at the least"
        );
        b.reset();
        assert_eq!(b.next_delay(0.0), StdDuration::from_millis(125));
    }

    #[test]
    fn a_signed_svid_must_match_its_entry_and_key() {
        let ca = ca();
        let e = entry("a", "a");
        let other = entry("b", "b");
        let k = new_key_and_csr().unwrap();
        let signed = ca
            .sign_svid(
                &VerifiedCsr::from_der(&k.csr_der).unwrap(),
                &SvidParams {
                    spiffe_id: &other.spiffe_id,
                    dns_names: &[],
                    ttl: Duration::hours(1),
                },
                t0(),
            )
            .unwrap();
        assert!(cached_svid(&e, vec![signed.der.clone()], k, t0()).is_err());
        let wrong_key = new_key_and_csr().unwrap();
        assert!(cached_svid(&other, vec![signed.der], wrong_key, t0()).is_err());
        assert!(cached_svid(&e, vec![], new_key_and_csr().unwrap(), t0()).is_err());
    }
}
