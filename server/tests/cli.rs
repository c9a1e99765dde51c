//! The real `mayfly-server` binary: a server started with `run`, driven by
//! the CLI commands over its admin socket.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: failing loudly is the point

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_mayfly-server");

/// A server process, killed when the test ends (even by a panic).
struct ServerGuard {
    child: Child,
    log: PathBuf,
}

impl ServerGuard {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn write_config(dir: &Path) -> (PathBuf, PathBuf) {
    let socket = dir.join("admin.sock");
    let config = dir.join("server.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\ntrust_domain = \"example.org\"\ndata_dir = \"{}\"\nbind_address = \"127.0.0.1:0\"\nhttp_address = \"127.0.0.1:0\"\nadmin_socket_path = \"{}\"\n",
            dir.join("data").display(),
            socket.display()
        ),
    )
    .unwrap();
    (config, socket)
}

fn start(dir: &Path) -> (ServerGuard, PathBuf) {
    let (config, socket) = write_config(dir);
    let log = dir.join("server.log");
    let out = std::fs::File::create(&log).unwrap();
    let child = Command::new(BIN)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let mut guard = ServerGuard { child, log };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = guard.child.try_wait().unwrap() {
            panic!("server exited early ({status}):\n{}", guard.log_text());
        }
        if socket.exists() && cli(&socket, &["healthcheck"]).status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the admin socket did not answer in time:\n{}",
            guard.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (guard, socket)
}

