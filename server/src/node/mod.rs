//! The node API: the gRPC service agents call, over TLS on
//! `server.bind_address`. The contract is `docs/architecture.md`, "Node API
//! contract".
//!
//! - `auth`: per-call agent authentication and entry authorization
//! - `attest`, `renew`, `sync`, `sign`: one module per call
//! - `ReportTaskEnd` is a thin call into `crate::revocation`
//! - `status`: `ServiceError` → `tonic::Status`
//!
//! Connections are accepted here: each TLS handshake runs in its own task
//! (bounded in time and number), and finished streams are handed to tonic.

pub mod attest;
pub mod audit;
pub mod auth;
pub mod k8s_psat;
pub mod rate_limit;
pub mod renew;
pub mod sign;
pub mod status;
pub mod sync;
pub mod templates;
pub mod x509pop;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt as _};
use mayfly::proto::node::node_server::{Node, NodeServer};
use mayfly::proto::node::{
    AttestRequest, AttestResponse, MintJwtRequest, MintJwtResponse, RenewRequest, RenewResponse,
    ReportTaskEndRequest, ReportTaskEndResponse, SignX509Request, SignX509Response, SyncRequest,
    SyncResponse, attest_response,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;
use tracing::field::{Empty, display};

use crate::error::{ServiceError, ServiceResult};
use crate::state::ServerState;
use crate::store::NodeRecord;
use crate::tls::{self, SvidResolver, TlsError};
use auth::Agent;

/// How long a client has to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How many handshakes may run at once; further accepts wait.
const MAX_PENDING_HANDSHAKES: usize = 1024;

/// Why the node API could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeApiError {
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// TLS could not be set up.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The gRPC server failed.
    #[error("node API server: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// What the node API handlers share.
#[derive(Debug)]
pub struct NodeCtx {
    /// The server state.
    pub state: Arc<ServerState>,
    /// Per-identity rate limits (`[server.rate_limits]`).
    pub limits: rate_limit::RateLimits,
    /// The API clients of the `k8s_psat` clusters (empty when off).
    pub k8s: crate::k8s::Clusters,
    shutdown: watch::Receiver<bool>,
}

impl NodeCtx {
    /// Handler context over `state`; long-lived streams end when
    /// `shutdown` turns true.
    pub fn new(state: Arc<ServerState>, shutdown: watch::Receiver<bool>) -> Self {
        let limits = rate_limit::RateLimits::new(&state.config.rate_limits);
        Self {
            state,
            limits,
            k8s: crate::k8s::Clusters::default(),
            shutdown,
        }
    }

    /// With the API clients of the `k8s_psat` clusters.
    pub fn with_k8s(mut self, k8s: crate::k8s::Clusters) -> Self {
        self.k8s = k8s;
        self
    }

    /// Stores a node. Blocking.
    pub fn put_node(&self, node: &NodeRecord) -> ServiceResult<()> {
        self.state.put_node(node)
    }

    /// Reads, changes and stores a node as one step with respect to the
    /// other writers of this API. Absent → `Unauthenticated` (not
    /// attested). Blocking.
    pub fn update_node(
        &self,
        spiffe_id: &str,
        f: impl FnOnce(&mut NodeRecord) -> ServiceResult<()>,
    ) -> ServiceResult<NodeRecord> {
        self.state
            .update_node(spiffe_id, f)?
            .ok_or_else(|| ServiceError::Unauthenticated(auth::NOT_ATTESTED.into()))
    }
}

/// Runs blocking store work off the async threads.
pub async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ServiceResult<T> + Send + 'static,
) -> ServiceResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ServiceError::Internal(format!("blocking task failed: {e}")))?
}

/// How often the server pings an idle agent connection. Agents ping the
/// server themselves (every 60 s) to notice a dead server; the server's
/// pings only reclaim connections of agents that vanished without closing
/// them, which cost nothing but memory meanwhile. Rare, so that 10,000
/// idle agents do not keep the server busy (`docs/performance.md`).
const PING_INTERVAL: Duration = Duration::from_secs(300);

/// `SignX509` calls with at most this many items are signed on the async
/// thread that received them; larger ones on the blocking pool.
const INLINE_SIGN_ITEMS: usize = 4;

/// The `mayfly.node.v1.Node` service.
#[derive(Debug, Clone)]
pub struct NodeService {
    ctx: Arc<NodeCtx>,
}

