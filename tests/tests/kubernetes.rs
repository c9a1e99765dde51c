//! End to end on "Kubernetes": a real server and a real agent attesting with
//! `k8s_psat` against a local HTTPS server that answers the Kubernetes API
//! as a real API server does (no cluster is available here). The server
//! publishes its trust bundle to a ConfigMap; the agent serves workloads.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use mayfly_e2e::fake_kube::{FakeKube, FakeToken};
use mayfly_e2e::{Agent, Server, TRUST_DOMAIN, fetch_x509_child, my_uid, wait_for};

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
