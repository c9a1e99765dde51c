//! The k8s_psat node attestor, automatic pod identities and the bundle
//! ConfigMap, through the real node API (TLS sockets, tonic client), against
//! a local HTTPS server that answers the Kubernetes API as a real API server
//! does (`mayfly_e2e::fake_kube`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: failing loudly is the point

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mayfly::entry::Assurance;
use mayfly::proto::node::node_client::NodeClient;
use mayfly::proto::node::{
    AttestParams, AttestRequest, AttestResult, K8sPsatEvidence, SignX509Request, SyncRequest,
    X509SignItem, attest_request, attest_response,
};
use mayfly::x509::{KeyAndCsr, SvidInfo, new_key_and_csr};
use mayfly_e2e::fake_kube::{FakeKube, FakeToken};
use mayfly_server::config::ServerConfig;
use mayfly_server::run::{RunningServer, run};
use mayfly_server::state::ServerState;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic::transport::Channel;

mod support;

const WAIT: Duration = Duration::from_secs(10);
const NODE_UID: &str = "2f1e6b0c-8d1a-4c53-9d7e-5b3f0a9c1e21";
const AGENT_ID: &str =
    "spiffe://example.org/mayfly/agent/k8s_psat/test/2f1e6b0c-8d1a-4c53-9d7e-5b3f0a9c1e21";

struct Cluster {
    server: RunningServer,
    kube: FakeKube,
    _dir: tempfile::TempDir,
}

fn token(sa: (&str, &str), pod: (&str, &str), aud: &str, expired: bool) -> FakeToken {
    FakeToken {
        service_account: (sa.0.into(), sa.1.into()),
        pod: (pod.0.into(), pod.1.into()),
        audiences: vec![aud.into()],
        expired,
    }
}

impl Cluster {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let kube = FakeKube::start().unwrap();
        let kubeconfig = dir.path().join("kubeconfig");
        kube.write_kubeconfig(&kubeconfig).unwrap();
        kube.add_node(
            "node-1",
            NODE_UID,
            &[
                ("topology.kubernetes.io/zone", "zone-a"),
                ("kubernetes.io/hostname", "node-1"),
            ],
        );
        kube.add_pod(
            "mayfly",
            "mayfly-agent-x7k2p",
            "pod-uid-agent",
            "node-1",
            &[("app", "mayfly-agent"), ("pod-template-hash", "abc")],
        );
        kube.add_pod("default", "intruder", "pod-uid-intruder", "node-1", &[]);
        kube.add_token(
            "t-good-0d9e",
            token(
                ("mayfly", "mayfly-agent"),
                ("mayfly-agent-x7k2p", "pod-uid-agent"),
                "mayfly-server",
                false,
            ),
        );
        kube.add_token(
            "t-wrong-aud-91f2",
            token(
                ("mayfly", "mayfly-agent"),
                ("mayfly-agent-x7k2p", "pod-uid-agent"),
                "https://kubernetes.default.svc",
                false,
            ),
        );
        kube.add_token(
            "t-other-sa-c4d1",
            token(
                ("default", "default"),
                ("intruder", "pod-uid-intruder"),
                "mayfly-server",
                false,
            ),
        );
        kube.add_token(
            "t-expired-5e0b",
            token(
                ("mayfly", "mayfly-agent"),
                ("mayfly-agent-x7k2p", "pod-uid-agent"),
                "mayfly-server",
                true,
            ),
        );
        let text = format!(
            "[server]\ndata_dir = \"{data}\"\nbind_address = \"127.0.0.1:0\"\nhttp_address = \"127.0.0.1:0\"\nadmin_socket_path = \"{sock}\"\naudit_log_path = \"\"\n\
             [server.k8s_bundle]\nnamespace = \"mayfly\"\nconfigmap = \"mayfly-bundle\"\nkubeconfig_path = \"{kc}\"\n\
             [server.node_attestors.k8s_psat.clusters.test]\nservice_account_allow_list = [\"mayfly:mayfly-agent\"]\nkubeconfig_path = \"{kc}\"\n\
             allowed_node_label_keys = [\"topology.kubernetes.io/zone\"]\nallowed_pod_label_keys = [\"app\"]\n",
            data = dir.path().join("data").display(),
            sock = dir.path().join("admin.sock").display(),
            kc = kubeconfig.display(),
        );
        let config = ServerConfig::parse(&text, Path::new("server.toml")).unwrap();
        let server = run(config, std::future::pending()).await.unwrap();
        Self {
            server,
            kube,
            _dir: dir,
        }
    }

    fn state(&self) -> &Arc<ServerState> {
        self.server.state()
    }

    async fn anon(&self) -> NodeClient<Channel> {
        support::node_client(self.server.node_addr(), None).await
    }

    async fn as_agent(&self, svid: &Svid) -> NodeClient<Channel> {
        support::node_client(
            self.server.node_addr(),
            Some((svid.cert.clone(), svid.key.key_pkcs8.to_vec())),
        )
        .await
    }
}

struct Svid {
    cert: Vec<u8>,
    key: KeyAndCsr,
    result: AttestResult,
}

async fn attest(
    client: &mut NodeClient<Channel>,
    cluster: &str,
    token: &str,
) -> Result<Svid, tonic::Status> {
    let key = new_key_and_csr().unwrap();
    let (tx, rx) = mpsc::channel(2);
    tx.send(AttestRequest {
        step: Some(attest_request::Step::Params(AttestParams {
            attestor: "k8s_psat".into(),
            payload: K8sPsatEvidence {
                cluster: cluster.into(),
                token: token.into(),
            }
            .encode_to_vec(),
            csr: key.csr_der.clone(),
        })),
    })
    .await
    .unwrap();
    let mut responses = client.attest(ReceiverStream::new(rx)).await?.into_inner();
    let msg = tokio::time::timeout(WAIT, responses.message())
        .await
        .unwrap()?
        .unwrap();
    match msg.step.unwrap() {
        attest_response::Step::Result(result) => Ok(Svid {
            cert: result.svid_chain[0].clone(),
            key,
            result,
        }),
        attest_response::Step::Challenge(_) => panic!("k8s_psat sends no challenge"),
    }
}

