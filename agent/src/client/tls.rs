//! TLS for the node API: the agent verifies the server the SPIFFE way and
//! presents its own X.509-SVID as the client certificate.
//!
//! Server verification ([`SpiffeServerVerifier`]): the server's chain must
//! verify, with `rustls-webpki`, to a CA certificate of the trust bundle for
//! TLS server use, and the leaf's single URI SAN must be exactly
//! `spiffe://<td>/mayfly/server`. DNS names and the host the agent dialled
//! play no part.
//!
//! Why this is sound: only the trust domain's CA can make a chain that
//! verifies to the bundle; the CA puts into an SVID only an identity chosen
//! by the server (from a registration entry, an attested node, or itself),
//! never one from the CSR; registration entries cannot claim the reserved
//! `/mayfly/...` path space, so `/mayfly/server` is issued to the server
//! alone; and the TLS handshake signature (checked below with the same
//! algorithms) proves the peer holds that certificate's private key. An agent
//! SVID also verifies to the bundle and carries serverAuth, but its URI SAN
//! is `/mayfly/agent/...` and is rejected by the exact comparison.

use std::sync::{Arc, RwLock};

use mayfly::x509::SvidInfo;
use mayfly::{SpiffeId, TrustDomain};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, SignatureScheme};

use crate::attest::AgentSvid;

/// The CA certificates the agent currently trusts for the server, shared by
/// every connection and replaced when the server sends a new bundle.
#[derive(Debug, Clone, Default)]
pub struct TrustAnchors(Arc<RwLock<Arc<Vec<CertificateDer<'static>>>>>);

impl TrustAnchors {
    /// Anchors from DER certificates.
    pub fn new(ders: Vec<Vec<u8>>) -> Self {
        let anchors = Self::default();
        anchors.replace(ders);
        anchors
    }

    /// Replaces the anchors (new connections use them; open ones keep theirs).
    pub fn replace(&self, ders: Vec<Vec<u8>>) {
        let certs = Arc::new(ders.into_iter().map(CertificateDer::from).collect());
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = certs;
    }

    /// The current anchors.
    pub fn current(&self) -> Arc<Vec<CertificateDer<'static>>> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Whether no anchor is known.
    pub fn is_empty(&self) -> bool {
        self.current().is_empty()
    }
}

/// The handshake-signature methods of a `ServerCertVerifier`, checked with
/// `self.provider`'s algorithms. Both verifiers below check signatures the
/// same way; only how they judge the certificate differs.
macro_rules! handshake_signatures_via_provider {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    };
}
pub(crate) use handshake_signatures_via_provider;

/// The crypto provider used for the node API (aws-lc-rs, the project's one
/// crypto backend), independent of any process-wide default.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Accepts a server whose chain verifies to the trust anchors and whose
/// leaf's single URI SAN is exactly the server's SPIFFE ID.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    anchors: TrustAnchors,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl SpiffeServerVerifier {
    /// A verifier for `spiffe://<trust_domain>/mayfly/server`.
    pub fn new(
        anchors: TrustAnchors,
        trust_domain: &TrustDomain,
        provider: Arc<CryptoProvider>,
    ) -> Self {
        Self {
            anchors,
            expected: mayfly::id::server_id(trust_domain),
            provider,
        }
    }
}

fn other(message: String) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
        std::io::Error::other(message),
    ))))
}

