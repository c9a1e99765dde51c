//! Who may receive which entry.
//!
//! - An **agent** is authorized for an entry when the entry's parent is the
//!   agent itself or one of the node aliases the agent belongs to. A node
//!   alias is an entry whose parent is the server (`spiffe://<td>/mayfly/server`)
//!   and whose selectors are a subset of the agent's node selectors, or an
//!   alias the agent was enrolled with (a join token's SPIFFE ID).
//! - A **workload** matches an entry when the entry's selectors are a subset
//!   of the workload's selectors.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use spiffe::SpiffeId;
use time::OffsetDateTime;

use crate::entry::{Entry, EntryId};
use crate::selector::{SelectorSet, is_subset};

/// Whether a workload with `selectors` matches `entry`.
pub fn workload_matches(entry: &Entry, selectors: &SelectorSet) -> bool {
    is_subset(&entry.selectors, selectors)
}

/// The entries (from an agent's authorized set) that a workload matches, in
/// a stable order (by SPIFFE ID, then id).
pub fn matching_entries<'a>(
    entries: impl IntoIterator<Item = &'a Entry>,
    selectors: &SelectorSet,
    now: OffsetDateTime,
) -> Vec<&'a Entry> {
    let mut out: Vec<&Entry> = entries
        .into_iter()
        .filter(|e| !e.is_expired(now) && workload_matches(e, selectors))
        .collect();
    out.sort_by(|a, b| (a.spiffe_id.to_string(), &a.id).cmp(&(b.spiffe_id.to_string(), &b.id)));
    out
}

/// An in-memory index of every entry, by id and by parent, so that an
/// agent's authorized set is found without scanning.
#[derive(Debug, Default, Clone)]
pub struct EntryIndex {
    by_id: HashMap<EntryId, Arc<Entry>>,
    by_parent: HashMap<String, BTreeSet<EntryId>>,
}

impl EntryIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Inserts or replaces an entry; returns the previous version.
    pub fn upsert(&mut self, entry: Entry) -> Option<Arc<Entry>> {
        let previous = self.remove(&entry.id);
        self.by_parent
            .entry(entry.parent_id.to_string())
            .or_default()
            .insert(entry.id.clone());
        self.by_id.insert(entry.id.clone(), Arc::new(entry));
        previous
    }

    /// Removes an entry; returns it.
    pub fn remove(&mut self, id: &EntryId) -> Option<Arc<Entry>> {
        let entry = self.by_id.remove(id)?;
        let parent = entry.parent_id.to_string();
        if let Some(set) = self.by_parent.get_mut(&parent) {
            set.remove(id);
            if set.is_empty() {
                self.by_parent.remove(&parent);
            }
        }
        Some(entry)
    }

    /// One entry.
    pub fn get(&self, id: &EntryId) -> Option<&Arc<Entry>> {
        self.by_id.get(id)
    }

    /// Entries whose parent is `parent`.
    pub fn children<'a>(&'a self, parent: &SpiffeId) -> impl Iterator<Item = &'a Arc<Entry>> + 'a {
        self.by_parent
            .get(&parent.to_string())
            .into_iter()
            .flatten()
            .filter_map(|id| self.by_id.get(id))
    }

    /// The node aliases an agent belongs to: entries parented by the server
    /// whose selectors the agent's node selectors satisfy.
    pub fn node_aliases(
        &self,
        server_id: &SpiffeId,
        node_selectors: &SelectorSet,
        now: OffsetDateTime,
    ) -> Vec<SpiffeId> {
        self.children(server_id)
            .filter(|e| !e.is_expired(now) && is_subset(&e.selectors, node_selectors))
            .map(|e| e.spiffe_id.clone())
            .collect()
    }

    /// Every entry the agent is authorized for, keyed by id.
    pub fn authorized_for(
        &self,
        agent: &AgentView<'_>,
        now: OffsetDateTime,
    ) -> BTreeMap<EntryId, Arc<Entry>> {
        let mut parents: Vec<SpiffeId> = vec![agent.agent_id.clone()];
        parents.extend(agent.enrolled_aliases.iter().cloned());
        parents.extend(self.node_aliases(agent.server_id, agent.node_selectors, now));
        let mut out = BTreeMap::new();
        for parent in &parents {
            for e in self.children(parent) {
                if !e.is_expired(now) {
                    out.insert(e.id.clone(), Arc::clone(e));
                }
            }
        }
        out
    }

    /// Whether the agent is authorized for entry `id`.
    pub fn is_authorized(
        &self,
        agent: &AgentView<'_>,
        id: &EntryId,
        now: OffsetDateTime,
    ) -> Option<Arc<Entry>> {
        let e = self.by_id.get(id)?;
        if e.is_expired(now) {
            return None;
        }
        let parent = &e.parent_id;
        let ok = parent == agent.agent_id
            || agent.enrolled_aliases.contains(parent)
            || self
                .node_aliases(agent.server_id, agent.node_selectors, now)
                .contains(parent);
        ok.then(|| Arc::clone(e))
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Entry>> {
        self.by_id.values()
    }
}

