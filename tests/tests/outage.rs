//! Faults with real processes: the server SIGKILLed in the middle of
//! writes and restarted on the same data, an agent restarted on its data
//! directory, and an agent whose own SVID expired while it was down.
//!
//! Each test prints how long the workload went without a valid X.509-SVID
//! (the goal is zero).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mayfly_e2e::{Agent, Server, TRUST_DOMAIN, agent_healthcheck, bin, my_uid, wait_for};
use spiffe::WorkloadApiClient;

fn unix_now() -> i64 {
    i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

/// Waits until the Workload API at `endpoint` gives an X.509-SVID for `id`.
async fn wait_for_svid(endpoint: &str, id: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(client) = WorkloadApiClient::connect_to(endpoint).await
            && let Ok(ctx) = client.fetch_x509_context().await
            && ctx.svids().iter().any(|s| s.spiffe_id().to_string() == id)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "no X.509-SVID for {id} at {endpoint} within {timeout:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a workload polling the Workload API every 100 ms saw.
#[derive(Debug, Default)]
struct Availability {
    polls: u32,
    failed_polls: u32,
    longest_gap: Duration,
    total_gap: Duration,
    first_error: Option<String>,
}

/// Polls `fetch_x509_svid` every 100 ms until `stop`; a poll counts as a
/// gap when it fails or returns a certificate outside its validity window.
async fn watch_availability(endpoint: String, stop: Arc<AtomicBool>) -> Availability {
    let mut a = Availability::default();
    let mut gap_since: Option<Instant> = None;
    let mut client = WorkloadApiClient::connect_to(&endpoint).await.ok();
    while !stop.load(Ordering::SeqCst) {
        a.polls += 1;
        let result = match &client {
            Some(c) => c.fetch_x509_svid().await.map_err(|e| e.to_string()),
            None => Err("cannot connect to the Workload API".to_owned()),
        };
        let problem = match result {
            Ok(svid) => {
                let (_, leaf) = x509_parser::parse_x509_certificate(svid.leaf().as_ref()).unwrap();
                let now = unix_now();
                let v = leaf.validity();
                (now < v.not_before.timestamp() || now >= v.not_after.timestamp())
                    .then(|| format!("served a certificate outside its validity window at {now}"))
            }
            Err(e) => Some(e),
        };
        match problem {
            None => {
                if let Some(since) = gap_since.take() {
                    let gap = since.elapsed();
                    a.total_gap += gap;
                    a.longest_gap = a.longest_gap.max(gap);
                }
            }
            Some(e) => {
                a.failed_polls += 1;
                a.first_error.get_or_insert(e);
                gap_since.get_or_insert_with(Instant::now);
                client = WorkloadApiClient::connect_to(&endpoint).await.ok();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if let Some(since) = gap_since {
        let gap = since.elapsed();
        a.total_gap += gap;
        a.longest_gap = a.longest_gap.max(gap);
    }
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sigkilled_mid_write_keeps_acknowledged_entries_and_agents_serve_throughout() {
    let mut server = Server::start().unwrap();
    let port = server.port();
    let agent = Agent::start(&server).unwrap();
    let uid = my_uid();
    let web = format!("spiffe://{TRUST_DOMAIN}/e2e/outage/web");
    server
        .create_entry(&web, &agent.spiffe_id, &[&format!("unix:uid:{uid}")])
        .unwrap();
    wait_for_svid(&agent.endpoint(), &web, Duration::from_secs(20))
        .await
        .unwrap();

    let stop_watch = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(watch_availability(agent.endpoint(), stop_watch.clone()));

    // Create entries with the CLI as fast as it goes; remember which ones the
    // CLI acknowledged (exit 0 and an id printed).
    let stop_writes = Arc::new(AtomicBool::new(false));
    let acked_count = Arc::new(AtomicUsize::new(0));
    let failed_count = Arc::new(AtomicUsize::new(0));
    let writer = {
        let socket = server.admin_socket.clone();
        let parent = agent.spiffe_id.clone();
        let stop = stop_writes.clone();
        let (acked_count, failed_count) = (acked_count.clone(), failed_count.clone());
        std::thread::spawn(move || {
            let mut acked = BTreeMap::new();
            let mut attempts = 0u32;
            while !stop.load(Ordering::SeqCst) {
                attempts += 1;
                let spiffe_id = format!("spiffe://{TRUST_DOMAIN}/e2e/outage/bulk/{attempts}");
                let out = Command::new(bin("mayfly-server"))
                    .args([
                        "entry",
                        "create",
                        "--spiffe-id",
                        &spiffe_id,
                        "--parent-id",
                        &parent,
                    ])
                    .args(["--selector", &format!("unix:uid:{}", 900_000 + attempts)])
                    .args(["--output", "json", "--socket-path"])
                    .arg(&socket)
                    .output()
                    .unwrap();
                if !out.status.success() {
                    failed_count.fetch_add(1, Ordering::SeqCst);
                    continue;
                }
                let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
                let id = v["id"]
                    .as_str()
                    .or_else(|| v["entry"]["id"].as_str())
                    .or_else(|| v["results"][0]["entry"]["id"].as_str());
                if let Some(id) = id {
                    acked.insert(id.to_owned(), spiffe_id);
                    acked_count.fetch_add(1, Ordering::SeqCst);
                } else {
                    failed_count.fetch_add(1, Ordering::SeqCst);
                }
            }
            (attempts, acked)
        })
    };

    // Let it write for about a second (and at least a few acknowledged
    // entries), then SIGKILL the server mid-write.
    let writing = Instant::now();
    wait_for(
        "a second of acknowledged writes",
        Duration::from_secs(20),
        || {
            (writing.elapsed() >= Duration::from_secs(1) && acked_count.load(Ordering::SeqCst) >= 5)
                .then_some(())
        },
    )
    .unwrap();
    let failed_before_kill = failed_count.load(Ordering::SeqCst);
    server.proc.kill();
    let outage_start = Instant::now();
    // Stop the writer once it has seen the server gone (a write failed).
    wait_for(
        "the writer to observe the outage",
        Duration::from_secs(10),
        || (failed_count.load(Ordering::SeqCst) > failed_before_kill).then_some(()),
    )
    .unwrap();
    stop_writes.store(true, Ordering::SeqCst);
    let (attempts, acked) = writer.join().unwrap();
    println!(
        "{attempts} entry creations attempted, {} acknowledged before/around the SIGKILL",
        acked.len()
    );
    assert!(
        !acked.is_empty(),
        "no entry creation was acknowledged in ~1 s"
    );

    // Keep the server down for a few seconds (the watcher polls the
    // Workload API meanwhile): the agent must keep serving.
    wait_for("3 s of outage", Duration::from_secs(10), || {
        (outage_start.elapsed() >= Duration::from_secs(3)).then_some(())
    })
    .unwrap();
    let client = WorkloadApiClient::connect_to(agent.endpoint())
        .await
        .unwrap();
    let during = client.fetch_x509_svid().await;
    assert!(
        during.is_ok(),
        "the agent must serve its cached SVID while the server is down: {:?}",
        during.err()
    );

    // Restart on the same data and address.
    let server2 = Server::start_in(&server.dir, port).unwrap();
    println!("server down for {:?}", outage_start.elapsed());

    // Every acknowledged entry survived.
    let listed = server2.cli_json(&["entry", "list"]).unwrap();
    let present: BTreeMap<String, String> = listed["entries"]
        .as_array()
        .expect("entries array")
        .iter()
        .map(|e| {
            (
                e["id"].as_str().unwrap_or_default().to_owned(),
                e["spiffe_id"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let lost: Vec<_> = acked
        .iter()
        .filter(|(id, sid)| present.get(*id) != Some(sid))
        .collect();
    assert!(
        lost.is_empty(),
        "acknowledged entries lost by the SIGKILL: {lost:?}"
    );
    for id in acked.keys().take(3) {
        let shown = server2.cli_json(&["entry", "show", id]).unwrap();
        assert!(
            shown.to_string().contains(id.as_str()),
            "entry show {id}: {shown}"
        );
    }

    // A new entry reaches the agent without restarting it.
    let after = format!("spiffe://{TRUST_DOMAIN}/e2e/outage/after-restart");
    server2
        .create_entry(&after, &agent.spiffe_id, &[&format!("unix:uid:{uid}")])
        .unwrap();
    let t = Instant::now();
    wait_for_svid(&agent.endpoint(), &after, Duration::from_secs(40))
        .await
        .unwrap();
    println!(
        "entry created after the restart reached the agent in {:?}",
        t.elapsed()
    );

    stop_watch.store(true, Ordering::SeqCst);
    let a = watcher.await.unwrap();
    println!(
        "workload without a valid SVID across the server outage: longest {:?}, total {:?} ({} of {} polls failed; first error: {:?})",
        a.longest_gap, a.total_gap, a.failed_polls, a.polls, a.first_error
    );
    assert_eq!(
        a.failed_polls, 0,
        "the workload went without a valid SVID during the server outage: {a:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_restarted_on_its_data_needs_no_token_and_open_clients_continue() {
    let server = Server::start().unwrap();
    let mut agent = Agent::start(&server).unwrap();
    let uid = my_uid();
    let web = format!("spiffe://{TRUST_DOMAIN}/e2e/restart/web");
    server
        .create_entry(&web, &agent.spiffe_id, &[&format!("unix:uid:{uid}")])
        .unwrap();
    wait_for_svid(&agent.endpoint(), &web, Duration::from_secs(20))
        .await
        .unwrap();
    // An open X509Source across the restart.
    let source = spiffe::X509Source::builder()
        .endpoint(agent.endpoint())
        .build()
        .await
        .unwrap();

    agent.proc.kill();
    let down = Instant::now();
    let restarted = Agent::start_in(&server, &agent.dir, None, &agent.spiffe_id).unwrap();
    println!(
        "agent restarted without a token, ready after {:?}",
        down.elapsed()
    );
    let out = Command::new(bin("mayfly-agent"))
        .args([
            "healthcheck",
            "--output",
            "json",
            "--health-address",
            &restarted.health,
        ])
        .output()
        .unwrap();
    let health: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert!(out.status.success(), "restarted agent not ready: {health}");
    assert_eq!(
        health["agent_id"].as_str(),
        Some(agent.spiffe_id.as_str()),
        "the restarted agent keeps its identity"
    );
    let t = Instant::now();
    wait_for_svid(&restarted.endpoint(), &web, Duration::from_secs(20))
        .await
        .unwrap();
    println!(
        "workload served again {:?} after the agent was ready ({:?} after it was killed)",
        t.elapsed(),
        down.elapsed()
    );

    // The open source reconnected: an entry created now reaches it.
    let later = format!("spiffe://{TRUST_DOMAIN}/e2e/restart/later");
    server
        .create_entry(&later, &agent.spiffe_id, &[&format!("unix:uid:{uid}")])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let has = source
            .x509_context()
            .map(|c| c.svids().iter().any(|s| s.spiffe_id().to_string() == later))
            .unwrap_or(false);
        if has {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "an X509Source open across the agent restart did not receive the new SVID"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    source.shutdown().await;
}

/// Whether health check text says the agent needs a new join token (a line
/// about the join token that is not a `...: no` field).
fn says_needs_join_token(text: &str) -> bool {
    text.lines().any(|l| {
        let l = l.trim().to_lowercase();
        l.contains("join token") && !l.ends_with(": no") && !l.ends_with(": false")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_whose_svid_expired_while_down_asks_for_a_new_join_token_then_recovers() {
    // A short agent SVID (renewed at about half of it while the agent runs).
    let server = Server::start_with("agent_svid_ttl = \"6s\"").unwrap();
    let (token, agent_id) = server.join_token().unwrap();
    let dir = tempfile::Builder::new()
        .prefix("mayfly-e2e-agent")
        .tempdir()
        .unwrap();
    let mut agent =
        Agent::start_in(&server, dir.path(), Some(&token), &agent_id).unwrap_or_else(|e| {
            let log_path = dir.path().join(format!("agent-{}.log", std::process::id()));
            let log = std::fs::read_to_string(log_path).unwrap_or_default();
            panic!(
                "{e}: an agent with a 6 s SVID did not become ready; it renewed its SVID {} times",
                log.matches("renewed the agent SVID").count()
            )
        });
    let svid_pem = std::fs::read(agent.dir.join("data").join("agent-svid.pem")).unwrap();
    agent.proc.kill();

    // Wait (down) until the stored agent SVID has expired.
    let not_after = {
        let (_, pem) = x509_parser::pem::parse_x509_pem(&svid_pem).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&pem.contents).unwrap();
        cert.validity().not_after.timestamp()
    };
    wait_for(
        "the stored agent SVID to expire",
        Duration::from_secs(30),
        || (unix_now() > not_after).then_some(()),
    )
    .unwrap();

    // Restart without a token: it must say it needs a new join token, in its
    // log and in its health check.
    let (mut proc, _socket, health) = Agent::spawn_in(&server, &agent.dir, None).unwrap();
    let found = wait_for(
        "the agent to ask for a new join token",
        Duration::from_secs(20),
        || {
            // An ERROR or WARN line that tells the operator about the join token.
            let log_says = proc.log_text().lines().any(|l| {
                l.to_lowercase().contains("join token")
                    && (l.contains("ERROR") || l.contains("WARN"))
            });
            let (ready, health_text) = agent_healthcheck(&health);
            let health_says = says_needs_join_token(&health_text);
            (log_says && (health_says || proc.try_wait().is_some())).then_some((ready, health_text))
        },
    );
    let log = proc.log_text();
    let (ready, health_text) = found.unwrap_or_else(|e| {
        let (_, h) = agent_healthcheck(&health);
        panic!("{e}\n--- healthcheck ---\n{h}\n--- agent log ---\n{log}")
    });
    println!("healthcheck of the agent with an expired SVID: {health_text}");
    assert!(!ready, "an agent with an expired SVID must not be ready");
    let exited = proc.try_wait();
    assert!(
        exited.is_some() || says_needs_join_token(&health_text),
        "a running agent must say in its health check that it needs a new join token: {health_text}"
    );
    proc.kill();

    // With a new token it recovers (a new agent identity) and serves.
    let (token, new_id) = server.join_token().unwrap();
    let recovered = Agent::start_in(&server, &agent.dir, Some(&token), &new_id).unwrap();
    let web = format!("spiffe://{TRUST_DOMAIN}/e2e/expired/web");
    server
        .create_entry(&web, &new_id, &[&format!("unix:uid:{}", my_uid())])
        .unwrap();
    wait_for_svid(&recovered.endpoint(), &web, Duration::from_secs(20))
        .await
        .unwrap();
}
