//! The `mayfly-server` command line: `run` starts a server; every other
//! command is a client of the admin API on its Unix socket.

pub mod agent;
pub mod audit;
pub mod authority;
pub mod bundle;
pub mod client;
pub mod entry;
pub mod healthcheck;
pub mod mint;
pub mod output;
pub mod policy;
pub mod revocation;
pub mod token;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

use self::client::AdminClient;
use self::output::Output;
use crate::config::ServerConfig;

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the command failed: the server refused the request or is unreachable, a file
     could not be read or written, or the configuration is invalid (the message
     names the file, line and key); healthcheck: the server is not healthy
  2  the command line itself is wrong (unknown command or flag, missing value)

Commands other than `run` talk to the admin API socket chosen by, in order:
--socket-path, the admin_socket_path of --config FILE, $MAYFLY_ADMIN_SOCKET,
then the development default .mayfly/server/admin.sock.";

/// Mayfly server: the certificate authority and registry of a SPIFFE trust
/// domain, and the client of its admin API.
#[derive(Debug, Parser)]
#[command(name = "mayfly-server", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server until SIGINT or SIGTERM.
    #[command(after_help = EXIT_CODES_SHORT)]
    Run(RunArgs),
    /// Check that the server answers on its admin socket (exit 0) or not
    /// (exit 1), and show its authorities and their phases.
    #[command(after_help = EXIT_CODES_SHORT)]
    Healthcheck(Conn),
    /// Manage registration entries.
    #[command(after_help = EXIT_CODES_SHORT)]
    Entry {
        /// Connection and output.
        #[command(flatten)]
        conn: Conn,
        /// The entry command.
        #[command(subcommand)]
        command: Box<entry::EntryCommand>,
    },
    /// Manage join tokens for agent enrollment.
    #[command(after_help = EXIT_CODES_SHORT)]
    Token {
        /// Connection and output.
        #[command(flatten)]
        conn: Conn,
        /// The token command.
        #[command(subcommand)]
        command: token::TokenCommand,
    },
    /// Manage attested agents.
    #[command(after_help = EXIT_CODES_SHORT)]
    Agent {
        /// Connection and output.
        #[command(flatten)]
        conn: Conn,
        /// The agent command.
        #[command(subcommand)]
        command: agent::AgentCommand,
    },
    /// Read and verify the audit log.
    #[command(after_help = AUDIT_EXIT_CODES)]
    Audit {
        /// Connection and output.
        #[command(flatten)]
        conn: Conn,
        /// The audit command.
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// Show and rotate the signing authorities (X.509 CA, JWT key).
    #[command(after_help = EXIT_CODES_SHORT)]
    Authority {
        /// Connection and output.
        #[command(flatten)]
        conn: Conn,
        /// The authority command.
        #[command(subcommand)]
        command: authority::AuthorityCommand,
    },
    /// List revoked credentials, or revoke by serial, jti or SPIFFE ID.
    #[command(after_help = EXIT_CODES_SHORT)]
    Revocation {
        /// Connection and output.
        #[command(flatten)]
        conn: Conn,
        /// The revocation command.
        #[command(subcommand)]
        command: revocation::RevocationCommand,
    },
    /// Show this trust domain's bundle.
    #[command(after_help = EXIT_CODES_SHORT)]
    Bundle {
        /// Connection and output.
        #[command(flatten)]
        conn: Conn,
        /// The bundle command.
        #[command(subcommand)]
        command: bundle::BundleCommand,
    },
    /// Mint X.509-SVIDs directly.
    #[command(after_help = EXIT_CODES_SHORT)]
    X509 {
        /// Connection and output.
        #[command(flatten)]
        conn: Conn,
        /// The x509 command.
        #[command(subcommand)]
        command: mint::X509Command,
    },
    /// Validate, print the schema of, and dry-run Cedar policies.
    #[command(after_help = EXIT_CODES_SHORT)]
    Policy {
        /// Connection and output (check only).
        #[command(flatten)]
        conn: Conn,
        /// The policy command.
        #[command(subcommand)]
        command: policy::PolicyCommand,
    },
    /// Mint JWT-SVIDs directly.
    #[command(after_help = EXIT_CODES_SHORT)]
    Jwt {
        /// Connection and output.
        #[command(flatten)]
        conn: Conn,
        /// The jwt command.
        #[command(subcommand)]
        command: mint::JwtCommand,
    },
}

/// `run` flags.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Server configuration (TOML). Without it the server runs the
    /// development setup: trust domain example.org, data in ./.mayfly/server,
    /// node API on 127.0.0.1:8081.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Only check the configuration (and the policy files it names), print
    /// a summary and exit: 0 when valid, 1 with the error otherwise.
    #[arg(long)]
    pub check: bool,
}

/// How client commands reach the server and print results.
#[derive(Debug, Clone, Args)]
pub struct Conn {
    /// Admin API socket [default: admin_socket_path of --config, else
    /// $MAYFLY_ADMIN_SOCKET, else .mayfly/server/admin.sock].
    #[arg(long, global = true, value_name = "PATH", help_heading = CONN)]
    pub socket_path: Option<PathBuf>,
    /// Server configuration file whose admin_socket_path to use.
    #[arg(long, global = true, value_name = "FILE", help_heading = CONN)]
    pub config: Option<PathBuf>,
    /// Output format: readable text, or the admin API's JSON.
    #[arg(
        long,
        global = true,
        value_enum,
        default_value_t = Output::Text,
        help_heading = CONN
    )]
    pub output: Output,
}

