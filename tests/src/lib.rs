//! Harness for Mayfly's end-to-end tests: real `mayfly-server` and
//! `mayfly-agent` processes, each in its own temporary directory, on
//! loopback, stopped when dropped.
//!
//! The binaries are looked up next to the test executable (the cargo target
//! directory); `scripts/test` builds them first with `cargo build --bins`.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test harness: failing loudly is the point

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};

pub mod fake_kube;

/// The trust domain every harness server uses.
pub const TRUST_DOMAIN: &str = "example.org";

/// Path of a workspace binary (`mayfly-server`, `mayfly-agent`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not found: build the binaries first with `cargo build --workspace --bins` (scripts/test does)",
        path.display()
    );
    path
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` every 50 ms until it returns `Some`, or fails after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed on drop, with its log file kept for diagnosis.
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
}

impl Proc {
    fn spawn(mut cmd: Command, log: PathBuf) -> Result<Self> {
        let out = std::fs::File::create(&log)?;
        cmd.stdout(out.try_clone()?)
            .stderr(out)
            .stdin(Stdio::null());
        let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
        Ok(Self {
            child: Some(child),
            log,
        })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Whether the process has exited; its status if so.
    pub fn try_wait(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Starts `cmd` with stdout and stderr going to `log`; killed on drop.
    pub fn spawn_logged(cmd: Command, log: PathBuf) -> Result<Self> {
        Self::spawn(cmd, log)
    }

    /// Sends SIGTERM (the process may clean up and exit by itself).
    pub fn terminate(&self) {
        if self.child.is_some() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.pid().to_string()])
                .status();
        }
    }

    /// Waits up to `timeout` for the process to exit; its status if it did.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        wait_for("the process to exit", timeout, || self.try_wait()).ok()
    }

    /// Sends SIGKILL and reaps.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running server.
#[derive(Debug)]
pub struct Server {
    /// The process.
    pub proc: Proc,
    /// Its directory (config, data).
    pub dir: PathBuf,
    /// Admin socket.
    pub admin_socket: PathBuf,
    /// Node API address.
    pub address: String,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts a server in a new temporary directory.
    pub fn start() -> Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix("mayfly-e2e-server")
            .tempdir()?;
        let dir = tmp.path().to_owned();
        let mut s = Self::start_in(&dir, free_port())?;
        s._tmp = Some(tmp);
        Ok(s)
    }

    /// Starts a server in a new temporary directory with `extra_toml`
    /// appended to its `[server]` table (for example
    /// `default_x509_svid_ttl = "4s"`).
    pub fn start_with(extra_toml: &str) -> Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix("mayfly-e2e-server")
            .tempdir()?;
        let dir = tmp.path().to_owned();
        let mut s = Self::start_in_with(&dir, free_port(), extra_toml)?;
        s._tmp = Some(tmp);
        Ok(s)
    }

    /// Starts (or restarts) a server whose files live in `dir`.
    pub fn start_in(dir: &Path, port: u16) -> Result<Self> {
        Self::start_in_with(dir, port, "")
    }

    /// Starts (or restarts) a server whose files live in `dir`, with
    /// `extra_toml` appended to its `[server]` table.
    pub fn start_in_with(dir: &Path, port: u16, extra_toml: &str) -> Result<Self> {
        let admin_socket = dir.join("admin.sock");
        let address = format!("127.0.0.1:{port}");
        let config = dir.join("server.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\ntrust_domain = \"{TRUST_DOMAIN}\"\ndata_dir = \"{}\"\nbind_address = \"{address}\"\nadmin_socket_path = \"{}\"\nlog_level = \"debug\"\n{}",
                dir.join("data").display(),
                admin_socket.display(),
                extra_lines(&with_ephemeral_http(extra_toml)),
            ),
        )?;
        let mut cmd = Command::new(bin("mayfly-server"));
        cmd.arg("run").arg("--config").arg(&config);
        let mut proc = Proc::spawn(cmd, dir.join("server.log"))?;
        let sock = admin_socket.clone();
        wait_for("the server's admin socket", Duration::from_secs(30), || {
            if let Some(status) = proc.try_wait() {
                return Some(Err(anyhow::anyhow!(
                    "server exited early ({status}):\n{}",
                    proc.log_text()
                )));
            }
            let ok = sock.exists()
                && Command::new(bin("mayfly-server"))
                    .args(["healthcheck", "--socket-path"])
                    .arg(&sock)
                    .output()
                    .is_ok_and(|o| o.status.success());
            ok.then_some(Ok(()))
        })??;
        Ok(Self {
            proc,
            dir: dir.to_owned(),
            admin_socket,
            address,
            _tmp: None,
        })
    }

    /// Runs `mayfly-server <args> --socket-path <admin>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("mayfly-server"))
            .args(args)
            .arg("--socket-path")
            .arg(&self.admin_socket)
            .output()
            .expect("run mayfly-server cli")
    }

    /// Runs a CLI command that must succeed and print JSON.
    pub fn cli_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        let out = self.cli(&all);
        if !out.status.success() {
            bail!(
                "mayfly-server {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "mayfly-server {args:?} printed non-JSON: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// A new join token: (token, agent SPIFFE ID it will give).
    pub fn join_token(&self) -> Result<(String, String)> {
        let v = self.cli_json(&["token", "generate"])?;
        let token = v["token"].as_str().context("token")?.to_owned();
        let id = v["id"].as_str().context("id")?.to_owned();
        Ok((
            token,
            format!("spiffe://{TRUST_DOMAIN}/mayfly/agent/join_token/{id}"),
        ))
    }

    /// Creates an entry; returns its id.
    pub fn create_entry(
        &self,
        spiffe_id: &str,
        parent_id: &str,
        selectors: &[&str],
    ) -> Result<String> {
        let mut args = vec![
            "entry",
            "create",
            "--spiffe-id",
            spiffe_id,
            "--parent-id",
            parent_id,
        ];
        for s in selectors {
            args.extend(["--selector", s]);
        }
        let v = self.cli_json(&args)?;
        let id = v["id"]
            .as_str()
            .or_else(|| v["entry"]["id"].as_str())
            .or_else(|| v["results"][0]["entry"]["id"].as_str())
            .with_context(|| format!("no entry id in {v}"))?;
        Ok(id.to_owned())
    }

    /// The node API port (to restart on the same address).
    pub fn port(&self) -> u16 {
        self.address
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .expect("port in address")
    }

    /// The PEM bundle file the server writes at start.
    pub fn bundle_pem(&self) -> PathBuf {
        self.dir.join("data").join("bundle.pem")
    }
}

/// A running agent.
#[derive(Debug)]
pub struct Agent {
    /// The process.
    pub proc: Proc,
    /// Its directory.
    pub dir: PathBuf,
    /// Workload API socket.
    pub socket: PathBuf,
    /// Health address.
    pub health: String,
    /// Its SPIFFE ID.
    pub spiffe_id: String,
    _tmp: Option<tempfile::TempDir>,
}

impl Agent {
    /// Enrols a new agent with a fresh join token and waits until it serves.
    pub fn start(server: &Server) -> Result<Self> {
        let (token, spiffe_id) = server.join_token()?;
        let tmp = tempfile::Builder::new()
            .prefix("mayfly-e2e-agent")
            .tempdir()?;
        let dir = tmp.path().to_owned();
        let mut a = Self::start_in(server, &dir, Some(&token), &spiffe_id)?;
        a._tmp = Some(tmp);
        Ok(a)
    }

    /// Enrols a new agent with a fresh join token and `extra_toml` appended
    /// to its `[agent]` table, and waits until it serves.
    pub fn start_with(server: &Server, extra_toml: &str) -> Result<Self> {
        let (token, spiffe_id) = server.join_token()?;
        let tmp = tempfile::Builder::new()
            .prefix("mayfly-e2e-agent")
            .tempdir()?;
        let dir = tmp.path().to_owned();
        let mut a = Self::start_in_with(server, &dir, Some(&token), &spiffe_id, extra_toml)?;
        a._tmp = Some(tmp);
        Ok(a)
    }

    /// Writes the agent config into `dir` and starts the process; does not wait.
    pub fn spawn_in(
        server: &Server,
        dir: &Path,
        token: Option<&str>,
    ) -> Result<(Proc, PathBuf, String)> {
        Self::spawn_in_with(server, dir, token, "")
    }

    /// [`Agent::spawn_in`] with `extra_toml` appended to the `[agent]` table.
    pub fn spawn_in_with(
        server: &Server,
        dir: &Path,
        token: Option<&str>,
        extra_toml: &str,
    ) -> Result<(Proc, PathBuf, String)> {
        let socket = dir.join("api.sock");
        let health = format!("127.0.0.1:{}", free_port());
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "[agent]\ntrust_domain = \"{TRUST_DOMAIN}\"\nserver_address = \"{}\"\ndata_dir = \"{}\"\nsocket_path = \"{}\"\ntrust_bundle_path = \"{}\"\nhealth_address = \"{health}\"\nlog_level = \"debug\"\n{}",
                server.address,
                dir.join("data").display(),
                socket.display(),
                server.bundle_pem().display(),
                extra_lines(extra_toml),
            ),
        )?;
        let mut cmd = Command::new(bin("mayfly-agent"));
        cmd.arg("run").arg("--config").arg(&config);
        if let Some(t) = token {
            cmd.arg("--join-token").arg(t);
        }
        let proc = Proc::spawn(cmd, dir.join(format!("agent-{}.log", std::process::id())))?;
        Ok((proc, socket, health))
    }

    /// Starts an agent whose files live in `dir` and waits until it is ready.
    pub fn start_in(
        server: &Server,
        dir: &Path,
        token: Option<&str>,
        spiffe_id: &str,
    ) -> Result<Self> {
        Self::start_in_with(server, dir, token, spiffe_id, "")
    }

    /// [`Agent::start_in`] with `extra_toml` appended to the `[agent]` table.
    pub fn start_in_with(
        server: &Server,
        dir: &Path,
        token: Option<&str>,
        spiffe_id: &str,
        extra_toml: &str,
    ) -> Result<Self> {
        let (mut proc, socket, health) = Self::spawn_in_with(server, dir, token, extra_toml)?;
        let h = health.clone();
        wait_for("the agent to be ready", Duration::from_secs(30), || {
            if let Some(status) = proc.try_wait() {
                return Some(Err(anyhow::anyhow!(
                    "agent exited early ({status}):\n{}",
                    proc.log_text()
                )));
            }
            let ok = Command::new(bin("mayfly-agent"))
                .args(["healthcheck", "--health-address", &h])
                .output()
                .is_ok_and(|o| o.status.success());
            ok.then_some(Ok(()))
        })??;
        Ok(Self {
            proc,
            dir: dir.to_owned(),
            socket,
            health,
            spiffe_id: spiffe_id.to_owned(),
            _tmp: None,
        })
    }

    /// Starts an agent that attests with `x509pop`, presenting `cert_pem`
    /// (node certificate chain, leaf first) and proving possession of
    /// `key_pem`, and waits until it serves. The server must have
    /// `[server.node_attestors.x509pop]` (see [`x509pop_server_toml`]). Its
    /// SPIFFE ID is derived from the leaf, as the server does.
    pub fn start_x509pop(server: &Server, cert_pem: &str, key_pem: &str) -> Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix("mayfly-e2e-agent-x509pop")
            .tempdir()?;
        let dir = tmp.path().to_owned();
        let cert_path = dir.join("node.pem");
        let key_path = dir.join("node.key");
        std::fs::write(&cert_path, cert_pem)?;
        std::fs::write(&key_path, key_pem)?;
        let (_, leaf) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
            .map_err(|e| anyhow::anyhow!("node certificate PEM: {e}"))?;
        let td = mayfly::TrustDomain::new(TRUST_DOMAIN)?;
        let spiffe_id = mayfly::x509pop::agent_id(&td, &leaf.contents)?.to_string();
        let extra = format!(
            "node_attestor = \"x509pop\"\n[agent.x509pop]\ncertificate_path = \"{}\"\nprivate_key_path = \"{}\"\n",
            cert_path.display(),
            key_path.display()
        );
        let mut a = Self::start_in_with(server, &dir, None, &spiffe_id, &extra)?;
        a._tmp = Some(tmp);
        Ok(a)
    }

    /// The endpoint string SPIFFE clients take (`unix:/path`).
    pub fn endpoint(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    /// Runs `mayfly-agent <args> --socket-path <socket>`.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("mayfly-agent"))
            .args(args)
            .arg("--socket-path")
            .arg(&self.socket)
            .output()
            .expect("run mayfly-agent cli")
    }
}

