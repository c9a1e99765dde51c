//! `mayfly-server policy validate|schema|check`: author, check and dry-run
//! Cedar policies. `validate` and `schema` work offline; `check` asks the
//! server (`POST /v1/policy/check`).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Subcommand;
use serde_json::{Map, Value, json};

use super::Conn;
use super::output::{Output, fields, print, print_json};
use crate::policy::loader::{self, PolicySources};

/// Policy commands.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Check policy files (or directories of *.cedar) against the schema,
    /// offline. Exit 0 "valid: N policies"; exit 1 with one
    /// `file:line:col: message` line per error.
    Validate {
        /// Policy files or directories.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Validate without the built-in policies (by default they are
        /// loaded too, so that id clashes with them are found).
        #[arg(long)]
        no_default_policy: bool,
    },
    /// Print the policy schema (Cedar schema syntax), offline.
    Schema,
    /// Ask the server how it would decide a request, and why.
    Check {
        /// attest_node, renew_agent, issue_x509, issue_jwt, or an admin
        /// operation such as entry.delete (decided for you).
        #[arg(long, value_name = "ACTION")]
        action: String,
        /// A stored agent (SPIFFE ID or the path after the trust domain).
        #[arg(long = "agent", value_name = "ID")]
        agent: Option<String>,
        /// A stored entry.
        #[arg(long = "entry", value_name = "ID")]
        entry: Option<String>,
        /// Without --entry: a hypothetical entry with this SPIFFE ID.
        #[arg(long, value_name = "ID")]
        spiffe_id: Option<String>,
        /// JWT audience (repeatable).
        #[arg(long, value_name = "AUD")]
        audience: Vec<String>,
        /// Requested TTL, e.g. 5m.
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
        /// Decision time (RFC 3339); default now.
        #[arg(long, value_name = "RFC3339")]
        at: Option<String>,
    },
}

/// Runs a policy command.
pub async fn run(conn: &Conn, command: PolicyCommand) -> anyhow::Result<ExitCode> {
    match command {
        PolicyCommand::Validate {
            files,
            no_default_policy,
        } => Ok(validate(files, !no_default_policy, conn.output)),
        PolicyCommand::Schema => {
            print(crate::policy::schema::TEXT)?;
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Check {
            action,
            agent,
            entry,
            spiffe_id,
            audience,
            ttl,
            at,
        } => {
            let mut body = Map::new();
            body.insert("action".into(), Value::String(action));
            for (k, v) in [
                ("agent_id", agent),
                ("entry_id", entry),
                ("spiffe_id", spiffe_id),
                ("ttl", ttl),
                ("at", at),
            ] {
                if let Some(v) = v {
                    body.insert(k.into(), Value::String(v));
                }
            }
            if !audience.is_empty() {
                body.insert("audience".into(), json!(audience));
            }
            let resp = conn
                .client()?
                .post("/v1/policy/check", Some(&Value::Object(body)))
                .await?;
            match conn.output {
                Output::Json => print_json(&resp)?,
                Output::Text => {
                    let list = |k: &str| {
                        resp[k]
                            .as_array()
                            .map(|a| {
                                a.iter()
                                    .filter_map(Value::as_str)
                                    .collect::<Vec<_>>()
                                    .join("\n  ")
                            })
                            .unwrap_or_default()
                    };
                    let mut pairs = vec![
                        (
                            "decision",
                            resp["decision"].as_str().unwrap_or("?").to_owned(),
                        ),
                        ("reasons", list("reasons")),
                    ];
                    if let Some(cap) = resp["ttl_cap"].as_str() {
                        pairs.push(("ttl cap", cap.to_owned()));
                    }
                    if resp["errors"].as_array().is_some_and(|a| !a.is_empty()) {
                        pairs.push(("errors", list("errors")));
                    }
                    print(&fields(&pairs))?;
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn validate(files: Vec<PathBuf>, default_policy: bool, output: Output) -> ExitCode {
    let sources = PolicySources {
        paths: files,
        default_policy,
    };
    let result = loader::load(&sources);
    match (result, output) {
        (Ok(set), Output::Text) => {
            println!("valid: {} policies", set.len());
            ExitCode::SUCCESS
        }
        (Ok(set), Output::Json) => {
            println!(
                "{}",
                json!({"valid": true, "policies": set.len(), "errors": []})
            );
            ExitCode::SUCCESS
        }
        (Err(errors), Output::Text) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            eprintln!("invalid: {} errors", errors.0.len());
            ExitCode::FAILURE
        }
        (Err(errors), Output::Json) => {
            let list: Vec<Value> = errors
                .0
                .iter()
                .map(|e| {
                    json!({"file": e.file, "line": e.line, "column": e.column,
                           "message": e.message, "text": e.to_string()})
                })
                .collect();
            println!("{}", json!({"valid": false, "errors": list}));
            ExitCode::FAILURE
        }
    }
}
