//! The JSON-lines copy of the audit log: one record per line, appended in
//! seq order, for shipping to a SIEM (`tail -F`, a log shipper).
//!
//! Lines are written (not fsynced) after the store's durable write; the
//! store is the reference. At start the file is repaired: a torn last line
//! is cut off and the records the store has beyond the file's last line are
//! appended, so that a crash between the two writes leaves no hole.

use std::fs::{File, OpenOptions};
use std::io::{BufRead as _, BufReader, Seek as _, SeekFrom, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};

use super::record::AuditRecord;

/// An open JSON-lines audit file.
#[derive(Debug)]
pub struct JsonlSink {
    path: PathBuf,
    file: File,
}

/// Every line of the file at `path` (for verification). A missing file has
/// no lines.
pub fn read_lines(path: &Path) -> std::io::Result<Vec<String>> {
    match File::open(path) {
        Ok(f) => BufReader::new(f).lines().collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

impl JsonlSink {
    /// Opens (or creates, mode 0600) the file for appending, cuts off a
    /// torn last line, and returns it with the seq of its last record (0
    /// when empty).
    pub fn open(path: &Path) -> std::io::Result<(Self, u64)> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(path)?;
        let mut last_seq = 0;
        let mut good_len = 0u64;
        {
            let mut reader = BufReader::new(&file);
            let mut line = String::new();
            let mut offset = 0u64;
            loop {
                line.clear();
                let n = reader.read_line(&mut line)?;
                if n == 0 {
                    break;
                }
                offset += n as u64;
                if !line.ends_with('\n') {
                    break; // torn: written partly before a crash
                }
                if let Ok(r) = serde_json::from_str::<AuditRecord>(&line) {
                    last_seq = r.seq;
                }
                good_len = offset;
            }
        }
        if file.seek(SeekFrom::End(0))? != good_len {
            tracing::warn!(path = %path.display(), "cutting a torn last line off the audit log file");
            file.set_len(good_len)?;
        }
        Ok((
            Self {
                path: path.to_owned(),
                file,
            },
            last_seq,
        ))
    }

    /// Appends one line per record.
    pub fn append(&mut self, records: &[AuditRecord]) -> std::io::Result<()> {
        let mut buf = Vec::with_capacity(records.len() * 512);
        for r in records {
            serde_json::to_writer(&mut buf, r)?;
            buf.push(b'\n');
        }
        self.file.write_all(&buf)?;
        self.file.flush()
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}
