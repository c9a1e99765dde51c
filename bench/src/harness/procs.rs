//! The real `mayfly-server` and `mayfly-agent` binaries as child processes:
//! each in its own temporary directory, on loopback, with free ports and the
//! server's rate limiter switched off.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};

/// The trust domain of every benchmark server.
pub const TRUST_DOMAIN: &str = "example.org";

/// How long a process may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

/// Path of a workspace binary (`mayfly-server`, `mayfly-agent`), looked up
/// next to this executable: `target/release/` for a release bench,
/// `target/debug/` for a debug one (as in CI).
pub fn binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find the benchmark's own executable")?;
    let dir = exe
        .parent()
        .context("the benchmark executable has no parent directory")?;
    // `cargo run` puts the binary in target/<profile>/; a test binary lives
    // one level deeper, in target/<profile>/deps/.
    for candidate in [dir.join(name), dir.join("..").join(name)] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    let profile = if cfg!(debug_assertions) {
        ""
    } else {
        "--release "
    };
    bail!(
        "{name} not found in {}: build them with cargo build {profile}-p mayfly-server -p mayfly-agent",
        dir.display()
    )
}

/// A free TCP port on loopback (bound, read, released).
pub fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Polls `f` every 10 ms until it returns `Some`, or fails after `timeout`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The peak resident set size (`VmHWM`, kB) of a live process.
pub fn peak_rss_kb(pid: u32) -> Option<u64> {
    status_kb(pid, "VmHWM:")
}

/// The CPU time (user + system) a live process has used, from
/// `/proc/<pid>/stat` (clock ticks, assumed 100 per second as on every Linux
/// port that Mayfly runs on).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; the fields after it do not.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // `rest` starts at field 3 (state); utime and stime are fields 14 and 15.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis((utime + stime) * 10))
}

/// A kB figure of `/proc/<pid>/status` (`VmHWM:`, `VmRSS:`).
fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// A child process with its output in a log file; stopped on drop.
#[derive(Debug)]
pub struct Proc {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> Result<Self> {
        let out = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        cmd.stdout(out.try_clone()?)
            .stderr(out)
            .stdin(Stdio::null());
        let child = cmd.spawn().with_context(|| format!("spawning {cmd:?}"))?;
        Ok(Self {
            name,
            child: Some(child),
            log,
        })
    }

    /// The process id (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Its peak RSS so far, kB.
    pub fn peak_rss_kb(&self) -> Option<u64> {
        peak_rss_kb(self.pid())
    }

    /// Fails with the end of its log if it has exited.
    fn check_running(&mut self) -> Result<()> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = child.try_wait()?
        {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            bail!(
                "{} exited early ({status}); the end of {}:\n{}",
                self.name,
                self.log.display(),
                tail.join("\n")
            );
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after 5 s; reaps.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A server's temporary directory and configuration before it starts, so
/// that a scenario can fill its store first (`mayfly-server entry import
/// --config`): the rate limiter off (`0` = unlimited: the limiter would
/// otherwise cap the benchmark at 500 signings per second) and otherwise
/// the defaults (log level `info`, audit file on).
#[derive(Debug)]
pub struct ServerDir {
    /// The configuration file.
    pub config: PathBuf,
    /// The admin API's Unix socket.
    pub admin_socket: PathBuf,
    /// The node API (gRPC over mutual TLS).
    pub node_addr: SocketAddr,
    tmp: tempfile::TempDir,
}

impl ServerDir {
    /// A new directory with its configuration written.
    pub fn new() -> Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix("mayfly-bench-server")
            .tempdir()?;
        let dir = tmp.path().to_owned();
        let admin_socket = dir.join("admin.sock");
        let node_addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let config = dir.join("server.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\ntrust_domain = \"{TRUST_DOMAIN}\"\ndata_dir = \"{}\"\n\
                 bind_address = \"{node_addr}\"\nhttp_address = \"127.0.0.1:0\"\n\
                 admin_socket_path = \"{}\"\n\n\
                 [server.rate_limits]\nattestations_per_minute = 0\n\
                 signings_per_second = 0\nsigning_burst = 0\n",
                dir.join("data").display(),
                admin_socket.display(),
            ),
        )?;
        Ok(Self {
            config,
            admin_socket,
            node_addr,
            tmp,
        })
    }