fn cli(socket: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .arg("--socket-path")
        .arg(socket)
        .env_remove("MAYFLY_ADMIN_SOCKET")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs a command that must succeed with `--output json`.
fn json(socket: &Path, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.extend(["--output", "json"]);
    let out = cli(socket, &all);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{args:?} printed non-JSON ({e}): {}", text(&out.stdout)))
}

fn failure(out: &Output) -> String {
    assert_eq!(out.status.code(), Some(1), "stdout: {}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(err.starts_with("error: "), "{err}");
    err
}

const PARENT: &str = "spiffe://example.org/mayfly/agent/join_token/node1";

#[test]
fn entries_tokens_and_minting_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let (mut server, socket) = start(tmp.path());

    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the admin socket is owner-only");

    // create → list → show → update → delete
    let created = json(
        &socket,
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/web",
            "--parent-id",
            PARENT,
            "--selector",
            "unix:uid:1000",
            "--selector",
            "unix:gid:1000",
            "--x509-svid-ttl",
            "30m",
            "--dns",
            "web.example.org",
            "--scope",
            "shared",
        ],
    );
    let entry = &created["results"][0]["entry"];
    let id = entry["id"].as_str().expect("an entry id").to_owned();
    assert_eq!(entry["scope"], "shared");
    assert_eq!(entry["dns_names"][0], "web.example.org");

    let listed = json(&socket, &["entry", "list"]);
    let ids: Vec<&str> = listed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["id"].as_str())
        .collect();
    assert_eq!(ids, [id.as_str()]);
    let filtered = json(&socket, &["entry", "list", "--selector", "unix:uid:9"]);
    assert_eq!(filtered["entries"].as_array().unwrap().len(), 0);

    let out = cli(&socket, &["entry", "show", &id]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(
        shown.contains("spiffe://example.org/web") && shown.contains("unix:gid:1000"),
        "{shown}"
    );
    assert_eq!(&json(&socket, &["entry", "show", &id]), entry);

    let updated = json(
        &socket,
        &[
            "entry",
            "update",
            &id,
            "--selector",
            "unix:uid:2000",
            "--admin",
        ],
    );
    assert_eq!(updated["selectors"], serde_json::json!(["unix:uid:2000"]));
    assert_eq!(updated["admin"], true);
    assert_eq!(updated["x509_svid_ttl"], "30m", "fields not given are kept");

    let out = cli(&socket, &["entry", "list"]);
    assert!(text(&out.stdout).contains(&id), "{}", text(&out.stdout));

    let deleted = json(&socket, &["entry", "delete", &id]);
    assert_eq!(deleted["id"], id.as_str());
    let err = failure(&cli(&socket, &["entry", "show", &id]));
    assert!(err.contains("no entry"), "{err}");

    // A bad selector is refused with a message that names it.
    let err = failure(&cli(
        &socket,
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/x",
            "--parent-id",
            PARENT,
            "--selector",
            "nope",
        ],
    ));
    assert!(
        err.contains("\"nope\"") && err.contains("type:value"),
        "{err}"
    );
    let err = failure(&cli(
        &socket,
        &["entry", "create", "--spiffe-id", "spiffe://example.org/x"],
    ));
    assert!(err.contains("--parent-id"), "{err}");

    // Join tokens.
    let token = json(&socket, &["token", "generate", "--ttl", "5m"]);
    let secret = token["token"].as_str().unwrap();
    assert_eq!(secret.len(), 64);
    assert!(
        token["agent_id"]
            .as_str()
            .unwrap()
            .ends_with(token["id"].as_str().unwrap())
    );
    let out = cli(&socket, &["token", "generate"]);
    assert!(text(&out.stdout).contains("Token"), "{}", text(&out.stdout));

    // Agents: none yet; unknown ones are refused.
    let agents = json(&socket, &["agent", "list"]);
    assert_eq!(agents["agents"].as_array().unwrap().len(), 0);
    let err = failure(&cli(
        &socket,
        &["agent", "ban", "mayfly/agent/join_token/ghost"],
    ));
    assert!(err.contains("no attested agent"), "{err}");

    // Bundle and minting.
    let out = cli(&socket, &["bundle", "show"]);
    assert!(text(&out.stdout).contains("BEGIN CERTIFICATE"));
    let bundle = json(&socket, &["bundle", "show"]);
    assert!(
        bundle["keys"].as_array().is_some_and(|k| k.len() >= 2),
        "{bundle}"
    );

    let out_dir = tmp.path().join("minted");
    let written = json(
        &socket,
        &[
            "x509",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/ops",
            "--ttl",
            "10m",
            "--write",
            out_dir.to_str().unwrap(),
        ],
    );
    assert_eq!(written["spiffe_id"], "spiffe://example.org/ops");
    for f in ["svid.pem", "svid.key", "bundle.pem"] {
        assert!(out_dir.join(f).exists(), "{f}");
    }
    let key_mode = std::fs::metadata(out_dir.join("svid.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);

    let out = cli(
        &socket,
        &[
            "jwt",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/ops",
            "--audience",
            "db",
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim().split('.').count(), 3);

    // SIGTERM stops the server cleanly and removes its socket.
    let sent = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}:\n{}", server.log_text());
    assert!(!socket.exists());

    // Nothing listens now: the error says where and what to do.
    let err = failure(&cli(&socket, &["entry", "list"]));
    assert!(
        err.contains(&socket.display().to_string()) && err.contains("mayfly-server run"),
        "{err}"
    );
}

#[test]
fn a_broken_config_is_exit_1_naming_file_line_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("broken.toml");
    std::fs::write(
        &config,
        "[server]\ntrust_domain = \"example.org\"\ncolour = \"blue\"\n",
    )
    .unwrap();
    for args in [vec!["run", "--config"], vec!["entry", "list", "--config"]] {
        let out = Command::new(BIN)
            .args(&args)
            .arg(&config)
            .env_remove("MAYFLY_ADMIN_SOCKET")
            .output()
            .unwrap();
        let err = failure(&out);
        assert!(
            err.contains("broken.toml") && err.contains("line 3") && err.contains("colour"),
            "{args:?}: {err}"
        );
    }
    // A usage error is exit 2.
    let out = Command::new(BIN)
        .args(["entry", "frobnicate"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn authority_rotation_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let (server, socket) = start(tmp.path());

    let shown = json(&socket, &["authority", "show"]);
    let x509 = shown["x509"].as_array().unwrap();
    assert_eq!(x509.len(), 1);
    assert_eq!(x509[0]["phase"], "active");
    assert_eq!(x509[0]["tainted"], false);
    assert!(x509[0]["not_after"].as_str().is_some());
    assert_eq!(shown["jwt"][0]["phase"], "active");
    let first = x509[0]["id"].as_str().unwrap().to_owned();

    // healthcheck reports the authorities too.
    let health = json(&socket, &["healthcheck"]);
    assert_eq!(health["authorities"]["x509"][0]["id"], first.as_str());
    let out = cli(&socket, &["healthcheck"]);
    assert!(out.status.success());
    let t = text(&out.stdout);
    assert!(t.contains(&first) && t.contains("active"), "{t}");

    let prepared = json(&socket, &["authority", "prepare", "--type", "x509"]);
    assert_eq!(prepared["phase"], "prepared");
    let err = failure(&cli(&socket, &["authority", "prepare", "--type", "x509"]));
    assert!(err.contains("already prepared"), "{err}");
    let bundle = cli(&socket, &["bundle", "show"]);
    assert_eq!(pem::parse_many(&bundle.stdout).unwrap().len(), 2);

    let active = json(&socket, &["authority", "activate", "--type", "x509"]);
    assert_eq!(active["id"], prepared["id"]);
    assert_eq!(active["phase"], "active");
    let err = failure(&cli(&socket, &["authority", "activate", "--type", "x509"]));
    assert!(err.contains("no x509 authority is prepared"), "{err}");

    let err = failure(&cli(
        &socket,
        &[
            "authority",
            "revoke",
            "--type",
            "x509",
            "--authority-id",
            &first,
        ],
    ));
    assert!(err.contains("not tainted"), "{err}");
    let tainted = json(
        &socket,
        &[
            "authority",
            "taint",
            "--type",
            "x509",
            "--authority-id",
            &first,
        ],
    );
    assert_eq!(
        (tainted["phase"].as_str(), tainted["tainted"].as_bool()),
        (Some("old"), Some(true))
    );
    let revoked = json(
        &socket,
        &[
            "authority",
            "revoke",
            "--type",
            "x509",
            "--authority-id",
            &first,
        ],
    );
    assert_eq!(revoked["id"], first.as_str());

    let shown = json(&socket, &["authority", "show"]);
    let x509 = shown["x509"].as_array().unwrap();
    assert_eq!(x509.len(), 1);
    assert_eq!(x509[0]["id"], prepared["id"]);
    assert_eq!(x509[0]["phase"], "active");
    let bundle = cli(&socket, &["bundle", "show"]);
    assert_eq!(pem::parse_many(&bundle.stdout).unwrap().len(), 1);

    // The JWT key rotates the same way; text output names the phase.
    let out = cli(&socket, &["authority", "prepare", "--type", "jwt"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("prepared"));
    let out = cli(&socket, &["authority", "show"]);
    let t = text(&out.stdout);
    assert!(t.starts_with("TYPE"), "{t}");
    assert_eq!(t.lines().filter(|l| l.starts_with("jwt")).count(), 2, "{t}");
    let err = failure(&cli(
        &socket,
        &[
            "authority",
            "taint",
            "--type",
            "jwt",
            "--authority-id",
            "nope",
        ],
    ));
    assert!(err.contains("nope"), "{err}");
    // Transitions are logged with the authority id and phase.
    let log = server.log_text();
    assert!(
        log.contains(&first) && log.contains("authority revoked"),
        "{log}"
    );
}

#[test]
fn revocations_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let (_server, socket) = start(tmp.path());
    let mint = |id: &str| json(&socket, &["x509", "mint", "--spiffe-id", id]);
    let first = mint("spiffe://example.org/ops");
    let serial = first["serial"].as_str().unwrap().to_owned();
    let jwt = json(
        &socket,
        &[
            "jwt",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/ops",
            "--audience",
            "db",
        ],
    );
    let jti = jwt["jti"].as_str().unwrap().to_owned();
    let other = mint("spiffe://example.org/batch");

    let listed = json(&socket, &["revocation", "list"]);
    assert_eq!(listed["revocations"].as_array().unwrap().len(), 0);

    let added = json(
        &socket,
        &[
            "revocation",
            "add",
            "--serial",
            &serial.to_uppercase(),
            "--reason",
            "key leaked",
        ],
    );
    let revoked = added["revoked"].as_array().unwrap();
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0]["serial"], serial.as_str());
    assert_eq!(revoked[0]["reason"], "operator");
    assert!(revoked[0]["authority_id"].as_str().is_some());
    // Again: nothing new.
    let again = json(&socket, &["revocation", "add", "--serial", &serial]);
    assert_eq!(again["revoked"].as_array().unwrap().len(), 0);

    let added = json(&socket, &["revocation", "add", "--jti", &jti]);
    assert_eq!(added["revoked"][0]["jti"], jti.as_str());
    let added = json(
        &socket,
        &[
            "revocation",
            "add",
            "--spiffe-id",
            "spiffe://example.org/batch",
        ],
    );
    assert_eq!(added["revoked"][0]["serial"], other["serial"]);

    let listed = json(&socket, &["revocation", "list"]);
    assert_eq!(listed["revocations"].as_array().unwrap().len(), 3);
    let out = cli(&socket, &["revocation", "list"]);
    assert!(out.status.success());
    let t = text(&out.stdout);
    assert!(
        t.contains(&serial) && t.contains(&jti) && t.contains("3 revocations"),
        "{t}"
    );

    let err = failure(&cli(&socket, &["revocation", "add", "--serial", "0abc"]));
    assert!(err.contains("no unexpired credential"), "{err}");
    let out = cli(&socket, &["revocation", "add"]);
    assert_eq!(out.status.code(), Some(2));
    let out = cli(
        &socket,
        &["revocation", "add", "--serial", "01", "--jti", "x"],
    );
    assert_eq!(out.status.code(), Some(2));
}