impl NodeService {
    /// The service over `ctx`.
    pub fn new(ctx: Arc<NodeCtx>) -> Self {
        Self { ctx }
    }

    /// Authenticates the calling agent and records it on the current span.
    /// Audits a refused issuance (a durable write, on the blocking pool)
    /// and turns the error into the call's status.
    async fn refused(
        &self,
        agent: &Agent,
        action: &'static str,
        target: Option<String>,
        e: ServiceError,
    ) -> Status {
        let ctx = Arc::clone(&self.ctx);
        let actor = audit::agent_actor(&agent.spiffe_id);
        blocking(move || {
            audit::refused(&ctx, actor, action, target, &e);
            Ok(e)
        })
        .await
        .unwrap_or_else(|join| join)
        .into()
    }

    async fn agent<T>(&self, req: &Request<T>, action: &'static str) -> Result<Agent, Status> {
        self.agent_and_issuer(req, action)
            .await
            .map(|(agent, _)| agent)
    }

    /// [`Self::agent`], and the id of the CA that issued its SVID (when
    /// the SVID names it).
    async fn agent_and_issuer<T>(
        &self,
        req: &Request<T>,
        action: &'static str,
    ) -> Result<(Agent, Option<String>), Status> {
        let certs = req.peer_certs();
        let peer = req
            .remote_addr()
            .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        let result = async {
            let svid = auth::peer_leaf(certs.as_deref().map(Vec::as_slice))
                .map_err(|e| (audit::peer_actor(&peer), e))?;
            let actor = audit::agent_actor(&svid.spiffe_id);
            let issuer = auth::check_issuer(&self.ctx, certs.as_deref().map(Vec::as_slice))
                .map_err(|e| (actor.clone(), e))?;
            let agent = match auth::authenticate_current(&self.ctx, &svid) {
                Ok(Some(agent)) => agent,
                Ok(None) => {
                    // The first call with a renewed SVID records it.
                    let ctx = Arc::clone(&self.ctx);
                    blocking(move || auth::authenticate(&ctx, &svid))
                        .await
                        .map_err(|e| (actor, e))?
                }
                Err(e) => return Err((actor, e)),
            };
            Ok((agent, issuer))
        }
        .await;
        match result {
            Ok((agent, issuer)) => {
                tracing::Span::current().record("agent", display(&agent.spiffe_id));
                Ok((agent, issuer))
            }
            Err((actor, e)) => {
                tracing::info!(reason = %e, "refused agent");
                let ctx = Arc::clone(&self.ctx);
                let e = blocking(move || {
                    audit::refused(&ctx, actor, action, None, &e);
                    Ok(e)
                })
                .await
                .unwrap_or_else(|join| join);
                Err(Status::from(e))
            }
        }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Node for NodeService {
    type AttestStream = BoxStream<AttestResponse>;
    type SyncStream = BoxStream<SyncResponse>;

    async fn attest(
        &self,
        request: Request<Streaming<AttestRequest>>,
    ) -> Result<Response<Self::AttestStream>, Status> {
        let span = tracing::info_span!(
            "node.attest",
            peer = ?request.remote_addr(),
            attestor = Empty,
            agent = Empty
        );
        // The conversation runs in its own task so that challenges can be
        // sent while it waits for answers. The call fails with the status
        // itself when the first thing the conversation produces is a refusal
        // (join tokens are refused this way, as before challenges existed).
        let ctx = Arc::clone(&self.ctx);
        let (tx, mut rx) = mpsc::channel::<Result<AttestResponse, Status>>(2);
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        let inbound = request.into_inner();
        let task_span = span.clone();
        tokio::spawn(async move {
            let result = attest::attest(Arc::clone(&ctx), inbound, &tx)
                .instrument(task_span.clone())
                .await;
            let result = match result {
                Ok(r) => {
                    let (id, can_reattest) = (r.spiffe_id.clone(), r.can_reattest);
                    let actx = Arc::clone(&ctx);
                    // The SVID is handed out only once its attestation is audited.
                    blocking(move || audit::attested(&actx, &id, &peer, can_reattest))
                        .instrument(task_span.clone())
                        .await
                        .map(|()| AttestResponse {
                            step: Some(attest_response::Step::Result(r)),
                        })
                        .map_err(Status::from)
                }
                Err(s) => {
                    task_span.in_scope(|| tracing::info!(code = ?s.code(), message = s.message(), "attestation refused"));
                    let status = s.clone();
                    let _ = blocking(move || {
                        audit::refused_status(
                            &ctx,
                            audit::peer_actor(&peer),
                            "node.attest",
                            None,
                            &status,
                        );
                        Ok(())
                    })
                    .await;
                    Err(s)
                }
            };
            let _ = tx.send(result).await;
        });
        let first = rx
            .recv()
            .await
            .ok_or_else(|| Status::internal("attestation ended without an answer"))??;
        let rest = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(
            futures::stream::iter([Ok(first)]).chain(rest),
        )))
    }

