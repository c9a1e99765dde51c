//! The agent's client of the server's node API: a typed wrapper over the
//! generated `NodeClient`, over mutual TLS (see [`tls`]).
//!
//! The client holds the agent's current SVID. Every call but `Attest` goes
//! over a connection that presents it; when the SVID changes (renewal,
//! re-attestation) a new connection is made, because the server accepts an
//! SVID's serial only while it is the node's current or next one.

pub mod tls;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use mayfly::bundle::TrustBundle;
use mayfly::entry::EntryId;
use mayfly::proto::node as pb;
use mayfly::proto::node::node_client::NodeClient;
use mayfly::{SpiffeId, TrustDomain};
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::ServerName;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use crate::attest::{AgentSvid, AttestError, NodeAttestor};
use crate::config::AgentConfig;
use tls::{InsecureBootstrapVerifier, SpiffeServerVerifier, TrustAnchors};

/// How often the agent pings the server over its idle connection (HTTP/2
/// PING), so that a silently dead server or path (no FIN, no RST) is
/// noticed within [`PING_INTERVAL`] + [`PING_TIMEOUT`] and the `Sync`
/// stream reconnects; a server that stops or restarts closes the
/// connection, which the agent sees at once. Every agent's pings cost the
/// server a little: at 10,000 agents, 60 s means 167 pings a second, about
/// 1% of a core (`docs/performance.md`, scenario 4).
pub const PING_INTERVAL: Duration = Duration::from_secs(60);

/// How long the agent waits for a ping's answer before it drops the
/// connection.
pub const PING_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an `Attest` exchange may take.
const ATTEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a unary call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// gRPC metadata key the server sets (to `required`) on a
/// `FailedPrecondition` that asks the agent to attest again (step-up). The
/// server's definition is `mayfly_server::node::status::REATTEST_METADATA`.
pub const REATTEST_METADATA: &str = "mayfly-reattest";

/// Why a node API call failed. The first three variants are the server
/// refusing this agent itself; they need an operator (see their messages).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The server has no record of this agent (evicted, or its data was lost).
    #[error("the server says this agent is not attested: {0}")]
    NotAttested(String),
    /// The agent SVID was replaced by a newer one (another agent renewed it).
    #[error("the server says this agent's SVID has been superseded: {0}")]
    Superseded(String),
    /// The agent is banned.
    #[error("the server says this agent is banned: {0}")]
    Banned(String),
    /// The server could not be reached, or the connection broke.
    #[error("{call}: the server is unreachable: {message}")]
    Unavailable {
        /// The call.
        call: &'static str,
        /// What failed (including TLS verification failures).
        message: String,
    },
    /// The server asks for a fresh node attestation before it issues this
    /// credential (an entry with `max_attestation_age`).
    #[error("{call}: the server asks this agent to attest again: {message}")]
    ReattestRequired {
        /// The call.
        call: &'static str,
        /// The server's message (names the entry and the age).
        message: String,
    },
    /// Attesting again (step-up or renewal by re-attestation) failed.
    #[error("attesting again failed: {0}")]
    Reattest(String),
    /// The server refused the call for another reason.
    #[error("{call}: the server refused: {code:?}: {message}")]
    Refused {
        /// The call.
        call: &'static str,
        /// gRPC code.
        code: Code,
        /// The server's message.
        message: String,
    },
    /// The server answered something malformed.
    #[error("{call}: malformed answer from the server: {message}")]
    BadResponse {
        /// The call.
        call: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A call needing the agent SVID was made before attestation.
    #[error("the agent has no SVID yet; it must attest first")]
    NoIdentity,
    /// The TLS configuration could not be built.
    #[error("TLS configuration: {0}")]
    Tls(String),
    /// The attestor could not produce evidence.
    #[error(transparent)]
    Attest(#[from] AttestError),
    /// A key or CSR could not be generated.
    #[error("cannot generate a key: {0}")]
    Key(String),
}

impl ClientError {
    /// Classifies a status from `call`. The server's messages are fixed by
    /// the node API contract (`docs/architecture.md`).
    pub fn from_status(call: &'static str, status: &tonic::Status) -> Self {
        let message = status_message(status);
        match status.code() {
            Code::Unauthenticated if status.message().contains("superseded") => {
                Self::Superseded(message)
            }
            Code::Unauthenticated => Self::NotAttested(message),
            Code::PermissionDenied if status.message().contains("banned") => Self::Banned(message),
            Code::FailedPrecondition
                if status
                    .metadata()
                    .get(REATTEST_METADATA)
                    .is_some_and(|v| v == "required") =>
            {
                Self::ReattestRequired { call, message }
            }
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
                Self::Unavailable { call, message }
            }
            code => Self::Refused {
                call,
                code,
                message,
            },
        }
    }

    /// Whether the server refused the agent itself (not attested, superseded
    /// or banned): retrying with the same SVID cannot help.
    pub fn is_agent_rejected(&self) -> bool {
        matches!(
            self,
            Self::NotAttested(_) | Self::Superseded(_) | Self::Banned(_)
        )
    }

    /// Whether the failure is the server being unreachable.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable { .. })
    }
}

