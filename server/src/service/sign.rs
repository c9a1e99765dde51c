//! The one signing path for SVIDs, used by the node API (for agents and
//! their workloads) and by the admin API (for direct minting).
//!
//! Identity, DNS names and lifetime always come from the caller's decision
//! (a registration entry or an operator request), never from the CSR.

use mayfly::SpiffeId;
use mayfly::jwt::JwtClaims;
use mayfly::ttl::Ttl;
use mayfly::x509::{SignedCert, SvidParams, VerifiedCsr};

use crate::error::{ServiceError, ServiceResult};
use crate::state::ServerState;

/// The most audiences one JWT-SVID may carry; a bound on token size.
const MAX_AUDIENCES: usize = 32;

impl ServerState {
    fn check_member(&self, spiffe_id: &SpiffeId) -> ServiceResult<()> {
        if spiffe_id.is_member_of(self.trust_domain()) {
            Ok(())
        } else {
            Err(ServiceError::InvalidArgument(format!(
                "{spiffe_id} is not in trust domain {}",
                self.trust_domain()
            )))
        }
    }

    /// Signs an X.509-SVID for `spiffe_id` over the CSR's public key, valid
    /// for `ttl` (default `default_x509_svid_ttl`, clamped to the active
    /// CA's NotAfter) from the injected clock's now. Returns the leaf only.
    pub fn sign_x509_svid(
        &self,
        spiffe_id: &SpiffeId,
        csr: &VerifiedCsr,
        ttl: Option<Ttl>,
        dns_names: &[String],
    ) -> ServiceResult<SignedCert> {
        self.sign_x509_svid_by(spiffe_id, csr, ttl, dns_names)
            .map(|(signed, _)| signed)
    }

    /// [`Self::sign_x509_svid`], also returning the id of the CA that
    /// signed (always the active one).
    pub fn sign_x509_svid_by(
        &self,
        spiffe_id: &SpiffeId,
        csr: &VerifiedCsr,
        ttl: Option<Ttl>,
        dns_names: &[String],
    ) -> ServiceResult<(SignedCert, String)> {
        self.check_member(spiffe_id)?;
        let ttl = ttl.unwrap_or(self.config.default_x509_svid_ttl);
        let params = SvidParams {
            spiffe_id,
            dns_names,
            ttl: ttl.as_time(),
        };
        let authorities = self.authorities.snapshot();
        let (id, ca) = authorities
            .active_x509()
            .ok_or_else(|| ServiceError::Internal("no active X.509 authority".into()))?;
        Ok((ca.sign_svid(csr, &params, self.now())?, id.to_owned()))
    }

    /// Mints a JWT-SVID for `spiffe_id` and `audience` (non-empty), valid for
    /// `ttl` (default `default_jwt_svid_ttl`, clamped to the active JWT key's
    /// NotAfter), signed by the active JWT key. Returns the token, its `exp`
    /// (Unix seconds) and its `jti` (a random UUID, for audit and
    /// revocation). `iss` is set when `jwt_issuer` is configured.
    pub fn mint_jwt_svid(
        &self,
        spiffe_id: &SpiffeId,
        audience: &[String],
        ttl: Option<Ttl>,
    ) -> ServiceResult<(String, i64, String)> {
        self.mint_jwt_svid_by(spiffe_id, audience, ttl)
            .map(|(token, exp, jti, _)| (token, exp, jti))
    }

