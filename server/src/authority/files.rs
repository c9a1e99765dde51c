//! The authorities on disk, under `<data_dir>/ca/`:
//!
//! - `x509/<id>.crt.pem` and `x509/<id>.key.pem`: each X.509 CA;
//! - `jwt/<kid>.key.pem`: each JWT signing key;
//! - `authorities.json`: every slot's phase and taint (and a JWT key's
//!   lifetime, which the key itself does not carry).
//!
//! Keys are owner-only (0600) and every file is written atomically (temp
//! file, fsync, rename, fsync of the directory), so that a crash leaves
//! either the old or the new file, never half of one. The state file is the
//! source of truth: a key file it does not name is ignored.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use mayfly::authority::Phase;
use mayfly::jwt::JwtSigningKey;
use mayfly::x509::X509Authority;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Why the authorities could not be read, written or created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorityError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A file exists but does not hold a usable key, certificate or state.
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

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuthorityError + '_ {
    move |source| AuthorityError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `data` to `path` with `mode`, atomically (temp file + rename) and
/// durably (fsync of the file, then of its directory).
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), AuthorityError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io(&tmp))?;
    f.write_all(data).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(dir) = path.parent() {
        // Makes the rename itself durable; a failure here is not fatal to
        // the write, which already happened.
        if let Err(e) = fs::File::open(dir).and_then(|d| d.sync_all()) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot fsync the directory");
        }
    }
    Ok(())
}

/// Writes `data` to `path` with mode 0600, atomically and durably, so that
/// a crash never leaves half a key.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), AuthorityError> {
    write_atomic(path, data, 0o600)
}

fn private_dir(dir: &Path) -> Result<(), AuthorityError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))
}

/// One slot as recorded in `authorities.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlotRecord {
    /// X.509: lowercase hex key identifier; JWT: the `kid`.
    pub id: String,
    /// Where the slot is in its life.
    pub phase: Phase,
    /// Whether SVIDs it signed must be replaced now.
    #[serde(default)]
    pub tainted: bool,
    /// X.509 CAs only: when the server created it, Unix seconds. The
    /// schedule counts the CA's life from here rather than from its
    /// NotBefore, which is backdated for clock skew. Absent for a CA
    /// migrated from the old layout (its NotBefore is used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<i64>,
    /// JWT keys only: NotBefore, Unix seconds (X.509 CAs carry their own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<i64>,
    /// JWT keys only: NotAfter, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<i64>,
}

/// `authorities.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateRecord {
    /// Format version (1).
    pub version: u32,
    /// X.509 CAs.
    pub x509: Vec<SlotRecord>,
    /// JWT signing keys.
    pub jwt: Vec<SlotRecord>,
}

/// An id is used as a file name: only what key identifiers are made of
/// (hex digits, base64url), so that a tampered state file cannot name a
/// path outside the directory.
fn check_id(id: &str, state_path: &Path) -> Result<(), AuthorityError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(AuthorityError::Invalid {
            path: state_path.to_owned(),
            message: format!("authority id {id:?} is not a key identifier"),
        })
    }
}

/// The `<data_dir>/ca/` directory.
#[derive(Debug, Clone)]
pub struct AuthorityFiles {
    root: PathBuf,
}

impl AuthorityFiles {
    /// The files under `root` (`<data_dir>/ca`), creating the directories
    /// owner-only.
    pub fn open(root: PathBuf) -> Result<Self, AuthorityError> {
        private_dir(&root)?;
        private_dir(&root.join("x509"))?;
        private_dir(&root.join("jwt"))?;
        Ok(Self { root })
    }

    /// `authorities.json`.
    pub fn state_path(&self) -> PathBuf {
        self.root.join("authorities.json")
    }

    /// The certificate and key files of X.509 CA `id`.
    pub fn x509_paths(&self, id: &str) -> (PathBuf, PathBuf) {
        let dir = self.root.join("x509");
        (
            dir.join(format!("{id}.crt.pem")),
            dir.join(format!("{id}.key.pem")),
        )
    }

    /// The key file of JWT key `kid`.
    pub fn jwt_path(&self, kid: &str) -> PathBuf {
        self.root.join("jwt").join(format!("{kid}.key.pem"))
    }

