//! End to end: malformed input gives a clear error, never a panic, and
//! loses no stored data.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use mayfly::proto::workload::ValidateJwtsvidRequest;
use mayfly_e2e::{
    Agent, Server, TRUST_DOMAIN, admin_http, bin, my_uid, raw_workload_client, with_header,
};
use tonic::Code;

#[test]
fn broken_configs_name_the_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("server.toml");
    std::fs::write(
        &cfg,
        "[server]\ntrust_domain = \"example.org\"\nnot_a_key = 1\n",
    )
    .unwrap();
    let out = Command::new(bin("mayfly-server"))
        .arg("run")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("server.toml") && err.contains("line 3") && err.contains("not_a_key"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");

    let acfg = dir.path().join("agent.toml");
    std::fs::write(
        &acfg,
        "[agent]\nserver_address = \"127.0.0.1:1\"\nsokcet_path = \"/tmp/x\"\n",
    )
    .unwrap();
    let out = Command::new(bin("mayfly-agent"))
        .arg("run")
        .arg("--config")
        .arg(&acfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("agent.toml") && err.contains("line 3") && err.contains("sokcet_path"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_api_bodies_csrs_and_jwts_are_clear_errors() {
    let server = Server::start().unwrap();
    let agent = Agent::start(&server).unwrap();
    let uid = my_uid();
    let kept = server
        .create_entry(
            &format!("spiffe://{TRUST_DOMAIN}/e2e/kept"),
            &agent.spiffe_id,
            &[&format!("unix:uid:{uid}")],
        )
        .unwrap();

    for body in [
        "not json",
        r#"{"entries":[{"bogus":1}]}"#,
        r#"{"entries":[{"spiffe_id":"nope","parent_id":"x","selectors":["unix:uid:1"]}]}"#,
        r#"{"unknown":true}"#,
    ] {
        let (code, text) = admin_http(&server.admin_socket, "POST", "/v1/entries", Some(body));
        assert!((400..500).contains(&code), "{body} -> {code} {text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        // Either the whole request is refused with an error document, or each item carries one.
        assert!(
            v["error"]["message"].is_string() || v["results"][0]["error"]["message"].is_string(),
            "{body} -> {text}"
        );
    }
    let (code, text) = admin_http(
        &server.admin_socket,
        "POST",
        "/v1/x509/mint",
        Some(&format!(
            r#"{{"spiffe_id":"spiffe://{TRUST_DOMAIN}/x","csr":"Z2FyYmFnZQ=="}}"#
        )),
    );
    assert_eq!(code, 400, "{text}");
    assert!(text.to_lowercase().contains("csr"), "{text}");

    // The store still holds the entry, and the server is healthy.
    let (code, text) = admin_http(
        &server.admin_socket,
        "GET",
        &format!("/v1/entries/{kept}"),
        None,
    );
    assert_eq!(code, 200, "{text}");

    // A malformed JWT handed to ValidateJWTSVID is InvalidArgument, and the agent lives on.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let mut c = raw_workload_client(&agent.socket).await.unwrap();
    for junk in ["", "garbage", "a.b.c", "eyJhbGciOiJub25lIn0.e30."] {
        let r = c
            .validate_jwtsvid(with_header(ValidateJwtsvidRequest {
                audience: "a".into(),
                svid: junk.into(),
            }))
            .await;
        assert_eq!(r.unwrap_err().code(), Code::InvalidArgument, "{junk:?}");
    }
    let out = agent.cli(&[
        "api",
        "validate",
        "jwt",
        "--audience",
        "a",
        "--svid",
        "garbage",
    ]);
    assert!(!out.status.success());
    assert!(agent.proc.log_text().matches("panicked").count() == 0);
    assert!(server.proc.log_text().matches("panicked").count() == 0);
}
