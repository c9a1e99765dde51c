//! SPIFFE IDs of Mayfly's own parts, and helpers over the `spiffe` crate's
//! validated [`SpiffeId`] and [`TrustDomain`] types.

use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};

/// The reserved path prefix for Mayfly's own identities.
pub const RESERVED_PREFIX: &str = "/mayfly/";

/// `spiffe://<td>/mayfly/server`: the server's identity, and the parent of
/// node alias entries.
pub fn server_id(td: &TrustDomain) -> SpiffeId {
    // The trust domain is validated and the path is a constant of valid
    // segments, so this cannot fail.
    SpiffeId::from_segments(td.clone(), &["mayfly", "server"])
        .unwrap_or_else(|_| unreachable_id(td))
}

/// `spiffe://<td>/mayfly/agent/<attestor>/<id...>`: an agent's identity.
pub fn agent_id(td: &TrustDomain, attestor: &str, id: &[&str]) -> Result<SpiffeId, SpiffeIdError> {
    let mut segments = vec!["mayfly", "agent", attestor];
    segments.extend_from_slice(id);
    SpiffeId::from_segments(td.clone(), &segments)
}

/// Whether `id` is an agent identity (`/mayfly/agent/...`).
pub fn is_agent_id(id: &SpiffeId) -> bool {
    id.path().starts_with("/mayfly/agent/")
}

/// Whether `id` lies in the path space reserved for Mayfly itself, which
/// operators cannot register workloads into.
pub fn is_reserved(id: &SpiffeId) -> bool {
    id.path().starts_with(RESERVED_PREFIX) || id.path() == "/mayfly"
}

fn unreachable_id(td: &TrustDomain) -> SpiffeId {
    // Only reached if the spiffe crate changed its segment rules; fall back
    // to parsing the same string, which yields the same ID.
    #[allow(clippy::expect_used)] // invariant: constant, valid path segments
    SpiffeId::new(format!("spiffe://{}/mayfly/server", td.as_str())).expect("valid server id")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_of_our_parts() {
        let td = TrustDomain::new("example.org").unwrap();
        assert_eq!(
            server_id(&td).to_string(),
            "spiffe://example.org/mayfly/server"
        );
        let agent = agent_id(&td, "join_token", &["abc"]).unwrap();
        assert_eq!(
            agent.to_string(),
            "spiffe://example.org/mayfly/agent/join_token/abc"
        );
        assert!(is_agent_id(&agent));
        assert!(is_reserved(&agent));
        assert!(!is_reserved(
            &SpiffeId::new("spiffe://example.org/mayflyish").unwrap()
        ));
        assert!(agent_id(&td, "join_token", &["a/b"]).is_err());
    }
}
