//! The `mayfly-agent` command line: `run`, `healthcheck`, `api ...`, which talks to a
//! Workload API socket as a workload would, and `task complete`. Every command is documented in
//! `docs/cli-agent.md`.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use http_body_util::BodyExt as _;
use mayfly::proto::task::CompleteRequest;
use mayfly::proto::task::task_client::TaskClient;
use mayfly::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use mayfly::proto::workload::{
    JwtsvidRequest, ValidateJwtsvidRequest, X509svidRequest, X509svidResponse,
};
use mayfly::ttl::Ttl;
use mayfly::x509::{SvidInfo, chain_from_concatenated_der};
use mayfly_agent::api;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tonic::transport::Channel;
use zeroize::Zeroizing;

/// Where `api` commands look for the socket when neither `--socket-path` nor
/// `SPIFFE_ENDPOINT_SOCKET` is given: the agent's default.
const DEFAULT_SOCKET: &str = "./.mayfly/agent/api.sock";

/// The agent's default health address.
const DEFAULT_HEALTH_ADDRESS: &str = "127.0.0.1:8088";

/// `mayfly-agent`.
#[derive(Parser)]
#[command(
    name = "mayfly-agent",
    version,
    about = "Mayfly agent: attests this node, serves the SPIFFE Workload API to local workloads"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (with no --config: development defaults, data under ./.mayfly/agent).
    Run(RunArgs),
    /// Ask a running agent whether it is ready (GET /readyz); exit 0 when it is.
    Healthcheck(HealthcheckArgs),
    /// Use the Workload API as a workload would.
    #[command(subcommand)]
    Api(ApiCommand),
    /// Tasks on a running agent (mayfly.task.v1).
    #[command(subcommand)]
    Task(TaskCommand),
}

#[derive(Subcommand)]
enum TaskCommand {
    /// End a task now (Task/Complete): every credential issued to it is revoked, and its
    /// process is refused from then on. Without --pid: the calling process's own task.
    Complete(TaskCompleteArgs),
}

#[derive(Args)]
struct TaskCompleteArgs {
    #[command(flatten)]
    socket: Socket,
    /// The process whose task ends (yours, or any as root). Default: this command's own.
    #[arg(long, value_name = "PID")]
    pid: Option<i32>,
}

#[derive(Args)]
struct RunArgs {
    /// Configuration file (TOML).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Join token for the first attestation (overrides MAYFLY_JOIN_TOKEN and
    /// agent.join_token).
    #[arg(long, value_name = "TOKEN")]
    join_token: Option<String>,
    /// Only check the configuration, print a summary and exit: 0 when
    /// valid, 1 with the error otherwise.
    #[arg(long)]
    check: bool,
}

#[derive(Args)]
struct HealthcheckArgs {
    /// The agent's health endpoint, host:port (default: from --config, else 127.0.0.1:8088).
    #[arg(long, value_name = "ADDR", conflicts_with = "config")]
    health_address: Option<String>,
    /// The agent's configuration file: its `health_address` is used.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// How long to wait for an answer (30s, 1m).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Subcommand)]
enum ApiCommand {
    /// Fetch an SVID.
    #[command(subcommand)]
    Fetch(FetchCommand),
    /// Validate a credential through the agent.
    #[command(subcommand)]
    Validate(ValidateCommand),
    /// Follow the X.509-SVID stream and print every update.
    Watch(WatchArgs),
}

#[derive(Subcommand)]
enum FetchCommand {
    /// Fetch the caller's X.509-SVIDs (FetchX509SVID).
    X509(FetchX509Args),
    /// Fetch JWT-SVIDs for audiences (FetchJWTSVID).
    Jwt(FetchJwtArgs),
}

#[derive(Subcommand)]
enum ValidateCommand {
    /// Validate a JWT-SVID for an audience (ValidateJWTSVID).
    Jwt(ValidateJwtArgs),
}

/// Flags every `api` command takes.
#[derive(Args)]
struct Socket {
    /// The Workload API socket: a path, unix:///path or unix:/path.
    #[arg(
        long,
        value_name = "PATH",
        env = "SPIFFE_ENDPOINT_SOCKET",
        default_value = DEFAULT_SOCKET
    )]
    socket_path: String,
    /// How long to wait for the answer (30s, 1m).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Args)]
