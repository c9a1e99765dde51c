//! The `k8s` workload attestor and pod tasks against a real HTTPS server playing the kubelet's
//! `/pods` endpoint (rustls, a certificate from a CA made with rcgen, bearer token checked),
//! with a fake `/proc` pointing a test pid at a pod container's cgroup.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use mayfly::clock::SystemClock;
use mayfly::proto::node as pb;
use mayfly::selector::{Selector, SelectorSet};
use mayfly_agent::cache::Cache;
use mayfly_agent::client::ClientError;
use mayfly_agent::config::K8sConfig;
use mayfly_agent::task::registry::TaskJwt;
use mayfly_agent::task::report::TaskEndSink;
use mayfly_agent::task::service::TaskSigner;
use mayfly_agent::task::{PidfdWatcher, PodWatcher, TaskId, TaskWatchers, Tasks};
use mayfly_agent::workload::kubelet::{KubeletClient, KubeletError, PodLists};
use mayfly_agent::workload::{AttestError, K8sAttestor, PeerInfo, WorkloadAttestor};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair, SanType};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::watch;

const FIXTURE: &str = include_str!("data/kubelet-pods.json");
const POD: &str = "7f3c1a52-1b2e-4a55-9d1e-6c0e8f2b9a11";
const CID: &str = "4c5d8e2f9a1b3c7d6e0f2a4b8c1d3e5f7a9b0c2d4e6f8a1b3c5d7e9f0a2b4c6d";
const TOKEN: &str = "eyJhbGciOiJSUzI1NiJ9.agent-service-account.sig";
const PID: i32 = 4242;
const START: u64 = 987_654;

/// A CA and the PEM of its certificate.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        Self {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn write_pem(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, self.issuer.pem()).unwrap();
        path
    }

    /// A kubelet serving certificate as `serverTLSBootstrap` gets one: it names the node
    /// (its host name and IP), not the loopback address the agent dials in these tests.
    fn kubelet_cert(&self) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["worker-1".to_owned()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::IpAddress("10.0.3.17".parse().unwrap()));
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (
            cert.der().clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }
}

/// What the stand-in kubelet lists.
#[derive(Debug)]
struct Listing {
    /// The web container's ID is listed from this request on (1-based); before, it is being
    /// created.
    container_from: usize,
    /// The web pod is listed (false once it is deleted).
    pod_present: bool,
}

/// The stand-in kubelet.
struct Kubelet {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    listing: Arc<Mutex<Listing>>,
}

