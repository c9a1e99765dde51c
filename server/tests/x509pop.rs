//! The x509pop node attestor, step-up and rate limits through the real node
//! API (TLS sockets, tonic client), in process.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: failing loudly is the point

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
use mayfly::entry::{Assurance, EntryId, EntrySpec};
use mayfly::proto::node::node_client::NodeClient;
use mayfly::proto::node::{
    AttestParams, AttestRequest, AttestResult, MintJwtRequest, SignX509Request, X509PopEvidence,
    X509SignItem, attest_request, attest_response,
};
use mayfly::x509::{KeyAndCsr, new_key_and_csr};
use mayfly::x509pop::AgentPath;
use mayfly_server::config::{RateLimitConfig, ServerConfig, X509PopConfig};
use mayfly_server::run::{RunningServer, run};
use mayfly_server::state::ServerState;
use prost::Message as _;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

mod support;

const WAIT: Duration = Duration::from_secs(10);

struct Node {
    chain: Vec<Vec<u8>>,
    key: KeyPair,
}

struct Pki {
    ca_cert: rcgen::Certificate,
    ca_key: KeyPair,
}

impl Pki {
    fn new(name: &str) -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = p.self_signed(&ca_key).unwrap();
        Self { ca_cert, ca_key }
    }

    fn node(&self, cn: &str) -> Node {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec![format!("{cn}.example.org")]).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        let issuer = rcgen::Issuer::from_ca_cert_der(self.ca_cert.der(), &self.ca_key).unwrap();
        let cert = p.signed_by(&key, &issuer).unwrap();
        Node {
            chain: vec![cert.der().to_vec()],
            key,
        }
    }
}

struct TestServer {
    server: RunningServer,
    pki: Pki,
    _dir: tempfile::TempDir,
}

impl TestServer {
    async fn start(limits: RateLimitConfig) -> Self {
        Self::start_with_path(limits, Default::default()).await
    }

