//! `run` in-process against the stand-in node API over TLS: the first start
//! attests with the join token, a restart reuses the stored SVID without
//! one, `/readyz` follows, and shutdown returns.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use mayfly_agent::config::AgentConfig;
use support::tls::start_tls_server;
use support::*;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::oneshot;
use zeroize::Zeroizing;

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    Some((code, body))
}

async fn until_ready(health: SocketAddr) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some((200, body)) = get(health, "/readyz").await {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "agent never became ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn config(
    dir: &Path,
    server: SocketAddr,
    health: SocketAddr,
    bundle: Option<&Path>,
) -> AgentConfig {
    let bundle = bundle.map_or(String::new(), |p| {
        format!("trust_bundle_path = \"{}\"\n", p.display())
    });
    AgentConfig::parse(
        &format!(
            "[agent]\nserver_address = \"{server}\"\ndata_dir = \"{}\"\nhealth_address = \"{health}\"\n{bundle}",
            dir.join("agent").display()
        ),
        Path::new("agent.toml"),
    )
    .unwrap()
}

async fn start(
    cfg: AgentConfig,
    token: Option<&str>,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let (tx, rx) = oneshot::channel::<()>();
    let token = token.map(|t| Zeroizing::new(t.to_owned()));
    let task = tokio::spawn(mayfly_agent::run::run(cfg, token, async move {
        let _ = rx.await;
    }));
    (tx, task)
}

#[tokio::test]
async fn attests_once_and_a_restart_reuses_the_stored_svid() {
    let state = MockState::new();
    let server = start_tls_server(
        state.clone(),
        &state.ca,
        "spiffe://example.org/mayfly/server",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, state.ca.cert_pem()).unwrap();
    let health = free_port();

    let (stop, task) = start(
        config(dir.path(), server, health, Some(&bundle)),
        Some(GOOD_TOKEN),
    )
    .await;
    let body = until_ready(health).await;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["agent_id"],
        "spiffe://example.org/mayfly/agent/join_token/tok1"
    );
    assert_eq!(v["entries"], 2);
    assert_eq!(v["server_reachable"], true);
    assert!(v["svid_expires_at"].is_string());
    assert!(
        dir.path().join("agent/api.sock").exists(),
        "the Workload API is served"
    );
    assert_eq!(get(health, "/healthz").await.unwrap().0, 200);
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("run returns after shutdown")
        .unwrap()
        .unwrap();
    assert_eq!(state.calls("Attest"), 1);

    // Restart without a token (and without the bootstrap file: the stored
    // bundle is enough).
    let health = free_port();
    let (stop, task) = start(config(dir.path(), server, health, None), None).await;
    let body = until_ready(health).await;
    assert!(body.contains("tok1"), "{body}");
    assert_eq!(state.calls("Attest"), 1, "no new attestation");
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn clear_errors_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let server = free_port();
    // No bootstrap trust at all.
    let (_stop, task) = start(config(dir.path(), server, free_port(), None), Some("t")).await;
    let err = format!("{:#}", task.await.unwrap().unwrap_err());
    assert!(
        err.contains("trust_bundle_path") && err.contains("insecure_bootstrap"),
        "{err}"
    );

    // [agent.k8s] naming a kubelet CA file that does not exist: refused before attesting.
    let mut cfg = config(dir.path(), server, free_port(), None);
    cfg.insecure_bootstrap = true;
    cfg.k8s = Some(
        AgentConfig::parse(
            &format!(
                "[agent.k8s]\nkubelet_ca_path = \"{}\"\n",
                dir.path().join("no-such-ca.crt").display()
            ),
            Path::new("agent.toml"),
        )
        .unwrap()
        .k8s
        .unwrap(),
    );
    let (_stop, task) = start(cfg, Some("t")).await;
    let err = format!("{:#}", task.await.unwrap().unwrap_err());
    assert!(
        err.contains("kubelet_ca_path") && err.contains("no-such-ca.crt"),
        "{err}"
    );

    // Trust, but neither a stored SVID nor a token.
    let state = MockState::new();
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, state.ca.cert_pem()).unwrap();
    let (_stop, task) = start(config(dir.path(), server, free_port(), Some(&bundle)), None).await;
    let err = format!("{:#}", task.await.unwrap().unwrap_err());
    assert!(
        err.contains("join token") && err.contains("--join-token"),
        "{err}"
    );

    // A refused token is an error that never shows the token.
    let server = start_tls_server(
        state.clone(),
        &state.ca,
        "spiffe://example.org/mayfly/server",
    )
    .await;
    let (_stop, task) = start(
        config(dir.path(), server, free_port(), Some(&bundle)),
        Some("wrong-secret-token"),
    )
    .await;
    let err = format!("{:#}", task.await.unwrap().unwrap_err());
    assert!(
        err.contains("already used") && !err.contains("wrong-secret"),
        "{err}"
    );
}

