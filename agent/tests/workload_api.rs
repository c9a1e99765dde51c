//! The Workload API over a real Unix socket, with the Rust `spiffe` crate as the client.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: failing loudly is the point

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mayfly::bundle::TrustBundle;
use mayfly::entry::{Entry, EntryId, EntrySpec};
use mayfly::jwt::{JwtClaims, JwtSigningKey};
use mayfly::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use mayfly::proto::workload::{JwtsvidRequest, ValidateJwtsvidRequest, X509svidRequest};
use mayfly::x509::{CaParams, SvidParams, VerifiedCsr, X509Authority, new_key_and_csr};
use mayfly::{SpiffeId, TrustDomain};
use mayfly_agent::api::{self, JwtMinter, WorkloadApi};
use mayfly_agent::cache::{Cache, CachedSvid};
use mayfly_agent::workload::UnixAttestor;
use spiffe::{JwtSvid, WorkloadApiClient, X509Source};
use time::OffsetDateTime;
use tokio::sync::oneshot;
use tonic::Code;

const TD: &str = "example.org";
const AGENT: &str = "spiffe://example.org/mayfly/agent/join_token/t1";

fn td() -> TrustDomain {
    TrustDomain::new(TD).unwrap()
}

fn uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn entry(spiffe_id: &str, selectors: &[String], hint: &str) -> Entry {
    EntrySpec {
        spiffe_id: spiffe_id.into(),
        parent_id: AGENT.into(),
        selectors: selectors.to_vec(),
        hint: hint.into(),
        ..Default::default()
    }
    .validate(&td(), EntryId::random(), 1)
    .unwrap()
}

fn mint_svid(ca: &X509Authority, entry: &Entry, ttl: time::Duration) -> CachedSvid {
    let key = new_key_and_csr().unwrap();
    let csr = VerifiedCsr::from_der(&key.csr_der).unwrap();
    let cert = ca
        .sign_svid(
            &csr,
            &SvidParams {
                spiffe_id: &entry.spiffe_id,
                dns_names: &[],
                ttl,
            },
            OffsetDateTime::now_utc(),
        )
        .unwrap();
    CachedSvid {
        entry_id: entry.id.clone(),
        spiffe_id: entry.spiffe_id.clone(),
        chain_der: vec![cert.der],
        key_pkcs8: key.key_pkcs8,
        not_before: OffsetDateTime::now_utc() - time::Duration::seconds(10),
        expires_at: cert.not_after,
        received_at: OffsetDateTime::now_utc(),
        hint: entry.hint.clone(),
    }
}

/// Mints JWT-SVIDs locally, as the server would.
struct LocalMinter {
    key: JwtSigningKey,
    cache: Cache,
}

#[tonic::async_trait]
impl JwtMinter for LocalMinter {
    async fn mint_jwt(
        &self,
        entry_id: &EntryId,
        audience: &[String],
    ) -> Result<(String, i64), tonic::Status> {
        let snap = self.cache.current();
        let entry = snap
            .entries
            .get(entry_id)
            .ok_or_else(|| tonic::Status::permission_denied("unknown entry"))?;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let claims = JwtClaims {
            sub: entry.spiffe_id.to_string(),
            aud: audience.to_vec(),
            exp: now + 300,
            iat: now,
            jti: uuid::Uuid::new_v4().to_string(),
            iss: None,
        };
        let token = self
            .key
            .mint(&claims)
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok((token, claims.exp))
    }
}

