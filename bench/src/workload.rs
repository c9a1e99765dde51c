//! Scenario 3, `workload`: the Workload API of a real `mayfly-agent`
//! process attested to a real `mayfly-server`, both on loopback.
//!
//! 1. **Cached fetch.** A shared-scope entry for this uid, its X.509-SVID
//!    already signed and cached by the agent. Each client is the Rust `spiffe`
//!    crate's `WorkloadApiClient` on its own connection, calling
//!    `fetch_x509_svid` in a closed loop (one `FetchX509SVID` call up to the
//!    first message, which the crate parses and checks); one row per
//!    concurrency. The agent attests the caller on every call.
//! 2. **Streams and one rotation.** N connections, one `FetchX509SVID` stream
//!    each, all held open (the first answer of each timed: "open"). Then one
//!    rotation: an operator changes the entry's DNS names with
//!    `mayfly-server entry update --dns` (the server pushes the change to the
//!    agent over `Sync`; the agent must sign a new SVID, because the old one no
//!    longer matches its entry, and push it into every stream). Measured from
//!    just before the CLI starts until each stream receives a message whose
//!    SVID differs from its first; the slowest stream is the figure.
//! 3. **First credential of a new task.** A task-scoped entry replaces the
//!    shared one. Each sample is a new process (this binary's hidden
//!    `workload-task` mode) that connects, then times from the
//!    `fetch_all_x509_svids` call to the answer: attestation, a new task, a key
//!    pair, `SignX509` to the server (which records and audits it durably) and
//!    the stream's first message. Process start and connection are not
//!    included.
//!
//! Every answer is checked (the SVID parses, its URI SAN is the entry's SPIFFE
//! ID; after the rotation, it carries the new DNS name). Budgets are shown,
//! never enforced: the smoke mode fails only on wrong answers.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use mayfly::proto::workload::X509svidRequest;
use mayfly::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tokio::sync::{Semaphore, mpsc};
use tonic::transport::Channel;
use x509_parser::extensions::{GeneralName, ParsedExtension};

use crate::harness::{Agent, Latency, Row, Server, TRUST_DOMAIN, Worker, measure_variant};
use crate::scenario::{Settings, check_svid};

/// The budgets.
const CACHED_P99_BUDGET_US: f64 = 1_000.0;
const FIRST_P99_BUDGET_US: f64 = 10_000.0;
const ROTATION_BUDGET: Duration = Duration::from_secs(2);
const BUDGET_STREAMS: usize = 10_000;

/// Streams being opened at once (connect + first answer).
const OPENING_AT_ONCE: usize = 64;

/// How long the agent may take to serve a new entry, and the streams to see
/// the rotation, before the run fails.
const WAIT: Duration = Duration::from_secs(60);

/// Flags of the hidden `workload-task` mode.
#[derive(Debug, clap::Args)]
pub struct TaskArgs {
    /// The agent's Workload API socket.
    #[arg(long)]
    socket: PathBuf,
}

/// The `workload-task` mode: connect with the `spiffe` crate, then time one
/// `fetch_all_x509_svids`; print the microseconds and each SVID's SPIFFE ID
/// and leaf (hex DER) on one line each.
pub fn task_child(args: &TaskArgs) -> Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            let client =
                spiffe::WorkloadApiClient::connect_to(format!("unix:{}", args.socket.display()))
                    .await
                    .map_err(|e| anyhow!("connecting to the Workload API: {e}"))?;
            let t = Instant::now();
            let svids = client
                .fetch_all_x509_svids()
                .await
                .map_err(|e| anyhow!("FetchX509SVID: {e}"))?;
            let us = t.elapsed().as_micros();
            println!("{us}");
            for s in &svids {
                println!("{} {}", s.spiffe_id(), hex(s.leaf().as_ref()));
            }
            Ok(())
        })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>> {
    ensure!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).context("bad hex"))
        .collect()
}

