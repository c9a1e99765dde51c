//! The node API's TLS: the server's own X.509-SVID
//! (`spiffe://<td>/mayfly/server`), renewed in the background at half
//! life and re-issued when a new CA becomes active, and the client
//! verifier that accepts agents' SVIDs (and, for `Attest` only, no
//! certificate at all) against every CA of the current bundle, rebuilt
//! when the bundle changes: across an activation, agents holding SVIDs of
//! the old CA and of the new one are both accepted.
//!
//! Crypto is rustls with the aws-lc-rs provider, chosen explicitly rather
//! than through a process-wide default.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use mayfly::x509::{VerifiedCsr, new_key_and_csr};
use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

use crate::error::ServiceError;
use crate::state::{ChangeEvent, ServerState};

/// The shortest wait between renewals, so that a nearly expired CA cannot
/// make the renewal loop spin.
const MIN_REFRESH: Duration = Duration::from_secs(5);
/// The wait before retrying a failed renewal.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// Why the node API's TLS could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The server SVID could not be issued (for example an expired CA).
    #[error("cannot issue the server SVID: {0}")]
    Issue(#[from] ServiceError),
    /// Key generation or loading failed.
    #[error("server SVID key: {0}")]
    Key(String),
    /// The CA certificates could not be used as client trust roots.
    #[error("client certificate verifier: {0}")]
    Verifier(String),
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// The crypto provider used by the node API.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A server SVID ready for rustls, and when it was issued and expires.
#[derive(Debug, Clone)]
pub struct ServerSvid {
    /// Chain (leaf only) and key.
    pub certified: Arc<CertifiedKey>,
    /// When it was issued (the injected clock's now).
    pub issued_at: OffsetDateTime,
    /// NotAfter.
    pub not_after: OffsetDateTime,
    /// The id of the CA that signed it.
    pub issuer_id: String,
}

/// Issues a server SVID for a fresh key from the active CA, valid for
/// `agent_svid_ttl` or until the CA expires, whichever is sooner.
pub fn issue_server_svid(
    state: &ServerState,
    provider: &CryptoProvider,
) -> Result<ServerSvid, TlsError> {
    let key = new_key_and_csr().map_err(|e| TlsError::Key(e.to_string()))?;
    let csr = VerifiedCsr::from_der(&key.csr_der).map_err(|e| TlsError::Key(e.to_string()))?;
    let issued_at = state.now();
    let (signed, issuer_id) = state.sign_x509_svid_by(
        &state.server_id,
        &csr,
        Some(state.config.agent_svid_ttl),
        &[],
    )?;
    let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.key_pkcs8.to_vec()));
    let certified =
        CertifiedKey::from_der(vec![CertificateDer::from(signed.der)], private, provider)?;
    Ok(ServerSvid {
        certified: Arc::new(certified),
        issued_at,
        not_after: signed.not_after,
        issuer_id,
    })
}

/// How long to wait before renewing an SVID issued at `issued_at` and
/// expiring at `not_after`, seen at `now`: until half its lifetime has
/// passed, and at least [`MIN_REFRESH`].
pub fn refresh_in(
    issued_at: OffsetDateTime,
    not_after: OffsetDateTime,
    now: OffsetDateTime,
) -> Duration {
    let half_life = issued_at + (not_after - issued_at) / 2;
    Duration::try_from(half_life - now)
        .unwrap_or(Duration::ZERO)
        .max(MIN_REFRESH)
}

/// Serves the current server SVID to every handshake; swapped in place
/// on renewal, so existing connections keep theirs and new ones get the new.
#[derive(Debug)]
pub struct SvidResolver {
    current: RwLock<ServerSvid>,
}

impl SvidResolver {
    /// A resolver serving `svid`.
    pub fn new(svid: ServerSvid) -> Self {
        Self {
            current: RwLock::new(svid),
        }
    }

    /// The SVID being served.
    pub fn current(&self) -> ServerSvid {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn replace(&self, svid: ServerSvid) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = svid;
    }
}

impl ResolvesServerCert for SvidResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .certified,
        ))
    }
}

