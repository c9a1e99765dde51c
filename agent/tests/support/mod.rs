//! A stand-in for the server's node API, following the contract in
//! `docs/architecture.md`, for testing the agent's side without the server
//! crate (agent and server never depend on each other). Shared by the
//! integration tests in this folder.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod tls;

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration as StdDuration;

use futures::Stream;
use mayfly::bundle::TrustBundle;
use mayfly::proto::node as pb;
use mayfly::proto::node::node_server::{Node, NodeServer};
use mayfly::x509::{CaParams, SvidParams, VerifiedCsr, X509Authority};
use mayfly::{SpiffeId, TrustDomain};
use mayfly_agent::attest::AgentSvid;
use mayfly_agent::cache::{Cache, Snapshot};
use mayfly_agent::client::{ClientError, Transport};
use time::{Duration, OffsetDateTime};
use tokio::sync::{broadcast, mpsc};
use tonic::{Request, Response, Status, Streaming};

pub const GOOD_TOKEN: &str = "good-token";

pub fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

pub fn new_ca() -> X509Authority {
    X509Authority::generate(
        &CaParams {
            trust_domain: td(),
            ttl: Duration::hours(24),
            subject: "Mock".into(),
        },
        OffsetDateTime::now_utc(),
    )
    .unwrap()
}

pub fn entry(id: &str, path: &str) -> pb::Entry {
    pb::Entry {
        id: id.into(),
        spiffe_id: format!("spiffe://example.org/{path}"),
        parent_id: "spiffe://example.org/mayfly/agent/join_token/tok1".into(),
        selectors: vec![pb::Selector {
            r#type: "unix".into(),
            value: "uid:1000".into(),
        }],
        scope: "shared".into(),
        revision: 1,
        ..Default::default()
    }
}

/// What the mock does and saw.
pub struct MockState {
    pub ca: X509Authority,
    pub entries: Mutex<Vec<pb::Entry>>,
    pub updates: broadcast::Sender<pb::SyncResponse>,
    /// Per `Sync` call, in order: an error to answer with; `None` (or an
    /// empty plan) serves the stream.
    pub sync_plan: Mutex<VecDeque<Option<Status>>>,
    /// Every call, by name.
    pub calls: Mutex<Vec<String>>,
    /// Whether each call came with a client certificate (TLS tests only).
    pub peer_certs: Mutex<Vec<(String, Option<Vec<u8>>)>>,
    pub used_tokens: Mutex<Vec<String>>,
    pub agent_ttl: Mutex<Duration>,
    pub agents_issued: Mutex<u32>,
    /// TTL of workload X.509-SVIDs.
    pub svid_ttl: Mutex<Duration>,
    /// A second CA (a rotation's next authority); signs instead of `ca` while `use_ca2`.
    pub ca2: X509Authority,
    pub use_ca2: std::sync::atomic::AtomicBool,
    /// Served instead of [`MockState::bundle`]'s default when set.
    pub bundle_override: Mutex<Option<TrustBundle>>,
    /// While true every call fails with `Unavailable` and open sync streams break, as if the
    /// server were down.
    pub down: tokio::sync::watch::Sender<bool>,
    /// Every task end acknowledged by `ReportTaskEnd`, in order.
    pub task_ends: Mutex<Vec<pb::TaskEnd>>,
    /// Every `SignX509` item received (entry id, task id).
    pub sign_items: Mutex<Vec<(String, String)>>,
    /// Revocations and CRLs sent in full sync updates.
    pub revocations: Mutex<Vec<pb::Revocation>>,
    pub crls: Mutex<Vec<Vec<u8>>>,
    /// `expires_at` of minted JWT-SVIDs (default 1234).
    pub jwt_expires_at: Mutex<Option<i64>>,
}

