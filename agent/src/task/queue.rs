//! The durable queue of task ends not yet acknowledged by the server
//! (`<data_dir>/pending-task-ends.jsonl`, one JSON object a line).
//!
//! A task end is appended (and fsynced) before it is sent, and removed only after the server
//! acknowledged it, so that neither a server outage nor an agent restart loses a revocation.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use mayfly::proto::node as pb;
use serde::{Deserialize, Serialize};

/// The queue's file name in the data directory.
pub const FILE_NAME: &str = "pending-task-ends.jsonl";

/// A task end to report: what `ReportTaskEnd` carries for one task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskEnd {
    /// The task id given to `SignX509` / `MintJwt`.
    pub task_id: String,
    /// Serials (hex) of its X.509-SVIDs.
    pub x509_serials: Vec<String>,
    /// `jti`s of its JWT-SVIDs.
    pub jwt_ids: Vec<String>,
    /// `task_ended` or `task_completed`.
    pub reason: String,
    /// When the agent saw it end (Unix seconds).
    pub ended_at: i64,
}

impl TaskEnd {
    /// The node API form.
    pub fn to_proto(&self) -> pb::TaskEnd {
        pb::TaskEnd {
            task_id: self.task_id.clone(),
            x509_serials: self.x509_serials.clone(),
            jwt_ids: self.jwt_ids.clone(),
            reason: self.reason.clone(),
            ended_at: self.ended_at,
        }
    }
}

/// Why the queue could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// The file could not be read, written or synced.
    #[error("task end queue {path}: {source}")]
    Io {
        /// The queue file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// One queued task end with its position in the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queued {
    /// Its sequence number in this agent run (for [`TaskEndQueue::ack`]).
    pub seq: u64,
    /// The task end.
    pub end: TaskEnd,
}

#[derive(Debug, Default)]
struct Inner {
    next_seq: u64,
    items: Vec<Queued>,
}

/// The queue. All operations write through to the file before returning.
#[derive(Debug)]
pub struct TaskEndQueue {
    path: PathBuf,
    inner: Mutex<Inner>,
}

impl TaskEndQueue {
    /// Opens the queue in `data_dir`, loading what an earlier run left. A line that cannot be
    /// parsed (a write cut short by a crash) is skipped with a warning.
    pub fn open(data_dir: &Path) -> Result<Self, QueueError> {
        let path = data_dir.join(FILE_NAME);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(source) => return Err(QueueError::Io { path, source }),
        };
        let mut inner = Inner::default();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<TaskEnd>(line) {
                Ok(end) => {
                    inner.items.push(Queued {
                        seq: inner.next_seq,
                        end,
                    });
                    inner.next_seq += 1;
                }
                Err(e) => tracing::warn!(
                    path = %path.display(), line = n + 1, error = %e,
                    "skipping an unreadable line of the task end queue"
                ),
            }
        }
        Ok(Self {
            path,
            inner: Mutex::new(inner),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every change is completed before the guard is dropped; a panic cannot leave half.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn io(&self, source: std::io::Error) -> QueueError {
        QueueError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Appends `end` to the file and syncs it; only then is it queued.
    pub fn push(&self, end: TaskEnd) -> Result<(), QueueError> {
        let mut line = serde_json::to_vec(&end).map_err(|e| self.io(e.into()))?;
        line.push(b'\n');
        let mut inner = self.lock();
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| self.io(e))?;
        file.write_all(&line).map_err(|e| self.io(e))?;
        file.sync_all().map_err(|e| self.io(e))?;
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner.items.push(Queued { seq, end });
        Ok(())
    }

    /// What is waiting to be sent, oldest first.
    pub fn pending(&self) -> Vec<Queued> {
        self.lock().items.clone()
    }

    /// Removes the acknowledged entries (by sequence number) and rewrites the file
    /// (atomically: a synced temporary file renamed over it).
    pub fn ack(&self, seqs: &[u64]) -> Result<(), QueueError> {
        let mut inner = self.lock();
        // Forgotten in memory even if the rewrite below fails: they were delivered, and the
        // file's stale lines are at worst sent again after a restart (the server ignores what
        // it already revoked), instead of being resent in a loop now.
        inner.items.retain(|q| !seqs.contains(&q.seq));
        let mut text = Vec::new();
        for q in &inner.items {
            serde_json::to_writer(&mut text, &q.end).map_err(|e| self.io(e.into()))?;
            text.push(b'\n');
        }
        let tmp = self.path.with_extension("jsonl.tmp");
        let mut file = std::fs::File::create(&tmp).map_err(|e| self.io(e))?;
        file.write_all(&text).map_err(|e| self.io(e))?;
        file.sync_all().map_err(|e| self.io(e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| self.io(e))?;
        if let Some(dir) = self.path.parent()
            && let Ok(d) = std::fs::File::open(dir)
        {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(task: &str) -> TaskEnd {
        TaskEnd {
            task_id: task.into(),
            x509_serials: vec![format!("{task}-serial")],
            jwt_ids: vec![],
            reason: "task_ended".into(),
            ended_at: 1_800_000_000,
        }
    }

    #[test]
    fn written_entries_survive_a_reload_and_an_ack_removes_them() {
        let dir = tempfile::tempdir().unwrap();
        let q = TaskEndQueue::open(dir.path()).unwrap();
        assert!(q.pending().is_empty());
        q.push(end("unix:1:1")).unwrap();
        q.push(end("unix:2:2")).unwrap();
        q.push(end("unix:3:3")).unwrap();
        drop(q);

        // A restart: everything is still there, in order.
        let q = TaskEndQueue::open(dir.path()).unwrap();
        let pending = q.pending();
        let ids: Vec<&str> = pending.iter().map(|p| p.end.task_id.as_str()).collect();
        assert_eq!(ids, ["unix:1:1", "unix:2:2", "unix:3:3"]);
        assert_eq!(pending[0].end, end("unix:1:1"));

        q.ack(&[pending[0].seq, pending[2].seq]).unwrap();
        assert_eq!(q.pending().len(), 1);
        q.push(end("unix:4:4")).unwrap();
        drop(q);
        let q = TaskEndQueue::open(dir.path()).unwrap();
        let ids: Vec<String> = q.pending().into_iter().map(|p| p.end.task_id).collect();
        assert_eq!(ids, ["unix:2:2", "unix:4:4"]);
    }

    #[test]
    fn a_torn_last_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let line = serde_json::to_string(&end("unix:1:1")).unwrap();
        std::fs::write(
            dir.path().join(FILE_NAME),
            format!("{line}\n{{\"task_id\":\"unix:2"),
        )
        .unwrap();
        let q = TaskEndQueue::open(dir.path()).unwrap();
        assert_eq!(q.pending().len(), 1);
    }
}