/// Runs the scenario; its rows.
pub async fn run(settings: &Settings) -> Result<Vec<Row>> {
    let streams = raise_fd_limit(settings.streams)?;
    let mut server = Server::start()?;
    let mut agent = Agent::start(&server)?;
    let selector = format!("unix:uid:{}", crate::uid()?);
    let shared_id = format!("spiffe://{TRUST_DOMAIN}/bench/workload/shared");
    let shared_entry = server.create_entry_with(
        &shared_id,
        &agent.spiffe_id,
        &selector,
        &["--scope", "shared"],
    )?;
    let socket = agent.socket.clone();
    wait_until_served(&socket, &shared_id).await?;

    let mut rows = Vec::new();
    for &c in &settings.concurrencies {
        let mut workers = Vec::with_capacity(c);
        for _ in 0..c {
            workers.push(CachedFetch::connect(&socket, &shared_id, settings.smoke).await?);
        }
        let cpu_before = agent.cpu_time();
        let mut row = measure_variant(
            &mut server,
            "workload",
            "cached FetchX509SVID (spiffe crate)",
            workers,
            settings.duration,
        )
        .await
        .with_context(|| format!("agent log: {}", agent.log_path().display()))?;
        agent.check_running()?;
        if let (Some(before), Some(after)) = (cpu_before, agent.cpu_time()) {
            #[allow(clippy::cast_precision_loss)]
            let per_call = (after - before).as_secs_f64() * 1e6 / row.ops.max(1) as f64;
            eprintln!(
                "mayfly-bench: workload: the agent used {per_call:.0} µs of CPU per cached fetch at c={c}"
            );
        }
        row.agent_peak_rss_kb = agent.peak_rss_kb();
        if c == 1 {
            row.budget = "p99 < 1 ms".into();
            row.budget_met = Some(row.p99_us < CACHED_P99_BUDGET_US);
        }
        eprintln!("{}", row.progress());
        rows.push(row);
    }

    rows.extend(
        streams_and_rotation(&mut server, &mut agent, &shared_entry, &shared_id, streams)
            .await
            .with_context(|| format!("agent log: {}", agent.log_path().display()))?,
    );

    // The task-scoped entry replaces the shared one, so that a task's first
    // answer holds only its own, newly signed SVID.
    let task_id = format!("spiffe://{TRUST_DOMAIN}/bench/workload/task");
    server.create_entry_with(&task_id, &agent.spiffe_id, &selector, &["--scope", "task"])?;
    server.cli_text(&["entry", "delete", &shared_entry])?;
    let row = first_credentials(&mut server, &mut agent, &task_id, settings.tasks)
        .await
        .with_context(|| format!("agent log: {}", agent.log_path().display()))?;
    rows.push(row);

    agent.stop();
    server.stop();
    Ok(rows)
}

/// Raises this process's open-file limit (each stream is a connection) and
/// returns how many streams fit under it: `wanted`, or fewer (with a warning)
/// when the hard limit is too low.
fn raise_fd_limit(wanted: usize) -> Result<usize> {
    let limit = mayfly_agent::limits::raise_open_files_limit()?;
    // Room for the runtime, the log files and the child processes' pipes.
    let spare = 256;
    let fits = limit.now.map_or(wanted, |n| {
        usize::try_from(n)
            .unwrap_or(usize::MAX)
            .saturating_sub(spare)
    });
    if fits < wanted {
        eprintln!(
            "mayfly-bench: the open-file limit ({:?}, hard {:?}) allows {fits} streams, not {wanted}; \
             raise it (ulimit -Hn) to measure {wanted}",
            limit.now, limit.hard
        );
        ensure!(fits > 0, "the open-file limit leaves no room for streams");
        return Ok(fits);
    }
    Ok(wanted)
}

