//! The issuance committer: the records of issued credentials and the audit
//! records of their issuance, made durable for async callers in batches.
//!
//! An issuance is answered only once its issued-credential record (so that
//! it can be revoked) and its audit record are durable. Async handlers do
//! not wait for that on a thread of their own: they hand the records to one
//! committer thread and await its answer. The thread takes every job that
//! is waiting, writes all their records and audit events with one durable
//! write (one fsync), and answers each job. Jobs that arrive during a write
//! form the next batch, so the number of fsyncs per second stays bounded by
//! the disk while throughput grows with the number of callers. Each job's
//! guarantee is that of [`write()`]: `Ok` means the records and the audit
//! records are durable.

use std::sync::Arc;
use std::sync::mpsc;

use time::OffsetDateTime;
use tokio::sync::oneshot;

use mayfly::clock::Clock;

use crate::audit::{AuditEvent, AuditLog};
use crate::error::{ServiceError, ServiceResult};
use crate::store::{IssuedRecord, Store};

/// The most jobs written in one batch (bounds the time a batch holds the
/// audit log).
const MAX_BATCH: usize = 512;

struct Job {
    records: Vec<IssuedRecord>,
    events: Vec<AuditEvent>,
    done: oneshot::Sender<ServiceResult<()>>,
}

/// What the committer writes to.
#[derive(Debug)]
pub struct Sinks {
    /// Where issued-credential records go.
    pub store: Arc<dyn Store>,
    /// Where the audit records go (its flush covers the issued records).
    pub audit: Arc<AuditLog>,
    /// The time of the audit records.
    pub clock: Arc<dyn Clock>,
}

/// Commits issued-credential and audit records for async callers. Dropping
/// it waits for the thread to finish the batch in hand, so that the store
/// is released when its owner is.
#[derive(Debug)]
pub struct Committer {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Committer {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("records", &self.records.len())
            .field("events", &self.events.len())
            .finish()
    }
}

impl Committer {
    /// Starts the committer thread.
    pub fn start(sinks: Sinks) -> ServiceResult<Self> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name("issuance-commit".into())
            .spawn(move || run(&sinks, &rx))
            .map_err(|e| ServiceError::Internal(format!("cannot start the committer: {e}")))?;
        Ok(Self {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Records `records` and `events` durably; `Ok` once both are durable.
    /// An error means none of them is recorded.
    pub async fn commit(
        &self,
        records: Vec<IssuedRecord>,
        events: Vec<AuditEvent>,
    ) -> ServiceResult<()> {
        let (done, answer) = oneshot::channel();
        self.jobs
            .as_ref()
            .ok_or_else(stopped)?
            .send(Job {
                records,
                events,
                done,
            })
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

fn stopped() -> ServiceError {
    ServiceError::Unavailable("the server is shutting down".into())
}

/// Writes `records` and `events` with one durable write: the records are
/// written first, then the audit append's flush (which starts after they
/// are written) makes both durable. Blocking.
pub fn write(
    store: &dyn Store,
    audit: &AuditLog,
    now: OffsetDateTime,
    records: &[IssuedRecord],
    events: Vec<AuditEvent>,
) -> ServiceResult<()> {
    if events.is_empty() {
        // No audit append, so no flush to share.
        return Ok(store.put_issued(records)?);
    }
    store.put_issued_pending(records)?;
    audit.append(now, events).map(drop)
}

fn run(sinks: &Sinks, rx: &mpsc::Receiver<Job>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let mut records = Vec::with_capacity(batch.len());
        let mut events = Vec::with_capacity(batch.len());
        let mut waiting = Vec::with_capacity(batch.len());
        for job in batch {
            records.extend(job.records);
            events.extend(job.events);
            waiting.push(job.done);
        }
        let result = write(
            sinks.store.as_ref(),
            &sinks.audit,
            sinks.clock.now(),
            &records,
            events,
        );
        if let Err(e) = &result {
            tracing::error!(error = %e, records = records.len(), "cannot record issued credentials; their issuance fails");
        }
        for done in waiting {
            // A caller that went away no longer needs the answer.
            let _ = done.send(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(ServiceError::Internal(format!(
                    "cannot record the issued credential: {e}"
                ))),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{Actor, ActorKind};
    use crate::store::sled_store::SledStore;
    use mayfly::clock::SystemClock;
    use mayfly::revocation::CredentialId;

    fn record(i: usize) -> (IssuedRecord, AuditEvent) {
        let serial = format!("{i:04x}");
        let event = AuditEvent::ok(
            Actor::new(
                ActorKind::Agent,
                "spiffe://example.org/mayfly/agent/x",
                "mtls",
            ),
            "x509.issue",
        )
        .detail("serial", serial.clone());
        let record = IssuedRecord {
            id: CredentialId::Serial(serial),
            spiffe_id: "spiffe://example.org/w".into(),
            agent_id: None,
            entry_id: None,
            task_id: None,
            authority_id: "ca".into(),
            expires_at: OffsetDateTime::now_utc() + time::Duration::hours(1),
        };
        (record, event)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_commits_are_each_recorded_and_audited() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).unwrap());
        let audit = Arc::new(AuditLog::open(Arc::clone(&store), None).unwrap());
        let committer = Arc::new(
            Committer::start(Sinks {
                store: Arc::clone(&store),
                audit: Arc::clone(&audit),
                clock: Arc::new(SystemClock),
            })
            .unwrap(),
        );
        let calls: Vec<_> = (0..64)
            .map(|i| {
                let c = Arc::clone(&committer);
                tokio::spawn(async move {
                    let (r, e) = record(i);
                    c.commit(vec![r], vec![e]).await
                })
            })
            .collect();
        for call in calls {
            call.await.unwrap().unwrap();
        }
        assert_eq!(store.list_issued().unwrap().len(), 64);
        let audited = store.list_audit(0, 100).unwrap();
        assert_eq!(audited.len(), 64);
        // Every commit's audit record names its own credential, once.
        let mut serials: Vec<String> = audited
            .iter()
            .map(|r| r.event.details["serial"].as_str().unwrap().to_owned())
            .collect();
        serials.sort();
        serials.dedup();
        assert_eq!(serials.len(), 64);
        assert_eq!(audit.head().seq, 64);
    }
}
