//! `mayfly-server authority show|prepare|activate|taint|revoke`.

use std::process::ExitCode;

use clap::{Subcommand, ValueEnum};
use serde_json::{Value, json};

use super::Conn;
use super::client::AdminClient;
use super::output::{Output, Table, cell, fields, print, print_json};

/// Which authority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthorityType {
    /// The X.509 CA (signs X.509-SVIDs).
    X509,
    /// The JWT signing key (signs JWT-SVIDs).
    Jwt,
}

impl AuthorityType {
    fn path(self) -> &'static str {
        match self {
            Self::X509 => "x509",
            Self::Jwt => "jwt",
        }
    }
}

/// Authority commands.
#[derive(Debug, Subcommand)]
pub enum AuthorityCommand {
    /// List the X.509 CAs and JWT keys with their phase (prepared, active,
    /// old), taint and lifetime. `--output json` prints the admin API's
    /// `{"x509":[...],"jwt":[...]}`.
    Show,
    /// Create a prepared authority: published in the bundle (and pushed to
    /// agents) at once, signing nothing until activated. The server does
    /// this by itself at half the active authority's life.
    Prepare {
        /// Which authority.
        #[arg(long = "type", value_enum, value_name = "TYPE")]
        kind: AuthorityType,
    },
    /// Make the prepared authority sign; the active one becomes old and
    /// stays in the bundle until what it signed has expired.
    Activate {
        /// Which authority.
        #[arg(long = "type", value_enum, value_name = "TYPE")]
        kind: AuthorityType,
    },
    /// Taint an old authority: agents replace every SVID it signed, now.
    Taint {
        /// Which authority.
        #[arg(long = "type", value_enum, value_name = "TYPE")]
        kind: AuthorityType,
        /// The authority's id (see `authority show`).
        #[arg(long, value_name = "ID")]
        authority_id: String,
    },
    /// Remove a tainted authority from the bundle and delete its key: what
    /// it signed stops verifying.
    Revoke {
        /// Which authority.
        #[arg(long = "type", value_enum, value_name = "TYPE")]
        kind: AuthorityType,
        /// The authority's id (see `authority show`).
        #[arg(long, value_name = "ID")]
        authority_id: String,
    },
}

/// The authorities of a `GET /v1/authorities` body (or the `authorities`
/// of `/healthz`) as a table.
pub fn table(v: &Value) -> String {
    let mut t = Table::new(&["TYPE", "ID", "PHASE", "TAINTED", "NOT BEFORE", "NOT AFTER"]);
    for kind in ["x509", "jwt"] {
        for a in v[kind].as_array().into_iter().flatten() {
            t.row(vec![
                kind.to_owned(),
                cell(&a["id"]),
                cell(&a["phase"]),
                cell(&a["tainted"]),
                cell(&a["not_before"]),
                cell(&a["not_after"]),
            ]);
        }
    }
    t.render()
}

fn one(v: &Value, kind: AuthorityType) -> String {
    fields(&[
        ("Type", kind.path().to_owned()),
        ("ID", cell(&v["id"])),
        ("Phase", cell(&v["phase"])),
        ("Tainted", cell(&v["tainted"])),
        ("Not before", cell(&v["not_before"])),
        ("Not after", cell(&v["not_after"])),
    ])
}

async fn step(
    client: &AdminClient,
    kind: AuthorityType,
    op: &str,
    body: Value,
) -> anyhow::Result<Value> {
    let path = format!("/v1/authorities/{}/{op}", kind.path());
    Ok(client.post(&path, Some(&body)).await?)
}

/// Runs an authority command.
pub async fn run(conn: &Conn, command: AuthorityCommand) -> anyhow::Result<ExitCode> {
    let client = conn.client()?;
    let (kind, v) = match command {
        AuthorityCommand::Show => {
            let v = client.get("/v1/authorities").await?;
            match conn.output {
                Output::Json => print_json(&v)?,
                Output::Text => print(&table(&v))?,
            }
            return Ok(ExitCode::SUCCESS);
        }
        AuthorityCommand::Prepare { kind } => {
            (kind, step(&client, kind, "prepare", json!({})).await?)
        }
        AuthorityCommand::Activate { kind } => {
            (kind, step(&client, kind, "activate", json!({})).await?)
        }
        AuthorityCommand::Taint { kind, authority_id } => {
            let body = json!({ "authority_id": authority_id });
            (kind, step(&client, kind, "taint", body).await?)
        }
        AuthorityCommand::Revoke { kind, authority_id } => {
            let body = json!({ "authority_id": authority_id });
            (kind, step(&client, kind, "revoke", body).await?)
        }
    };
    match conn.output {
        Output::Json => print_json(&v)?,
        Output::Text => print(&one(&v, kind))?,
    }
    Ok(ExitCode::SUCCESS)
}