/// Waits until the agent serves `spiffe_id` to this process.
async fn wait_until_served(socket: &Path, spiffe_id: &str) -> Result<()> {
    let deadline = Instant::now() + WAIT;
    loop {
        let last = async {
            let client = spiffe::WorkloadApiClient::connect_to(endpoint(socket))
                .await
                .map_err(|e| anyhow!("{e}"))?;
            let svids = client
                .fetch_all_x509_svids()
                .await
                .map_err(|e| anyhow!("{e}"))?;
            ensure!(
                svids.iter().any(|s| s.spiffe_id().to_string() == spiffe_id),
                "not served yet"
            );
            Ok(())
        }
        .await;
        match last {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("the agent never served {spiffe_id}")));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn endpoint(socket: &Path) -> String {
    format!("unix:{}", socket.display())
}

/// One connected `spiffe` crate client fetching the cached SVID.
struct CachedFetch {
    client: spiffe::WorkloadApiClient,
    spiffe_id: String,
    check_every: bool,
    calls: u64,
}

impl CachedFetch {
    async fn connect(socket: &Path, spiffe_id: &str, check_every: bool) -> Result<Self> {
        Ok(Self {
            client: spiffe::WorkloadApiClient::connect_to(endpoint(socket))
                .await
                .map_err(|e| anyhow!("connecting to the Workload API: {e}"))?,
            spiffe_id: spiffe_id.to_owned(),
            check_every,
            calls: 0,
        })
    }
}

impl Worker for CachedFetch {
    async fn call(&mut self) -> Result<()> {
        let svid = self
            .client
            .fetch_x509_svid()
            .await
            .map_err(|e| anyhow!("FetchX509SVID: {e}"))?;
        self.calls += 1;
        if self.check_every || self.calls == 1 {
            check_svid(svid.leaf().as_ref(), &self.spiffe_id)?;
        }
        Ok(())
    }
}

/// What one stream saw.
struct StreamSeen {
    /// From connecting until its first answer.
    opened: Duration,
    /// The leaf of its first answer.
    first_leaf: Vec<u8>,
}

/// What one stream saw after the rotation.
struct Rotated {
    /// When the new SVID arrived.
    at: Instant,
    /// Its leaf.
    leaf: Vec<u8>,
    /// The stream and its connection, kept open until every stream is done.
    _held: (
        tonic::Streaming<mayfly::proto::workload::X509svidResponse>,
        Channel,
    ),
}

async fn open_stream(
    socket: &Path,
) -> Result<(
    tonic::Streaming<mayfly::proto::workload::X509svidResponse>,
    Channel,
    Vec<u8>,
)> {
    let channel = mayfly_agent::api::connect(socket).await?;
    let mut client = SpiffeWorkloadApiClient::new(channel.clone());
    let mut stream = client
        .fetch_x509svid(mayfly_agent::api::request(X509svidRequest {}))
        .await
        .map_err(|s| anyhow!("FetchX509SVID: {:?} {}", s.code(), s.message()))?
        .into_inner();
    let leaf = next_leaf(&mut stream).await?;
    Ok((stream, channel, leaf))
}

async fn next_leaf(
    stream: &mut tonic::Streaming<mayfly::proto::workload::X509svidResponse>,
) -> Result<Vec<u8>> {
    let msg = stream
        .message()
        .await
        .map_err(|s| anyhow!("FetchX509SVID stream: {:?} {}", s.code(), s.message()))?
        .context("FetchX509SVID stream ended")?;
    let svid = msg
        .svids
        .into_iter()
        .next()
        .context("an answer without SVIDs")?;
    // `x509_svid` is the DER chain, leaf first.
    let (rest, _) = x509_parser::parse_x509_certificate(&svid.x509_svid)
        .map_err(|e| anyhow!("the SVID does not parse: {e}"))?;
    let leaf_len = svid.x509_svid.len() - rest.len();
    let mut leaf = svid.x509_svid;
    leaf.truncate(leaf_len);
    Ok(leaf)
}

/// The DNS names of a certificate.
fn dns_names(der: &[u8]) -> Result<Vec<String>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow!("the SVID does not parse: {e}"))?;
    let mut names = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::DNSName(d) = name {
                    names.push((*d).to_owned());
                }
            }
        }
    }
    Ok(names)
}

