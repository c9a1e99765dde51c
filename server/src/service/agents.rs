//! Attested agents as operators manage them: list, show, ban and evict.
//!
//! A banned agent keeps its record (with `banned = true`) so that it is
//! refused on every call and cannot attest again under the same ID. An
//! evicted agent loses its record: its next call is refused and it must
//! attest again (which a join-token agent can only do with a new token).
//!
//! All methods are blocking; async callers use `spawn_blocking`.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use mayfly::SpiffeId;
use mayfly::revocation::Reason;

use crate::error::{ServiceError, ServiceResult};
use crate::service::entries::page_size;
use crate::state::ServerState;
use crate::store::NodeRecord;

impl ServerState {
    /// Resolves an agent reference: either a full SPIFFE ID
    /// (`spiffe://<td>/mayfly/agent/...`) or the path after
    /// `spiffe://<td>/` (`mayfly/agent/...`).
    pub fn resolve_agent_id(&self, reference: &str) -> ServiceResult<SpiffeId> {
        let full = if reference.starts_with("spiffe://") {
            reference.to_owned()
        } else {
            format!(
                "spiffe://{}/{}",
                self.trust_domain(),
                reference.trim_start_matches('/')
            )
        };
        let id = SpiffeId::new(&full).map_err(|e| {
            ServiceError::InvalidArgument(format!("agent id {reference:?} is not valid: {e}"))
        })?;
        if !id.is_member_of(self.trust_domain()) {
            return Err(ServiceError::InvalidArgument(format!(
                "agent id {id} is not in trust domain {}",
                self.trust_domain()
            )));
        }
        Ok(id)
    }

    /// Attested agents ordered by SPIFFE ID, paginated like entries: at
    /// most `page_size` after the agent named by `page_token`.
    pub fn list_agents(
        &self,
        page_size: Option<usize>,
        page_token: Option<&str>,
    ) -> ServiceResult<(Vec<NodeRecord>, Option<String>)> {
        let size = self::page_size(page_size)?;
        let after = page_token
            .filter(|t| !t.is_empty())
            .map(|t| {
                URL_SAFE_NO_PAD
                    .decode(t)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or_else(|| {
                        ServiceError::InvalidArgument(format!("page_token {t:?} is not valid"))
                    })
            })
            .transpose()?;
        let mut nodes: Vec<NodeRecord> = self
            .store
            .list_nodes()?
            .into_iter()
            .filter(|n| {
                after
                    .as_deref()
                    .is_none_or(|a| n.spiffe_id.to_string().as_str() > a)
            })
            .collect();
        nodes.sort_by_cached_key(|n| n.spiffe_id.to_string());
        let next = if nodes.len() > size {
            nodes.truncate(size);
            nodes
                .last()
                .map(|n| URL_SAFE_NO_PAD.encode(n.spiffe_id.to_string()))
        } else {
            None
        };
        Ok((nodes, next))
    }

    /// One agent.
    pub fn get_agent(&self, id: &SpiffeId) -> ServiceResult<NodeRecord> {
        self.store
            .get_node(&id.to_string())?
            .ok_or_else(|| ServiceError::NotFound(format!("no attested agent {id}")))
    }

    /// Bans an agent: it is refused on its next call and every call after,
    /// its `Sync` stream ends, and everything issued to it is revoked. Returns the updated record.
    pub fn ban_agent(&self, id: &SpiffeId) -> ServiceResult<NodeRecord> {
        let node = self
            .update_node(&id.to_string(), |n| {
                n.banned = true;
                Ok(())
            })?
            .ok_or_else(|| ServiceError::NotFound(format!("no attested agent {id}")))?;
        self.notify_node(&node.spiffe_id.to_string());
        tracing::warn!(agent = %id, "agent banned");
        let revoked = self.revoke_agent_credentials(id, Reason::AgentBanned)?;
        self.audit_agent_change("agent.ban", id, Some(revoked.len()))?;
        Ok(node)
    }