    /// The server's data directory (`data_dir`).
    pub fn data_dir(&self) -> PathBuf {
        self.tmp.path().join("data")
    }
}

/// A running `mayfly-server` on loopback, in its own temporary directory.
#[derive(Debug)]
pub struct Server {
    proc: Proc,
    bin: PathBuf,
    /// The admin API's Unix socket.
    pub admin_socket: PathBuf,
    /// The node API (gRPC over mutual TLS).
    pub node_addr: SocketAddr,
    /// From spawning the process to its admin socket answering.
    pub startup: Duration,
    _tmp: tempfile::TempDir,
}

impl Server {
    /// Starts a server in a new [`ServerDir`] and waits until its admin
    /// socket answers.
    pub fn start() -> Result<Self> {
        Self::start_in(ServerDir::new()?)
    }

    /// Starts a server on `dir` and waits until its admin socket answers
    /// (it is created once the store is loaded and the node API listens).
    pub fn start_in(dir: ServerDir) -> Result<Self> {
        let bin = binary("mayfly-server")?;
        let ServerDir {
            config,
            admin_socket,
            node_addr,
            tmp,
        } = dir;
        let mut cmd = Command::new(&bin);
        cmd.arg("run").arg("--config").arg(&config);
        let spawned = Instant::now();
        let mut proc = Proc::spawn("mayfly-server", cmd, tmp.path().join("server.log"))?;
        wait_for("the server's admin socket", READY_TIMEOUT, || {
            if let Err(e) = proc.check_running() {
                return Some(Err(e));
            }
            // The socket file appears first (cheap to poll); then one
            // healthcheck confirms the admin API answers.
            let ok = admin_socket.exists()
                && Command::new(&bin)
                    .args(["healthcheck", "--socket-path"])
                    .arg(&admin_socket)
                    .output()
                    .is_ok_and(|o| o.status.success());
            ok.then_some(Ok(()))
        })??;
        let startup = spawned.elapsed();
        Ok(Self {
            proc,
            bin,
            admin_socket,
            node_addr,
            startup,
            _tmp: tmp,
        })
    }

