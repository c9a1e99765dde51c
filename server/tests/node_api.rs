//! The node API over real TLS sockets with a real tonic client: the
//! contract in `docs/architecture.md`, as an agent sees it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: failing loudly is the point

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use mayfly::entry::{EntryId, EntrySpec};
use mayfly::proto::node::node_client::NodeClient;
use mayfly::proto::node::{
    AttestParams, AttestRequest, MintJwtRequest, RenewRequest, ReportTaskEndRequest,
    SignX509Request, SyncRequest, SyncResponse, TaskEnd, X509SignItem, attest_request,
    attest_response,
};
use mayfly::x509::{KeyAndCsr, SvidInfo, new_key_and_csr};
use mayfly_server::authority::Kind;
use mayfly_server::config::ServerConfig;
use mayfly_server::run::{RunningServer, run};
use mayfly_server::state::ServerState;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Streaming};
use x509_parser::extensions::GeneralName;

const SERVER_ID: &str = "spiffe://example.org/mayfly/server";
const WAIT: Duration = Duration::from_secs(10);

/// Verifies the server the SPIFFE way: chain to the bundle's CAs, exactly
/// one URI SAN equal to the expected ID, DNS names ignored. Records the
/// URI it saw.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: RootCertStore,
    expected: String,
    provider: Arc<CryptoProvider>,
    seen: Mutex<Option<String>>,
    seen_cert: Mutex<Option<Vec<u8>>>,
}

fn uri_sans(der: &[u8]) -> Vec<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.subject_alternative_name()
        .unwrap()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let uris = uri_sans(end_entity);
        *self.seen.lock().unwrap() = uris.first().cloned();
        *self.seen_cert.lock().unwrap() = Some(end_entity.to_vec());
        if uris != [self.expected.clone()] {
            return Err(rustls::Error::General(format!(
                "server presented {uris:?}, expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

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
}

struct TestServer {
    server: RunningServer,
    _dir: tempfile::TempDir,
}

impl TestServer {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServerConfig::development();
        config.data_dir = dir.path().join("data");
        config.bind_address = "127.0.0.1:0".parse().unwrap();
        config.http_address = "127.0.0.1:0".parse().unwrap();
        config.admin_socket_path = dir.path().join("admin.sock");
        let server = run(config, std::future::pending()).await.unwrap();
        Self { server, _dir: dir }
    }

    fn state(&self) -> &Arc<ServerState> {
        self.server.state()
    }

    fn addr(&self) -> SocketAddr {
        self.server.node_addr()
    }

    /// The agent's bootstrap trust: the CA certificates from bundle.pem.
    fn roots(&self) -> RootCertStore {
        let text = std::fs::read_to_string(self.server.bundle_path()).unwrap();
        let mut roots = RootCertStore::empty();
        for p in pem::parse_many(text).unwrap() {
            roots.add(CertificateDer::from(p.into_contents())).unwrap();
        }
        roots
    }

    async fn client(
        &self,
        identity: Option<&Svid>,
    ) -> (NodeClient<Channel>, Arc<SpiffeServerVerifier>) {
        self.client_expecting(identity, SERVER_ID).await.unwrap()
    }

    async fn client_expecting(
        &self,
        identity: Option<&Svid>,
        expected: &str,
    ) -> Result<(NodeClient<Channel>, Arc<SpiffeServerVerifier>), tonic::transport::Error> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = Arc::new(SpiffeServerVerifier {
            roots: self.roots(),
            expected: expected.to_owned(),
            provider: Arc::clone(&provider),
            seen: Mutex::new(None),
            seen_cert: Mutex::new(None),
        });
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone());
        let mut config = match identity {
            Some(svid) => builder
                .with_client_auth_cert(
                    vec![CertificateDer::from(svid.cert.clone())],
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(svid.key.key_pkcs8.to_vec())),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let addr = self.addr();
        let channel = Endpoint::from_static("http://mayfly-server")
            .connect_with_connector(tower::service_fn(move |_uri| {
                let connector = connector.clone();
                async move {
                    let tcp = TcpStream::connect(addr).await?;
                    let name = ServerName::try_from("mayfly-server").unwrap();
                    let tls = connector.connect(name, tcp).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(tls))
                }
            }))
            .await?;
        Ok((NodeClient::new(channel), verifier))
    }

    async fn create_token(&self, alias: Option<&str>) -> String {
        let state = Arc::clone(self.state());
        let alias = alias.map(str::to_owned);
        let (token, _) =
            tokio::task::spawn_blocking(move || state.create_join_token(alias.as_deref(), None))
                .await
                .unwrap()
                .unwrap();
        token.to_string()
    }

    async fn add_entry(&self, spiffe_id: &str, parent: &str) -> String {
        let spec = EntrySpec {
            spiffe_id: spiffe_id.into(),
            parent_id: parent.into(),
            selectors: vec!["unix:uid:1000".into()],
            dns_names: vec!["web.example.org".into()],
            ..Default::default()
        };
        let entry = spec
            .validate(self.state().trust_domain(), EntryId::random(), 0)
            .unwrap();
        let state = Arc::clone(self.state());
        let entry = tokio::task::spawn_blocking(move || state.upsert_entry(entry))
            .await
            .unwrap()
            .unwrap();
        entry.id.to_string()
    }
}