impl Kubelet {
    async fn start(ca: &Ca, container_from: usize) -> Self {
        let (chain, key) = ca.kubelet_cert();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![chain], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let listing = Arc::new(Mutex::new(Listing {
            container_from,
            pod_present: true,
        }));
        let (reqs, list) = (requests.clone(), listing.clone());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, reqs, list) = (acceptor.clone(), reqs.clone(), list.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let (reqs, list) = (reqs.clone(), list.clone());
                        async move { Ok::<_, std::convert::Infallible>(answer(&req, &reqs, &list)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            requests,
            listing,
        }
    }

    fn url(&self) -> http::Uri {
        format!("https://127.0.0.1:{}", self.addr.port())
            .parse()
            .unwrap()
    }

    fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    fn delete_pod(&self) {
        self.listing.lock().unwrap().pod_present = false;
    }
}

/// The kubelet's answer: 401 without the right bearer token, else the pod list.
fn answer(
    req: &http::Request<hyper::body::Incoming>,
    requests: &AtomicUsize,
    listing: &Mutex<Listing>,
) -> http::Response<Full<Bytes>> {
    let reply = |status: u16, body: String| {
        http::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    if req.uri().path() != "/pods" {
        return reply(404, "404 page not found".into());
    }
    let authorized = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == format!("Bearer {TOKEN}").as_bytes());
    if !authorized {
        return reply(401, "Unauthorized".into());
    }
    let n = requests.fetch_add(1, Ordering::SeqCst) + 1;
    let listing = listing.lock().unwrap();
    let mut list: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
    let items = list["items"].as_array_mut().unwrap();
    if !listing.pod_present {
        items.retain(|p| p["metadata"]["uid"] != POD);
    } else if n < listing.container_from {
        // The container is being created: no ID yet.
        for pod in items.iter_mut().filter(|p| p["metadata"]["uid"] == POD) {
            for c in pod["status"]["containerStatuses"].as_array_mut().unwrap() {
                if c["name"] == "web" {
                    c["containerID"] = serde_json::Value::Null;
                    c["imageID"] = "".into();
                    c["state"] = serde_json::json!({"waiting": {"reason": "ContainerCreating"}});
                }
            }
        }
    }
    reply(200, list.to_string())
}

/// A `/proc` with process `PID` in the web container of the pod (cgroup v2, systemd driver,
/// containerd).
fn fake_proc() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join(PID.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    let under = POD.replace('-', "_");
    std::fs::write(
        dir.join("cgroup"),
        format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{under}.slice/cri-containerd-{CID}.scope\n"
        ),
    )
    .unwrap();
    let filler: Vec<String> = (4..=21).map(|i| i.to_string()).collect();
    std::fs::write(
        dir.join("stat"),
        format!("{PID} (web) S {} {START} 0 0\n", filler.join(" ")),
    )
    .unwrap();
    root
}

fn peer() -> PeerInfo {
    PeerInfo {
        pid: PID,
        uid: 65532,
        gid: 65532,
        start_time: Some(START),
    }
}

/// Files of the agent's side: the kubelet CA it trusts and its token.
struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    fn new(trusted: &Ca, token: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        trusted.write_pem(dir.path(), "ca.crt");
        std::fs::write(dir.path().join("token"), format!("{token}\n")).unwrap();
        Self { dir }
    }

    fn config(&self, kubelet: &Kubelet, attempts: u32, insecure: bool) -> K8sConfig {
        K8sConfig {
            kubelet_url: kubelet.url(),
            kubelet_ca_path: self.dir.path().join("ca.crt"),
            insecure_skip_kubelet_verification: insecure,
            token_path: self.dir.path().join("token"),
            max_poll_attempts: attempts,
            poll_retry_interval: Duration::from_millis(50),
            node_name_env: "MAYFLY_NODE_NAME".into(),
            node_name: Some("worker-1".into()),
        }
    }
}

fn attestor(config: &K8sConfig, proc_root: &Path) -> K8sAttestor {
    let pods = Arc::new(PodLists::new(Arc::new(KubeletClient::new(config).unwrap())));
    K8sAttestor::new(pods, config.max_poll_attempts, config.poll_retry_interval)
        .with_proc_root(proc_root)
        .with_node_name(config.node_name.clone())
}

fn sel(s: &str) -> Selector {
    s.parse().unwrap()
}

#[tokio::test]
async fn a_container_that_appears_on_the_third_poll_is_attested() {
    let ca = Ca::new("kubelet-ca");
    let kubelet = Kubelet::start(&ca, 3).await;
    let files = Files::new(&ca, TOKEN);
    let proc = fake_proc();
    let got = attestor(&files.config(&kubelet, 10, false), proc.path())
        .attest(&peer())
        .await
        .unwrap();
    assert_eq!(kubelet.requests(), 3, "found on the third list, not before");
    for want in [
        "k8s:ns:payments",
        "k8s:sa:web",
        "k8s:pod-uid:7f3c1a52-1b2e-4a55-9d1e-6c0e8f2b9a11",
        "k8s:pod-name:web-6d4cf56db6-x2x7q",
        "k8s:node-name:worker-1",
        "k8s:pod-label:app:web",
        "k8s:pod-owner:ReplicaSet:web-6d4cf56db6",
        "k8s:pod-owner-uid:ReplicaSet:0e9b4a3c-5d2f-4c1b-8a7e-3f6d2c1b0a99",
        "k8s:container-name:web",
        "k8s:container-image:registry.example.com/payments/web:1.4.2",
    ] {
        assert!(got.contains(&sel(want)), "missing {want} in {got:?}");
    }
    assert!(!got.contains(&sel("k8s:container-name:envoy")));
}

