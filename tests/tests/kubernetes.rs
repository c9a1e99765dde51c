//! End to end on "Kubernetes": a real server and a real agent attesting with
//! `k8s_psat` against a local HTTPS server that answers the Kubernetes API
//! as a real API server does (no cluster is available here). The server
//! publishes its trust bundle to a ConfigMap; the agent serves workloads.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use mayfly_e2e::fake_kube::{FakeKube, FakeToken};
use mayfly_e2e::{
    Agent, Proc, Server, TRUST_DOMAIN, agent_healthcheck, bin, fetch_x509_child, free_port, my_uid,
    wait_for,
};

const NODE_UID: &str = "7c0d4a52-3e9b-4f0e-8a61-2d5b9e4f7a10";

fn cluster(dir: &Path) -> (FakeKube, String) {
    let kube = FakeKube::start().unwrap();
    let kubeconfig = dir.join("kubeconfig");
    kube.write_kubeconfig(&kubeconfig).unwrap();
    kube.add_node(
        "worker-1",
        NODE_UID,
        &[("topology.kubernetes.io/zone", "z1")],
    );
    kube.add_pod("mayfly", "mayfly-agent-q2w8e", "pod-uid-1", "worker-1", &[]);
    kube.add_pod("default", "intruder", "pod-uid-2", "worker-1", &[]);
    for (token, sa, pod) in [
        (
            "agent-token",
            ("mayfly", "mayfly-agent"),
            ("mayfly-agent-q2w8e", "pod-uid-1"),
        ),
        (
            "intruder-token",
            ("default", "default"),
            ("intruder", "pod-uid-2"),
        ),
    ] {
        kube.add_token(
            token,
            FakeToken {
                service_account: (sa.0.into(), sa.1.into()),
                pod: (pod.0.into(), pod.1.into()),
                audiences: vec!["mayfly-server".into()],
                expired: false,
            },
        );
    }
    let toml = format!(
        "[server.k8s_bundle]\nnamespace = \"mayfly\"\nconfigmap = \"mayfly-bundle\"\nkubeconfig_path = \"{kc}\"\n\
         [server.node_attestors.k8s_psat.clusters.e2e]\nservice_account_allow_list = [\"mayfly:mayfly-agent\"]\nkubeconfig_path = \"{kc}\"\n",
        kc = kubeconfig.display()
    );
    (kube, toml)
}

fn agent_toml(token_path: &Path) -> String {
    format!(
        "node_attestor = \"k8s_psat\"\n[agent.k8s_psat]\ncluster = \"e2e\"\ntoken_path = \"{}\"\n",
        token_path.display()
    )
}

#[test]
fn an_agent_attests_with_its_projected_token_and_serves_workloads() {
    let dir = tempfile::tempdir().unwrap();
    let (kube, server_toml) = cluster(dir.path());
    let server = Server::start_with(&server_toml).unwrap();

    // The server publishes its bundle to the ConfigMap; the agent uses that
    // copy as its bootstrap trust, as it would in a pod.
    let published = wait_for("the bundle ConfigMap", Duration::from_secs(20), || {
        kube.configmap_data("mayfly", "mayfly-bundle")
            .and_then(|d| d["bundle.pem"].as_str().map(str::to_owned))
    })
    .unwrap();
    assert_eq!(
        published,
        std::fs::read_to_string(server.bundle_pem()).unwrap()
    );

    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let token_path = agent_dir.join("token");
    std::fs::write(&token_path, "agent-token\n").unwrap();
    let agent_id = format!("spiffe://{TRUST_DOMAIN}/mayfly/agent/k8s_psat/e2e/{NODE_UID}");
    let agent = Agent::start_in_with(
        &server,
        &agent_dir,
        None,
        &agent_id,
        &agent_toml(&token_path),
    )
    .unwrap();

    let shown = server.cli_json(&["agent", "show", &agent_id]).unwrap();
    let shown = shown.to_string();
    for want in [
        "\"k8s_psat\"",
        "\"medium\"",
        "k8s_psat:cluster:e2e",
        "k8s_psat:agent_sa:mayfly-agent",
        "k8s_psat:agent_node_name:worker-1",
    ] {
        assert!(shown.contains(want), "{want} not in {shown}");
    }

    server
        .cli_json(&[
            "entry",
            "create",
            "--spiffe-id",
            &format!("spiffe://{TRUST_DOMAIN}/k8s/web"),
            "--parent-id",
            &agent_id,
            "--selector",
            &format!("unix:uid:{}", my_uid()),
        ])
        .unwrap();
    let svid = wait_for(
        "an SVID from the k8s_psat agent",
        Duration::from_secs(20),
        || fetch_x509_child(&agent.socket, None).ok(),
    )
    .unwrap();
    assert_eq!(svid.spiffe_id, format!("spiffe://{TRUST_DOMAIN}/k8s/web"));
}

