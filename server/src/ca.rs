//! The server's signing authorities (X.509 CA and JWT key): created on first
//! start, kept as owner-only files in `<data_dir>/ca/`, reloaded on restart.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use mayfly::bundle::TrustBundle;
use mayfly::jwt::JwtSigningKey;
use mayfly::x509::{CaParams, X509Authority};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::config::ServerConfig;

/// Why the authorities could not be loaded or created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file exists but does not hold a usable key or certificate.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong (never the key material).
        message: String,
    },
    /// Key generation failed.
    #[error("cannot create the authority: {0}")]
    Generate(String),
}

/// The active X.509 CA and JWT signing key.
#[derive(Debug)]
pub struct Authorities {
    /// The X.509 CA.
    pub x509: X509Authority,
    /// The JWT-SVID signing key.
    pub jwt: JwtSigningKey,
    trust_domain: mayfly::TrustDomain,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `data` to `path` with mode 0600, atomically (temp file + rename)
/// and durably (fsync) so that a crash never leaves half a key.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), CaError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(io(&tmp))?;
    f.write_all(data).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))?;
    Ok(())
}

impl Authorities {
    /// Loads the authorities from `<data_dir>/ca/`, creating them when
    /// absent. A CA that has expired, or that could not cover one default
    /// X.509-SVID lifetime, is replaced by a new one.
    pub fn load_or_create(config: &ServerConfig, now: OffsetDateTime) -> Result<Self, CaError> {
        let dir = config.data_dir.join("ca");
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(io(&dir))?;
        let cert_path = dir.join("x509-ca.crt.pem");
        let key_path = dir.join("x509-ca.key.pem");
        let jwt_path = dir.join("jwt.key.pem");

        let min_left = config.default_x509_svid_ttl.as_time();
        let x509 = match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                let cert = fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
                let key = Zeroizing::new(fs::read_to_string(&key_path).map_err(io(&key_path))?);
                let ca = X509Authority::from_pem(&cert, &key).map_err(|e| CaError::Invalid {
                    path: cert_path.clone(),
                    message: e.to_string(),
                })?;
                if ca.not_after() - now < min_left {
                    tracing::warn!(not_after = %ca.not_after(), "X.509 CA expired or nearly expired; creating a new one");
                    None
                } else {
                    Some(ca)
                }
            }
            _ => None,
        };
        let x509 = match x509 {
            Some(ca) => ca,
            None => {
                let params = CaParams {
                    trust_domain: config.trust_domain.clone(),
                    ttl: config.ca_ttl.as_time(),
                    subject: config.ca_subject.clone(),
                };
                let ca = X509Authority::generate(&params, now)
                    .map_err(|e| CaError::Generate(e.to_string()))?;
                write_private(&key_path, ca.key_pem().as_bytes())?;
                write_private(&cert_path, ca.cert_pem().as_bytes())?;
                tracing::info!(not_after = %ca.not_after(), "created X.509 CA");
                ca
            }
        };

        let jwt = if jwt_path.exists() {
            let text = Zeroizing::new(fs::read_to_string(&jwt_path).map_err(io(&jwt_path))?);
            let der = pem::parse(text.as_bytes()).map_err(|_| CaError::Invalid {
                path: jwt_path.clone(),
                message: "not a PEM private key".into(),
            })?;
            JwtSigningKey::from_pkcs8(der.contents()).map_err(|e| CaError::Invalid {
                path: jwt_path.clone(),
                message: e.to_string(),
            })?
        } else {
            let key = JwtSigningKey::generate().map_err(|e| CaError::Generate(e.to_string()))?;
            let pem = Zeroizing::new(pem::encode(&pem::Pem::new(
                "PRIVATE KEY",
                key.pkcs8_der().to_vec(),
            )));
            write_private(&jwt_path, pem.as_bytes())?;
            tracing::info!(kid = key.key_id(), "created JWT signing key");
            key
        };
        Ok(Self {
            x509,
            jwt,
            trust_domain: config.trust_domain.clone(),
        })
    }

    /// The trust bundle: the CA certificate and the JWT public key.
    pub fn bundle(&self, sequence: u64) -> TrustBundle {
        let mut b = TrustBundle::new(self.trust_domain.clone());
        b.x509_authorities.push(self.x509.cert_der().to_vec());
        if let Ok(a) = self.jwt.authority(None) {
            b.jwt_authorities.push(a);
        }
        b.sequence = sequence;
        b.refresh_hint = Some(300);
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_reloaded_after_with_private_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = ServerConfig::development();
        cfg.data_dir = dir.path().to_owned();
        let now = OffsetDateTime::now_utc();
        let a = Authorities::load_or_create(&cfg, now).unwrap();
        let b = Authorities::load_or_create(&cfg, now).unwrap();
        assert_eq!(a.x509.cert_der(), b.x509.cert_der());
        assert_eq!(a.jwt.key_id(), b.jwt.key_id());
        for f in ["x509-ca.key.pem", "jwt.key.pem"] {
            let mode = fs::metadata(dir.path().join("ca").join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        // An expired CA is replaced.
        let later = now + time::Duration::days(2);
        let c = Authorities::load_or_create(&cfg, later).unwrap();
        assert_ne!(c.x509.cert_der(), a.x509.cert_der());
        // A corrupt key is an error naming the file, not a panic.
        fs::write(dir.path().join("ca/jwt.key.pem"), "garbage").unwrap();
        let err = Authorities::load_or_create(&cfg, later).unwrap_err();
        assert!(err.to_string().contains("jwt.key.pem"), "{err}");
    }
}
