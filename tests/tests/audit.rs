//! End to end: the audit log of a real server records admin and node calls
//! with who made them; `audit verify` passes on the untouched log and, on
//! the stopped server's store, names a modified, removed or truncated
//! record; an unbanned agent is served again.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use mayfly_e2e::{Agent, Server, TRUST_DOMAIN, bin, fetch_x509_child, my_uid, wait_for};
use mayfly_server::store::sled_store::SledStore;
use serde_json::Value;

fn records(server: &Server, action: Option<&str>) -> Vec<Value> {
    let mut args = vec!["audit", "list"];
    if let Some(a) = action {
        args.extend(["--action", a]);
    }
    let v = server.cli_json(&args).unwrap();
    v["records"].as_array().cloned().unwrap()
}

fn verify_offline(data_dir: &Path) -> Output {
    Command::new(bin("mayfly-server"))
        .args(["audit", "verify", "--data-dir"])
        .arg(data_dir)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Edits the stored record `seq` with `f` (`None` deletes it).
fn tamper(data_dir: &Path, seq: u64, f: impl FnOnce(Vec<u8>) -> Option<Vec<u8>>) -> Vec<u8> {
    let store = SledStore::open(&data_dir.join("store")).unwrap();
    let tree = store.raw_audit_tree();
    let original = tree.get(seq.to_be_bytes()).unwrap().unwrap().to_vec();
    match f(original.clone()) {
        Some(v) => tree.insert(seq.to_be_bytes(), v).unwrap(),
        None => tree.remove(seq.to_be_bytes()).unwrap(),
    };
    tree.flush().unwrap();
    original
}

fn restore(data_dir: &Path, seq: u64, original: Vec<u8>) {
    let store = SledStore::open(&data_dir.join("store")).unwrap();
    let tree = store.raw_audit_tree();
    tree.insert(seq.to_be_bytes(), original).unwrap();
    tree.flush().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_audited_and_verify_detects_altered_and_deleted_records() {
    // No JSON-lines file: the store alone is verified offline here (the
    // file comparison has its own tests).
    let mut server = Server::start_with("audit_log_path = \"\"").unwrap();
    server
        .create_entry(
            &format!("spiffe://{TRUST_DOMAIN}/e2e/audited"),
            &format!("spiffe://{TRUST_DOMAIN}/mayfly/agent/join_token/placeholder"),
            &["unix:uid:1"],
        )
        .unwrap();
    let mut agent = Agent::start(&server).unwrap();
    server
        .create_entry(
            &format!("spiffe://{TRUST_DOMAIN}/e2e/audited"),
            &agent.spiffe_id,
            &[&format!("unix:uid:{}", my_uid())],
        )
        .unwrap();
    let svid = wait_for("an SVID", Duration::from_secs(20), || {
        fetch_x509_child(&agent.socket, None).ok()
    })
    .unwrap();

    let attests = records(&server, Some("node.attest"));
    assert_eq!(attests.len(), 1, "{attests:?}");
    let a = &attests[0];
    assert_eq!(a["target"], agent.spiffe_id.as_str());
    assert_eq!(a["result"], "ok");
    assert_eq!(a["details"]["attestor"], "join_token");
    let token_id = agent.spiffe_id.rsplit('/').next().unwrap();
    assert_eq!(a["details"]["token_id"], token_id);

    let issued = records(&server, Some("x509.issue"));
    assert!(
        issued.iter().any(|r| r["target"] == svid.spiffe_id.as_str()
            && r["actor"]["id"] == agent.spiffe_id.as_str()
            && r["details"]["entry_id"].is_string()
            && r["details"]["serial"].is_string()),
        "{issued:?}"
    );
    let admin = records(&server, Some("admin"));
    let me = format!("unix:uid:{}", my_uid());
    assert!(
        admin
            .iter()
            .any(|r| r["action"] == "admin.POST /v1/join-tokens" && r["actor"]["id"] == me.as_str()),
        "{admin:?}"
    );
    // No secret in the log: the join token's value never appears.
    let all = server.cli(&["audit", "list", "--output", "json"]);
    assert!(all.status.success());
    let text = server.cli(&["audit", "list"]);
    assert!(stdout(&text).contains("node.attest"), "{}", stdout(&text));

    let online = server.cli(&["audit", "verify"]);
    assert!(online.status.success(), "{}", stdout(&online));
    assert!(stdout(&online).contains("intact"));

    agent.proc.kill();
    server.proc.terminate();
    server.proc.wait_exit(Duration::from_secs(20)).unwrap();
    let data = server.dir.join("data");
    let out = verify_offline(&data);
    assert!(
        out.status.success(),
        "{}{}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    let head: u64 = stdout(&out)
        .split("head seq ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .and_then(|s| s.parse().ok())
        .unwrap();
    assert!(head >= 5, "{}", stdout(&out));

    // One field of record 2 altered.
    let original = tamper(&data, 2, |v| {
        let mut r: Value = serde_json::from_slice(&v).unwrap();
        r["result"] = "error".into();
        Some(serde_json::to_vec(&r).unwrap())
    });
    let out = verify_offline(&data);
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("record 2 (modified)"),
        "{}",
        stdout(&out)
    );
    restore(&data, 2, original);
    assert!(verify_offline(&data).status.success());

    // Record 3 deleted.
    let original = tamper(&data, 3, |_| None);
    let out = verify_offline(&data);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("record 3 (removed)"),
        "{}",
        stdout(&out)
    );
    restore(&data, 3, original);

    // The last record deleted.
    tamper(&data, head, |_| None);
    let out = verify_offline(&data);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains(&format!("record {head} (truncated)")),
        "{}",
        stdout(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unbanned_agent_is_served_again_and_both_are_audited() {
    let server = Server::start().unwrap();
    let agent = Agent::start(&server).unwrap();
    server
        .create_entry(
            &format!("spiffe://{TRUST_DOMAIN}/e2e/unban"),
            &agent.spiffe_id,
            &[&format!("unix:uid:{}", my_uid())],
        )
        .unwrap();
    wait_for("an SVID", Duration::from_secs(20), || {
        fetch_x509_child(&agent.socket, None).ok()
    })
    .unwrap();

    let out = server.cli(&["agent", "ban", &agent.spiffe_id]);
    assert!(out.status.success());
    wait_for(
        "the agent to report the ban",
        Duration::from_secs(15),
        || agent.proc.log_text().contains("banned").then_some(()),
    )
    .unwrap();
    // The ban survives a server restart; the agent, restarted while
    // banned, is refused, and that is audited (the chain continues).
    let mut agent = agent;
    agent.proc.kill();
    let first = server;
    first.proc.terminate();
    let mut first = first;
    first.proc.wait_exit(Duration::from_secs(20)).unwrap();
    let server = Server::start_in(&first.dir, first.port()).unwrap();
    let (mut banned, _, _) = Agent::spawn_in(&server, &agent.dir, None).unwrap();
    let refused = wait_for(
        "a refused call in the audit log",
        Duration::from_secs(20),
        || {
            records(&server, Some("node"))
                .into_iter()
                .find(|r| r["decision"] == "deny" && r["actor"]["id"] == agent.spiffe_id.as_str())
        },
    )
    .unwrap();
    assert!(
        refused["message"].as_str().unwrap().contains("banned"),
        "{refused}"
    );
    banned.kill();

    let out = server.cli(&["agent", "unban", "--spiffe-id", &agent.spiffe_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout(&out).contains("Unbanned"));
    let shown = server
        .cli_json(&["agent", "show", &agent.spiffe_id])
        .unwrap();
    assert_eq!(shown["banned"], false);

    // The agent, restarted on its stored SVID (no new token), is served.
    let old = agent;
    let again = Agent::start_in(&server, &old.dir, None, &old.spiffe_id).unwrap();
    let svid = wait_for("an SVID after the unban", Duration::from_secs(30), || {
        fetch_x509_child(&again.socket, None).ok()
    })
    .unwrap();
    assert_eq!(svid.spiffe_id, format!("spiffe://{TRUST_DOMAIN}/e2e/unban"));

    let me = format!("unix:uid:{}", my_uid());
    let admin = records(&server, Some("admin"));
    for action in [
        "admin.POST /v1/agents/{id}/ban",
        "admin.POST /v1/agents/{id}/unban",
    ] {
        assert!(
            admin.iter().any(|r| r["action"] == action
                && r["actor"]["id"] == me.as_str()
                && r["result"] == "ok"),
            "{action}: {admin:?}"
        );
    }
    let out = server.cli(&["audit", "verify"]);
    assert!(out.status.success(), "{}", stdout(&out));
}
