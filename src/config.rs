//! Configuration files: the errors every Mayfly binary reports about them,
//! and TOML parsing whose errors name the file, line, column and key.
//! Reading the file is the caller's (this crate does no I/O).

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Why a configuration file was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The TOML is malformed or has an unknown or mistyped key; the message
    /// carries the line, column and key.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// toml's message, with line and column.
        message: String,
    },
    /// A value is well-formed TOML but invalid.
    #[error("{path}: {key}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key, e.g. `server.ca_ttl`.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// Parses TOML `text` read from `path` (used in messages) into `T`. With
/// `#[serde(deny_unknown_fields)]` on `T`, an unknown key is an error naming
/// its line and the key.
pub fn parse_toml<T: DeserializeOwned>(text: &str, path: &Path) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)] // only parsed
    struct Sample {
        name: Option<String>,
    }

    #[test]
    fn unknown_keys_name_file_line_and_key() {
        let err =
            parse_toml::<Sample>("name = \"a\"\n\ncolour = 1\n", Path::new("x.toml")).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("x.toml") && msg.contains("line 3") && msg.contains("colour"),
            "{msg}"
        );
        assert!(parse_toml::<Sample>("name = \"a\"\n", Path::new("x.toml")).is_ok());
    }
}
