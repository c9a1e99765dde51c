//! The kubelet's pod list: fetched over the kubelet's secure port and shared.
//!
//! [`KubeletClient`] sends `GET <kubelet_url>/pods` with `Authorization: Bearer <token>`, the
//! token read from `token_path` at every request (projected service account tokens rotate).
//! The kubelet's certificate is verified against `kubelet_ca_path` (host name included, except
//! on a loopback address, where only the chain is checked: a kubelet serving certificate
//! names the node, not `127.0.0.1`), or not at all with
//! `insecure_skip_kubelet_verification`, which is logged as a warning at start.
//!
//! [`PodLists`] shares lists between concurrent attestations and the pod watcher: a caller asks
//! for a list fetched no earlier than some instant, gets the last one when it is recent
//! enough, and otherwise waits for one fetch made on behalf of every caller waiting
//! (single-flight). Failures are shared the same way, so that an unreachable kubelet is not
//! hammered by every waiting caller in turn.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{WebPkiServerVerifier, verify_server_cert_signed_by_trust_anchor};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::time::Instant;
use zeroize::Zeroizing;

use super::pod::PodIndex;
use crate::config::K8sConfig;

/// The largest pod list read (a kubelet runs at most a few hundred pods; their list is a few
/// MiB).
const MAX_BODY: usize = 64 * 1024 * 1024;
/// Bound on connecting (TCP and TLS).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on one whole request, body included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the pod list could not be had. Cloned to every caller that shared the attempt.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum KubeletError {
    /// `kubelet_ca_path` could not be read or holds no certificate.
    #[error("agent.k8s.kubelet_ca_path {path}: {reason}")]
    Ca {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The token file could not be read or is empty.
    #[error("agent.k8s.token_path {path}: {reason}")]
    Token {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// No connection (TCP or TLS, certificate verification included).
    #[error("cannot connect to the kubelet at {url}: {reason}")]
    Connect {
        /// The kubelet URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The request failed or timed out after connecting.
    #[error("request to the kubelet at {url} failed: {reason}")]
    Request {
        /// The kubelet URL.
        url: String,
        /// What failed.
        reason: String,
    },
    /// The kubelet answered with an error status (401: the token was refused; 403: the
    /// token's account may not read `nodes/proxy`).
    #[error("the kubelet at {url} answered {status} to GET /pods{hint}: {body}")]
    Status {
        /// The kubelet URL.
        url: String,
        /// The HTTP status.
        status: u16,
        /// What to check, for 401 and 403.
        hint: &'static str,
        /// The start of the answer.
        body: String,
    },
    /// The answer is not a pod list.
    #[error("the kubelet at {url} sent an unreadable pod list: {reason}")]
    Parse {
        /// The kubelet URL.
        url: String,
        /// What was wrong.
        reason: String,
    },
}

/// Where pod lists come from: the kubelet ([`KubeletClient`]), or a fake in tests.
#[tonic::async_trait]
pub trait PodSource: Send + Sync + std::fmt::Debug {
    /// The pods bound to this node, now.
    async fn fetch(&self) -> Result<PodIndex, KubeletError>;
}

/// An HTTPS client of the kubelet's `/pods`.
#[derive(Clone)]
pub struct KubeletClient {
    url: String,
    /// `host:port` to dial.
    address: String,
    server_name: ServerName<'static>,
    token_path: PathBuf,
    tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for KubeletClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeletClient")
            .field("url", &self.url)
            .field("token_path", &self.token_path)
            .finish_non_exhaustive()
    }
}

impl KubeletClient {
    /// A client for `config`. Reads the CA file now (unless verification is skipped), so that
    /// a wrong path stops the agent at start rather than failing every attestation.
    pub fn new(config: &K8sConfig) -> Result<Self, KubeletError> {
        let url = config
            .kubelet_url
            .to_string()
            .trim_end_matches('/')
            .to_owned();
        let host = config
            .kubelet_url
            .host()
            .unwrap_or_default()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = config.kubelet_url.port_u16().unwrap_or(10250);
        let address = match host.parse::<IpAddr>() {
            Ok(IpAddr::V6(ip)) => format!("[{ip}]:{port}"),
            _ => format!("{host}:{port}"),
        };
        let server_name =
            ServerName::try_from(host.clone()).map_err(|e| KubeletError::Connect {
                url: url.clone(),
                reason: format!("{host:?} is not a valid server name: {e}"),
            })?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier: Arc<dyn ServerCertVerifier> = if config.insecure_skip_kubelet_verification {
            tracing::warn!(
                kubelet_url = %url,
                "agent.k8s.insecure_skip_kubelet_verification is set: the kubelet's certificate \
                 is not verified, so anything that can take its address can answer for it"
            );
            Arc::new(KubeletVerifier::new(Check::Nothing, provider.clone()))
        } else {
            let roots = read_roots(&config.kubelet_ca_path)?;
            let loopback =
                host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
            let check = if loopback {
                Check::ChainOnly(Arc::new(roots))
            } else {
                let inner =
                    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                        .build()
                        .map_err(|e| KubeletError::Ca {
                            path: config.kubelet_ca_path.clone(),
                            reason: e.to_string(),
                        })?;
                Check::ChainAndName(inner)
            };
            Arc::new(KubeletVerifier::new(check, provider.clone()))
        };
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| KubeletError::Connect {
                url: url.clone(),
                reason: e.to_string(),
            })?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            url,
            address,
            server_name,
            token_path: config.token_path.clone(),
            tls: Arc::new(tls),
        })
    }

    /// `GET /pods`, returning the raw body.
    async fn get_pods(&self) -> Result<Bytes, KubeletError> {
        let token = read_token(&self.token_path)?;
        let connect_err = |reason: String| KubeletError::Connect {
            url: self.url.clone(),
            reason,
        };
        let request_err = |reason: String| KubeletError::Request {
            url: self.url.clone(),
            reason,
        };
        let connect = async {
            let tcp = tokio::net::TcpStream::connect(&self.address)
                .await
                .map_err(|e| connect_err(e.to_string()))?;
            // Best effort: a request is one small write.
            let _ = tcp.set_nodelay(true);
            tokio_rustls::TlsConnector::from(Arc::clone(&self.tls))
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| connect_err(e.to_string()))
        };
        let tls = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| connect_err(format!("no connection within {CONNECT_TIMEOUT:?}")))??;
        let exchange = async {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(|e| request_err(e.to_string()))?;
            let conn = tokio::spawn(conn);
            let mut auth = http::HeaderValue::try_from(format!("Bearer {}", token.as_str()))
                .map_err(|_| KubeletError::Token {
                    path: self.token_path.clone(),
                    reason: "the token has characters not allowed in an HTTP header".into(),
                })?;
            auth.set_sensitive(true);
            let request = http::Request::get("/pods")
                .header(http::header::HOST, self.address.as_str())
                .header(http::header::ACCEPT, "application/json")
                .header(http::header::AUTHORIZATION, auth)
                .body(Empty::<Bytes>::new())
                .map_err(|e| request_err(e.to_string()))?;
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| request_err(e.to_string()))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| request_err(format!("reading the answer: {e}")))?
                .to_bytes();
            conn.abort();
            if !status.is_success() {
                let hint = match status.as_u16() {
                    401 => {
                        " (the token was refused: check agent.k8s.token_path, and that the kubelet runs with --authentication-token-webhook)"
                    }
                    403 => " (the token's service account needs `get` on `nodes/proxy`)",
                    _ => "",
                };
                return Err(KubeletError::Status {
                    url: self.url.clone(),
                    status: status.as_u16(),
                    hint,
                    body: String::from_utf8_lossy(&body[..body.len().min(200)])
                        .trim()
                        .to_owned(),
                });
            }
            Ok(body)
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| request_err(format!("no answer within {REQUEST_TIMEOUT:?}")))?
    }
}

