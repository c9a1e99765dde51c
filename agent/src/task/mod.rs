//! Tasks: one running instance of a workload, and the credentials issued to it.
//!
//! - [`id`] names a task (`unix:<pid>:<start_time>`, `k8s:<pod-uid>`);
//! - [`registry`] keeps the tasks seen, their credentials and their state;
//! - [`watch`] detects that a task ended ([`TaskWatcher`]; a pidfd for processes);
//! - [`pod_watch`] sees pods end in the kubelet's pod list ([`PodWatcher`]);
//! - [`queue`] keeps task ends on disk until the server acknowledged them;
//! - [`report`] sends them (`ReportTaskEnd`), retrying while the server is unreachable;
//! - [`service`] ties them together ([`Tasks`]) and serves `mayfly.task.v1.Task`.

pub mod id;
pub mod persist;
pub mod pod_watch;
pub mod queue;
pub mod registry;
pub mod report;
pub mod service;
pub mod watch;

pub use id::{TaskId, TaskKind};
pub use pod_watch::PodWatcher;
pub use queue::{TaskEnd, TaskEndQueue};
pub use registry::{TaskRegistry, TaskState};
pub use service::{TaskService, Tasks};
pub use watch::{PidfdWatcher, TaskWatcher, TaskWatchers};

/// Why a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The task is gone (its process exited, its pod was deleted or finished).
    Ended,
    /// The task said it is done (`Task/Complete`), possibly before its process exits.
    Completed,
}

impl EndReason {
    /// The reason as the node API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ended => "task_ended",
            Self::Completed => "task_completed",
        }
    }
}
