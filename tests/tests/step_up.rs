//! End to end: assurance levels and step-up re-attestation, with a real
//! server, a join-token agent and an x509pop agent on the same host.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use mayfly_e2e::{
    Agent, Server, TRUST_DOMAIN, bin, fetch_x509_child, my_uid, wait_for, x509pop_server_toml,
};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

/// A node CA (written to `dir/node-ca.pem`) and one node certificate and
/// key, PEM.
fn node_pki(dir: &Path) -> (std::path::PathBuf, String, String) {
    let ca_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, "e2e node CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = p.self_signed(&ca_key).unwrap();
    let ca_path = dir.join("node-ca.pem");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec!["node1.example.org".to_owned()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, "node1");
    let issuer = rcgen::Issuer::from_ca_cert_der(ca.der(), &ca_key).unwrap();
    let cert = p.signed_by(&key, &issuer).unwrap();
    (ca_path, cert.pem(), key.serialize_pem())
}

struct Setup {
    server: Server,
    join_token_agent: Agent,
    x509pop_agent: Agent,
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = node_pki(dir.path());
    let server = Server::start_with(&x509pop_server_toml(&ca)).unwrap();
    let join_token_agent = Agent::start(&server).unwrap();
    let x509pop_agent = Agent::start_x509pop(&server, &cert, &key).unwrap();
    Setup {
        server,
        join_token_agent,
        x509pop_agent,
        _dir: dir,
    }
}

fn create_entry(server: &Server, path: &str, parent: &str, extra: &[&str]) {
    let spiffe_id = format!("spiffe://{TRUST_DOMAIN}/{path}");
    let selector = format!("unix:uid:{}", my_uid());
    let mut args = vec![
        "entry",
        "create",
        "--spiffe-id",
        &spiffe_id,
        "--parent-id",
        parent,
        "--selector",
        &selector,
    ];
    args.extend_from_slice(extra);
    server.cli_json(&args).unwrap();
}

/// Waits until a fresh workload process is refused with a message
/// containing `needle`; returns the message.
fn wait_refusal(agent: &Agent, needle: &str) -> String {
    let mut last = String::new();
    wait_for(
        &format!("a refusal mentioning {needle:?}"),
        Duration::from_secs(20),
        || match fetch_x509_child(&agent.socket, None) {
            Ok(svid) => {
                last = format!("served {}", svid.spiffe_id);
                None
            }
            Err(e) => {
                last = e.to_string();
                last.contains(needle).then(|| last.clone())
            }
        },
    )
    .unwrap_or_else(|e| panic!("{e}; last outcome: {last}"))
}

fn fetch_jwt(agent: &Agent) -> (bool, String) {
    let out = Command::new(bin("mayfly-agent"))
        .args(["api", "fetch", "jwt", "--audience", "db", "--socket-path"])
        .arg(&agent.socket)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_assurance_high_serves_the_x509pop_agent_and_refuses_the_join_token_agent() {
    let s = setup();
    create_entry(
        &s.server,
        "high/jt",
        &s.join_token_agent.spiffe_id,
        &["--min-assurance", "high"],
    );
    create_entry(
        &s.server,
        "high/pop",
        &s.x509pop_agent.spiffe_id,
        &["--min-assurance", "high"],
    );
    let svid = wait_for(
        "the x509pop agent to serve its high-assurance entry",
        Duration::from_secs(20),
        || fetch_x509_child(&s.x509pop_agent.socket, None).ok(),
    )
    .unwrap();
    assert_eq!(svid.spiffe_id, format!("spiffe://{TRUST_DOMAIN}/high/pop"));

    let refusal = wait_refusal(&s.join_token_agent, "requires high assurance");
    assert!(
        refusal.contains("PermissionDenied") || refusal.contains("denied"),
        "{refusal}"
    );
    assert!(refusal.contains("the node has low"), "{refusal}");
    let (ok, jwt) = fetch_jwt(&s.join_token_agent);
    assert!(!ok && jwt.contains("requires high assurance"), "{jwt}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_attestation_age_reattests_the_x509pop_agent_and_refuses_the_join_token_agent() {
    let s = setup();
    create_entry(
        &s.server,
        "fresh/jt",
        &s.join_token_agent.spiffe_id,
        &["--max-attestation-age", "4s"],
    );
    create_entry(
        &s.server,
        "fresh/pop",
        &s.x509pop_agent.spiffe_id,
        &["--max-attestation-age", "4s"],
    );
    wait_for(
        "the x509pop agent to serve its entry",
        Duration::from_secs(20),
        || fetch_x509_child(&s.x509pop_agent.socket, None).ok(),
    )
    .unwrap();
    let reattests = |a: &Agent| {
        a.proc
            .log_text()
            .matches("the server asks for a fresh node attestation")
            .count()
    };
    let before = reattests(&s.x509pop_agent);

    // Past the age: the next issuance makes the x509pop agent attest again,
    // within the workload's request.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let svid = fetch_x509_child(&s.x509pop_agent.socket, None)
        .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", s.x509pop_agent.proc.log_text()));
    assert_eq!(svid.spiffe_id, format!("spiffe://{TRUST_DOMAIN}/fresh/pop"));
    assert!(
        reattests(&s.x509pop_agent) > before,
        "no re-attestation in the agent log:\n{}",
        s.x509pop_agent.proc.log_text()
    );
    // The JWT path steps up the same way.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (ok, jwt) = fetch_jwt(&s.x509pop_agent);
    assert!(ok, "{jwt}\nagent log:\n{}", s.x509pop_agent.proc.log_text());

    // The join-token agent cannot prove itself again: refused, with the reason.
    let refusal = wait_refusal(&s.join_token_agent, "requires a node attestation within 4s");
    assert!(refusal.contains("join_token"), "{refusal}");
    assert!(refusal.contains("x509pop"), "{refusal}");
    let log = s.join_token_agent.proc.log_text();
    assert!(
        log.contains("requires a node attestation within 4s"),
        "the agent log does not show the reason:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicted_x509pop_agent_attests_again_by_itself_and_a_banned_one_cannot() {
    let s = setup();
    let agent = &s.x509pop_agent;
    create_entry(&s.server, "web", &agent.spiffe_id, &[]);
    wait_for(
        "the x509pop agent to serve",
        Duration::from_secs(20),
        || fetch_x509_child(&agent.socket, None).ok(),
    )
    .unwrap();

    let out = s.server.cli(&["agent", "evict", &agent.spiffe_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // No operator needed: the agent notices, attests again with the same
    // certificate (same ID) and serves new workloads.
    wait_for("the agent to attest again", Duration::from_secs(30), || {
        let shown = s
            .server
            .cli_json(&["agent", "show", &agent.spiffe_id])
            .ok()?;
        (shown.to_string().contains("x509pop")).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.proc.log_text()));
    let svid = wait_for(
        "a fresh workload to be served",
        Duration::from_secs(20),
        || fetch_x509_child(&agent.socket, None).ok(),
    )
    .unwrap();
    assert_eq!(svid.spiffe_id, format!("spiffe://{TRUST_DOMAIN}/web"));
    assert!(agent.proc.log_text().contains("attesting again"));

    // A ban sticks: the agent is refused and cannot attest its way back.
    let out = s.server.cli(&["agent", "ban", &agent.spiffe_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(
        "the ban to reach the agent",
        Duration::from_secs(30),
        || {
            agent
                .proc
                .log_text()
                .contains("banned agents can never attest again")
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.proc.log_text()));
    let shown = s
        .server
        .cli_json(&["agent", "show", &agent.spiffe_id])
        .unwrap();
    assert_eq!(shown["banned"], true, "{shown}");
}