/// Server configuration (for `Server::start_with`) that enables the
/// `x509pop` node attestor with the CA certificates in `ca_pem_path`. It
/// opens a table, so put it last.
pub fn x509pop_server_toml(ca_pem_path: &Path) -> String {
    format!(
        "[server.node_attestors.x509pop]\nca_bundle_path = \"{}\"\n",
        ca_pem_path.display()
    )
}

/// `extra_toml` as whole lines (ending in a newline when not empty).
fn extra_lines(extra_toml: &str) -> String {
    let t = extra_toml.trim();
    if t.is_empty() {
        String::new()
    } else {
        format!("{t}\n")
    }
}

/// Runs `mayfly-agent healthcheck --health-address <addr>`; (exit ok, stdout + stderr).
pub fn agent_healthcheck(health: &str) -> (bool, String) {
    let out = Command::new(bin("mayfly-agent"))
        .args(["healthcheck", "--health-address", health])
        .output()
        .expect("run mayfly-agent healthcheck");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Servers started in parallel must not all take the default public HTTP
/// port: unless the test chose an `http_address`, use an ephemeral one.
fn with_ephemeral_http(extra_toml: &str) -> String {
    if extra_toml.contains("http_address") {
        extra_toml.to_owned()
    } else {
        format!("http_address = \"127.0.0.1:0\"\n{extra_toml}")
    }
}

/// The uid of this test process, for `unix:uid:` selectors.
pub fn my_uid() -> u32 {
    // /proc/self/status "Uid:\treal\teffective..." — avoids unsafe libc calls.
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// A gRPC channel to the agent's Workload API socket.
pub async fn workload_channel(socket: &Path) -> Result<tonic::transport::Channel> {
    let path = socket.to_owned();
    Ok(tonic::transport::Endpoint::try_from("http://localhost")?
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                let stream = tokio::net::UnixStream::connect(path).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(stream))
            }
        }))
        .await?)
}

