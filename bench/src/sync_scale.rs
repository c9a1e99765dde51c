//! Scenario 4, `sync-scale`: one server with a large registry and many
//! agents holding `Sync` streams.
//!
//! 1. Populate: N entries (default 1,000,000) written as JSON lines and
//!    loaded into the store of a server that has not started yet with
//!    `mayfly-server entry import` (the operator's offline import: the
//!    server's own store code, validation and revisions). Entries sit under
//!    node aliases, [`ENTRIES_PER_NODE`] per node
//!    (`spiffe://example.org/bench/node/<n>`); the simulated agents enrol
//!    as some of those nodes, so most entries belong to nodes that never
//!    connect.
//! 2. Start-up: the real `mayfly-server` on that store, from spawn to its
//!    admin socket answering (store loaded, index built, node API
//!    listening); its peak RSS then.
//! 3. Agents (default 10,000), all in this process on one runtime: each
//!    gets its own join token from the admin API (with its node's SPIFFE ID
//!    as alias), attests over the node API, then opens a `Sync` stream over
//!    mutual TLS with its new SVID and the real agent's keep-alive. Its
//!    first (full) snapshot must hold exactly its node's entries.
//! 4. Entry change → agent: an entry under a random connected agent's node
//!    is created (even steps) or updated (odd steps) through the admin API;
//!    the time from sending the request until that agent's stream delivers
//!    it. Any other agent receiving it is an error.
//! 5. Idle: nothing changes for S seconds; the server's CPU time
//!    (utime + stime from `/proc/<pid>/stat`) over wall time, as a
//!    percentage of one core, and the `Sync` messages sent meanwhile
//!    (none expected: no polling).

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use mayfly::proto::node::{SyncRequest, SyncResponse};
use rand::Rng as _;
use tokio::sync::oneshot;

use crate::harness::procs::{ServerDir, binary, peak_rss_kb};
use crate::harness::{Latency, Report, Row, Server, TRUST_DOMAIN};

/// Entries registered under each node alias.
pub const ENTRIES_PER_NODE: usize = 10;
/// Scenario 4's budgets.
const STARTUP_BUDGET: Duration = Duration::from_secs(10);
const CHANGE_P99_BUDGET: Duration = Duration::from_millis(100);
const IDLE_CPU_BUDGET_PERCENT: f64 = 2.0;
/// How long one step may take before the benchmark gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// The pace of entry changes: at most one per this interval.
const CHANGE_INTERVAL: Duration = Duration::from_millis(50);

/// `mayfly-bench sync-scale` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct SyncScaleArgs {
    /// Entries in the store at start-up.
    #[arg(long, default_value_t = 1_000_000)]
    pub entries: usize,
    /// Simulated agents holding a `Sync` stream.
    #[arg(long, default_value_t = 10_000)]
    pub agents: usize,
    /// Entry changes timed (creates and updates, alternately).
    #[arg(long, default_value_t = 200)]
    pub changes: usize,
    /// Seconds of idle measured.
    #[arg(long, default_value_t = 10.0)]
    pub idle_secs: f64,
    /// Agents connecting at once.
    #[arg(long, default_value_t = 64)]
    pub connect_concurrency: usize,
    /// Worker threads of the benchmark's runtime (the agents' side).
    #[arg(long, default_value_t = 1)]
    pub client_threads: usize,
    /// 10,000 entries, 100 agents, 20 changes, 2 s idle; exit 1 only if
    /// something is wrong (a snapshot, a change lost or misdelivered), never
    /// on time.
    #[arg(long)]
    pub smoke: bool,
    /// Write the rows and the details as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
}

impl SyncScaleArgs {
    /// The settings `mayfly-bench all` uses.
    pub fn for_suite(smoke: bool) -> Self {
        Self {
            entries: 1_000_000,
            agents: 10_000,
            changes: 200,
            idle_secs: 10.0,
            connect_concurrency: 64,
            client_threads: 1,
            smoke,
            json: None,
        }
    }

    fn resolved(&self) -> Result<Self> {
        let mut a = self.clone();
        if a.smoke {
            a.entries = 10_000;
            a.agents = 100;
            a.changes = 20;
            a.idle_secs = 2.0;
        }
        ensure!(a.agents > 0, "--agents must be at least 1");
        ensure!(
            a.entries >= a.agents * ENTRIES_PER_NODE,
            "--entries must be at least {ENTRIES_PER_NODE} × --agents (each agent's node has {ENTRIES_PER_NODE} entries)"
        );
        ensure!(
            a.idle_secs > 0.0 && a.idle_secs.is_finite(),
            "--idle-secs must be a positive number"
        );
        a.connect_concurrency = a.connect_concurrency.max(1);
        Ok(a)
    }
}

