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
    /// `[server.node_attestors]`: node attestors besides `join_token`.
    #[serde(default)]
    pub node_attestors: RawNodeAttestors,
    /// `[server.rate_limits]`: per-identity limits on attestation and signing.
    #[serde(default)]
    pub rate_limits: RawRateLimits,
    /// JSON-lines copy of the audit log; default `<data_dir>/audit.jsonl`;
    /// `""` turns the file off (the store copy is always kept).
    pub audit_log_path: Option<PathBuf>,
    /// Policy files or directories of `*.cedar`; default none.
    pub policy_paths: Option<Vec<PathBuf>>,
    /// Whether the built-in policies are loaded; default `true`.
    pub default_policy: Option<bool>,
    /// How often policy files are checked for changes; default `2s`.
    pub policy_reload_interval: Option<String>,
    /// `[server.k8s_bundle]`: publish the trust bundle to a ConfigMap.
    pub k8s_bundle: Option<crate::k8s::config::RawK8sBundle>,
}

/// `[server.node_attestors]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNodeAttestors {
    /// `[server.node_attestors.x509pop]`; the attestor is disabled without it.
    pub x509pop: Option<RawX509Pop>,
    /// `[server.node_attestors.k8s_psat]`; the attestor is disabled without it.
    pub k8s_psat: Option<crate::k8s::config::RawK8sPsat>,
}

/// `[server.node_attestors.x509pop]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawX509Pop {
    /// PEM file of the CA certificates node certificates must chain to.
    pub ca_bundle_path: Option<PathBuf>,
    /// Template of the agent ID path after `/mayfly/agent/x509pop/`;
    /// default `{fingerprint}`.
    pub agent_path: Option<String>,
}

/// `[server.rate_limits]` table. `0` disables a limit.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimits {
    /// Attestations per minute per claimed agent identity; default 30.
    pub attestations_per_minute: Option<u32>,
    /// Sustained signings per second per agent; default 500.
    pub signings_per_second: Option<u32>,
    /// Signings an agent may make at once above the sustained rate; default 5000.
    pub signing_burst: Option<u32>,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The `x509pop` node attestor's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509PopConfig {
    /// PEM CA certificates that node certificates must chain to. Re-read at
    /// every attestation, so that the CA set can change without a restart.
    pub ca_bundle_path: PathBuf,
    /// How the agent ID is derived from the node certificate.
    pub agent_path: mayfly::x509pop::AgentPath,
}

/// Per-identity rate limits (`0` = unlimited). Keys are agent SPIFFE IDs
/// (claimed ones for attestation), never network addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Attestations per minute per claimed agent identity.
    pub attestations_per_minute: u32,
    /// Sustained X.509-SVID items plus JWT-SVIDs per second per agent.
    pub signings_per_second: u32,
    /// How many signings an agent may make at once.
    pub signing_burst: u32,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            attestations_per_minute: 30,
            signings_per_second: 500,
            signing_burst: 5000,
        }
    }
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
    /// The `x509pop` node attestor; `None` (disabled) unless configured.
    pub x509pop: Option<X509PopConfig>,
    /// The `k8s_psat` node attestor; `None` (disabled) unless configured.
    pub k8s_psat: Option<crate::k8s::K8sPsatConfig>,
    /// Where the trust bundle is published in Kubernetes, if anywhere.
    pub k8s_bundle: Option<crate::k8s::K8sBundleConfig>,
    /// Per-identity rate limits.
    pub rate_limits: RateLimitConfig,
    /// Where audit records are copied as JSON lines; see
    /// [`ServerConfig::audit_log_file`].
    pub audit_log_path: AuditLogPath,
    /// Where policies come from (files, directories, the built-in set).
    pub policy: crate::policy::PolicySources,
    /// How often policy files are checked for changes.
    pub policy_reload_interval: Ttl,
}

/// `audit_log_path` as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditLogPath {
    /// `<data_dir>/audit.jsonl` (follows `data_dir` when it is changed).
    Default,
    /// No file: the store copy only.
    Off,
    /// This file.
    File(PathBuf),
}

