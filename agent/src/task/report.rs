//! Sends queued task ends to the server (`ReportTaskEnd`), in batches, removing each from the
//! queue only once the server acknowledged it, and retrying with backoff while it cannot.

use std::sync::Arc;

use mayfly::proto::node as pb;
use tokio::sync::{Notify, watch};

use super::queue::TaskEndQueue;
use crate::client::{ClientError, ServerClient};
use crate::sync::{BACKOFF_MAX, BACKOFF_MIN, Backoff, stop_requested};

/// Task ends per `ReportTaskEnd` call.
pub const REPORT_BATCH: usize = 100;

/// Where task ends go: the server's `ReportTaskEnd`. Defined here, implemented by
/// [`ServerClient`].
#[tonic::async_trait]
pub trait TaskEndSink: Send + Sync {
    /// Reports `tasks`; `Ok` means the server recorded them (the number newly revoked).
    async fn report_task_ends(&self, tasks: Vec<pb::TaskEnd>) -> Result<u32, ClientError>;
}

#[tonic::async_trait]
impl TaskEndSink for ServerClient {
    async fn report_task_ends(&self, tasks: Vec<pb::TaskEnd>) -> Result<u32, ClientError> {
        self.report_task_end(tasks).await
    }
}

/// Runs until `shutdown`: sends whatever the queue holds (at start too: what an earlier run
/// left), then waits for `wake`.
pub async fn run_reporter(
    queue: Arc<TaskEndQueue>,
    sink: Arc<dyn TaskEndSink>,
    wake: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    loop {
        let pending = queue.pending();
        if pending.is_empty() {
            tokio::select! {
                () = stop_requested(&mut shutdown) => return,
                () = wake.notified() => continue,
            }
        }
        for chunk in pending.chunks(REPORT_BATCH) {
            let tasks: Vec<pb::TaskEnd> = chunk.iter().map(|q| q.end.to_proto()).collect();
            let result = tokio::select! {
                () = stop_requested(&mut shutdown) => return,
                r = sink.report_task_ends(tasks) => r,
            };
            match result {
                Ok(revoked) => {
                    backoff.reset();
                    let seqs: Vec<u64> = chunk.iter().map(|q| q.seq).collect();
                    if let Err(e) = queue.ack(&seqs) {
                        // Sent again later; the server ignores what it already revoked.
                        tracing::error!(error = %e, "cannot remove reported task ends from the queue");
                    }
                    for q in chunk {
                        tracing::info!(
                            task_id = %q.end.task_id,
                            reason = %q.end.reason,
                            x509_serials = ?q.end.x509_serials,
                            jwt_ids = ?q.end.jwt_ids,
                            "task end reported to the server"
                        );
                    }
                    tracing::debug!(tasks = chunk.len(), revoked, "ReportTaskEnd acknowledged");
                }
                Err(e) => {
                    let delay = backoff.next_delay(rand::random());
                    tracing::warn!(
                        error = %e, pending = pending.len(), retry_in = ?delay,
                        "cannot report task ends to the server; they stay queued"
                    );
                    tokio::select! {
                        () = stop_requested(&mut shutdown) => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                    break;
                }
            }
        }
    }
}