    /// The process id (0 once stopped).
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Runs `mayfly-server <args> --socket-path <admin> --output json`.
    pub fn cli_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let out = Command::new(&self.bin)
            .args(args)
            .arg("--socket-path")
            .arg(&self.admin_socket)
            .args(["--output", "json"])
            .output()
            .context("running the mayfly-server CLI")?;
        if !out.status.success() {
            bail!(
                "mayfly-server {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            anyhow!(
                "mayfly-server {args:?} printed non-JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// Runs `mayfly-server <args> --socket-path <admin>`; its standard output.
    pub fn cli_text(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.bin)
            .args(args)
            .arg("--socket-path")
            .arg(&self.admin_socket)
            .output()
            .context("running the mayfly-server CLI")?;
        if !out.status.success() {
            bail!(
                "mayfly-server {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        String::from_utf8(out.stdout).context("the mayfly-server CLI printed non-UTF-8")
    }

    /// A new join token and the agent SPIFFE ID it gives.
    pub fn join_token(&self) -> Result<(String, String)> {
        let v = self.cli_json(&["token", "generate"])?;
        let token = v["token"].as_str().context("no token in the answer")?;
        let id = v["id"].as_str().context("no token id in the answer")?;
        Ok((
            token.to_owned(),
            format!("spiffe://{TRUST_DOMAIN}/mayfly/agent/join_token/{id}"),
        ))
    }

    /// Registers an entry for `spiffe_id` under `parent_id`; its id.
    pub fn create_entry(&self, spiffe_id: &str, parent_id: &str, selector: &str) -> Result<String> {
        self.create_entry_with(spiffe_id, parent_id, selector, &[])
    }

    /// [`Server::create_entry`] with more `entry create` flags (`--scope shared`).
    pub fn create_entry_with(
        &self,
        spiffe_id: &str,
        parent_id: &str,
        selector: &str,
        flags: &[&str],
    ) -> Result<String> {
        let mut args = vec![
            "entry",
            "create",
            "--spiffe-id",
            spiffe_id,
            "--parent-id",
            parent_id,
            "--selector",
            selector,
        ];
        args.extend_from_slice(flags);
        let v = self.cli_json(&args)?;
        let id = v["id"]
            .as_str()
            .or_else(|| v["entry"]["id"].as_str())
            .or_else(|| v["results"][0]["entry"]["id"].as_str())
            .with_context(|| format!("no entry id in {v}"))?;
        Ok(id.to_owned())
    }

    /// Its peak RSS so far, kB.
    pub fn peak_rss_kb(&self) -> Option<u64> {
        self.proc.peak_rss_kb()
    }

    /// Fails if the server has exited.
    pub fn check_running(&mut self) -> Result<()> {
        self.proc.check_running()
    }

    /// Stops it; its peak RSS read just before.
    pub fn stop(mut self) -> Option<u64> {
        let rss = self.peak_rss_kb();
        self.proc.stop();
        rss
    }

    /// The server's log file.
    pub fn log_path(&self) -> &Path {
        &self.proc.log
    }
}

/// A running `mayfly-agent`, attested to a [`Server`] with a new join token,
/// in its own temporary directory (data, Workload API socket, log).
#[derive(Debug)]
pub struct Agent {
    proc: Proc,
    /// The Workload API's Unix socket.
    pub socket: PathBuf,
    /// The agent's SPIFFE ID (the parent of its entries).
    pub spiffe_id: String,
    _tmp: tempfile::TempDir,
}

impl Agent {
    /// Starts an agent for `server`: a join token from the server's CLI
    /// (passed in `MAYFLY_JOIN_TOKEN`, never on the command line), the
    /// server's bundle as its bootstrap bundle, a free health port, log level
    /// `info`; waits until `/readyz` answers 200 (attested, first sync done)
    /// and the socket exists.
    pub fn start(server: &Server) -> Result<Self> {
        let bin = binary("mayfly-agent")?;
        let tmp = tempfile::Builder::new()
            .prefix("mayfly-bench-agent")
            .tempdir()?;
        let dir = tmp.path().to_owned();
        let bundle = dir.join("bootstrap-bundle.pem");
        std::fs::write(
            &bundle,
            server.cli_text(&["bundle", "show", "--format", "pem"])?,
        )?;
        let (token, spiffe_id) = server.join_token()?;
        let socket = dir.join("api.sock");
        let health = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "[agent]\ntrust_domain = \"{TRUST_DOMAIN}\"\nserver_address = \"{}\"\n\
                 data_dir = \"{}\"\nsocket_path = \"{}\"\ntrust_bundle_path = \"{}\"\n\
                 health_address = \"{health}\"\n",
                server.node_addr,
                dir.join("data").display(),
                socket.display(),
                bundle.display(),
            ),
        )?;
        let mut cmd = Command::new(&bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&config)
            .env("MAYFLY_JOIN_TOKEN", &token);
        let mut proc = Proc::spawn("mayfly-agent", cmd, dir.join("agent.log"))?;
        let health = health.to_string();
        wait_for("the agent's /readyz", READY_TIMEOUT, || {
            if let Err(e) = proc.check_running() {
                return Some(Err(e));
            }
            let ok = socket.exists()
                && Command::new(&bin)
                    .args(["healthcheck", "--health-address", &health])
                    .output()
                    .is_ok_and(|o| o.status.success());
            ok.then_some(Ok(()))
        })??;
        Ok(Self {
            proc,
            socket,
            spiffe_id,
            _tmp: tmp,
        })
    }

    /// Its peak RSS so far, kB.
    pub fn peak_rss_kb(&self) -> Option<u64> {
        self.proc.peak_rss_kb()
    }

    /// Its current RSS, kB.
    pub fn rss_kb(&self) -> Option<u64> {
        status_kb(self.proc.pid(), "VmRSS:")
    }

    /// The CPU time (user + system, all threads) it has used so far.
    pub fn cpu_time(&self) -> Option<Duration> {
        cpu_time(self.proc.pid())
    }

    /// Fails if the agent has exited.
    pub fn check_running(&mut self) -> Result<()> {
        self.proc.check_running()
    }

    /// Stops it; its peak RSS read just before.
    pub fn stop(mut self) -> Option<u64> {
        let rss = self.peak_rss_kb();
        self.proc.stop();
        rss
    }

    /// The agent's log file.
    pub fn log_path(&self) -> &Path {
        &self.proc.log
    }
}