/// An agent's SVID and key.
struct Svid {
    spiffe_id: String,
    cert: Vec<u8>,
    key: KeyAndCsr,
}

async fn attest(client: &mut NodeClient<Channel>, token: &str) -> Result<Svid, tonic::Status> {
    let key = new_key_and_csr().unwrap();
    let req = AttestRequest {
        step: Some(attest_request::Step::Params(AttestParams {
            attestor: "join_token".into(),
            payload: token.as_bytes().to_vec(),
            csr: key.csr_der.clone(),
        })),
    };
    let mut responses = client
        .attest(futures::stream::iter([req]))
        .await?
        .into_inner();
    let msg = tokio::time::timeout(WAIT, responses.message())
        .await
        .unwrap()?
        .unwrap();
    let Some(attest_response::Step::Result(result)) = msg.step else {
        panic!("expected a result, got {msg:?}");
    };
    assert_eq!(result.svid_chain.len(), 1);
    assert!(!result.can_reattest);
    let bundle = result.bundle.unwrap();
    assert_eq!(bundle.trust_domain, "example.org");
    assert_eq!(bundle.x509_authorities.len(), 1);
    let info = SvidInfo::from_der(&result.svid_chain[0]).unwrap();
    assert_eq!(info.spiffe_id.to_string(), result.spiffe_id);
    Ok(Svid {
        spiffe_id: result.spiffe_id,
        cert: result.svid_chain[0].clone(),
        key,
    })
}

async fn next(stream: &mut Streaming<SyncResponse>) -> Result<Option<SyncResponse>, tonic::Status> {
    tokio::time::timeout(WAIT, stream.message())
        .await
        .expect("no sync message in time")
}

fn sign_request(entry_id: &str, csr: Vec<u8>) -> SignX509Request {
    SignX509Request {
        items: vec![X509SignItem {
            entry_id: entry_id.into(),
            csr,
            task_id: "task-1".into(),
        }],
    }
}