struct FetchX509Args {
    #[command(flatten)]
    socket: Socket,
    /// Write svid.N.pem, svid.N.key (mode 0600) and bundle.N.pem for each SVID into DIR.
    #[arg(long, value_name = "DIR")]
    write: Option<PathBuf>,
}

#[derive(Args)]
struct FetchJwtArgs {
    #[command(flatten)]
    socket: Socket,
    /// Audience of the token; repeat for several.
    #[arg(long, value_name = "AUDIENCE", required = true)]
    audience: Vec<String>,
    /// Only this identity (one the caller is entitled to).
    #[arg(long, value_name = "SPIFFE_ID")]
    spiffe_id: Option<String>,
}

#[derive(Args)]
struct ValidateJwtArgs {
    #[command(flatten)]
    socket: Socket,
    /// The audience the token must carry.
    #[arg(long, value_name = "AUDIENCE")]
    audience: String,
    /// The token.
    #[arg(long, value_name = "TOKEN")]
    svid: String,
}

#[derive(Args)]
struct WatchArgs {
    #[command(flatten)]
    socket: Socket,
}

/// `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    /// Readable text.
    Text,
    /// JSON.
    Json,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<Ttl>()
        .map(Ttl::as_duration)
        .map_err(|e| e.to_string())
}

impl Cli {
    /// Runs the command.
    pub fn dispatch(self) -> anyhow::Result<()> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        runtime.block_on(async move {
            match self.command {
                Command::Run(args) => run(args).await,
                Command::Healthcheck(args) => healthcheck(args).await,
                Command::Api(ApiCommand::Fetch(FetchCommand::X509(args))) => fetch_x509(args).await,
                Command::Api(ApiCommand::Fetch(FetchCommand::Jwt(args))) => fetch_jwt(args).await,
                Command::Api(ApiCommand::Validate(ValidateCommand::Jwt(args))) => {
                    validate_jwt(args).await
                }
                Command::Api(ApiCommand::Watch(args)) => watch(args).await,
                Command::Task(TaskCommand::Complete(args)) => task_complete(args).await,
            }
        })
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = match &args.config {
        Some(path) => mayfly_agent::config::AgentConfig::load(path)?,
        None => mayfly_agent::config::AgentConfig::development(),
    };
    if args.check {
        println!(
            "configuration valid: trust domain {}, server {}, socket {}, node attestor {}",
            config.trust_domain,
            config.server_address,
            config.socket_path.display(),
            match &config.node_attestor {
                mayfly_agent::config::NodeAttestorConfig::JoinToken => "join_token".to_owned(),
                mayfly_agent::config::NodeAttestorConfig::X509Pop { .. } => "x509pop".to_owned(),
                mayfly_agent::config::NodeAttestorConfig::K8sPsat { cluster, .. } =>
                    format!("k8s_psat (cluster {cluster})"),
            }
        );
        return Ok(());
    }
    let join_token = match args.join_token {
        Some(t) if t.trim().is_empty() => bail!("--join-token is empty"),
        Some(t) => Some(Zeroizing::new(t)),
        None => None,
    };
    mayfly_agent::run::run(config, join_token, shutdown_signal()).await
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}

async fn healthcheck(args: HealthcheckArgs) -> anyhow::Result<()> {
    let addr = match (&args.health_address, &args.config) {
        (Some(a), _) => a.clone(),
        (None, Some(path)) => mayfly_agent::config::AgentConfig::load(path)?
            .health_address
            .to_string(),
        (None, None) => DEFAULT_HEALTH_ADDRESS.to_owned(),
    };
    let (status, body) = tokio::time::timeout(args.timeout, get_readyz(&addr))
        .await
        .map_err(|_| {
            anyhow!(
                "the agent at {addr} did not answer within {:?}",
                args.timeout
            )
        })??;
    let doc: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    match args.output {
        Output::Json if !doc.is_null() => {
            print(&format!("{}\n", serde_json::to_string_pretty(&doc)?))?;
        }
        Output::Json => {}
        Output::Text => {
            let ready = status == http::StatusCode::OK;
            print(&health_text(&doc, ready))?;
        }
    }
    if status == http::StatusCode::OK {
        return Ok(());
    }
    let reason = doc
        .get("reason")
        .and_then(Value::as_str)
        .map_or_else(|| format!("HTTP {status}"), str::to_owned);
    bail!("agent is not ready: {reason}")
}

