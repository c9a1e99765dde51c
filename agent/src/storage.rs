//! The agent's data directory: its own key and X.509-SVID and the trust
//! bundle, so that a restart needs no new join token while the SVID is
//! valid. The directory is owner-only (0700), the key file 0600; every write
//! is atomic (temporary file, fsync, rename, directory fsync) so that a crash
//! never leaves half a file.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use mayfly::TrustDomain;
use mayfly::bundle::TrustBundle;
use zeroize::Zeroizing;

use crate::attest::AgentSvid;

/// The agent key, PKCS#8 PEM (0600).
pub const KEY_FILE: &str = "agent.key.pem";
/// The agent SVID chain, PEM, leaf first.
pub const SVID_FILE: &str = "agent-svid.pem";
/// The trust bundle, SPIFFE bundle JSON.
pub const BUNDLE_FILE: &str = "bundle.spiffe.json";

/// Why the data directory could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file exists but does not hold what it should (never the key material).
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |source| StorageError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The agent's data directory.
#[derive(Debug, Clone)]
pub struct Storage {
    dir: PathBuf,
}

impl Storage {
    /// Opens `dir`, creating it (and its parents) owner-only when absent and
    /// tightening an existing directory to 0700.
    pub fn open(dir: &Path) -> Result<Self, StorageError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Stores the agent key (0600) and SVID chain. The key is written first;
    /// [`Storage::load_agent_svid`] refuses a pair that does not match, so a
    /// crash between the two writes is detected, not trusted.
    pub fn save_agent_svid(&self, svid: &AgentSvid) -> Result<(), StorageError> {
        let key_pem = Zeroizing::new(pem::encode(&pem::Pem::new(
            "PRIVATE KEY",
            svid.key_pkcs8.to_vec(),
        )));
        self.write_atomic(KEY_FILE, key_pem.as_bytes(), 0o600)?;
        let chain_pem = pem::encode_many(
            &svid
                .chain_der
                .iter()
                .map(|der| pem::Pem::new("CERTIFICATE", der.clone()))
                .collect::<Vec<_>>(),
        );
        self.write_atomic(SVID_FILE, chain_pem.as_bytes(), 0o644)
    }

    /// The stored agent SVID and key, if both are present. A pair that does
    /// not parse or does not match is an error naming the file.
    pub fn load_agent_svid(&self) -> Result<Option<AgentSvid>, StorageError> {
        let key_path = self.dir.join(KEY_FILE);
        let svid_path = self.dir.join(SVID_FILE);
        let Some(key_text) = read_optional(&key_path)? else {
            return Ok(None);
        };
        let key_text = Zeroizing::new(key_text);
        let Some(svid_text) = read_optional(&svid_path)? else {
            return Ok(None);
        };
        let key = pem::parse(key_text.as_bytes()).map_err(|_| StorageError::Invalid {
            path: key_path.clone(),
            message: "not a PEM private key".into(),
        })?;
        let key_der = Zeroizing::new(key.into_contents());
        let chain = pem::parse_many(svid_text.as_bytes())
            .map_err(|e| StorageError::Invalid {
                path: svid_path.clone(),
                message: format!("not PEM certificates: {e}"),
            })?
            .into_iter()
            .map(pem::Pem::into_contents)
            .collect::<Vec<_>>();
        AgentSvid::new(chain, key_der)
            .map(Some)
            .map_err(|e| StorageError::Invalid {
                path: svid_path,
                message: e.to_string(),
            })
    }

    /// Stores the trust bundle as SPIFFE bundle JSON.
    pub fn save_bundle(&self, bundle: &TrustBundle) -> Result<(), StorageError> {
        let path = self.dir.join(BUNDLE_FILE);
        let json = bundle.to_spiffe_json().map_err(|e| StorageError::Invalid {
            path,
            message: e.to_string(),
        })?;
        self.write_atomic(BUNDLE_FILE, json.as_bytes(), 0o644)
    }

    /// The stored trust bundle for `trust_domain`, if any.
    pub fn load_bundle(
        &self,
        trust_domain: &TrustDomain,
    ) -> Result<Option<TrustBundle>, StorageError> {
        let path = self.dir.join(BUNDLE_FILE);
        let Some(text) = read_optional(&path)? else {
            return Ok(None);
        };
        TrustBundle::from_spiffe_json(trust_domain.clone(), text.as_bytes())
            .map(Some)
            .map_err(|e| StorageError::Invalid {
                path,
                message: e.to_string(),
            })
    }

    /// Writes `name` in the directory with `mode`, atomically and durably.
    fn write_atomic(&self, name: &str, data: &[u8], mode: u32) -> Result<(), StorageError> {
        let path = self.dir.join(name);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(io(&tmp))?;
        // `mode` only applies to a new file and is filtered by the umask.
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io(&tmp))?;
        f.write_all(data).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        fs::rename(&tmp, &path).map_err(io(&path))?;
        // Make the rename itself durable.
        fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io(&self.dir))?;
        Ok(())
    }
}