impl MockState {
    pub fn new() -> Arc<Self> {
        let (updates, _) = broadcast::channel(16);
        Arc::new(Self {
            ca: new_ca(),
            entries: Mutex::new(vec![entry("a", "a"), entry("b", "b")]),
            updates,
            sync_plan: Mutex::new(VecDeque::new()),
            calls: Mutex::new(Vec::new()),
            peer_certs: Mutex::new(Vec::new()),
            used_tokens: Mutex::new(Vec::new()),
            agent_ttl: Mutex::new(Duration::hours(1)),
            agents_issued: Mutex::new(0),
            svid_ttl: Mutex::new(Duration::hours(1)),
            ca2: new_ca(),
            use_ca2: std::sync::atomic::AtomicBool::new(false),
            bundle_override: Mutex::new(None),
            down: tokio::sync::watch::channel(false).0,
            task_ends: Mutex::new(Vec::new()),
            sign_items: Mutex::new(Vec::new()),
            revocations: Mutex::new(Vec::new()),
            crls: Mutex::new(Vec::new()),
            jwt_expires_at: Mutex::new(None),
        })
    }

    /// Takes the server down (every call `Unavailable`, sync streams broken) or back up.
    pub fn set_down(&self, down: bool) {
        self.down.send_replace(down);
    }

    fn check_up(&self) -> Result<(), Status> {
        if *self.down.borrow() {
            Err(Status::unavailable("the server is down"))
        } else {
            Ok(())
        }
    }

    /// The CA that signs now.
    pub fn signer(&self) -> &X509Authority {
        if self.use_ca2.load(std::sync::atomic::Ordering::SeqCst) {
            &self.ca2
        } else {
            &self.ca
        }
    }

    pub fn bundle(&self) -> TrustBundle {
        if let Some(b) = self.bundle_override.lock().unwrap().clone() {
            return b;
        }
        let mut b = TrustBundle::new(td());
        b.x509_authorities.push(self.ca.cert_der().to_vec());
        b.sequence = 1;
        b
    }

    pub fn calls(&self, name: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| *c == name)
            .count()
    }

    fn sign(&self, csr: &[u8], id: &SpiffeId, ttl: Duration) -> Result<Vec<u8>, Status> {
        let csr =
            VerifiedCsr::from_der(csr).map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(self
            .signer()
            .sign_svid(
                &csr,
                &SvidParams {
                    spiffe_id: id,
                    dns_names: &[],
                    ttl,
                },
                OffsetDateTime::now_utc(),
            )
            .map_err(|e| Status::internal(e.to_string()))?
            .der)
    }

    /// An agent SVID issued directly (as if attested in an earlier run).
    pub fn agent_svid(&self, ttl: Duration) -> AgentSvid {
        let k = mayfly::x509::new_key_and_csr().unwrap();
        let id = SpiffeId::new("spiffe://example.org/mayfly/agent/join_token/tok0").unwrap();
        let der = self.sign(&k.csr_der, &id, ttl).unwrap();
        AgentSvid::new(vec![der], k.key_pkcs8).unwrap()
    }

    fn record<T>(&self, name: &str, req: &Request<T>) {
        self.calls.lock().unwrap().push(name.to_owned());
        if let Some(PeerCert(cert)) = req.extensions().get::<PeerCert>() {
            self.peer_certs
                .lock()
                .unwrap()
                .push((name.to_owned(), cert.clone()));
        }
    }
}

/// The client certificate of a TLS connection, as connection info.
#[derive(Debug, Clone)]
pub struct PeerCert(pub Option<Vec<u8>>);

#[derive(Clone)]
pub struct MockNode(pub Arc<MockState>);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Node for MockNode {
    type AttestStream = BoxStream<pb::AttestResponse>;
    type SyncStream = BoxStream<pb::SyncResponse>;

