//! Policy at request time through the real node API (gRPC over mutual
//! TLS), with a manual clock: a business-hours policy over `SignX509` and
//! `MintJwt`, and step-up (`max_attestation_age`) answered with
//! `ReattestRequired` or `PolicyDenied` depending on the node.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: failing loudly is the point

use std::sync::Arc;
use std::time::Duration;

use mayfly::clock::ManualClock;
use mayfly::entry::{EntryId, EntrySpec};
use mayfly::proto::node::node_client::NodeClient;
use mayfly::proto::node::{
    AttestParams, AttestRequest, MintJwtRequest, SignX509Request, X509SignItem, attest_request,
    attest_response,
};
use mayfly::x509::{KeyAndCsr, new_key_and_csr};
use mayfly_server::authority::AuthorityManager;
use mayfly_server::config::ServerConfig;
use mayfly_server::node::status::REATTEST_METADATA;
use mayfly_server::policy::PolicySources;
use mayfly_server::run::{RunningServer, start};
use mayfly_server::state::ServerState;
use mayfly_server::store::sled_store::SledStore;
use time::OffsetDateTime;
use tonic::Code;
use tonic::transport::Channel;

mod support;

const WAIT: Duration = Duration::from_secs(10);

struct Agent {
    id: String,
    cert: Vec<u8>,
    key: KeyAndCsr,
}

struct TestServer {
    server: RunningServer,
    clock: ManualClock,
    dir: tempfile::TempDir,
}

impl TestServer {
    async fn start(start_at: OffsetDateTime) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = ServerConfig::development();
        config.data_dir = dir.path().join("data");
        config.bind_address = "127.0.0.1:0".parse().unwrap();
        config.http_address = "127.0.0.1:0".parse().unwrap();
        config.admin_socket_path = dir.path().join("admin.sock");
        config.agent_svid_ttl = "24h".parse().unwrap();
        config.ca_ttl = "72h".parse().unwrap();
        std::fs::create_dir_all(&config.data_dir).unwrap();
        let clock = ManualClock::new(start_at);
        let authorities = AuthorityManager::load_or_create(&config, start_at).unwrap();
        let store = SledStore::open(&config.data_dir.join("store")).unwrap();
        let state = ServerState::new(
            config,
            Arc::new(store),
            Arc::new(clock.clone()),
            authorities,
        )
        .unwrap();
        let server = start(Arc::new(state), std::future::pending())
            .await
            .unwrap();
        Self { server, clock, dir }
    }

    fn state(&self) -> &Arc<ServerState> {
        self.server.state()
    }

    fn use_policy(&self, text: &str) {
        let path = self.dir.path().join("local.cedar");
        std::fs::write(&path, text).unwrap();
        self.state()
            .policy
            .configure(PolicySources {
                paths: vec![path],
                default_policy: true,
            })
            .unwrap();
    }

    async fn client(&self, identity: Option<&Agent>) -> NodeClient<Channel> {
        support::node_client(
            self.server.node_addr(),
            identity.map(|a| (a.cert.clone(), a.key.key_pkcs8.to_vec())),
        )
        .await
    }

    async fn attest(&self) -> Agent {
        let state = Arc::clone(self.state());
        let (token, _) = tokio::task::spawn_blocking(move || state.create_join_token(None, None))
            .await
            .unwrap()
            .unwrap();
        let mut anon = self.client(None).await;
        let key = new_key_and_csr().unwrap();
        let req = AttestRequest {
            step: Some(attest_request::Step::Params(AttestParams {
                attestor: "join_token".into(),
                payload: token.to_string().into_bytes(),
                csr: key.csr_der.clone(),
            })),
        };
        let mut responses = anon
            .attest(futures::stream::iter([req]))
            .await
            .unwrap()
            .into_inner();
        let msg = tokio::time::timeout(WAIT, responses.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let Some(attest_response::Step::Result(result)) = msg.step else {
            panic!("expected a result, got {msg:?}");
        };
        Agent {
            id: result.spiffe_id,
            cert: result.svid_chain[0].clone(),
            key,
        }
    }

    async fn add_entry(&self, path: &str, parent: &str, max_age: Option<&str>) -> String {
        let entry = EntrySpec {
            spiffe_id: format!("spiffe://example.org{path}"),
            parent_id: parent.into(),
            selectors: vec!["unix:uid:1000".into()],
            max_attestation_age: max_age.map(Into::into),
            ..Default::default()
        }
        .validate(self.state().trust_domain(), EntryId::random(), 0)
        .unwrap();
        let state = Arc::clone(self.state());
        tokio::task::spawn_blocking(move || state.upsert_entry(entry))
            .await
            .unwrap()
            .unwrap()
            .id
            .to_string()
    }
}

