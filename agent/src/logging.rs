//! Log output: `tracing` with structured fields, as readable text or one
//! JSON object per line, filtered by `log_level` (or `RUST_LOG`).

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the process-wide subscriber. When one is already installed
/// (the agent runs inside another program, such as the quickstart example,
/// or in tests) that one is kept and `false` is returned.
pub fn init(level: &str, format: LogFormat) -> bool {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.try_init().is_ok(),
        LogFormat::Json => builder.json().flatten_event(true).try_init().is_ok(),
    }
}
