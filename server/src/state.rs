//! The server's shared state: configuration, store, authorities, the
//! in-memory entry index, and the change feed that `Sync` streams follow.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use mayfly::bundle::TrustBundle;
use mayfly::clock::Clock;
use mayfly::entry::{Entry, EntryId};
use mayfly::matching::EntryIndex;
use mayfly::{SpiffeId, TrustDomain};
use time::OffsetDateTime;
use tokio::sync::broadcast;

use crate::audit::{AuditEvent, AuditLog};
use crate::authority::{AuthorityInfo, AuthorityManager, Kind};
use crate::commit::{Committer, Sinks};
use crate::config::ServerConfig;
use crate::error::{ServiceError, ServiceResult};
use crate::feed::{ChangeFeed, Watch};
use crate::policy::{PolicyRequest, PolicyStore};
use crate::revocation::Revocations;
use crate::store::IssuedRecord;
use crate::store::{NodeRecord, Store};

/// The store's meta key of the trust bundle (SPIFFE JSON).
const BUNDLE_KEY: &str = "bundle";

/// Writes the X.509 authorities of `bundle` as PEM to `path`, atomically
/// (temp file + fsync + rename), readable by all (they are public).
pub fn write_bundle_pem(bundle: &TrustBundle, path: &Path) -> std::io::Result<()> {
    let text = bundle_pem(bundle);
    let tmp = path.with_extension("pem.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// The X.509 authorities of `bundle`, PEM.
pub fn bundle_pem(bundle: &TrustBundle) -> String {
    let pems: Vec<pem::Pem> = bundle
        .x509_authorities
        .iter()
        .map(|der| pem::Pem::new("CERTIFICATE", der.clone()))
        .collect();
    pem::encode_many(&pems)
}

/// A change that `Sync` streams may need to push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeEvent {
    /// Entries were created, updated or deleted (their ids), at `revision`.
    Entries {
        /// Registration revision after the change.
        revision: u64,
        /// Affected entry ids.
        ids: Vec<EntryId>,
        /// Their parents (SPIFFE IDs) before and after the change.
        parents: Vec<String>,
    },
    /// A node changed (banned, evicted, re-attested).
    Node {
        /// The agent's SPIFFE ID.
        spiffe_id: String,
    },
    /// The trust bundle changed.
    Bundle,
    /// Credentials were revoked (`added`, possibly none) and/or the CRLs
    /// were re-signed.
    Revocations {
        /// The new revocations.
        added: Vec<mayfly::revocation::Revocation>,
    },
}

/// Everything the server's APIs share.
#[derive(Debug)]
pub struct ServerState {
    /// Validated configuration.
    pub config: ServerConfig,
    /// `spiffe://<td>/mayfly/server`.
    pub server_id: SpiffeId,
    /// Injected time.
    pub clock: Arc<dyn Clock>,
    /// Durable storage.
    pub store: Arc<dyn Store>,
    /// Signing authorities (X.509 CAs and JWT keys in their slots).
    pub authorities: AuthorityManager,
    index: RwLock<EntryIndex>,
    // Serialises writers so that store order, index order and revision order agree.
    write_lock: Mutex<()>,
    // Serialises read-modify-write of node records (node API and admin API
    // alike), so that a ban can never be overwritten by a concurrent renewal.
    node_writes: Mutex<()>,
    feed: Arc<ChangeFeed>,
    revision: AtomicU64,
    // Serialises bundle publication, so that the store and bundle.pem
    // always end with the latest bundle.
    publish: Mutex<()>,
    /// Revoked credentials and the current CRLs.
    pub(crate) revocations: Revocations,
    /// The hash-chained audit log (record with [`ServerState::audit`]).
    pub audit: Arc<AuditLog>,
    /// Commits issuance records for async callers (see [`crate::commit`]).
    committer: Committer,
    /// The policy in force (built-in set until `run` configures files).
    pub policy: PolicyStore,
}

impl ServerState {
    /// Builds the state, loading every entry from the store into the index.
    pub fn new(
        config: ServerConfig,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        authorities: AuthorityManager,
    ) -> ServiceResult<Self> {
        let mut index = EntryIndex::new();
        let mut revision = 0;
        for e in store.list_entries()? {
            revision = revision.max(e.revision);
            index.upsert(e);
        }
        let bundle_sequence = Self::persist_bundle(store.as_ref(), &authorities)?;
        authorities.set_sequence(bundle_sequence);
        let server_id = mayfly::id::server_id(&config.trust_domain);
        let feed = Arc::new(ChangeFeed::new(server_id.to_string()));
        let revocations = Revocations::load(store.as_ref(), clock.now())?;
        let audit = Arc::new(AuditLog::open(
            Arc::clone(&store),
            config.audit_log_file().as_deref(),
        )?);
        let committer = Committer::start(Sinks {
            store: Arc::clone(&store),
            audit: Arc::clone(&audit),
            clock: Arc::clone(&clock),
        })?;
        let state = Self {
            config,
            server_id,
            clock,
            store,
            authorities,
            index: RwLock::new(index),
            write_lock: Mutex::new(()),
            node_writes: Mutex::new(()),
            feed,
            revision: AtomicU64::new(revision),
            publish: Mutex::new(()),
            revocations,
            audit,
            committer,
            policy: PolicyStore::builtin()
                .map_err(|e| ServiceError::Internal(format!("built-in policy: {e}")))?,
        };
        // Drops what expired while stopped and signs the first CRLs.
        state.prune_revocations()?;
        Ok(state)
    }

    /// Keeps the trust bundle in the store: the same authorities keep their
    /// sequence number across restarts; new ones get the next number, so
    /// relying parties can tell a changed bundle from a re-published one.
    fn persist_bundle(store: &dyn Store, authorities: &AuthorityManager) -> ServiceResult<u64> {
        let current = authorities.snapshot().bundle();
        let stored = store.get_meta(BUNDLE_KEY)?.and_then(|json| {
            match TrustBundle::from_spiffe_json(current.trust_domain.clone(), &json) {
                Ok(b) => Some(b),
                Err(e) => {
                    tracing::warn!(error = %e, "stored trust bundle is unreadable; publishing a new one");
                    None
                }
            }
        });
        let same_keys = |b: &TrustBundle| {
            b.x509_authorities == current.x509_authorities
                && b.jwt_authorities
                    .iter()
                    .map(|a| &a.key_id)
                    .eq(current.jwt_authorities.iter().map(|a| &a.key_id))
        };
        let sequence = match &stored {
            Some(b) if same_keys(b) => b.sequence,
            Some(b) => b.sequence + 1,
            None => 1,
        };
        if stored.as_ref().is_none_or(|b| b.sequence != sequence) {
            let mut bundle = current;
            bundle.sequence = sequence;
            let json = bundle.to_spiffe_json().map_err(|e| {
                ServiceError::Internal(format!("cannot encode the trust bundle: {e}"))
            })?;
            store.put_meta(BUNDLE_KEY, json.as_bytes())?;
        }
        Ok(sequence)
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.config.trust_domain
    }

    /// Policy decision on a node attestation, for `node` as it is about to
    /// be stored (every attestor calls this before storing the record).
    /// Denied → `PolicyDenied` naming the reasons.
    pub fn decide_attestation(&self, node: &NodeRecord) -> ServiceResult<()> {
        let d = self.policy.decide(&PolicyRequest::Attest(node), self.now());
        if d.allowed {
            return Ok(());
        }
        tracing::warn!(agent = %node.spiffe_id, reasons = %d.reasons_text(), "policy denied node attestation");
        Err(ServiceError::PolicyDenied {
            message: format!(
                "policy denies the attestation of {}: {}",
                node.spiffe_id,
                d.reasons_text()
            ),
            reasons: d.reasons,
        })
    }

    /// Records issued credentials and the audit events of their issuance
    /// durably, batched with concurrent callers (see [`crate::commit`]).
    pub async fn commit_issued(
        &self,
        records: Vec<IssuedRecord>,
        events: Vec<AuditEvent>,
    ) -> ServiceResult<()> {
        self.committer.commit(records, events).await
    }

    /// The current time from the injected clock.
    pub fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    /// The registration revision (the highest entry revision).
    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::SeqCst)
    }

    /// The current trust bundle: every prepared, active and old authority,
    /// with the tainted ones listed.
    pub fn bundle(&self) -> TrustBundle {
        self.authorities.snapshot().bundle()
    }

    /// `<data_dir>/bundle.pem`: the X.509 authorities, for bootstrapping
    /// agents (`trust_bundle_path`).
    pub fn bundle_pem_path(&self) -> PathBuf {
        self.config.data_dir.join("bundle.pem")
    }

    /// The current X.509 authorities, PEM.
    pub fn bundle_pem_text(&self) -> String {
        bundle_pem(&self.bundle())
    }

    /// Writes the current X.509 authorities to [`Self::bundle_pem_path`].
    pub fn write_bundle_pem(&self) -> std::io::Result<()> {
        write_bundle_pem(&self.bundle(), &self.bundle_pem_path())
    }

    /// After an authority change: stores the new bundle, rewrites
    /// `bundle.pem` and tells every `Sync` stream (which pushes it to its
    /// agent). Blocking.
    fn publish_bundle(&self) -> ServiceResult<()> {
        let _p = self.publish.lock().unwrap_or_else(|p| p.into_inner());
        let bundle = self.bundle();
        let json = bundle
            .to_spiffe_json()
            .map_err(|e| ServiceError::Internal(format!("cannot encode the trust bundle: {e}")))?;
        // Agents are told even if the copies on disk fail: they are what
        // must not miss a prepared authority.
        let stored = self.store.put_meta(BUNDLE_KEY, json.as_bytes());
        let pem = write_bundle_pem(&bundle, &self.bundle_pem_path());
        // Every X.509 authority in the bundle has a CRL before agents hear
        // of the bundle; the bundle's Sync delta carries the new CRLs.
        if let Err(e) = self.resign_crls() {
            tracing::error!(error = %e, "cannot sign the CRLs after an authority change");
        }
        self.feed.publish(ChangeEvent::Bundle);
        tracing::info!(
            sequence = bundle.sequence,
            x509_authorities = bundle.x509_authorities.len(),
            jwt_authorities = bundle.jwt_authorities.len(),
            "published the trust bundle"
        );
        stored?;
        pem.map_err(|e| {
            ServiceError::Internal(format!(
                "cannot write {}: {e}",
                self.bundle_pem_path().display()
            ))
        })
    }

    /// Every authority of `kind`, oldest first.
    pub fn list_authorities(&self, kind: Kind) -> Vec<AuthorityInfo> {
        self.authorities.snapshot().list(kind)
    }

    /// Prepares a new authority of `kind` and publishes it. Blocking.
    pub fn prepare_authority(&self, kind: Kind) -> ServiceResult<AuthorityInfo> {
        let a = self.authorities.prepare(kind, self.now())?;
        self.publish_bundle()?;
        Ok(a)
    }

    /// Activates the prepared authority of `kind`. Blocking.
    pub fn activate_authority(&self, kind: Kind) -> ServiceResult<AuthorityInfo> {
        let a = self.authorities.activate(kind)?;
        self.publish_bundle()?;
        Ok(a)
    }

    /// Taints an old authority. Blocking.
    pub fn taint_authority(&self, kind: Kind, id: &str) -> ServiceResult<AuthorityInfo> {
        let a = self.authorities.taint(kind, id)?;
        self.publish_bundle()?;
        Ok(a)
    }

    /// Revokes a tainted authority. Blocking.
    pub fn revoke_authority(&self, kind: Kind, id: &str) -> ServiceResult<AuthorityInfo> {
        let a = self.authorities.revoke(kind, id)?;
        self.publish_bundle()?;
        Ok(a)
    }

    /// One pass of the rotation schedule at the injected clock's now;
    /// publishes the bundle when anything changed. Returns when the
    /// schedule next has something to do. Blocking.
    pub fn rotate_authorities(&self) -> ServiceResult<OffsetDateTime> {
        let r = self.authorities.rotate(self.now())?;
        if r.changed {
            self.publish_bundle()?;
        }
        Ok(r.next_check)
    }

    /// Follows every change. A receiver that lags behind gets
    /// `RecvError::Lagged` and must resend a full snapshot.
    pub fn subscribe(&self) -> broadcast::Receiver<ChangeEvent> {
        self.feed.subscribe()
    }

    /// Follows the changes that concern an agent whose authorized set hangs
    /// from `keys` (see [`crate::feed`]).
    pub fn watch(&self, keys: Vec<String>) -> (Watch, broadcast::Receiver<ChangeEvent>) {
        self.feed.watch(keys)
    }

    /// Reads the entry index.
    pub fn with_index<R>(&self, f: impl FnOnce(&EntryIndex) -> R) -> R {
        let guard = self.index.read().unwrap_or_else(|p| p.into_inner());
        f(&guard)
    }

    /// Stores an entry (new or replaced) durably, then indexes it and tells
    /// subscribers. Sets its revision. Blocking: call from `spawn_blocking`
    /// in async code.
    pub fn upsert_entry(&self, mut entry: Entry) -> ServiceResult<Entry> {
        let _w = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let revision = self.revision.load(Ordering::SeqCst) + 1;
        entry.revision = revision;
        self.store.put_entry(&entry)?;
        let previous = self
            .index
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .upsert(entry.clone());
        self.revision.store(revision, Ordering::SeqCst);
        let mut parents = vec![entry.parent_id.to_string()];
        if let Some(p) = previous.filter(|p| p.parent_id != entry.parent_id) {
            parents.push(p.parent_id.to_string());
        }
        self.feed.publish(ChangeEvent::Entries {
            revision,
            ids: vec![entry.id.clone()],
            parents,
        });
        Ok(entry)
    }

    /// Deletes an entry durably, then unindexes it and tells subscribers.
    /// Blocking.
    pub fn remove_entry(&self, id: &EntryId) -> ServiceResult<Entry> {
        let _w = self.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        let removed = self
            .store
            .delete_entry(id)?
            .ok_or_else(|| ServiceError::NotFound(format!("no entry {id}")))?;
        self.index
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        let revision = self.revision.fetch_add(1, Ordering::SeqCst) + 1;
        self.feed.publish(ChangeEvent::Entries {
            revision,
            ids: vec![id.clone()],
            parents: vec![removed.parent_id.to_string()],
        });
        Ok(removed)
    }

    /// Stores a node record (new or replaced). Blocking.
    pub fn put_node(&self, node: &NodeRecord) -> ServiceResult<()> {
        let _w = self.node_writes.lock().unwrap_or_else(|p| p.into_inner());
        self.store.put_node(node)?;
        Ok(())
    }

    /// Reads, changes and stores a node as one step with respect to every
    /// other node writer. `None` when there is no such node. Blocking.
    pub fn update_node(
        &self,
        spiffe_id: &str,
        f: impl FnOnce(&mut NodeRecord) -> ServiceResult<()>,
    ) -> ServiceResult<Option<NodeRecord>> {
        let _w = self.node_writes.lock().unwrap_or_else(|p| p.into_inner());
        let Some(mut node) = self.store.get_node(spiffe_id)? else {
            return Ok(None);
        };
        f(&mut node)?;
        self.store.put_node(&node)?;
        Ok(Some(node))
    }

    /// Deletes a node record, returning it. Blocking.
    pub fn remove_node(&self, spiffe_id: &str) -> ServiceResult<Option<NodeRecord>> {
        let _w = self.node_writes.lock().unwrap_or_else(|p| p.into_inner());
        Ok(self.store.delete_node(spiffe_id)?)
    }

    /// Tells subscribers of a change.
    pub(crate) fn send_event(&self, event: ChangeEvent) {
        self.feed.publish(event);
    }

    /// Tells subscribers that a node changed (ban, evict, re-attestation).
    pub fn notify_node(&self, spiffe_id: &str) {
        self.feed.publish(ChangeEvent::Node {
            spiffe_id: spiffe_id.to_owned(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sled_store::SledStore;
    use mayfly::clock::SystemClock;

    #[test]
    fn bundle_is_stored_and_its_sequence_moves_only_when_keys_change() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = ServerConfig::development();
        cfg.data_dir = dir.path().to_owned();
        let now = OffsetDateTime::now_utc();
        let open = |cfg: &ServerConfig, at: OffsetDateTime| {
            let store: Arc<dyn Store> =
                Arc::new(SledStore::open(&cfg.data_dir.join("store")).unwrap());
            let auth = AuthorityManager::load_or_create(cfg, at).unwrap();
            ServerState::new(cfg.clone(), store, Arc::new(SystemClock), auth).unwrap()
        };
        let first = open(&cfg, now).bundle();
        assert_eq!(first.sequence, 1);
        let stored = open(&cfg, now).store.get_meta("bundle").unwrap().unwrap();
        let parsed = TrustBundle::from_spiffe_json(first.trust_domain.clone(), &stored).unwrap();
        assert_eq!(parsed.x509_authorities, first.x509_authorities);
        // A restart with the same keys keeps the sequence.
        assert_eq!(open(&cfg, now).bundle().sequence, 1);
        // A new CA (the old one expired) is a new bundle.
        let later = open(&cfg, now + time::Duration::days(2)).bundle();
        assert_eq!(later.sequence, 2);
        assert_ne!(later.x509_authorities, first.x509_authorities);
    }
}