/// The `/readyz` body as text for people.
fn health_text(doc: &Value, ready: bool) -> String {
    let field = |name: &str| match doc.get(name) {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(true)) => "yes".to_owned(),
        Some(Value::Bool(false)) => "no".to_owned(),
        Some(v) => v.to_string(),
    };
    let mut out = String::new();
    out.push_str(if ready {
        "Agent is ready.\n"
    } else {
        "Agent is NOT ready.\n"
    });
    if let Some(reason) = doc.get("reason").and_then(Value::as_str) {
        out.push_str(&format!("  {:<24}{reason}\n", "reason:"));
    }
    for (label, name) in [
        ("agent SPIFFE ID", "agent_id"),
        ("agent SVID valid until", "svid_expires_at"),
        ("server reachable", "server_reachable"),
        ("last server contact", "last_server_contact"),
        ("entries", "entries"),
        ("X.509-SVIDs", "svids"),
        ("X.509 authorities", "x509_authorities"),
        ("JWT authorities", "jwt_authorities"),
        ("needs a new join token", "needs_join_token"),
    ] {
        out.push_str(&format!("  {:<24}{}\n", format!("{label}:"), field(name)));
    }
    out
}

async fn get_readyz(addr: &str) -> anyhow::Result<(http::StatusCode, bytes::Bytes)> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot reach the agent's health endpoint at {addr}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .context("HTTP handshake with the health endpoint failed")?;
    tokio::spawn(conn);
    let request = http::Request::get("/readyz")
        .header(http::header::HOST, addr)
        .body(String::new())?;
    let response = sender
        .send_request(request)
        .await
        .context("GET /readyz failed")?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .context("reading the /readyz answer failed")?
        .to_bytes();
    Ok((status, body))
}

async fn client(socket: &Socket) -> anyhow::Result<SpiffeWorkloadApiClient<Channel>> {
    let path = api::socket_path_from_endpoint(&socket.socket_path)?;
    let channel = tokio::time::timeout(socket.timeout, api::connect(&path))
        .await
        .map_err(|_| {
            anyhow!(
                "timed out connecting to the Workload API at {}",
                path.display()
            )
        })?
        .with_context(|| format!("cannot connect to the Workload API at {}", path.display()))?;
    Ok(SpiffeWorkloadApiClient::new(channel))
}

/// A gRPC error as a readable message.
fn refused(call: &str, status: &tonic::Status) -> anyhow::Error {
    anyhow!("{call}: {} ({:?})", status.message(), status.code())
}

async fn with_timeout<T>(
    timeout: Duration,
    call: &str,
    fut: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| anyhow!("{call}: no answer within {timeout:?}"))?
}

/// One X.509-SVID from a response, parsed.
struct ParsedSvid {
    info: SvidInfo,
    hint: String,
    chain: Vec<Vec<u8>>,
    key: Zeroizing<Vec<u8>>,
    bundle: Vec<Vec<u8>>,
}

fn parse_x509(response: X509svidResponse) -> anyhow::Result<Vec<ParsedSvid>> {
    response
        .svids
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            let chain = chain_from_concatenated_der(&s.x509_svid)
                .with_context(|| format!("SVID #{i}: bad certificate chain"))?;
            let leaf = chain
                .first()
                .ok_or_else(|| anyhow!("SVID #{i}: empty certificate chain"))?;
            let info = SvidInfo::from_der(leaf).with_context(|| format!("SVID #{i}"))?;
            let bundle = chain_from_concatenated_der(&s.bundle)
                .with_context(|| format!("SVID #{i}: bad bundle"))?;
            Ok(ParsedSvid {
                info,
                hint: s.hint,
                chain,
                key: Zeroizing::new(s.x509_svid_key),
                bundle,
            })
        })
        .collect()
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

fn svid_text(svids: &[ParsedSvid]) -> String {
    let mut out = String::new();
    for (i, s) in svids.iter().enumerate() {
        out.push_str(&format!(
            "SVID #{i}\n  SPIFFE ID:   {}\n  Serial:      {}\n  Not before:  {}\n  Not after:   {}\n  Hint:        {}\n  Bundle CAs:  {}\n",
            s.info.spiffe_id,
            s.info.serial_hex,
            rfc3339(s.info.not_before),
            rfc3339(s.info.not_after),
            if s.hint.is_empty() { "-" } else { &s.hint },
            s.bundle.len(),
        ));
    }
    out
}