/// A raw Workload API client (the generated tonic client) over the agent's
/// Unix socket, for tests that need exact status codes or headers.
pub async fn raw_workload_client(
    socket: &Path,
) -> Result<
    mayfly::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient<
        tonic::transport::Channel,
    >,
> {
    Ok(
        mayfly::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(
            workload_channel(socket).await?,
        ),
    )
}

/// Adds the `workload.spiffe.io: true` security header.
pub fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    req
}

/// Sends an HTTP request to the admin socket with curl; returns (status, body).
pub fn admin_http(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-o", "-", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(socket)
        .args(["-X", method, "-H", "content-type: application/json"]);
    if let Some(b) = body {
        cmd.args(["--data-binary", b]);
    }
    cmd.arg(format!("http://localhost{path}"));
    let out = cmd.output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

// ---------------------------------------------------------------------------
// Task-scoped credentials and revocation (issue 4).

/// A serial number in the one form the tests compare: lowercase hex without
/// separators or leading zero bytes (a DER integer may carry a `00` sign
/// byte that one encoder writes and another strips).
pub fn norm_serial(s: &str) -> String {
    let hex: String = s
        .chars()
        .filter(char::is_ascii_hexdigit)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let mut t = hex.as_str();
    while t.len() > 2 && t.starts_with("00") {
        t = &t[2..];
    }
    t.to_owned()
}

/// The serials (see [`norm_serial`]) a DER X.509 CRL lists as revoked.
pub fn crl_serials(der: &[u8]) -> Result<Vec<String>> {
    let (_, crl) = x509_parser::parse_x509_crl(der)
        .map_err(|e| anyhow::anyhow!("not a DER X.509 CRL: {e}"))?;
    Ok(crl
        .iter_revoked_certificates()
        .map(|r| norm_serial(&hex_of(r.raw_serial())))
        .collect())
}

/// The serials listed in any of `crls`.
pub fn crls_serials(crls: &[Vec<u8>]) -> Result<std::collections::BTreeSet<String>> {
    let mut all = std::collections::BTreeSet::new();
    for c in crls {
        all.extend(crl_serials(c)?);
    }
    Ok(all)
}

/// The serial (see [`norm_serial`]) of a DER certificate.
pub fn cert_serial(der: &[u8]) -> Result<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow::anyhow!("not a DER certificate: {e}"))?;
    Ok(norm_serial(&hex_of(cert.raw_serial())))
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Starts a server whose public HTTP listener (CRLs) is on a free loopback
/// port, with `extra_toml` added to `[server]`; returns it and that
/// listener's address (`127.0.0.1:PORT`).
pub fn start_server_with_http(extra_toml: &str) -> Result<(Server, String)> {
    let http = format!("127.0.0.1:{}", free_port());
    let server = Server::start_with(&format!("http_address = \"{http}\"\n{extra_toml}"))?;
    Ok((server, http))
}

