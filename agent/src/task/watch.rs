//! Task end detection.
//!
//! A [`TaskWatcher`] turns a task into a future that completes when the task ends. Processes
//! are watched with a pidfd ([`PidfdWatcher`]), pods through the kubelet
//! ([`super::PodWatcher`]); [`TaskWatchers`] combines them.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

use super::{TaskId, TaskKind};
use crate::workload::unix::process_start_time;

/// Completes when a task has ended.
pub type TaskEnded = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Detects the end of tasks. Defined here, implemented per kind of task, used as
/// `dyn TaskWatcher`.
pub trait TaskWatcher: Send + Sync + std::fmt::Debug {
    /// A future that completes when `task` ends; at once when it has already ended. Called
    /// right after the task was first attested, so that even a task that lives for
    /// milliseconds is seen to end. Tasks of a kind this watcher does not know never end.
    fn watch(&self, task: &TaskId) -> TaskEnded;

    /// Whether this watcher sees tasks of `kind` end. The agent creates tasks only of the
    /// kinds its watcher sees (a pod is a task only when pods are watched).
    fn watches(&self, kind: TaskKind) -> bool;
}

/// Several watchers, each for its kinds of task: a task is watched by the first that sees
/// its kind.
#[derive(Debug, Clone)]
pub struct TaskWatchers(Vec<Arc<dyn TaskWatcher>>);

impl TaskWatchers {
    /// The union of `watchers`.
    pub fn new(watchers: Vec<Arc<dyn TaskWatcher>>) -> Self {
        Self(watchers)
    }
}

impl TaskWatcher for TaskWatchers {
    fn watch(&self, task: &TaskId) -> TaskEnded {
        match self.0.iter().find(|w| w.watches(task.kind())) {
            Some(w) => w.watch(task),
            None => Box::pin(std::future::pending()),
        }
    }

    fn watches(&self, kind: TaskKind) -> bool {
        self.0.iter().any(|w| w.watches(kind))
    }
}

/// How often a process is polled when the kernel has no pidfd support.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Watches `unix:` tasks (processes) with a pidfd: it becomes readable when the process exits.
#[derive(Debug, Clone)]
pub struct PidfdWatcher {
    proc_root: PathBuf,
}

impl Default for PidfdWatcher {
    fn default() -> Self {
        Self::new()
    }
}

impl PidfdWatcher {
    /// A watcher reading `/proc`.
    pub fn new() -> Self {
        Self::with_proc_root("/proc")
    }

    /// A watcher reading another procfs mount (containers, tests).
    pub fn with_proc_root(root: impl Into<PathBuf>) -> Self {
        Self {
            proc_root: root.into(),
        }
    }

    fn same_process(&self, pid: i32, start: u64) -> bool {
        process_start_time(&self.proc_root, pid).is_ok_and(|s| s == start)
    }
}

impl TaskWatcher for PidfdWatcher {
    fn watch(&self, task: &TaskId) -> TaskEnded {
        let Some((pid, start)) = task.as_unix() else {
            return Box::pin(std::future::pending());
        };
        let Some(raw) = rustix::process::Pid::from_raw(pid) else {
            return Box::pin(std::future::ready(()));
        };
        let fd = match rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()) {
            Ok(fd) => Some(fd),
            // No such process: it has already exited.
            Err(rustix::io::Errno::SRCH) => return Box::pin(std::future::ready(())),
            Err(e) => {
                tracing::debug!(pid, error = %e, "no pidfd; polling the process instead");
                None
            }
        };
        // The pidfd names whatever process holds the pid now: it must still be the task's
        // (a process that exited and whose pid was reused is an ended task).
        if !self.same_process(pid, start) {
            return Box::pin(std::future::ready(()));
        }
        let fallback = {
            let this = self.clone();
            async move {
                while this.same_process(pid, start) {
                    tokio::time::sleep(POLL_INTERVAL).await;
                }
            }
        };
        let Some(fd) = fd else {
            return Box::pin(fallback);
        };
        // `with_interest` is deprecated because a borrowed-fd `T` could be closed under the
        // reactor; here `T` is the `OwnedFd` itself, moved in and never replaced, which is the
        // sound case. Its replacement (`register_with_interest`) is `unsafe`, which this
        // workspace forbids.
        #[allow(deprecated)]
        let registered = AsyncFd::with_interest(fd, Interest::READABLE);
        match registered {
            Ok(afd) => Box::pin(async move {
                // Readable means exited; an error means the fd cannot be watched, and the
                // process is polled instead.
                if afd.readable().await.is_err() {
                    fallback.await;
                }
            }),
            Err(e) => {
                tracing::debug!(pid, error = %e, "cannot register the pidfd; polling instead");
                Box::pin(fallback)
            }
        }
    }

    fn watches(&self, kind: TaskKind) -> bool {
        kind == TaskKind::Process
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_process_exit_is_seen_and_an_exited_process_has_ended() {
        let mut child = std::process::Command::new("sleep")
            .arg("0.3")
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let task = TaskId::of_process(std::path::Path::new("/proc"), pid).unwrap();
        let watcher = PidfdWatcher::new();
        let ended = watcher.watch(&task);
        let reaper = tokio::task::spawn_blocking(move || child.wait());
        tokio::time::timeout(Duration::from_secs(10), ended)
            .await
            .unwrap();
        reaper.await.unwrap().unwrap();
        // Watching it afterwards: ended at once.
        tokio::time::timeout(Duration::from_secs(1), watcher.watch(&task))
            .await
            .unwrap();
        // Our own process does not end.
        let me =
            TaskId::of_process(std::path::Path::new("/proc"), std::process::id() as i32).unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(200), watcher.watch(&me))
                .await
                .is_err()
        );
        // A recycled pid (another start time) is an ended task.
        let (pid, start) = me.as_unix().unwrap();
        tokio::time::timeout(
            Duration::from_secs(1),
            watcher.watch(&TaskId::unix(pid, start + 1)),
        )
        .await
        .unwrap();
    }
}