    async fn renew(
        &self,
        request: Request<RenewRequest>,
    ) -> Result<Response<RenewResponse>, Status> {
        let span = tracing::info_span!("node.renew", agent = Empty);
        async {
            let agent = self.agent(&request, "node.renew").await?;
            let ctx = Arc::clone(&self.ctx);
            let req = request.into_inner();
            let resp = blocking(move || {
                let actor = audit::agent_actor(&agent.spiffe_id);
                let target = Some(agent.spiffe_id.to_string());
                match renew::renew(&ctx, &agent, &req) {
                    Ok(resp) => {
                        ctx.state.audit(
                            crate::audit::AuditEvent::ok(actor, "node.renew")
                                .target(agent.spiffe_id.to_string()),
                        )?;
                        Ok(resp)
                    }
                    Err(e) => {
                        audit::refused(&ctx, actor, "node.renew", target, &e);
                        Err(e)
                    }
                }
            })
            .in_current_span()
            .await?;
            Ok(Response::new(resp))
        }
        .instrument(span)
        .await
    }

    async fn sync(
        &self,
        request: Request<SyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        let span = tracing::info_span!("node.sync", agent = Empty);
        async {
            let (agent, issuer) = self.agent_and_issuer(&request, "node.sync").await?;
            tracing::info!("sync stream opened");
            let stream = sync::stream(Arc::clone(&self.ctx), agent, issuer);
            Ok(Response::new(Box::pin(stream) as Self::SyncStream))
        }
        .instrument(span)
        .await
    }

    async fn sign_x509(
        &self,
        request: Request<SignX509Request>,
    ) -> Result<Response<SignX509Response>, Status> {
        let span = tracing::info_span!("node.sign_x509", agent = Empty);
        async {
            let agent = self.agent(&request, "x509.issue").await?;
            let req = request.into_inner();
            // A few items are signed here (tens of microseconds each); a
            // large batch goes to the blocking pool so that it does not hold
            // an async thread.
            let signed = if req.items.len() <= INLINE_SIGN_ITEMS {
                sign::sign_x509(&self.ctx, &agent, &req)
            } else {
                let (ctx, agent, req) = (Arc::clone(&self.ctx), agent.clone(), req.clone());
                let span = tracing::Span::current();
                blocking(move || {
                    let _span = span.enter();
                    sign::sign_x509(&ctx, &agent, &req)
                })
                .await
            };
            let signed = match signed {
                Ok(signed) => signed,
                Err(e) => {
                    tracing::info!(reason = %e, "refused SignX509");
                    let entries: Vec<&str> =
                        req.items.iter().map(|i| i.entry_id.as_str()).collect();
                    let target = Some(entries.join(","));
                    return Err(self.refused(&agent, "x509.issue", target, e).await);
                }
            };
            self.ctx
                .state
                .commit_issued(signed.records, signed.events)
                .await?;
            Ok(Response::new(signed.response))
        }
        .instrument(span)
        .await
    }

