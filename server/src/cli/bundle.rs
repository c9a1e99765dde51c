//! `mayfly-server bundle show`.

use std::process::ExitCode;

use clap::{Subcommand, ValueEnum};

use super::Conn;
use super::output::{Output, print};

/// Bundle formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BundleFormat {
    /// The X.509 CA certificates as PEM (for agents' trust_bundle_path).
    Pem,
    /// The SPIFFE bundle document (JSON), X.509 and JWT authorities.
    Spiffe,
}

/// Bundle commands.
#[derive(Debug, Subcommand)]
pub enum BundleCommand {
    /// Print this trust domain's bundle. `--output json` prints the SPIFFE
    /// bundle document whatever --format says.
    Show {
        /// Document format.
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
    },
}

/// Runs a bundle command.
pub async fn run(conn: &Conn, command: BundleCommand) -> anyhow::Result<ExitCode> {
    let client = conn.client()?;
    match command {
        BundleCommand::Show { format } => {
            let format = if conn.output == Output::Json {
                BundleFormat::Spiffe
            } else {
                format
            };
            let mut text = match format {
                BundleFormat::Pem => client.get_text("/v1/bundle?format=pem").await?,
                BundleFormat::Spiffe => client.get_text("/v1/bundle?format=spiffe").await?,
            };
            if !text.ends_with('\n') {
                text.push('\n');
            }
            print(&text)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