#[tonic::async_trait]
impl PodSource for KubeletClient {
    async fn fetch(&self) -> Result<PodIndex, KubeletError> {
        let body = self.get_pods().await?;
        // A full pod list is megabytes of JSON: parse it off the async workers.
        tokio::task::spawn_blocking(move || PodIndex::from_json(&body))
            .await
            .map_err(|e| KubeletError::Parse {
                url: self.url.clone(),
                reason: e.to_string(),
            })?
            .map_err(|e| KubeletError::Parse {
                url: self.url.clone(),
                reason: e.to_string(),
            })
    }
}

/// Reads the bearer token (kept out of logs and zeroized).
fn read_token(path: &Path) -> Result<Zeroizing<String>, KubeletError> {
    let err = |reason: String| KubeletError::Token {
        path: path.to_owned(),
        reason,
    };
    let raw = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?);
    let token = Zeroizing::new(raw.trim().to_owned());
    if token.is_empty() {
        return Err(err("the file is empty".into()));
    }
    Ok(token)
}

fn read_roots(path: &Path) -> Result<RootCertStore, KubeletError> {
    let err = |reason: String| KubeletError::Ca {
        path: path.to_owned(),
        reason,
    };
    let ders = crate::storage::read_pem_certificates(path).map_err(|e| err(e.to_string()))?;
    let mut roots = RootCertStore::empty();
    let (added, _ignored) =
        roots.add_parsable_certificates(ders.into_iter().map(CertificateDer::from));
    if added == 0 {
        return Err(err("no usable CA certificate in the file".into()));
    }
    Ok(roots)
}

