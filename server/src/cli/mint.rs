//! `mayfly-server x509 mint` and `mayfly-server jwt mint`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use serde_json::{Map, Value, json};
use zeroize::Zeroizing;

use super::Conn;
use super::output::{Output, cell, print, print_json};

/// X.509-SVID commands.
#[derive(Debug, Subcommand)]
pub enum X509Command {
    /// Mint an X.509-SVID and its private key for any identity of the trust
    /// domain (not Mayfly's own /mayfly/... identities).
    Mint {
        /// The SPIFFE ID.
        #[arg(long, value_name = "ID")]
        spiffe_id: String,
        /// Lifetime, e.g. 1h [default: the server's default_x509_svid_ttl].
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
        /// A DNS name (repeatable; the first is also the subject CN).
        #[arg(long = "dns", value_name = "NAME")]
        dns_names: Vec<String>,
        /// Write svid.pem, svid.key (mode 0600) and bundle.pem into DIR
        /// (created if missing) instead of printing them.
        #[arg(long, value_name = "DIR")]
        write: Option<std::path::PathBuf>,
    },
}

/// JWT-SVID commands.
#[derive(Debug, Subcommand)]
pub enum JwtCommand {
    /// Mint a JWT-SVID for any identity of the trust domain (not Mayfly's
    /// own). Text output is the token alone.
    Mint {
        /// The SPIFFE ID (`sub`).
        #[arg(long, value_name = "ID")]
        spiffe_id: String,
        /// An audience (`aud`; repeatable, at least one).
        #[arg(long = "audience", value_name = "AUD", required = true)]
        audience: Vec<String>,
        /// Lifetime, e.g. 5m [default: the server's default_jwt_svid_ttl].
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
    },
}

/// Runs `x509 mint`.
pub async fn run_x509(conn: &Conn, command: X509Command) -> anyhow::Result<ExitCode> {
    let X509Command::Mint {
        spiffe_id,
        ttl,
        dns_names,
        write,
    } = command;
    let mut body = Map::new();
    body.insert("spiffe_id".into(), Value::String(spiffe_id));
    if let Some(ttl) = ttl {
        body.insert("ttl".into(), Value::String(ttl));
    }
    if !dns_names.is_empty() {
        body.insert("dns_names".into(), json!(dns_names));
    }
    let v = conn
        .client()?
        .post("/v1/x509/mint", Some(&Value::Object(body)))
        .await?;
    let svid = v["svid_chain_pem"].as_str().unwrap_or_default();
    let key = Zeroizing::new(v["private_key_pem"].as_str().unwrap_or_default().to_owned());
    let bundle = v["bundle_pem"].as_str().unwrap_or_default();
    match write {
        Some(dir) => {
            let paths = write_files(&dir, svid, &key, bundle)?;
            match conn.output {
                Output::Json => print_json(&json!({
                    "spiffe_id": v["spiffe_id"],
                    "serial": v["serial"],
                    "expires_at": v["expires_at"],
                    "svid_path": paths[0],
                    "key_path": paths[1],
                    "bundle_path": paths[2],
                }))?,
                Output::Text => print(&format!(
                    "X509-SVID for {} (expires {}) written to {}\nPrivate key written to {}\nBundle written to {}\n",
                    cell(&v["spiffe_id"]),
                    cell(&v["expires_at"]),
                    paths[0],
                    paths[1],
                    paths[2]
                ))?,
            }
        }
        None => match conn.output {
            Output::Json => print_json(&v)?,
            Output::Text => print(&format!(
                "X509-SVID ({}, expires {}):\n{svid}\nPrivate key:\n{}\nBundle:\n{bundle}",
                cell(&v["spiffe_id"]),
                cell(&v["expires_at"]),
                key.as_str()
            ))?,
        },
    }
    Ok(ExitCode::SUCCESS)
}

fn write_files(dir: &Path, svid: &str, key: &str, bundle: &str) -> anyhow::Result<[String; 3]> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let svid_path = dir.join("svid.pem");
    let key_path = dir.join("svid.key");
    let bundle_path = dir.join("bundle.pem");
    crate::authority::write_private(&key_path, key.as_bytes())?;
    std::fs::write(&svid_path, svid)
        .with_context(|| format!("cannot write {}", svid_path.display()))?;
    std::fs::write(&bundle_path, bundle)
        .with_context(|| format!("cannot write {}", bundle_path.display()))?;
    Ok([svid_path, key_path, bundle_path].map(|p| p.display().to_string()))
}

/// Runs `jwt mint`.
pub async fn run_jwt(conn: &Conn, command: JwtCommand) -> anyhow::Result<ExitCode> {
    let JwtCommand::Mint {
        spiffe_id,
        audience,
        ttl,
    } = command;
    let mut body = Map::new();
    body.insert("spiffe_id".into(), Value::String(spiffe_id));
    body.insert("audience".into(), json!(audience));
    if let Some(ttl) = ttl {
        body.insert("ttl".into(), Value::String(ttl));
    }
    let v = conn
        .client()?
        .post("/v1/jwt/mint", Some(&Value::Object(body)))
        .await?;
    match conn.output {
        Output::Json => print_json(&v)?,
        Output::Text => print(&format!("{}\n", cell(&v["token"])))?,
    }
    Ok(ExitCode::SUCCESS)
}