/// Runs `mayfly-agent healthcheck` with `args`.
async fn healthcheck(args: &[&str]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_mayfly-agent"));
    cmd.arg("healthcheck").args(args);
    tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn an_expired_agent_svid_without_a_token_says_what_to_do_and_a_new_token_recovers() {
    let state = MockState::new();
    let server = start_tls_server(
        state.clone(),
        &state.ca,
        "spiffe://example.org/mayfly/server",
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    // An earlier run left its SVID and bundle; the SVID expired while the agent was down.
    let storage = mayfly_agent::storage::Storage::open(&dir.path().join("agent")).unwrap();
    let svid = state.agent_svid(time::Duration::seconds(1));
    let expired_at = svid.expires_at;
    storage.save_agent_svid(&svid).unwrap();
    storage.save_bundle(&state.bundle()).unwrap();
    while time::OffsetDateTime::now_utc() <= expired_at {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let health = free_port();
    let cfg = config(dir.path(), server, health, None);
    let (stop, task) = start(cfg, None).await;
    // It keeps running, not ready, and says why.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let body = loop {
        if let Some((503, body)) = get(health, "/readyz").await
            && body.contains("needs_join_token\":true")
        {
            break body;
        }
        assert!(tokio::time::Instant::now() < deadline, "no clear state");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let reason = v["reason"].as_str().unwrap().to_owned();
    assert!(
        reason.starts_with("the agent SVID expired at ")
            && reason.ends_with(
                "; join_token agents cannot re-attest: generate a new token with \
                 `mayfly-server token generate` and start the agent with --join-token"
            ),
        "{reason}"
    );
    assert_eq!(
        v["agent_id"],
        "spiffe://example.org/mayfly/agent/join_token/tok0"
    );
    assert!(!task.is_finished(), "the agent keeps running in that state");

    // `healthcheck` prints the reason and exits 1, finding the address in the config file.
    let config_file = dir.path().join("agent.toml");
    std::fs::write(
        &config_file,
        format!(
            "[agent]\nserver_address = \"{server}\"\ndata_dir = \"{}\"\nhealth_address = \"{health}\"\n",
            dir.path().join("agent").display()
        ),
    )
    .unwrap();
    let out = healthcheck(&["--config", config_file.to_str().unwrap()]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(stdout.contains("Agent is NOT ready."), "{stdout}");
    assert!(stdout.contains(&reason), "{stdout}");
    assert!(stdout.contains("needs a new join token: yes"), "{stdout}");
    assert!(
        stderr.contains("join_token agents cannot re-attest"),
        "{stderr}"
    );
    let out = healthcheck(&["--health-address", &health.to_string(), "--output", "json"]).await;
    assert_eq!(out.status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["needs_join_token"], true);
    assert_eq!(doc["x509_authorities"], 1);
    assert_eq!(state.calls("Attest"), 0);
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("run returns after shutdown")
        .unwrap()
        .unwrap();

    // Restarted with a new token: it attests and is ready.
    let (stop, task) = start(config(dir.path(), server, health, None), Some(GOOD_TOKEN)).await;
    let body = until_ready(health).await;
    assert!(body.contains("tok1"), "{body}");
    assert_eq!(state.calls("Attest"), 1);
    let out = healthcheck(&["--health-address", &health.to_string()]).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("Agent is ready.") && stdout.contains("tok1"),
        "{stdout}"
    );
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}
