//! A mutual-TLS server that checks its clients against the CRLs the
//! Workload API hands out, so that a client whose task has ended is refused
//! even though its certificate has not expired yet.
//!
//! Its own certificate, the trust bundle and the CRLs all come from one
//! `FetchX509SVID` stream (the generated gRPC client, because the `spiffe`
//! crate does not expose the `crl` field). On every message it builds a new
//! rustls `ServerConfig` (client verifier `WebPkiClientVerifier` with the
//! bundle as roots and the CRLs) and swaps it in; handshakes that start
//! afterwards use it. Each accepted connection gets one line, the same as
//! `mtls_server`'s, so `mtls_client` works against it:
//!
//! ```text
//! server=<own SPIFFE ID> client=<client SPIFFE ID> client_serial=<hex> client_ca=<hex>
//! ```
//!
//! Every update is logged on stderr (`crl_mtls_server: update …`), every
//! refused handshake too (`crl_mtls_server: <peer>: handshake failed: …`).
//!
//! `crl_mtls_server --listen 127.0.0.1:8443 --allow-id spiffe://example.org/client [--socket PATH] [--spiffe-id ID]`

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use clap::Parser;
use mayfly::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use mayfly::proto::workload::{X509svid, X509svidRequest, X509svidResponse};
use mayfly_examples::{ServerArgs, endpoint, summarize};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime,
};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig};
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use x509_parser::extensions::{GeneralName, ParsedExtension};

/// mTLS server that rejects revoked client certificates, with everything
/// taken from the Workload API.
#[derive(Debug, Parser)]
struct Args {
    #[command(flatten)]
    server: ServerArgs,
}

/// What one Workload API message turned into.
struct Current {
    acceptor: TlsAcceptor,
    own_id: String,
}

impl std::fmt::Debug for Current {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Current")
            .field("own_id", &self.own_id)
            .finish_non_exhaustive()
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse().server;
    let socket = socket_path(&endpoint(args.socket.as_deref())?)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let allow: Arc<[String]> = args.allow_id.clone().into();

    // The first configuration, then a task that replaces it on every update.
    let mut stream = connect(&socket).await?;
    let first = next_message(&mut stream)
        .await?
        .context("the Workload API closed the stream before sending an SVID")?;
    let current = build(&first, args.spiffe_id.as_deref(), &allow, &provider)?;
    let own_id = current.own_id.clone();
    let (tx, rx) = watch::channel(Arc::new(current));
    tokio::spawn(follow(
        socket,
        stream,
        tx,
        args.spiffe_id.clone(),
        allow.clone(),
        provider,
    ));

    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    eprintln!(
        "crl_mtls_server: {own_id} listening on {} (accepting {})",
        listener.local_addr()?,
        args.allow_id.join(", ")
    );

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = accepted?;
                // The configuration at the time of the connection, CRLs included.
                let current = Arc::clone(&rx.borrow());
                tokio::spawn(async move {
                    if let Err(e) = serve(&current, tcp).await {
                        eprintln!("crl_mtls_server: {peer}: {e:#}");
                    }
                });
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = terminate.recv() => break,
        }
    }
    Ok(())
}

type Stream = tonic::Streaming<X509svidResponse>;

/// The Unix socket path of a `unix:` endpoint.
fn socket_path(endpoint: &str) -> Result<PathBuf> {
    let path = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .with_context(|| format!("{endpoint:?} is not a unix: endpoint"))?;
    Ok(PathBuf::from(path))
}

/// Opens a `FetchX509SVID` stream on the agent's socket.
async fn connect(socket: &std::path::Path) -> Result<Stream> {
    let path = socket.to_owned();
    let channel = tonic::transport::Endpoint::try_from("http://localhost")?
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                let stream = UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await
        .with_context(|| format!("cannot connect to the Workload API at {}", socket.display()))?;
    let mut request = tonic::Request::new(X509svidRequest {});
    request.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    let stream = SpiffeWorkloadApiClient::new(channel)
        .fetch_x509svid(request)
        .await
        .map_err(|s| anyhow!("FetchX509SVID refused: {:?}: {}", s.code(), s.message()))?
        .into_inner();
    Ok(stream)
}

async fn next_message(stream: &mut Stream) -> Result<Option<X509svidResponse>> {
    stream
        .message()
        .await
        .map_err(|s| anyhow!("FetchX509SVID: {:?}: {}", s.code(), s.message()))
}

