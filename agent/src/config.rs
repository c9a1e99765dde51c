//! Agent configuration: TOML → [`RawConfig`] → validated [`AgentConfig`].
//! Unknown keys are errors naming the file, line and key; every key, its
//! default and the bootstrap options are documented in
//! `docs/configuration-agent.md`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use mayfly::TrustDomain;
use mayfly::config::ConfigError as FileError;
use serde::Deserialize;

use crate::attest::JoinToken;

/// Why a configuration was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read, does not parse, or has an invalid value
    /// (the message names the file, line and key).
    #[error(transparent)]
    File(#[from] FileError),
    /// The agent has no way to trust the server before its first attestation.
    #[error(
        "the agent has no trust bundle for the server: set agent.trust_bundle_path to a PEM file \
         with the server's CA certificates (print them with `mayfly-server bundle show --format pem`), \
         or, for development only, set agent.insecure_bootstrap = true \
         (no bundle is stored in {data_dir} yet)"
    )]
    NoBootstrapTrust {
        /// The data directory that holds no bundle.
        data_dir: PathBuf,
    },
}

/// The file as written. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// `[agent]` table.
    #[serde(default)]
    pub agent: RawAgent,
}

/// `[agent]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    /// Trust domain name; default `example.org`.
    pub trust_domain: Option<String>,
    /// The server's node API, `host:port`; default `127.0.0.1:8081`.
    pub server_address: Option<String>,
    /// Data directory; default `./.mayfly/agent`.
    pub data_dir: Option<PathBuf>,
    /// Workload API socket; default `<data_dir>/api.sock`.
    pub socket_path: Option<PathBuf>,
    /// PEM file of CA certificates trusted for the first attestation.
    pub trust_bundle_path: Option<PathBuf>,
    /// Trust any server certificate for the first attestation (development only).
    pub insecure_bootstrap: Option<bool>,
    /// Join token (prefer `--join-token` or `MAYFLY_JOIN_TOKEN`). Its `Debug` is redacted.
    pub join_token: Option<JoinToken>,
    /// Health endpoint address; default `127.0.0.1:8088`.
    pub health_address: Option<String>,
    /// Log level filter; default `info`.
    pub log_level: Option<String>,
    /// Log format, `text` or `json`; default `text`.
    pub log_format: Option<String>,
    /// Node attestor, `join_token` (default), `x509pop` or `k8s_psat`.
    pub node_attestor: Option<String>,
    /// `[agent.x509pop]`: the node certificate and key.
    pub x509pop: Option<RawX509Pop>,
    /// `[agent.k8s_psat]`: the cluster name and the projected token.
    pub k8s_psat: Option<RawK8sPsat>,
    /// `[agent.k8s]`: the `k8s` workload attestor (enabled when the table is present).
    pub k8s: Option<RawK8s>,
}

/// `[agent.k8s_psat]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawK8sPsat {
    /// The cluster's name, as configured on the server.
    pub cluster: Option<String>,
    /// The projected service account token; default
    /// `/var/run/secrets/tokens/mayfly-agent`.
    pub token_path: Option<PathBuf>,
}

/// `[agent.x509pop]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawX509Pop {
    /// PEM node certificate (leaf first, then any intermediates).
    pub certificate_path: Option<PathBuf>,
    /// PEM private key of the node certificate.
    pub private_key_path: Option<PathBuf>,
}