/// What the rows do not show.
#[derive(Debug, Default, serde::Serialize)]
pub struct Details {
    entries: usize,
    agents: usize,
    nodes: usize,
    entries_per_node: usize,
    write_jsonl_seconds: f64,
    import_seconds: f64,
    store_bytes: u64,
    startup_seconds: f64,
    server_rss_after_startup_kb: Option<u64>,
    tokens_seconds: f64,
    connect_seconds: f64,
    server_rss_after_connect_kb: Option<u64>,
    change_admin_p50_ms: f64,
    change_admin_p99_ms: f64,
    change_p50_ms: f64,
    change_p99_ms: f64,
    change_max_ms: f64,
    idle_seconds: f64,
    idle_server_cpu_percent: f64,
    idle_bench_cpu_percent: f64,
    idle_sync_messages: u64,
    server_peak_rss_kb: Option<u64>,
    bench_peak_rss_kb: Option<u64>,
    load_average_at_end: [f64; 3],
}

/// The SPIFFE ID of node `n`, the alias its agent enrols with.
fn node_id(n: usize) -> String {
    format!("spiffe://{TRUST_DOMAIN}/bench/node/{n}")
}

/// The node of agent `a`: spread over the nodes.
fn node_of(agent: usize, agents: usize, nodes: usize) -> usize {
    agent * (nodes / agents)
}

/// Writes the entries as JSON lines (the import's input).
fn write_jsonl(path: &Path, entries: usize) -> Result<()> {
    let file = std::fs::File::create(path)?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    for i in 0..entries {
        let (node, k) = (i / ENTRIES_PER_NODE, i % ENTRIES_PER_NODE);
        // A namespace per 100 nodes, a service account per workload.
        writeln!(
            out,
            r#"{{"spiffe_id":"spiffe://{TRUST_DOMAIN}/ns/ns-{ns}/sa/svc-{k}/node-{node}","parent_id":"{parent}","selectors":["k8s:ns:ns-{ns}","k8s:sa:svc-{k}"]}}"#,
            ns = node % 1000,
            parent = node_id(node),
        )?;
    }
    out.flush()?;
    Ok(())
}

fn dir_size(path: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(path) else {
        return 0;
    };
    rd.filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

// ---------------------------------------------------------------------------
// The admin API over its Unix socket (HTTP/1.1).

async fn admin_call(
    sender: &mut SendRequest<Full<Bytes>>,
    method: http::Method,
    path: &str,
    body: &serde_json::Value,
) -> Result<serde_json::Value> {
    let req = http::Request::builder()
        .method(method.clone())
        .uri(format!("http://localhost{path}"))
        .header(http::header::HOST, "localhost")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(body)?)))?;
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let bytes = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!(
            "{method} {path}: {status}: {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    serde_json::from_slice(&bytes)
        .with_context(|| format!("{method} {path}: the answer is not JSON"))
}

/// A join token for each node in `nodes`, `concurrency` requests at once.
async fn join_tokens(socket: &Path, nodes: &[usize], concurrency: usize) -> Result<Vec<String>> {
    let next = Arc::new(AtomicU64::new(0));
    let nodes = Arc::new(nodes.to_vec());
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..concurrency.min(32) {
        let (next, nodes, socket) = (Arc::clone(&next), Arc::clone(&nodes), socket.to_owned());
        set.spawn(async move {
            let mut sender = crate::mint_http::connect(&socket).await?;
            let mut got = Vec::new();
            loop {
                let i = usize::try_from(next.fetch_add(1, Ordering::Relaxed))?;
                let Some(&node) = nodes.get(i) else {
                    return Ok::<_, anyhow::Error>(got);
                };
                let body = serde_json::json!({ "spiffe_id": node_id(node), "ttl": "1h" });
                let v =
                    admin_call(&mut sender, http::Method::POST, "/v1/join-tokens", &body).await?;
                let token = v["token"].as_str().context("no token in the answer")?;
                got.push((i, token.to_owned()));
            }
        });
    }
    let mut tokens = vec![String::new(); nodes.len()];
    while let Some(r) = set.join_next().await {
        for (i, t) in r.context("a token task panicked")?? {
            tokens[i] = t;
        }
    }
    Ok(tokens)
}

