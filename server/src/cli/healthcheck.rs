//! `mayfly-server healthcheck`: the server answers, and its authorities
//! with their phases and lifetimes.

use std::process::ExitCode;

use super::Conn;
use super::output::{Output, cell, print, print_json};

/// Asks the server for `/healthz`; exit 0 when it answers `ok`.
pub async fn run(conn: &Conn) -> anyhow::Result<ExitCode> {
    let v = conn.client()?.get("/healthz").await?;
    let healthy = v["status"] == "ok";
    match conn.output {
        Output::Json => print_json(&v)?,
        Output::Text if healthy => print(&format!(
            "Server is healthy: trust domain {}, {} entries, CA valid until {}, bundle sequence {}\n\n{}",
            cell(&v["trust_domain"]),
            cell(&v["entries"]),
            cell(&v["ca_not_after"]),
            cell(&v["bundle_sequence"]),
            super::authority::table(&v["authorities"])
        ))?,
        Output::Text => eprintln!(
            "error: server is not healthy: status {}",
            cell(&v["status"])
        ),
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