struct Agent {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    cache: Cache,
    ca: X509Authority,
    stop: Option<oneshot::Sender<()>>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Agent {
    /// An agent whose cache holds one entry with `selectors`, its SVID and the bundle.
    async fn start(selectors: &[String]) -> Self {
        Self::start_with(selectors, None).await
    }

    async fn start_with(selectors: &[String], pending_wait: Option<Duration>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent/api.sock");
        let now = OffsetDateTime::now_utc();
        let ca = X509Authority::generate(
            &CaParams {
                trust_domain: td(),
                ttl: time::Duration::hours(1),
                subject: "Mayfly test".into(),
            },
            now,
        )
        .unwrap();
        let jwt_key = JwtSigningKey::generate().unwrap();
        let mut bundle = TrustBundle::new(td());
        bundle.x509_authorities.push(ca.cert_der().to_vec());
        bundle
            .jwt_authorities
            .push(jwt_key.authority(None).unwrap());
        let web = entry("spiffe://example.org/web", selectors, "web");
        let svid = mint_svid(&ca, &web, time::Duration::minutes(30));
        let cache = Cache::new();
        cache.update(|s| {
            s.ready = true;
            s.bundle = Some(Arc::new(bundle));
            s.svids.insert(web.id.clone(), Arc::new(svid));
            s.entries.insert(web.id.clone(), Arc::new(web));
        });
        let minter = Arc::new(LocalMinter {
            key: jwt_key,
            cache: cache.clone(),
        });
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = stop_rx.await;
        };
        let server = match pending_wait {
            None => tokio::spawn({
                let socket = socket.clone();
                let cache = cache.clone();
                async move { api::serve(&socket, cache, minter, td(), shutdown).await }
            }),
            Some(wait) => tokio::spawn({
                let socket = socket.clone();
                let api =
                    WorkloadApi::new(cache.clone(), Arc::new(UnixAttestor::new()), minter, td())
                        .with_pending_wait(wait);
                async move { api::serve_api(&socket, api, shutdown).await }
            }),
        };
        wait_for_socket(&socket).await;
        Self {
            _dir: dir,
            socket,
            cache,
            ca,
            stop: Some(stop_tx),
            server,
        }
    }

    fn endpoint(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    async fn raw_client(&self) -> SpiffeWorkloadApiClient<tonic::transport::Channel> {
        SpiffeWorkloadApiClient::new(api::connect(&self.socket).await.unwrap())
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.server)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
        assert!(!self.socket.exists(), "socket removed on shutdown");
    }
}

