//! Identity templates on the agent (automatic pod identities): the server
//! sends the templates that apply to this agent with its entries; when a
//! workload's selectors fit one, the derived entry is added to the agent's
//! entries, where it is matched, signed (task-scoped; the server derives and
//! checks it again) and revoked like any registered entry.
//!
//! Derived entries stay while their template does: a full sync keeps (and
//! re-derives) the ones whose template is still sent, and drops the others
//! with their credentials.

use std::collections::BTreeMap;
use std::sync::Arc;

use mayfly::SpiffeId;
use mayfly::TrustDomain;
use mayfly::entry::{Entry, EntryId};
use mayfly::proto::node as pb;
use mayfly::selector::SelectorSet;
use mayfly::template::{DerivedId, IdentityTemplate};

use crate::cache::Snapshot;

/// The templates of a full sync; the ones that do not validate are left out
/// and reported.
pub fn parse(templates: &[pb::IdentityTemplate]) -> (Vec<IdentityTemplate>, Vec<String>) {
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    for t in templates {
        match IdentityTemplate::from_proto(t) {
            Ok(t) => out.push(t),
            Err(e) => warnings.push(format!("identity template {:?} ignored: {e}", t.id)),
        }
    }
    (out, warnings)
}

/// Carries the derived entries of `previous` that `templates` still derive
/// into `next` (re-derived, so that a changed template applies).
pub fn carry_over(
    next: &mut BTreeMap<EntryId, Arc<Entry>>,
    previous: &BTreeMap<EntryId, Arc<Entry>>,
    templates: &[IdentityTemplate],
    td: &TrustDomain,
    agent_id: &SpiffeId,
) {
    for id in previous.keys() {
        if let Some(d) = DerivedId::parse(id.as_str())
            && let Some(t) = templates.iter().find(|t| t.id() == d.template)
            && let Ok(e) = t.derive_for(td, agent_id, d.namespace, d.service_account)
        {
            next.insert(e.id.clone(), Arc::new(e));
        }
    }
}

/// The derived entries a workload with `selectors` gets that `snap` does
/// not hold yet.
pub fn missing(snap: &Snapshot, selectors: &SelectorSet, td: &TrustDomain) -> Vec<Entry> {
    let Some(agent_id) = snap.agent_id.as_ref() else {
        return Vec::new();
    };
    snap.templates
        .iter()
        .filter_map(|t| t.derive(td, agent_id, selectors))
        .filter(|e| !snap.entries.contains_key(&e.id))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn derived_entries_follow_their_templates() {
        let td = TrustDomain::new("example.org").unwrap();
        let agent = SpiffeId::new("spiffe://example.org/mayfly/agent/k8s_psat/c/n").unwrap();
        let t = IdentityTemplate::new(
            "k8s.c.0",
            mayfly::template::DEFAULT_PATH,
            vec![],
            vec![],
            None,
            None,
        )
        .unwrap();
        let mut snap = Snapshot {
            templates: Arc::new(vec![t.clone()]),
            agent_id: Some(agent.clone()),
            ..Default::default()
        };
        let sels: SelectorSet = ["k8s:ns:a", "k8s:sa:b"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let new = missing(&snap, &sels, &td);
        assert_eq!(new.len(), 1);
        let e = new.into_iter().next().unwrap();
        snap.entries.insert(e.id.clone(), Arc::new(e));
        assert!(missing(&snap, &sels, &td).is_empty());

        let mut next = BTreeMap::new();
        carry_over(&mut next, &snap.entries, &[t], &td, &agent);
        assert_eq!(next.len(), 1);
        let mut next = BTreeMap::new();
        carry_over(&mut next, &snap.entries, &[], &td, &agent);
        assert!(
            next.is_empty(),
            "a withdrawn template takes its entries along"
        );
    }
}