fn pki_error(e: webpki::Error) -> rustls::Error {
    use webpki::Error as E;
    let ce = match e {
        E::BadDer | E::BadDerTime | E::TrailingData(_) => CertificateError::BadEncoding,
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::UnsupportedSignatureAlgorithmContext(_)
        | E::UnsupportedSignatureAlgorithmForPublicKeyContext(_) => CertificateError::BadSignature,
        E::UnsupportedCriticalExtension => CertificateError::UnhandledCriticalExtension,
        other_error => return other(format!("server certificate: {other_error}")),
    };
    rustls::Error::InvalidCertificate(ce)
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let anchor_certs = self.anchors.current();
        let anchors: Vec<_> = anchor_certs
            .iter()
            .filter_map(|c| webpki::anchor_from_trusted_cert(c).ok())
            .collect();
        if anchors.is_empty() {
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer,
            ));
        }
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        cert.verify_for_usage(
            self.provider.signature_verification_algorithms.all,
            &anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(pki_error)?;
        let info = SvidInfo::from_der(end_entity)
            .map_err(|e| other(format!("server certificate is not an X509-SVID: {e}")))?;
        if info.spiffe_id != self.expected {
            tracing::warn!(
                presented = %info.spiffe_id,
                expected = %self.expected,
                "server presented an SVID for the wrong SPIFFE ID"
            );
            return Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures_via_provider!();
}

/// Accepts any server certificate. Used only by `insecure_bootstrap` for the
/// very first attestation, when the agent knows no CA yet; every use is
/// logged as a warning. Handshake signatures are still checked, so the peer
/// at least holds the key of the certificate it showed.
#[derive(Debug)]
pub struct InsecureBootstrapVerifier {
    provider: Arc<CryptoProvider>,
}

impl InsecureBootstrapVerifier {
    /// The insecure verifier.
    pub fn new(provider: Arc<CryptoProvider>) -> Self {
        Self { provider }
    }
}

impl ServerCertVerifier for InsecureBootstrapVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = SvidInfo::from_der(end_entity)
            .map(|i| i.spiffe_id.to_string())
            .unwrap_or_else(|_| "<not an SVID>".into());
        tracing::warn!(
            server_id = %presented,
            "insecure_bootstrap: trusting the server's certificate WITHOUT verification for the first attestation; \
             set agent.trust_bundle_path instead outside development"
        );
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures_via_provider!();
}

