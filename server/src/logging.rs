//! Log output: `tracing` events to stderr, as readable text or one JSON
//! object per line.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber with the filter `level` (`info`,
/// `debug`, `mayfly_server=debug,info`, ...); `RUST_LOG`, when set,
/// overrides it. An invalid filter falls back to `info` with a warning.
/// Idempotent: when a subscriber is already installed (a second call, or
/// an embedding program that set its own) this does nothing.
pub fn init(level: &str, format: LogFormat) {
    let (filter, bad_level) = match EnvFilter::try_from_default_env() {
        Ok(f) => (f, None),
        Err(_) => match EnvFilter::try_new(level) {
            Ok(f) => (f, None),
            Err(e) => (EnvFilter::new("info"), Some(e)),
        },
    };
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    let installed = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
    if installed.is_ok()
        && let Some(e) = bad_level
    {
        tracing::warn!(level, error = %e, "invalid log level; using info");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_twice_is_harmless() {
        init("not a [valid filter", LogFormat::Json);
        init("debug", LogFormat::Text);
        tracing::info!("still logging");
    }
}