async fn wait_for_socket(path: &Path) {
    for _ in 0..500 {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the Workload API socket never came up");
}

fn my_uid_selector() -> Vec<String> {
    vec![format!("unix:uid:{}", uid())]
}

/// Verifies that `leaf_der` is signed by one of `cas_der` and currently valid.
fn assert_chain_verifies(leaf_der: &[u8], cas_der: &[&[u8]]) {
    let (_, leaf) = x509_parser::parse_x509_certificate(leaf_der).unwrap();
    assert!(leaf.validity().is_valid(), "leaf is within its validity");
    let verified = cas_der.iter().any(|ca| {
        let (_, ca) = x509_parser::parse_x509_certificate(ca).unwrap();
        leaf.issuer() == ca.subject() && leaf.verify_signature(Some(ca.public_key())).is_ok()
    });
    assert!(verified, "the leaf verifies to a bundle CA");
}

#[tokio::test]
async fn spiffe_client_gets_x509_and_jwt_svids() {
    let agent = Agent::start(&my_uid_selector()).await;
    let client = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();

    // X.509-SVID, verified against the bundle.
    let svid = client.fetch_x509_svid().await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/web");
    assert_eq!(svid.hint(), Some("web"));
    let bundles = client.fetch_x509_bundles().await.unwrap();
    let bundle = bundles.get(&td()).expect("bundle for example.org");
    let cas: Vec<&[u8]> = bundle.authorities().iter().map(|c| c.as_bytes()).collect();
    assert_eq!(cas, vec![agent.ca.cert_der()]);
    assert_chain_verifies(svid.leaf().as_bytes(), &cas);

    // The X.509 context carries the bundle keyed by trust domain.
    let ctx = client.fetch_x509_context().await.unwrap();
    assert_eq!(ctx.svids().len(), 1);
    assert!(ctx.bundle_set().get(&td()).is_some());

    // X509Source.
    let source = X509Source::builder()
        .endpoint(agent.endpoint())
        .build()
        .await
        .unwrap();
    assert_eq!(
        source.svid().unwrap().spiffe_id().to_string(),
        "spiffe://example.org/web"
    );
    source.shutdown().await;

    // JWT-SVID, validated offline with the JWT bundle and by the agent.
    let jwt = client.fetch_jwt_svid(["service-b"], None).await.unwrap();
    assert_eq!(jwt.spiffe_id().to_string(), "spiffe://example.org/web");
    let jwt_bundles = client.fetch_jwt_bundles().await.unwrap();
    let offline = JwtSvid::parse_and_validate(jwt.token(), &jwt_bundles, &["service-b"]).unwrap();
    assert_eq!(offline.spiffe_id().to_string(), "spiffe://example.org/web");
    let online = client
        .validate_jwt_token("service-b", jwt.token())
        .await
        .unwrap();
    assert_eq!(online.spiffe_id().to_string(), "spiffe://example.org/web");
    // Wrong audience: refused by the agent.
    assert!(
        client
            .validate_jwt_token("someone-else", jwt.token())
            .await
            .is_err()
    );
    let mut raw = agent.raw_client().await;
    let err = raw
        .validate_jwtsvid(api::request(ValidateJwtsvidRequest {
            audience: "someone-else".into(),
            svid: jwt.token().into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("someone-else"), "{}", err.message());

    // Asking for a specific identity the caller has works; one it lacks is refused.
    let web = SpiffeId::new("spiffe://example.org/web").unwrap();
    let by_id = client.fetch_jwt_svid(["a"], Some(&web)).await.unwrap();
    assert_eq!(by_id.spiffe_id(), &web);
    let err = raw
        .fetch_jwtsvid(api::request(JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: "spiffe://example.org/db".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = raw
        .fetch_jwtsvid(api::request(JwtsvidRequest {
            audience: vec![],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    agent.stop().await;
}

#[tokio::test]
async fn request_without_security_header_is_invalid_argument() {
    let agent = Agent::start(&my_uid_selector()).await;
    let mut raw = agent.raw_client().await;
    let err = raw
        .fetch_x509svid(tonic::Request::new(X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "security header missing from request");
    let err = raw
        .fetch_jwtsvid(tonic::Request::new(JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    agent.stop().await;
}

#[tokio::test]
async fn caller_without_matching_entry_is_permission_denied() {
    let other_uid = uid().wrapping_add(1);
    let agent = Agent::start(&[format!("unix:uid:{other_uid}")]).await;
    let mut raw = agent.raw_client().await;
    // Errors on streams arrive as the response status.
    let err = raw
        .fetch_x509svid(api::request(X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert_eq!(err.message(), "no identity issued");
    let err = raw
        .fetch_jwtsvid(api::request(JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // The spiffe crate sees the same.
    let client = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    assert!(client.fetch_x509_svid().await.is_err());
    assert!(client.fetch_x509_bundles().await.is_err());
    agent.stop().await;
}

#[tokio::test]
async fn not_ready_agent_is_unavailable() {
    let agent = Agent::start(&my_uid_selector()).await;
    agent.cache.update(|s| s.ready = false);
    let mut raw = agent.raw_client().await;
    let err = raw
        .fetch_x509svid(api::request(X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    agent.stop().await;
}

#[tokio::test]
async fn open_stream_receives_new_svids_without_reconnecting() {
    let agent = Agent::start(&my_uid_selector()).await;
    let mut raw = agent.raw_client().await;
    let mut stream = raw
        .fetch_x509svid(api::request(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(first.svids.len(), 1);
    assert_eq!(first.svids[0].spiffe_id, "spiffe://example.org/web");

    // A second matching entry and its SVID arrive in the cache.
    let api_entry = entry("spiffe://example.org/api", &my_uid_selector(), "api");
    let svid = mint_svid(&agent.ca, &api_entry, time::Duration::minutes(30));
    agent.cache.update(|s| {
        s.svids.insert(api_entry.id.clone(), Arc::new(svid));
        s.entries.insert(api_entry.id.clone(), Arc::new(api_entry));
    });
    let second = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("update pushed")
        .unwrap()
        .unwrap();
    let mut ids: Vec<&str> = second.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        ["spiffe://example.org/api", "spiffe://example.org/web"]
    );
    for s in &second.svids {
        assert_chain_verifies(&s.x509_svid, &[agent.ca.cert_der()]);
        assert_eq!(s.bundle, agent.ca.cert_der());
    }

    // A change that does not concern this caller sends nothing.
    agent.cache.update(|s| s.revision += 1);
    assert!(
        tokio::time::timeout(Duration::from_millis(300), stream.message())
            .await
            .is_err(),
        "no resend without a change"
    );

    // Every matching entry removed: the stream ends with PermissionDenied.
    agent.cache.update(|s| s.entries.clear());
    let end = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("stream ends")
        .unwrap_err();
    assert_eq!(end.code(), Code::PermissionDenied);
    agent.stop().await;
}

#[tokio::test]
async fn expired_svids_are_never_sent() {
    let agent = Agent::start_with(&my_uid_selector(), Some(Duration::from_millis(300))).await;
    // The cached SVID is past its expiry (as if rotation had failed).
    agent.cache.update(|s| {
        for svid in s.svids.values_mut() {
            let mut expired = CachedSvid {
                entry_id: svid.entry_id.clone(),
                spiffe_id: svid.spiffe_id.clone(),
                chain_der: svid.chain_der.clone(),
                key_pkcs8: svid.key_pkcs8.clone(),
                not_before: svid.not_before,
                expires_at: OffsetDateTime::now_utc() - time::Duration::seconds(1),
                received_at: svid.received_at,
                hint: svid.hint.clone(),
            };
            expired.hint.push_str("-expired");
            *svid = Arc::new(expired);
        }
    });
    let mut raw = agent.raw_client().await;
    let mut stream = raw
        .fetch_x509svid(api::request(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let err = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .expect("stream answers")
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(
        err.message(),
        "no valid SVID; the agent cannot reach the server"
    );
    agent.stop().await;
}

#[tokio::test]
async fn shutdown_ends_open_streams() {
    let agent = Agent::start(&my_uid_selector()).await;
    let mut raw = agent.raw_client().await;
    let mut stream = raw
        .fetch_x509svid(api::request(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap().unwrap();
    // `stop` waits (bounded) for the server to return and checks the socket is removed.
    agent.stop().await;
    let end = stream.message().await;
    assert!(
        !matches!(end, Ok(Some(_))),
        "no further message after shutdown"
    );
}

/// Runs the real `mayfly-agent` binary against the agent's socket.
async fn cli(args: &[&str], socket_env: Option<String>) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_mayfly-agent"));
    cmd.args(args).env_remove("SPIFFE_ENDPOINT_SOCKET");
    if let Some(endpoint) = socket_env {
        cmd.env("SPIFFE_ENDPOINT_SOCKET", endpoint);
    }
    tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("the CLI finishes")
        .unwrap()
}

#[tokio::test]
async fn cli_fetches_writes_and_validates() {
    use std::os::unix::fs::PermissionsExt as _;
    let agent = Agent::start(&my_uid_selector()).await;
    let socket = agent.socket.display().to_string();
    let out_dir = tempfile::tempdir().unwrap();
    let out_path = out_dir.path().display().to_string();

    // fetch x509 --write, socket from SPIFFE_ENDPOINT_SOCKET in the unix:/// form.
    let out = cli(
        &["api", "fetch", "x509", "--write", &out_path],
        Some(format!("unix://{socket}")),
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("spiffe://example.org/web"), "{text}");
    let cert = std::fs::read_to_string(out_dir.path().join("svid.0.pem")).unwrap();
    let leaf = pem::parse(&cert).unwrap();
    assert_chain_verifies(leaf.contents(), &[agent.ca.cert_der()]);
    let bundle = pem::parse(std::fs::read(out_dir.path().join("bundle.0.pem")).unwrap()).unwrap();
    assert_eq!(bundle.contents(), agent.ca.cert_der());
    let key_path = out_dir.path().join("svid.0.key");
    let key = pem::parse(std::fs::read(&key_path).unwrap()).unwrap();
    assert_eq!(key.tag(), "PRIVATE KEY");
    let mode = std::fs::metadata(&key_path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);

    // fetch jwt --output json, then validate it.
    let out = cli(
        &[
            "api",
            "fetch",
            "jwt",
            "--audience",
            "svc",
            "--socket-path",
            &socket,
            "--output",
            "json",
        ],
        None,
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["svids"][0]["spiffe_id"], "spiffe://example.org/web");
    let token = doc["svids"][0]["svid"].as_str().unwrap().to_owned();
    let out = cli(
        &[
            "api",
            "validate",
            "jwt",
            "--audience",
            "svc",
            "--svid",
            &token,
            "--socket-path",
            &socket,
            "--output",
            "json",
        ],
        None,
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["spiffe_id"], "spiffe://example.org/web");
    assert_eq!(doc["claims"]["aud"], serde_json::json!(["svc"]));
    assert!(doc["claims"]["exp"].is_i64());

    // A wrong audience: exit code 1 and the reason on stderr.
    let out = cli(
        &[
            "api",
            "validate",
            "jwt",
            "--audience",
            "other",
            "--svid",
            &token,
            "--socket-path",
            &socket,
        ],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.starts_with("error: ValidateJWTSVID:"), "{err}");
    assert!(err.contains("InvalidArgument"), "{err}");

    // No agent on the socket: exit code 1.
    let out = cli(
        &[
            "api",
            "fetch",
            "x509",
            "--socket-path",
            "/nonexistent/api.sock",
        ],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot connect"));
    agent.stop().await;
}

#[tokio::test]
async fn jwt_svids_are_reused_and_every_bundle_key_validates_until_it_is_removed() {
    use mayfly::proto::workload::JwtBundlesRequest;
    let agent = Agent::start(&my_uid_selector()).await;
    let raw = agent.raw_client().await;
    let fetch = |audience: &[&str]| {
        let mut raw = raw.clone();
        let audience: Vec<String> = audience.iter().map(|a| (*a).to_owned()).collect();
        async move {
            raw.fetch_jwtsvid(api::request(JwtsvidRequest {
                audience,
                spiffe_id: String::new(),
            }))
            .await
            .unwrap()
            .into_inner()
            .svids
            .remove(0)
            .svid
        }
    };
    // Reused per (entry, audience set), whatever the order.
    let first = fetch(&["b", "a"]).await;
    assert_eq!(fetch(&["a", "b"]).await, first);
    assert_eq!(fetch(&["b", "a", "a"]).await, first);
    assert_ne!(fetch(&["c"]).await, first);

    let mut jwt_bundles = raw
        .clone()
        .fetch_jwt_bundles(api::request(JwtBundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let keys_in = |msg: &mayfly::proto::workload::JwtBundlesResponse| {
        let jwks: serde_json::Value =
            serde_json::from_slice(msg.bundles.values().next().unwrap()).unwrap();
        jwks["keys"].as_array().unwrap().len()
    };
    assert_eq!(keys_in(&jwt_bundles.message().await.unwrap().unwrap()), 1);

    // The server prepares a second JWT key: it is pushed, and its tokens validate, as do the
    // first key's.
    let key2 = JwtSigningKey::generate().unwrap();
    let original = agent.cache.current().bundle.clone().unwrap();
    let mut two = (*original).clone();
    two.jwt_authorities.push(key2.authority(None).unwrap());
    two.sequence += 1;
    agent
        .cache
        .update(|s| s.bundle = Some(Arc::new(two.clone())));
    assert_eq!(keys_in(&jwt_bundles.message().await.unwrap().unwrap()), 2);
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let by_key2 = key2
        .mint(&JwtClaims {
            sub: "spiffe://example.org/web".into(),
            aud: vec!["x".into()],
            exp: now + 300,
            iat: now,
            jti: uuid::Uuid::new_v4().to_string(),
            iss: None,
        })
        .unwrap();
    let validate = |token: String, audience: &str| {
        let mut raw = raw.clone();
        let audience = audience.to_owned();
        async move {
            raw.validate_jwtsvid(api::request(ValidateJwtsvidRequest {
                audience,
                svid: token,
            }))
            .await
        }
    };
    assert!(validate(by_key2.clone(), "x").await.is_ok());
    assert!(validate(first.clone(), "a").await.is_ok());

    // key2 is revoked (removed from the bundle): its tokens are refused.
    agent.cache.update(|s| s.bundle = Some(original.clone()));
    assert_eq!(keys_in(&jwt_bundles.message().await.unwrap().unwrap()), 1);
    let err = validate(by_key2, "x").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // The first key is tainted: its cached JWT-SVIDs are not handed out again.
    let mut tainted = (*original).clone();
    tainted.tainted_jwt_key_ids = vec![tainted.jwt_authorities[0].key_id.clone()];
    tainted.sequence += 2;
    agent.cache.update(|s| s.bundle = Some(Arc::new(tainted)));
    assert_ne!(fetch(&["a", "b"]).await, first, "a new JWT-SVID was minted");
    agent.stop().await;
}

#[tokio::test]
async fn a_revoked_jti_is_rejected_and_not_served_and_crls_reach_both_x509_streams() {
    use mayfly::proto::workload::X509BundlesRequest;
    let agent = Agent::start(&my_uid_selector()).await;
    let raw = agent.raw_client().await;
    let fetch = || {
        let mut raw = raw.clone();
        async move {
            raw.fetch_jwtsvid(api::request(JwtsvidRequest {
                audience: vec!["db".into()],
                spiffe_id: String::new(),
            }))
            .await
            .unwrap()
            .into_inner()
            .svids
            .remove(0)
            .svid
        }
    };
    let validate = |token: String| {
        let mut raw = raw.clone();
        async move {
            raw.validate_jwtsvid(api::request(ValidateJwtsvidRequest {
                audience: "db".into(),
                svid: token,
            }))
            .await
        }
    };
    let token = fetch().await;
    assert!(validate(token.clone()).await.is_ok());
    let jti = api::token_jti(&token).unwrap();
    let far = OffsetDateTime::now_utc().unix_timestamp() + 3600;
    agent
        .cache
        .update(|s| s.revocations.add_jti(jti.clone(), far));
    let refused = validate(token.clone()).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(refused.message(), "token revoked");
    // The cached token is not handed out again: a new one is minted.
    let fresh = fetch().await;
    assert_ne!(api::token_jti(&fresh).unwrap(), jti);
    assert!(validate(fresh).await.is_ok());

    // CRLs: empty at first, then each change is pushed on both X.509 streams.
    let mut svids = raw
        .clone()
        .fetch_x509svid(api::request(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let mut bundles = raw
        .clone()
        .fetch_x509_bundles(api::request(X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    assert!(svids.message().await.unwrap().unwrap().crl.is_empty());
    assert!(bundles.message().await.unwrap().unwrap().crl.is_empty());
    agent
        .cache
        .update(|s| s.crls = Arc::new(vec![b"crl-1".to_vec()]));
    assert_eq!(
        svids.message().await.unwrap().unwrap().crl,
        vec![b"crl-1".to_vec()]
    );
    assert_eq!(
        bundles.message().await.unwrap().unwrap().crl,
        vec![b"crl-1".to_vec()]
    );
    agent.stop().await;
}