    async fn report_task_end(
        &self,
        request: Request<ReportTaskEndRequest>,
    ) -> Result<Response<ReportTaskEndResponse>, Status> {
        let span = tracing::info_span!("node.report_task_end", agent = Empty);
        async {
            let agent = self.agent(&request, "task.end").await?;
            let req = request.into_inner();
            let ctx = Arc::clone(&self.ctx);
            let id = agent.spiffe_id.clone();
            let revoked = blocking(move || {
                let actor = audit::agent_actor(&id);
                let tasks: Vec<&str> = req.tasks.iter().map(|t| t.task_id.as_str()).collect();
                let target = tasks.join(",");
                match ctx.state.report_task_ends(&id, &req.tasks) {
                    Ok(revoked) => {
                        ctx.state.audit(
                            crate::audit::AuditEvent::ok(actor, "task.end")
                                .target(target)
                                .detail("revoked", revoked),
                        )?;
                        Ok(revoked)
                    }
                    Err(e) => {
                        audit::refused(&ctx, actor, "task.end", Some(target), &e);
                        Err(e)
                    }
                }
            })
            .in_current_span()
            .await
            .inspect_err(|e| tracing::info!(reason = %e, "refused ReportTaskEnd"))?;
            Ok(Response::new(ReportTaskEndResponse { revoked }))
        }
        .instrument(span)
        .await
    }

    async fn mint_jwt(
        &self,
        request: Request<MintJwtRequest>,
    ) -> Result<Response<MintJwtResponse>, Status> {
        let span = tracing::info_span!("node.mint_jwt", agent = Empty, entry = Empty);
        async {
            let agent = self.agent(&request, "jwt.issue").await?;
            let req = request.into_inner();
            tracing::Span::current().record("entry", req.entry_id.as_str());
            // One signature: done here, like a small `SignX509`.
            let signed = match sign::mint_jwt(&self.ctx, &agent, &req) {
                Ok(signed) => signed,
                Err(e) => {
                    tracing::info!(reason = %e, "refused MintJwt");
                    let target = Some(req.entry_id.clone());
                    return Err(self.refused(&agent, "jwt.issue", target, e).await);
                }
            };
            self.ctx
                .state
                .commit_issued(signed.records, signed.events)
                .await?;
            Ok(Response::new(signed.response))
        }
        .instrument(span)
        .await
    }
}

/// Binds the node API's TCP listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, NodeApiError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| NodeApiError::Bind { addr, source })
}

/// Starts the node API on `listener`: issues the server SVID, starts its
/// renewal, and serves until `shutdown` turns true. Setup errors are
/// returned at once; the handle yields the outcome of serving. Open `Sync`
/// streams end with `Unavailable` on shutdown so that connections drain.
pub fn start(
    state: Arc<ServerState>,
    listener: TcpListener,
    k8s: crate::k8s::Clusters,
    shutdown: watch::Receiver<bool>,
) -> Result<JoinHandle<Result<(), NodeApiError>>, NodeApiError> {
    let svid = tls::issue_server_svid(&state, &tls::provider())?;
    let resolver = Arc::new(SvidResolver::new(svid));
    let config = tls::server_config(&state, Arc::clone(&resolver))?;
    let (acceptor_tx, acceptor) = watch::channel(TlsAcceptor::from(config));
    tokio::spawn(tls::maintain(
        Arc::clone(&state),
        resolver,
        acceptor_tx,
        shutdown.clone(),
    ));

    let (tx, rx) = mpsc::channel::<Result<TlsStream<TcpStream>, std::io::Error>>(64);
    tokio::spawn(accept_loop(listener, acceptor, tx, shutdown.clone()));

    let service = NodeService::new(Arc::new(
        NodeCtx::new(state, shutdown.clone()).with_k8s(k8s),
    ));
    let mut signal = shutdown;
    Ok(tokio::spawn(async move {
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(PING_INTERVAL))
            .http2_keepalive_timeout(Some(Duration::from_secs(20)))
            .add_service(NodeServer::new(service))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::ReceiverStream::new(rx),
                async move {
                    let _ = signal.wait_for(|stop| *stop).await;
                },
            )
            .await?;
        Ok(())
    }))
}

/// Accepts connections; each handshake uses the TLS configuration current
/// when it was accepted (the client verifier follows the bundle).
async fn accept_loop(
    listener: TcpListener,
    acceptor: watch::Receiver<TlsAcceptor>,
    streams: mpsc::Sender<Result<TlsStream<TcpStream>, std::io::Error>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // Usually out of file descriptors: back off instead of spinning.
                tracing::warn!(error = %e, "node API accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&handshakes).acquire_owned().await else {
            return;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.borrow().clone();
        let streams = streams.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => {
                    let _ = streams.send(Ok(tls)).await;
                }
                Ok(Err(e)) => tracing::info!(%peer, error = %e, "node API TLS handshake failed"),
                Err(_) => tracing::info!(%peer, "node API TLS handshake timed out"),
            }
        });
    }
}