/// The status message with its source chain (transport and TLS errors hide
/// their cause there).
fn status_message(status: &tonic::Status) -> String {
    let mut message = status.message().to_owned();
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        let s = e.to_string();
        if !message.contains(&s) {
            message.push_str(": ");
            message.push_str(&s);
        }
        source = e.source();
    }
    message
}

/// Proves the node again and switches the client to the new agent SVID
/// (storing it first). Installed with [`ServerClient::set_reattester`] when
/// the agent's attestor can attest again.
#[tonic::async_trait]
pub trait Reattest: Send + Sync + std::fmt::Debug {
    /// Attests again; on success the client presents the new SVID.
    async fn reattest(&self, client: &ServerClient) -> Result<(), ClientError>;
}

/// How the client reaches the server: makes channels. The TLS transport is
/// the real one; tests use in-memory ones.
pub trait Transport: Send + Sync + std::fmt::Debug {
    /// A lazily connecting channel. `identity` is the client certificate to
    /// present (none for `Attest`); `bootstrap` is true for `Attest`, the
    /// only call that may trust the server through `insecure_bootstrap`.
    fn channel(
        &self,
        identity: Option<&AgentSvid>,
        bootstrap: bool,
    ) -> Result<Channel, ClientError>;
}

/// The node API over TCP and mutual TLS.
#[derive(Debug)]
pub struct TlsTransport {
    server_uri: String,
    server_address: String,
    trust_domain: TrustDomain,
    anchors: TrustAnchors,
    insecure_bootstrap: bool,
    provider: Arc<CryptoProvider>,
}

impl TlsTransport {
    /// A transport to `config.server_address` that trusts `anchors`.
    pub fn new(config: &AgentConfig, anchors: TrustAnchors) -> Self {
        Self {
            server_uri: config.server_uri(),
            server_address: config.server_address.clone(),
            trust_domain: config.trust_domain.clone(),
            anchors,
            insecure_bootstrap: config.insecure_bootstrap,
            provider: tls::provider(),
        }
    }
}

