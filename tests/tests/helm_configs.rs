//! The configurations the Helm chart renders are accepted by the real
//! binaries: `tests/helm/render_configs.py` (the real Helm engine, from the
//! `helm-python-sdk` wheel that `scripts/test` installs) writes the
//! server.toml and agent.toml of every values set, and `mayfly-server run
//! --check` / `mayfly-agent run --check` load them as a pod would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use mayfly_e2e::bin;

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

#[test]
fn every_rendered_configuration_loads_in_the_binaries() {
    let out = tempfile::tempdir().unwrap();
    let render = Command::new("python3")
        .arg(workspace().join("tests/helm/render_configs.py"))
        .arg(out.path())
        .output()
        .unwrap();
    assert!(
        render.status.success(),
        "render_configs.py failed (is tests/helm/requirements.txt installed? scripts/test does it): {}",
        String::from_utf8_lossy(&render.stderr)
    );
    let mut sets = 0;
    for set in std::fs::read_dir(out.path()).unwrap() {
        let dir = set.unwrap().path();
        sets += 1;
        // Policy files are mounted at /etc/mayfly/policy in the pod.
        let server = std::fs::read_to_string(dir.join("server.toml"))
            .unwrap()
            .replace(
                "/etc/mayfly/policy",
                &dir.join("policy").display().to_string(),
            );
        std::fs::write(dir.join("server.toml"), server).unwrap();
        for (binary, file) in [
            ("mayfly-server", "server.toml"),
            ("mayfly-agent", "agent.toml"),
        ] {
            let o = Command::new(bin(binary))
                .args(["run", "--check", "--config"])
                .arg(dir.join(file))
                .output()
                .unwrap();
            assert!(
                o.status.success(),
                "{binary} rejects the chart's {} ({}): {}{}",
                file,
                dir.display(),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(String::from_utf8_lossy(&o.stdout).contains("configuration valid"));
        }
    }
    assert_eq!(sets, 3, "default, dev and production");
}