    /// [`Self::mint_jwt_svid`], also returning the id of the key that
    /// signed (always the active one).
    pub fn mint_jwt_svid_by(
        &self,
        spiffe_id: &SpiffeId,
        audience: &[String],
        ttl: Option<Ttl>,
    ) -> ServiceResult<(String, i64, String, String)> {
        self.check_member(spiffe_id)?;
        if audience.is_empty() {
            return Err(ServiceError::InvalidArgument(
                "a JWT-SVID needs at least one audience".into(),
            ));
        }
        if audience.len() > MAX_AUDIENCES {
            return Err(ServiceError::InvalidArgument(format!(
                "at most {MAX_AUDIENCES} audiences are allowed, got {}",
                audience.len()
            )));
        }
        if audience.iter().any(|a| a.trim().is_empty()) {
            return Err(ServiceError::InvalidArgument(
                "an audience must not be empty".into(),
            ));
        }
        let ttl = ttl.unwrap_or(self.config.default_jwt_svid_ttl);
        let authorities = self.authorities.snapshot();
        let (key, key_not_after) = authorities
            .active_jwt()
            .ok_or_else(|| ServiceError::Internal("no active JWT signing key".into()))?;
        let now = self.now().unix_timestamp();
        if now >= key_not_after.unix_timestamp() {
            return Err(ServiceError::Internal(format!(
                "the active JWT signing key {} has expired",
                key.key_id()
            )));
        }
        let exp = now
            .saturating_add(i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX))
            .min(key_not_after.unix_timestamp());
        let jti = uuid::Uuid::new_v4().to_string();
        let claims = JwtClaims {
            sub: spiffe_id.to_string(),
            aud: audience.to_vec(),
            exp,
            iat: now,
            jti: jti.clone(),
            iss: self.config.jwt_issuer.clone(),
        };
        let token = key
            .mint(&claims)
            .map_err(|e| ServiceError::Internal(format!("minting a JWT-SVID: {e}")))?;
        Ok((token, exp, jti, key.key_id().to_owned()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use mayfly::clock::{Clock as _, ManualClock};
    use mayfly::x509::{SvidInfo, new_key_and_csr};
    use time::OffsetDateTime;

    use super::*;
    use crate::authority::AuthorityManager;
    use crate::config::ServerConfig;
    use crate::store::sled_store::SledStore;

    /// A state over a temporary store with a manual clock, for unit tests.
    pub(crate) fn test_state() -> (Arc<ServerState>, ManualClock, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServerConfig::development();
        config.data_dir = dir.path().to_owned();
        config.jwt_issuer = Some("https://issuer.example.org".into());
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let clock = ManualClock::new(now);
        let authorities = AuthorityManager::load_or_create(&config, now).unwrap();
        let store = SledStore::open(&dir.path().join("store")).unwrap();
        let state = ServerState::new(
            config,
            Arc::new(store),
            Arc::new(clock.clone()),
            authorities,
        )
        .unwrap();
        (Arc::new(state), clock, dir)
    }

    fn csr() -> VerifiedCsr {
        VerifiedCsr::from_der(&new_key_and_csr().unwrap().csr_der).unwrap()
    }

    #[test]
    fn x509_svid_has_the_given_identity_and_default_ttl() {
        let (state, clock, _dir) = test_state();
        let id = SpiffeId::new("spiffe://example.org/web").unwrap();
        let signed = state.sign_x509_svid(&id, &csr(), None, &[]).unwrap();
        let info = SvidInfo::from_der(&signed.der).unwrap();
        assert_eq!(info.spiffe_id, id);
        assert_eq!(info.not_after, clock.now() + time::Duration::hours(1));

        let short = Ttl::from_secs(60);
        let signed = state.sign_x509_svid(&id, &csr(), short, &[]).unwrap();
        assert_eq!(signed.not_after, clock.now() + time::Duration::minutes(1));

        let foreign = SpiffeId::new("spiffe://other.org/web").unwrap();
        assert!(matches!(
            state.sign_x509_svid(&foreign, &csr(), None, &[]),
            Err(ServiceError::InvalidArgument(_))
        ));
    }

    #[test]
    fn jwt_svid_claims_and_audience_rules() {
        let (state, clock, _dir) = test_state();
        let id = SpiffeId::new("spiffe://example.org/web").unwrap();
        let (token, exp, jti) = state.mint_jwt_svid(&id, &["db".to_owned()], None).unwrap();
        let now = clock.now();
        assert_eq!(exp, now.unix_timestamp() + 300);
        let bundle = state.bundle();
        let v = mayfly::jwt::validate(&token, "db", &[&bundle], now).unwrap();
        assert_eq!(v.spiffe_id, id);
        assert_eq!(v.jti.as_deref(), Some(jti.as_str()));
        assert!(uuid::Uuid::parse_str(&jti).is_ok());
        assert_eq!(v.claims["iss"], "https://issuer.example.org");
        assert_eq!(v.claims["iat"], now.unix_timestamp());

        let (_, _, other_jti) = state.mint_jwt_svid(&id, &["db".to_owned()], None).unwrap();
        assert_ne!(jti, other_jti);
        assert!(matches!(
            state.mint_jwt_svid(&id, &[], None),
            Err(ServiceError::InvalidArgument(_))
        ));
        assert!(matches!(
            state.mint_jwt_svid(&id, &[String::new()], None),
            Err(ServiceError::InvalidArgument(_))
        ));
    }
}