/// Follows the stream; reconnects (keeping the last configuration) when it
/// breaks.
async fn follow(
    socket: PathBuf,
    mut stream: Stream,
    tx: watch::Sender<Arc<Current>>,
    want: Option<String>,
    allow: Arc<[String]>,
    provider: Arc<CryptoProvider>,
) {
    loop {
        match next_message(&mut stream).await {
            Ok(Some(msg)) => match build(&msg, want.as_deref(), &allow, &provider) {
                Ok(current) => {
                    tx.send_replace(Arc::new(current));
                }
                Err(e) => eprintln!("crl_mtls_server: update ignored: {e:#}"),
            },
            Ok(None) | Err(_) => {
                eprintln!("crl_mtls_server: Workload API stream ended; reconnecting");
                loop {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    match connect(&socket).await {
                        Ok(s) => {
                            stream = s;
                            break;
                        }
                        Err(e) => eprintln!("crl_mtls_server: {e:#}"),
                    }
                }
            }
        }
    }
}

/// Splits concatenated DER certificates.
fn split_der(mut der: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let (rest, _) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| anyhow!("bad certificate in a chain: {e}"))?;
        let len = der.len() - rest.len();
        out.push(CertificateDer::from(der[..len].to_vec()));
        der = rest;
    }
    Ok(out)
}

/// A server configuration from one `X509SVIDResponse`: own chain and key,
/// the bundle as client roots, and the CRLs.
fn build(
    msg: &X509svidResponse,
    want: Option<&str>,
    allow: &Arc<[String]>,
    provider: &Arc<CryptoProvider>,
) -> Result<Current> {
    let svid: &X509svid = match want {
        Some(id) => msg
            .svids
            .iter()
            .find(|s| s.spiffe_id == id)
            .with_context(|| format!("the Workload API sent no SVID for {id}"))?,
        None => msg.svids.first().context("the Workload API sent no SVID")?,
    };
    let chain = split_der(&svid.x509_svid)?;
    let leaf = chain.first().context("empty SVID chain")?;
    let own = summarize(leaf.as_ref())?;
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.x509_svid_key.clone()));

    let mut roots = RootCertStore::empty();
    let cas = split_der(&svid.bundle)?;
    let (added, _) = roots.add_parsable_certificates(cas);
    if added == 0 {
        bail!("the bundle holds no usable CA certificate");
    }
    let mut revoked = 0;
    for crl in &msg.crl {
        let (_, parsed) = x509_parser::parse_x509_crl(crl)
            .map_err(|e| anyhow!("the Workload API sent a bad CRL: {e}"))?;
        revoked += parsed.iter_revoked_certificates().count();
    }
    let crls: Vec<CertificateRevocationListDer<'static>> = msg
        .crl
        .iter()
        .map(|c| CertificateRevocationListDer::from(c.clone()))
        .collect();
    if crls.is_empty() {
        eprintln!(
            "crl_mtls_server: warning: no CRLs from the Workload API; revocation not checked"
        );
    }
    // Every authority has its CRL, so an unknown revocation status (a
    // certificate from a CA without one) is an error: fail closed.
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .with_crls(crls)
        .only_check_end_entity_revocation()
        .build()
        .context("cannot build the client verifier")?;
    let verifier = Arc::new(AllowIds {
        inner: verifier,
        allow: allow.clone(),
    });
    let mut config = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .context("the SVID's key does not fit its certificate")?;
    // No resumption: every connection presents its certificate and is
    // checked against the CRLs of the moment.
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    eprintln!(
        "crl_mtls_server: update: own serial {} from CA {}; {added} CA(s) in the bundle; {} CRL(s) listing {revoked} revoked certificate(s)",
        own.serial,
        own.ca,
        msg.crl.len()
    );
    Ok(Current {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        own_id: own.spiffe_id,
    })
}

/// The WebPKI verifier (chain to the bundle, not revoked), then the client's
/// SPIFFE ID against `--allow-id`.
#[derive(Debug)]
struct AllowIds {
    inner: Arc<dyn ClientCertVerifier>,
    allow: Arc<[String]>,
}

impl ClientCertVerifier for AllowIds {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = spiffe_id(end_entity.as_ref());
        match id {
            Some(id) if self.allow.contains(&id) => Ok(verified),
            other => Err(rustls::Error::General(format!(
                "client SPIFFE ID {} is not allowed",
                other.as_deref().unwrap_or("<none>")
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The single URI SAN of a certificate.
fn spiffe_id(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    cert.extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                san.general_names.iter().find_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
            }
            _ => None,
        })
}

/// One connection: handshake (chain, revocation and SPIFFE ID checked by
/// the verifier), then the answer line.
async fn serve(current: &Current, tcp: TcpStream) -> Result<()> {
    let mut tls = tokio::time::timeout(Duration::from_secs(10), current.acceptor.accept(tcp))
        .await
        .context("handshake timed out")?
        .context("handshake failed")?;
    let client_cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .context("the client presented no certificate")?;
    let client = summarize(client_cert.as_ref())?;
    let line = format!(
        "server={} client={} client_serial={} client_ca={}\n",
        current.own_id, client.spiffe_id, client.serial, client.ca
    );
    tls.write_all(line.as_bytes()).await?;
    tls.shutdown().await?;
    Ok(())
}