/// `GET http://<addr><path>` with curl; (status, body bytes). Status 0 when
/// nothing answered.
pub fn http_get(addr: &str, path: &str) -> (u16, Vec<u8>) {
    let body = tempfile::NamedTempFile::new().expect("temp file");
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5", "-o"])
        .arg(body.path())
        .args(["-w", "%{http_code}"])
        .arg(format!("http://{addr}{path}"))
        .output()
        .expect("curl");
    let code = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0);
    (code, std::fs::read(body.path()).unwrap_or_default())
}

/// The X.509 authority ids the server reports (`authority show --output json`).
pub fn x509_authority_ids(server: &Server) -> Result<Vec<String>> {
    let v = server.cli_json(&["authority", "show"])?;
    let mut ids = Vec::new();
    collect_x509_authority_ids(&v, &mut ids);
    if ids.is_empty() {
        bail!("no X.509 authority id in `authority show`: {v}");
    }
    Ok(ids)
}

fn collect_x509_authority_ids(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, val) in m {
                if (k.contains("x509") || k == "authorities")
                    && let serde_json::Value::Array(items) = val
                {
                    for it in items {
                        if let Some(id) = it
                            .get("authority_id")
                            .or_else(|| it.get("id"))
                            .and_then(serde_json::Value::as_str)
                            && !out.iter().any(|o| o == id)
                        {
                            out.push(id.to_owned());
                        }
                    }
                }
                collect_x509_authority_ids(val, out);
            }
        }
        serde_json::Value::Array(items) => {
            for it in items {
                collect_x509_authority_ids(it, out);
            }
        }
        _ => {}
    }
}