/// How this agent attests its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeAttestorConfig {
    /// A single-use join token (`--join-token`, `MAYFLY_JOIN_TOKEN` or
    /// `join_token`); low assurance, cannot attest again.
    JoinToken,
    /// A node certificate and proof of possession of its key; high
    /// assurance, attests again whenever needed.
    X509Pop {
        /// PEM certificate chain, leaf first.
        certificate_path: PathBuf,
        /// PEM private key (PKCS#8, SEC1 or PKCS#1).
        private_key_path: PathBuf,
    },
    /// A projected service account token of the agent's pod, checked by the
    /// cluster's TokenReview; medium assurance, attests again whenever needed.
    K8sPsat {
        /// The cluster's name, as the server knows it.
        cluster: mayfly::k8s_psat::ClusterName,
        /// The projected token, read at each attestation.
        token_path: PathBuf,
    },
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// A validated agent configuration. Its `Debug` never shows the join token.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Trust domain.
    pub trust_domain: TrustDomain,
    /// The server's node API, `host:port` (a host name or an IP address).
    pub server_address: String,
    /// Data directory (agent key and SVID, trust bundle).
    pub data_dir: PathBuf,
    /// Workload API Unix socket.
    pub socket_path: PathBuf,
    /// PEM CA certificates trusted before the first attestation.
    pub trust_bundle_path: Option<PathBuf>,
    /// Accept any server certificate for the first attestation when no
    /// bundle is known (development only; logged as a warning).
    pub insecure_bootstrap: bool,
    /// Join token from the file (the `--join-token` flag and
    /// `MAYFLY_JOIN_TOKEN` take precedence).
    pub join_token: Option<JoinToken>,
    /// `/healthz` and `/readyz` listen address.
    pub health_address: SocketAddr,
    /// Log filter.
    pub log_level: String,
    /// Log format.
    pub log_format: LogFormat,
    /// The node attestor.
    pub node_attestor: NodeAttestorConfig,
    /// The `k8s` workload attestor, when `[agent.k8s]` is present.
    pub k8s: Option<K8sConfig>,
}

impl AgentConfig {
    /// Reads and validates a file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
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

    /// The development defaults used when no file is given. They name no
    /// bootstrap trust: set `trust_bundle_path` or `insecure_bootstrap`
    /// before the first start.
    pub fn development() -> Self {
        // The defaults are all valid, so this cannot fail.
        Self::from_raw(RawConfig::default(), Path::new("<defaults>"))
            .unwrap_or_else(|e| unreachable!("defaults are valid: {e}"))
    }

    /// Checks that the agent can trust the server before it has attested:
    /// a stored bundle (`has_stored_bundle`), a bootstrap bundle file, or an
    /// explicit `insecure_bootstrap`.
    pub fn check_bootstrap_trust(&self, has_stored_bundle: bool) -> Result<(), ConfigError> {
        if has_stored_bundle || self.trust_bundle_path.is_some() || self.insecure_bootstrap {
            Ok(())
        } else {
            Err(ConfigError::NoBootstrapTrust {
                data_dir: self.data_dir.clone(),
            })
        }
    }

    /// The URI the node API client connects to (`http://`: TLS is added by
    /// the client's own connector, which verifies the server the SPIFFE way).
    pub fn server_uri(&self) -> String {
        format!("http://{}", self.server_address)
    }

