//! `mayfly-server agent list|show|ban|unban|evict`.

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::{Value, json};

use super::Conn;
use super::client::{AdminClient, encode};
use super::output::{Output, Table, cell, fields, print, print_json};

/// Agent commands. AGENT is the agent's SPIFFE ID
/// (spiffe://example.org/mayfly/agent/join_token/ID) or the part after the
/// trust domain (mayfly/agent/join_token/ID).
#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// List attested agents.
    List,
    /// Show one agent.
    Show {
        /// The agent: its SPIFFE ID, or the path after the trust domain
        /// (mayfly/agent/join_token/ID).
        agent: String,
    },
    /// Ban an agent: it is refused from its next call on and cannot attest
    /// again under this ID.
    Ban {
        /// The agent: its SPIFFE ID, or the path after the trust domain
        /// (mayfly/agent/join_token/ID).
        agent: String,
    },
    /// Lift an agent's ban: it is served again (with its current SVID, or
    /// after attesting again).
    Unban {
        /// The agent: its SPIFFE ID, or the path after the trust domain
        /// (mayfly/agent/join_token/ID).
        #[arg(long = "spiffe-id", value_name = "ID")]
        spiffe_id: String,
    },
    /// Evict an agent: its record is deleted and it must attest again.
    Evict {
        /// The agent: its SPIFFE ID, or the path after the trust domain
        /// (mayfly/agent/join_token/ID).
        agent: String,
    },
}

/// Runs an agent command.
pub async fn run(conn: &Conn, command: AgentCommand) -> anyhow::Result<ExitCode> {
    let client = conn.client()?;
    match command {
        AgentCommand::List => {
            let agents = list_all(&client).await?;
            match conn.output {
                Output::Json => print_json(&json!({ "agents": agents, "next_page_token": null }))?,
                Output::Text => {
                    let mut t = Table::new(&[
                        "SPIFFE ID",
                        "ATTESTOR",
                        "ASSURANCE",
                        "ATTESTED AT",
                        "SVID EXPIRES AT",
                        "BANNED",
                    ]);
                    for a in &agents {
                        t.row(vec![
                            cell(&a["spiffe_id"]),
                            cell(&a["attestor"]),
                            cell(&a["assurance"]),
                            cell(&a["attested_at"]),
                            cell(&a["svid_expires_at"]),
                            cell(&a["banned"]),
                        ]);
                    }
                    let mut text = t.render();
                    text.push_str(&format!(
                        "{} {}\n",
                        agents.len(),
                        if agents.len() == 1 { "agent" } else { "agents" }
                    ));
                    print(&text)?;
                }
            }
        }
        AgentCommand::Show { agent } => {
            let a = client
                .get(&format!("/v1/agents/{}", encode(&agent)))
                .await?;
            show(conn.output, &a)?;
        }
        AgentCommand::Ban { agent } => {
            let a = client
                .post(&format!("/v1/agents/{}/ban", encode(&agent)), None)
                .await?;
            match conn.output {
                Output::Json => print_json(&a)?,
                Output::Text => print(&format!("Banned agent {}\n", cell(&a["spiffe_id"])))?,
            }
        }
        AgentCommand::Unban { spiffe_id } => {
            let a = client
                .post(&format!("/v1/agents/{}/unban", encode(&spiffe_id)), None)
                .await?;
            match conn.output {
                Output::Json => print_json(&a)?,
                Output::Text => print(&format!("Unbanned agent {}\n", cell(&a["spiffe_id"])))?,
            }
        }
        AgentCommand::Evict { agent } => {
            let a = client
                .post(&format!("/v1/agents/{}/evict", encode(&agent)), None)
                .await?;
            match conn.output {
                Output::Json => print_json(&a)?,
                Output::Text => print(&format!("Evicted agent {}\n", cell(&a["spiffe_id"])))?,
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn list_all(client: &AdminClient) -> anyhow::Result<Vec<Value>> {
    let mut agents = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut path = "/v1/agents?page_size=1000".to_owned();
        if let Some(t) = &token {
            path.push_str(&format!("&page_token={}", encode(t)));
        }
        let page = client.get(&path).await?;
        agents.extend(page["agents"].as_array().cloned().unwrap_or_default());
        match page["next_page_token"].as_str() {
            Some(t) => token = Some(t.to_owned()),
            None => return Ok(agents),
        }
    }
}

fn show(output: Output, a: &Value) -> anyhow::Result<()> {
    if output == Output::Json {
        return print_json(a);
    }
    let list = |v: &Value| {
        v.as_array().filter(|a| !a.is_empty()).map_or_else(
            || "-".to_owned(),
            |a| a.iter().map(cell).collect::<Vec<_>>().join("\n"),
        )
    };
    print(&fields(&[
        ("SPIFFE ID", cell(&a["spiffe_id"])),
        ("Attestor", cell(&a["attestor"])),
        ("Assurance", cell(&a["assurance"])),
        ("Selectors", list(&a["selectors"])),
        ("Aliases", list(&a["enrolled_aliases"])),
        ("Attested at", cell(&a["attested_at"])),
        ("SVID serial", cell(&a["current_serial"])),
        ("Next SVID serial", cell(&a["next_serial"])),
        ("SVID expires at", cell(&a["svid_expires_at"])),
        ("Can re-attest", cell(&a["can_reattest"])),
        ("Banned", cell(&a["banned"])),
    ]))
}