const EXIT_CODES_SHORT: &str =
    "Exit codes: 0 success; 1 failure (the reason is printed on stderr); 2 command-line error.";

const AUDIT_EXIT_CODES: &str = "Exit codes: 0 success (verify: the log is intact); 1 failure, or verify found a modified or removed record (named on stdout); 2 command-line error.";

const CONN: &str = "Connection and output";

/// The environment variable naming the admin socket.
pub const SOCKET_ENV: &str = "MAYFLY_ADMIN_SOCKET";

impl Conn {
    /// The socket to use (see [`EXIT_CODES`]'s note for the order).
    pub fn socket(&self) -> anyhow::Result<PathBuf> {
        if let Some(p) = &self.socket_path {
            return Ok(p.clone());
        }
        if let Some(file) = &self.config {
            return Ok(ServerConfig::load(file)?.admin_socket_path);
        }
        if let Some(p) = std::env::var_os(SOCKET_ENV).filter(|p| !p.is_empty()) {
            return Ok(PathBuf::from(p));
        }
        Ok(ServerConfig::development().admin_socket_path)
    }

    /// A client for [`Conn::socket`].
    pub fn client(&self) -> anyhow::Result<AdminClient> {
        Ok(AdminClient::new(&self.socket()?))
    }
}

/// Parses the command line, runs the command, prints any error as
/// `error: ...` on stderr, and returns the exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a parsed command. `Ok` carries the exit code of a command that
/// reported its own failure (a failed healthcheck, a partly failed batch).
pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(args) if args.check => check(args.config.as_deref()),
        Command::Run(args) => run(args.config.as_deref()),
        Command::Healthcheck(conn) => client_runtime()?.block_on(healthcheck::run(&conn)),
        Command::Entry { conn, command } => client_runtime()?.block_on(entry::run(&conn, *command)),
        Command::Token { conn, command } => client_runtime()?.block_on(token::run(&conn, command)),
        Command::Agent { conn, command } => client_runtime()?.block_on(agent::run(&conn, command)),
        Command::Audit { conn, command } => client_runtime()?.block_on(audit::run(&conn, command)),
        Command::Authority { conn, command } => {
            client_runtime()?.block_on(authority::run(&conn, command))
        }
        Command::Revocation { conn, command } => {
            client_runtime()?.block_on(revocation::run(&conn, command))
        }
        Command::Bundle { conn, command } => {
            client_runtime()?.block_on(bundle::run(&conn, command))
        }
        Command::X509 { conn, command } => {
            client_runtime()?.block_on(mint::run_x509(&conn, command))
        }
        Command::Jwt { conn, command } => client_runtime()?.block_on(mint::run_jwt(&conn, command)),
        Command::Policy { conn, command } => {
            client_runtime()?.block_on(policy::run(&conn, command))
        }
    }
}

fn client_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// `mayfly-server run`.
/// `run --check`: the configuration and its policies, validated offline.
fn check(config_file: Option<&Path>) -> anyhow::Result<ExitCode> {
    let config = match config_file {
        Some(path) => ServerConfig::load(path)?,
        None => ServerConfig::development(),
    };
    let policies =
        crate::policy::loader::load(&config.policy).map_err(|e| anyhow::anyhow!("policy: {e}"))?;
    let clusters = config
        .k8s_psat
        .as_ref()
        .map(|k| {
            k.clusters
                .keys()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    println!(
        "configuration valid: trust domain {}, data in {}, node API {}, {} policies, node attestors: join_token{}{}",
        config.trust_domain,
        config.data_dir.display(),
        config.bind_address,
        policies.len(),
        if config.x509pop.is_some() {
            ", x509pop"
        } else {
            ""
        },
        if clusters.is_empty() {
            String::new()
        } else {
            format!(", k8s_psat (clusters {})", clusters.join(", "))
        },
    );
    Ok(ExitCode::SUCCESS)
}

fn run(config_file: Option<&Path>) -> anyhow::Result<ExitCode> {
    let config = match config_file {
        Some(path) => ServerConfig::load(path)?,
        None => ServerConfig::development(),
    };
    crate::logging::init(&config.log_level, config.log_format);
    match crate::run::raise_open_files_limit() {
        Ok(limit) => tracing::info!(limit, "open files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open files limit"),
    }
    if config_file.is_none() {
        tracing::warn!(data_dir = %config.data_dir.display(), "no --config given: running the development setup");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let server = crate::run::run(config, crate::run::shutdown_signal()).await?;
        server.wait().await
    })?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn socket_path_order() {
        let parse = |args: &[&str]| match Cli::try_parse_from(args).unwrap().command {
            Command::Entry { conn, .. } => conn,
            other => panic!("{other:?}"),
        };
        let c = parse(&["mayfly-server", "entry", "list", "--socket-path", "/x.sock"]);
        assert_eq!(c.socket().unwrap(), PathBuf::from("/x.sock"));
        let c = parse(&["mayfly-server", "entry", "--output", "json", "list"]);
        assert_eq!(c.output, Output::Json);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("s.toml");
        std::fs::write(
            &file,
            "[server]\nadmin_socket_path = \"/from/config.sock\"\n",
        )
        .unwrap();
        let c = parse(&[
            "mayfly-server",
            "entry",
            "list",
            "--config",
            file.to_str().unwrap(),
        ]);
        assert_eq!(c.socket().unwrap(), PathBuf::from("/from/config.sock"));
        std::fs::write(&file, "[server]\ncolour = 1\n").unwrap();
        let err = c.socket().unwrap_err().to_string();
        assert!(err.contains("s.toml") && err.contains("colour"), "{err}");
    }
}
