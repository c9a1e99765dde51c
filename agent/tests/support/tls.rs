//! The stand-in node API over real TCP and TLS.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use mayfly::SpiffeId;
use mayfly::proto::node::node_server::NodeServer;
use mayfly::x509::{SvidParams, VerifiedCsr, X509Authority, new_key_and_csr};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;

use super::{MockNode, MockState, PeerCert};

/// A server-side TLS connection that tells handlers the client certificate.
struct TlsConn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>);

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = PeerCert;
    fn connect_info(&self) -> PeerCert {
        PeerCert(
            self.0
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .map(|c| c.to_vec()),
        )
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// Starts the stand-in server presenting an SVID for `server_id` signed by
/// `ca`; agents' certificates are verified against the mock's CA and are
/// optional at the TLS layer (as for `Attest`).
pub async fn start_tls_server(
    state: Arc<MockState>,
    ca: &X509Authority,
    server_id: &str,
) -> SocketAddr {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let k = new_key_and_csr().unwrap();
    let der = ca
        .sign_svid(
            &VerifiedCsr::from_der(&k.csr_der).unwrap(),
            &SvidParams {
                spiffe_id: &SpiffeId::new(server_id).unwrap(),
                dns_names: &[],
                ttl: Duration::hours(1),
            },
            OffsetDateTime::now_utc(),
        )
        .unwrap()
        .der;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from(state.ca.cert_der().to_vec()))
        .unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from(der)],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(k.key_pkcs8.to_vec())),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel::<TlsConn>();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    let _ = tx.send(TlsConn(tls));
                }
            });
        }
    });
    let incoming = futures::StreamExt::map(
        tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
        Ok::<_, std::io::Error>,
    );
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(NodeServer::new(MockNode(state)))
            .serve_with_incoming(incoming),
    );
    addr
}
