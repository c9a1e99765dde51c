//! End to end: policy files reload on change and on SIGHUP in a real server
//! process; a broken file is rejected with its position in the log and the
//! previous policy stays in force.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use mayfly_e2e::{Server, admin_http, wait_for};
use serde_json::{Value, json};

fn forbid(id: &str, prefix: &str) -> String {
    format!(
        "@id(\"{id}\")\nforbid (principal is Mayfly::Workload, action, resource is Mayfly::Entry)\nwhen {{ resource.spiffe_id like \"spiffe://example.org/{prefix}/*\" }};\n"
    )
}

/// The server's decision on an X.509-SVID for `path`: (decision, reasons).
fn decide(server: &Server, path: &str) -> (String, Vec<String>) {
    let body = json!({
        "action": "issue_x509",
        "spiffe_id": format!("spiffe://example.org{path}"),
        "node": {"attestor": "join_token", "assurance": "low"},
    });
    let (status, text) = admin_http(
        &server.admin_socket,
        "POST",
        "/v1/policy/check",
        Some(&body.to_string()),
    );
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    let reasons = v["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    (v["decision"].as_str().unwrap().to_owned(), reasons)
}

fn start(dir: &Path, interval: &str) -> Server {
    Server::start_with(&format!(
        "policy_paths = [\"{}\"]\npolicy_reload_interval = \"{interval}\"\n",
        dir.display()
    ))
    .unwrap()
}

#[test]
fn a_broken_file_keeps_the_old_policy_and_a_valid_change_reloads() {
    let policy = tempfile::tempdir().unwrap();
    let file = policy.path().join("local.cedar");
    std::fs::write(&file, forbid("v1.no_payments", "payments")).unwrap();
    let server = start(policy.path(), "1s");
    assert_eq!(
        decide(&server, "/payments/api"),
        ("deny".into(), vec!["v1.no_payments".into()])
    );
    assert_eq!(decide(&server, "/web/app").0, "allow");

    // Broken: rejected, logged with file:line:column, decision unchanged.
    std::fs::write(&file, "forbid (principal, action resource);\n").unwrap();
    let expected = format!("{}:1:", file.display());
    wait_for(
        "the rejected reload in the log",
        Duration::from_secs(20),
        || {
            let log = server.proc.log_text();
            (log.contains("policy reload rejected") && log.contains(&expected)).then_some(())
        },
    )
    .unwrap();
    assert_eq!(
        decide(&server, "/payments/api"),
        ("deny".into(), vec!["v1.no_payments".into()])
    );

    // Valid and changed: in force within a few polls.
    std::fs::write(&file, forbid("v2.no_web", "web")).unwrap();
    wait_for("the changed policy", Duration::from_secs(20), || {
        (decide(&server, "/payments/api").0 == "allow").then_some(())
    })
    .unwrap();
    assert_eq!(
        decide(&server, "/web/app"),
        ("deny".into(), vec!["v2.no_web".into()])
    );
    assert!(server.proc.log_text().contains("policy reloaded"));
}

#[test]
fn sighup_reloads_at_once() {
    let policy = tempfile::tempdir().unwrap();
    let file = policy.path().join("local.cedar");
    std::fs::write(&file, forbid("v1.no_payments", "payments")).unwrap();
    // Polling every hour: only SIGHUP can bring the change in.
    let server = start(policy.path(), "1h");
    assert_eq!(decide(&server, "/payments/api").0, "deny");
    std::fs::write(&file, forbid("v2.no_web", "web")).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(decide(&server, "/payments/api").0, "deny", "not polled");

    let status = Command::new("kill")
        .args(["-HUP", &server.proc.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    wait_for("the SIGHUP reload", Duration::from_secs(20), || {
        (decide(&server, "/payments/api").0 == "allow").then_some(())
    })
    .unwrap();
    assert_eq!(decide(&server, "/web/app").0, "deny");
    assert!(server.proc.log_text().contains("SIGHUP"));
}
