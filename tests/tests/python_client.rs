//! End to end with py-spiffe (grpcio), a client that sends the socket path
//! as the HTTP/2 `:authority` — the case the `h2` crate alone rejects.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::Duration;

use mayfly_e2e::{Agent, Server, TRUST_DOMAIN, my_uid, wait_for};

#[test]
fn py_spiffe_fetches_and_validates() {
    let have = Command::new("python3")
        .args(["-c", "import spiffe"])
        .output();
    assert!(
        have.is_ok_and(|o| o.status.success()),
        "py-spiffe is not installed: run scripts/test, which installs it (pip install -r tests/python/requirements.txt)"
    );
    let server = Server::start().unwrap();
    let agent = Agent::start(&server).unwrap();
    let id = format!("spiffe://{TRUST_DOMAIN}/e2e/python");
    server
        .create_entry(&id, &agent.spiffe_id, &[&format!("unix:uid:{}", my_uid())])
        .unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/py_spiffe_client.py");
    let out = wait_for(
        "py-spiffe to fetch an SVID",
        Duration::from_secs(30),
        || {
            let out = Command::new("python3")
                .arg(script)
                .arg(&agent.socket)
                .arg("py-audience")
                .output()
                .unwrap();
            out.status.success().then_some(out)
        },
    );
    let out = match out {
        Ok(o) => o,
        Err(e) => {
            let last = Command::new("python3")
                .arg(script)
                .arg(&agent.socket)
                .arg("py-audience")
                .output()
                .unwrap();
            panic!(
                "{e}\nstderr: {}\nagent log:\n{}",
                String::from_utf8_lossy(&last.stderr),
                agent.proc.log_text()
            );
        }
    };
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["x509_spiffe_id"], id);
    assert_eq!(v["jwt_spiffe_id"], id);
    assert_eq!(v["validated_spiffe_id"], id);
    assert!(v["chain_len"].as_u64().unwrap() >= 1);
}