/// A rustls client configuration for the node API: TLS 1.3 or 1.2, ALPN
/// `h2`, the given server verifier, and the agent SVID as the client
/// certificate when one is given (every call but `Attest` needs it).
pub fn client_config(
    provider: Arc<CryptoProvider>,
    verifier: Arc<dyn ServerCertVerifier>,
    identity: Option<&AgentSvid>,
) -> Result<ClientConfig, rustls::Error> {
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some(svid) => {
            let chain = svid
                .chain_der
                .iter()
                .map(|der| CertificateDer::from(der.clone()))
                .collect();
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.key_pkcs8.to_vec()));
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mayfly::x509::{CaParams, SvidParams, VerifiedCsr, X509Authority, new_key_and_csr};
    use time::{Duration, OffsetDateTime};

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    fn ca(now: OffsetDateTime) -> X509Authority {
        X509Authority::generate(
            &CaParams {
                trust_domain: td(),
                ttl: Duration::hours(24),
                subject: "Test".into(),
            },
            now,
        )
        .unwrap()
    }

    fn leaf(ca: &X509Authority, id: &str, issued: OffsetDateTime) -> Vec<u8> {
        let k = new_key_and_csr().unwrap();
        ca.sign_svid(
            &VerifiedCsr::from_der(&k.csr_der).unwrap(),
            &SvidParams {
                spiffe_id: &SpiffeId::new(id).unwrap(),
                dns_names: &[],
                ttl: Duration::hours(1),
            },
            issued,
        )
        .unwrap()
        .der
    }

    fn verify(
        v: &SpiffeServerVerifier,
        der: Vec<u8>,
        now: OffsetDateTime,
    ) -> Result<(), rustls::Error> {
        let now = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            u64::try_from(now.unix_timestamp()).unwrap(),
        ));
        v.verify_server_cert(
            &CertificateDer::from(der),
            &[],
            &ServerName::try_from("127.0.0.1").unwrap(),
            &[],
            now,
        )
        .map(|_| ())
    }

    #[test]
    fn accepts_only_the_servers_spiffe_id_from_a_bundle_ca_while_valid() {
        let now = OffsetDateTime::now_utc();
        let ca = ca(now - Duration::hours(3));
        let verifier = SpiffeServerVerifier::new(
            TrustAnchors::new(vec![ca.cert_der().to_vec()]),
            &td(),
            provider(),
        );
        let server = "spiffe://example.org/mayfly/server";

        verify(&verifier, leaf(&ca, server, now), now).expect("the server's SVID is accepted");

        let err = verify(&verifier, leaf(&ca, "spiffe://example.org/web", now), now).unwrap_err();
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
        );
        let agent = leaf(&ca, "spiffe://example.org/mayfly/agent/join_token/x", now);
        assert!(verify(&verifier, agent, now).is_err());
        let foreign_td = leaf(&ca, "spiffe://other.org/mayfly/server", now);
        assert!(verify(&verifier, foreign_td, now).is_err());

        let other_ca = self::ca(now);
        let err = verify(&verifier, leaf(&other_ca, server, now), now).unwrap_err();
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer)
        );

        // Issued two hours ago for one hour: expired now.
        let expired = leaf(&ca, server, now - Duration::hours(2));
        let err = verify(&verifier, expired.clone(), now).unwrap_err();
        assert_eq!(
            err,
            rustls::Error::InvalidCertificate(CertificateError::Expired)
        );
        // ... and it was fine while it was valid: only time made the difference.
        verify(&verifier, expired, now - Duration::minutes(90)).unwrap();

        // A CA that is not an anchor cannot be smuggled in as an intermediate.
        let other_leaf = leaf(&other_ca, server, now);
        let nowu = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
            u64::try_from(now.unix_timestamp()).unwrap(),
        ));
        assert!(
            verifier
                .verify_server_cert(
                    &CertificateDer::from(other_leaf),
                    &[CertificateDer::from(other_ca.cert_der().to_vec())],
                    &ServerName::try_from("127.0.0.1").unwrap(),
                    &[],
                    nowu,
                )
                .is_err()
        );
    }

    #[test]
    fn anchors_are_replaceable_and_empty_anchors_trust_nothing() {
        let now = OffsetDateTime::now_utc();
        let old = ca(now);
        let new = ca(now);
        let anchors = TrustAnchors::default();
        let verifier = SpiffeServerVerifier::new(anchors.clone(), &td(), provider());
        let server = "spiffe://example.org/mayfly/server";
        assert!(verify(&verifier, leaf(&old, server, now), now).is_err());
        anchors.replace(vec![old.cert_der().to_vec()]);
        verify(&verifier, leaf(&old, server, now), now).unwrap();
        assert!(verify(&verifier, leaf(&new, server, now), now).is_err());
        anchors.replace(vec![old.cert_der().to_vec(), new.cert_der().to_vec()]);
        verify(&verifier, leaf(&new, server, now), now).unwrap();
    }

    #[test]
    fn client_config_offers_h2_and_the_agent_certificate() {
        let now = OffsetDateTime::now_utc();
        let ca = ca(now);
        let k = new_key_and_csr().unwrap();
        let der = ca
            .sign_svid(
                &VerifiedCsr::from_der(&k.csr_der).unwrap(),
                &SvidParams {
                    spiffe_id: &SpiffeId::new("spiffe://example.org/mayfly/agent/join_token/a")
                        .unwrap(),
                    dns_names: &[],
                    ttl: Duration::hours(1),
                },
                now,
            )
            .unwrap()
            .der;
        let svid = AgentSvid::new(vec![der], k.key_pkcs8).unwrap();
        let p = provider();
        let v: Arc<dyn ServerCertVerifier> = Arc::new(SpiffeServerVerifier::new(
            TrustAnchors::new(vec![ca.cert_der().to_vec()]),
            &td(),
            p.clone(),
        ));
        let with = client_config(p.clone(), v.clone(), Some(&svid)).unwrap();
        assert_eq!(with.alpn_protocols, vec![b"h2".to_vec()]);
        assert!(with.client_auth_cert_resolver.has_certs());
        let without = client_config(p, v, None).unwrap();
        assert!(!without.client_auth_cert_resolver.has_certs());
    }
}