/// The node API's rustls configuration: TLS 1.3 and 1.2, ALPN `h2`, the
/// server SVID from `resolver`, and client certificates verified against
/// the CA certificates of the trust bundle but optional (only `Attest` is
/// served without one; the node API checks that per call).
pub fn server_config(
    state: &ServerState,
    resolver: Arc<SvidResolver>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let mut roots = RootCertStore::empty();
    for der in state.bundle().x509_authorities {
        roots
            .add(CertificateDer::from(der))
            .map_err(|e| TlsError::Verifier(e.to_string()))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Keeps the node API's TLS current until `shutdown` turns true: renews
/// the server SVID at half life, and on every bundle change rebuilds the
/// client verifier from the new bundle (published through `acceptor`) and
/// re-issues the server SVID if another CA is now active.
pub async fn maintain(
    state: Arc<ServerState>,
    resolver: Arc<SvidResolver>,
    acceptor: watch::Sender<TlsAcceptor>,
    mut shutdown: watch::Receiver<bool>,
) {
    let provider = provider();
    let mut events = state.subscribe();
    let mut wait = {
        let svid = resolver.current();
        refresh_in(svid.issued_at, svid.not_after, state.now())
    };
    let mut deadline = tokio::time::Instant::now() + wait;
    loop {
        // A deadline rather than a fresh sleep, so that unrelated events
        // cannot postpone the renewal.
        let sleep = tokio::time::sleep_until(deadline);
        let bundle_changed = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            () = sleep => false,
            ev = events.recv() => match ev {
                Ok(ChangeEvent::Bundle) | Err(RecvError::Lagged(_)) => true,
                Ok(_) => continue,
                Err(RecvError::Closed) => return,
            },
        };
        let mut renew = !bundle_changed;
        if bundle_changed {
            let active = state
                .authorities
                .snapshot()
                .active_x509()
                .map(|(id, _)| id.to_owned());
            renew = active.as_deref() != Some(resolver.current().issuer_id.as_str());
            match server_config(&state, Arc::clone(&resolver)) {
                Ok(config) => {
                    acceptor.send_replace(TlsAcceptor::from(config));
                    tracing::info!("node API trusts the new bundle's X.509 authorities");
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot rebuild the node API's client verifier")
                }
            }
        }
        if !renew {
            continue;
        }
        match issue_server_svid(&state, &provider) {
            Ok(svid) => {
                tracing::info!(not_after = %svid.not_after, issuer = %svid.issuer_id, "renewed the server SVID");
                wait = refresh_in(svid.issued_at, svid.not_after, state.now());
                resolver.replace(svid);
            }
            Err(e) => {
                tracing::error!(error = %e, retry_in_secs = RETRY_AFTER.as_secs(), "cannot renew the server SVID");
                wait = RETRY_AFTER;
            }
        }
        deadline = tokio::time::Instant::now() + wait;
    }
}

#[cfg(test)]
mod tests {
    use mayfly::x509::SvidInfo;

    use super::*;
    use crate::service::sign::tests::test_state;

    #[test]
    fn refresh_at_half_life_never_spinning() {
        let t0 = OffsetDateTime::now_utc();
        let hour = time::Duration::hours(1);
        assert_eq!(refresh_in(t0, t0 + hour, t0), Duration::from_secs(1800));
        assert_eq!(
            refresh_in(t0, t0 + hour, t0 + time::Duration::minutes(20)),
            Duration::from_secs(600)
        );
        assert_eq!(refresh_in(t0, t0 + hour, t0 + hour), MIN_REFRESH);
        assert_eq!(
            refresh_in(t0, t0 + time::Duration::seconds(2), t0),
            MIN_REFRESH
        );
    }

    #[test]
    fn server_svid_identity_and_lifetime() {
        let (state, _clock, _dir) = test_state();
        let svid = issue_server_svid(&state, &provider()).unwrap();
        let info = SvidInfo::from_der(svid.certified.cert[0].as_ref()).unwrap();
        assert_eq!(
            info.spiffe_id.to_string(),
            "spiffe://example.org/mayfly/server"
        );
        assert_eq!(svid.not_after, svid.issued_at + time::Duration::hours(1));
        assert_eq!(svid.certified.cert.len(), 1);
        let resolver = Arc::new(SvidResolver::new(svid));
        assert!(server_config(&state, resolver).is_ok());
    }
}
