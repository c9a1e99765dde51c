//! The issuance journal: an append-only file that makes issued-credential
//! and audit records durable with one `fdatasync` per batch.
//!
//! Issuance is the hot path: every SVID is recorded (so that it can be
//! revoked) and audited before it is returned. sled makes a write durable
//! by flushing its whole log, which costs many small synced writes and a
//! hop to its I/O threads. Those two kinds of records go instead to sled
//! *without* a flush, and then, as one JSON line, to this journal, which
//! is synced (group-committed: concurrent writers share a sync). A crash
//! can lose sled's unflushed tail, never a journaled line: at start the
//! journal is replayed into sled (idempotently: issued records by id,
//! audit records by seq), sled is flushed and the journal emptied. While
//! running, the journal is emptied the same way once it passes a size.
//!
//! Lines are written in order by one writer at a time; a line is
//! acknowledged only after a sync that started after it was written, so a
//! torn last line (a crash during the write) was never acknowledged and is
//! dropped. A damaged line before the last is corruption and an error.

use std::fs::{File, OpenOptions};
use std::io::{BufRead as _, BufReader, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Deserialize;

use super::group_flush::GroupFlush;
use super::{IssuedRecord, StoreError};
use crate::audit::record::AuditRecord;

/// The journal's file name, inside the store's directory.
pub const FILE_NAME: &str = "mayfly-issuance.journal";

/// Past this size the journal is emptied (after a store flush).
const CHECKPOINT_BYTES: u64 = 32 * 1024 * 1024;

/// One line of the journal, as read.
#[derive(Debug, Default, Deserialize)]
pub struct Line {
    /// Issued credentials.
    #[serde(default)]
    pub issued: Vec<IssuedRecord>,
    /// Audit records (consecutive seqs).
    #[serde(default)]
    pub audit: Vec<AuditRecord>,
}

/// One line of the journal, to write: the records as the JSON the store
/// already encoded them to (each one a JSON object).
#[derive(Debug, Default)]
pub struct LineRef<'a> {
    /// Issued credentials.
    pub issued: &'a [Vec<u8>],
    /// Audit records (consecutive seqs).
    pub audit: &'a [Vec<u8>],
}

impl LineRef<'_> {
    /// `{"issued":[..],"audit":[..]}` and a newline: the shape [`Line`]
    /// reads.
    fn to_bytes(&self) -> Vec<u8> {
        let len: usize = self
            .issued
            .iter()
            .chain(self.audit)
            .map(|v| v.len() + 1)
            .sum();
        let mut out = Vec::with_capacity(len + 32);
        out.extend_from_slice(b"{\"issued\":[");
        push_joined(&mut out, self.issued);
        out.extend_from_slice(b"],\"audit\":[");
        push_joined(&mut out, self.audit);
        out.extend_from_slice(b"]}\n");
        out
    }
}

fn push_joined(out: &mut Vec<u8>, values: &[Vec<u8>]) {
    for (i, v) in values.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(v);
    }
}

/// The open journal.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    /// The appending handle and the file's size.
    file: Mutex<(File, u64)>,
    /// A second handle for syncs, so that a sync does not hold the lock.
    sync: File,
    syncs: GroupFlush,
}

fn io(path: &Path, what: &str, e: std::io::Error) -> StoreError {
    StoreError::Backend(format!("issuance journal {}: {what}: {e}", path.display()))
}

impl Journal {
    /// Opens the journal in `dir` and returns it with the lines to replay
    /// (every complete line; a torn last line is cut off).
    pub fn open(dir: &Path) -> Result<(Self, Vec<Line>), StoreError> {
        let path = dir.join(FILE_NAME);
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io(&path, "open", e))?;
        let mut lines = Vec::new();
        let mut good = 0u64;
        {
            let mut reader = BufReader::new(&file);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                let n = reader
                    .read_until(b'\n', &mut buf)
                    .map_err(|e| io(&path, "read", e))?;
                if n == 0 {
                    break;
                }
                let complete = buf.last() == Some(&b'\n');
                match serde_json::from_slice::<Line>(&buf) {
                    Ok(line) if complete => {
                        lines.push(line);
                        good += n as u64;
                    }
                    Ok(_) | Err(_) => {
                        // Only the last line may be torn.
                        let mut rest = Vec::new();
                        std::io::Read::read_to_end(&mut reader, &mut rest)
                            .map_err(|e| io(&path, "read", e))?;
                        if !rest.is_empty() {
                            return Err(StoreError::Corrupt {
                                kind: "issuance journal",
                                key: format!("byte {good}"),
                                reason: "a damaged line is followed by more lines".into(),
                            });
                        }
                        tracing::warn!(path = %path.display(), "cutting a torn last line off the issuance journal");
                        break;
                    }
                }
            }
        }
        file.set_len(good).map_err(|e| io(&path, "truncate", e))?;
        let sync = file.try_clone().map_err(|e| io(&path, "open", e))?;
        Ok((
            Self {
                path,
                file: Mutex::new((file, good)),
                sync,
                syncs: GroupFlush::default(),
            },
            lines,
        ))
    }

    /// Appends `line` without syncing; returns the journal's size after it.
    pub fn write(&self, line: &LineRef<'_>) -> Result<u64, StoreError> {
        let bytes = line.to_bytes();
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let (file, size) = &mut *guard;
        if let Err(e) = file.write_all(&bytes) {
            // A partial line would make every later line unreadable: cut it.
            let _ = file.set_len(*size);
            return Err(io(&self.path, "write", e));
        }
        *size += bytes.len() as u64;
        Ok(*size)
    }

    /// Returns once every line written before this call is on disk.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.syncs
            .durable(|| self.sync.sync_data().map_err(|e| io(&self.path, "sync", e)))
    }

    /// Empties the journal once `flush` (which makes every record written
    /// to the store so far durable there) has succeeded. Lines are not
    /// written meanwhile.
    pub fn checkpoint(
        &self,
        flush: impl FnOnce() -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut guard = self.file.lock().unwrap_or_else(|p| p.into_inner());
        flush()?;
        let (file, size) = &mut *guard;
        file.set_len(0).map_err(|e| io(&self.path, "truncate", e))?;
        file.sync_data().map_err(|e| io(&self.path, "sync", e))?;
        *size = 0;
        Ok(())
    }

    /// Whether the journal has grown past the size that calls for a
    /// checkpoint.
    pub fn wants_checkpoint(size: u64) -> bool {
        size >= CHECKPOINT_BYTES
    }
}