    fn from_raw(raw: RawConfig, path: &Path) -> Result<Self, ConfigError> {
        let a = raw.agent;
        let invalid = |key: &'static str, message: String| {
            ConfigError::File(FileError::Invalid {
                path: path.to_owned(),
                key,
                message,
            })
        };
        let trust_domain = TrustDomain::new(a.trust_domain.as_deref().unwrap_or("example.org"))
            .map_err(|e| invalid("agent.trust_domain", e.to_string()))?;
        let server_address = a
            .server_address
            .unwrap_or_else(|| "127.0.0.1:8081".to_owned());
        match server_address.parse::<http::uri::Authority>() {
            Ok(auth) if auth.port_u16().is_some() && auth.as_str() == server_address => {}
            _ => {
                return Err(invalid(
                    "agent.server_address",
                    format!(
                        "{server_address:?} is not host:port (write it like 127.0.0.1:8081 or mayfly.example.org:8081)"
                    ),
                ));
            }
        }
        let data_dir = a.data_dir.unwrap_or_else(|| PathBuf::from(".mayfly/agent"));
        let socket_path = a.socket_path.unwrap_or_else(|| data_dir.join("api.sock"));
        let health_address = a
            .health_address
            .as_deref()
            .unwrap_or("127.0.0.1:8088")
            .parse()
            .map_err(|e| {
                invalid(
                    "agent.health_address",
                    format!("{e} (write it like 127.0.0.1:8088)"),
                )
            })?;
        let log_level = a.log_level.unwrap_or_else(|| "info".into());
        tracing_subscriber::EnvFilter::try_new(&log_level)
            .map_err(|e| invalid("agent.log_level", e.to_string()))?;
        let log_format = match a.log_format.as_deref().unwrap_or("text") {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "agent.log_format",
                    format!("must be text or json, not {other:?}"),
                ));
            }
        };
        if let Some(p) = &a.trust_bundle_path
            && p.as_os_str().is_empty()
        {
            return Err(invalid(
                "agent.trust_bundle_path",
                "must not be empty".into(),
            ));
        }
        let node_attestor = match a.node_attestor.as_deref().unwrap_or("join_token") {
            "join_token" => {
                if a.x509pop.is_some() {
                    return Err(invalid(
                        "agent.x509pop",
                        "is set but agent.node_attestor is join_token; set node_attestor = \"x509pop\""
                            .into(),
                    ));
                }
                if a.k8s_psat.is_some() {
                    return Err(invalid(
                        "agent.k8s_psat",
                        "is set but agent.node_attestor is join_token; set node_attestor = \"k8s_psat\""
                            .into(),
                    ));
                }
                NodeAttestorConfig::JoinToken
            }
            "k8s_psat" => {
                let k = a.k8s_psat.unwrap_or_default();
                let cluster = k.cluster.ok_or_else(|| {
                    invalid(
                        "agent.k8s_psat.cluster",
                        "is required with node_attestor = \"k8s_psat\": the cluster's name as \
                         configured on the server"
                            .into(),
                    )
                })?;
                NodeAttestorConfig::K8sPsat {
                    cluster: cluster
                        .parse()
                        .map_err(|e: mayfly::k8s_psat::K8sPsatError| {
                            invalid("agent.k8s_psat.cluster", e.to_string())
                        })?,
                    token_path: k
                        .token_path
                        .filter(|p| !p.as_os_str().is_empty())
                        .unwrap_or_else(|| {
                            PathBuf::from(crate::attest::k8s_psat::DEFAULT_TOKEN_PATH)
                        }),
                }
            }
            "x509pop" => {
                let x = a.x509pop.unwrap_or_default();
                let required = |key: &'static str, v: Option<PathBuf>| {
                    v.filter(|p| !p.as_os_str().is_empty()).ok_or_else(|| {
                        invalid(key, "is required with node_attestor = \"x509pop\"".into())
                    })
                };
                NodeAttestorConfig::X509Pop {
                    certificate_path: required(
                        "agent.x509pop.certificate_path",
                        x.certificate_path,
                    )?,
                    private_key_path: required(
                        "agent.x509pop.private_key_path",
                        x.private_key_path,
                    )?,
                }
            }
            other => {
                return Err(invalid(
                    "agent.node_attestor",
                    format!("must be join_token, x509pop or k8s_psat, not {other:?}"),
                ));
            }
        };
        let k8s = a
            .k8s
            .map(|k| K8sConfig::from_raw(k, path, &|name| std::env::var(name).ok()))
            .transpose()?;
        Ok(Self {
            k8s,
            node_attestor,
            trust_domain,
            server_address,
            data_dir,
            socket_path,
            trust_bundle_path: a.trust_bundle_path,
            insecure_bootstrap: a.insecure_bootstrap.unwrap_or(false),
            join_token: a.join_token,
            health_address,
            log_level,
            log_format,
        })
    }
}

// ---- [agent.k8s]: the k8s workload attestor ----

/// Environment variable naming the node's IP (the Helm chart sets it from `status.hostIP`);
/// the kubelet is reached at `https://<it>:10250` by default.
pub const NODE_IP_ENV: &str = "MAYFLY_NODE_IP";
/// Default `token_path`: the pod's service account token.
pub const DEFAULT_K8S_TOKEN_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// Default `kubelet_ca_path`: the cluster CA mounted into every pod.
pub const DEFAULT_KUBELET_CA_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// Default `node_name_env`.
pub const DEFAULT_NODE_NAME_ENV: &str = "MAYFLY_NODE_NAME";