// ---------------------------------------------------------------------------
// The agents' side.

/// Who waits for which change, and what arrived where.
#[derive(Debug, Default)]
struct Hub {
    /// Change marker (the entry's hint) → (agent expected, waiter).
    waiting: Mutex<HashMap<String, (usize, oneshot::Sender<Instant>)>>,
    messages: AtomicU64,
    misdelivered: AtomicU64,
    ended: Mutex<Vec<String>>,
}

impl Hub {
    fn deliver(&self, agent: usize, msg: &SyncResponse, at: Instant) {
        self.messages.fetch_add(1, Ordering::Relaxed);
        for e in &msg.upserted {
            if !e.hint.starts_with("change-") {
                continue;
            }
            let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            match waiting.remove(&e.hint) {
                Some((expected, tx)) if expected == agent => {
                    let _ = tx.send(at);
                }
                Some(other) => {
                    self.misdelivered.fetch_add(1, Ordering::Relaxed);
                    waiting.insert(e.hint.clone(), other);
                }
                None => {}
            }
        }
    }
}

/// Attests agent `index` as `node` with `token`, opens its `Sync` stream,
/// checks the first snapshot, then follows the stream in a task; the time
/// from the attestation's start to the snapshot.
async fn connect_agent(
    addr: std::net::SocketAddr,
    index: usize,
    node: usize,
    expected_entries: usize,
    token: String,
    hub: Arc<Hub>,
) -> Result<Duration> {
    let start = Instant::now();
    let identity = crate::node_client::attest_join_token(addr, &token).await?;
    let mut client = crate::node_client::connect_as_agent(addr, &identity).await?;
    let mut stream = client
        .sync(SyncRequest {})
        .await
        .map_err(|s| anyhow::anyhow!("Sync: {:?} {}", s.code(), s.message()))?
        .into_inner();
    let first = tokio::time::timeout(STEP_TIMEOUT, stream.message())
        .await
        .context("Sync: no snapshot in time")?
        .map_err(|s| anyhow::anyhow!("Sync: {:?} {}", s.code(), s.message()))?
        .context("Sync: the stream ended before the snapshot")?;
    let took = start.elapsed();
    let parent = node_id(node);
    ensure!(
        first.full,
        "agent {index}: the first Sync message is not a full snapshot"
    );
    ensure!(
        first.upserted.len() == expected_entries
            && first.upserted.iter().all(|e| e.parent_id == parent),
        "agent {index} ({parent}): the snapshot holds {} entries, expected its node's {expected_entries}",
        first.upserted.len()
    );
    tokio::spawn(async move {
        // The client (and its connection) lives as long as the stream.
        let _client = client;
        let why = loop {
            match stream.message().await {
                Ok(Some(msg)) => hub.deliver(index, &msg, Instant::now()),
                Ok(None) => break "the stream ended".to_owned(),
                Err(s) => break format!("{:?} {}", s.code(), s.message()),
            }
        };
        hub.ended
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(format!("agent {index}: {why}"));
    });
    Ok(took)
}

/// Connects every agent, `concurrency` at a time; per-agent latencies.
async fn connect_all(
    addr: std::net::SocketAddr,
    nodes: &[usize],
    tokens: Vec<String>,
    hub: &Arc<Hub>,
    concurrency: usize,
) -> Result<Vec<Duration>> {
    let mut set = tokio::task::JoinSet::new();
    let mut samples = Vec::with_capacity(nodes.len());
    let mut todo = nodes.iter().copied().zip(tokens).enumerate();
    loop {
        while set.len() < concurrency {
            let Some((index, (node, token))) = todo.next() else {
                break;
            };
            let hub = Arc::clone(hub);
            set.spawn(tokio::time::timeout(
                STEP_TIMEOUT * 2,
                connect_agent(addr, index, node, ENTRIES_PER_NODE, token, hub),
            ));
        }
        let Some(r) = set.join_next().await else {
            break;
        };
        let took = r
            .context("an agent task panicked")?
            .context("an agent did not connect in time")??;
        samples.push(took);
        if samples.len().is_multiple_of(1000) {
            eprintln!(
                "mayfly-bench: sync-scale: {} agents connected",
                samples.len()
            );
        }
    }
    Ok(samples)
}

