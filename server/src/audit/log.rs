//! The appender: numbers, chains and stores audit records, then copies
//! them to the JSON-lines file, all under one lock so that seq order, chain
//! order and file order are the same.

use std::path::Path;
use std::sync::{Arc, Mutex};

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
}

#[derive(Debug)]
struct Inner {
    head: AuditHead,
    file: Option<JsonlSink>,
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
            inner: Mutex::new(Inner { head, file }),
        })
    }

    /// Records `events` (in order) at `now`: durable in the store before
    /// this returns `Ok`. A store failure is returned and nothing is
    /// recorded; a file failure is logged (the store copy is kept).
    /// Blocking.
    pub fn append(
        &self,
        now: OffsetDateTime,
        events: Vec<AuditEvent>,
    ) -> ServiceResult<Vec<AuditRecord>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut prev = inner.head.clone();
        let records: Vec<AuditRecord> = events
            .into_iter()
            .map(|event| {
                let r = AuditRecord::new(prev.seq + 1, now, event, prev.hash.clone());
                prev = r.head();
                r
            })
            .collect();
        self.store.append_audit(&records).inspect_err(|e| {
            tracing::error!(error = %e, "cannot store audit records; the operation fails");
        })?;
        inner.head = prev;
        if let Some(sink) = inner.file.as_mut()
            && let Err(e) = sink.append(&records)
        {
            tracing::error!(path = %sink.path().display(), error = %e, "cannot append to the audit log file; the store keeps the records");
        }
        Ok(records)
    }

    /// The last record's seq and hash.
    pub fn head(&self) -> AuditHead {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .head
            .clone()
    }

    /// Runs `f` while no record can be appended (to verify a consistent
    /// snapshot of the store and file), with the current head.
    pub fn quiesced<R>(&self, f: impl FnOnce(&AuditHead) -> R) -> R {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&inner.head)
    }
}