fn svid_json(svids: &[ParsedSvid]) -> Value {
    Value::Array(
        svids
            .iter()
            .map(|s| {
                json!({
                    "spiffe_id": s.info.spiffe_id.to_string(),
                    "serial": s.info.serial_hex,
                    "not_before": rfc3339(s.info.not_before),
                    "not_after": rfc3339(s.info.not_after),
                    "hint": s.hint,
                    "bundle_cas": s.bundle.len(),
                })
            })
            .collect(),
    )
}

fn pem_certs(ders: &[Vec<u8>]) -> String {
    let pems: Vec<pem::Pem> = ders
        .iter()
        .map(|d| pem::Pem::new("CERTIFICATE", d.clone()))
        .collect();
    pem::encode_many(&pems)
}

/// Writes `data` to a fresh file with `mode` (an existing file is replaced, so that an old,
/// looser mode is not kept).
fn write_file(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("cannot replace {}", path.display()));
        }
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(data)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Writes each SVID as `spire-agent api fetch x509 -write` does; returns the files written.
fn write_svids(dir: &Path, svids: &[ParsedSvid]) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut written = Vec::new();
    for (i, s) in svids.iter().enumerate() {
        let cert = dir.join(format!("svid.{i}.pem"));
        write_file(&cert, pem_certs(&s.chain).as_bytes(), 0o644)?;
        let key = dir.join(format!("svid.{i}.key"));
        let key_pem = Zeroizing::new(pem::encode(&pem::Pem::new("PRIVATE KEY", s.key.to_vec())));
        write_file(&key, key_pem.as_bytes(), 0o600)?;
        let bundle = dir.join(format!("bundle.{i}.pem"));
        write_file(&bundle, pem_certs(&s.bundle).as_bytes(), 0o644)?;
        written.extend([cert, key, bundle]);
    }
    Ok(written)
}

async fn fetch_x509(args: FetchX509Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut client = client(&args.socket).await?;
    let response = with_timeout(args.socket.timeout, "FetchX509SVID", async {
        let mut stream = client
            .fetch_x509svid(api::request(X509svidRequest {}))
            .await
            .map_err(|s| refused("FetchX509SVID", &s))?
            .into_inner();
        stream
            .message()
            .await
            .map_err(|s| refused("FetchX509SVID", &s))?
            .ok_or_else(|| anyhow!("FetchX509SVID: the stream ended without an answer"))
    })
    .await?;
    let elapsed = started.elapsed();
    let svids = parse_x509(response)?;
    let written = match &args.write {
        Some(dir) => write_svids(dir, &svids)?,
        None => Vec::new(),
    };
    match args.socket.output {
        Output::Json => {
            let files: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
            print(&format!(
                "{}\n",
                serde_json::to_string_pretty(
                    &json!({ "svids": svid_json(&svids), "files": files })
                )?
            ))?;
        }
        Output::Text => {
            let mut out = format!(
                "Received {} svid{} after {elapsed:.2?}\n\n",
                svids.len(),
                if svids.len() == 1 { "" } else { "s" }
            );
            out.push_str(&svid_text(&svids));
            for path in &written {
                out.push_str(&format!("Wrote {}\n", path.display()));
            }
            print(&out)?;
        }
    }
    Ok(())
}

async fn fetch_jwt(args: FetchJwtArgs) -> anyhow::Result<()> {
    let mut client = client(&args.socket).await?;
    let request = JwtsvidRequest {
        audience: args.audience,
        spiffe_id: args.spiffe_id.unwrap_or_default(),
    };
    let response = with_timeout(args.socket.timeout, "FetchJWTSVID", async {
        Ok(client
            .fetch_jwtsvid(api::request(request))
            .await
            .map_err(|s| refused("FetchJWTSVID", &s))?
            .into_inner())
    })
    .await?;
    match args.socket.output {
        Output::Json => {
            let svids: Vec<Value> = response
                .svids
                .iter()
                .map(|s| json!({ "spiffe_id": s.spiffe_id, "svid": s.svid, "hint": s.hint }))
                .collect();
            print(&format!(
                "{}\n",
                serde_json::to_string_pretty(&json!({ "svids": svids }))?
            ))?;
        }
        Output::Text => {
            let mut out = String::new();
            for s in &response.svids {
                out.push_str(&format!("token({}):\n\t{}\n", s.spiffe_id, s.svid));
                if !s.hint.is_empty() {
                    out.push_str(&format!("hint:\t{}\n", s.hint));
                }
            }
            print(&out)?;
        }
    }
    Ok(())
}

