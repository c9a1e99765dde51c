//! Task-scoped credentials with real processes: the built `mayfly-agent` binary is the
//! workload (a child process that connects to the socket), the agent side runs in this process
//! against the stand-in node API.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use mayfly::clock::SystemClock;
use mayfly::proto::node as pb;
use mayfly::proto::workload::X509svidRequest;
use mayfly::proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use mayfly_agent::api::{self, WorkloadApi};
use mayfly_agent::cache::Cache;
use mayfly_agent::client::ServerClient;
use mayfly_agent::client::tls::TrustAnchors;
use mayfly_agent::storage::Storage;
use mayfly_agent::sync::Syncer;
use mayfly_agent::task::{PidfdWatcher, Tasks};
use mayfly_agent::workload::UnixAttestor;
use support::*;
use tokio::io::AsyncBufReadExt as _;
use tokio::sync::watch;
use tonic::Code;

const BIN: &str = env!("CARGO_BIN_EXE_mayfly-agent");

fn uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// A task-scoped entry for every process of this user.
fn task_entry() -> pb::Entry {
    pb::Entry {
        id: "job".into(),
        spiffe_id: "spiffe://example.org/job".into(),
        parent_id: "spiffe://example.org/mayfly/agent/join_token/tok0".into(),
        selectors: vec![pb::Selector {
            r#type: "unix".into(),
            value: format!("uid:{}", uid()),
        }],
        scope: "task".into(),
        revision: 1,
        ..Default::default()
    }
}

fn server() -> Arc<MockState> {
    let state = MockState::new();
    *state.entries.lock().unwrap() = vec![task_entry()];
    state
}