#[tokio::test]
async fn attest_sync_sign_mint_and_ban() {
    let t = TestServer::start().await;

    // The server proves the SPIFFE identity the contract names.
    let (mut anon, verifier) = t.client(None).await;
    let token = t.create_token(None).await;
    let agent = attest(&mut anon, &token).await.unwrap();
    assert_eq!(verifier.seen.lock().unwrap().as_deref(), Some(SERVER_ID));
    assert!(
        agent
            .spiffe_id
            .starts_with("spiffe://example.org/mayfly/agent/join_token/")
    );
    assert!(
        !agent.spiffe_id.contains(&token),
        "the secret is not the id"
    );

    // A token works once.
    let err = attest(&mut anon, &token).await.err().unwrap();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(
        err.message(),
        "join token is invalid, expired or already used"
    );

    // Without a client certificate only Attest is served.
    let err = anon
        .sign_x509(sign_request("x", new_key_and_csr().unwrap().csr_der))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = anon.sync(SyncRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);

    let (mut client, _) = t.client(Some(&agent)).await;
    let first = t
        .add_entry("spiffe://example.org/web", &agent.spiffe_id)
        .await;
    let theirs = t
        .add_entry(
            "spiffe://example.org/db",
            "spiffe://example.org/mayfly/agent/join_token/someone-else",
        )
        .await;

    // Sync: a full snapshot with only this agent's entries, then deltas.
    let mut sync = client.sync(SyncRequest {}).await.unwrap().into_inner();
    let snapshot = next(&mut sync).await.unwrap().unwrap();
    assert!(snapshot.full);
    let ids: Vec<&str> = snapshot.upserted.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, [first.as_str()]);
    assert!(snapshot.bundle.is_some());

    let second = t
        .add_entry("spiffe://example.org/api", &agent.spiffe_id)
        .await;
    let delta = next(&mut sync).await.unwrap().unwrap();
    assert!(!delta.full);
    let ids: Vec<&str> = delta.upserted.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, [second.as_str()]);
    assert!(delta.revision > snapshot.revision);

    {
        let state = Arc::clone(t.state());
        let id: EntryId = first.parse().unwrap();
        tokio::task::spawn_blocking(move || state.remove_entry(&id))
            .await
            .unwrap()
            .unwrap();
    }
    let delta = next(&mut sync).await.unwrap().unwrap();
    assert!(!delta.full && delta.upserted.is_empty());
    assert_eq!(delta.removed_entry_ids, std::slice::from_ref(&first));

    // SignX509: identity and DNS names from the entry.
    let key = new_key_and_csr().unwrap();
    let resp = client
        .sign_x509(sign_request(&second, key.csr_der.clone()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.results.len(), 1);
    let result = &resp.results[0];
    assert_eq!(result.entry_id, second);
    assert_eq!(result.svid_chain.len(), 1);
    let (_, cert) = x509_parser::parse_x509_certificate(&result.svid_chain[0]).unwrap();
    let san = cert.subject_alternative_name().unwrap().unwrap().value;
    assert!(matches!(
        san.general_names.as_slice(),
        [
            GeneralName::URI("spiffe://example.org/api"),
            GeneralName::DNSName("web.example.org")
        ]
    ));
    assert_eq!(
        uri_sans(&result.svid_chain[0]),
        ["spiffe://example.org/api"]
    );
    assert_eq!(result.expires_at, cert.validity().not_after.timestamp());
    let authorities = t.state().authorities.snapshot();
    let (_, ca) =
        x509_parser::parse_x509_certificate(authorities.active_x509().unwrap().1.cert_der())
            .unwrap();
    cert.verify_signature(Some(ca.public_key())).unwrap();

    // Another agent's entry, a removed entry, and a bad CSR are refused.
    let err = client
        .sign_x509(sign_request(&theirs, key.csr_der.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains(&theirs), "{}", err.message());
    let err = client
        .sign_x509(sign_request(&first, key.csr_der.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = client
        .sign_x509(sign_request(&second, b"garbage".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // MintJwt.
    let jwt = client
        .mint_jwt(MintJwtRequest {
            entry_id: second.clone(),
            audience: vec!["db".into()],
            task_id: "task-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let bundle = t.state().bundle();
    let valid = mayfly::jwt::validate(&jwt.token, "db", &[&bundle], t.state().now()).unwrap();
    assert_eq!(valid.spiffe_id.to_string(), "spiffe://example.org/api");
    assert_eq!(valid.expires_at, jwt.expires_at);
    let err = client
        .mint_jwt(MintJwtRequest {
            entry_id: second.clone(),
            audience: vec![],
            task_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = client
        .mint_jwt(MintJwtRequest {
            entry_id: theirs.clone(),
            audience: vec!["db".into()],
            task_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // Ban: the open stream ends and every call is refused.
    {
        let state = Arc::clone(t.state());
        let id = agent.spiffe_id.clone();
        tokio::task::spawn_blocking(move || {
            let mut node = state.store.get_node(&id).unwrap().unwrap();
            node.banned = true;
            state.store.put_node(&node).unwrap();
            state.notify_node(&id);
        })
        .await
        .unwrap();
    }
    let err = next(&mut sync).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(err.message(), "agent is banned");
    let err = client
        .sign_x509(sign_request(&second, key.csr_der.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(err.message(), "agent is banned");

    t.server.shutdown();
    tokio::time::timeout(Duration::from_secs(15), t.server.wait())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn renewal_supersedes_the_old_svid_and_eviction_needs_attestation() {
    let t = TestServer::start().await;
    let (mut anon, _) = t.client(None).await;
    let old = attest(&mut anon, &t.create_token(None).await)
        .await
        .unwrap();
    let entry = t
        .add_entry("spiffe://example.org/web", &old.spiffe_id)
        .await;

    let (mut old_client, _) = t.client(Some(&old)).await;
    let key = new_key_and_csr().unwrap();
    let renewed = old_client
        .renew(RenewRequest {
            csr: key.csr_der.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let info = SvidInfo::from_der(&renewed.svid_chain[0]).unwrap();
    assert_eq!(info.spiffe_id.to_string(), old.spiffe_id);
    let new = Svid {
        spiffe_id: old.spiffe_id.clone(),
        cert: renewed.svid_chain[0].clone(),
        key,
    };

    // Until the new SVID is used, the old one still works.
    let csr = new_key_and_csr().unwrap().csr_der;
    old_client
        .sign_x509(sign_request(&entry, csr.clone()))
        .await
        .unwrap();
    let (mut new_client, _) = t.client(Some(&new)).await;
    new_client
        .sign_x509(sign_request(&entry, csr.clone()))
        .await
        .unwrap();
    let err = old_client
        .sign_x509(sign_request(&entry, csr.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(err.message(), "agent SVID has been superseded");
    let err = old_client
        .renew(RenewRequest { csr: csr.clone() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = new_client
        .renew(RenewRequest {
            csr: b"garbage".to_vec(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // Eviction: the stream ends and calls need a new attestation.
    let mut sync = new_client.sync(SyncRequest {}).await.unwrap().into_inner();
    assert!(next(&mut sync).await.unwrap().unwrap().full);
    {
        let state = Arc::clone(t.state());
        let id = new.spiffe_id.clone();
        tokio::task::spawn_blocking(move || {
            state.store.delete_node(&id).unwrap().unwrap();
            state.notify_node(&id);
        })
        .await
        .unwrap();
    }
    let err = next(&mut sync).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(err.message(), "agent is not attested; attest again");
    let err = new_client
        .sign_x509(sign_request(&entry, csr))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn aliases_tokens_and_server_identity() {
    let t = TestServer::start().await;

    // A client that expects another identity refuses the server.
    assert!(
        t.client_expecting(None, "spiffe://example.org/not-the-server")
            .await
            .is_err()
    );

    // An agent enrolled with an alias receives the alias's entries.
    let (mut anon, _) = t.client(None).await;
    let alias = "spiffe://example.org/cluster/blue";
    let agent = attest(&mut anon, &t.create_token(Some(alias)).await)
        .await
        .unwrap();
    let via_alias = t.add_entry("spiffe://example.org/batch", alias).await;
    let (mut client, _) = t.client(Some(&agent)).await;
    let mut sync = client.sync(SyncRequest {}).await.unwrap().into_inner();
    let snapshot = next(&mut sync).await.unwrap().unwrap();
    let ids: Vec<&str> = snapshot.upserted.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, [via_alias.as_str()]);
    client
        .sign_x509(sign_request(&via_alias, new_key_and_csr().unwrap().csr_der))
        .await
        .unwrap();

    // Unknown attestors, garbage CSRs and garbage tokens are refused; a bad
    // CSR does not burn the token.
    let token = t.create_token(None).await;
    let err = anon
        .attest(futures::stream::iter([AttestRequest {
            step: Some(attest_request::Step::Params(AttestParams {
                attestor: "join_token".into(),
                payload: token.as_bytes().to_vec(),
                csr: b"garbage".to_vec(),
            })),
        }]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = anon
        .attest(futures::stream::iter([AttestRequest {
            step: Some(attest_request::Step::Params(AttestParams {
                attestor: "tpm".into(),
                payload: vec![],
                csr: new_key_and_csr().unwrap().csr_der,
            })),
        }]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = attest(&mut anon, "0123").await.err().unwrap();
    assert_eq!(err.code(), Code::PermissionDenied);
    attest(&mut anon, &token).await.unwrap();

    // Shutting down ends open streams instead of waiting for them.
    t.server.shutdown();
    let err = next(&mut sync).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    tokio::time::timeout(Duration::from_secs(15), t.server.wait())
        .await
        .unwrap()
        .unwrap();
}

/// Whether `stream` sends nothing for 300 ms.
async fn quiet(stream: &mut Streaming<SyncResponse>) -> bool {
    tokio::time::timeout(Duration::from_millis(300), stream.message())
        .await
        .is_err()
}

/// Streams wake only for changes under their agent or its aliases (the
/// change feed's targeting): each agent gets its own changes live, a move
/// between parents reaches both sides, and another agent's change sends
/// nothing.
#[tokio::test]
async fn live_changes_reach_exactly_the_agents_they_concern() {
    let t = TestServer::start().await;
    let (mut anon, _) = t.client(None).await;
    let alias_a = "spiffe://example.org/node/a";
    let alias_b = "spiffe://example.org/node/b";
    let a = attest(&mut anon, &t.create_token(Some(alias_a)).await)
        .await
        .unwrap();
    let b = attest(&mut anon, &t.create_token(Some(alias_b)).await)
        .await
        .unwrap();
    let (mut client_a, _) = t.client(Some(&a)).await;
    let (mut client_b, _) = t.client(Some(&b)).await;
    let mut sync_a = client_a.sync(SyncRequest {}).await.unwrap().into_inner();
    let mut sync_b = client_b.sync(SyncRequest {}).await.unwrap().into_inner();
    assert!(
        next(&mut sync_a)
            .await
            .unwrap()
            .unwrap()
            .upserted
            .is_empty()
    );
    assert!(
        next(&mut sync_b)
            .await
            .unwrap()
            .unwrap()
            .upserted
            .is_empty()
    );

    // Under A's alias and under A itself: A only.
    let e1 = t.add_entry("spiffe://example.org/w1", alias_a).await;
    let d = next(&mut sync_a).await.unwrap().unwrap();
    assert!(!d.full);
    assert_eq!(d.upserted.len(), 1);
    assert_eq!(d.upserted[0].id, e1);
    let e2 = t.add_entry("spiffe://example.org/w2", &a.spiffe_id).await;
    let d = next(&mut sync_a).await.unwrap().unwrap();
    assert_eq!(d.upserted[0].id, e2);
    assert!(quiet(&mut sync_b).await, "B was sent A's changes");

    // Moved from A's alias to B's: removed at A, added at B.
    let state = Arc::clone(t.state());
    let moved = tokio::task::spawn_blocking(move || {
        let mut e = state.get_entry(&e1.parse().unwrap()).unwrap();
        e.parent_id = mayfly::SpiffeId::new(alias_b).unwrap();
        state.upsert_entry(e).unwrap()
    })
    .await
    .unwrap();
    let d = next(&mut sync_a).await.unwrap().unwrap();
    assert_eq!(d.removed_entry_ids, [moved.id.to_string()]);
    let d = next(&mut sync_b).await.unwrap().unwrap();
    assert_eq!(d.upserted[0].id, moved.id.to_string());

    // Someone else's entry: nobody hears of it.
    t.add_entry("spiffe://example.org/w3", "spiffe://example.org/node/c")
        .await;
    assert!(quiet(&mut sync_a).await && quiet(&mut sync_b).await);
}

/// Whether `cert` (DER) is signed by the CA `ca` (DER).
fn signed_by(cert: &[u8], ca: &[u8]) -> bool {
    let (_, cert) = x509_parser::parse_x509_certificate(cert).unwrap();
    let (_, ca) = x509_parser::parse_x509_certificate(ca).unwrap();
    cert.verify_signature(Some(ca.public_key())).is_ok()
}

/// The next Sync message that carries a bundle.
async fn next_bundle(stream: &mut Streaming<SyncResponse>) -> mayfly::proto::node::Bundle {
    loop {
        let msg = next(stream).await.unwrap().unwrap();
        if let Some(b) = msg.bundle {
            return b;
        }
    }
}

async fn blocking<T: Send + 'static>(
    state: &Arc<ServerState>,
    f: impl FnOnce(&ServerState) -> T + Send + 'static,
) -> T {
    let state = Arc::clone(state);
    tokio::task::spawn_blocking(move || f(&state))
        .await
        .unwrap()
}

/// An agent attested under the first CA keeps working across a rotation:
/// the prepared CA reaches it before it signs, its old-CA SVID is still
/// accepted after activation (old and new connections alike), new SVIDs
/// chain to the new CA, the server's own certificate moves to the new CA,
/// and taint and revoke reach it through Sync.
#[tokio::test]
async fn an_agent_keeps_working_across_an_authority_rotation() {
    let t = TestServer::start().await;
    let (mut anon, _) = t.client(None).await;
    let token = t.create_token(None).await;
    let agent = attest(&mut anon, &token).await.unwrap();
    // A second agent that never renews: only the TLS layer can refuse it
    // once its CA is revoked.
    let token = t.create_token(None).await;
    let idle = attest(&mut anon, &token).await.unwrap();
    let ca1 = t.state().bundle().x509_authorities[0].clone();
    assert!(signed_by(&agent.cert, &ca1));
    let entry = t
        .add_entry("spiffe://example.org/web", &agent.spiffe_id)
        .await;

    let (mut client, _) = t.client(Some(&agent)).await;
    let mut sync = client.sync(SyncRequest {}).await.unwrap().into_inner();
    let snapshot = next(&mut sync).await.unwrap().unwrap();
    let b = snapshot.bundle.unwrap();
    assert_eq!(b.x509_authorities, std::slice::from_ref(&ca1));
    let seq1 = b.sequence;

    // Prepare: the agent gets both CAs before the new one signs anything.
    let prepared = blocking(t.state(), |s| s.prepare_authority(Kind::X509))
        .await
        .unwrap();
    let b = next_bundle(&mut sync).await;
    assert_eq!(b.x509_authorities.len(), 2);
    assert_eq!(b.x509_authorities[0], ca1);
    assert!(b.sequence > seq1);
    assert!(b.tainted_x509_authorities.is_empty());
    let ca2 = b.x509_authorities[1].clone();
    let key = new_key_and_csr().unwrap();
    let resp = client
        .sign_x509(sign_request(&entry, key.csr_der.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(
        signed_by(&resp.results[0].svid_chain[0], &ca1),
        "a prepared CA signs nothing"
    );

    // Activate: the same connection keeps working, and signs with CA2.
    let active = blocking(t.state(), |s| s.activate_authority(Kind::X509))
        .await
        .unwrap();
    assert_eq!(active.id, prepared.id);
    let b = next_bundle(&mut sync).await;
    assert_eq!(b.x509_authorities, [ca1.clone(), ca2.clone()]);
    let resp = client
        .sign_x509(sign_request(&entry, key.csr_der.clone()))
        .await
        .unwrap()
        .into_inner();
    let svid = &resp.results[0].svid_chain[0];
    assert!(signed_by(svid, &ca2));
    let info = SvidInfo::from_der(svid).unwrap();
    assert!(info.not_after <= active.not_after);

    // A new connection with the agent's CA1 SVID is accepted (CA1 is still
    // among the verifier's roots), and the server soon presents an SVID
    // from CA2.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (mut fresh, verifier) = t.client(Some(&agent)).await;
        let mut stream = fresh.sync(SyncRequest {}).await.unwrap().into_inner();
        let first = next(&mut stream).await.unwrap().unwrap();
        assert_eq!(first.bundle.unwrap().x509_authorities.len(), 2);
        fresh
            .sign_x509(sign_request(&entry, key.csr_der.clone()))
            .await
            .unwrap();
        let server_cert = verifier.seen_cert.lock().unwrap().clone().unwrap();
        if signed_by(&server_cert, &ca2) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server SVID was not re-issued from the new CA"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Taint the old CA: the agent learns it through Sync.
    let old_id = t.state().list_authorities(Kind::X509)[0].id.clone();
    let id = old_id.clone();
    let tainted = blocking(t.state(), move |s| s.taint_authority(Kind::X509, &id))
        .await
        .unwrap();
    assert!(tainted.tainted);
    let b = next_bundle(&mut sync).await;
    assert_eq!(b.tainted_x509_authorities, std::slice::from_ref(&ca1));
    assert_eq!(b.x509_authorities.len(), 2);

    // The agent replaces its SVID (now from CA2), then the old CA is revoked:
    // the bundle loses it, and its SVIDs no longer get in.
    let renew_key = new_key_and_csr().unwrap();
    let renewed = client
        .renew(RenewRequest {
            csr: renew_key.csr_der.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(signed_by(&renewed.svid_chain[0], &ca2));
    let renewed = Svid {
        spiffe_id: agent.spiffe_id.clone(),
        cert: renewed.svid_chain[0].clone(),
        key: renew_key,
    };
    // The agent reconnects with its renewed SVID.
    let (mut renewed_client, _) = t.client(Some(&renewed)).await;
    let mut renewed_sync = renewed_client
        .sync(SyncRequest {})
        .await
        .unwrap()
        .into_inner();
    next(&mut renewed_sync).await.unwrap().unwrap();
    // A connection (and a Sync stream) the idle agent opened before the
    // revocation.
    let (mut idle_client, _) = t.client(Some(&idle)).await;
    let mut idle_sync = idle_client.sync(SyncRequest {}).await.unwrap().into_inner();
    next(&mut idle_sync).await.unwrap().unwrap();
    let id = old_id.clone();
    blocking(t.state(), move |s| s.revoke_authority(Kind::X509, &id))
        .await
        .unwrap();
    let b = next_bundle(&mut renewed_sync).await;
    assert_eq!(b.x509_authorities, std::slice::from_ref(&ca2));
    assert!(b.tainted_x509_authorities.is_empty());
    let pem_text = std::fs::read_to_string(t.server.bundle_path()).unwrap();
    assert_eq!(pem::parse_many(pem_text).unwrap().len(), 1);

    // The open connection outlives the revocation, but its stream and
    // calls do not.
    let err = loop {
        match next(&mut idle_sync).await {
            Ok(Some(_)) => {}
            Ok(None) => panic!("the stream ended without a status"),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("no longer trusted"),
        "{}",
        err.message()
    );
    let err = idle_client.sync(SyncRequest {}).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(
        err.message().contains("no longer trusted"),
        "{}",
        err.message()
    );
    let (mut new_client, _) = t.client(Some(&renewed)).await;
    new_client
        .sign_x509(sign_request(&entry, key.csr_der.clone()))
        .await
        .unwrap();
    // The verifier follows the bundle asynchronously: poll until the
    // revoked CA's SVID is refused on a new connection, by TLS (the idle
    // agent's record is fine: the node API itself would let it in).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let refused = match t.client_expecting(Some(&idle), SERVER_ID).await {
            Err(_) => true,
            Ok((mut c, _)) => match c.sync(SyncRequest {}).await {
                Ok(_) => false,
                Err(status) => {
                    assert!(
                        !matches!(
                            status.code(),
                            Code::Unauthenticated | Code::PermissionDenied
                        ),
                        "refused by the node API rather than TLS: {status:?}"
                    );
                    true
                }
            },
        };
        if refused {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "an SVID of a revoked CA still gets in"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    t.server.shutdown();
}

/// A plain HTTP/1.0 GET on the public listener: (status line, headers, body).
async fn http_get(addr: SocketAddr, path: &str) -> (String, String, Vec<u8>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: mayfly\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8(raw[..split].to_vec()).unwrap();
    let (status, headers) = head.split_once("\r\n").unwrap_or((&head, ""));
    (
        status.to_owned(),
        headers.to_ascii_lowercase(),
        raw[split + 4..].to_vec(),
    )
}

/// The next Sync message that carries revocations.
async fn next_revocations(stream: &mut Streaming<SyncResponse>) -> SyncResponse {
    loop {
        let msg = next(stream).await.unwrap().unwrap();
        if !msg.revocations.is_empty() {
            return msg;
        }
    }
}

/// Task-scoped revocation end to end: an agent signs SVIDs for two tasks,
/// reports one ended; its serial reaches every agent's Sync and the CRL
/// served over HTTP, the other task's does not, and no agent can revoke
/// another's credentials.
#[tokio::test]
async fn task_end_revokes_through_sync_and_the_crl() {
    let t = TestServer::start().await;
    let (mut anon, _) = t.client(None).await;
    let agent_a = attest(&mut anon, &t.create_token(None).await)
        .await
        .unwrap();
    let agent_b = attest(&mut anon, &t.create_token(None).await)
        .await
        .unwrap();
    let entry = t
        .add_entry("spiffe://example.org/web", &agent_a.spiffe_id)
        .await;
    let (mut a, _) = t.client(Some(&agent_a)).await;
    let (mut b, _) = t.client(Some(&agent_b)).await;

    let mut sync_a = a.sync(SyncRequest {}).await.unwrap().into_inner();
    let mut sync_b = b.sync(SyncRequest {}).await.unwrap().into_inner();
    let full_a = next(&mut sync_a).await.unwrap().unwrap();
    assert!(full_a.full && full_a.revocations.is_empty());
    assert_eq!(
        full_a.crls.len(),
        1,
        "one CRL per X.509 authority, even empty"
    );
    next(&mut sync_b).await.unwrap().unwrap();

    let item = |task: &str| X509SignItem {
        entry_id: entry.clone(),
        csr: new_key_and_csr().unwrap().csr_der,
        task_id: task.into(),
    };
    let resp = a
        .sign_x509(SignX509Request {
            items: vec![item("t1"), item("t2")],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.results[0].task_id, "t1");
    assert_eq!(resp.results[1].task_id, "t2");
    let serial = |der: &[u8]| {
        let (_, c) = x509_parser::parse_x509_certificate(der).unwrap();
        hex::encode(c.raw_serial())
    };
    let s1 = serial(&resp.results[0].svid_chain[0]);
    let s2 = serial(&resp.results[1].svid_chain[0]);

    // Agent B reporting A's serial revokes nothing.
    let report = |task: &str, serials: Vec<String>| ReportTaskEndRequest {
        tasks: vec![TaskEnd {
            task_id: task.into(),
            x509_serials: serials,
            jwt_ids: vec![],
            reason: "task_ended".into(),
            ended_at: 0,
        }],
    };
    let n = b
        .report_task_end(report("t1", vec![s1.clone()]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n.revoked, 0);

    // A reports t1: revoked once, idempotently.
    let n = a
        .report_task_end(report("t1", vec![s1.clone()]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n.revoked, 1);
    let n = a
        .report_task_end(report("t1", vec![s1.clone()]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(n.revoked, 0);

    for sync in [&mut sync_a, &mut sync_b] {
        let delta = next_revocations(sync).await;
        assert!(!delta.full);
        let serials: Vec<&str> = delta
            .revocations
            .iter()
            .map(|r| r.serial.as_str())
            .collect();
        assert_eq!(serials, [s1.as_str()]);
        assert_eq!(delta.revocations[0].reason, "task_ended");
        assert_eq!(delta.crls.len(), 1);
    }

    // The CRL over HTTP lists t1's serial and not t2's, signed by the CA.
    let authorities = t.state().authorities.snapshot();
    let (id, ca) = authorities.active_x509().unwrap();
    let http = t.server.http_addr();
    let (status, headers, body) = http_get(http, &format!("/crl/{id}")).await;
    assert!(status.contains("200"), "{status}");
    assert!(
        headers.contains("content-type: application/pkix-crl"),
        "{headers}"
    );
    let (_, crl) = x509_parser::parse_x509_crl(&body).unwrap();
    let (_, ca_cert) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
    crl.verify_signature(ca_cert.public_key()).unwrap();
    let listed: Vec<String> = crl
        .iter_revoked_certificates()
        .map(|r| hex::encode(r.raw_serial()))
        .collect();
    assert_eq!(listed, std::slice::from_ref(&s1));
    assert!(!listed.contains(&s2));

    let (status, _, _) = http_get(http, "/crl/0000").await;
    assert!(status.contains("404"), "{status}");
    let (status, headers, body) = http_get(http, "/bundle").await;
    assert!(status.contains("200") && headers.contains("application/json"));
    let bundle: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert!(bundle["keys"].is_array());
    assert!(http_get(http, "/healthz").await.0.contains("200"));
    assert!(http_get(http, "/readyz").await.0.contains("200"));

    // A new Sync stream gets the revocation in its full snapshot.
    let mut again = b.sync(SyncRequest {}).await.unwrap().into_inner();
    let full = next(&mut again).await.unwrap().unwrap();
    assert!(full.full);
    assert_eq!(full.revocations.len(), 1);
    assert_eq!(full.revocations[0].serial, s1);
}