async fn task_complete(args: TaskCompleteArgs) -> anyhow::Result<()> {
    let path = api::socket_path_from_endpoint(&args.socket.socket_path)?;
    let channel = tokio::time::timeout(args.socket.timeout, api::connect(&path))
        .await
        .map_err(|_| anyhow!("timed out connecting to the agent at {}", path.display()))?
        .with_context(|| format!("cannot connect to the agent at {}", path.display()))?;
    let mut client = TaskClient::new(channel);
    let request = CompleteRequest {
        pid: args.pid.unwrap_or(0),
    };
    let response = with_timeout(args.socket.timeout, "Task/Complete", async {
        Ok(client
            .complete(api::request(request))
            .await
            .map_err(|s| refused("Task/Complete", &s))?
            .into_inner())
    })
    .await?;
    match args.socket.output {
        Output::Json => print(&format!(
            "{}\n",
            serde_json::to_string_pretty(&json!({
                "task_id": response.task_id,
                "revoked_x509_serials": response.revoked_x509_serials,
                "revoked_jwt_ids": response.revoked_jwt_ids,
            }))?
        ))?,
        Output::Text => print(&format!(
            "Task {} completed.\nRevoked X.509-SVID serials: {}\nRevoked JWT-SVID ids: {}\n",
            response.task_id,
            list_or_none(&response.revoked_x509_serials),
            list_or_none(&response.revoked_jwt_ids),
        ))?,
    }
    Ok(())
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

async fn validate_jwt(args: ValidateJwtArgs) -> anyhow::Result<()> {
    let mut client = client(&args.socket).await?;
    let request = ValidateJwtsvidRequest {
        audience: args.audience,
        svid: args.svid,
    };
    let response = with_timeout(args.socket.timeout, "ValidateJWTSVID", async {
        Ok(client
            .validate_jwtsvid(api::request(request))
            .await
            .map_err(|s| refused("ValidateJWTSVID", &s))?
            .into_inner())
    })
    .await?;
    let claims = response.claims.as_ref().map_or(Value::Null, struct_to_json);
    match args.socket.output {
        Output::Json => print(&format!(
            "{}\n",
            serde_json::to_string_pretty(
                &json!({ "spiffe_id": response.spiffe_id, "claims": claims })
            )?
        ))?,
        Output::Text => print(&format!(
            "SVID is valid.\nSPIFFE ID : {}\nClaims    : {}\n",
            response.spiffe_id,
            serde_json::to_string(&claims)?
        ))?,
    }
    Ok(())
}

async fn watch(args: WatchArgs) -> anyhow::Result<()> {
    let mut client = client(&args.socket).await?;
    let mut stream = with_timeout(args.socket.timeout, "FetchX509SVID", async {
        Ok(client
            .fetch_x509svid(api::request(X509svidRequest {}))
            .await
            .map_err(|s| refused("FetchX509SVID", &s))?
            .into_inner())
    })
    .await?;
    let stop = shutdown_signal();
    tokio::pin!(stop);
    loop {
        let message = tokio::select! {
            () = &mut stop => return Ok(()),
            m = stream.message() => m.map_err(|s| refused("FetchX509SVID", &s))?,
        };
        let Some(response) = message else {
            eprintln!("the agent closed the stream");
            return Ok(());
        };
        let svids = parse_x509(response)?;
        let at = rfc3339(OffsetDateTime::now_utc());
        match args.socket.output {
            Output::Json => print(&format!(
                "{}\n",
                serde_json::to_string(&json!({ "received_at": at, "svids": svid_json(&svids) }))?
            ))?,
            Output::Text => print(&format!(
                "Update at {at}: {} svid{}\n{}\n",
                svids.len(),
                if svids.len() == 1 { "" } else { "s" },
                svid_text(&svids)
            ))?,
        }
    }
}

/// A protobuf `Struct` (JWT claims) as JSON; whole numbers print as integers.
fn struct_to_json(s: &prost_types::Struct) -> Value {
    Value::Object(
        s.fields
            .iter()
            .map(|(k, v)| (k.clone(), value_to_json(v)))
            .collect(),
    )
}

fn value_to_json(v: &prost_types::Value) -> Value {
    use prost_types::value::Kind;
    match &v.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::BoolValue(b)) => Value::Bool(*b),
        Some(Kind::NumberValue(n)) => {
            // Exact for integers up to 2^53, which covers every timestamp claim.
            if n.fract() == 0.0 && n.abs() < 9_007_199_254_740_992.0 {
                json!(*n as i64)
            } else {
                json!(n)
            }
        }
        Some(Kind::StringValue(s)) => Value::String(s.clone()),
        Some(Kind::ListValue(l)) => Value::Array(l.values.iter().map(value_to_json).collect()),
        Some(Kind::StructValue(s)) => struct_to_json(s),
    }
}