impl ServerConfig {
    /// The JSON-lines audit file, `None` when turned off.
    pub fn audit_log_file(&self) -> Option<PathBuf> {
        match &self.audit_log_path {
            AuditLogPath::Default => Some(self.data_dir.join("audit.jsonl")),
            AuditLogPath::Off => None,
            AuditLogPath::File(p) => Some(p.clone()),
        }
    }
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
        let audit_log_path = match s.audit_log_path {
            None => AuditLogPath::Default,
            Some(p) if p.as_os_str().is_empty() => AuditLogPath::Off,
            Some(p) if p.is_dir() => {
                return Err(invalid(
                    "server.audit_log_path",
                    format!(
                        "{} is a directory; name a file (or \"\" to turn the file off)",
                        p.display()
                    ),
                ));
            }
            Some(p) => AuditLogPath::File(p),
        };
        let x509pop = match s.node_attestors.x509pop {
            None => None,
            Some(x) => Some(X509PopConfig {
                ca_bundle_path: x.ca_bundle_path.ok_or_else(|| {
                    invalid(
                        "server.node_attestors.x509pop.ca_bundle_path",
                        "is required: a PEM file of the CA certificates that node certificates \
                         must chain to (remove the table to disable x509pop)"
                            .into(),
                    )
                })?,
                agent_path: match x.agent_path {
                    None => mayfly::x509pop::AgentPath::default(),
                    Some(t) => t
                        .parse()
                        .map_err(|e| invalid("server.node_attestors.x509pop.agent_path", e))?,
                },
            }),
        };
        let k8s_psat = s
            .node_attestors
            .k8s_psat
            .map(|k| crate::k8s::config::k8s_psat(k, path))
            .transpose()?;
        let k8s_bundle = s
            .k8s_bundle
            .map(|k| crate::k8s::config::k8s_bundle(k, path))
            .transpose()?;
        let defaults = RateLimitConfig::default();
        let r = s.rate_limits;
        let rate_limits = RateLimitConfig {
            attestations_per_minute: r
                .attestations_per_minute
                .unwrap_or(defaults.attestations_per_minute),
            signings_per_second: r
                .signings_per_second
                .unwrap_or(defaults.signings_per_second),
            signing_burst: r.signing_burst.unwrap_or(defaults.signing_burst),
        };
        if rate_limits.signings_per_second > 0 && rate_limits.signing_burst == 0 {
            return Err(invalid(
                "server.rate_limits.signing_burst",
                "must be at least 1 while signings_per_second is set (0 disables both with \
                 signings_per_second = 0)"
                    .into(),
            ));
        }
        let cfg = Self {
            audit_log_path,
            x509pop,
            k8s_psat,
            k8s_bundle,
            rate_limits,
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
    fn audit_log_path_defaults_to_the_data_dir_and_can_be_turned_off() {
        let c = ServerConfig::parse("[server]\ndata_dir = \"/d\"\n", Path::new("s.toml")).unwrap();
        assert_eq!(c.audit_log_file(), Some(PathBuf::from("/d/audit.jsonl")));
        let c =
            ServerConfig::parse("[server]\naudit_log_path = \"\"\n", Path::new("s.toml")).unwrap();
        assert_eq!(c.audit_log_file(), None);
        let c = ServerConfig::parse(
            "[server]\naudit_log_path = \"/var/log/a.jsonl\"\n",
            Path::new("s.toml"),
        )
        .unwrap();
        assert_eq!(c.audit_log_file(), Some(PathBuf::from("/var/log/a.jsonl")));
        let err = ServerConfig::parse("[server]\naudit_log_path = \"/\"\n", Path::new("s.toml"))
            .unwrap_err();
        assert!(err.to_string().contains("server.audit_log_path"), "{err}");
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
    fn x509pop_and_rate_limits() {
        let c = ServerConfig::development();
        assert_eq!(c.x509pop, None);
        assert_eq!(c.rate_limits, RateLimitConfig::default());
        let c = ServerConfig::parse(
            "[server.node_attestors.x509pop]\nca_bundle_path = \"/etc/ca.pem\"\n[server.rate_limits]\nattestations_per_minute = 0\nsignings_per_second = 2\nsigning_burst = 3\n",
            Path::new("s.toml"),
        )
        .unwrap();
        let x = c.x509pop.unwrap();
        assert_eq!(x.ca_bundle_path, PathBuf::from("/etc/ca.pem"));
        assert_eq!(x.agent_path, mayfly::x509pop::AgentPath::default());
        assert_eq!(c.rate_limits.attestations_per_minute, 0);
        assert_eq!(c.rate_limits.signings_per_second, 2);
        assert_eq!(c.rate_limits.signing_burst, 3);
        let c = ServerConfig::parse(
            "[server.node_attestors.x509pop]\nca_bundle_path = \"a\"\nagent_path = \"{subject_cn}\"\n",
            Path::new("s.toml"),
        )
        .unwrap();
        assert_eq!(
            c.x509pop.unwrap().agent_path,
            "{subject_cn}".parse().unwrap()
        );
        let err = ServerConfig::parse(
            "[server.node_attestors.x509pop]\nca_bundle_path = \"a\"\nagent_path = \"{cn}\"\n",
            Path::new("s.toml"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("agent_path"), "{err}");
        let err = ServerConfig::parse("[server.node_attestors.x509pop]\n", Path::new("s.toml"))
            .unwrap_err();
        assert!(err.to_string().contains("ca_bundle_path"), "{err}");
        let err = ServerConfig::parse(
            "[server.node_attestors.x509pop]\nca_bundle_path = \"a\"\ncolour = 1\n",
            Path::new("s.toml"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
        assert!(ServerConfig::parse("[server.node_attestors.tpm]\n", Path::new("s.toml")).is_err());
        assert!(
            ServerConfig::parse(
                "[server.rate_limits]\nsigning_burst = 0\n",
                Path::new("s.toml")
            )
            .is_err()
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