/// How much of the kubelet's certificate is checked.
#[derive(Debug)]
enum Check {
    /// Chain to the CA and the host name (the usual case).
    ChainAndName(Arc<WebPkiServerVerifier>),
    /// Chain to the CA only: the kubelet is dialled on a loopback address, which its
    /// certificate does not name, and only a local process can listen there.
    ChainOnly(Arc<RootCertStore>),
    /// Nothing (`insecure_skip_kubelet_verification`).
    Nothing,
}

/// Verifies the kubelet's certificate per [`Check`]; handshake signatures are always checked.
#[derive(Debug)]
struct KubeletVerifier {
    check: Check,
    provider: Arc<CryptoProvider>,
}

impl KubeletVerifier {
    fn new(check: Check, provider: Arc<CryptoProvider>) -> Self {
        Self { check, provider }
    }
}

impl ServerCertVerifier for KubeletVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.check {
            Check::ChainAndName(inner) => {
                inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            }
            Check::ChainOnly(roots) => {
                let cert = ParsedCertificate::try_from(end_entity)?;
                verify_server_cert_signed_by_trust_anchor(
                    &cert,
                    roots,
                    intermediates,
                    now,
                    self.provider.signature_verification_algorithms.all,
                )?;
                Ok(ServerCertVerified::assertion())
            }
            Check::Nothing => Ok(ServerCertVerified::assertion()),
        }
    }

    crate::client::tls::handshake_signatures_via_provider!();
}

/// One attempt at the pod list.
#[derive(Debug)]
pub struct PodListing {
    /// When the request was sent: the list shows the pods as of about then.
    pub fetched_at: Instant,
    /// The pods, or why there are none.
    pub result: Result<PodIndex, KubeletError>,
}

/// The last pod list, shared (see the module documentation).
#[derive(Debug)]
pub struct PodLists {
    source: Arc<dyn PodSource>,
    last: tokio::sync::Mutex<Option<Arc<PodListing>>>,
}

impl PodLists {
    /// Lists from `source`.
    pub fn new(source: Arc<dyn PodSource>) -> Self {
        Self {
            source,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// A list fetched at `since` or later: the last one if it is, else a new one. Callers
    /// waiting at the same time share one fetch.
    pub async fn since(&self, since: Instant) -> Arc<PodListing> {
        // Holding the lock across the fetch is the single flight: the next caller waits for
        // this fetch and then finds it recent enough.
        let mut last = self.last.lock().await;
        if let Some(l) = last.as_ref()
            && l.fetched_at >= since
        {
            return Arc::clone(l);
        }
        let fetched_at = Instant::now();
        let result = self.source.fetch().await;
        if let Err(e) = &result {
            tracing::debug!(error = %e, "kubelet pod list failed");
        }
        let listing = Arc::new(PodListing { fetched_at, result });
        *last = Some(Arc::clone(&listing));
        listing
    }

    /// A list at most `max_age` old.
    pub async fn recent(&self, max_age: Duration) -> Arc<PodListing> {
        let now = Instant::now();
        self.since(now.checked_sub(max_age).unwrap_or(now)).await
    }
}
