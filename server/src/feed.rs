//! The change feed: who hears about which change.
//!
//! Internal tasks (CA rotation, TLS, CRL pruning, the Kubernetes bundle)
//! follow every change on one broadcast channel ([`ChangeFeed::subscribe`]).
//! `Sync` streams, one per connected agent, would pay for that with every
//! stream waking on every change: with 10,000 agents, one entry change or
//! one agent attesting meant 10,000 wake-ups and authorized-set
//! recomputations, and connecting N agents cost N² of them. So a stream
//! [`ChangeFeed::watch`]es the SPIFFE IDs its authorized set hangs from
//! (the agent itself, its enrolled aliases and its current node aliases)
//! and is woken only:
//!
//! - when an entry whose parent (before or after the change) is one of
//!   them changes, or the node record of its agent changes;
//! - by what concerns every agent, on a second broadcast channel: the
//!   bundle, revocations and CRLs, and changes to node alias entries (those
//!   parented by the server), which can move any agent's aliases.
//!
//! A woken stream still recomputes its authorized set and sends the
//! difference, so a wake-up it did not need costs a recomputation, never a
//! wrong answer; and since a signal that arrives while the stream is busy
//! is kept (not lost), a change is never missed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, broadcast};

use crate::state::ChangeEvent;

/// Capacity of each broadcast channel; a receiver further behind gets
/// `Lagged` and must resend a full snapshot.
const CAPACITY: usize = 4096;

/// What woke a watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Entries under one of its keys changed.
    Entries,
    /// The node record of one of its keys (its agent) changed.
    Node,
}

#[derive(Debug, Default)]
struct Signal {
    notify: Notify,
    node: AtomicBool,
}

impl Signal {
    fn raise(&self, wake: Wake) {
        if wake == Wake::Node {
            self.node.store(true, Ordering::SeqCst);
        }
        // Stores a permit when the watcher is not waiting: not lost.
        self.notify.notify_one();
    }
}

type Watchers = HashMap<String, HashMap<u64, Arc<Signal>>>;

/// The server's change feed (see the module documentation).
#[derive(Debug)]
pub struct ChangeFeed {
    server_id: String,
    all: broadcast::Sender<ChangeEvent>,
    shared: broadcast::Sender<ChangeEvent>,
    watchers: Mutex<Watchers>,
    next_id: AtomicU64,
}