/// `[agent.k8s]` table.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawK8s {
    /// The kubelet's secure endpoint; default `https://$MAYFLY_NODE_IP:10250`, else
    /// `https://127.0.0.1:10250`.
    pub kubelet_url: Option<String>,
    /// PEM CA certificates that sign the kubelet's serving certificate.
    pub kubelet_ca_path: Option<PathBuf>,
    /// Accept any kubelet certificate.
    pub insecure_skip_kubelet_verification: Option<bool>,
    /// The bearer token presented to the kubelet, read at every request.
    pub token_path: Option<PathBuf>,
    /// Pod list reads before a container missing from it is refused; default 10.
    pub max_poll_attempts: Option<u32>,
    /// Wait between those reads; default `500ms`.
    pub poll_retry_interval: Option<String>,
    /// Environment variable holding this node's name; default `MAYFLY_NODE_NAME`.
    pub node_name_env: Option<String>,
}

/// The validated `[agent.k8s]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct K8sConfig {
    /// `https://host:port` of the kubelet (no path).
    pub kubelet_url: http::Uri,
    /// PEM CA certificates for the kubelet's serving certificate.
    pub kubelet_ca_path: PathBuf,
    /// Accept any kubelet certificate (logged as a warning at start).
    pub insecure_skip_kubelet_verification: bool,
    /// The bearer token file.
    pub token_path: PathBuf,
    /// Pod list reads (at least 1) before a container missing from it is refused.
    pub max_poll_attempts: u32,
    /// Wait between those reads.
    pub poll_retry_interval: std::time::Duration,
    /// The environment variable naming this node.
    pub node_name_env: String,
    /// This node's name, from that variable at start, when set: a pod the kubelet lists on
    /// another node is refused.
    pub node_name: Option<String>,
}

impl K8sConfig {
    /// Validates `raw`; `env` reads environment variables (`MAYFLY_NODE_IP`, the node name).
    pub fn from_raw(
        raw: RawK8s,
        path: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let invalid = |key: &'static str, message: String| {
            ConfigError::File(FileError::Invalid {
                path: path.to_owned(),
                key,
                message,
            })
        };
        let url = match raw.kubelet_url {
            Some(u) => u,
            None => match env(NODE_IP_ENV).filter(|v| !v.trim().is_empty()) {
                Some(ip) if ip.trim().contains(':') => format!("https://[{}]:10250", ip.trim()),
                Some(ip) => format!("https://{}:10250", ip.trim()),
                None => "https://127.0.0.1:10250".to_owned(),
            },
        };
        let kubelet_url = url
            .parse::<http::Uri>()
            .ok()
            .filter(|u| {
                u.scheme_str() == Some("https")
                    && u.host().is_some_and(|h| !h.is_empty())
                    && u.port_u16().is_some()
                    && matches!(u.path(), "" | "/")
                    && u.query().is_none()
            })
            .ok_or_else(|| {
                invalid(
                    "agent.k8s.kubelet_url",
                    format!(
                        "{url:?} is not https://host:port (write it like https://10.0.0.5:10250; \
                         the kubelet's secure port)"
                    ),
                )
            })?;
        let non_empty = |key: &'static str, v: Option<PathBuf>, default: &str| match v {
            Some(p) if p.as_os_str().is_empty() => Err(invalid(key, "must not be empty".into())),
            Some(p) => Ok(p),
            None => Ok(PathBuf::from(default)),
        };
        let max_poll_attempts = raw.max_poll_attempts.unwrap_or(10);
        if max_poll_attempts == 0 {
            return Err(invalid(
                "agent.k8s.max_poll_attempts",
                "must be at least 1".into(),
            ));
        }
        let poll_retry_interval = match raw.poll_retry_interval.as_deref() {
            None => std::time::Duration::from_millis(500),
            Some(text) => humantime::parse_duration(text)
                .ok()
                .filter(|d| !d.is_zero())
                .ok_or_else(|| {
                    invalid(
                        "agent.k8s.poll_retry_interval",
                        format!("{text:?} is not a positive duration (write it like 500ms or 2s)"),
                    )
                })?,
        };
        let node_name_env = raw
            .node_name_env
            .unwrap_or_else(|| DEFAULT_NODE_NAME_ENV.to_owned());
        if node_name_env.is_empty() {
            return Err(invalid(
                "agent.k8s.node_name_env",
                "must not be empty".into(),
            ));
        }
        let node_name = env(&node_name_env).filter(|n| !n.trim().is_empty());
        Ok(Self {
            kubelet_url,
            kubelet_ca_path: non_empty(
                "agent.k8s.kubelet_ca_path",
                raw.kubelet_ca_path,
                DEFAULT_KUBELET_CA_PATH,
            )?,
            insecure_skip_kubelet_verification: raw
                .insecure_skip_kubelet_verification
                .unwrap_or(false),
            token_path: non_empty(
                "agent.k8s.token_path",
                raw.token_path,
                DEFAULT_K8S_TOKEN_PATH,
            )?,
            max_poll_attempts,
            poll_retry_interval,
            node_name_env,
            node_name,
        })
    }
}