/// Opens `n` streams, then rotates the entry's SVID once; two rows.
async fn streams_and_rotation(
    server: &mut Server,
    agent: &mut Agent,
    entry_id: &str,
    spiffe_id: &str,
    n: usize,
) -> Result<Vec<Row>> {
    eprintln!("mayfly-bench: workload: opening {n} FetchX509SVID streams");
    let rss_before = agent.rss_kb();
    let gate = Arc::new(Semaphore::new(OPENING_AT_ONCE));
    let (opened_tx, mut opened_rx) = mpsc::unbounded_channel::<Result<StreamSeen>>();
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let mut set = tokio::task::JoinSet::new();
    let open_start = Instant::now();
    for _ in 0..n {
        let socket = agent.socket.clone();
        let gate = Arc::clone(&gate);
        let opened_tx = opened_tx.clone();
        let mut go_rx = go_rx.clone();
        set.spawn(async move {
            let permit = gate.acquire_owned().await?;
            let t = Instant::now();
            let (mut stream, channel, first_leaf) = match open_stream(&socket).await {
                Ok(v) => v,
                Err(e) => {
                    let _ = opened_tx.send(Err(anyhow!("{e:#}")));
                    return Err(e);
                }
            };
            let opened = t.elapsed();
            drop(permit);
            let _ = opened_tx.send(Ok(StreamSeen {
                opened,
                first_leaf: first_leaf.clone(),
            }));
            // Nothing but the rotation is expected; anything that arrives
            // before it (the same SVID again) is not counted.
            go_rx.wait_for(|go| *go).await?;
            loop {
                let leaf = next_leaf(&mut stream).await?;
                if leaf != first_leaf {
                    return Ok(Rotated {
                        at: Instant::now(),
                        leaf,
                        _held: (stream, channel),
                    });
                }
            }
        });
    }
    drop(opened_tx);
    let mut open_samples = Vec::with_capacity(n);
    let mut first_leaves = Vec::with_capacity(n);
    while open_samples.len() < n {
        let seen = tokio::time::timeout(WAIT, opened_rx.recv())
            .await
            .context("streams stopped opening")?
            .context("a stream task ended early")??;
        open_samples.push(seen.opened);
        first_leaves.push(seen.first_leaf);
        if open_samples.len().is_multiple_of(1000) {
            eprintln!(
                "mayfly-bench: workload: {} streams open",
                open_samples.len()
            );
        }
    }
    let open_elapsed = open_start.elapsed();
    server.check_running()?;
    agent.check_running()?;
    let rss_held = agent.rss_kb();
    for leaf in &first_leaves {
        ensure!(
            leaf == &first_leaves[0],
            "two streams got different SVIDs before the rotation"
        );
    }
    check_svid(&first_leaves[0], spiffe_id)?;
    let mut open_row = Row::new(
        "workload",
        "open a FetchX509SVID stream, first answer",
        n,
        n as u64,
        open_elapsed,
        Latency::from_samples(&mut open_samples),
    );
    open_row.server_peak_rss_kb = server.peak_rss_kb();
    open_row.agent_peak_rss_kb = agent.peak_rss_kb();
    open_row.budget = if n >= BUDGET_STREAMS {
        format!("{BUDGET_STREAMS} streams held")
    } else {
        String::new()
    };
    open_row.budget_met = (n >= BUDGET_STREAMS).then_some(true);
    eprintln!("{}", open_row.progress());
    #[allow(clippy::cast_precision_loss)]
    let per_stream = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) => format!("{:.1} kB", a.saturating_sub(b) as f64 / n as f64),
        _ => "?".into(),
    };
    eprintln!(
        "mayfly-bench: workload: agent RSS {:?} kB before, {:?} kB with {n} streams ({} per stream)",
        rss_before,
        rss_held,
        per_stream(rss_held, rss_before)
    );

    // The rotation.
    let dns = format!("rotated-{}.bench.example.org", std::process::id());
    go_tx.send_replace(true);
    let trigger = Instant::now();
    server.cli_json(&["entry", "update", entry_id, "--dns", &dns])?;
    let acked = trigger.elapsed();
    let mut arrivals = Vec::with_capacity(n);
    let mut rotated_leaves = Vec::with_capacity(n);
    let mut held = Vec::with_capacity(n);
    let deadline = tokio::time::Instant::now() + WAIT;
    while let Some(joined) = tokio::time::timeout_at(deadline, set.join_next())
        .await
        .with_context(|| {
            format!(
                "{} of {n} streams never received the rotated SVID",
                n - arrivals.len()
            )
        })?
    {
        let r = joined.context("a stream task panicked")??;
        arrivals.push(r.at.saturating_duration_since(trigger));
        rotated_leaves.push(r.leaf);
        held.push(r._held);
    }
    ensure!(
        arrivals.len() == n,
        "only {} of {n} streams rotated",
        arrivals.len()
    );
    let last = arrivals.iter().max().copied().unwrap_or_default();
    for leaf in &rotated_leaves {
        ensure!(
            leaf == &rotated_leaves[0],
            "two streams got different SVIDs after the rotation"
        );
    }
    check_svid(&rotated_leaves[0], spiffe_id)?;
    let names = dns_names(&rotated_leaves[0])?;
    if !names.contains(&dns) {
        bail!("the rotated SVID's DNS names are {names:?}, expected {dns}");
    }
    server.check_running()?;
    agent.check_running()?;
    let mut row = Row::new(
        "workload",
        "one rotation pushed to every stream",
        n,
        n as u64,
        last,
        Latency::from_samples(&mut arrivals),
    );
    row.server_peak_rss_kb = server.peak_rss_kb();
    row.agent_peak_rss_kb = agent.peak_rss_kb();
    if n >= BUDGET_STREAMS {
        row.budget = format!("last stream < 2 s (last {:.2} s)", last.as_secs_f64());
        row.budget_met = Some(last < ROTATION_BUDGET);
    }
    eprintln!(
        "{}; last stream {:.0} ms after the trigger (the CLI's write was acknowledged after {:.0} ms)",
        row.progress(),
        last.as_secs_f64() * 1e3,
        acked.as_secs_f64() * 1e3
    );
    drop(held);
    Ok(vec![open_row, row])
}

