//! `mayfly-server revocation list|add`.

use std::process::ExitCode;

use clap::{ArgGroup, Subcommand};
use serde_json::{Map, Value, json};

use super::Conn;
use super::client::{AdminClient, encode};
use super::output::{Output, Table, cell, print, print_json};

/// Revocation commands.
#[derive(Debug, Subcommand)]
pub enum RevocationCommand {
    /// List revoked credentials that have not expired yet.
    List,
    /// Revoke a credential by X.509 serial or JWT jti, or every unexpired
    /// credential issued for a SPIFFE ID.
    #[command(group(ArgGroup::new("target").required(true).args(["serial", "jti", "spiffe_id"])))]
    Add {
        /// An X.509-SVID serial (hex, `:` separators allowed).
        #[arg(long, value_name = "SERIAL")]
        serial: Option<String>,
        /// A JWT-SVID jti.
        #[arg(long, value_name = "JTI")]
        jti: Option<String>,
        /// Every unexpired credential issued for this SPIFFE ID.
        #[arg(long, value_name = "ID")]
        spiffe_id: Option<String>,
        /// A note for the server's audit log (the recorded reason is
        /// `operator`).
        #[arg(long, value_name = "TEXT")]
        reason: Option<String>,
    },
}

/// Runs a revocation command.
pub async fn run(conn: &Conn, command: RevocationCommand) -> anyhow::Result<ExitCode> {
    let client = conn.client()?;
    match command {
        RevocationCommand::List => {
            let all = list_all(&client).await?;
            match conn.output {
                Output::Json => {
                    print_json(&json!({ "revocations": all, "next_page_token": null }))?;
                }
                Output::Text => {
                    let mut text = table(&all);
                    text.push_str(&format!(
                        "{} {}\n",
                        all.len(),
                        if all.len() == 1 {
                            "revocation"
                        } else {
                            "revocations"
                        }
                    ));
                    print(&text)?;
                }
            }
        }
        RevocationCommand::Add {
            serial,
            jti,
            spiffe_id,
            reason,
        } => {
            let mut body = Map::new();
            for (k, v) in [
                ("serial", serial),
                ("jti", jti),
                ("spiffe_id", spiffe_id),
                ("reason", reason),
            ] {
                if let Some(v) = v {
                    body.insert(k.to_owned(), Value::String(v));
                }
            }
            let resp = client
                .post("/v1/revocations", Some(&Value::Object(body)))
                .await?;
            match conn.output {
                Output::Json => print_json(&resp)?,
                Output::Text => {
                    let revoked = resp["revoked"].as_array().cloned().unwrap_or_default();
                    let mut text = table(&revoked);
                    text.push_str(&format!("Revoked {} new\n", revoked.len()));
                    print(&text)?;
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn table(items: &[Value]) -> String {
    let mut t = Table::new(&[
        "CREDENTIAL",
        "AUTHORITY",
        "REASON",
        "REVOKED AT",
        "EXPIRES AT",
    ]);
    for r in items {
        let credential = match (r["serial"].as_str(), r["jti"].as_str()) {
            (Some(s), _) => format!("serial {s}"),
            (None, Some(j)) => format!("jti {j}"),
            (None, None) => "-".to_owned(),
        };
        t.row(vec![
            credential,
            cell(&r["authority_id"]),
            cell(&r["reason"]),
            cell(&r["revoked_at"]),
            cell(&r["expires_at"]),
        ]);
    }
    t.render()
}

async fn list_all(client: &AdminClient) -> anyhow::Result<Vec<Value>> {
    let mut all = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut path = "/v1/revocations?page_size=1000".to_owned();
        if let Some(t) = &token {
            path.push_str(&format!("&page_token={}", encode(t)));
        }
        let page = client.get(&path).await?;
        all.extend(page["revocations"].as_array().cloned().unwrap_or_default());
        match page["next_page_token"].as_str() {
            Some(t) => token = Some(t.to_owned()),
            None => return Ok(all),
        }
    }
}
