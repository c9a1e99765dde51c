//! Task-scoped credentials and their revocation when the task ends (issue 4),
//! with real server and agent processes:
//!
//! - two processes under one entry get their own keys and serials; when one
//!   exits its serial is in the CRLs (server `GET /crl/{id}`, the Workload
//!   API `crl` fields on its agent and on another agent) and the other's
//!   credential is untouched;
//! - a task's JWT-SVID fails `ValidateJWTSVID` on both agents once it exited;
//! - `mayfly-agent task complete --pid` revokes a live process's credential,
//!   and that process then gets `PermissionDenied`;
//! - the `crl_mtls_server` example refuses an ended task's certificate and
//!   keeps accepting a live client;
//! - a task that ends while the server is down is revoked once it returns,
//!   across an agent restart;
//! - revocations are pruned once the credential would have expired anyway.
//!
//! The "live" workloads are this test binary run again as a child in a
//! driven mode (`driven_workload`): it fetches on command, so the test
//! decides when it asks and sees exactly what it is answered. Short-lived
//! workloads are `mayfly-agent api fetch …`, which fetch and exit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::io::{BufRead as _, BufReader, Write as _};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use mayfly::proto::workload::{
    JwtsvidRequest, ValidateJwtsvidRequest, X509BundlesRequest, X509svidRequest,
};
use mayfly_e2e::{
    Agent, Server, bin, cert_serial, crls_serials, fetch_x509_child, free_port, my_uid,
    norm_serial, path_selector, raw_workload_client, revocations, server_crl_serials,
    start_server_with_http, with_header,
};

const TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// The driven workload (this binary as a child).

const DRIVEN_ENV: &str = "MAYFLY_E2E_DRIVEN_SOCKET";

/// Not a test on its own: when `MAYFLY_E2E_DRIVEN_SOCKET` is set, this is a
/// workload that reads commands on stdin (`fetch`, `quit`) and answers each
/// `fetch` with one `DRIVEN ok <spiffe_id> <serial> <spki_hex>` or
/// `DRIVEN err <code> <message>` line. Without the variable it does nothing.
#[test]
fn driven_workload() {
    let Ok(socket) = std::env::var(DRIVEN_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line.unwrap();
        match line.trim() {
            "fetch" => {
                let answer = rt.block_on(async {
                    match tokio::time::timeout(Duration::from_secs(10), driven_fetch(&socket)).await
                    {
                        Ok(a) => a,
                        Err(_) => "err Timeout no answer in 10 s".to_owned(),
                    }
                });
                println!("DRIVEN {answer}");
                std::io::stdout().flush().unwrap();
            }
            "quit" => break,
            _ => {}
        }
    }
}

async fn driven_fetch(socket: &str) -> String {
    let mut client = match raw_workload_client(Path::new(socket)).await {
        Ok(c) => c,
        Err(e) => return format!("err Connect {e}"),
    };
    let stream = client.fetch_x509svid(with_header(X509svidRequest {})).await;
    let first = match stream {
        Ok(s) => s.into_inner().message().await,
        Err(status) => Err(status),
    };
    match first {
        Ok(Some(msg)) => match msg.svids.first() {
            Some(svid) => {
                let leaf = split_first_cert(&svid.x509_svid);
                format!(
                    "ok {} {} {}",
                    svid.spiffe_id,
                    cert_serial(&leaf).unwrap(),
                    spki_hex(&leaf)
                )
            }
            None => "err Empty no SVID".to_owned(),
        },
        Ok(None) => "err Ended stream ended".to_owned(),
        Err(status) => format!(
            "err {:?} {}",
            status.code(),
            status.message().replace('\n', " ")
        ),
    }
}

/// The first certificate of concatenated DER.
fn split_first_cert(der: &[u8]) -> Vec<u8> {
    let (rest, _) = x509_parser::parse_x509_certificate(der).unwrap();
    der[..der.len() - rest.len()].to_vec()
}

/// The subject public key of a DER certificate, hex.
fn spki_hex(der: &[u8]) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.public_key()
        .raw
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// What a driven workload answered to `fetch`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Fetched {
    Ok {
        spiffe_id: String,
        serial: String,
        spki: String,
    },
    Err {
        code: String,
        message: String,
    },
}

/// A driven workload process, killed on drop.
struct Driven {
    child: Child,
    stdin: ChildStdin,
    out: BufReader<ChildStdout>,
}