/// Times `changes` entry changes under random agents' nodes: the time to
/// the right agent's stream, and the admin call's own time.
async fn changes(
    socket: &Path,
    nodes: &[usize],
    hub: &Arc<Hub>,
    count: usize,
) -> Result<(Vec<Duration>, Vec<Duration>, Duration)> {
    let mut sender = crate::mint_http::connect(socket).await?;
    let mut to_agent = Vec::with_capacity(count);
    let mut admin = Vec::with_capacity(count);
    // The entry created by the previous (even) step, updated by the next.
    let mut last: Option<(String, usize, String)> = None;
    let started = Instant::now();
    for c in 0..count {
        let paced = Instant::now() + CHANGE_INTERVAL;
        let marker = format!("change-{c}");
        let (agent, method, path, body) = match last.take() {
            Some((id, agent, spiffe_id)) => {
                let spec = serde_json::json!({
                    "spiffe_id": spiffe_id, "parent_id": node_id(nodes[agent]),
                    "selectors": ["k8s:ns:bench", "k8s:sa:changed"], "hint": marker,
                });
                (agent, http::Method::PUT, format!("/v1/entries/{id}"), spec)
            }
            None => {
                let agent = rand::rng().random_range(0..nodes.len());
                let spec = serde_json::json!({ "entries": [{
                    "spiffe_id": format!("spiffe://{TRUST_DOMAIN}/bench/changed/{c}"),
                    "parent_id": node_id(nodes[agent]),
                    "selectors": ["k8s:ns:bench", "k8s:sa:changed"], "hint": marker,
                }]});
                (agent, http::Method::POST, "/v1/entries".to_owned(), spec)
            }
        };
        let (tx, rx) = oneshot::channel();
        hub.waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(marker.clone(), (agent, tx));
        let t0 = Instant::now();
        let v = admin_call(&mut sender, method.clone(), &path, &body).await?;
        admin.push(t0.elapsed());
        if method == http::Method::POST {
            let e = &v["results"][0]["entry"];
            let id = e["id"]
                .as_str()
                .with_context(|| format!("no entry in {v}"))?;
            let spiffe_id = e["spiffe_id"].as_str().context("no spiffe_id")?;
            last = Some((id.to_owned(), agent, spiffe_id.to_owned()));
        }
        let at = tokio::time::timeout(STEP_TIMEOUT, rx)
            .await
            .with_context(|| format!("change {c} never reached agent {agent}"))?
            .context("the waiter was dropped")?;
        to_agent.push(at.saturating_duration_since(t0));
        tokio::time::sleep_until(paced.into()).await;
    }
    Ok((to_agent, admin, started.elapsed()))
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: fields after its ')'.
    let rest = stat
        .rsplit_once(')')
        .context("unexpected /proc/<pid>/stat")?
        .1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    let utime: u64 = f.get(11).context("no utime")?.parse()?;
    let stime: u64 = f.get(12).context("no stime")?.parse()?;
    Ok(utime + stime)
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Raises this process's soft limit on open files to the hard limit (one
/// socket per agent).
fn raise_open_files_limit() -> Result<u64> {
    mayfly_server::run::raise_open_files_limit().context("raising RLIMIT_NOFILE")
}

/// Runs the scenario; its rows and details.
pub async fn run(args: &SyncScaleArgs) -> Result<(Vec<Row>, Details)> {
    let a = args.resolved()?;
    let limit = raise_open_files_limit()?;
    ensure!(
        limit > (a.agents as u64) + 256,
        "the open files limit ({limit}) is too low for {} agents",
        a.agents
    );
    let nodes_total = a.entries / ENTRIES_PER_NODE;
    let mut d = Details {
        entries: a.entries,
        agents: a.agents,
        nodes: nodes_total,
        entries_per_node: ENTRIES_PER_NODE,
        ..Details::default()
    };
    let nodes: Vec<usize> = (0..a.agents)
        .map(|i| node_of(i, a.agents, nodes_total))
        .collect();

    // 1. Populate.
    let dir = ServerDir::new()?;
    let jsonl = dir.config.with_file_name("entries.jsonl");
    eprintln!("mayfly-bench: sync-scale: writing {} entries", a.entries);
    let t = Instant::now();
    let entries = a.entries;
    let path = jsonl.clone();
    tokio::task::spawn_blocking(move || write_jsonl(&path, entries)).await??;
    d.write_jsonl_seconds = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let out = Command::new(binary("mayfly-server")?)
        .args(["entry", "import", "--output", "json", "--config"])
        .arg(&dir.config)
        .arg(&jsonl)
        .output()
        .context("running mayfly-server entry import")?;
    ensure!(
        out.status.success(),
        "mayfly-server entry import failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    d.import_seconds = t.elapsed().as_secs_f64();
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    ensure!(
        summary["imported"].as_u64() == Some(a.entries as u64),
        "the import reports {summary}, expected {} entries",
        a.entries
    );
    std::fs::remove_file(&jsonl)?;
    d.store_bytes = dir_size(&dir.data_dir().join("store"));
    eprintln!(
        "mayfly-bench: sync-scale: imported in {:.1} s ({} MB store); starting the server",
        d.import_seconds,
        d.store_bytes >> 20
    );

    // 2. Start-up.
    let mut server = tokio::task::spawn_blocking(move || Server::start_in(dir)).await??;
    d.startup_seconds = server.startup.as_secs_f64();
    d.server_rss_after_startup_kb = server.peak_rss_kb();
    let mut rows = Vec::new();
    let mut row = Row::new(
        "sync-scale",
        &format!("start-up, {} entries", a.entries),
        1,
        a.entries as u64,
        server.startup,
        Latency::from_samples(&mut [server.startup]),
    );
    row.server_peak_rss_kb = d.server_rss_after_startup_kb;
    row.budget = format!("start-up < {} s", STARTUP_BUDGET.as_secs());
    row.budget_met = Some(server.startup < STARTUP_BUDGET);
    eprintln!(
        "mayfly-bench: sync-scale: server ready in {:.2} s; {} join tokens",
        d.startup_seconds, a.agents
    );
    rows.push(row);

    // 3. Agents.
    let t = Instant::now();
    let tokens = join_tokens(&server.admin_socket, &nodes, a.connect_concurrency).await?;
    d.tokens_seconds = t.elapsed().as_secs_f64();
    let hub = Arc::new(Hub::default());
    let t = Instant::now();
    let mut connect = connect_all(
        server.node_addr,
        &nodes,
        tokens,
        &hub,
        a.connect_concurrency,
    )
    .await
    .with_context(|| {
        format!(
            "connecting agents (server log {})",
            server.log_path().display()
        )
    })?;
    let connect_time = t.elapsed();
    d.connect_seconds = connect_time.as_secs_f64();
    d.server_rss_after_connect_kb = server.peak_rss_kb();
    let mut row = Row::new(
        "sync-scale",
        &format!("connect {} agents (attest + Sync snapshot)", a.agents),
        a.connect_concurrency,
        a.agents as u64,
        connect_time,
        Latency::from_samples(&mut connect),
    );
    row.server_peak_rss_kb = d.server_rss_after_connect_kb;
    eprintln!("{}", row.progress());
    rows.push(row);

    // 4. Entry changes.
    let (mut to_agent, mut admin, took) = changes(&server.admin_socket, &nodes, &hub, a.changes)
        .await
        .with_context(|| format!("entry changes (server log {})", server.log_path().display()))?;
    let admin_lat = Latency::from_samples(&mut admin);
    d.change_admin_p50_ms = admin_lat.p50_us / 1000.0;
    d.change_admin_p99_ms = admin_lat.p99_us / 1000.0;
    let lat = Latency::from_samples(&mut to_agent);
    d.change_p50_ms = lat.p50_us / 1000.0;
    d.change_p99_ms = lat.p99_us / 1000.0;
    d.change_max_ms = lat.max_us / 1000.0;
    let mut row = Row::new(
        "sync-scale",
        "entry change → its agent's Sync stream",
        1,
        a.changes as u64,
        took,
        lat,
    );
    row.server_peak_rss_kb = server.peak_rss_kb();
    row.budget = format!("p99 < {} ms", CHANGE_P99_BUDGET.as_millis());
    row.budget_met = Some(lat.p99_us < CHANGE_P99_BUDGET.as_secs_f64() * 1e6);
    eprintln!("{}", row.progress());
    rows.push(row);

    // 5. Idle.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ticks = clock_ticks_per_second();
    let me = std::process::id();
    let (s0, b0, m0) = (
        cpu_ticks(server.pid())?,
        cpu_ticks(me)?,
        hub.messages.load(Ordering::Relaxed),
    );
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(a.idle_secs)).await;
    let wall = t.elapsed();
    let (s1, b1, m1) = (
        cpu_ticks(server.pid())?,
        cpu_ticks(me)?,
        hub.messages.load(Ordering::Relaxed),
    );
    #[allow(clippy::cast_precision_loss)]
    let pct = |t0: u64, t1: u64| (t1 - t0) as f64 / ticks / wall.as_secs_f64() * 100.0;
    d.idle_seconds = wall.as_secs_f64();
    d.idle_server_cpu_percent = pct(s0, s1);
    d.idle_bench_cpu_percent = pct(b0, b1);
    d.idle_sync_messages = m1 - m0;
    let mut row = Row::new(
        "sync-scale",
        &format!(
            "idle {:.0} s, {} agents: server CPU {:.2}% of a core, {} Sync messages",
            wall.as_secs_f64(),
            a.agents,
            d.idle_server_cpu_percent,
            d.idle_sync_messages
        ),
        a.agents,
        0,
        wall,
        Latency::from_samples(&mut []),
    );
    row.server_peak_rss_kb = server.peak_rss_kb();
    row.budget = format!("idle CPU < {IDLE_CPU_BUDGET_PERCENT}%");
    row.budget_met = Some(d.idle_server_cpu_percent < IDLE_CPU_BUDGET_PERCENT);
    rows.push(row);

    let ended = hub.ended.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let misdelivered = hub.misdelivered.load(Ordering::Relaxed);
    server.check_running()?;
    d.server_peak_rss_kb = server.stop();
    d.bench_peak_rss_kb = peak_rss_kb(me);
    d.load_average_at_end = crate::harness::report::load_average();
    eprintln!(
        "mayfly-bench: sync-scale: store {} MB; import {:.1} s; start-up {:.2} s; tokens {:.1} s; \
         connect {:.1} s; change p50 {:.1} ms p99 {:.1} ms (admin call p50 {:.1} ms); idle server \
         CPU {:.2}% (bench {:.2}%), {} messages; server peak RSS {} MB, bench {} MB",
        d.store_bytes >> 20,
        d.import_seconds,
        d.startup_seconds,
        d.tokens_seconds,
        d.connect_seconds,
        d.change_p50_ms,
        d.change_p99_ms,
        d.change_admin_p50_ms,
        d.idle_server_cpu_percent,
        d.idle_bench_cpu_percent,
        d.idle_sync_messages,
        d.server_peak_rss_kb.unwrap_or(0) >> 10,
        d.bench_peak_rss_kb.unwrap_or(0) >> 10,
    );
    ensure!(
        ended.is_empty(),
        "{} Sync streams ended early, e.g. {}",
        ended.len(),
        ended[0]
    );
    ensure!(
        misdelivered == 0,
        "{misdelivered} entry changes reached an agent they do not belong to"
    );
    ensure!(
        d.idle_sync_messages == 0,
        "{} Sync messages were sent while nothing changed",
        d.idle_sync_messages
    );
    Ok((rows, d))
}

/// `mayfly-bench sync-scale`: the scenario alone, its table and JSON.
pub fn main(args: &SyncScaleArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()?;
    let mut report = Report::new(args.smoke);
    let (rows, details) = rt.block_on(run(args))?;
    drop(rt);
    report.rows = rows;
    println!("{}", report.table());
    if let Some(path) = &args.json {
        let mut doc = serde_json::to_value(&report)?;
        doc["sync_scale"] = serde_json::to_value(&details)?;
        std::fs::write(path, serde_json::to_string_pretty(&doc)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agents_are_spread_over_distinct_nodes_with_entries() {
        for (agents, nodes) in [(100, 1000), (10_000, 100_000), (7, 7)] {
            let got: std::collections::BTreeSet<usize> =
                (0..agents).map(|a| node_of(a, agents, nodes)).collect();
            assert_eq!(got.len(), agents);
            assert!(got.iter().all(|n| *n < nodes));
        }
    }

    #[test]
    fn the_import_file_puts_ten_entries_under_each_node() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("e.jsonl");
        write_jsonl(&path, 25).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let specs: Vec<mayfly::entry::EntrySpec> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(specs.len(), 25);
        let under = |n| specs.iter().filter(|s| s.parent_id == node_id(n)).count();
        assert_eq!((under(0), under(1), under(2)), (10, 10, 5));
        let td = spiffe::TrustDomain::new(TRUST_DOMAIN).unwrap();
        for s in &specs {
            s.validate(&td, mayfly::entry::EntryId::random(), 1)
                .unwrap();
        }
    }

    #[test]
    fn cpu_ticks_reads_this_process() {
        assert!(cpu_ticks(std::process::id()).is_ok());
    }
}