/// What the index needs to know about an agent to authorize it.
#[derive(Debug, Clone, Copy)]
pub struct AgentView<'a> {
    /// The server's own ID (the parent of node alias entries).
    pub server_id: &'a SpiffeId,
    /// The agent's SPIFFE ID.
    pub agent_id: &'a SpiffeId,
    /// Selectors produced by the agent's node attestation.
    pub node_selectors: &'a SelectorSet,
    /// Aliases the agent was enrolled with (for example a join token's SPIFFE ID).
    pub enrolled_aliases: &'a [SpiffeId],
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::EntrySpec;
    use spiffe::TrustDomain;

    fn entry(spiffe: &str, parent: &str, sels: &[&str]) -> Entry {
        EntrySpec {
            spiffe_id: spiffe.into(),
            parent_id: parent.into(),
            selectors: sels.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        }
        .validate(
            &TrustDomain::new("example.org").unwrap(),
            EntryId::random(),
            1,
        )
        .unwrap()
    }

    fn sels(s: &[&str]) -> SelectorSet {
        s.iter().map(|x| x.parse().unwrap()).collect()
    }

    const SERVER: &str = "spiffe://example.org/mayfly/server";
    const A1: &str = "spiffe://example.org/mayfly/agent/join_token/a1";
    const A2: &str = "spiffe://example.org/mayfly/agent/join_token/a2";

    #[test]
    fn workload_match_is_subset() {
        let e = entry(
            "spiffe://example.org/web",
            A1,
            &["unix:uid:1000", "unix:gid:1000"],
        );
        assert!(workload_matches(
            &e,
            &sels(&["unix:uid:1000", "unix:gid:1000", "unix:user:bob"])
        ));
        assert!(!workload_matches(&e, &sels(&["unix:uid:1000"])));
        assert!(!workload_matches(
            &e,
            &sels(&["unix:uid:0", "unix:gid:1000"])
        ));
    }

    #[test]
    fn agents_see_only_their_entries_and_aliases() {
        let mut idx = EntryIndex::new();
        let mine = entry("spiffe://example.org/web", A1, &["unix:uid:1"]);
        let theirs = entry("spiffe://example.org/db", A2, &["unix:uid:1"]);
        let alias = entry(
            "spiffe://example.org/cluster/blue",
            SERVER,
            &["join_token:group:blue"],
        );
        let via_alias = entry(
            "spiffe://example.org/batch",
            "spiffe://example.org/cluster/blue",
            &["unix:uid:2"],
        );
        for e in [&mine, &theirs, &alias, &via_alias] {
            idx.upsert(e.clone());
        }
        let server = SpiffeId::new(SERVER).unwrap();
        let a1 = SpiffeId::new(A1).unwrap();
        let now = OffsetDateTime::now_utc();
        let plain = sels(&["join_token:group:red"]);
        let view = AgentView {
            server_id: &server,
            agent_id: &a1,
            node_selectors: &plain,
            enrolled_aliases: &[],
        };
        let got: Vec<_> = idx.authorized_for(&view, now).into_keys().collect();
        assert_eq!(got, vec![mine.id.clone()]);
        assert!(idx.is_authorized(&view, &theirs.id, now).is_none());
        assert!(idx.is_authorized(&view, &via_alias.id, now).is_none());

        let blue = sels(&["join_token:group:blue"]);
        let view = AgentView {
            node_selectors: &blue,
            ..view
        };
        let got = idx.authorized_for(&view, now);
        assert!(got.contains_key(&mine.id) && got.contains_key(&via_alias.id) && got.len() == 2);
        assert!(idx.is_authorized(&view, &via_alias.id, now).is_some());

        idx.remove(&mine.id);
        assert!(idx.is_authorized(&view, &mine.id, now).is_none());
        assert_eq!(idx.len(), 3);
    }
}