    async fn start_with_path(limits: RateLimitConfig, agent_path: AgentPath) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new("node-ca");
        let ca_path = dir.path().join("node-ca.pem");
        std::fs::write(&ca_path, pki.ca_cert.pem()).unwrap();
        let mut config = ServerConfig::development();
        config.data_dir = dir.path().join("data");
        config.bind_address = "127.0.0.1:0".parse().unwrap();
        config.http_address = "127.0.0.1:0".parse().unwrap();
        config.admin_socket_path = dir.path().join("admin.sock");
        config.x509pop = Some(X509PopConfig {
            ca_bundle_path: ca_path,
            agent_path,
        });
        config.rate_limits = limits;
        let server = run(config, std::future::pending()).await.unwrap();
        Self {
            server,
            pki,
            _dir: dir,
        }
    }

    fn state(&self) -> &Arc<ServerState> {
        self.server.state()
    }

    fn addr(&self) -> SocketAddr {
        self.server.node_addr()
    }

    async fn client(&self, identity: Option<&Svid>) -> NodeClient<Channel> {
        support::node_client(
            self.addr(),
            identity.map(|svid| (svid.cert.clone(), svid.key.key_pkcs8.to_vec())),
        )
        .await
    }

    async fn add_entry(&self, spiffe_id: &str, parent: &str, max_age: Option<&str>) -> String {
        let spec = EntrySpec {
            spiffe_id: spiffe_id.into(),
            parent_id: parent.into(),
            selectors: vec!["unix:uid:1000".into()],
            max_attestation_age: max_age.map(str::to_owned),
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

    fn node_record(&self, id: &str) -> mayfly_server::store::NodeRecord {
        self.state().store.get_node(id).unwrap().unwrap()
    }
}

struct Svid {
    spiffe_id: String,
    cert: Vec<u8>,
    key: KeyAndCsr,
    result: AttestResult,
}

/// How the test agent answers the challenge.
enum Answer {
    Honest,
    OtherChallenge,
}

async fn attest_x509pop(
    client: &mut NodeClient<Channel>,
    node: &Node,
    answer: Answer,
) -> Result<Svid, tonic::Status> {
    let key = new_key_and_csr().unwrap();
    let (tx, rx) = mpsc::channel(2);
    tx.send(AttestRequest {
        step: Some(attest_request::Step::Params(AttestParams {
            attestor: "x509pop".into(),
            payload: X509PopEvidence {
                chain: node.chain.clone(),
            }
            .encode_to_vec(),
            csr: key.csr_der.clone(),
        })),
    })
    .await
    .unwrap();
    let mut responses = client.attest(ReceiverStream::new(rx)).await?.into_inner();
    loop {
        let msg = tokio::time::timeout(WAIT, responses.message())
            .await
            .unwrap()?
            .unwrap();
        match msg.step.unwrap() {
            attest_response::Step::Challenge(challenge) => {
                assert_eq!(challenge.len(), 32);
                let signed_over = match answer {
                    Answer::Honest => challenge.clone(),
                    Answer::OtherChallenge => vec![0; 32],
                };
                let pair = EcdsaKeyPair::from_pkcs8(
                    &ECDSA_P256_SHA256_ASN1_SIGNING,
                    &node.key.serialize_der(),
                )
                .unwrap();
                let sig = pair
                    .sign(
                        &aws_lc_rs::rand::SystemRandom::new(),
                        &mayfly::x509pop::signed_message(&signed_over, &key.csr_der),
                    )
                    .unwrap();
                tx.send(AttestRequest {
                    step: Some(attest_request::Step::ChallengeResponse(
                        sig.as_ref().to_vec(),
                    )),
                })
                .await
                .unwrap();
            }
            attest_response::Step::Result(result) => {
                return Ok(Svid {
                    spiffe_id: result.spiffe_id.clone(),
                    cert: result.svid_chain[0].clone(),
                    key,
                    result,
                });
            }
        }
    }
}

fn sign_items(entry_id: &str, n: usize) -> SignX509Request {
    SignX509Request {
        items: (0..n)
            .map(|_| X509SignItem {
                entry_id: entry_id.into(),
                csr: new_key_and_csr().unwrap().csr_der,
                task_id: String::new(),
            })
            .collect(),
    }
}

fn generous() -> RateLimitConfig {
    RateLimitConfig::default()
}

#[tokio::test]
async fn attest_reattest_keeps_the_id_and_refreshes_the_record() {
    let t = TestServer::start(generous()).await;
    let node = t.pki.node("node1");
    let mut anon = t.client(None).await;
    let first = attest_x509pop(&mut anon, &node, Answer::Honest)
        .await
        .unwrap();
    let expected = mayfly::x509pop::agent_id(t.state().trust_domain(), &node.chain[0]).unwrap();
    assert_eq!(first.spiffe_id, expected.to_string());
    assert!(first.result.can_reattest);
    let selectors: Vec<String> = first
        .result
        .node_selectors
        .iter()
        .map(|s| format!("{}:{}", s.r#type, s.value))
        .collect();
    assert!(
        selectors.contains(&"x509pop:subject:cn:node1".to_owned()),
        "{selectors:?}"
    );
    assert!(selectors.contains(&"x509pop:san:dns:node1.example.org".to_owned()));
    let ca_fp = mayfly::x509pop::fingerprint(t.pki.ca_cert.der());
    assert!(selectors.contains(&format!("x509pop:ca:fingerprint:{ca_fp}")));
    let rec1 = t.node_record(&first.spiffe_id);
    assert_eq!(rec1.assurance, Assurance::High);
    assert_eq!(rec1.attestor, "x509pop");
    assert!(rec1.can_reattest);

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = attest_x509pop(&mut anon, &node, Answer::Honest)
        .await
        .unwrap();
    assert_eq!(
        second.spiffe_id, first.spiffe_id,
        "same certificate, same agent"
    );
    let rec2 = t.node_record(&second.spiffe_id);
    assert!(rec2.attested_at > rec1.attested_at, "attested_at refreshed");
    assert_ne!(rec2.current_serial, rec1.current_serial);

    // The first SVID is superseded by the re-attestation.
    let entry = t
        .add_entry("spiffe://example.org/web", &first.spiffe_id, None)
        .await;
    let err = t
        .client(Some(&first))
        .await
        .sign_x509(sign_items(&entry, 1))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "{err:?}");
    t.client(Some(&second))
        .await
        .sign_x509(sign_items(&entry, 1))
        .await
        .unwrap();
}

#[tokio::test]
async fn bad_evidence_and_proofs_are_refused() {
    let t = TestServer::start(generous()).await;
    let mut anon = t.client(None).await;
    // A certificate from a CA the server does not trust.
    let stranger = Pki::new("other-ca").node("node1");
    let err = attest_x509pop(&mut anon, &stranger, Answer::Honest)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("not trusted"), "{}", err.message());
    // The right certificate, but a signature over another challenge.
    let node = t.pki.node("node2");
    let err = attest_x509pop(&mut anon, &node, Answer::OtherChallenge)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("proof of possession"),
        "{}",
        err.message()
    );
    // An unknown attestor names the supported ones.
    let key = new_key_and_csr().unwrap();
    let req = AttestRequest {
        step: Some(attest_request::Step::Params(AttestParams {
            attestor: "tpm".into(),
            payload: vec![],
            csr: key.csr_der,
        })),
    };
    let err = anon
        .attest(futures::stream::iter([req]))
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message().contains("join_token and x509pop"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn step_up_asks_a_reattestable_agent_to_attest_again_and_bans_stick() {
    let t = TestServer::start(generous()).await;
    let node = t.pki.node("node1");
    let mut anon = t.client(None).await;
    let svid = attest_x509pop(&mut anon, &node, Answer::Honest)
        .await
        .unwrap();
    let entry = t
        .add_entry("spiffe://example.org/db", &svid.spiffe_id, Some("1s"))
        .await;
    let mut c = t.client(Some(&svid)).await;
    c.sign_x509(sign_items(&entry, 1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let err = c.sign_x509(sign_items(&entry, 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(err.metadata().get("mayfly-reattest").unwrap(), "required");
    assert!(
        err.message()
            .contains("requires a node attestation within 1s")
            && err.message().contains("attest again"),
        "{}",
        err.message()
    );
    let err = c
        .mint_jwt(MintJwtRequest {
            entry_id: entry.clone(),
            audience: vec!["a".into()],
            task_id: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    // Attest again: the entry is served.
    let again = attest_x509pop(&mut anon, &node, Answer::Honest)
        .await
        .unwrap();
    t.client(Some(&again))
        .await
        .sign_x509(sign_items(&entry, 1))
        .await
        .unwrap();

    // A banned node can never attest again.
    {
        let state = Arc::clone(t.state());
        let id = again.spiffe_id.clone();
        tokio::task::spawn_blocking(move || {
            state
                .update_node(&id, |n| {
                    n.banned = true;
                    Ok(())
                })
                .unwrap()
        })
        .await
        .unwrap();
    }
    let err = attest_x509pop(&mut anon, &node, Answer::Honest)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message()
            .contains("banned agents can never attest again"),
        "{}",
        err.message()
    );
}

#[tokio::test]
async fn rate_limits_answer_resource_exhausted_per_identity() {
    let t = TestServer::start(RateLimitConfig {
        attestations_per_minute: 2,
        signings_per_second: 1,
        signing_burst: 3,
    })
    .await;
    let mut anon = t.client(None).await;
    let node = t.pki.node("node1");
    attest_x509pop(&mut anon, &node, Answer::Honest)
        .await
        .unwrap();
    let svid = attest_x509pop(&mut anon, &node, Answer::Honest)
        .await
        .unwrap();
    let err = attest_x509pop(&mut anon, &node, Answer::Honest)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("exceeded 2 attestations per minute"),
        "{}",
        err.message()
    );
    // Another node (same address) has its own budget.
    let other = attest_x509pop(&mut anon, &t.pki.node("node2"), Answer::Honest)
        .await
        .unwrap();

    let entry = t
        .add_entry("spiffe://example.org/web", &svid.spiffe_id, None)
        .await;
    let mut c = t.client(Some(&svid)).await;
    c.sign_x509(sign_items(&entry, 3)).await.unwrap();
    let err = c.sign_x509(sign_items(&entry, 1)).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(
        err.message().contains("signings per second"),
        "{}",
        err.message()
    );
    let other_entry = t
        .add_entry("spiffe://example.org/web2", &other.spiffe_id, None)
        .await;
    t.client(Some(&other))
        .await
        .sign_x509(sign_items(&other_entry, 1))
        .await
        .unwrap();
}

#[tokio::test]
async fn an_agent_path_template_names_the_agent_by_its_common_name() {
    let t = TestServer::start_with_path(generous(), "node-{subject_cn}".parse().unwrap()).await;
    let mut anon = t.client(None).await;
    let svid = attest_x509pop(&mut anon, &t.pki.node("web-7"), Answer::Honest)
        .await
        .unwrap();
    assert_eq!(
        svid.spiffe_id,
        "spiffe://example.org/mayfly/agent/x509pop/node-web-7"
    );
    // A CN that cannot be a path segment is refused with the reason.
    let err = attest_x509pop(&mut anon, &t.pki.node("bad name"), Answer::Honest)
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("agent_path"), "{}", err.message());
}
