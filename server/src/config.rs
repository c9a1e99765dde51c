//! Server configuration: TOML → [`RawConfig`] → validated [`ServerConfig`].
//! Unknown keys are errors naming the file, line and key; every default is
//! safe and documented in `docs/configuration.md`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use mayfly::TrustDomain;
use mayfly::ttl::Ttl;
use serde::Deserialize;

pub use mayfly::config::ConfigError;

/// The file as written. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `[server]` table.
    #[serde(default)]
    pub server: RawServer,
}

/// `[server]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// Trust domain name; default `example.org`.
    pub trust_domain: Option<String>,
    /// Data directory; default `./.mayfly/server`.
    pub data_dir: Option<PathBuf>,
    /// Node API (gRPC, TLS) listen address; default `127.0.0.1:8081`.
    pub bind_address: Option<String>,
    /// Admin API Unix socket; default `<data_dir>/admin.sock`.
    pub admin_socket_path: Option<PathBuf>,
    /// Public HTTP listener (CRLs, bundle, health); default `127.0.0.1:8082`.
    pub http_address: Option<String>,
    /// How long a CRL is valid (`nextUpdate - thisUpdate`); default `1h`.
    pub crl_ttl: Option<String>,
    /// CA lifetime; default `24h`.
    pub ca_ttl: Option<String>,
    /// JWT signing key lifetime; default `ca_ttl`.
    pub jwt_key_ttl: Option<String>,
    /// Default X.509-SVID lifetime; default `1h`.
    pub default_x509_svid_ttl: Option<String>,
    /// Default JWT-SVID lifetime; default `5m`.
    pub default_jwt_svid_ttl: Option<String>,
    /// Agent SVID lifetime; default `1h`.
    pub agent_svid_ttl: Option<String>,
    /// Default join token lifetime; default `10m`.
    pub join_token_ttl: Option<String>,
    /// `iss` claim of JWT-SVIDs; none by default.
    pub jwt_issuer: Option<String>,
    /// Subject organisation of the CA; default `Mayfly`.
    pub ca_subject: Option<String>,
    /// Log level filter (`info`, `debug`, ...); default `info`.
    pub log_level: Option<String>,
    /// Log format, `text` or `json`; default `text`.
    pub log_format: Option<String>,
    /// Policy files or directories of `*.cedar`; default none.
    pub policy_paths: Option<Vec<PathBuf>>,
    /// Whether the built-in policies are loaded; default `true`.
    pub default_policy: Option<bool>,
    /// How often policy files are checked for changes; default `2s`.
    pub policy_reload_interval: Option<String>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A validated server configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// Data directory (store, CA key and certificate).
    pub data_dir: PathBuf,
    /// Node API listen address.
    pub bind_address: SocketAddr,
    /// Admin API socket.
    pub admin_socket_path: PathBuf,
    /// Public HTTP listener: `GET /crl/{authority_id}`, `/bundle`,
    /// `/healthz`, `/readyz`. Plain HTTP.
    pub http_address: SocketAddr,
    /// CRL validity; CRLs are re-signed at half of it at the latest.
    pub crl_ttl: Ttl,
    /// CA lifetime.
    pub ca_ttl: Ttl,
    /// JWT signing key lifetime (rotated on the same schedule as the CA).
    pub jwt_key_ttl: Ttl,
    /// Default X.509-SVID lifetime.
    pub default_x509_svid_ttl: Ttl,
    /// Default JWT-SVID lifetime.
    pub default_jwt_svid_ttl: Ttl,
    /// Agent SVID lifetime.
    pub agent_svid_ttl: Ttl,
    /// Default join token lifetime.
    pub join_token_ttl: Ttl,
    /// `iss` claim.
    pub jwt_issuer: Option<String>,
    /// CA subject organisation.
    pub ca_subject: String,
    /// Log filter.
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
    /// Where policies come from (files, directories, the built-in set).
    pub policy: crate::policy::PolicySources,
    /// How often policy files are checked for changes.
    pub policy_reload_interval: Ttl,
}