    async fn attest(
        &self,
        request: Request<Streaming<pb::AttestRequest>>,
    ) -> Result<Response<Self::AttestStream>, Status> {
        self.0.record("Attest", &request);
        self.0.check_up()?;
        let mut input = request.into_inner();
        let first = input
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("no params"))?;
        let Some(pb::attest_request::Step::Params(params)) = first.step else {
            return Err(Status::invalid_argument("params first"));
        };
        let token = String::from_utf8(params.payload).unwrap_or_default();
        {
            let mut used = self.0.used_tokens.lock().unwrap();
            if params.attestor != "join_token" || token != GOOD_TOKEN || used.contains(&token) {
                return Err(Status::permission_denied(
                    "join token is invalid, expired or already used",
                ));
            }
            used.push(token);
        }
        let n = {
            let mut n = self.0.agents_issued.lock().unwrap();
            *n += 1;
            *n
        };
        let id = SpiffeId::new(format!(
            "spiffe://example.org/mayfly/agent/join_token/tok{n}"
        ))
        .unwrap();
        let ttl = *self.0.agent_ttl.lock().unwrap();
        let der = self.0.sign(&params.csr, &id, ttl)?;
        let result = pb::AttestResponse {
            step: Some(pb::attest_response::Step::Result(pb::AttestResult {
                spiffe_id: id.to_string(),
                svid_chain: vec![der],
                node_selectors: vec![],
                bundle: Some(self.0.bundle().to_proto()),
                can_reattest: false,
            })),
        };
        Ok(Response::new(Box::pin(futures::stream::iter([Ok(result)]))))
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        self.0.record("Renew", &request);
        self.0.check_up()?;
        let id = SpiffeId::new("spiffe://example.org/mayfly/agent/join_token/tok0").unwrap();
        let n = *self.0.agents_issued.lock().unwrap();
        let id = if n == 0 {
            id
        } else {
            SpiffeId::new(format!(
                "spiffe://example.org/mayfly/agent/join_token/tok{n}"
            ))
            .unwrap()
        };
        let der = self
            .0
            .sign(&request.get_ref().csr, &id, Duration::hours(1))?;
        Ok(Response::new(pb::RenewResponse {
            svid_chain: vec![der],
        }))
    }

    async fn sync(
        &self,
        request: Request<pb::SyncRequest>,
    ) -> Result<Response<Self::SyncStream>, Status> {
        self.0.record("Sync", &request);
        self.0.check_up()?;
        if let Some(Some(status)) = self.0.sync_plan.lock().unwrap().pop_front() {
            return Err(status);
        }
        let full = pb::SyncResponse {
            revision: 1,
            full: true,
            upserted: self.0.entries.lock().unwrap().clone(),
            removed_entry_ids: vec![],
            bundle: Some(self.0.bundle().to_proto()),
            revocations: self.0.revocations.lock().unwrap().clone(),
            crls: self.0.crls.lock().unwrap().clone(),
            templates: Vec::new(),
        };
        let mut updates = self.0.updates.subscribe();
        let mut down = self.0.down.subscribe();
        let stream = async_stream::stream! {
            yield Ok(full);
            loop {
                tokio::select! {
                    u = updates.recv() => match u {
                        Ok(u) => yield Ok(u),
                        Err(_) => break,
                    },
                    () = async { let _ = down.wait_for(|d| *d).await; } => {
                        yield Err(Status::unavailable("the server went down"));
                        break;
                    }
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn sign_x509(
        &self,
        request: Request<pb::SignX509Request>,
    ) -> Result<Response<pb::SignX509Response>, Status> {
        self.0.record("SignX509", &request);
        self.0.check_up()?;
        let ttl = *self.0.svid_ttl.lock().unwrap();
        let entries = self.0.entries.lock().unwrap().clone();
        let mut results = Vec::new();
        for item in &request.get_ref().items {
            self.0
                .sign_items
                .lock()
                .unwrap()
                .push((item.entry_id.clone(), item.task_id.clone()));
            let Some(e) = entries.iter().find(|e| e.id == item.entry_id) else {
                return Err(Status::permission_denied(format!(
                    "entry {} is not authorized for this agent",
                    item.entry_id
                )));
            };
            let id = SpiffeId::new(&e.spiffe_id).unwrap();
            let der = self.0.sign(&item.csr, &id, ttl)?;
            results.push(pb::X509SignResult {
                entry_id: e.id.clone(),
                svid_chain: vec![der],
                expires_at: 0,
                task_id: item.task_id.clone(),
            });
        }
        Ok(Response::new(pb::SignX509Response { results }))
    }

    async fn mint_jwt(
        &self,
        request: Request<pb::MintJwtRequest>,
    ) -> Result<Response<pb::MintJwtResponse>, Status> {
        self.0.record("MintJwt", &request);
        self.0.check_up()?;
        let r = request.get_ref();
        if r.audience.is_empty() {
            return Err(Status::invalid_argument("audience must not be empty"));
        }
        if !self
            .0
            .entries
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.id == r.entry_id)
        {
            return Err(Status::permission_denied(format!(
                "entry {} is not authorized for this agent",
                r.entry_id
            )));
        }
        Ok(Response::new(pb::MintJwtResponse {
            token: format!("jwt-for-{}", r.entry_id),
            expires_at: self.0.jwt_expires_at.lock().unwrap().unwrap_or(1234),
            jti: if r.task_id.is_empty() {
                format!("jti-{}", r.entry_id)
            } else {
                format!("jti-{}-{}", r.entry_id, r.task_id)
            },
        }))
    }

    async fn report_task_end(
        &self,
        request: Request<pb::ReportTaskEndRequest>,
    ) -> Result<Response<pb::ReportTaskEndResponse>, Status> {
        self.0.record("ReportTaskEnd", &request);
        self.0.check_up()?;
        self.0
            .task_ends
            .lock()
            .unwrap()
            .extend(request.get_ref().tasks.iter().cloned());
        let revoked = request
            .get_ref()
            .tasks
            .iter()
            .map(|t| t.x509_serials.len() + t.jwt_ids.len())
            .sum::<usize>();
        Ok(Response::new(pb::ReportTaskEndResponse {
            revoked: u32::try_from(revoked).unwrap_or(u32::MAX),
        }))
    }
}

/// Connections in memory: each new channel gets a fresh duplex pipe whose
/// other end is served by the mock. Records the identity each channel
/// presents.
#[derive(Debug)]
pub struct MemTransport {
    conns: mpsc::UnboundedSender<tokio::io::DuplexStream>,
    pub channels: Mutex<Vec<(Option<String>, bool)>>,
}

impl MemTransport {
    /// Starts the mock server and returns the transport to it.
    pub fn start(state: Arc<MockState>) -> Arc<Self> {
        let (tx, rx) = mpsc::unbounded_channel::<tokio::io::DuplexStream>();
        let incoming = futures::StreamExt::map(
            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
            Ok::<_, std::io::Error>,
        );
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(NodeServer::new(MockNode(state)))
                .serve_with_incoming(incoming),
        );
        Arc::new(Self {
            conns: tx,
            channels: Mutex::new(Vec::new()),
        })
    }
}

impl Transport for MemTransport {
    fn channel(
        &self,
        identity: Option<&AgentSvid>,
        bootstrap: bool,
    ) -> Result<tonic::transport::Channel, ClientError> {
        self.channels
            .lock()
            .unwrap()
            .push((identity.map(|s| s.serial_hex.clone()), bootstrap));
        let conns = self.conns.clone();
        Ok(
            tonic::transport::Endpoint::from_static("http://mem").connect_with_connector_lazy(
                tower::service_fn(move |_: http::Uri| {
                    let conns = conns.clone();
                    async move {
                        let (client, server) = tokio::io::duplex(64 * 1024);
                        conns
                            .send(server)
                            .map_err(|_| std::io::Error::other("mock server gone"))?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(client))
                    }
                }),
            ),
        )
    }
}

/// Waits (up to 10 s) until the cache satisfies `pred`.
pub async fn wait_for_cache(cache: &Cache, pred: impl Fn(&Snapshot) -> bool) -> Arc<Snapshot> {
    wait_for_cache_within(cache, StdDuration::from_secs(10), pred).await
}

/// Waits (up to `limit`) until the cache satisfies `pred`.
pub async fn wait_for_cache_within(
    cache: &Cache,
    limit: StdDuration,
    pred: impl Fn(&Snapshot) -> bool,
) -> Arc<Snapshot> {
    let mut rx = cache.subscribe();
    tokio::time::timeout(limit, async {
        loop {
            let current = rx.borrow_and_update().clone();
            if pred(&current) {
                return current;
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("the cache did not reach the expected state in time")
}

/// Waits (up to 10 s) until `cond` holds, polling.
pub async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + StdDuration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(StdDuration::from_millis(20)).await;
    }
}
