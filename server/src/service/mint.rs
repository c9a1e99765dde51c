//! Direct minting by an operator (admin API only): an X.509-SVID or a
//! JWT-SVID for any identity in the trust domain, outside the entry and
//! agent model. Both go through the one signing path in
//! [`crate::service::sign`].
//!
//! Mayfly's own identities (`/mayfly/...`: the server and the agents) are
//! never minted here: a minted server SVID would let its holder pose as the
//! server to every agent.

use mayfly::SpiffeId;
use mayfly::entry::is_dns_name;
use mayfly::ttl::Ttl;
use mayfly::x509::{VerifiedCsr, new_key_and_csr};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::error::{ServiceError, ServiceResult};
use crate::state::ServerState;
use crate::store::IssuedRecord;
use mayfly::revocation::CredentialId;

/// The most DNS names one minted SVID may carry.
const MAX_DNS_NAMES: usize = 64;

/// A minted X.509-SVID.
pub struct MintedX509 {
    /// The certificate chain, leaf first, DER. The leaf only: the CA
    /// certificates are in the trust bundle.
    pub chain_der: Vec<Vec<u8>>,
    /// The PKCS#8 private key, when the server generated it (no CSR given).
    pub key_pkcs8: Option<Zeroizing<Vec<u8>>>,
    /// Serial number, lower-case hex.
    pub serial: String,
    /// NotAfter of the leaf.
    pub expires_at: OffsetDateTime,
}

impl std::fmt::Debug for MintedX509 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MintedX509")
            .field("chain_der", &self.chain_der.len())
            .field("key_pkcs8", &self.key_pkcs8.as_ref().map(|_| "<redacted>"))
            .field("serial", &self.serial)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// A minted JWT-SVID.
#[derive(Clone)]
pub struct MintedJwt {
    /// The compact JWS.
    pub token: Zeroizing<String>,
    /// `exp`, Unix seconds.
    pub expires_at: i64,
    /// `jti`.
    pub jti: String,
}

impl std::fmt::Debug for MintedJwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MintedJwt")
            .field("token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .field("jti", &self.jti)
            .finish()
    }
}

impl ServerState {
    /// Parses a SPIFFE ID an operator asked to mint for: valid, in this
    /// trust domain, and not one of Mayfly's own.
    pub fn mintable_id(&self, spiffe_id: &str) -> ServiceResult<SpiffeId> {
        let id = SpiffeId::new(spiffe_id).map_err(|e| {
            ServiceError::InvalidArgument(format!(
                "spiffe_id {spiffe_id:?} is not a valid SPIFFE ID: {e}"
            ))
        })?;
        if !id.is_member_of(self.trust_domain()) {
            return Err(ServiceError::InvalidArgument(format!(
                "spiffe_id {id} is not in trust domain {}",
                self.trust_domain()
            )));
        }
        if mayfly::id::is_reserved(&id) {
            return Err(ServiceError::PermissionDenied(format!(
                "spiffe_id {id} is reserved for Mayfly's own identities and cannot be minted"
            )));
        }
        Ok(id)
    }

    /// Mints an X.509-SVID for `spiffe_id`. With a CSR (DER PKCS#10) the
    /// SVID certifies the CSR's key, and only the key: identity and DNS
    /// names come from the arguments. Without one, the server generates an
    /// EC P-256 key and returns it.
    pub fn mint_x509(
        &self,
        spiffe_id: &SpiffeId,
        csr_der: Option<&[u8]>,
        ttl: Option<Ttl>,
        dns_names: &[String],
    ) -> ServiceResult<MintedX509> {
        if dns_names.len() > MAX_DNS_NAMES {
            return Err(ServiceError::InvalidArgument(format!(
                "at most {MAX_DNS_NAMES} DNS names are allowed, got {}",
                dns_names.len()
            )));
        }
        if let Some(bad) = dns_names.iter().find(|n| !is_dns_name(n)) {
            return Err(ServiceError::InvalidArgument(format!(
                "dns name {bad:?} is not a valid DNS name"
            )));
        }
        let (csr, key) = match csr_der {
            Some(der) => (VerifiedCsr::from_der(der)?, None),
            None => {
                let k = new_key_and_csr()?;
                (VerifiedCsr::from_der(&k.csr_der)?, Some(k.key_pkcs8))
            }
        };
        let (signed, authority_id) = self.sign_x509_svid_by(spiffe_id, &csr, ttl, dns_names)?;
        self.record_issued(&[IssuedRecord {
            id: CredentialId::Serial(signed.serial_hex()),
            spiffe_id: spiffe_id.to_string(),
            agent_id: None,
            entry_id: None,
            task_id: None,
            authority_id,
            expires_at: signed.not_after,
        }])?;
        tracing::info!(spiffe_id = %spiffe_id, serial = %signed.serial_hex(), not_after = %signed.not_after, generated_key = key.is_some(), "admin minted an X.509-SVID");
        Ok(MintedX509 {
            serial: signed.serial_hex(),
            expires_at: signed.not_after,
            chain_der: vec![signed.der],
            key_pkcs8: key,
        })
    }

    /// Mints a JWT-SVID for `spiffe_id` and `audience`.
    pub fn mint_jwt(
        &self,
        spiffe_id: &SpiffeId,
        audience: &[String],
        ttl: Option<Ttl>,
    ) -> ServiceResult<MintedJwt> {
        let (token, expires_at, jti, key_id) = self.mint_jwt_svid_by(spiffe_id, audience, ttl)?;
        self.record_issued(&[IssuedRecord {
            id: CredentialId::Jti(jti.clone()),
            spiffe_id: spiffe_id.to_string(),
            agent_id: None,
            entry_id: None,
            task_id: None,
            authority_id: key_id,
            expires_at: OffsetDateTime::from_unix_timestamp(expires_at)
                .map_err(|e| ServiceError::Internal(format!("token expiry out of range: {e}")))?,
        }])?;
        tracing::info!(spiffe_id = %spiffe_id, jti = %jti, exp = expires_at, audience = ?audience, "admin minted a JWT-SVID");
        Ok(MintedJwt {
            token: Zeroizing::new(token),
            expires_at,
            jti,
        })
    }
}

#[cfg(test)]
mod tests {
    use mayfly::x509::SvidInfo;

    use super::*;
    use crate::service::sign::tests::test_state;

    #[test]
    fn mints_with_and_without_csr() {
        let (state, _clock, _dir) = test_state();
        let id = state.mintable_id("spiffe://example.org/ops/tool").unwrap();
        let m = state
            .mint_x509(&id, None, None, &["a.example.org".into()])
            .unwrap();
        assert!(m.key_pkcs8.is_some());
        assert_eq!(SvidInfo::from_der(&m.chain_der[0]).unwrap().spiffe_id, id);
        assert!(format!("{m:?}").contains("redacted"));

        let k = new_key_and_csr().unwrap();
        let m = state.mint_x509(&id, Some(&k.csr_der), None, &[]).unwrap();
        assert!(m.key_pkcs8.is_none());
        assert!(matches!(
            state.mint_x509(&id, Some(b"junk"), None, &[]),
            Err(ServiceError::InvalidArgument(_))
        ));
        assert!(matches!(
            state.mint_x509(&id, None, None, &["bad name".into()]),
            Err(ServiceError::InvalidArgument(_))
        ));
        assert!(matches!(
            state.mintable_id("spiffe://example.org/mayfly/server"),
            Err(ServiceError::PermissionDenied(_))
        ));
        assert!(state.mintable_id("spiffe://other.org/x").is_err());
    }
}
