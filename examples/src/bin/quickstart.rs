//! Mayfly in one command: a server (embedded store, in a temporary
//! directory), an agent enrolled with a join token, an entry for the current
//! Unix user, and a workload that fetches its X.509-SVID and JWT-SVID through
//! the SPIFFE Workload API with the Rust `spiffe` crate — all on loopback, in
//! one process, with nothing else installed.
//!
//! `cargo run -p mayfly-examples --bin quickstart [-- --keep]`
//! (`--keep` leaves the temporary directory in place and prints its path.)

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use mayfly::entry::{EntryId, EntrySpec};
use mayfly_agent::config::AgentConfig;
use mayfly_server::config::ServerConfig;
use tokio::sync::watch;

fn step(msg: &str) {
    println!("==> {msg}");
}

fn uid() -> Result<u32> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("cannot read the current uid from /proc/self/status")
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let keep = std::env::args().any(|a| a == "--keep");
    let tmp = tempfile::Builder::new()
        .prefix("mayfly-quickstart")
        .tempdir()?;
    let dir = tmp.path().to_owned();

    step(&format!(
        "starting a server (trust domain example.org, embedded store in {})",
        dir.join("server").display()
    ));
    let mut server_cfg = ServerConfig::development();
    server_cfg.data_dir = dir.join("server");
    server_cfg.admin_socket_path = dir.join("server/admin.sock");
    server_cfg.bind_address = "127.0.0.1:0".parse()?;
    server_cfg.http_address = "127.0.0.1:0".parse()?;
    let (stop_server, server_stop) = watch::channel(false);
    let (stop_agent, agent_stop) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let server = mayfly_server::run::run(server_cfg, stopped(server_stop)).await?;
    let state = Arc::clone(server.state());
    println!(
        "    node API on {}, admin API on {}",
        server.node_addr(),
        dir.join("server/admin.sock").display()
    );

    step("issuing a single-use join token");
    let s = Arc::clone(&state);
    let (token, record) =
        tokio::task::spawn_blocking(move || s.create_join_token(None, None)).await??;
    let agent_id = format!("spiffe://example.org/mayfly/agent/join_token/{}", record.id);
    println!("    the agent will be {agent_id}");

    let uid = uid()?;
    let workload_id = "spiffe://example.org/quickstart/workload";
    step(&format!(
        "registering {workload_id} for unix:uid:{uid} under that agent"
    ));
    let spec = EntrySpec {
        spiffe_id: workload_id.into(),
        parent_id: agent_id.clone(),
        selectors: vec![format!("unix:uid:{uid}")],
        x509_svid_ttl: Some("1h".into()),
        jwt_svid_ttl: Some("5m".into()),
        ..Default::default()
    };
    let entry = spec.validate(state.trust_domain(), EntryId::random(), 0)?;
    let s = Arc::clone(&state);
    let entry = tokio::task::spawn_blocking(move || s.upsert_entry(entry)).await??;
    println!("    entry {}", entry.id);

    step("starting an agent that attests with the join token");
    let mut agent_cfg = AgentConfig::development();
    agent_cfg.data_dir = dir.join("agent");
    agent_cfg.socket_path = dir.join("agent/api.sock");
    agent_cfg.server_address = server.node_addr().to_string();
    agent_cfg.trust_bundle_path = Some(server.bundle_path().to_owned());
    agent_cfg.health_address = SocketAddr::from(([127, 0, 0, 1], 0));
    let socket = agent_cfg.socket_path.clone();
    let agent = tokio::spawn(mayfly_agent::run::run(
        agent_cfg,
        Some(token),
        stopped(agent_stop),
    ));

    step(&format!(
        "as a workload: fetching identities from unix:{}",
        socket.display()
    ));
    let endpoint = format!("unix:{}", socket.display());
    let mut last_err = String::new();
    let mut svid = None;
    for _ in 0..200 {
        if agent.is_finished() {
            bail!("the agent stopped: {:?}", agent.await);
        }
        if socket.exists() {
            match spiffe::WorkloadApiClient::connect_to(&endpoint).await {
                Ok(client) => match client.fetch_x509_svid().await {
                    Ok(s) => {
                        svid = Some((client, s));
                        break;
                    }
                    Err(e) => last_err = e.to_string(),
                },
                Err(e) => last_err = e.to_string(),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let Some((client, svid)) = svid else {
        bail!("no X.509-SVID after 20 s: {last_err}");
    };
    let leaf = x509_parser::parse_x509_certificate(svid.leaf().as_ref()).map(|(_, c)| c)?;
    println!("\nX.509-SVID");
    println!("    SPIFFE ID   {}", svid.spiffe_id());
    println!("    serial      {}", hex_of(leaf.raw_serial()));
    println!("    not after   {}", leaf.validity().not_after);
    println!("    issuer      {}", leaf.issuer());
    println!(
        "    chain       {} certificate(s); private key held by the workload only",
        svid.cert_chain().len()
    );

    let jwt = client.fetch_jwt_svid(["quickstart-audience"], None).await?;
    let bundles = client.fetch_jwt_bundles().await?;
    let checked =
        spiffe::JwtSvid::parse_and_validate(jwt.token(), &bundles, &["quickstart-audience"])?;
    let validated = client
        .validate_jwt_token("quickstart-audience", jwt.token())
        .await?;
    println!("\nJWT-SVID (audience quickstart-audience)");
    println!("    SPIFFE ID   {}", jwt.spiffe_id());
    println!(
        "    token       {}…",
        &jwt.token()[..jwt.token().len().min(48)]
    );
    println!(
        "    verified offline against the JWT bundle: {}",
        checked.spiffe_id()
    );
    println!(
        "    verified by the agent (ValidateJWTSVID): {}",
        validated.spiffe_id()
    );

    println!();
    step("stopping the agent, then the server");
    stop_agent.send(true)?;
    let _ = tokio::time::timeout(Duration::from_secs(10), agent).await;
    stop_server.send(true)?;
    let _ = tokio::time::timeout(Duration::from_secs(10), server.wait()).await;
    if keep {
        println!("kept {}", tmp.keep().display());
    }
    println!("done: the workload got both identities without any secret configured.");
    Ok(())
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