/// The agent's parts that matter here, on a real socket, with its data in `data_dir`.
struct Agent {
    socket: PathBuf,
    cache: Cache,
    stop: watch::Sender<bool>,
    jobs: Vec<tokio::task::JoinHandle<()>>,
    server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Agent {
    async fn start(state: &Arc<MockState>, data_dir: &Path, wait_ready: bool) -> Self {
        let transport = MemTransport::start(state.clone());
        let client = ServerClient::new(td(), transport);
        client.set_identity(state.agent_svid(time::Duration::hours(1)));
        let cache = Cache::new();
        let (stop, stop_rx) = watch::channel(false);
        let syncer = Syncer::new(
            client.clone(),
            cache.clone(),
            Storage::open(data_dir).unwrap(),
            TrustAnchors::default(),
            Arc::new(SystemClock),
            None,
        );
        let mut jobs = vec![tokio::spawn(syncer.run(stop_rx.clone()))];
        let client = Arc::new(client);
        let tasks = Tasks::new(
            cache.clone(),
            Arc::new(PidfdWatcher::new()),
            client.clone(),
            data_dir,
            Arc::new(SystemClock),
        )
        .unwrap();
        jobs.push(tokio::spawn(tasks.clone().run(stop_rx.clone())));
        let api = WorkloadApi::new(cache.clone(), Arc::new(UnixAttestor::new()), client, td())
            .with_tasks(tasks)
            .with_pending_wait(Duration::from_secs(5));
        let socket = data_dir.join("api.sock");
        let mut rx = stop_rx.clone();
        let server = tokio::spawn({
            let socket = socket.clone();
            async move {
                api::serve_api(&socket, api, async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await
            }
        });
        for _ in 0..500 {
            if tokio::net::UnixStream::connect(&socket).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if wait_ready {
            wait_for_cache(&cache, |s| s.ready).await;
        }
        Self {
            socket,
            cache,
            stop,
            jobs,
            server,
        }
    }

    async fn stop(self) {
        self.stop.send_replace(true);
        for job in self.jobs {
            tokio::time::timeout(Duration::from_secs(10), job)
                .await
                .unwrap()
                .unwrap();
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.server).await;
    }

    fn socket_arg(&self) -> String {
        self.socket.display().to_string()
    }

    async fn client(&self) -> SpiffeWorkloadApiClient<tonic::transport::Channel> {
        SpiffeWorkloadApiClient::new(api::connect(&self.socket).await.unwrap())
    }
}

/// Runs `mayfly-agent api fetch x509` as a child workload: its serial and key file contents.
async fn child_fetch(agent: &Agent, out: &Path) -> (u32, String, Vec<u8>) {
    let child = tokio::process::Command::new(BIN)
        .args(["api", "fetch", "x509", "--output", "json", "--socket-path"])
        .arg(agent.socket_arg())
        .arg("--write")
        .arg(out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let output = child.wait_with_output().await.unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let serial = doc["svids"][0]["serial"].as_str().unwrap().to_owned();
    let key = std::fs::read(out.join("svid.0.key")).unwrap();
    (pid, serial, key)
}

fn task_end_of(state: &MockState, pid: u32) -> Option<pb::TaskEnd> {
    let prefix = format!("unix:{pid}:");
    state
        .task_ends
        .lock()
        .unwrap()
        .iter()
        .find(|t| t.task_id.starts_with(&prefix))
        .cloned()
}

fn serial_of(response: &mayfly::proto::workload::X509svidResponse) -> String {
    let chain = mayfly::x509::chain_from_concatenated_der(&response.svids[0].x509_svid).unwrap();
    mayfly::x509::SvidInfo::from_der(&chain[0])
        .unwrap()
        .serial_hex
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_get_their_own_key_and_serial_and_an_exit_reports_only_its_own() {
    let state = server();
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&state, dir.path(), true).await;

    let (pid1, serial1, key1) = child_fetch(&agent, &dir.path().join("one")).await;
    let (pid2, serial2, key2) = child_fetch(&agent, &dir.path().join("two")).await;
    assert_ne!(serial1, serial2, "each task has its own SVID");
    assert_ne!(key1, key2, "and its own key");
    let signed = state.sign_items.lock().unwrap().clone();
    assert!(
        signed
            .iter()
            .any(|(e, t)| e == "job" && t.starts_with(&format!("unix:{pid1}:"))),
        "SignX509 carries the task id: {signed:?}"
    );
    assert!(
        agent.cache.current().svids.is_empty(),
        "no per-entry SVID for a task-scoped entry"
    );

    // Each exit is reported with that task's serial only.
    eventually("both task ends reported", || {
        task_end_of(&state, pid1).is_some() && task_end_of(&state, pid2).is_some()
    })
    .await;
    let end1 = task_end_of(&state, pid1).unwrap();
    assert_eq!(end1.x509_serials, vec![serial1]);
    assert_eq!(end1.reason, "task_ended");
    assert!(end1.ended_at > 0);
    assert_eq!(
        task_end_of(&state, pid2).unwrap().x509_serials,
        vec![serial2]
    );
    // The agent forgot them, and the queue is empty once acknowledged.
    eventually("queue drained", || {
        std::fs::read_to_string(dir.path().join("pending-task-ends.jsonl"))
            .is_ok_and(|t| t.trim().is_empty())
    })
    .await;
    assert!(agent.cache.current().tasks.is_empty());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_complete_revokes_without_the_process_exiting_and_refuses_it_afterwards() {
    let state = server();
    *state.crls.lock().unwrap() = vec![b"crl-1".to_vec()];
    *state.jwt_expires_at.lock().unwrap() =
        Some(time::OffsetDateTime::now_utc().unix_timestamp() + 600);
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&state, dir.path(), true).await;

    // This test process is the workload: its task gets an SVID, on a stream that stays open.
    let mut client = agent.client().await;
    let mut stream = client
        .fetch_x509svid(api::request(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    let serial = serial_of(&first);
    assert_eq!(first.crl, vec![b"crl-1".to_vec()], "the server's CRLs");
    // A new CRL is pushed on the open stream.
    state
        .updates
        .send(pb::SyncResponse {
            revision: 2,
            crls: vec![b"crl-2".to_vec()],
            ..Default::default()
        })
        .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(next.crl, vec![b"crl-2".to_vec()]);
    assert_eq!(serial_of(&next), serial, "same SVID");

    // A JWT-SVID for this task: minted with its task id, reused by it.
    let jwt = |mut c: SpiffeWorkloadApiClient<tonic::transport::Channel>| async move {
        c.fetch_jwtsvid(api::request(mayfly::proto::workload::JwtsvidRequest {
            audience: vec!["db".into()],
            spiffe_id: String::new(),
        }))
        .await
    };
    assert!(jwt(client.clone()).await.is_ok());
    assert!(jwt(client.clone()).await.is_ok());
    assert_eq!(state.calls("MintJwt"), 1, "reused within the task");

    // Another process (the CLI, same user) completes this process's task.
    let me = std::process::id();
    let output = tokio::process::Command::new(BIN)
        .args(["task", "complete", "--output", "json", "--pid"])
        .arg(me.to_string())
        .arg("--socket-path")
        .arg(agent.socket_arg())
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(
        doc["task_id"]
            .as_str()
            .unwrap()
            .starts_with(&format!("unix:{me}:"))
    );
    assert_eq!(doc["revoked_x509_serials"], serde_json::json!([serial]));
    let task_id = doc["task_id"].as_str().unwrap().to_owned();
    assert_eq!(
        doc["revoked_jwt_ids"],
        serde_json::json!([format!("jti-job-{task_id}")])
    );

    // The open stream ends, and a new request from this (still running) process is refused.
    let ended = tokio::time::timeout(Duration::from_secs(5), stream.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(ended.code(), Code::PermissionDenied);
    let again = client
        .fetch_x509svid(api::request(X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::PermissionDenied);
    assert_eq!(again.message(), "task completed");
    let jwt_refused = jwt(client.clone()).await.unwrap_err();
    assert_eq!(jwt_refused.code(), Code::PermissionDenied);

    eventually("the completion reported", || {
        task_end_of(&state, me).is_some()
    })
    .await;
    let end = task_end_of(&state, me).unwrap();
    assert_eq!(end.reason, "task_completed");
    assert_eq!(end.x509_serials, vec![serial]);

    // A process that never asked can be completed too (it stays alive): nothing to revoke.
    let mut sleeper = tokio::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let output = tokio::process::Command::new(BIN)
        .args(["task", "complete", "--output", "json", "--pid"])
        .arg(sleeper.id().unwrap().to_string())
        .arg("--socket-path")
        .arg(agent.socket_arg())
        .output()
        .await
        .unwrap();
    assert!(output.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(doc["revoked_x509_serials"], serde_json::json!([]));
    sleeper.kill().await.unwrap();
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_end_while_the_server_is_down_is_delivered_after_it_returns_across_a_restart() {
    let state = server();
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&state, dir.path(), true).await;

    // A workload that stays alive, following its SVID.
    let mut child = tokio::process::Command::new(BIN)
        .args(["api", "watch", "--output", "json", "--socket-path"])
        .arg(agent.socket_arg())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_str(&line).unwrap();
    let serial = doc["svids"][0]["serial"].as_str().unwrap().to_owned();

    // The server goes down, then the workload ends.
    state.set_down(true);
    child.kill().await.unwrap();
    let queue = dir.path().join("pending-task-ends.jsonl");
    eventually("the task end queued on disk", || {
        std::fs::read_to_string(&queue).is_ok_and(|t| t.contains(&serial))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(task_end_of(&state, pid).is_none(), "the server is down");

    // The agent restarts while the server is still down; then the server returns.
    agent.stop().await;
    let agent = Agent::start(&state, dir.path(), false).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(task_end_of(&state, pid).is_none());
    state.set_down(false);
    eventually("the task end delivered", || {
        task_end_of(&state, pid).is_some()
    })
    .await;
    let end = task_end_of(&state, pid).unwrap();
    assert_eq!(end.x509_serials, vec![serial]);
    assert_eq!(end.reason, "task_ended");
    eventually("the queue emptied", || {
        std::fs::read_to_string(&queue).is_ok_and(|t| t.trim().is_empty())
    })
    .await;
    assert_eq!(state.task_ends.lock().unwrap().len(), 1, "delivered once");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_restart_keeps_live_tasks_credentials_for_revocation() {
    let state = server();
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&state, dir.path(), true).await;

    // A workload that follows its SVID (it exits when the agent goes away) ...
    let mut child = tokio::process::Command::new(BIN)
        .args(["api", "watch", "--output", "json", "--socket-path"])
        .arg(agent.socket_arg())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let child_pid = child.id().unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let doc: serde_json::Value = serde_json::from_str(&line).unwrap();
    let child_serial = doc["svids"][0]["serial"].as_str().unwrap().to_owned();
    // ... and this test process, which keeps running.
    let mut client = agent.client().await;
    let mine = client
        .fetch_x509svid(api::request(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    let my_serial = serial_of(&mine);
    drop(client);

    agent.stop().await;
    let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    let live = std::fs::read_to_string(dir.path().join("live-tasks.json")).unwrap();
    assert!(live.contains(&my_serial), "{live}");

    // The next run reports the task that ended while it was down ...
    let agent = Agent::start(&state, dir.path(), true).await;
    eventually("the child's end reported", || {
        task_end_of(&state, child_pid).is_some()
    })
    .await;
    assert_eq!(
        task_end_of(&state, child_pid).unwrap().x509_serials,
        vec![child_serial]
    );
    let me = std::process::id();
    assert!(task_end_of(&state, me).is_none(), "this process still runs");
    // ... and still knows what this live process was issued before the restart.
    let output = tokio::process::Command::new(BIN)
        .args(["task", "complete", "--output", "json", "--pid"])
        .arg(me.to_string())
        .arg("--socket-path")
        .arg(agent.socket_arg())
        .output()
        .await
        .unwrap();
    assert!(output.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(doc["revoked_x509_serials"], serde_json::json!([my_serial]));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_svid_is_renewed_at_half_life_and_both_serials_are_reported() {
    let state = server();
    *state.svid_ttl.lock().unwrap() = time::Duration::seconds(4);
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&state, dir.path(), true).await;
    let mut client = agent.client().await;
    let mut stream = client
        .fetch_x509svid(api::request(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = serial_of(&stream.message().await.unwrap().unwrap());
    // Pushed on the open stream at about 2 s.
    let renewed = tokio::time::timeout(Duration::from_secs(4), stream.message())
        .await
        .expect("renewed before expiry")
        .unwrap()
        .unwrap();
    let second = serial_of(&renewed);
    assert_ne!(first, second);
    let task_signs = state
        .sign_items
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, t)| t.starts_with(&format!("unix:{}:", std::process::id())))
        .count();
    assert!(task_signs >= 2, "renewals carry the task id");
    drop(stream);

    // Everything the task held is revoked when it ends.
    let mut complete = mayfly::proto::task::task_client::TaskClient::new(
        api::connect(&agent.socket).await.unwrap(),
    );
    let done = complete
        .complete(api::request(mayfly::proto::task::CompleteRequest {
            pid: 0,
        }))
        .await
        .unwrap()
        .into_inner();
    assert!(done.revoked_x509_serials.contains(&first));
    assert!(done.revoked_x509_serials.contains(&second));
    agent.stop().await;
}