impl Transport for TlsTransport {
    fn channel(
        &self,
        identity: Option<&AgentSvid>,
        bootstrap: bool,
    ) -> Result<Channel, ClientError> {
        // insecure_bootstrap applies only while no CA is known: once the
        // agent holds a bundle (stored, or returned by its first
        // attestation) the server is always verified.
        let verifier: Arc<dyn ServerCertVerifier> =
            if bootstrap && self.insecure_bootstrap && self.anchors.is_empty() {
                tracing::warn!(
                    "insecure_bootstrap is set and no trust bundle is known: the first attestation \
                     will trust the server without verifying it"
                );
                Arc::new(InsecureBootstrapVerifier::new(self.provider.clone()))
            } else {
                Arc::new(SpiffeServerVerifier::new(
                    self.anchors.clone(),
                    &self.trust_domain,
                    self.provider.clone(),
                ))
            };
        let config = tls::client_config(self.provider.clone(), verifier, identity)
            .map_err(|e| ClientError::Tls(e.to_string()))?;
        let endpoint = Endpoint::from_shared(self.server_uri.clone())
            .map_err(|e| ClientError::Tls(format!("server address: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(PING_INTERVAL)
            .keep_alive_timeout(PING_TIMEOUT)
            .keep_alive_while_idle(true);
        Ok(endpoint.connect_with_connector_lazy(TlsConnector {
            address: self.server_address.clone(),
            config: Arc::new(config),
        }))
    }
}

/// Dials TCP and runs the TLS handshake; the server name is only used for
/// SNI (verification is by SPIFFE ID).
#[derive(Debug, Clone)]
struct TlsConnector {
    address: String,
    config: Arc<rustls::ClientConfig>,
}

impl tower::Service<http::Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let address = self.address.clone();
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        Box::pin(async move {
            let host = address
                .rsplit_once(':')
                .map_or(address.as_str(), |(h, _)| h)
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let name = ServerName::try_from(host)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let tcp = tokio::net::TcpStream::connect(&address).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(name, tcp).await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// What a successful attestation returns.
#[derive(Debug)]
pub struct Attested {
    /// The agent SVID and its key.
    pub svid: AgentSvid,
    /// The trust bundle.
    pub bundle: TrustBundle,
    /// Selectors the server derived for this node, `type:value`.
    pub node_selectors: Vec<String>,
    /// Whether the attestor can prove itself again without an operator.
    pub can_reattest: bool,
}

#[derive(Debug)]
struct Inner {
    trust_domain: TrustDomain,
    transport: Arc<dyn Transport>,
    identity: watch::Sender<Option<Arc<AgentSvid>>>,
    channel: Mutex<Option<Channel>>,
    reachable: AtomicBool,
    /// When a call last succeeded (the server answered).
    last_contact: Mutex<Option<time::OffsetDateTime>>,
    /// Why the server last refused the agent itself, until a call succeeds.
    rejected: Mutex<Option<String>>,
    /// How to attest again, when the attestor can.
    reattester: Mutex<Option<Arc<dyn Reattest>>>,
    /// Held while re-attesting: concurrent callers wait for one attestation.
    reattesting: tokio::sync::Mutex<()>,
}

/// The node API client. Cheap to clone; clones share the identity and the
/// connection.
#[derive(Debug, Clone)]
pub struct ServerClient {
    inner: Arc<Inner>,
}

impl ServerClient {
    /// A client for the agent's trust domain over `transport`.
    pub fn new(trust_domain: TrustDomain, transport: Arc<dyn Transport>) -> Self {
        let (identity, _) = watch::channel(None);
        Self {
            inner: Arc::new(Inner {
                trust_domain,
                transport,
                identity,
                channel: Mutex::new(None),
                reachable: AtomicBool::new(false),
                last_contact: Mutex::new(None),
                rejected: Mutex::new(None),
                reattester: Mutex::new(None),
                reattesting: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.inner.trust_domain
    }

    /// The agent SVID currently presented, if attested.
    pub fn identity(&self) -> Option<Arc<AgentSvid>> {
        self.inner.identity.borrow().clone()
    }

    /// Follows identity changes.
    pub fn subscribe_identity(&self) -> watch::Receiver<Option<Arc<AgentSvid>>> {
        self.inner.identity.subscribe()
    }

    /// Switches to a new agent SVID: later calls use a new connection that
    /// presents it. Open streams keep their connection until they end.
    pub fn set_identity(&self, svid: AgentSvid) {
        *self.lock_channel() = None;
        self.set_rejected(None);
        self.inner.identity.send_replace(Some(Arc::new(svid)));
    }

    /// Lets the client attest again by itself (step-up, renewal by
    /// re-attestation). Only for attestors that can prove the node again.
    pub fn set_reattester(&self, reattester: Arc<dyn Reattest>) {
        *self
            .inner
            .reattester
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(reattester);
    }

    /// Whether this client can attest again by itself.
    pub fn can_reattest(&self) -> bool {
        self.reattester().is_some()
    }

    fn reattester(&self) -> Option<Arc<dyn Reattest>> {
        self.inner
            .reattester
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Attests again, once for every caller that saw the SVID with serial
    /// `stale_serial` refused: callers that arrive while an attestation
    /// runs wait for it, and find the identity already replaced.
    pub async fn reattest_after(&self, stale_serial: Option<&str>) -> Result<(), ClientError> {
        let reattester = self.reattester().ok_or_else(|| {
            ClientError::Reattest("this agent's attestor cannot attest again".into())
        })?;
        let _one_at_a_time = self.inner.reattesting.lock().await;
        let current = self.identity().map(|s| s.serial_hex.clone());
        if current.is_some() && current.as_deref() != stale_serial {
            return Ok(());
        }
        reattester.reattest(self).await
    }

    /// Runs `call`; when the server answers that the node must attest again
    /// and this client can, attests again (single-flight) and retries once.
    async fn with_step_up<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let serial = self.identity().map(|s| s.serial_hex.clone());
        match call().await {
            Err(ClientError::ReattestRequired {
                call: name,
                message,
            }) if self.can_reattest() => {
                tracing::info!(call = name, server_message = %message, "the server asks for a fresh node attestation; attesting again");
                self.reattest_after(serial.as_deref()).await?;
                call().await
            }
            other => other,
        }
    }

    /// Why the server refused this agent itself (not attested, superseded,
    /// banned) on the last call, if it did; cleared by a successful call.
    pub fn rejected(&self) -> Option<String> {
        self.inner
            .rejected
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn set_rejected(&self, why: Option<String>) {
        *self
            .inner
            .rejected
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = why;
    }

    /// Whether the last exchange with the server reached it.
    pub fn is_reachable(&self) -> bool {
        self.inner.reachable.load(Ordering::Relaxed)
    }

    /// When a call to the server last succeeded (system time), if ever.
    pub fn last_contact(&self) -> Option<time::OffsetDateTime> {
        *self
            .inner
            .last_contact
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn lock_channel(&self) -> std::sync::MutexGuard<'_, Option<Channel>> {
        self.inner
            .channel
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn node(&self) -> Result<NodeClient<Channel>, ClientError> {
        let identity = self.identity().ok_or(ClientError::NoIdentity)?;
        let mut slot = self.lock_channel();
        let channel = match slot.as_ref() {
            Some(c) => c.clone(),
            None => {
                let c = self.inner.transport.channel(Some(&identity), false)?;
                *slot = Some(c.clone());
                c
            }
        };
        Ok(NodeClient::new(channel))
    }

    /// Records reachability from a call's outcome and classifies errors.
    fn observe<T>(
        &self,
        call: &'static str,
        r: Result<T, tonic::Status>,
    ) -> Result<T, ClientError> {
        match r {
            Ok(v) => {
                self.inner.reachable.store(true, Ordering::Relaxed);
                *self
                    .inner
                    .last_contact
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) =
                    Some(time::OffsetDateTime::now_utc());
                if call != "Attest" {
                    self.set_rejected(None);
                }
                Ok(v)
            }
            Err(status) => {
                let e = ClientError::from_status(call, &status);
                self.inner
                    .reachable
                    .store(!e.is_unavailable(), Ordering::Relaxed);
                if e.is_agent_rejected() && call != "Attest" {
                    self.set_rejected(Some(e.to_string()));
                }
                Err(e)
            }
        }
    }

    /// Notes that a stream broke (the server is then presumed unreachable
    /// until the next exchange succeeds).
    pub fn mark_unreachable(&self) {
        self.inner.reachable.store(false, Ordering::Relaxed);
    }

    /// Node attestation: a new key, a CSR for it, the attestor's evidence
    /// and any challenges, over a connection without a client certificate.
    /// Does not switch the client's identity: the caller stores the result
    /// first and then calls [`ServerClient::set_identity`].
    pub async fn attest(&self, attestor: &dyn NodeAttestor) -> Result<Attested, ClientError> {
        const CALL: &str = "Attest";
        let key = mayfly::x509::new_key_and_csr().map_err(|e| ClientError::Key(e.to_string()))?;
        let evidence = attestor.evidence().await?;
        let channel = self.inner.transport.channel(None, true)?;
        let mut node = NodeClient::new(channel);
        let (tx, rx) = mpsc::channel::<pb::AttestRequest>(4);
        let first = pb::AttestRequest {
            step: Some(pb::attest_request::Step::Params(pb::AttestParams {
                attestor: attestor.name().to_owned(),
                payload: evidence.to_vec(),
                csr: key.csr_der.clone(),
            })),
        };
        // The channel has room for the first message; a closed receiver
        // shows up as the call's error below.
        let _ = tx.send(first).await;
        let exchange = async {
            let mut responses = self
                .observe(CALL, node.attest(ReceiverStream::new(rx)).await)?
                .into_inner();
            loop {
                let msg = self
                    .observe(CALL, responses.message().await)?
                    .ok_or_else(|| ClientError::BadResponse {
                        call: CALL,
                        message: "the stream ended without a result".into(),
                    })?;
                match msg.step {
                    Some(pb::attest_response::Step::Challenge(challenge)) => {
                        let answer = attestor.answer_challenge(&challenge, &key.csr_der).await?;
                        tx.send(pb::AttestRequest {
                            step: Some(pb::attest_request::Step::ChallengeResponse(
                                answer.to_vec(),
                            )),
                        })
                        .await
                        .map_err(|_| ClientError::Unavailable {
                            call: CALL,
                            message: "the stream closed during a challenge".into(),
                        })?;
                    }
                    Some(pb::attest_response::Step::Result(result)) => return Ok(result),
                    None => {
                        return Err(ClientError::BadResponse {
                            call: CALL,
                            message: "empty response".into(),
                        });
                    }
                }
            }
        };
        let result = tokio::time::timeout(ATTEST_TIMEOUT, exchange)
            .await
            .map_err(|_| ClientError::Unavailable {
                call: CALL,
                message: format!("no answer within {}s", ATTEST_TIMEOUT.as_secs()),
            })??;
        let bad = |message: String| ClientError::BadResponse {
            call: CALL,
            message,
        };
        let svid =
            AgentSvid::new(result.svid_chain, key.key_pkcs8).map_err(|e| bad(e.to_string()))?;
        let announced = SpiffeId::new(&result.spiffe_id)
            .map_err(|e| bad(format!("spiffe_id {:?}: {e}", result.spiffe_id)))?;
        self.check_agent_id(CALL, &svid, Some(&announced))?;
        let bundle = result
            .bundle
            .as_ref()
            .ok_or_else(|| bad("no bundle".into()))
            .and_then(|b| TrustBundle::from_proto(b).map_err(|e| bad(e.to_string())))?;
        if bundle.trust_domain != self.inner.trust_domain || bundle.x509_authorities.is_empty() {
            return Err(bad(format!(
                "the bundle is for {} with {} CA certificates; expected {} with at least one",
                bundle.trust_domain,
                bundle.x509_authorities.len(),
                self.inner.trust_domain
            )));
        }
        Ok(Attested {
            svid,
            bundle,
            node_selectors: result
                .node_selectors
                .iter()
                .map(|s| format!("{}:{}", s.r#type, s.value))
                .collect(),
            can_reattest: result.can_reattest,
        })
    }

    /// Checks that an agent SVID is an agent identity of our trust domain
    /// (and the announced or current one).
    fn check_agent_id(
        &self,
        call: &'static str,
        svid: &AgentSvid,
        expected: Option<&SpiffeId>,
    ) -> Result<(), ClientError> {
        let id = &svid.spiffe_id;
        if !id.is_member_of(&self.inner.trust_domain) || !mayfly::id::is_agent_id(id) {
            return Err(ClientError::BadResponse {
                call,
                message: format!(
                    "{id} is not an agent identity of {}",
                    self.inner.trust_domain
                ),
            });
        }
        if let Some(expected) = expected
            && expected != id
        {
            return Err(ClientError::BadResponse {
                call,
                message: format!("the SVID is for {id}, not {expected}"),
            });
        }
        Ok(())
    }

    /// A new agent SVID for a new key, with the same SPIFFE ID. Does not
    /// switch the client's identity (see [`ServerClient::set_identity`]).
    pub async fn renew(&self) -> Result<AgentSvid, ClientError> {
        const CALL: &str = "Renew";
        let current = self.identity().ok_or(ClientError::NoIdentity)?;
        let key = mayfly::x509::new_key_and_csr().map_err(|e| ClientError::Key(e.to_string()))?;
        let mut node = self.node()?;
        let mut req = tonic::Request::new(pb::RenewRequest {
            csr: key.csr_der.clone(),
        });
        req.set_timeout(CALL_TIMEOUT);
        let resp = self.observe(CALL, node.renew(req).await)?.into_inner();
        let svid = AgentSvid::new(resp.svid_chain, key.key_pkcs8).map_err(|e| {
            ClientError::BadResponse {
                call: CALL,
                message: e.to_string(),
            }
        })?;
        self.check_agent_id(CALL, &svid, Some(&current.spiffe_id))?;
        Ok(svid)
    }

    /// Opens the `Sync` stream.
    pub async fn sync(&self) -> Result<tonic::Streaming<pb::SyncResponse>, ClientError> {
        let mut node = self.node()?;
        Ok(self
            .observe("Sync", node.sync(pb::SyncRequest {}).await)?
            .into_inner())
    }

    /// The next message of a `Sync` stream; `None` when the server ended it.
    pub async fn next_sync(
        &self,
        stream: &mut tonic::Streaming<pb::SyncResponse>,
    ) -> Result<Option<pb::SyncResponse>, ClientError> {
        self.observe("Sync", stream.message().await)
    }

    /// X.509-SVIDs for a batch of CSRs.
    /// When the server asks for a fresh node attestation and this agent can
    /// attest again, it does (once for all concurrent callers) and retries.
    pub async fn sign_x509(
        &self,
        items: Vec<pb::X509SignItem>,
    ) -> Result<Vec<pb::X509SignResult>, ClientError> {
        self.with_step_up(|| self.sign_x509_once(items.clone()))
            .await
    }

    async fn sign_x509_once(
        &self,
        items: Vec<pb::X509SignItem>,
    ) -> Result<Vec<pb::X509SignResult>, ClientError> {
        let mut node = self.node()?;
        let mut req = tonic::Request::new(pb::SignX509Request { items });
        req.set_timeout(CALL_TIMEOUT);
        Ok(self
            .observe("SignX509", node.sign_x509(req).await)?
            .into_inner()
            .results)
    }

    /// A JWT-SVID for an entry: the token and its expiry (Unix seconds).
    pub async fn mint_jwt(
        &self,
        entry_id: &EntryId,
        audience: &[String],
    ) -> Result<(String, i64), ClientError> {
        let resp = self.mint_task_jwt(entry_id, audience, "").await?;
        Ok((resp.token, resp.expires_at))
    }

    /// A JWT-SVID for an entry, issued to the task `task_id` (empty: shared): the server's
    /// answer with the token, its expiry and its `jti`.
    /// Step-up as for [`ServerClient::sign_x509`].
    pub async fn mint_task_jwt(
        &self,
        entry_id: &EntryId,
        audience: &[String],
        task_id: &str,
    ) -> Result<pb::MintJwtResponse, ClientError> {
        self.with_step_up(|| self.mint_task_jwt_once(entry_id, audience, task_id))
            .await
    }

    async fn mint_task_jwt_once(
        &self,
        entry_id: &EntryId,
        audience: &[String],
        task_id: &str,
    ) -> Result<pb::MintJwtResponse, ClientError> {
        let mut node = self.node()?;
        let mut req = tonic::Request::new(pb::MintJwtRequest {
            entry_id: entry_id.to_string(),
            audience: audience.to_vec(),
            task_id: task_id.to_owned(),
        });
        req.set_timeout(CALL_TIMEOUT);
        Ok(self
            .observe("MintJwt", node.mint_jwt(req).await)?
            .into_inner())
    }

    /// Reports ended tasks; the number of credentials the server newly revoked.
    pub async fn report_task_end(&self, tasks: Vec<pb::TaskEnd>) -> Result<u32, ClientError> {
        let mut node = self.node()?;
        let mut req = tonic::Request::new(pb::ReportTaskEndRequest { tasks });
        req.set_timeout(CALL_TIMEOUT);
        Ok(self
            .observe("ReportTaskEnd", node.report_task_end(req).await)?
            .into_inner()
            .revoked)
    }
}

#[tonic::async_trait]
impl crate::api::JwtMinter for ServerClient {
    /// Mints through the server's `MintJwt`: the server checks that the
    /// entry is authorized for this agent now.
    async fn mint_jwt(
        &self,
        entry_id: &EntryId,
        audience: &[String],
    ) -> Result<(String, i64), tonic::Status> {
        ServerClient::mint_jwt(self, entry_id, audience)
            .await
            .map_err(|e| {
                tracing::warn!(entry_id = %entry_id, error = %e, "MintJwt failed");
                tonic::Status::from(e)
            })
    }

    async fn mint_task_jwt(
        &self,
        entry_id: &EntryId,
        audience: &[String],
        task_id: &str,
    ) -> Result<crate::api::MintedJwt, tonic::Status> {
        let resp = ServerClient::mint_task_jwt(self, entry_id, audience, task_id)
            .await
            .map_err(|e| {
                tracing::warn!(entry_id = %entry_id, task_id, error = %e, "MintJwt failed");
                tonic::Status::from(e)
            })?;
        Ok(crate::api::MintedJwt {
            token: resp.token,
            expires_at: resp.expires_at,
            jti: resp.jti,
        })
    }
}

impl From<ClientError> for tonic::Status {
    /// How a node API failure is told to a workload: refusals about the
    /// entry keep their code; the agent's own trouble is `Unavailable`.
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Refused { code, message, .. } => tonic::Status::new(code, message),
            ClientError::ReattestRequired { message, .. } => tonic::Status::permission_denied(
                format!("{message} (this agent cannot attest again by itself)"),
            ),
            other => tonic::Status::unavailable(format!(
                "the agent cannot get this credential from the server right now: {other}"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[derive(Debug)]
    struct NoTransport;
    impl Transport for NoTransport {
        fn channel(&self, _: Option<&AgentSvid>, _: bool) -> Result<Channel, ClientError> {
            Err(ClientError::NoIdentity)
        }
    }

    fn agent_svid() -> AgentSvid {
        use mayfly::x509::{CaParams, SvidParams, VerifiedCsr, X509Authority, new_key_and_csr};
        let now = time::OffsetDateTime::now_utc();
        let ca = X509Authority::generate(
            &CaParams {
                trust_domain: TrustDomain::new("example.org").unwrap(),
                ttl: time::Duration::hours(1),
                subject: "T".into(),
            },
            now,
        )
        .unwrap();
        let k = new_key_and_csr().unwrap();
        let id = SpiffeId::new("spiffe://example.org/mayfly/agent/x509pop/ab").unwrap();
        let der = ca
            .sign_svid(
                &VerifiedCsr::from_der(&k.csr_der).unwrap(),
                &SvidParams {
                    spiffe_id: &id,
                    dns_names: &[],
                    ttl: time::Duration::minutes(10),
                },
                now,
            )
            .unwrap()
            .der;
        AgentSvid::new(vec![der], k.key_pkcs8).unwrap()
    }

    /// Counts attestations; each takes a while and installs a new SVID.
    #[derive(Debug, Default)]
    struct CountingReattest(AtomicUsize);

    #[tonic::async_trait]
    impl Reattest for CountingReattest {
        async fn reattest(&self, client: &ServerClient) -> Result<(), ClientError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(50)).await;
            client.set_identity(agent_svid());
            Ok(())
        }
    }

    #[tokio::test]
    async fn concurrent_step_ups_share_one_attestation() {
        let client = ServerClient::new(
            TrustDomain::new("example.org").unwrap(),
            Arc::new(NoTransport),
        );
        assert!(!client.can_reattest());
        assert!(matches!(
            client.reattest_after(None).await,
            Err(ClientError::Reattest(_))
        ));
        client.set_identity(agent_svid());
        let stale = client.identity().unwrap().serial_hex.clone();
        let counter = Arc::new(CountingReattest::default());
        client.set_reattester(counter.clone());
        assert!(client.can_reattest());
        let calls: Vec<_> = (0..8)
            .map(|_| {
                let c = client.clone();
                let stale = stale.clone();
                tokio::spawn(async move { c.reattest_after(Some(&stale)).await })
            })
            .collect();
        for call in calls {
            call.await.unwrap().unwrap();
        }
        assert_eq!(
            counter.0.load(Ordering::SeqCst),
            1,
            "one attestation for all"
        );
        assert_ne!(client.identity().unwrap().serial_hex, stale);
        // A caller that saw the new SVID refused attests again.
        let current = client.identity().unwrap().serial_hex.clone();
        client.reattest_after(Some(&current)).await.unwrap();
        assert_eq!(counter.0.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn statuses_are_classified_as_the_contract_says() {
        let c = |s: tonic::Status| ClientError::from_status("Sync", &s);
        assert!(matches!(
            c(tonic::Status::unauthenticated(
                "agent is not attested; attest again"
            )),
            ClientError::NotAttested(_)
        ));
        assert!(matches!(
            c(tonic::Status::unauthenticated(
                "agent SVID has been superseded"
            )),
            ClientError::Superseded(_)
        ));
        assert!(matches!(
            c(tonic::Status::permission_denied("agent is banned")),
            ClientError::Banned(_)
        ));
        let refused = c(tonic::Status::permission_denied(
            "entry e1 is not authorized",
        ));
        assert!(matches!(
            refused,
            ClientError::Refused {
                code: Code::PermissionDenied,
                ..
            }
        ));
        assert!(!refused.is_agent_rejected());
        assert!(c(tonic::Status::unavailable("down")).is_unavailable());
        // Step-up: FailedPrecondition with the re-attest metadata, and only then.
        let mut step_up = tonic::Status::failed_precondition(
            "entry e1 (spiffe://td/db) requires a node attestation within 30s; attest again",
        );
        step_up.metadata_mut().insert(
            REATTEST_METADATA,
            tonic::metadata::MetadataValue::from_static("required"),
        );
        let e = c(step_up);
        assert!(
            matches!(&e, ClientError::ReattestRequired { message, .. } if message.contains("within 30s")),
            "{e:?}"
        );
        assert!(!e.is_agent_rejected() && !e.is_unavailable());
        assert_eq!(tonic::Status::from(e).code(), Code::PermissionDenied);
        assert!(matches!(
            c(tonic::Status::failed_precondition("something else")),
            ClientError::Refused {
                code: Code::FailedPrecondition,
                ..
            }
        ));
        assert!(c(tonic::Status::unauthenticated("x")).is_agent_rejected());
        // Workloads see the server's refusal about an entry, and Unavailable otherwise.
        assert_eq!(tonic::Status::from(refused).code(), Code::PermissionDenied);
        assert_eq!(
            tonic::Status::from(c(tonic::Status::permission_denied("agent is banned"))).code(),
            Code::Unavailable
        );
    }
}
