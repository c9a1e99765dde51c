//! X.509 authority rotation end to end, with mutual TLS between two example
//! workloads (`mtls_server` and `mtls_client`, built from `examples/`) that
//! must keep verifying each other through the whole cycle.
//!
//! Both workloads run as this test's uid, so two entries with the same
//! selector give every process both SVIDs; each example picks its own with
//! `--spiffe-id`.
//!
//! The mtls_client connects every 200 ms and prints, per handshake, the CA
//! (authority key identifier) that signed the server's and its own
//! certificate, which is how the test sees which CA each workload holds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use mayfly_e2e::{Agent, Proc, Server, TRUST_DOMAIN, bin, free_port, my_uid, wait_for};
use spiffe::{TrustDomain, WorkloadApiClient};
use x509_parser::extensions::ParsedExtension;

/// How a CA is named in the examples' output: its subject key identifier
/// (hex), or `issuer:<subject>` when it has none.
fn ca_key_id(ca_der: &[u8]) -> String {
    let (_, ca) = x509_parser::parse_x509_certificate(ca_der).unwrap();
    ca.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(hex(k.0)),
            _ => None,
        })
        .unwrap_or_else(|| format!("issuer:{}", ca.subject()).replace(' ', "_"))
}

/// The CA that signed a leaf, named like [`ca_key_id`].
fn issuer_key_id(leaf_der: &[u8]) -> String {
    let (_, leaf) = x509_parser::parse_x509_certificate(leaf_der).unwrap();
    leaf.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| hex(k.0))
            }
            _ => None,
        })
        .unwrap_or_else(|| format!("issuer:{}", leaf.issuer()).replace(' ', "_"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What this test's own Workload API client holds: (CAs of the bundle,
/// issuing CA of each SVID).
async fn workload_view(endpoint: &str) -> Option<(BTreeSet<String>, Vec<String>)> {
    let client = WorkloadApiClient::connect_to(endpoint).await.ok()?;
    let ctx = client.fetch_x509_context().await.ok()?;
    let td = TrustDomain::new(TRUST_DOMAIN).unwrap();
    let bundle = ctx.bundle_set().get(&td)?;
    let cas = bundle
        .authorities()
        .iter()
        .map(|c| ca_key_id(c.as_ref()))
        .collect();
    let issuers = ctx
        .svids()
        .iter()
        .map(|s| issuer_key_id(s.leaf().as_ref()))
        .collect();
    Some((cas, issuers))
}

/// Polls [`workload_view`] until `f` accepts it.
async fn wait_view(
    endpoint: &str,
    what: &str,
    timeout: Duration,
    f: impl Fn(&BTreeSet<String>, &[String]) -> bool,
) -> Duration {
    let start = Instant::now();
    loop {
        if let Some((cas, issuers)) = workload_view(endpoint).await
            && f(&cas, &issuers)
        {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}; workload holds {:?}",
            workload_view(endpoint).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The two example workloads.
struct Mtls {
    server: Proc,
    client: Proc,
    _dir: tempfile::TempDir,
}

/// One `ok` line of the client: (server serial, client serial, server CA, client CA).
type Handshake = (String, String, String, String);

impl Mtls {
    fn start(agent: &Agent, server_id: &str, client_id: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("mayfly-e2e-mtls")
            .tempdir()
            .unwrap();
        let listen = format!("127.0.0.1:{}", free_port());
        let mut cmd = Command::new(bin("mtls_server"));
        cmd.args(["--socket", &agent.endpoint(), "--listen", &listen])
            .args(["--allow-id", client_id, "--spiffe-id", server_id]);
        let mut server = Proc::spawn_logged(cmd, dir.path().join("mtls_server.log")).unwrap();
        wait_for("mtls_server to listen", Duration::from_secs(30), || {
            if let Some(status) = server.try_wait() {
                panic!("mtls_server exited ({status}):\n{}", server.log_text());
            }
            TcpStream::connect(&listen).ok()
        })
        .unwrap();
        let mut cmd = Command::new(bin("mtls_client"));
        cmd.args(["--socket", &agent.endpoint(), "--connect", &listen])
            .args(["--server-id", server_id, "--spiffe-id", client_id])
            .args(["--interval", "200ms", "--strict"]);
        let client = Proc::spawn_logged(cmd, dir.path().join("mtls_client.log")).unwrap();
        let m = Self {
            server,
            client,
            _dir: dir,
        };
        wait_for("the first mTLS handshake", Duration::from_secs(30), || {
            (!m.handshakes().is_empty()).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", m.logs()));
        m
    }

    fn lines(&self) -> Vec<String> {
        self.client
            .log_text()
            .lines()
            .filter(|l| l.starts_with("ok ") || l.starts_with("fail "))
            .map(str::to_owned)
            .collect()
    }

    fn handshakes(&self) -> Vec<Handshake> {
        self.lines()
            .iter()
            .filter_map(|l| {
                let mut it = l.split_whitespace().skip(1);
                let s = it.next()?.to_owned();
                let c = it.next()?.to_owned();
                let sca = it.next()?.strip_prefix("server_ca=")?.to_owned();
                let cca = it.next()?.strip_prefix("client_ca=")?.to_owned();
                Some((s, c, sca, cca))
            })
            .collect()
    }

    fn failures(&self) -> Vec<String> {
        self.lines()
            .into_iter()
            .filter(|l| l.starts_with("fail "))
            .collect()
    }

    fn logs(&self) -> String {
        format!(
            "--- mtls_client ---\n{}\n--- mtls_server ---\n{}",
            self.client.log_text(),
            self.server.log_text()
        )
    }

    /// Waits until the latest handshake used certificates signed by `ca` on
    /// both sides.
    fn wait_both_signed_by(&self, ca: &str, timeout: Duration) -> Duration {
        let start = Instant::now();
        wait_for(
            "both workloads to present SVIDs from the new CA",
            timeout,
            || {
                self.handshakes()
                    .last()
                    .is_some_and(|(_, _, s, c)| s == ca && c == ca)
                    .then_some(())
            },
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e}; last handshake: {:?}\n{}",
                self.handshakes().last(),
                self.logs()
            )
        });
        start.elapsed()
    }

    /// Stops the client (SIGTERM: it prints its summary) and asserts it
    /// never failed.
    fn finish(mut self) {
        self.client.terminate();
        let status = self.client.wait_exit(Duration::from_secs(10));
        let log = self.client.log_text();
        let summary = log
            .lines()
            .find(|l| l.starts_with("summary:"))
            .unwrap_or("(no summary)")
            .to_owned();
        let hs = self.handshakes();
        let server_certs: BTreeSet<_> = hs.iter().map(|h| &h.0).collect();
        let client_certs: BTreeSet<_> = hs.iter().map(|h| &h.1).collect();
        println!(
            "mtls_client: {summary}; {} handshakes saw {} server and {} client certificates",
            hs.len(),
            server_certs.len(),
            client_certs.len()
        );
        let failures = self.failures();
        assert!(
            failures.is_empty(),
            "mutual TLS failed {} times across the rotation:\n{}\n{}",
            failures.len(),
            failures.join("\n"),
            self.logs()
        );
        assert!(
            status.is_some_and(|s| s.success()),
            "mtls_client --strict exited with {status:?}\n{}",
            self.logs()
        );
    }
}

/// `authority show`: the x509 authorities as (id, phase, tainted).
fn x509_authorities(server: &Server) -> Vec<(String, String, bool)> {
    let v = server.cli_json(&["authority", "show"]).unwrap();
    v["x509"]
        .as_array()
        .unwrap_or_else(|| panic!("authority show: no x509 list in {v}"))
        .iter()
        .map(|a| {
            (
                a["id"].as_str().unwrap().to_owned(),
                a["phase"].as_str().unwrap().to_owned(),
                a["tainted"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

fn authority_cli(server: &Server, args: &[&str]) {
    let out = server.cli(args);
    assert!(
        out.status.success(),
        "mayfly-server {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two entries for this uid (the server and client identities) under `agent`.
fn create_workload_entries(server: &Server, agent: &Agent) -> (String, String) {
    let selector = format!("unix:uid:{}", my_uid());
    let server_id = format!("spiffe://{TRUST_DOMAIN}/e2e/mtls/server");
    let client_id = format!("spiffe://{TRUST_DOMAIN}/e2e/mtls/client");
    server
        .create_entry(&server_id, &agent.spiffe_id, &[&selector])
        .unwrap();
    server
        .create_entry(&client_id, &agent.spiffe_id, &[&selector])
        .unwrap();
    (server_id, client_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_x509_authority_cycle_keeps_mutual_tls_working() {
    // One-hour SVIDs: after activation nothing rotates by itself within the
    // test, so what replaces the old CA's SVIDs is the taint.
    let server = Server::start().unwrap();
    let agent = Agent::start(&server).unwrap();
    let endpoint = agent.endpoint();
    let (server_id, client_id) = create_workload_entries(&server, &agent);
    wait_view(
        &endpoint,
        "both SVIDs",
        Duration::from_secs(20),
        |_, svids| svids.len() >= 2,
    )
    .await;
    let (cas, _) = workload_view(&endpoint).await.unwrap();
    assert_eq!(cas.len(), 1, "one CA in the bundle at start: {cas:?}");
    let old_ca = cas.into_iter().next().unwrap();

    let auths = x509_authorities(&server);
    let old_id = auths
        .iter()
        .find(|a| a.1 == "active")
        .unwrap_or_else(|| panic!("no active x509 authority: {auths:?}"))
        .0
        .clone();

    let mtls = Mtls::start(&agent, &server_id, &client_id);
    let cycle = Instant::now();

    // prepare: the new CA is published before it signs anything.
    authority_cli(&server, &["authority", "prepare", "--type", "x509"]);
    let auths = x509_authorities(&server);
    let new_id = auths
        .iter()
        .find(|a| a.1 == "prepared")
        .unwrap_or_else(|| panic!("no prepared x509 authority after prepare: {auths:?}"))
        .0
        .clone();
    let took = wait_view(
        &endpoint,
        "the prepared CA in the workload's bundle",
        Duration::from_secs(10),
        |cas, _| cas.len() == 2,
    )
    .await;
    println!("prepared CA reached the workload's bundle in {took:?}");
    let (cas, issuers) = workload_view(&endpoint).await.unwrap();
    let new_ca = cas.iter().find(|c| **c != old_ca).unwrap().clone();
    assert!(
        issuers.iter().all(|i| *i == old_ca),
        "a prepared CA must not sign: {issuers:?}"
    );
    // Let a few handshakes run with the two-CA bundle.
    let seen = mtls.handshakes().len();
    wait_for(
        "handshakes with the prepared CA in the bundle",
        Duration::from_secs(10),
        || (mtls.handshakes().len() >= seen + 5).then_some(()),
    )
    .unwrap();

    // activate: the prepared CA signs, the old one moves to "old".
    authority_cli(&server, &["authority", "activate", "--type", "x509"]);
    let auths = x509_authorities(&server);
    assert!(
        auths.iter().any(|a| a.0 == new_id && a.1 == "active")
            && auths.iter().any(|a| a.0 == old_id && a.1 == "old"),
        "after activate: {auths:?}"
    );
    // Both CAs are still trusted: what the old one signed has not expired.
    let (cas, _) = workload_view(&endpoint).await.unwrap();
    assert!(
        cas.contains(&old_ca) && cas.contains(&new_ca),
        "after activate the bundle keeps the old CA: {cas:?}"
    );

    // taint: every SVID the old CA signed is replaced within one sync.
    let seen = mtls.handshakes().len();
    authority_cli(
        &server,
        &[
            "authority",
            "taint",
            "--type",
            "x509",
            "--authority-id",
            &old_id,
        ],
    );
    let auths = x509_authorities(&server);
    assert!(
        auths.iter().any(|a| a.0 == old_id && a.2),
        "taint not shown: {auths:?}"
    );
    let took = wait_view(
        &endpoint,
        "no SVID from the tainted CA",
        Duration::from_secs(10),
        |_, issuers| issuers.len() >= 2 && issuers.iter().all(|i| *i == new_ca),
    )
    .await;
    let took_mtls = mtls.wait_both_signed_by(&new_ca, Duration::from_secs(10));
    println!(
        "after taint: this workload's SVIDs replaced in {took:?}, both mTLS peers on the new CA within {took_mtls:?} more"
    );
    // From then on no handshake uses a certificate from the tainted CA.
    let from_new = mtls.handshakes().len();
    wait_for("more handshakes", Duration::from_secs(10), || {
        (mtls.handshakes().len() >= from_new + 5).then_some(())
    })
    .unwrap();
    let tainted_after: Vec<_> = mtls.handshakes()[from_new..]
        .iter()
        .filter(|h| h.2 == old_ca || h.3 == old_ca)
        .cloned()
        .collect();
    assert!(
        tainted_after.is_empty(),
        "handshakes used the tainted CA after the switch: {tainted_after:?}"
    );
    assert!(mtls.handshakes().len() > seen);

    // revoke: the old CA leaves the bundle; mTLS goes on with the new one.
    authority_cli(
        &server,
        &[
            "authority",
            "revoke",
            "--type",
            "x509",
            "--authority-id",
            &old_id,
        ],
    );
    let took = wait_view(
        &endpoint,
        "the revoked CA to leave the bundle",
        Duration::from_secs(10),
        |cas, _| !cas.contains(&old_ca) && cas.contains(&new_ca),
    )
    .await;
    println!("revoked CA left the workload's bundle in {took:?}");
    let auths = x509_authorities(&server);
    assert!(
        auths.iter().all(|a| a.0 != old_id),
        "revoked authority still listed: {auths:?}"
    );
    let seen = mtls.handshakes().len();
    wait_for("handshakes after revoke", Duration::from_secs(10), || {
        (mtls.handshakes().len() >= seen + 5).then_some(())
    })
    .unwrap();
    println!("full manual cycle took {:?}", cycle.elapsed());
    mtls.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_x509_authority_rotation_keeps_mutual_tls_working() {
    // A 30 s CA: the successor is prepared at half its life and activated at
    // five sixths; 5 s SVIDs move to the new CA as they rotate.
    let server = Server::start_with("ca_ttl = \"30s\"\ndefault_x509_svid_ttl = \"5s\"").unwrap();
    let started = Instant::now();
    let agent = Agent::start(&server).unwrap();
    let endpoint = agent.endpoint();
    let (server_id, client_id) = create_workload_entries(&server, &agent);
    wait_view(
        &endpoint,
        "both SVIDs",
        Duration::from_secs(20),
        |_, svids| svids.len() >= 2,
    )
    .await;
    let (cas, _) = workload_view(&endpoint).await.unwrap();
    assert_eq!(cas.len(), 1, "one CA in the bundle at start: {cas:?}");
    let old_ca = cas.into_iter().next().unwrap();
    let mtls = Mtls::start(&agent, &server_id, &client_id);

    let took = wait_view(
        &endpoint,
        "the scheduled successor CA in the bundle",
        Duration::from_secs(30),
        |cas, _| cas.len() == 2,
    )
    .await;
    println!(
        "successor CA reached the workload's bundle {:?} after server start ({took:?} after mTLS started)",
        started.elapsed()
    );
    let (cas, issuers) = workload_view(&endpoint).await.unwrap();
    let new_ca = cas.iter().find(|c| **c != old_ca).unwrap().clone();
    println!(
        "authorities after prepare: {:?}; SVID issuers {issuers:?}",
        server.cli_json(&["authority", "show"]).ok()
    );

    mtls.wait_both_signed_by(&new_ca, Duration::from_secs(30));
    println!(
        "both mTLS peers on the successor CA {:?} after server start",
        started.elapsed()
    );
    wait_view(
        &endpoint,
        "every SVID from the successor CA",
        Duration::from_secs(10),
        |_, issuers| issuers.len() >= 2 && issuers.iter().all(|i| *i == new_ca),
    )
    .await;
    let auths = x509_authorities(&server);
    println!("authorities after activation: {auths:?}");
    assert!(
        auths.iter().filter(|a| a.1 == "active").count() == 1 && auths.iter().any(|a| a.1 == "old"),
        "after the scheduled activation: one active and the old authority: {auths:?}"
    );
    // The old CA stays in the bundle until it expires (nothing it signed
    // outlives it), then leaves; mTLS goes on throughout.
    let took = wait_view(
        &endpoint,
        "the expired old CA to leave the bundle",
        Duration::from_secs(25),
        |cas, _| !cas.contains(&old_ca),
    )
    .await;
    println!(
        "old CA left the bundle {:?} after server start ({took:?} after both peers switched)",
        started.elapsed()
    );
    let seen = mtls.handshakes().len();
    wait_for(
        "handshakes after the old CA left",
        Duration::from_secs(10),
        || (mtls.handshakes().len() >= seen + 5).then_some(()),
    )
    .unwrap();
    mtls.finish();
}