#[cfg(test)]
mod k8s_tests {
    use super::*;

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<K8sConfig, ConfigError> {
        let raw: RawConfig = mayfly::config::parse_toml(text, Path::new("a.toml"))?;
        let lookup = |k: &str| {
            env.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| (*v).to_owned())
        };
        K8sConfig::from_raw(
            raw.agent.k8s.unwrap_or_default(),
            Path::new("a.toml"),
            &lookup,
        )
    }

    #[test]
    fn the_table_enables_the_attestor_with_safe_defaults() {
        assert!(AgentConfig::development().k8s.is_none());
        let c = AgentConfig::parse("[agent.k8s]\n", Path::new("a.toml")).unwrap();
        assert!(c.k8s.is_some());
        let k = parse("[agent.k8s]\n", &[]).unwrap();
        assert_eq!(k.kubelet_url, "https://127.0.0.1:10250");
        assert_eq!(k.kubelet_ca_path, PathBuf::from(DEFAULT_KUBELET_CA_PATH));
        assert!(!k.insecure_skip_kubelet_verification);
        assert_eq!(k.token_path, PathBuf::from(DEFAULT_K8S_TOKEN_PATH));
        assert_eq!(k.max_poll_attempts, 10);
        assert_eq!(k.poll_retry_interval, std::time::Duration::from_millis(500));
        assert_eq!(k.node_name_env, "MAYFLY_NODE_NAME");
        assert_eq!(k.node_name, None);
        // The node's IP (set by the Helm chart from status.hostIP) and name.
        let k = parse(
            "[agent.k8s]\n",
            &[
                ("MAYFLY_NODE_IP", "10.0.3.17"),
                ("MAYFLY_NODE_NAME", "worker-1"),
            ],
        )
        .unwrap();
        assert_eq!(k.kubelet_url, "https://10.0.3.17:10250");
        assert_eq!(k.node_name.as_deref(), Some("worker-1"));
        let k = parse("[agent.k8s]\n", &[("MAYFLY_NODE_IP", "fd00::17")]).unwrap();
        assert_eq!(k.kubelet_url, "https://[fd00::17]:10250");
    }

    #[test]
    fn every_key_is_read_and_checked() {
        let k = parse(
            "[agent.k8s]\nkubelet_url = \"https://node-a.internal:10250\"\n\
             kubelet_ca_path = \"/etc/kubelet-ca.pem\"\ninsecure_skip_kubelet_verification = true\n\
             token_path = \"/var/run/tok\"\nmax_poll_attempts = 3\npoll_retry_interval = \"2s\"\n\
             node_name_env = \"MY_NODE\"\n",
            &[("MAYFLY_NODE_IP", "10.0.0.1"), ("MY_NODE", "node-a")],
        )
        .unwrap();
        assert_eq!(k.kubelet_url, "https://node-a.internal:10250");
        assert_eq!(k.kubelet_ca_path, PathBuf::from("/etc/kubelet-ca.pem"));
        assert!(k.insecure_skip_kubelet_verification);
        assert_eq!(k.token_path, PathBuf::from("/var/run/tok"));
        assert_eq!(k.max_poll_attempts, 3);
        assert_eq!(k.poll_retry_interval, std::time::Duration::from_secs(2));
        assert_eq!(k.node_name.as_deref(), Some("node-a"));
        for (text, key) in [
            (
                "kubelet_url = \"http://127.0.0.1:10255\"",
                "agent.k8s.kubelet_url",
            ),
            (
                "kubelet_url = \"https://127.0.0.1\"",
                "agent.k8s.kubelet_url",
            ),
            (
                "kubelet_url = \"https://127.0.0.1:10250/pods\"",
                "agent.k8s.kubelet_url",
            ),
            ("kubelet_url = \"127.0.0.1:10250\"", "agent.k8s.kubelet_url"),
            ("max_poll_attempts = 0", "agent.k8s.max_poll_attempts"),
            (
                "poll_retry_interval = \"soon\"",
                "agent.k8s.poll_retry_interval",
            ),
            (
                "poll_retry_interval = \"0s\"",
                "agent.k8s.poll_retry_interval",
            ),
            ("token_path = \"\"", "agent.k8s.token_path"),
            ("kubelet_ca_path = \"\"", "agent.k8s.kubelet_ca_path"),
            ("node_name_env = \"\"", "agent.k8s.node_name_env"),
            (
                "skip_kubelet_verification = true",
                "skip_kubelet_verification",
            ),
        ] {
            let err = AgentConfig::parse(&format!("[agent.k8s]\n{text}\n"), Path::new("a.toml"))
                .unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use zeroize::Zeroizing;

    #[test]
    fn defaults_are_the_development_setup() {
        let c = AgentConfig::development();
        assert_eq!(c.trust_domain.as_str(), "example.org");
        assert_eq!(c.server_address, "127.0.0.1:8081");
        assert_eq!(c.server_uri(), "http://127.0.0.1:8081");
        assert_eq!(c.data_dir, PathBuf::from(".mayfly/agent"));
        assert_eq!(c.socket_path, PathBuf::from(".mayfly/agent/api.sock"));
        assert_eq!(c.health_address, "127.0.0.1:8088".parse().unwrap());
        assert!(!c.insecure_bootstrap);
        assert!(c.trust_bundle_path.is_none() && c.join_token.is_none());
        assert_eq!(c.log_level, "info");
        assert_eq!(c.log_format, LogFormat::Text);
        // socket_path follows data_dir unless set.
        let c = AgentConfig::parse(
            "[agent]\ndata_dir = \"/var/lib/mayfly\"\n",
            Path::new("a.toml"),
        )
        .unwrap();
        assert_eq!(c.socket_path, PathBuf::from("/var/lib/mayfly/api.sock"));
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = AgentConfig::parse(
            "[agent]\ntrust_domain = \"a.org\"\nserver_adress = \"x:1\"\n",
            Path::new("agent.toml"),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("agent.toml") && msg.contains("line 3") && msg.contains("server_adress"),
            "{msg}"
        );
        let err = AgentConfig::parse("[agnet]\n", Path::new("agent.toml")).unwrap_err();
        assert!(err.to_string().contains("agnet"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        for (text, key) in [
            ("server_address = \"nope\"", "agent.server_address"),
            ("server_address = \"http://a:1\"", "agent.server_address"),
            ("health_address = \"localhost\"", "agent.health_address"),
            ("log_format = \"xml\"", "agent.log_format"),
            ("trust_domain = \"Not A Domain\"", "agent.trust_domain"),
            ("trust_bundle_path = \"\"", "agent.trust_bundle_path"),
        ] {
            let err =
                AgentConfig::parse(&format!("[agent]\n{text}\n"), Path::new("a.toml")).unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
        let c = AgentConfig::parse(
            "[agent]\nserver_address = \"mayfly.example.org:8081\"\n",
            Path::new("a.toml"),
        )
        .unwrap();
        assert_eq!(c.server_address, "mayfly.example.org:8081");
    }

    #[test]
    fn k8s_psat_attestor() {
        let c = AgentConfig::parse(
            "[agent]\nnode_attestor = \"k8s_psat\"\n[agent.k8s_psat]\ncluster = \"prod\"\n",
            Path::new("a.toml"),
        )
        .unwrap();
        assert_eq!(
            c.node_attestor,
            NodeAttestorConfig::K8sPsat {
                cluster: "prod".parse().unwrap(),
                token_path: PathBuf::from("/var/run/secrets/tokens/mayfly-agent"),
            }
        );
        for (text, key) in [
            ("node_attestor = \"k8s_psat\"\n", "agent.k8s_psat.cluster"),
            (
                "node_attestor = \"k8s_psat\"\n[agent.k8s_psat]\ncluster = \"Prod\"\n",
                "agent.k8s_psat.cluster",
            ),
            ("[agent.k8s_psat]\ncluster = \"prod\"\n", "agent.k8s_psat"),
        ] {
            let err =
                AgentConfig::parse(&format!("[agent]\n{text}"), Path::new("a.toml")).unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn missing_bootstrap_trust_is_a_clear_error() {
        let c = AgentConfig::development();
        let err = c.check_bootstrap_trust(false).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("trust_bundle_path") && msg.contains("insecure_bootstrap"),
            "{msg}"
        );
        assert!(
            c.check_bootstrap_trust(true).is_ok(),
            "a stored bundle is enough"
        );
        let c = AgentConfig::parse(
            "[agent]\ntrust_bundle_path = \"bundle.pem\"\n",
            Path::new("a.toml"),
        )
        .unwrap();
        assert!(c.check_bootstrap_trust(false).is_ok());
        let c = AgentConfig::parse("[agent]\ninsecure_bootstrap = true\n", Path::new("a.toml"))
            .unwrap();
        assert!(c.check_bootstrap_trust(false).is_ok());
    }

    #[test]
    fn x509pop_attestor() {
        assert_eq!(
            AgentConfig::development().node_attestor,
            NodeAttestorConfig::JoinToken
        );
        let c = AgentConfig::parse(
            "[agent]\nnode_attestor = \"x509pop\"\n[agent.x509pop]\ncertificate_path = \"n.pem\"\nprivate_key_path = \"n.key\"\n",
            Path::new("a.toml"),
        )
        .unwrap();
        assert_eq!(
            c.node_attestor,
            NodeAttestorConfig::X509Pop {
                certificate_path: "n.pem".into(),
                private_key_path: "n.key".into()
            }
        );
        for (text, key) in [
            ("node_attestor = \"tpm\"", "agent.node_attestor"),
            (
                "node_attestor = \"x509pop\"",
                "agent.x509pop.certificate_path",
            ),
            (
                "node_attestor = \"x509pop\"\n[agent.x509pop]\ncertificate_path = \"n.pem\"",
                "agent.x509pop.private_key_path",
            ),
            (
                "[agent.x509pop]\ncertificate_path = \"n.pem\"",
                "agent.x509pop",
            ),
            ("[agent.x509pop]\ncolour = 1", "colour"),
        ] {
            let err =
                AgentConfig::parse(&format!("[agent]\n{text}\n"), Path::new("a.toml")).unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn join_token_is_redacted_in_debug() {
        let c = AgentConfig::parse(
            "[agent]\njoin_token = \"tok-5ecret-value\"\n",
            Path::new("a.toml"),
        )
        .unwrap();
        assert_eq!(
            c.join_token.as_ref().map(JoinToken::expose),
            Some("tok-5ecret-value")
        );
        let raw: RawConfig =
            toml::from_str("[agent]\njoin_token = \"tok-5ecret-value\"\n").unwrap();
        for debug in [format!("{c:?}"), format!("{c:#?}"), format!("{raw:?}")] {
            assert!(!debug.contains("5ecret"), "{debug}");
            assert!(debug.contains("redacted"), "{debug}");
        }
        let t = JoinToken::new(Zeroizing::new("abc".into())).unwrap();
        assert_eq!(format!("{t:?}"), "JoinToken(<redacted>)");
        let err =
            AgentConfig::parse("[agent]\njoin_token = \"\"\n", Path::new("a.toml")).unwrap_err();
        assert!(err.to_string().contains("join_token"), "{err}");
    }
}