impl ServerConfig {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Validates TOML text; `path` is used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let raw: RawConfig = mayfly::config::parse_toml(text, path)?;
        Self::from_raw(raw, path)
    }

    /// The development defaults used when no file is given.
    pub fn development() -> Self {
        // The defaults are all valid, so this cannot fail.
        Self::from_raw(RawConfig::default(), Path::new("<defaults>"))
            .unwrap_or_else(|e| unreachable!("defaults are valid: {e}"))
    }

    fn from_raw(raw: RawConfig, path: &Path) -> Result<Self, ConfigError> {
        let s = raw.server;
        let invalid = |key: &'static str, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message,
        };
        let ttl =
            |key: &'static str, v: Option<String>, default: &str| -> Result<Ttl, ConfigError> {
                v.as_deref()
                    .unwrap_or(default)
                    .parse::<Ttl>()
                    .map_err(|e| invalid(key, e.to_string()))
            };
        let trust_domain = TrustDomain::new(s.trust_domain.as_deref().unwrap_or("example.org"))
            .map_err(|e| invalid("server.trust_domain", e.to_string()))?;
        let data_dir = s
            .data_dir
            .unwrap_or_else(|| PathBuf::from(".mayfly/server"));
        let bind_address = s
            .bind_address
            .as_deref()
            .unwrap_or("127.0.0.1:8081")
            .parse()
            .map_err(|e| {
                invalid(
                    "server.bind_address",
                    format!("{e} (write it like 127.0.0.1:8081)"),
                )
            })?;
        let admin_socket_path = s
            .admin_socket_path
            .unwrap_or_else(|| data_dir.join("admin.sock"));
        let http_address = s
            .http_address
            .as_deref()
            .unwrap_or("127.0.0.1:8082")
            .parse()
            .map_err(|e| {
                invalid(
                    "server.http_address",
                    format!("{e} (write it like 127.0.0.1:8082)"),
                )
            })?;
        let log_format = match s.log_format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "server.log_format",
                    format!("must be text or json, not {other:?}"),
                ));
            }
        };
        let ca_ttl = ttl("server.ca_ttl", s.ca_ttl, "24h")?;
        let jwt_key_ttl = match s.jwt_key_ttl {
            Some(v) => ttl("server.jwt_key_ttl", Some(v), "")?,
            None => ca_ttl,
        };
        let cfg = Self {
            trust_domain,
            data_dir,
            bind_address,
            admin_socket_path,
            http_address,
            crl_ttl: ttl("server.crl_ttl", s.crl_ttl, "1h")?,
            ca_ttl,
            jwt_key_ttl,
            default_x509_svid_ttl: ttl(
                "server.default_x509_svid_ttl",
                s.default_x509_svid_ttl,
                "1h",
            )?,
            default_jwt_svid_ttl: ttl("server.default_jwt_svid_ttl", s.default_jwt_svid_ttl, "5m")?,
            agent_svid_ttl: ttl("server.agent_svid_ttl", s.agent_svid_ttl, "1h")?,
            join_token_ttl: ttl("server.join_token_ttl", s.join_token_ttl, "10m")?,
            jwt_issuer: s.jwt_issuer,
            ca_subject: s.ca_subject.unwrap_or_else(|| "Mayfly".into()),
            log_level: s.log_level.unwrap_or_else(|| "info".into()),
            log_format,
            policy: crate::policy::PolicySources {
                paths: s.policy_paths.unwrap_or_default(),
                default_policy: s.default_policy.unwrap_or(true),
            },
            policy_reload_interval: ttl(
                "server.policy_reload_interval",
                s.policy_reload_interval,
                "2s",
            )?,
        };
        if let Some(p) = cfg.policy.paths.iter().find(|p| p.as_os_str().is_empty()) {
            return Err(invalid(
                "server.policy_paths",
                format!("an empty path is not allowed ({p:?})"),
            ));
        }
        if !cfg.policy.default_policy && cfg.policy.paths.is_empty() {
            return Err(invalid(
                "server.default_policy",
                "is false and no policy_paths are set: every request would be denied".into(),
            ));
        }
        if cfg.default_x509_svid_ttl >= cfg.ca_ttl {
            return Err(invalid(
                "server.default_x509_svid_ttl",
                "must be shorter than server.ca_ttl".into(),
            ));
        }
        if cfg.crl_ttl.as_secs() < 60 {
            return Err(invalid(
                "server.crl_ttl",
                "must be at least 1m (CRLs are re-signed at half of it)".into(),
            ));
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_development_setup() {
        let c = ServerConfig::development();
        assert_eq!(c.trust_domain.as_str(), "example.org");
        assert_eq!(c.data_dir, PathBuf::from(".mayfly/server"));
        assert!(c.bind_address.ip().is_loopback());
        assert_eq!(c.default_x509_svid_ttl.as_secs(), 3600);
        assert_eq!(c.default_jwt_svid_ttl.as_secs(), 300);
    }

    #[test]
    fn short_lifetimes_for_tests_and_the_jwt_key_ttl() {
        let c = ServerConfig::parse(
            "[server]\nca_ttl = \"60s\"\ndefault_x509_svid_ttl = \"4s\"\nagent_svid_ttl = \"10s\"\ndefault_jwt_svid_ttl = \"5s\"\n",
            Path::new("s.toml"),
        )
        .unwrap();
        assert_eq!(c.ca_ttl.as_secs(), 60);
        assert_eq!(c.jwt_key_ttl.as_secs(), 60, "defaults to ca_ttl");
        assert_eq!(c.default_x509_svid_ttl.as_secs(), 4);
        assert_eq!(c.agent_svid_ttl.as_secs(), 10);
        let c =
            ServerConfig::parse("[server]\njwt_key_ttl = \"2h\"\n", Path::new("s.toml")).unwrap();
        assert_eq!(c.jwt_key_ttl.as_secs(), 7200);
        let err =
            ServerConfig::parse("[server]\nca_ttl = \"60s\"\n", Path::new("s.toml")).unwrap_err();
        assert!(err.to_string().contains("default_x509_svid_ttl"), "{err}");
        // A JWT-SVID lifetime longer than the key's is clamped when minting.
        assert!(
            ServerConfig::parse("[server]\njwt_key_ttl = \"1m\"\n", Path::new("s.toml")).is_ok()
        );
    }

    #[test]
    fn policy_keys() {
        let c = ServerConfig::development();
        assert!(c.policy.paths.is_empty() && c.policy.default_policy);
        assert_eq!(c.policy_reload_interval.as_secs(), 2);
        let c = ServerConfig::parse(
            "[server]\npolicy_paths = [\"/etc/mayfly/policy\"]\ndefault_policy = false\npolicy_reload_interval = \"10s\"\n",
            Path::new("s.toml"),
        )
        .unwrap();
        assert_eq!(c.policy.paths, [PathBuf::from("/etc/mayfly/policy")]);
        assert!(!c.policy.default_policy);
        assert_eq!(c.policy_reload_interval.as_secs(), 10);
        let err = ServerConfig::parse("[server]\ndefault_policy = false\n", Path::new("s.toml"))
            .unwrap_err();
        assert!(err.to_string().contains("default_policy"), "{err}");
        let err = ServerConfig::parse(
            "[server]\npolicy_reload_interval = \"often\"\n",
            Path::new("s.toml"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("policy_reload_interval"), "{err}");
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = ServerConfig::parse(
            "[server]\ntrust_domain = \"a.org\"\ncolour = 1\n",
            Path::new("s.toml"),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("s.toml") && msg.contains("line 3") && msg.contains("colour"),
            "{msg}"
        );
    }

    #[test]
    fn bad_values_are_named() {
        let err =
            ServerConfig::parse("[server]\nca_ttl = \"soon\"\n", Path::new("s.toml")).unwrap_err();
        assert!(err.to_string().contains("server.ca_ttl"), "{err}");
        assert!(
            ServerConfig::parse("[server]\nbind_address = \"nope\"\n", Path::new("s.toml"))
                .is_err()
        );
        assert!(ServerConfig::parse("[server\n", Path::new("s.toml")).is_err());
    }
}
