//! End to end: what must be refused is refused, with the right status.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use mayfly::proto::workload::{JwtsvidRequest, X509svidRequest};
use mayfly_e2e::{
    Agent, Server, TRUST_DOMAIN, my_uid, raw_workload_client, wait_for, with_header,
    workload_channel,
};
use tonic::Code;

async fn fetch_code(agent: &Agent) -> Code {
    let mut c = raw_workload_client(&agent.socket).await.unwrap();
    match c.fetch_x509svid(with_header(X509svidRequest {})).await {
        Ok(resp) => match resp.into_inner().message().await {
            Ok(Some(_)) => Code::Ok,
            Ok(None) => Code::Unknown,
            Err(s) => s.code(),
        },
        Err(s) => s.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmatched_caller_and_missing_header_are_refused() {
    let server = Server::start().unwrap();
    let agent = Agent::start(&server).unwrap();
    // An entry for some other uid: this process matches nothing.
    let other_uid = my_uid() + 4242;
    server
        .create_entry(
            &format!("spiffe://{TRUST_DOMAIN}/e2e/other"),
            &agent.spiffe_id,
            &[&format!("unix:uid:{other_uid}")],
        )
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(fetch_code(&agent).await, Code::PermissionDenied);

    let mut c = raw_workload_client(&agent.socket).await.unwrap();
    let jwt = c
        .fetch_jwtsvid(with_header(JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        }))
        .await;
    assert_eq!(jwt.unwrap_err().code(), Code::PermissionDenied);

    // Without the security header: InvalidArgument, whatever the caller.
    let no_header = c
        .fetch_x509svid(tonic::Request::new(X509svidRequest {}))
        .await;
    let code = match no_header {
        Ok(resp) => resp.into_inner().message().await.unwrap_err().code(),
        Err(s) => s.code(),
    };
    assert_eq!(code, Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wit_and_unknown_calls_are_unimplemented() {
    let server = Server::start().unwrap();
    let agent = Agent::start(&server).unwrap();
    let channel = workload_channel(&agent.socket).await.unwrap();
    // The generated client only knows the five standard calls; reach the
    // optional WIT-SVID calls by path.
    let mut grpc = tonic::client::Grpc::new(channel);
    for path in [
        "/SpiffeWorkloadAPI/FetchWITSVID",
        "/SpiffeWorkloadAPI/FetchWITBundles",
        "/SpiffeWorkloadAPI/NoSuchCall",
    ] {
        grpc.ready().await.unwrap();
        let codec: tonic_prost::ProstCodec<X509svidRequest, X509svidRequest> =
            tonic_prost::ProstCodec::default();
        let r = grpc
            .unary(
                with_header(X509svidRequest {}),
                http::uri::PathAndQuery::from_static(path),
                codec,
            )
            .await;
        assert_eq!(r.unwrap_err().code(), Code::Unimplemented, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_never_gets_another_agents_entry() {
    let server = Server::start().unwrap();
    let a = Agent::start(&server).unwrap();
    let b = Agent::start(&server).unwrap();
    let sel = format!("unix:uid:{}", my_uid());
    server
        .create_entry(
            &format!("spiffe://{TRUST_DOMAIN}/e2e/for-b"),
            &b.spiffe_id,
            &[&sel],
        )
        .unwrap();
    // B serves it...
    wait_for(
        "agent B to serve its entry",
        Duration::from_secs(10),
        || (futures::executor::block_on(fetch_code(&b)) == Code::Ok).then_some(()),
    )
    .unwrap();
    // ...and A, whose workload has the very same selectors, does not.
    assert_eq!(fetch_code(&a).await, Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_works_once() {
    let server = Server::start().unwrap();
    let (token, spiffe_id) = server.join_token().unwrap();
    let dir1 = tempfile::tempdir().unwrap();
    let _first = Agent::start_in(&server, dir1.path(), Some(&token), &spiffe_id).unwrap();
    let dir2 = tempfile::tempdir().unwrap();
    let (mut second, _, _) = Agent::spawn_in(&server, dir2.path(), Some(&token)).unwrap();
    let status = wait_for(
        "the second agent to give up",
        Duration::from_secs(30),
        || second.try_wait(),
    )
    .unwrap();
    assert!(!status.success());
    let log = second.log_text();
    assert!(
        log.contains("join token") && (log.contains("used") || log.contains("invalid")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_banned_agent_is_cut_off_on_its_next_call() {
    let server = Server::start().unwrap();
    let agent = Agent::start(&server).unwrap();
    let out = server.cli(&["agent", "ban", &agent.spiffe_id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The server ends the agent's Sync stream and refuses its calls: the
    // agent reports it, and entries created afterwards never reach it.
    wait_for(
        "the agent to report the ban",
        Duration::from_secs(15),
        || agent.proc.log_text().contains("banned").then_some(()),
    )
    .unwrap();
    server
        .create_entry(
            &format!("spiffe://{TRUST_DOMAIN}/e2e/after-ban"),
            &agent.spiffe_id,
            &[&format!("unix:uid:{}", my_uid())],
        )
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_ne!(fetch_code(&agent).await, Code::Ok);
    let listed = server
        .cli_json(&["agent", "show", &agent.spiffe_id])
        .unwrap();
    assert_eq!(listed["banned"], true, "{listed}");
}
