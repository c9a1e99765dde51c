//! A node API client, as an agent is one: gRPC over mutual TLS, attested
//! with a join token.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use hyper_util::rt::TokioIo;
use mayfly::proto::node::node_client::NodeClient;
use mayfly::proto::node::{AttestParams, AttestRequest, attest_request, attest_response};
use mayfly::x509::new_key_and_csr;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use zeroize::Zeroizing;

/// The agent identity the benchmark signs with: its SVID chain and key.
pub struct AgentIdentity {
    /// The agent's SPIFFE ID.
    pub spiffe_id: String,
    chain: Vec<Vec<u8>>,
    key_pkcs8: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for AgentIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentIdentity")
            .field("spiffe_id", &self.spiffe_id)
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Accepts the server's certificate without checking it. The benchmark
/// measures the server; the handshake happens once per connection, before
/// measuring, and the agent's real verification is covered by its tests.
#[derive(Debug)]
struct DangerousAnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for DangerousAnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A node API client on its own TCP + TLS connection to `addr`,
/// presenting `identity` as client certificate when given.
pub async fn connect(
    addr: SocketAddr,
    identity: Option<&AgentIdentity>,
) -> Result<NodeClient<Channel>> {
    connect_on(
        Endpoint::from_static("http://mayfly-server"),
        addr,
        identity,
    )
    .await
}

/// [`connect`] with the HTTP/2 keep-alive of the real agent's server
/// client (a PING every [`mayfly_agent::client::PING_INTERVAL`], also while
/// idle), for clients that stand in
/// for agents holding a `Sync` stream open.
pub async fn connect_as_agent(
    addr: SocketAddr,
    identity: &AgentIdentity,
) -> Result<NodeClient<Channel>> {
    let endpoint = Endpoint::from_static("http://mayfly-server")
        .http2_keep_alive_interval(mayfly_agent::client::PING_INTERVAL)
        .keep_alive_timeout(mayfly_agent::client::PING_TIMEOUT)
        .keep_alive_while_idle(true);
    connect_on(endpoint, addr, Some(identity)).await
}

async fn connect_on(
    endpoint: Endpoint,
    addr: SocketAddr,
    identity: Option<&AgentIdentity>,
) -> Result<NodeClient<Channel>> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(DangerousAnyServer(provider)));
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(
            id.chain.iter().cloned().map(CertificateDer::from).collect(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key_pkcs8.to_vec())),
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_uri| {
            let connector = connector.clone();
            async move {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                let name = ServerName::try_from("mayfly-server")
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        }))
        .await
        .with_context(|| format!("cannot connect to the node API at {addr}"))?;
    Ok(NodeClient::new(channel))
}

/// Attests with a join token over the node API; the agent identity.
pub async fn attest_join_token(addr: SocketAddr, token: &str) -> Result<AgentIdentity> {
    let mut client = connect(addr, None).await?;
    let key = new_key_and_csr()?;
    let (tx, rx) = mpsc::channel(1);
    tx.send(AttestRequest {
        step: Some(attest_request::Step::Params(AttestParams {
            attestor: "join_token".into(),
            payload: token.as_bytes().to_vec(),
            csr: key.csr_der.clone(),
        })),
    })
    .await
    .map_err(|_| anyhow!("the attestation stream closed"))?;
    let status = |s: tonic::Status| anyhow!("Attest: {:?} {}", s.code(), s.message());
    let mut responses = client
        .attest(ReceiverStream::new(rx))
        .await
        .map_err(status)?
        .into_inner();
    let msg = tokio::time::timeout(Duration::from_secs(30), responses.message())
        .await
        .context("Attest: no answer within 30 s")?
        .map_err(status)?
        .context("Attest: the stream ended without a result")?;
    drop(tx);
    match msg.step {
        Some(attest_response::Step::Result(r)) => {
            if r.svid_chain.is_empty() {
                bail!("Attest: no agent SVID in the result");
            }
            Ok(AgentIdentity {
                spiffe_id: r.spiffe_id,
                chain: r.svid_chain,
                key_pkcs8: key.key_pkcs8,
            })
        }
        other => bail!("Attest: expected a result, got {other:?}"),
    }
}