    /// The state file, or `None` when there is none yet. Ids are checked.
    pub fn read_state(&self) -> Result<Option<StateRecord>, AuthorityError> {
        let path = self.state_path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&path)(e)),
        };
        let state: StateRecord =
            serde_json::from_slice(&bytes).map_err(|e| AuthorityError::Invalid {
                path: path.clone(),
                message: e.to_string(),
            })?;
        for slot in state.x509.iter().chain(&state.jwt) {
            check_id(&slot.id, &path)?;
        }
        Ok(Some(state))
    }

    /// Replaces the state file.
    pub fn write_state(&self, state: &StateRecord) -> Result<(), AuthorityError> {
        let path = self.state_path();
        let json = serde_json::to_vec_pretty(state).map_err(|e| AuthorityError::Invalid {
            path: path.clone(),
            message: e.to_string(),
        })?;
        write_private(&path, &json)
    }

    /// Writes an X.509 CA's key and certificate.
    pub fn write_x509(&self, id: &str, ca: &X509Authority) -> Result<(), AuthorityError> {
        let (cert, key) = self.x509_paths(id);
        write_private(&key, ca.key_pem().as_bytes())?;
        write_private(&cert, ca.cert_pem().as_bytes())
    }

    /// Reads an X.509 CA from its certificate and key files.
    pub fn read_x509_pair(
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<X509Authority, AuthorityError> {
        let cert = fs::read_to_string(cert_path).map_err(io(cert_path))?;
        let key = Zeroizing::new(fs::read_to_string(key_path).map_err(io(key_path))?);
        X509Authority::from_pem(&cert, &key).map_err(|e| AuthorityError::Invalid {
            path: cert_path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Reads X.509 CA `id`.
    pub fn read_x509(&self, id: &str) -> Result<X509Authority, AuthorityError> {
        let (cert, key) = self.x509_paths(id);
        Self::read_x509_pair(&cert, &key)
    }

    /// Writes a JWT key (PKCS#8 PEM).
    pub fn write_jwt(&self, key: &JwtSigningKey) -> Result<(), AuthorityError> {
        let pem = Zeroizing::new(pem::encode(&pem::Pem::new(
            "PRIVATE KEY",
            key.pkcs8_der().to_vec(),
        )));
        write_private(&self.jwt_path(key.key_id()), pem.as_bytes())
    }

    /// Reads a JWT key from a PKCS#8 PEM file.
    pub fn read_jwt_file(path: &Path) -> Result<JwtSigningKey, AuthorityError> {
        let text = Zeroizing::new(fs::read_to_string(path).map_err(io(path))?);
        let der = pem::parse(text.as_bytes()).map_err(|_| AuthorityError::Invalid {
            path: path.to_owned(),
            message: "not a PEM private key".into(),
        })?;
        JwtSigningKey::from_pkcs8(der.contents()).map_err(|e| AuthorityError::Invalid {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Reads JWT key `kid`; its `kid` must match its file name.
    pub fn read_jwt(&self, kid: &str) -> Result<JwtSigningKey, AuthorityError> {
        let path = self.jwt_path(kid);
        let key = Self::read_jwt_file(&path)?;
        if key.key_id() != kid {
            return Err(AuthorityError::Invalid {
                path,
                message: format!("holds key {}, not {kid}", key.key_id()),
            });
        }
        Ok(key)
    }

    /// Deletes X.509 CA `id`'s files; a missing file is not an error.
    pub fn remove_x509(&self, id: &str) {
        let (cert, key) = self.x509_paths(id);
        remove(&key);
        remove(&cert);
    }

    /// Deletes JWT key `kid`'s file.
    pub fn remove_jwt(&self, kid: &str) {
        remove(&self.jwt_path(kid));
    }

    /// The single-CA layout of earlier versions: `x509-ca.crt.pem`,
    /// `x509-ca.key.pem`, `jwt.key.pem` directly under `ca/`.
    pub fn legacy_paths(&self) -> (PathBuf, PathBuf, PathBuf) {
        (
            self.root.join("x509-ca.crt.pem"),
            self.root.join("x509-ca.key.pem"),
            self.root.join("jwt.key.pem"),
        )
    }
}

/// Deletes a file, logging (not failing) when that is impossible: the slot
/// is already gone from the state file, so the key is no longer used.
pub fn remove(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot delete a retired authority file")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_rejects_path_like_ids() {
        let dir = tempfile::tempdir().unwrap();
        let files = AuthorityFiles::open(dir.path().join("ca")).unwrap();
        assert_eq!(files.read_state().unwrap(), None);
        let state = StateRecord {
            version: 1,
            x509: vec![SlotRecord {
                id: "ab01".into(),
                phase: Phase::Active,
                tainted: false,
                issued_at: Some(0),
                not_before: None,
                not_after: None,
            }],
            jwt: vec![SlotRecord {
                id: "Zx-_9".into(),
                phase: Phase::Old,
                tainted: true,
                issued_at: None,
                not_before: Some(1),
                not_after: Some(2),
            }],
        };
        files.write_state(&state).unwrap();
        assert_eq!(files.read_state().unwrap(), Some(state.clone()));
        let mode = fs::metadata(files.state_path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mut bad = state;
        bad.x509[0].id = "../../etc/passwd".into();
        files.write_state(&bad).unwrap();
        let err = files.read_state().unwrap_err().to_string();
        assert!(err.contains("authorities.json"), "{err}");
    }
}