async fn sign(client: &mut NodeClient<Channel>, entry: &str) -> Result<(), tonic::Status> {
    client
        .sign_x509(SignX509Request {
            items: vec![X509SignItem {
                entry_id: entry.into(),
                csr: new_key_and_csr().unwrap().csr_der,
                task_id: "task-1".into(),
            }],
        })
        .await
        .map(|_| ())
}

async fn mint(
    client: &mut NodeClient<Channel>,
    entry: &str,
    aud: &str,
) -> Result<i64, tonic::Status> {
    client
        .mint_jwt(MintJwtRequest {
            entry_id: entry.into(),
            audience: vec![aud.into()],
            task_id: "task-1".into(),
        })
        .await
        .map(|r| r.into_inner().expires_at)
}

/// The TLS layer checks certificates against the real time, so the manual
/// clock starts now; the "business hours" are the eight hours starting two
/// hours from now, so that the test denies, then allows after advancing.
#[tokio::test]
async fn business_hours_deny_then_allow_over_sign_x509_and_mint_jwt() {
    let t0 = OffsetDateTime::now_utc();
    let t = TestServer::start(t0).await;
    let open = (i64::from(t0.hour()) + 2) % 24;
    let hours: Vec<String> = (0..8).map(|i| ((open + i) % 24).to_string()).collect();
    t.use_policy(&format!(
        r#"@id("payments.business_hours")
forbid (principal is Mayfly::Workload, action, resource is Mayfly::Entry)
when {{ resource.spiffe_id like "spiffe://example.org/payments/*" && ![{}].contains(context.hour) }};

@id("vault.short_jwts")
@max_ttl("1m")
permit (principal is Mayfly::Workload, action == Mayfly::Action::"issue_jwt", resource)
when {{ context.audience.contains("vault") }};
"#,
        hours.join(", ")
    ));
    let agent = t.attest().await;
    let pay = t.add_entry("/payments/api", &agent.id, None).await;
    let web = t.add_entry("/web", &agent.id, None).await;
    let mut c = t.client(Some(&agent)).await;

    let err = sign(&mut c, &pay).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("payments.business_hours"),
        "{}",
        err.message()
    );
    let err = mint(&mut c, &pay, "db").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("payments.business_hours"),
        "{}",
        err.message()
    );
    sign(&mut c, &web)
        .await
        .expect("other entries are not affected");

    // The TTL cap of the permit that fired applies to the signed token.
    let now = t.state().now().unix_timestamp();
    let exp = mint(&mut c, &web, "vault").await.unwrap();
    assert!(exp - now <= 60, "capped to 1m: {}", exp - now);
    let exp = mint(&mut c, &web, "db").await.unwrap();
    assert!(exp - now > 60, "not capped: {}", exp - now);

    t.clock.advance(time::Duration::hours(2));
    sign(&mut c, &pay).await.expect("open now");
    mint(&mut c, &pay, "db").await.expect("open now");
}

#[tokio::test]
async fn a_stale_attestation_asks_to_reattest_only_agents_that_can() {
    let t0 = OffsetDateTime::now_utc();
    let t = TestServer::start(t0).await;
    let agent = t.attest().await;
    let fresh = t.add_entry("/vault", &agent.id, Some("10m")).await;
    let mut c = t.client(Some(&agent)).await;
    sign(&mut c, &fresh).await.expect("attested just now");

    t.clock.advance(time::Duration::minutes(11));
    // A join-token agent cannot prove itself again: PolicyDenied, saying how to fix it.
    let err = sign(&mut c, &fresh).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("join_token"), "{}", err.message());
    assert!(err.message().contains("x509pop"), "{}", err.message());
    assert!(err.metadata().get(REATTEST_METADATA).is_none());
    let err = mint(&mut c, &fresh, "db").await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    // A re-attestable agent is asked to attest again.
    let state = Arc::clone(t.state());
    let id = agent.id.clone();
    tokio::task::spawn_blocking(move || {
        state.update_node(&id, |n| {
            n.can_reattest = true;
            Ok(())
        })
    })
    .await
    .unwrap()
    .unwrap();
    let err = sign(&mut c, &fresh).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
    assert_eq!(
        err.metadata()
            .get(REATTEST_METADATA)
            .unwrap()
            .to_str()
            .unwrap(),
        "required"
    );
    let err = mint(&mut c, &fresh, "db").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
}