fn sign(entry_id: &str) -> SignX509Request {
    SignX509Request {
        items: vec![X509SignItem {
            entry_id: entry_id.into(),
            csr: new_key_and_csr().unwrap().csr_der,
            task_id: "unix:4242:1".into(),
        }],
    }
}

#[tokio::test]
async fn a_valid_token_is_accepted_with_the_right_selectors() {
    let c = Cluster::start().await;
    let svid = attest(&mut c.anon().await, "test", "t-good-0d9e")
        .await
        .unwrap();
    assert_eq!(svid.result.spiffe_id, AGENT_ID);
    assert!(svid.result.can_reattest);
    let mut selectors: Vec<String> = svid
        .result
        .node_selectors
        .iter()
        .map(|s| format!("{}:{}", s.r#type, s.value))
        .collect();
    selectors.sort();
    assert_eq!(
        selectors,
        [
            "k8s_psat:agent_node_label:topology.kubernetes.io/zone:zone-a",
            "k8s_psat:agent_node_name:node-1",
            &format!("k8s_psat:agent_node_uid:{NODE_UID}"),
            "k8s_psat:agent_ns:mayfly",
            "k8s_psat:agent_pod_label:app:mayfly-agent",
            "k8s_psat:agent_pod_name:mayfly-agent-x7k2p",
            "k8s_psat:agent_pod_uid:pod-uid-agent",
            "k8s_psat:agent_sa:mayfly-agent",
            "k8s_psat:cluster:test",
        ],
        "labels outside the allowed keys are left out"
    );
    let record = c.state().store.get_node(AGENT_ID).unwrap().unwrap();
    assert_eq!(record.assurance, Assurance::Medium);
    assert_eq!(record.attestor, "k8s_psat");
    assert!(record.can_reattest);
    // The review asked for the configured audience.
    let reviews = c.kube.reviews();
    assert_eq!(reviews.len(), 1);
    assert_eq!(
        reviews[0]["spec"]["audiences"],
        serde_json::json!(["mayfly-server"])
    );

    // Attesting again (a fresh token, the same node) keeps the agent ID.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let again = attest(&mut c.anon().await, "test", "t-good-0d9e")
        .await
        .unwrap();
    assert_eq!(again.result.spiffe_id, AGENT_ID);
    let record2 = c.state().store.get_node(AGENT_ID).unwrap().unwrap();
    assert!(record2.attested_at > record.attested_at);
}

#[tokio::test]
async fn bad_tokens_and_agents_are_refused() {
    let c = Cluster::start().await;
    for (cluster, token, needle) in [
        ("test", "t-wrong-aud-91f2", "token audiences"),
        (
            "test",
            "t-other-sa-c4d1",
            "service account default:default is not in service_account_allow_list",
        ),
        (
            "test",
            "t-never-issued-aa77",
            "the cluster does not accept the token",
        ),
        ("test", "t-expired-5e0b", "has expired"),
        ("prod", "t-good-0d9e", "cluster \"prod\" is not configured"),
    ] {
        let err = attest(&mut c.anon().await, cluster, token)
            .await
            .err()
            .unwrap_or_else(|| panic!("{token} was accepted"));
        assert_eq!(err.code(), Code::PermissionDenied, "{token}: {err:?}");
        assert!(err.message().contains(needle), "{token}: {}", err.message());
        assert!(
            !err.message().contains(token),
            "the token is never echoed: {}",
            err.message()
        );
    }
    // The agent pod deleted: its token no longer authenticates.
    c.kube.delete_pod("mayfly", "mayfly-agent-x7k2p");
    let err = attest(&mut c.anon().await, "test", "t-good-0d9e")
        .await
        .err()
        .unwrap();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(c.state().store.get_node(AGENT_ID).unwrap().is_none());
}

#[tokio::test]
async fn pods_get_identities_from_the_template_without_registration() {
    let c = Cluster::start().await;
    let svid = attest(&mut c.anon().await, "test", "t-good-0d9e")
        .await
        .unwrap();
    let mut agent = c.as_agent(&svid).await;

    // The agent's full sync carries the cluster's template.
    let mut sync = agent.sync(SyncRequest {}).await.unwrap().into_inner();
    let first = tokio::time::timeout(WAIT, sync.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(first.full);
    assert_eq!(first.templates.len(), 1, "{:?}", first.templates);
    let t = &first.templates[0];
    assert_eq!(t.id, "k8s.test.0");
    assert_eq!(t.path, "ns/{namespace}/sa/{service_account}");

    let out = agent
        .sign_x509(sign("template:k8s.test.0:payments:api"))
        .await
        .unwrap()
        .into_inner();
    let info = SvidInfo::from_der(&out.results[0].svid_chain[0]).unwrap();
    assert_eq!(
        info.spiffe_id.to_string(),
        "spiffe://example.org/ns/payments/sa/api"
    );

    // Excluded namespaces, other templates and malformed names are refused.
    for id in [
        "template:k8s.test.0:kube-system:coredns",
        "template:k8s.test.1:payments:api",
        "template:k8s.other.0:payments:api",
        "template:k8s.test.0:Payments:api",
    ] {
        let err = agent.sign_x509(sign(id)).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{id}: {err:?}");
    }
}
