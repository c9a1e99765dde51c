//! Join tokens: single-use enrollment secrets for the `join_token` node
//! attestor. Only a SHA-256 of the secret is stored; the secret is shown
//! once, to whoever created it, and never logged.

use mayfly::SpiffeId;
use mayfly::ttl::Ttl;
use sha2::{Digest as _, Sha256};
use zeroize::Zeroizing;

use crate::error::{ServiceError, ServiceResult};
use crate::state::ServerState;
use crate::store::JoinTokenRecord;

/// The one message for every refused token, so that a caller cannot tell
/// an unknown token from a used or expired one.
pub const INVALID_JOIN_TOKEN: &str = "join token is invalid, expired or already used";

/// SHA-256 of a join token, lower-case hex: the form the store keeps.
pub fn join_token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl ServerState {
    /// Creates a join token valid for `ttl` (default `join_token_ttl`).
    /// `alias`, when given, must be a SPIFFE ID in the trust domain outside
    /// Mayfly's reserved `/mayfly/` space; the agent enrolled with the token
    /// becomes a member of that alias. Returns the secret (show it once) and
    /// the stored record, which holds only its hash. Blocking (durable
    /// write): call from `spawn_blocking` in async code.
    pub fn create_join_token(
        &self,
        alias: Option<&str>,
        ttl: Option<Ttl>,
    ) -> ServiceResult<(Zeroizing<String>, JoinTokenRecord)> {
        let alias = alias.map(|a| self.parse_alias(a)).transpose()?;
        let secret = Zeroizing::new(rand::random::<[u8; 32]>());
        let token = Zeroizing::new(hex::encode(secret.as_slice()));
        let now = self.now();
        let ttl = ttl.unwrap_or(self.config.join_token_ttl);
        let record = JoinTokenRecord {
            id: uuid::Uuid::new_v4().to_string(),
            token_sha256: join_token_hash(&token),
            alias: alias.map(|a| a.to_string()),
            created_at: now,
            expires_at: now + ttl.as_time(),
        };
        self.store.put_join_token(&record)?;
        tracing::info!(token_id = %record.id, alias = record.alias.as_deref(), expires_at = %record.expires_at, "created join token");
        Ok((token, record))
    }

    /// Redeems a join token: atomically takes its record (so that it works
    /// at most once, even under concurrent attempts) and checks its expiry.
    /// An unknown, used or expired token is `PermissionDenied` with
    /// [`INVALID_JOIN_TOKEN`]. Blocking: call from `spawn_blocking`.
    pub fn redeem_join_token(&self, token: &str) -> ServiceResult<JoinTokenRecord> {
        let denied = || ServiceError::PermissionDenied(INVALID_JOIN_TOKEN.into());
        let record = self
            .store
            .take_join_token(&join_token_hash(token))?
            .ok_or_else(denied)?;
        if record.expires_at <= self.now() {
            tracing::info!(token_id = %record.id, expired_at = %record.expires_at, "refused expired join token");
            return Err(denied());
        }
        Ok(record)
    }

    fn parse_alias(&self, alias: &str) -> ServiceResult<SpiffeId> {
        let id = SpiffeId::new(alias).map_err(|e| {
            ServiceError::InvalidArgument(format!(
                "join token alias {alias:?} is not a valid SPIFFE ID: {e}"
            ))
        })?;
        if !id.is_member_of(self.trust_domain()) {
            return Err(ServiceError::InvalidArgument(format!(
                "join token alias {id} is not in trust domain {}",
                self.trust_domain()
            )));
        }
        if mayfly::id::is_reserved(&id) {
            return Err(ServiceError::InvalidArgument(format!(
                "join token alias {id} is reserved for Mayfly's own identities (/mayfly/...)"
            )));
        }
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::sign::tests::test_state;

    #[test]
    fn a_token_works_once() {
        let (state, _clock, _dir) = test_state();
        let (token, record) = state.create_join_token(None, None).unwrap();
        assert_eq!(token.len(), 64);
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
        assert!(uuid::Uuid::parse_str(&record.id).is_ok());
        let redeemed = state.redeem_join_token(&token).unwrap();
        assert_eq!(redeemed, record);
        let err = state.redeem_join_token(&token).unwrap_err();
        assert!(
            matches!(&err, ServiceError::PermissionDenied(m) if m == INVALID_JOIN_TOKEN),
            "{err:?}"
        );
        assert!(matches!(
            state.redeem_join_token("not-a-token"),
            Err(ServiceError::PermissionDenied(_))
        ));
    }

    #[test]
    fn an_expired_token_is_refused() {
        let (state, clock, _dir) = test_state();
        let ttl = Ttl::from_secs(60);
        let (token, record) = state.create_join_token(None, ttl).unwrap();
        assert_eq!(
            record.expires_at - record.created_at,
            time::Duration::minutes(1)
        );
        clock.advance(time::Duration::seconds(60));
        assert!(matches!(
            state.redeem_join_token(&token),
            Err(ServiceError::PermissionDenied(_))
        ));
        let (_, default) = state.create_join_token(None, None).unwrap();
        assert_eq!(
            default.expires_at - default.created_at,
            time::Duration::minutes(10)
        );
    }

    #[test]
    fn the_alias_is_validated() {
        let (state, _clock, _dir) = test_state();
        let (_, record) = state
            .create_join_token(Some("spiffe://example.org/cluster/blue"), None)
            .unwrap();
        assert_eq!(
            record.alias.as_deref(),
            Some("spiffe://example.org/cluster/blue")
        );
        for bad in [
            "not a spiffe id",
            "spiffe://other.org/cluster/blue",
            "spiffe://example.org/mayfly/server",
            "spiffe://example.org/mayfly/agent/join_token/x",
        ] {
            assert!(
                matches!(
                    state.create_join_token(Some(bad), None),
                    Err(ServiceError::InvalidArgument(_))
                ),
                "{bad} accepted"
            );
        }
    }

    #[test]
    fn the_stored_record_has_no_secret() {
        let (state, _clock, dir) = test_state();
        let (token, record) = state.create_join_token(None, None).unwrap();
        assert_eq!(record.token_sha256, join_token_hash(&token));
        assert_ne!(record.token_sha256, *token);
        let json = serde_json::to_string(&record).unwrap();
        assert!(!json.contains(token.as_str()));
        assert!(!format!("{record:?}").contains(token.as_str()));
        // Nor anywhere in the store's files.
        drop(state);
        for file in walk(dir.path()) {
            let bytes = std::fs::read(&file).unwrap();
            assert!(
                !bytes.windows(token.len()).any(|w| w == token.as_bytes()),
                "secret found in {}",
                file.display()
            );
        }
    }

    fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
        out
    }
}