/// The revoked serials the server serves at `GET /crl/{id}` for every
/// X.509 authority.
pub fn server_crl_serials(
    server: &Server,
    http: &str,
) -> Result<std::collections::BTreeSet<String>> {
    let mut all = std::collections::BTreeSet::new();
    for id in x509_authority_ids(server)? {
        let (code, body) = http_get(http, &format!("/crl/{id}"));
        if code != 200 {
            bail!(
                "GET /crl/{id} answered {code}: {}",
                String::from_utf8_lossy(&body)
            );
        }
        all.extend(crl_serials(&body)?);
    }
    Ok(all)
}

/// What a child `mayfly-agent api fetch x509 --output json` process got.
#[derive(Debug, Clone)]
pub struct ChildSvid {
    /// The child's pid (its task is `unix:<pid>:<start>`).
    pub pid: u32,
    /// SPIFFE ID of the first SVID.
    pub spiffe_id: String,
    /// Its serial, see [`norm_serial`].
    pub serial: String,
    /// The whole JSON output.
    pub json: serde_json::Value,
}

/// Runs `mayfly-agent api fetch x509 --output json` against `socket` as a
/// separate, short-lived workload process (it fetches and exits, which ends
/// its task), with `--write DIR` when given.
pub fn fetch_x509_child(socket: &Path, write: Option<&Path>) -> Result<ChildSvid> {
    let mut cmd = Command::new(bin("mayfly-agent"));
    cmd.args(["api", "fetch", "x509", "--output", "json", "--socket-path"])
        .arg(socket);
    if let Some(dir) = write {
        cmd.arg("--write").arg(dir);
    }
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let pid = child.id();
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "mayfly-agent api fetch x509 failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("not JSON: {}", String::from_utf8_lossy(&out.stdout)))?;
    let first = &json["svids"][0];
    Ok(ChildSvid {
        pid,
        spiffe_id: first["spiffe_id"].as_str().context("spiffe_id")?.to_owned(),
        serial: norm_serial(first["serial"].as_str().context("serial")?),
        json,
    })
}

/// The agent's `unix:path:` selector for a binary (the kernel's view of the
/// path, symlinks resolved).
pub fn path_selector(binary: &Path) -> String {
    let p = std::fs::canonicalize(binary).unwrap_or_else(|_| binary.to_owned());
    format!("unix:path:{}", p.display())
}

/// Revocations the server lists (`GET /v1/revocations` on the admin socket).
pub fn revocations(server: &Server) -> Result<Vec<serde_json::Value>> {
    let (code, body) = admin_http(&server.admin_socket, "GET", "/v1/revocations", None);
    if code != 200 {
        bail!("GET /v1/revocations answered {code}: {body}");
    }
    let v: serde_json::Value = serde_json::from_str(&body)?;
    Ok(v["revocations"].as_array().cloned().unwrap_or_default())
}
