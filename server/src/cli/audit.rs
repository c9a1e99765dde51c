//! `mayfly-server audit list|verify`: read and check the audit log, through
//! the admin API or (`verify --data-dir`) offline on a stopped server's
//! store.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::Conn;
use super::client::encode;
use super::output::{Output, Table, cell, print, print_json};
use crate::config::ServerConfig;
use crate::store::sled_store::SledStore;

/// Audit commands.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// List audit records, oldest first.
    List {
        /// Only records from this long ago (`30m`, `1h`, `2d`) or since
        /// this RFC 3339 time (`2026-01-02T15:04:05Z`).
        #[arg(long, value_name = "AGE|TIME")]
        since: Option<String>,
        /// Only this action or actions under this dotted prefix (`node`,
        /// `x509.issue`, `admin`).
        #[arg(long, value_name = "ACTION")]
        action: Option<String>,
    },
    /// Check that no record was modified or removed: exit 0 when intact,
    /// 1 naming the first bad record.
    Verify {
        /// Verify offline, on the store in this data directory (and its
        /// audit.jsonl), while the server is stopped.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// Verify offline, on the data directory and audit_log_path of
        /// --config (the development defaults without it).
        #[arg(long, conflicts_with = "data_dir")]
        offline: bool,
    },
}

/// Runs an audit command.
pub async fn run(conn: &Conn, command: AuditCommand) -> anyhow::Result<ExitCode> {
    match command {
        AuditCommand::List { since, action } => {
            list(conn, since.as_deref(), action.as_deref()).await
        }
        AuditCommand::Verify { data_dir, offline } => {
            let report = if let Some(dir) = data_dir {
                let file = dir.join("audit.jsonl");
                let file = file.exists().then_some(file);
                verify_offline(&dir, file.as_deref())?
            } else if offline {
                let config = match &conn.config {
                    Some(path) => ServerConfig::load(path)?,
                    None => ServerConfig::development(),
                };
                verify_offline(&config.data_dir, config.audit_log_file().as_deref())?
            } else {
                conn.client()?.get("/v1/audit/verify").await?
            };
            report_verification(conn.output, &report)
        }
    }
}

/// `--since`: an age before now, or an RFC 3339 time.
fn parse_since(text: &str) -> anyhow::Result<OffsetDateTime> {
    if let Ok(t) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(t);
    }
    let age: mayfly::ttl::Ttl = text.parse().map_err(|e| {
        anyhow::anyhow!("--since {text:?} is neither an age like 1h nor an RFC 3339 time: {e}")
    })?;
    Ok(OffsetDateTime::now_utc() - age.as_time())
}

async fn list(conn: &Conn, since: Option<&str>, action: Option<&str>) -> anyhow::Result<ExitCode> {
    let client = conn.client()?;
    let mut query = String::from("limit=1000");
    if let Some(s) = since {
        let t = parse_since(s)?.format(&Rfc3339)?;
        query.push_str(&format!("&since={}", encode(&t)));
    }
    if let Some(a) = action {
        query.push_str(&format!("&action={}", encode(a)));
    }
    let mut records = Vec::new();
    let mut after = 0u64;
    loop {
        let page = client
            .get(&format!("/v1/audit?{query}&after={after}"))
            .await?;
        records.extend(page["records"].as_array().cloned().unwrap_or_default());
        match page["next_after"].as_u64() {
            Some(n) => after = n,
            None => break,
        }
    }
    match conn.output {
        Output::Json => print_json(&json!({ "records": records, "next_after": null }))?,
        Output::Text => {
            let mut t = Table::new(&[
                "SEQ", "TIME", "ACTOR", "ACTION", "TARGET", "DECISION", "RESULT", "MESSAGE",
            ]);
            for r in &records {
                let reasons = r["reasons"]
                    .as_array()
                    .filter(|a| !a.is_empty())
                    .map(|_| format!(" [{}]", cell(&r["reasons"])))
                    .unwrap_or_default();
                t.row(vec![
                    cell(&r["seq"]),
                    cell(&r["time"]),
                    cell(&r["actor"]["id"]),
                    cell(&r["action"]),
                    cell(&r["target"]),
                    format!("{}{reasons}", cell(&r["decision"])),
                    cell(&r["result"]),
                    cell(&r["message"]),
                ]);
            }
            let mut text = t.render();
            text.push_str(&format!(
                "{} {}\n",
                records.len(),
                if records.len() == 1 {
                    "record"
                } else {
                    "records"
                }
            ));
            print(&text)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Verifies a stopped server's store (and file) directly.
fn verify_offline(data_dir: &Path, file: Option<&Path>) -> anyhow::Result<Value> {
    let store_dir = data_dir.join("store");
    if !store_dir.exists() {
        anyhow::bail!(
            "no store in {} (is --data-dir the server's data_dir?)",
            data_dir.display()
        );
    }
    let store = SledStore::open(&store_dir).with_context(|| {
        format!(
            "cannot open the store {} (sled allows one process: if the server is running, stop it, or run `audit verify` without --data-dir/--offline to ask the server)",
            store_dir.display()
        )
    })?;
    let report = crate::audit::verify_store(&store, file)?;
    Ok(serde_json::to_value(report)?)
}

fn report_verification(output: Output, report: &Value) -> anyhow::Result<ExitCode> {
    let ok = report["ok"].as_bool().unwrap_or(false);
    match output {
        Output::Json => print_json(report)?,
        Output::Text if ok => print(&format!(
            "audit log intact: {} records (head seq {}){}\n",
            cell(&report["records"]),
            cell(&report["head_seq"]),
            if report["file_checked"].as_bool() == Some(true) {
                ", JSON-lines file matches the store"
            } else {
                ", JSON-lines file not checked"
            }
        ))?,
        Output::Text => print(&format!(
            "audit log BROKEN at record {} ({}): {}\n",
            cell(&report["first_bad_seq"]),
            cell(&report["problem"]),
            cell(&report["message"]),
        ))?,
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_an_age_or_a_time() {
        let t = parse_since("2026-01-02T15:04:05Z").unwrap();
        assert_eq!(t.unix_timestamp(), 1_767_366_245);
        let an_hour_ago = parse_since("1h").unwrap();
        let delta = OffsetDateTime::now_utc() - an_hour_ago;
        assert!((3599..=3601).contains(&delta.whole_seconds()), "{delta}");
        assert!(parse_since("yesterday").is_err());
    }
}