#[tokio::test]
async fn a_container_never_listed_is_refused_after_the_attempts() {
    let ca = Ca::new("kubelet-ca");
    let kubelet = Kubelet::start(&ca, usize::MAX).await;
    let files = Files::new(&ca, TOKEN);
    let proc = fake_proc();
    let err = attestor(&files.config(&kubelet, 4, false), proc.path())
        .attest(&peer())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AttestError::NotInKubelet { pod_uid, container_id, attempts: 4 }
            if pod_uid == POD && container_id == CID),
        "{err}"
    );
    assert!(err.to_string().contains("max_poll_attempts"), "{err}");
    assert_eq!(kubelet.requests(), 4);
}

#[tokio::test]
async fn a_wrong_token_is_refused_and_the_token_is_read_at_every_request() {
    let ca = Ca::new("kubelet-ca");
    let kubelet = Kubelet::start(&ca, 1).await;
    let files = Files::new(&ca, "not-the-token");
    let proc = fake_proc();
    let config = files.config(&kubelet, 3, false);
    let pods = Arc::new(PodLists::new(Arc::new(
        KubeletClient::new(&config).unwrap(),
    )));
    let attestor =
        K8sAttestor::new(pods.clone(), 3, Duration::from_millis(50)).with_proc_root(proc.path());
    let err = attestor.attest(&peer()).await.unwrap_err();
    match &err {
        AttestError::Kubelet(KubeletError::Status { status: 401, .. }) => {}
        other => panic!("expected a 401 from the kubelet, got {other}"),
    }
    assert!(err.to_string().contains("token_path"), "{err}");
    assert!(
        !err.to_string().contains("not-the-token"),
        "the token is never shown: {err}"
    );
    // The projected token rotates: the new one is used on the next request (the failed list
    // is shared for a moment, then read again).
    std::fs::write(config.token_path.clone(), TOKEN).unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let got = attestor.attest(&peer()).await.unwrap();
    assert!(got.contains(&sel("k8s:sa:web")));
}

#[tokio::test]
async fn a_kubelet_certificate_from_another_ca_is_refused_unless_verification_is_skipped() {
    let kubelet_ca = Ca::new("kubelet-ca");
    let other_ca = Ca::new("some-other-ca");
    let kubelet = Kubelet::start(&kubelet_ca, 1).await;
    let files = Files::new(&other_ca, TOKEN);
    let proc = fake_proc();
    let err = attestor(&files.config(&kubelet, 2, false), proc.path())
        .attest(&peer())
        .await
        .unwrap_err();
    assert!(
        matches!(err, AttestError::Kubelet(KubeletError::Connect { .. })),
        "{err}"
    );
    assert_eq!(
        kubelet.requests(),
        0,
        "no request reaches an unverified kubelet"
    );
    let got = attestor(&files.config(&kubelet, 2, true), proc.path())
        .attest(&peer())
        .await
        .unwrap();
    assert!(got.contains(&sel("k8s:ns:payments")));
}