impl Driven {
    fn start(socket: &Path) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "driven_workload",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(DRIVEN_ENV, socket)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        Self { child, stdin, out }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn fetch(&mut self) -> Fetched {
        writeln!(self.stdin, "fetch").unwrap();
        self.stdin.flush().unwrap();
        tokio::task::block_in_place(|| {
            loop {
                let mut line = String::new();
                assert!(
                    self.out.read_line(&mut line).unwrap() > 0,
                    "the driven workload exited"
                );
                // libtest may print `test driven_workload ... ` on the same line.
                let Some(at) = line.find("DRIVEN ") else {
                    continue;
                };
                let rest = line[at + "DRIVEN ".len()..].trim();
                let parts: Vec<&str> = rest.splitn(4, ' ').collect();
                return match parts.as_slice() {
                    ["ok", id, serial, spki] => Fetched::Ok {
                        spiffe_id: (*id).to_owned(),
                        serial: norm_serial(serial),
                        spki: (*spki).to_owned(),
                    },
                    ["err", code, msg @ ..] => Fetched::Err {
                        code: (*code).to_owned(),
                        message: msg.join(" "),
                    },
                    _ => panic!("unexpected driven answer {rest:?}"),
                };
            }
        })
    }

    /// Fetches until it gets an SVID (the first may wait for the agent to
    /// learn the entry).
    async fn fetch_svid(&mut self) -> (String, String, String) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match self.fetch() {
                Fetched::Ok {
                    spiffe_id,
                    serial,
                    spki,
                } => return (spiffe_id, serial, spki),
                other if Instant::now() > deadline => {
                    panic!("the driven workload got no SVID: {other:?}")
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Asks it to exit, and waits until it has.
    fn quit(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}

impl Drop for Driven {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------
// CRLs as a Workload API client sees them.

/// The latest `crl` field of a Workload API stream, kept by a background task.
struct CrlFeed {
    latest: Arc<Mutex<Vec<Vec<u8>>>>,
    messages: Arc<Mutex<usize>>,
    error: Arc<Mutex<Option<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for CrlFeed {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Debug, Clone, Copy)]
enum FeedKind {
    /// `FetchX509SVID` field 2.
    X509Svid,
    /// `FetchX509Bundles` field 1.
    X509Bundles,
}

impl CrlFeed {
    /// Opens the stream (retrying until the agent answers) and follows it,
    /// reopening it if it ends.
    async fn open(socket: &Path, kind: FeedKind) -> Self {
        let latest = Arc::new(Mutex::new(Vec::new()));
        let messages = Arc::new(Mutex::new(0));
        let error = Arc::new(Mutex::new(None));
        let (l, m, e) = (latest.clone(), messages.clone(), error.clone());
        let socket = socket.to_owned();
        let task = tokio::spawn(async move {
            loop {
                let result: Result<(), String> = async {
                    let mut client = raw_workload_client(&socket)
                        .await
                        .map_err(|e| e.to_string())?;
                    match kind {
                        FeedKind::X509Svid => {
                            let mut s = client
                                .fetch_x509svid(with_header(X509svidRequest {}))
                                .await
                                .map_err(|s| format!("{:?} {}", s.code(), s.message()))?
                                .into_inner();
                            while let Some(msg) = s
                                .message()
                                .await
                                .map_err(|s| format!("{:?} {}", s.code(), s.message()))?
                            {
                                *l.lock().unwrap() = msg.crl;
                                *m.lock().unwrap() += 1;
                            }
                        }
                        FeedKind::X509Bundles => {
                            let mut s = client
                                .fetch_x509_bundles(with_header(X509BundlesRequest {}))
                                .await
                                .map_err(|s| format!("{:?} {}", s.code(), s.message()))?
                                .into_inner();
                            while let Some(msg) = s
                                .message()
                                .await
                                .map_err(|s| format!("{:?} {}", s.code(), s.message()))?
                            {
                                *l.lock().unwrap() = msg.crl;
                                *m.lock().unwrap() += 1;
                            }
                        }
                    }
                    Err("stream ended".to_owned())
                }
                .await;
                if let Err(err) = result {
                    *e.lock().unwrap() = Some(err);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        let feed = Self {
            latest,
            messages,
            error,
            task,
        };
        let deadline = Instant::now() + TIMEOUT;
        while *feed.messages.lock().unwrap() == 0 {
            assert!(
                Instant::now() < deadline,
                "no {kind:?} message from the agent: {:?}",
                feed.error.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        feed
    }

    /// Serials revoked by the CRLs last received.
    fn serials(&self) -> BTreeSet<String> {
        crls_serials(&self.latest.lock().unwrap()).unwrap()
    }

    fn crl_count(&self) -> usize {
        self.latest.lock().unwrap().len()
    }

    /// Waits until `serial` is listed; how long that took.
    async fn wait_listed(&self, serial: &str, what: &str) -> Duration {
        let start = Instant::now();
        loop {
            if self.serials().contains(serial) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < TIMEOUT,
                "{serial} not in the CRLs of {what} after {TIMEOUT:?} ({} CRLs, revoked {:?}; last stream error {:?})",
                self.crl_count(),
                self.serials(),
                self.error.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Waits until the server's `GET /crl/{id}` lists `serial`.
async fn wait_server_crl_lists(server: &Server, http: &str, serial: &str) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let seen = server_crl_serials(server, http);
        if let Ok(s) = &seen
            && s.contains(serial)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{serial} not in the server's CRLs after {TIMEOUT:?}: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn revocation_keys(server: &Server) -> anyhow::Result<BTreeSet<String>> {
    Ok(revocations(server)?
        .iter()
        .filter_map(|r| {
            r["serial"]
                .as_str()
                .map(norm_serial)
                .or_else(|| r["jti"].as_str().map(str::to_owned))
        })
        .collect())
}

fn uid_selector() -> String {
    format!("unix:uid:{}", my_uid())
}

fn unix_now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

// ---------------------------------------------------------------------------
// (a) Two tasks, one entry.

#[tokio::test(flavor = "multi_thread")]
async fn two_tasks_get_their_own_credentials_and_an_ended_one_is_revoked() {
    let (server, http) = start_server_with_http("").unwrap();
    let a = Agent::start(&server).unwrap();
    let b = Agent::start(&server).unwrap();
    let worker = "spiffe://example.org/task/worker";
    server
        .create_entry(worker, &a.spiffe_id, &[&uid_selector()])
        .unwrap();
    server
        .create_entry(
            "spiffe://example.org/task/observer",
            &b.spiffe_id,
            &[&uid_selector()],
        )
        .unwrap();

    // A live task, then two short-lived ones under the same entry.
    let mut live = Driven::start(&a.socket);
    let (live_id, live_serial, live_key) = live.fetch_svid().await;
    assert_eq!(live_id, worker);
    // This test process is another live client of agent A, and of B.
    let feed_a = CrlFeed::open(&a.socket, FeedKind::X509Svid).await;
    let feed_b = CrlFeed::open(&b.socket, FeedKind::X509Bundles).await;
    assert!(
        feed_a.crl_count() > 0 && feed_b.crl_count() > 0,
        "the Workload API must carry a CRL per authority (even empty): A has {}, B has {}",
        feed_a.crl_count(),
        feed_b.crl_count()
    );

    let dir1 = tempfile::tempdir().unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let ended1 = fetch_x509_child(&a.socket, Some(dir1.path())).unwrap();
    let ended2 = fetch_x509_child(&a.socket, Some(dir2.path())).unwrap();
    assert_eq!(ended1.spiffe_id, worker);
    assert_eq!(ended2.spiffe_id, worker);
    let key_of = |dir: &Path| {
        let pem = std::fs::read(dir.join("svid.0.pem")).unwrap();
        let (_, p) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
        spki_hex(&p.contents)
    };
    let (k1, k2) = (key_of(dir1.path()), key_of(dir2.path()));
    let serials: BTreeSet<&String> = [&live_serial, &ended1.serial, &ended2.serial].into();
    assert_eq!(
        serials.len(),
        3,
        "three tasks, three serials: live {live_serial}, ended {} and {}",
        ended1.serial,
        ended2.serial
    );
    let keys: BTreeSet<&String> = [&live_key, &k1, &k2].into();
    assert_eq!(keys.len(), 3, "three tasks, three key pairs");
    assert_ne!(
        std::fs::read(dir1.path().join("svid.0.key")).unwrap(),
        std::fs::read(dir2.path().join("svid.0.key")).unwrap()
    );

    // Both ended: their serials reach every CRL.
    for ended in [&ended1, &ended2] {
        let on_a = feed_a.wait_listed(&ended.serial, "agent A").await;
        let on_b = feed_b.wait_listed(&ended.serial, "agent B").await;
        wait_server_crl_lists(&server, &http, &ended.serial).await;
        println!(
            "task {} ended: serial {} in A's crl field after {on_a:?}, B's after {on_b:?}",
            ended.pid, ended.serial
        );
    }
    assert!(
        revocation_keys(&server).unwrap().contains(&ended1.serial),
        "GET /v1/revocations must list the ended task's serial"
    );

    // The live task is untouched: not revoked, and served the same credential.
    for (what, set) in [
        ("agent A", feed_a.serials()),
        ("agent B", feed_b.serials()),
        ("the server", server_crl_serials(&server, &http).unwrap()),
    ] {
        assert!(
            !set.contains(&live_serial),
            "the live task's serial {live_serial} must not be revoked ({what})"
        );
    }
    assert!(live.alive());
    assert_eq!(
        live.fetch(),
        Fetched::Ok {
            spiffe_id: worker.to_owned(),
            serial: live_serial.clone(),
            spki: live_key.clone()
        },
        "the live task keeps its own credential"
    );
    live.quit();
    feed_a.wait_listed(&live_serial, "agent A").await;
}

// ---------------------------------------------------------------------------
// (b) JWT-SVIDs.

#[tokio::test(flavor = "multi_thread")]
async fn an_ended_tasks_jwt_fails_validation_on_every_agent() {
    let (server, _http) = start_server_with_http("").unwrap();
    let a = Agent::start(&server).unwrap();
    let b = Agent::start(&server).unwrap();
    let worker = "spiffe://example.org/task/jwt-worker";
    server
        .create_entry(worker, &a.spiffe_id, &[&uid_selector()])
        .unwrap();
    server
        .create_entry(
            "spiffe://example.org/task/jwt-observer",
            &b.spiffe_id,
            &[&uid_selector()],
        )
        .unwrap();
    let audience = "task-revocation-e2e";

    // A short-lived task mints a token and exits.
    let deadline = Instant::now() + TIMEOUT;
    let token = loop {
        let out = Command::new(bin("mayfly-agent"))
            .args([
                "api",
                "fetch",
                "jwt",
                "--output",
                "json",
                "--audience",
                audience,
            ])
            .arg("--socket-path")
            .arg(&a.socket)
            .output()
            .unwrap();
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            break v["svids"][0]["svid"].as_str().unwrap().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no JWT-SVID: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let jti = jwt_claim(&token, "jti");
    assert!(!jti.is_empty(), "a task's JWT-SVID carries a jti");

    // This process (a live task) mints one too: that one must stay valid.
    let mut client_a = raw_workload_client(&a.socket).await.unwrap();
    let mut client_b = raw_workload_client(&b.socket).await.unwrap();
    let live = client_a
        .fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec![audience.to_owned()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap()
        .into_inner()
        .svids[0]
        .svid
        .clone();
    assert_ne!(
        jwt_claim(&live, "jti"),
        jti,
        "every JWT-SVID has its own jti"
    );

    let validate =
        |c: &mut mayfly::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient<
            tonic::transport::Channel,
        >,
         t: String| {
            let mut c = c.clone();
            async move {
                c.validate_jwtsvid(with_header(ValidateJwtsvidRequest {
                    audience: audience.to_owned(),
                    svid: t,
                }))
                .await
            }
        };
    let start = Instant::now();
    loop {
        let on_a = validate(&mut client_a, token.clone()).await;
        let on_b = validate(&mut client_b, token.clone()).await;
        if let (Err(ea), Err(eb)) = (&on_a, &on_b) {
            println!(
                "ended task's JWT refused after {:?}: A {:?} {:?}, B {:?} {:?}",
                start.elapsed(),
                ea.code(),
                ea.message(),
                eb.code(),
                eb.message()
            );
            for e in [ea, eb] {
                assert!(
                    e.message().to_lowercase().contains("revoked"),
                    "refused for another reason than revocation: {e:?}"
                );
            }
            break;
        }
        assert!(
            start.elapsed() < TIMEOUT,
            "the ended task's JWT-SVID (jti {jti}) still validates: A {:?}, B {:?}",
            on_a.map(|r| r.into_inner().spiffe_id),
            on_b.map(|r| r.into_inner().spiffe_id)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (what, c) in [("A", &mut client_a), ("B", &mut client_b)] {
        let ok = validate(c, live.clone()).await;
        assert!(
            ok.is_ok(),
            "a live task's JWT-SVID must still validate on agent {what}: {ok:?}"
        );
    }
    assert!(
        revocation_keys(&server).unwrap().contains(&jti),
        "GET /v1/revocations must list jti {jti}"
    );
}

/// A string claim of a JWT (no verification).
fn jwt_claim(token: &str, claim: &str) -> String {
    let payload = token.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    v[claim].as_str().unwrap_or_default().to_owned()
}

// ---------------------------------------------------------------------------
// (c) Task/Complete.

#[tokio::test(flavor = "multi_thread")]
async fn task_complete_revokes_a_live_process_which_is_then_denied() {
    let (server, http) = start_server_with_http("").unwrap();
    let a = Agent::start(&server).unwrap();
    let worker = "spiffe://example.org/task/completes";
    server
        .create_entry(worker, &a.spiffe_id, &[&uid_selector()])
        .unwrap();

    let mut target = Driven::start(&a.socket);
    let mut other = Driven::start(&a.socket);
    let (_, serial, _) = target.fetch_svid().await;
    let (_, other_serial, _) = other.fetch_svid().await;
    let feed = CrlFeed::open(&a.socket, FeedKind::X509Svid).await;
    assert!(!feed.serials().contains(&serial));

    let out = a.cli(&["task", "complete", "--pid", &target.pid().to_string()]);
    assert!(
        out.status.success(),
        "mayfly-agent task complete --pid failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!(
        "task complete: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );

    // Revoked although the process still runs.
    let took = feed.wait_listed(&serial, "agent A").await;
    wait_server_crl_lists(&server, &http, &serial).await;
    println!("completed task's serial {serial} in the crl field after {took:?}");
    assert!(target.alive(), "Task/Complete must not end the process");

    // The process's task is over: PermissionDenied from now on, never the
    // old (revoked) certificate, and no new one (a new task is a new process).
    for _ in 0..3 {
        match target.fetch() {
            Fetched::Err { code, .. } if code == "PermissionDenied" => {}
            other => panic!("a completed task must get PermissionDenied, got {other:?}"),
        }
    }
    // Another process under the same entry is not affected.
    assert!(!feed.serials().contains(&other_serial));
    match other.fetch() {
        Fetched::Ok { serial: s, .. } => assert_eq!(s, other_serial),
        e => panic!("another task must keep its credential: {e:?}"),
    }
}

// ---------------------------------------------------------------------------
// (d) The crl_mtls_server example.

/// A rustls client presenting the certificate and key in `dir` (as written
/// by `mayfly-agent api fetch x509 --write`): Ok(answer line) if the server
/// accepted it, Err otherwise. The server's certificate is not checked:
/// this is about what the server accepts.
async fn present(dir: &Path, index: usize, addr: &str) -> Result<String, String> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::AsyncReadExt as _;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(dir.join(format!("svid.{index}.pem")))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
    let key = PrivateKeyDer::from_pem_file(dir.join(format!("svid.{index}.key"))).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(chain, key)
        .unwrap();
    let attempt = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| e.to_string())?;
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("crl-mtls-server").unwrap(), tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let mut answer = String::new();
        tls.read_to_string(&mut answer)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if answer.contains("client_serial=") {
            Ok(answer)
        } else {
            Err(format!("no answer ({answer:?})"))
        }
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .unwrap_or_else(|_| Err("timed out".to_owned()))
}

#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn ok_lines(log: &str) -> usize {
    log.lines().filter(|l| l.starts_with("ok ")).count()
}

fn fail_lines(log: &str) -> usize {
    log.lines().filter(|l| l.starts_with("fail ")).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn crl_mtls_server_refuses_an_ended_tasks_certificate() {
    let (server, _http) = start_server_with_http("").unwrap();
    let a = Agent::start(&server).unwrap();
    let server_id = "spiffe://example.org/crl-server";
    let client_id = "spiffe://example.org/crl-client";
    server
        .create_entry(
            server_id,
            &a.spiffe_id,
            &[&path_selector(&bin("crl_mtls_server"))],
        )
        .unwrap();
    for b in ["mtls_client", "mayfly-agent"] {
        server
            .create_entry(client_id, &a.spiffe_id, &[&path_selector(&bin(b))])
            .unwrap();
    }

    let addr = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(bin("crl_mtls_server"));
    cmd.args(["--listen", &addr, "--allow-id", client_id, "--socket"])
        .arg(&a.socket);
    let tmp = tempfile::tempdir().unwrap();
    let mut srv = mayfly_e2e::Proc::spawn_logged(cmd, tmp.path().join("server.log")).unwrap();
    mayfly_e2e::wait_for("crl_mtls_server to listen", TIMEOUT, || {
        assert!(
            srv.try_wait().is_none(),
            "crl_mtls_server exited:\n{}",
            srv.log_text()
        );
        srv.log_text().contains("listening on").then_some(())
    })
    .unwrap();

    // A live client: mtls_client, connecting every 100 ms.
    let mut cmd = Command::new(bin("mtls_client"));
    cmd.args([
        "--connect",
        &addr,
        "--server-id",
        server_id,
        "--interval",
        "100ms",
        "--socket",
    ])
    .arg(&a.socket);
    let live = mayfly_e2e::Proc::spawn_logged(cmd, tmp.path().join("client.log")).unwrap();
    mayfly_e2e::wait_for("the live client's first ok", TIMEOUT, || {
        (ok_lines(&live.log_text()) > 0).then_some(())
    })
    .unwrap();
    let live_serial = live
        .log_text()
        .lines()
        .find(|l| l.starts_with("ok "))
        .and_then(|l| l.split_whitespace().nth(2))
        .map(norm_serial)
        .unwrap();

    // A task that fetched its certificate and exited.
    let ended_dir = tmp.path().join("ended");
    let ended = fetch_x509_child(&a.socket, Some(&ended_dir)).unwrap();
    assert_eq!(ended.spiffe_id, client_id);
    let start = Instant::now();
    let refusal = loop {
        match present(&ended_dir, 0, &addr).await {
            Err(e) => break e,
            Ok(_) => {
                assert!(
                    start.elapsed() < TIMEOUT,
                    "crl_mtls_server still accepts the ended task's certificate {} after {TIMEOUT:?}:\n{}",
                    ended.serial,
                    srv.log_text()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    println!(
        "ended task's certificate {} refused after {:?}: {refusal}",
        ended.serial,
        start.elapsed()
    );
    assert!(
        srv.log_text().to_lowercase().contains("revoked"),
        "the server must refuse it as revoked:\n{}",
        srv.log_text()
    );

    // The live client goes on without a failure.
    let before = live.log_text();
    let (ok0, fail0) = (ok_lines(&before), fail_lines(&before));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = live.log_text();
    assert!(
        ok_lines(&after) >= ok0 + 3,
        "the live client must keep being accepted:\n{after}"
    );
    assert_eq!(
        fail_lines(&after),
        fail0,
        "the live client must not be refused:\n{after}"
    );
    assert_eq!(
        fail0, 0,
        "the live client ({live_serial}) was refused:\n{before}"
    );

    // Once the live client's task is completed, it is refused too.
    let out = a.cli(&["task", "complete", "--pid", &live.pid().to_string()]);
    assert!(
        out.status.success(),
        "task complete: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    mayfly_e2e::wait_for("the completed client to be refused", TIMEOUT, || {
        let log = live.log_text();
        log.lines()
            .rev()
            .take(3)
            .all(|l| l.starts_with("fail "))
            .then_some(())
    })
    .unwrap();
}

// ---------------------------------------------------------------------------
// (e) Server down when the task ends.

#[tokio::test(flavor = "multi_thread")]
async fn a_revocation_survives_a_server_outage_and_an_agent_restart() {
    let http = format!("127.0.0.1:{}", free_port());
    let extra = format!("http_address = \"{http}\"");
    let server = Server::start_with(&extra).unwrap();
    let port = server.port();
    let mut a = Agent::start(&server).unwrap();
    let b = Agent::start(&server).unwrap();
    server
        .create_entry(
            "spiffe://example.org/task/outage",
            &a.spiffe_id,
            &[&uid_selector()],
        )
        .unwrap();
    server
        .create_entry(
            "spiffe://example.org/task/outage-observer",
            &b.spiffe_id,
            &[&uid_selector()],
        )
        .unwrap();
    let feed_b = CrlFeed::open(&b.socket, FeedKind::X509Bundles).await;

    let mut task = Driven::start(&a.socket);
    let (_, serial, _) = task.fetch_svid().await;

    // The server goes; the task ends; the agent restarts; the server returns.
    let mut server = server;
    server.proc.kill();
    task.quit();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let queue = a.dir.join("data").join("pending-task-ends.jsonl");
    println!(
        "agent's pending task ends before its restart: {:?}",
        std::fs::read_to_string(&queue).ok()
    );
    a.proc.kill();
    let server2 = Server::start_in_with(&server.dir, port, &extra).unwrap();
    let a2 = Agent::start_in(&server2, &a.dir, None, &a.spiffe_id).unwrap();

    wait_server_crl_lists(&server2, &http, &serial).await;
    let took = feed_b.wait_listed(&serial, "agent B").await;
    println!("revocation delivered after the outage; at agent B {took:?} after the server's CRL");
    assert!(
        revocation_keys(&server2).unwrap().contains(&serial),
        "GET /v1/revocations must list {serial}"
    );
    let feed_a = CrlFeed::open(&a2.socket, FeedKind::X509Svid).await;
    feed_a.wait_listed(&serial, "agent A (restarted)").await;
    drop(server);
}

// ---------------------------------------------------------------------------
// (f) Pruning.

#[tokio::test(flavor = "multi_thread")]
async fn revocations_are_pruned_after_the_credential_would_have_expired() {
    let (server, http) = start_server_with_http("default_x509_svid_ttl = \"5s\"").unwrap();
    let a = Agent::start(&server).unwrap();
    server
        .create_entry(
            "spiffe://example.org/task/short",
            &a.spiffe_id,
            &[&uid_selector()],
        )
        .unwrap();
    let feed = CrlFeed::open(&a.socket, FeedKind::X509Svid).await;
    let ended = fetch_x509_child(&a.socket, None).unwrap();
    let not_after = ended.json["svids"][0]["not_after"]
        .as_str()
        .unwrap()
        .to_owned();
    let not_after = time_of(&not_after);
    feed.wait_listed(&ended.serial, "agent A").await;
    wait_server_crl_lists(&server, &http, &ended.serial).await;
    let listed = revocations(&server).unwrap();
    let record = listed
        .iter()
        .find(|r| r["serial"].as_str().map(norm_serial).as_deref() == Some(&ended.serial))
        .unwrap_or_else(|| panic!("{} not in /v1/revocations: {listed:?}", ended.serial));
    println!("revocation record: {record}");
    assert!(
        record["expires_at"].is_string(),
        "a revocation records when the credential expires: {record}"
    );

    // Past not_after, it goes from the list and from the CRLs.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let in_list = revocation_keys(&server).unwrap().contains(&ended.serial);
        let in_crl = server_crl_serials(&server, &http)
            .unwrap()
            .contains(&ended.serial);
        let in_feed = feed.serials().contains(&ended.serial);
        // Read after the queries: if it is still before not_after now, it
        // was before not_after while they ran, and the serial must be listed.
        let now = unix_now();
        if now >= not_after && !in_list && !in_crl && !in_feed {
            println!(
                "pruned {} s after the certificate's not_after",
                now - not_after
            );
            break;
        }
        assert!(
            now >= not_after || (in_list && in_crl),
            "revoked {} dropped before it expired (list {in_list}, crl {in_crl})",
            ended.serial
        );
        assert!(
            Instant::now() < deadline,
            "{} not pruned {} s after it expired: list {in_list}, server CRL {in_crl}, agent crl field {in_feed}",
            ended.serial,
            now - not_after
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Unix time of an RFC 3339 timestamp.
fn time_of(s: &str) -> i64 {
    // `YYYY-MM-DDTHH:MM:SSZ` (the agent CLI's format): days from civil.
    let (date, clock) = s.split_once('T').unwrap();
    let mut d = date.split('-').map(|p| p.parse::<i64>().unwrap());
    let (y, m, day) = (d.next().unwrap(), d.next().unwrap(), d.next().unwrap());
    let clock = clock.trim_end_matches('Z');
    let clock = clock.split(['+', '.']).next().unwrap();
    let mut c = clock.split(':').map(|p| p.parse::<i64>().unwrap());
    let (h, mi, sec) = (c.next().unwrap(), c.next().unwrap(), c.next().unwrap());
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days * 86_400 + h * 3600 + mi * 60 + sec
}