impl ChangeFeed {
    /// A feed for the server `server_id` (the parent of node alias entries).
    pub fn new(server_id: String) -> Self {
        Self {
            server_id,
            all: broadcast::channel(CAPACITY).0,
            shared: broadcast::channel(CAPACITY).0,
            watchers: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Watchers> {
        self.watchers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every change, in order.
    pub fn subscribe(&self) -> broadcast::Receiver<ChangeEvent> {
        self.all.subscribe()
    }

    /// Publishes a change to every subscriber and to the watchers it
    /// concerns.
    pub fn publish(&self, event: ChangeEvent) {
        match &event {
            ChangeEvent::Entries { parents, .. } if !parents.contains(&self.server_id) => {
                self.raise(parents, Wake::Entries);
            }
            ChangeEvent::Node { spiffe_id } => {
                self.raise(std::slice::from_ref(spiffe_id), Wake::Node);
            }
            ChangeEvent::Entries { .. } | ChangeEvent::Bundle | ChangeEvent::Revocations { .. } => {
                let _ = self.shared.send(event.clone());
            }
        }
        let _ = self.all.send(event);
    }

    fn raise(&self, keys: &[String], wake: Wake) {
        let watchers = self.lock();
        for key in keys {
            for signal in watchers.get(key).into_iter().flat_map(HashMap::values) {
                signal.raise(wake);
            }
        }
    }

    /// Starts watching `keys` (SPIFFE IDs), and returns with the watch a
    /// receiver of the changes that concern every agent. Watch before
    /// reading the state, so that no change falls between the read and the
    /// watch.
    pub fn watch(self: &Arc<Self>, keys: Vec<String>) -> (Watch, broadcast::Receiver<ChangeEvent>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let shared = self.shared.subscribe();
        let mut w = Watch {
            feed: Arc::clone(self),
            id,
            keys: Vec::new(),
            signal: Arc::new(Signal::default()),
        };
        w.set_keys(keys);
        (w, shared)
    }
}

/// A `Sync` stream's registration with the feed; unregisters on drop.
#[derive(Debug)]
pub struct Watch {
    feed: Arc<ChangeFeed>,
    id: u64,
    keys: Vec<String>,
    signal: Arc<Signal>,
}

impl Watch {
    /// The keys watched now.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    /// Watches `keys` instead of the current ones. Returns whether they
    /// changed; a caller that read the state before must then read it
    /// again (see [`Watch::wake_self`]), since changes under a new key
    /// may have happened before it was watched.
    pub fn set_keys(&mut self, mut keys: Vec<String>) -> bool {
        keys.sort();
        keys.dedup();
        if keys == self.keys {
            return false;
        }
        let mut watchers = self.feed.lock();
        for old in &self.keys {
            if let Some(set) = watchers.get_mut(old) {
                set.remove(&self.id);
                if set.is_empty() {
                    watchers.remove(old);
                }
            }
        }
        for key in &keys {
            watchers
                .entry(key.clone())
                .or_default()
                .insert(self.id, Arc::clone(&self.signal));
        }
        drop(watchers);
        self.keys = keys;
        true
    }

    /// Makes the next [`Watch::changed`] return at once.
    pub fn wake_self(&self) {
        self.signal.raise(Wake::Entries);
    }

    /// Waits for a change under a watched key; [`Wake::Node`] when the
    /// agent's node record changed since the last call (entries may have
    /// changed too).
    pub async fn changed(&self) -> Wake {
        self.signal.notify.notified().await;
        if self.signal.node.swap(false, Ordering::SeqCst) {
            Wake::Node
        } else {
            Wake::Entries
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.set_keys(Vec::new());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const SERVER: &str = "spiffe://td/mayfly/server";

    fn entries(parents: &[&str]) -> ChangeEvent {
        ChangeEvent::Entries {
            revision: 1,
            ids: Vec::new(),
            parents: parents.iter().map(|p| (*p).to_owned()).collect(),
        }
    }

    async fn woken(w: &Watch) -> Option<Wake> {
        tokio::time::timeout(Duration::from_millis(50), w.changed())
            .await
            .ok()
    }

    #[tokio::test]
    async fn only_the_watchers_of_a_parent_are_woken() {
        let feed = Arc::new(ChangeFeed::new(SERVER.into()));
        let mut all = feed.subscribe();
        let (a, a_shared) = feed.watch(vec!["spiffe://td/a".into(), "spiffe://td/alias".into()]);
        let (b, b_shared) = feed.watch(vec!["spiffe://td/b".into()]);

        feed.publish(entries(&["spiffe://td/a"]));
        assert_eq!(woken(&a).await, Some(Wake::Entries));
        assert_eq!(woken(&b).await, None);

        // Before and after parents of a moved entry; an alias.
        feed.publish(entries(&["spiffe://td/alias", "spiffe://td/b"]));
        assert_eq!(woken(&a).await, Some(Wake::Entries));
        assert_eq!(woken(&b).await, Some(Wake::Entries));

        feed.publish(ChangeEvent::Node {
            spiffe_id: "spiffe://td/b".into(),
        });
        assert_eq!(woken(&a).await, None);
        assert_eq!(woken(&b).await, Some(Wake::Node));
        // Every event reached the broadcast of internal subscribers.
        for _ in 0..3 {
            assert!(all.try_recv().is_ok());
        }
        assert!(a_shared.is_empty() && b_shared.is_empty());
    }

    #[tokio::test]
    async fn what_concerns_everyone_goes_to_every_stream() {
        let feed = Arc::new(ChangeFeed::new(SERVER.into()));
        let (a, mut shared) = feed.watch(vec!["spiffe://td/a".into()]);
        feed.publish(entries(&[SERVER]));
        feed.publish(ChangeEvent::Bundle);
        feed.publish(ChangeEvent::Revocations { added: Vec::new() });
        assert!(matches!(shared.try_recv(), Ok(ChangeEvent::Entries { .. })));
        assert_eq!(shared.try_recv().unwrap(), ChangeEvent::Bundle);
        assert!(matches!(
            shared.try_recv(),
            Ok(ChangeEvent::Revocations { .. })
        ));
        assert_eq!(woken(&a).await, None);
    }

    #[tokio::test]
    async fn a_signal_raised_while_busy_is_kept_and_keys_follow_changes() {
        let feed = Arc::new(ChangeFeed::new(SERVER.into()));
        let (mut a, _shared) = feed.watch(vec!["spiffe://td/a".into()]);
        // Not waiting yet: the wake-up is kept for the next wait.
        feed.publish(entries(&["spiffe://td/a"]));
        feed.publish(entries(&["spiffe://td/a"]));
        assert_eq!(woken(&a).await, Some(Wake::Entries));
        assert_eq!(woken(&a).await, None);

        assert!(a.set_keys(vec!["spiffe://td/x".into(), "spiffe://td/a".into()]));
        assert!(!a.set_keys(vec!["spiffe://td/a".into(), "spiffe://td/x".into()]));
        feed.publish(entries(&["spiffe://td/x"]));
        assert_eq!(woken(&a).await, Some(Wake::Entries));
        a.set_keys(vec!["spiffe://td/a".into()]);
        feed.publish(entries(&["spiffe://td/x"]));
        assert_eq!(woken(&a).await, None);
        a.wake_self();
        assert_eq!(woken(&a).await, Some(Wake::Entries));

        drop(a);
        assert!(feed.lock().is_empty());
    }
}