#[tokio::test]
async fn processes_outside_pods_and_pods_on_other_nodes() {
    let ca = Ca::new("kubelet-ca");
    let kubelet = Kubelet::start(&ca, 1).await;
    let files = Files::new(&ca, TOKEN);
    let proc = fake_proc();
    std::fs::write(
        proc.path().join(PID.to_string()).join("cgroup"),
        "0::/system.slice/api.service\n",
    )
    .unwrap();
    let got = attestor(&files.config(&kubelet, 2, false), proc.path())
        .attest(&peer())
        .await
        .unwrap();
    assert_eq!(got, SelectorSet::new(), "not in a pod: no k8s selectors");
    assert_eq!(kubelet.requests(), 0, "and no question to the kubelet");

    let proc = fake_proc();
    let mut config = files.config(&kubelet, 2, false);
    config.node_name = Some("worker-2".into());
    let err = attestor(&config, proc.path())
        .attest(&peer())
        .await
        .unwrap_err();
    assert!(matches!(err, AttestError::WrongNode { .. }), "{err}");
    // A recycled pid is refused before anything is asked.
    let err = attestor(&files.config(&kubelet, 2, false), proc.path())
        .attest(&PeerInfo {
            start_time: Some(START + 1),
            ..peer()
        })
        .await
        .unwrap_err();
    assert!(matches!(err, AttestError::PidReused { pid: PID }), "{err}");
}

/// Records `ReportTaskEnd`.
#[derive(Default)]
struct Server {
    reports: Mutex<Vec<pb::TaskEnd>>,
}

#[tonic::async_trait]
impl TaskSigner for Server {
    async fn sign_x509(
        &self,
        _items: Vec<pb::X509SignItem>,
    ) -> Result<Vec<pb::X509SignResult>, ClientError> {
        Ok(Vec::new())
    }
}

#[tonic::async_trait]
impl TaskEndSink for Server {
    async fn report_task_ends(&self, tasks: Vec<pb::TaskEnd>) -> Result<u32, ClientError> {
        let n = tasks.len() as u32;
        self.reports.lock().unwrap().extend(tasks);
        Ok(n)
    }
}

#[tokio::test]
async fn a_deleted_pod_ends_its_task_and_its_credentials_are_reported() {
    let ca = Ca::new("kubelet-ca");
    let kubelet = Kubelet::start(&ca, 1).await;
    let files = Files::new(&ca, TOKEN);
    let config = files.config(&kubelet, 2, false);
    let pods = Arc::new(PodLists::new(Arc::new(
        KubeletClient::new(&config).unwrap(),
    )));
    let watcher = TaskWatchers::new(vec![
        Arc::new(PidfdWatcher::new()),
        Arc::new(PodWatcher::with_interval(pods, Duration::from_millis(100))),
    ]);
    let cache = Cache::new();
    let server = Arc::new(Server::default());
    let data = tempfile::tempdir().unwrap();
    let tasks = Tasks::new(
        cache.clone(),
        Arc::new(watcher),
        server.clone(),
        data.path(),
        Arc::new(SystemClock),
    )
    .unwrap();
    let (stop, stop_rx) = watch::channel(false);
    let running = tokio::spawn(tasks.clone().run(stop_rx));

    let task = TaskId::pod(POD).unwrap();
    tasks.observe(&task);
    let entry: mayfly::entry::EntryId = "web".parse().unwrap();
    let mut kept = false;
    cache.update(|s| {
        kept = s.tasks.insert_jwt(
            &task,
            &entry,
            &["payments".to_owned()],
            TaskJwt {
                token: Arc::new(zeroize::Zeroizing::new("header.claims.sig".to_owned())),
                jti: "jti-of-the-pod".into(),
                reuse_until: i64::MAX,
            },
        );
    });
    assert!(kept);
    // Running: the task stays.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(cache.current().tasks.state(&task).is_some());
    assert!(kubelet.requests() >= 3, "the watcher polls the kubelet");

    kubelet.delete_pod();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if !server.reports.lock().unwrap().is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pod's end was not reported"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(cache.current().tasks.state(&task), None, "the task is over");
    let reports = server.reports.lock().unwrap().clone();
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].task_id, format!("k8s:{POD}"));
    assert_eq!(reports[0].jwt_ids, vec!["jti-of-the-pod".to_owned()]);
    assert_eq!(reports[0].reason, "task_ended");
    stop.send_replace(true);
    running.await.unwrap();
}