#[test]
fn an_agent_whose_service_account_is_not_allowed_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let (_kube, server_toml) = cluster(dir.path());
    let server = Server::start_with(&server_toml).unwrap();
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let token_path = agent_dir.join("token");
    std::fs::write(&token_path, "intruder-token").unwrap();
    let (mut proc, _, _) =
        Agent::spawn_in_with(&server, &agent_dir, None, &agent_toml(&token_path)).unwrap();
    let status = proc
        .wait_exit(Duration::from_secs(30))
        .expect("the refused agent exits");
    assert!(!status.success());
    let log = proc.log_text();
    assert!(
        log.contains("default:default is not in service_account_allow_list"),
        "{log}"
    );
    assert!(!log.contains("intruder-token"), "the token is never logged");
}

#[test]
fn an_agent_started_before_the_bundle_is_published_waits_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let (kube, server_toml) = cluster(dir.path());
    let server = Server::start_with(&server_toml).unwrap();
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let token_path = agent_dir.join("token");
    std::fs::write(&token_path, "agent-token").unwrap();
    // Where the kubelet would project the ConfigMap: nothing there yet.
    let mounted = agent_dir.join("bundle").join("bundle.pem");
    let health = format!("127.0.0.1:{}", free_port());
    let config = agent_dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\ntrust_domain = \"{TRUST_DOMAIN}\"\nserver_address = \"{}\"\ndata_dir = \"{}\"\nsocket_path = \"{}\"\ntrust_bundle_path = \"{}\"\nhealth_address = \"{health}\"\n{}",
            server.address,
            agent_dir.join("data").display(),
            agent_dir.join("api.sock").display(),
            mounted.display(),
            agent_toml(&token_path),
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(bin("mayfly-agent"));
    cmd.arg("run").arg("--config").arg(&config);
    let mut agent = Proc::spawn_logged(cmd, agent_dir.join("agent.log")).unwrap();
    wait_for("the agent to say it waits", Duration::from_secs(20), || {
        agent
            .log_text()
            .contains("waiting for the trust bundle file")
            .then_some(())
    })
    .unwrap();
    assert!(
        agent.try_wait().is_none(),
        "the agent waits instead of exiting"
    );
    assert!(!agent_healthcheck(&health).0);

    // The "kubelet" projects the ConfigMap the server wrote.
    let published = wait_for("the bundle ConfigMap", Duration::from_secs(20), || {
        kube.configmap_data("mayfly", "mayfly-bundle")
            .and_then(|d| d["bundle.pem"].as_str().map(str::to_owned))
    })
    .unwrap();
    std::fs::create_dir_all(mounted.parent().unwrap()).unwrap();
    std::fs::write(&mounted, published).unwrap();
    wait_for(
        "the agent to attest and be ready",
        Duration::from_secs(30),
        || {
            if let Some(status) = agent.try_wait() {
                panic!("agent exited ({status}):\n{}", agent.log_text());
            }
            agent_healthcheck(&health).0.then_some(())
        },
    )
    .unwrap();
}