fn read_optional(path: &Path) -> Result<Option<String>, StorageError> {
    match fs::read_to_string(path) {
        Ok(text) => Ok(Some(text)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

/// Reads a PEM file of CA certificates (the bootstrap trust bundle).
pub fn read_pem_certificates(path: &Path) -> Result<Vec<Vec<u8>>, StorageError> {
    let text = fs::read_to_string(path).map_err(io(path))?;
    let invalid = |message: String| StorageError::Invalid {
        path: path.to_owned(),
        message,
    };
    let certs: Vec<Vec<u8>> = pem::parse_many(text.as_bytes())
        .map_err(|e| invalid(format!("not PEM: {e}")))?
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(pem::Pem::into_contents)
        .collect();
    if certs.is_empty() {
        return Err(invalid(
            "holds no CERTIFICATE block (write it with `mayfly-server bundle show --format pem`)"
                .into(),
        ));
    }
    for (i, der) in certs.iter().enumerate() {
        x509_parser::parse_x509_certificate(der)
            .map_err(|e| invalid(format!("certificate {}: {e}", i + 1)))?;
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mayfly::x509::{CaParams, SvidParams, VerifiedCsr, X509Authority, new_key_and_csr};
    use time::{Duration, OffsetDateTime};

    pub(crate) fn agent_svid(ca: &X509Authority, now: OffsetDateTime) -> AgentSvid {
        let k = new_key_and_csr().unwrap();
        let id = mayfly::SpiffeId::new("spiffe://example.org/mayfly/agent/join_token/t1").unwrap();
        let signed = ca
            .sign_svid(
                &VerifiedCsr::from_der(&k.csr_der).unwrap(),
                &SvidParams {
                    spiffe_id: &id,
                    dns_names: &[],
                    ttl: Duration::hours(1),
                },
                now,
            )
            .unwrap();
        AgentSvid::new(vec![signed.der], k.key_pkcs8).unwrap()
    }

    fn ca(now: OffsetDateTime) -> X509Authority {
        X509Authority::generate(
            &CaParams {
                trust_domain: TrustDomain::new("example.org").unwrap(),
                ttl: Duration::hours(24),
                subject: "Test".into(),
            },
            now,
        )
        .unwrap()
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn round_trip_with_private_modes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("agent");
        let s = Storage::open(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        let td = TrustDomain::new("example.org").unwrap();
        assert!(s.load_agent_svid().unwrap().is_none());
        assert!(s.load_bundle(&td).unwrap().is_none());

        let now = OffsetDateTime::now_utc();
        let ca = ca(now);
        let svid = agent_svid(&ca, now);
        s.save_agent_svid(&svid).unwrap();
        let mut bundle = TrustBundle::new(td.clone());
        bundle.x509_authorities.push(ca.cert_der().to_vec());
        bundle.sequence = 4;
        s.save_bundle(&bundle).unwrap();

        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
        let key_text = fs::read_to_string(dir.join(KEY_FILE)).unwrap();
        assert!(key_text.starts_with("-----BEGIN PRIVATE KEY-----"));
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");

        let again = Storage::open(&dir).unwrap();
        let back = again.load_agent_svid().unwrap().unwrap();
        assert_eq!(back.chain_der, svid.chain_der);
        assert_eq!(back.key_pkcs8.as_slice(), svid.key_pkcs8.as_slice());
        assert_eq!(back.spiffe_id, svid.spiffe_id);
        assert_eq!(back.expires_at, svid.expires_at);
        let b = again.load_bundle(&td).unwrap().unwrap();
        assert_eq!(b.x509_authorities, bundle.x509_authorities);
        assert_eq!(b.sequence, 4);
    }

    #[test]
    fn a_loose_directory_is_tightened_and_mismatched_files_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("agent");
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let s = Storage::open(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);

        let now = OffsetDateTime::now_utc();
        let ca = ca(now);
        let a = agent_svid(&ca, now);
        let b = agent_svid(&ca, now);
        s.save_agent_svid(&a).unwrap();
        // The key of one SVID with the certificate of another: refused.
        let mixed = AgentSvid {
            key_pkcs8: b.key_pkcs8.clone(),
            ..a.clone()
        };
        s.save_agent_svid(&mixed).unwrap();
        let err = s.load_agent_svid().unwrap_err();
        assert!(err.to_string().contains(SVID_FILE), "{err}");
        assert!(!err.to_string().contains("PRIVATE"), "{err}");

        fs::write(dir.join(KEY_FILE), "garbage").unwrap();
        let err = s.load_agent_svid().unwrap_err();
        assert!(err.to_string().contains(KEY_FILE), "{err}");
    }

    #[test]
    fn bootstrap_pem_must_hold_certificates() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = ca(OffsetDateTime::now_utc());
        let good = tmp.path().join("bundle.pem");
        fs::write(&good, ca.cert_pem()).unwrap();
        assert_eq!(
            read_pem_certificates(&good).unwrap(),
            vec![ca.cert_der().to_vec()]
        );
        let bad = tmp.path().join("empty.pem");
        fs::write(&bad, "hello").unwrap();
        let err = read_pem_certificates(&bad).unwrap_err();
        assert!(err.to_string().contains("empty.pem"), "{err}");
        assert!(read_pem_certificates(&tmp.path().join("missing.pem")).is_err());
    }
}
