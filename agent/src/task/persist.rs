//! What live tasks were issued, kept in `<data_dir>/live-tasks.json` so that an agent restart
//! does not forget credentials it must revoke when their tasks end.
//!
//! Written in the background shortly after a change (never on a workload's request path),
//! atomically (a synced temporary file renamed over the old one). At start the agent reloads
//! it: a task whose process still runs is watched again; one that ended while the agent was
//! down is reported as ended. The window between an issuance and the next write (about
//! [`WRITE_DELAY`]) is not covered.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::registry::Issued;

/// The file's name in the data directory.
pub const FILE_NAME: &str = "live-tasks.json";

/// How long after a change the file is written (changes in between are written together).
pub const WRITE_DELAY: Duration = Duration::from_millis(200);

/// The file of `data_dir`.
pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(FILE_NAME)
}

/// Reads the file; a missing file is an empty list, an unreadable one too (with a warning).
pub fn load(path: &Path) -> Vec<Issued> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot read the live task list");
            return Vec::new();
        }
    };
    serde_json::from_slice(&text).unwrap_or_else(|e| {
        tracing::warn!(path = %path.display(), error = %e, "ignoring an unreadable live task list");
        Vec::new()
    })
}

/// Replaces the file with `issued`.
pub fn save(path: &Path, issued: &[Issued]) -> std::io::Result<()> {
    let text = serde_json::to_vec(issued)?;
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&text)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing_or_broken_files_are_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = path(dir.path());
        assert!(load(&p).is_empty());
        let issued = vec![Issued {
            task_id: "unix:1:2".into(),
            x509_serials: vec!["ab".into()],
            jwt_ids: vec!["j".into()],
        }];
        save(&p, &issued).unwrap();
        assert_eq!(load(&p), issued);
        std::fs::write(&p, b"{not json").unwrap();
        assert!(load(&p).is_empty());
    }
}