/// Runs `n` new tasks one after another; the row of their first credentials.
async fn first_credentials(
    server: &mut Server,
    agent: &mut Agent,
    spiffe_id: &str,
    n: usize,
) -> Result<Row> {
    let exe = std::env::current_exe()?;
    // Until the agent has the new entry (and no longer the old one), tasks
    // get other answers; those runs are not counted.
    let deadline = Instant::now() + WAIT;
    loop {
        match run_task(&exe, &agent.socket, spiffe_id).await {
            Ok(_) => break,
            Err(e) if Instant::now() > deadline => {
                return Err(e.context("the task-scoped entry was never served"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    eprintln!("mayfly-bench: workload: measuring the first credential of {n} new tasks");
    let start = Instant::now();
    let mut samples = Vec::with_capacity(n);
    let mut serials = std::collections::HashSet::new();
    for _ in 0..n {
        let (took, leaf) = run_task(&exe, &agent.socket, spiffe_id).await?;
        ensure!(
            serials.insert(leaf),
            "two tasks got the same SVID: task-scoped SVIDs must be one per task"
        );
        samples.push(took);
    }
    let elapsed = start.elapsed();
    server.check_running()?;
    agent.check_running()?;
    let mut row = Row::new(
        "workload",
        "first credential of a new task (SignX509)",
        1,
        n as u64,
        elapsed,
        Latency::from_samples(&mut samples),
    );
    row.server_peak_rss_kb = server.peak_rss_kb();
    row.agent_peak_rss_kb = agent.peak_rss_kb();
    row.budget = "p99 < 10 ms".into();
    row.budget_met = Some(row.p99_us < FIRST_P99_BUDGET_US);
    eprintln!(
        "{} (per second: tasks started, one at a time)",
        row.progress()
    );
    Ok(row)
}

/// Starts one task process; the time it measured and its SVID's leaf, after
/// checking that it got exactly one SVID, for `spiffe_id`.
async fn run_task(exe: &Path, socket: &Path, spiffe_id: &str) -> Result<(Duration, Vec<u8>)> {
    let out = tokio::process::Command::new(exe)
        .arg("workload-task")
        .arg("--socket")
        .arg(socket)
        .stdin(std::process::Stdio::null())
        .output()
        .await?;
    if !out.status.success() {
        bail!(
            "task failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8(out.stdout)?;
    let mut lines = text.lines();
    let us: u64 = lines
        .next()
        .and_then(|l| l.trim().parse().ok())
        .context("the task printed no time")?;
    let svids: Vec<&str> = lines.collect();
    let [line] = svids.as_slice() else {
        bail!("the task got {} SVIDs, expected 1", svids.len());
    };
    let (id, leaf) = line.split_once(' ').context("malformed task output")?;
    ensure!(id == spiffe_id, "the task got {id}, expected {spiffe_id}");
    let leaf = unhex(leaf)?;
    check_svid(&leaf, spiffe_id)?;
    Ok((Duration::from_micros(us), leaf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        let b = [0u8, 1, 0xab, 0xff];
        assert_eq!(unhex(&hex(&b)).unwrap(), b);
        assert!(unhex("abc").is_err());
        assert!(unhex("zz").is_err());
    }
}
