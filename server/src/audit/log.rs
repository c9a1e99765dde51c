//! The appender: numbers, chains and stores audit records, then copies
//! them to the JSON-lines file, so that seq order, chain order and file
//! order are the same.
//!
//! Group commit: concurrent appends are batched. The first caller to find
//! no write in progress becomes the leader: it takes every queued event,
//! chains them, stores them with one durable write, appends them to the
//! file, and wakes the callers whose events were in the batch; events that
//! arrived meanwhile form the next batch. Only the leader touches the head
//! and the file, one batch at a time.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use time::OffsetDateTime;

use super::jsonl::JsonlSink;
use super::record::{AuditEvent, AuditHead, AuditRecord};
use crate::error::{ServiceError, ServiceResult};
use crate::store::Store;

/// How many records are copied from the store to the file per page when
/// the file is behind at start.
const CATCH_UP_PAGE: usize = 1000;

/// The server's audit log (see `docs/audit.md`).
#[derive(Debug)]
pub struct AuditLog {
    store: Arc<dyn Store>,
    inner: Mutex<Inner>,
    done: Condvar,
}

#[derive(Debug)]
struct Inner {
    head: AuditHead,
    file: Option<JsonlSink>,
    /// Events waiting for the next batch: (ticket, time, event).
    queue: Vec<(u64, OffsetDateTime, AuditEvent)>,
    next_ticket: u64,
    /// Every ticket below this has been written (or failed).
    finished_below: u64,
    /// Results of finished tickets, taken by their callers.
    results: HashMap<u64, Result<AuditRecord, String>>,
    /// A leader is writing a batch.
    writing: bool,
}

impl AuditLog {
    /// Continues the chain from the store's head; with `file`, opens the
    /// JSON-lines copy and appends the records it is missing. Blocking.
    pub fn open(store: Arc<dyn Store>, file: Option<&Path>) -> ServiceResult<Self> {
        let head = store.audit_head()?.unwrap_or_else(AuditHead::empty);
        let file = match file {
            None => None,
            Some(path) => {
                let io = |e: std::io::Error| {
                    ServiceError::Internal(format!(
                        "cannot open the audit log file {}: {e} (set audit_log_path, or \"\" to keep the log in the store only)",
                        path.display()
                    ))
                };
                let (mut sink, mut last) = JsonlSink::open(path).map_err(io)?;
                while last < head.seq {
                    let page = store.list_audit(last, CATCH_UP_PAGE)?;
                    let Some(end) = page.last().map(|r| r.seq) else {
                        break;
                    };
                    sink.append(&page).map_err(io)?;
                    last = end;
                }
                Some(sink)
            }
        };
        Ok(Self {
            store,
            inner: Mutex::new(Inner {
                head,
                file,
                queue: Vec::new(),
                next_ticket: 0,
                finished_below: 0,
                results: HashMap::new(),
                writing: false,
            }),
            done: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `events` (in order, consecutive) at `now`: durable in the
    /// store before this returns `Ok`. A store failure is returned and
    /// none of the batch is recorded; a file failure is logged (the store
    /// copy is kept). Blocking.
    pub fn append(
        &self,
        now: OffsetDateTime,
        events: Vec<AuditEvent>,
    ) -> ServiceResult<Vec<AuditRecord>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut inner = self.lock();
        let first = inner.next_ticket;
        for event in events {
            let ticket = inner.next_ticket;
            inner.queue.push((ticket, now, event));
            inner.next_ticket += 1;
        }
        let end = inner.next_ticket;
        while inner.finished_below < end {
            if inner.writing {
                inner = self.done.wait(inner).unwrap_or_else(|p| p.into_inner());
            } else {
                inner = self.write_batch(inner);
            }
        }
        let mut out = Vec::with_capacity(usize::try_from(end - first).unwrap_or(0));
        let mut error = None;
        for ticket in first..end {
            match inner.results.remove(&ticket) {
                Some(Ok(r)) => out.push(r),
                Some(Err(e)) => error = Some(e),
                None => error = Some("audit record lost".to_owned()),
            }
        }
        match error {
            None => Ok(out),
            Some(e) => Err(ServiceError::Internal(format!(
                "cannot store the audit record: {e}"
            ))),
        }
    }

    /// Writes every queued event as one batch, as the leader; the lock is
    /// released during the store and file writes.
    fn write_batch<'a>(&'a self, mut inner: MutexGuard<'a, Inner>) -> MutexGuard<'a, Inner> {
        inner.writing = true;
        let batch = std::mem::take(&mut inner.queue);
        let mut file = inner.file.take();
        let mut prev = inner.head.clone();
        drop(inner);

        let tickets: Vec<u64> = batch.iter().map(|(t, _, _)| *t).collect();
        let records: Vec<AuditRecord> = batch
            .into_iter()
            .map(|(_, time, event)| {
                let r = AuditRecord::new(prev.seq + 1, time, event, prev.hash.clone());
                prev = r.head();
                r
            })
            .collect();
        let stored = self.store.append_audit(&records);
        if let Err(e) = &stored {
            tracing::error!(error = %e, "cannot store audit records; the audited operations fail");
        } else if let Some(sink) = file.as_mut()
            && let Err(e) = sink.append(&records)
        {
            tracing::error!(path = %sink.path().display(), error = %e, "cannot append to the audit log file; the store keeps the records");
        }

        let mut inner = self.lock();
        inner.file = file;
        match stored {
            Ok(()) => {
                inner.head = prev;
                for (t, r) in tickets.iter().zip(records) {
                    inner.results.insert(*t, Ok(r));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for t in &tickets {
                    inner.results.insert(*t, Err(msg.clone()));
                }
            }
        }
        if let Some(last) = tickets.last() {
            inner.finished_below = inner.finished_below.max(last + 1);
        }
        inner.writing = false;
        self.done.notify_all();
        inner
    }

    /// The last record's seq and hash.
    pub fn head(&self) -> AuditHead {
        self.lock().head.clone()
    }

    /// Runs `f` while no record is being written or can be appended (to
    /// verify a consistent snapshot of the store and file), with the head.
    pub fn quiesced<R>(&self, f: impl FnOnce(&AuditHead) -> R) -> R {
        let mut inner = self.lock();
        while inner.writing {
            inner = self.done.wait(inner).unwrap_or_else(|p| p.into_inner());
        }
        f(&inner.head)
    }
}