/// Writes to stdout; a closed pipe (`| head`) is not an error.
fn print(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_api_commands() {
        let cli = Cli::try_parse_from([
            "mayfly-agent",
            "api",
            "fetch",
            "jwt",
            "--audience",
            "a",
            "--audience",
            "b",
            "--socket-path",
            "unix:///tmp/x.sock",
            "--output",
            "json",
        ])
        .unwrap();
        let Command::Api(ApiCommand::Fetch(FetchCommand::Jwt(args))) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!(args.audience, ["a", "b"]);
        assert_eq!(args.socket.output, Output::Json);
        assert_eq!(args.socket.timeout, Duration::from_secs(5));
        assert_eq!(
            api::socket_path_from_endpoint(&args.socket.socket_path).unwrap(),
            PathBuf::from("/tmp/x.sock")
        );
        // --audience is required.
        assert!(Cli::try_parse_from(["mayfly-agent", "api", "fetch", "jwt"]).is_err());
    }

    #[test]
    fn healthcheck_text_says_what_matters() {
        let doc = json!({
            "status": "not ready",
            "reason": "the agent SVID expired at 2026-01-01T00:00:00Z; join_token agents cannot re-attest",
            "agent_id": "spiffe://example.org/mayfly/agent/join_token/t",
            "svid_expires_at": "2026-01-01T00:00:00Z",
            "server_reachable": false,
            "last_server_contact": null,
            "entries": 3,
            "svids": 0,
            "x509_authorities": 2,
            "jwt_authorities": 1,
            "needs_join_token": true
        });
        let text = health_text(&doc, false);
        assert!(text.starts_with("Agent is NOT ready.\n"), "{text}");
        for (label, value) in [
            ("reason:", "the agent SVID expired at 2026-01-01T00:00:00Z"),
            (
                "agent SPIFFE ID:",
                "spiffe://example.org/mayfly/agent/join_token/t",
            ),
            ("server reachable:", "no"),
            ("last server contact:", "-"),
            ("entries:", "3"),
            ("X.509 authorities:", "2"),
            ("needs a new join token:", "yes"),
        ] {
            let line = format!("  {label:<24}{value}");
            assert!(text.contains(&line), "missing {line:?} in\n{text}");
        }
        let cli =
            Cli::try_parse_from(["mayfly-agent", "healthcheck", "--config", "a.toml"]).unwrap();
        let Command::Healthcheck(args) = cli.command else {
            panic!("wrong command");
        };
        assert_eq!(args.config, Some(PathBuf::from("a.toml")));
        assert!(
            Cli::try_parse_from([
                "mayfly-agent",
                "healthcheck",
                "--config",
                "a.toml",
                "--health-address",
                "x:1"
            ])
            .is_err()
        );
    }

    #[test]
    fn claims_print_as_json() {
        use prost_types::value::Kind;
        let mut s = prost_types::Struct::default();
        s.fields.insert(
            "exp".into(),
            prost_types::Value {
                kind: Some(Kind::NumberValue(1_700_000_000.0)),
            },
        );
        s.fields.insert(
            "aud".into(),
            prost_types::Value {
                kind: Some(Kind::ListValue(prost_types::ListValue {
                    values: vec![prost_types::Value {
                        kind: Some(Kind::StringValue("x".into())),
                    }],
                })),
            },
        );
        assert_eq!(
            struct_to_json(&s),
            json!({ "exp": 1_700_000_000_i64, "aud": ["x"] })
        );
    }

    #[test]
    fn key_files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svid.0.key");
        std::fs::write(&path, b"old").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_file(&path, b"secret", 0o600).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read(&path).unwrap(), b"secret");
    }
}
