//! `mayfly-server token generate`.

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::{Map, Value};

use super::Conn;
use super::output::{Output, cell, fields, print, print_json};

/// Join token commands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a single-use join token for enrolling one agent
    /// (`mayfly-agent run --join-token TOKEN`). The token is shown only once.
    Generate {
        /// A SPIFFE ID (node alias) the enrolled agent will belong to, so that
        /// entries parented by it apply to the agent.
        #[arg(long, value_name = "ID")]
        spiffe_id: Option<String>,
        /// Lifetime, e.g. 10m [default: the server's join_token_ttl, 10m].
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
    },
}

/// Runs a token command.
pub async fn run(conn: &Conn, command: TokenCommand) -> anyhow::Result<ExitCode> {
    let client = conn.client()?;
    match command {
        TokenCommand::Generate { spiffe_id, ttl } => {
            let mut body = Map::new();
            if let Some(id) = spiffe_id {
                body.insert("spiffe_id".into(), Value::String(id));
            }
            if let Some(ttl) = ttl {
                body.insert("ttl".into(), Value::String(ttl));
            }
            let v = client
                .post("/v1/join-tokens", Some(&Value::Object(body)))
                .await?;
            match conn.output {
                Output::Json => print_json(&v)?,
                Output::Text => {
                    let mut pairs = vec![
                        ("Token", cell(&v["token"])),
                        ("Token ID", cell(&v["id"])),
                        ("Agent ID", cell(&v["agent_id"])),
                    ];
                    if !v["spiffe_id"].is_null() {
                        pairs.push(("Node alias", cell(&v["spiffe_id"])));
                    }
                    pairs.push(("Expires at", cell(&v["expires_at"])));
                    print(&fields(&pairs))?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
