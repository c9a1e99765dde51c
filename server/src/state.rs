//! The server's shared state: configuration, store, authorities, the
//! in-memory entry index, and the change feed that `Sync` streams follow.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use mayfly::bundle::TrustBundle;
use mayfly::clock::Clock;
use mayfly::entry::{Entry, EntryId};
use mayfly::matching::EntryIndex;
use mayfly::{SpiffeId, TrustDomain};
use time::OffsetDateTime;
use tokio::sync::broadcast;

use crate::ca::Authorities;
use crate::config::ServerConfig;
use crate::error::{ServiceError, ServiceResult};
use crate::store::{NodeRecord, Store};

/// A change that `Sync` streams may need to push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeEvent {
    /// Entries were created, updated or deleted (their ids), at `revision`.
    Entries {
        /// Registration revision after the change.
        revision: u64,
        /// Affected entry ids.
        ids: Vec<EntryId>,
    },
    /// A node changed (banned, evicted, re-attested).
    Node {
        /// The agent's SPIFFE ID.
        spiffe_id: String,
    },
    /// The trust bundle changed.
    Bundle,
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
    /// Signing authorities.
    pub authorities: Authorities,
    index: RwLock<EntryIndex>,
    // Serialises writers so that store order, index order and revision order agree.
    write_lock: Mutex<()>,
    // Serialises read-modify-write of node records (node API and admin API
    // alike), so that a ban can never be overwritten by a concurrent renewal.
    node_writes: Mutex<()>,
    events: broadcast::Sender<ChangeEvent>,
    revision: AtomicU64,
    bundle_sequence: AtomicU64,
}

impl ServerState {
    /// Builds the state, loading every entry from the store into the index.
    pub fn new(
        config: ServerConfig,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        authorities: Authorities,
    ) -> ServiceResult<Self> {
        let mut index = EntryIndex::new();
        let mut revision = 0;
        for e in store.list_entries()? {
            revision = revision.max(e.revision);
            index.upsert(e);
        }
        let server_id = mayfly::id::server_id(&config.trust_domain);
        let (events, _) = broadcast::channel(4096);
        Ok(Self {
            config,
            server_id,
            clock,
            store,
            authorities,
            index: RwLock::new(index),
            write_lock: Mutex::new(()),
            node_writes: Mutex::new(()),
            events,
            revision: AtomicU64::new(revision),
            bundle_sequence: AtomicU64::new(1),
        })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.config.trust_domain
    }

    /// The current time from the injected clock.
    pub fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    /// The registration revision (the highest entry revision).
    pub fn revision(&self) -> u64 {
        self.revision.load(Ordering::SeqCst)
    }

    /// The current trust bundle.
    pub fn bundle(&self) -> TrustBundle {
        self.authorities
            .bundle(self.bundle_sequence.load(Ordering::SeqCst))
    }

    /// Follows changes. A receiver that lags behind gets
    /// `RecvError::Lagged` and must resend a full snapshot.
    pub fn subscribe(&self) -> broadcast::Receiver<ChangeEvent> {
        self.events.subscribe()
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
        self.index
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .upsert(entry.clone());
        self.revision.store(revision, Ordering::SeqCst);
        let _ = self.events.send(ChangeEvent::Entries {
            revision,
            ids: vec![entry.id.clone()],
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
        let _ = self.events.send(ChangeEvent::Entries {
            revision,
            ids: vec![id.clone()],
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

    /// Tells subscribers that a node changed (ban, evict, re-attestation).
    pub fn notify_node(&self, spiffe_id: &str) {
        let _ = self.events.send(ChangeEvent::Node {
            spiffe_id: spiffe_id.to_owned(),
        });
    }
}