    /// Lifts an agent's ban: it is served again with the SVID it holds (if
    /// still valid and current) or after attesting again. Credentials
    /// revoked by the ban stay revoked. Not banned → `FailedPrecondition`.
    pub fn unban_agent(&self, id: &SpiffeId) -> ServiceResult<NodeRecord> {
        let node = self
            .update_node(&id.to_string(), |n| {
                if !n.banned {
                    return Err(ServiceError::FailedPrecondition(format!(
                        "agent {id} is not banned"
                    )));
                }
                n.banned = false;
                Ok(())
            })?
            .ok_or_else(|| ServiceError::NotFound(format!("no attested agent {id}")))?;
        self.notify_node(&node.spiffe_id.to_string());
        tracing::warn!(agent = %id, "agent unbanned");
        self.audit_agent_change("agent.unban", id, None)?;
        Ok(node)
    }

    /// The service-level record of a ban, eviction or unban: the agent and
    /// how many credentials were revoked. The operator who asked is on the
    /// admin call's record next to it.
    fn audit_agent_change(
        &self,
        action: &str,
        id: &SpiffeId,
        revoked: Option<usize>,
    ) -> ServiceResult<()> {
        let mut event =
            crate::audit::AuditEvent::ok(self.server_actor(), action).target(id.to_string());
        if let Some(n) = revoked {
            event = event.detail("revoked", n);
        }
        self.audit(event)
    }

    /// Evicts an agent: its record is deleted, so that its next call is
    /// refused and it must attest again; everything issued to it is
    /// revoked. Returns the removed record.
    pub fn evict_agent(&self, id: &SpiffeId) -> ServiceResult<NodeRecord> {
        let node = self
            .remove_node(&id.to_string())?
            .ok_or_else(|| ServiceError::NotFound(format!("no attested agent {id}")))?;
        self.notify_node(&node.spiffe_id.to_string());
        tracing::warn!(agent = %id, "agent evicted");
        let revoked = self.revoke_agent_credentials(id, Reason::AgentEvicted)?;
        self.audit_agent_change("agent.evict", id, Some(revoked.len()))?;
        Ok(node)
    }
}

#[cfg(test)]
mod tests {
    use mayfly::entry::Assurance;

    use super::*;
    use crate::service::sign::tests::test_state;

    fn node(state: &ServerState, name: &str) -> NodeRecord {
        let now = state.now();
        NodeRecord {
            spiffe_id: state
                .resolve_agent_id(&format!("mayfly/agent/join_token/{name}"))
                .unwrap(),
            attestor: "join_token".into(),
            assurance: Assurance::Low,
            selectors: Default::default(),
            enrolled_aliases: vec![],
            attested_at: now,
            current_serial: "01".into(),
            next_serial: None,
            svid_expires_at: now,
            banned: false,
            can_reattest: false,
        }
    }

    #[test]
    fn ban_keeps_the_record_and_evict_removes_it() {
        let (state, _clock, _dir) = test_state();
        let a = node(&state, "a");
        state.store.put_node(&a).unwrap();
        state.store.put_node(&node(&state, "b")).unwrap();
        let mut events = state.subscribe();

        let full = state
            .resolve_agent_id("spiffe://example.org/mayfly/agent/join_token/a")
            .unwrap();
        assert_eq!(full, a.spiffe_id);
        assert!(state.ban_agent(&full).unwrap().banned);
        assert!(state.get_agent(&full).unwrap().banned);
        assert!(events.try_recv().is_ok());

        assert!(matches!(
            state.unban_agent(&a.spiffe_id),
            Ok(NodeRecord { banned: false, .. })
        ));
        assert!(!state.get_agent(&full).unwrap().banned);
        let actions: Vec<String> = state
            .store
            .list_audit(0, 10)
            .unwrap()
            .into_iter()
            .map(|r| r.event.action)
            .collect();
        assert_eq!(actions, vec!["agent.ban", "agent.unban"]);
        assert!(matches!(
            state.unban_agent(&full),
            Err(ServiceError::FailedPrecondition(_))
        ));
        state.ban_agent(&full).unwrap();

        state.evict_agent(&full).unwrap();
        assert!(matches!(
            state.get_agent(&full),
            Err(ServiceError::NotFound(_))
        ));
        assert!(matches!(
            state.evict_agent(&full),
            Err(ServiceError::NotFound(_))
        ));
        assert!(matches!(
            state.ban_agent(&full),
            Err(ServiceError::NotFound(_))
        ));
        assert!(state.resolve_agent_id("spiffe://other.org/x").is_err());

        let (page, next) = state.list_agents(Some(1), None).unwrap();
        assert_eq!(page.len(), 1);
        assert!(next.is_none());
    }
}
