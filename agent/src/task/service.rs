//! [`Tasks`]: the agent's task machinery in one place — registering tasks and watching them,
//! issuing task-scoped X.509-SVIDs, ending tasks (dropping their credentials, queueing the
//! report) — and [`TaskService`], the `mayfly.task.v1.Task` gRPC service on the Workload API
//! socket.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mayfly::clock::Clock;
use mayfly::entry::Entry;
use mayfly::proto::node as pb;
use mayfly::proto::task::task_server::{Task, TaskServer};
use mayfly::proto::task::{CompleteRequest, CompleteResponse};
use mayfly::x509::KeyAndCsr;
use time::OffsetDateTime;
use tokio::sync::{Notify, watch};
use tonic::{Request, Response, Status};

use super::persist;
use super::queue::{QueueError, TaskEnd, TaskEndQueue};
use super::registry::Issued;
use super::report::{TaskEndSink, run_reporter};
use super::watch::TaskWatcher;
use super::{EndReason, TaskId, TaskKind, TaskState};
use crate::cache::{Cache, CachedSvid};
use crate::client::{ClientError, ServerClient};
use crate::sync::{cached_svid, stop_requested, svid_renew_at};
use crate::workload::{PeerInfo, cgroup};

/// Signs task-scoped X.509-SVIDs (`SignX509` with `task_id`). Defined here, implemented by
/// [`ServerClient`].
#[tonic::async_trait]
pub trait TaskSigner: Send + Sync {
    /// Signs `items`; the results echo each item's entry and task.
    async fn sign_x509(
        &self,
        items: Vec<pb::X509SignItem>,
    ) -> Result<Vec<pb::X509SignResult>, ClientError>;
}

#[tonic::async_trait]
impl TaskSigner for ServerClient {
    async fn sign_x509(
        &self,
        items: Vec<pb::X509SignItem>,
    ) -> Result<Vec<pb::X509SignResult>, ClientError> {
        ServerClient::sign_x509(self, items).await
    }
}

/// The longest wait between two looks at task SVID renewals.
const RENEW_CHECK_MAX: std::time::Duration = std::time::Duration::from_secs(30);
/// Wait after a failed renewal.
const RENEW_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// The agent's tasks: shared by the Workload API, the task service and the background jobs
/// ([`Tasks::run`]).
pub struct Tasks {
    cache: Cache,
    watcher: Arc<dyn TaskWatcher>,
    signer: Arc<dyn TaskSigner>,
    sink: Arc<dyn TaskEndSink>,
    queue: Arc<TaskEndQueue>,
    wake: Arc<Notify>,
    clock: Arc<dyn Clock>,
    proc_root: PathBuf,
    /// Turns true when [`Tasks::run`] stops: task watchers stop with it.
    closed: watch::Sender<bool>,
    /// Where live tasks' credentials are kept across restarts ([`super::persist`]).
    live_path: PathBuf,
    /// Tasks of the previous run taken back by [`Tasks::new`], to be watched by [`Tasks::run`].
    restored: std::sync::Mutex<Vec<TaskId>>,
}

impl std::fmt::Debug for Tasks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tasks")
            .field("watcher", &self.watcher)
            .field("proc_root", &self.proc_root)
            .finish_non_exhaustive()
    }
}

impl Tasks {
    /// Task machinery publishing into `cache`, watching tasks with `watcher`, signing and
    /// reporting through `client` (usually the [`ServerClient`]), keeping its queue of task
    /// ends and its list of live tasks in `data_dir`.
    pub fn new<C>(
        cache: Cache,
        watcher: Arc<dyn TaskWatcher>,
        client: Arc<C>,
        data_dir: &Path,
        clock: Arc<dyn Clock>,
    ) -> Result<Arc<Self>, QueueError>
    where
        C: TaskSigner + TaskEndSink + 'static,
    {
        let queue = TaskEndQueue::open(data_dir)?;
        let live_path = persist::path(data_dir);
        let restored = restore(&cache, &live_path);
        Ok(Arc::new(Self {
            cache,
            watcher,
            signer: client.clone(),
            sink: client,
            queue: Arc::new(queue),
            wake: Arc::new(Notify::new()),
            clock,
            proc_root: PathBuf::from("/proc"),
            closed: watch::channel(false).0,
            live_path,
            restored: std::sync::Mutex::new(restored),
        }))
    }

    /// Runs the background jobs until `shutdown`: reporting task ends (starting with what an
    /// earlier run queued) and renewing task SVIDs at half life.
    pub async fn run(self: Arc<Self>, shutdown: watch::Receiver<bool>) {
        let restored = std::mem::take(
            &mut *self
                .restored
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        for task in &restored {
            self.watch(task);
        }
        let reporter = run_reporter(
            Arc::clone(&self.queue),
            Arc::clone(&self.sink),
            Arc::clone(&self.wake),
            shutdown.clone(),
        );
        tokio::join!(
            reporter,
            self.renew_loop(shutdown.clone()),
            self.persist_loop(shutdown)
        );
        self.closed.send_replace(true);
    }

    /// Keeps the live task list on disk, written shortly after each change and at the end.
    async fn persist_loop(&self, mut shutdown: watch::Receiver<bool>) {
        let mut rx = self.cache.subscribe();
        let mut last: Option<Vec<Issued>> = None;
        loop {
            let stopping = tokio::select! {
                () = stop_requested(&mut shutdown) => true,
                changed = rx.changed() => changed.is_err(),
            };
            if !stopping {
                tokio::select! {
                    () = stop_requested(&mut shutdown) => {}
                    () = tokio::time::sleep(persist::WRITE_DELAY) => {}
                }
            }
            let issued = rx.borrow_and_update().tasks.issued();
            if last.as_ref() != Some(&issued) {
                let path = self.live_path.clone();
                let list = issued.clone();
                match tokio::task::spawn_blocking(move || persist::save(&path, &list)).await {
                    Ok(Ok(())) => last = Some(issued),
                    Ok(Err(e)) => {
                        tracing::warn!(path = %self.live_path.display(), error = %e, "cannot write the live task list")
                    }
                    Err(e) => tracing::warn!(error = %e, "writing the live task list failed"),
                }
            }
            if stopping || *shutdown.borrow() {
                return;
            }
        }
    }

    /// The task of the caller `peer` (its pid and the start time read when it connected).
    pub fn task_of(&self, peer: &PeerInfo) -> Option<TaskId> {
        self.task_of_process(peer.pid, peer.start_time)
    }

    /// The task of process `pid` (that started at `start`, when known): its pod
    /// (`k8s:<pod-uid>`) when pods are watched and its cgroup names a pod container, else
    /// the process itself. `None` when the process is gone or its pid was reused.
    fn task_of_process(&self, pid: i32, start: Option<u64>) -> Option<TaskId> {
        if self.watcher.watches(TaskKind::Pod) {
            let facts = cgroup::read_process(&self.proc_root, pid, start).ok()?;
            if let Some((pod_uid, _)) = facts.pod_container() {
                return TaskId::pod(pod_uid).ok();
            }
        }
        match start {
            Some(start) => Some(TaskId::unix(pid, start)),
            None => TaskId::of_process(&self.proc_root, pid).ok(),
        }
    }

    /// Registers `task` when it is new and starts watching it; returns its state.
    pub fn observe(self: &Arc<Self>, task: &TaskId) -> TaskState {
        if let Some(state) = self.cache.current().tasks.state(task) {
            return state;
        }
        let mut new = false;
        self.cache.update(|s| new = s.tasks.observe(task));
        if new {
            tracing::debug!(task_id = %task, "new task");
            self.watch(task);
        }
        self.cache
            .current()
            .tasks
            .state(task)
            .unwrap_or(TaskState::Live)
    }

    fn watch(self: &Arc<Self>, task: &TaskId) {
        let ended = self.watcher.watch(task);
        let this = Arc::clone(self);
        let task = task.clone();
        let mut closed = self.closed.subscribe();
        tokio::spawn(async move {
            tokio::select! {
                () = ended => {
                    this.end(&task, EndReason::Ended);
                }
                // The agent is stopping: the next run watches the task again (from the live
                // task list).
                () = stop_requested(&mut closed) => {}
            }
        });
    }

    /// Ends `task`: drops its credentials (its streams see it at once), queues the report on
    /// disk, and wakes the reporter. Returns what was revoked.
    pub fn end(&self, task: &TaskId, reason: EndReason) -> Option<TaskEnd> {
        let now = self.clock.now();
        let mut end = None;
        self.cache.update(|s| end = s.tasks.end(task, reason, now));
        let end = end?;
        tracing::info!(
            task_id = %task,
            reason = reason.as_str(),
            x509_serials = ?end.x509_serials,
            jwt_ids = ?end.jwt_ids,
            "task ended"
        );
        if !end.x509_serials.is_empty() || !end.jwt_ids.is_empty() {
            if let Err(e) = self.queue.push(end.clone()) {
                tracing::error!(task_id = %task, error = %e, "cannot queue the task end on disk; reporting it from memory only");
            }
            self.wake.notify_one();
        }
        Some(end)
    }

    /// Makes sure the live `task` holds an X.509-SVID for each of `entries` (task-scoped
    /// ones): the missing ones are signed now, in one `SignX509` call.
    pub async fn ensure_svids(&self, task: &TaskId, entries: &[&Entry]) -> Result<(), Status> {
        let snap = self.cache.current();
        let now = self.clock.now();
        let tainted: &[Vec<u8>] = snap
            .bundle
            .as_ref()
            .map_or(&[], |b| b.tainted_x509_authorities.as_slice());
        let missing: Vec<Entry> = entries
            .iter()
            .filter(|e| {
                snap.tasks.svid(task, &e.id).is_none_or(|s| {
                    s.spiffe_id != e.spiffe_id
                        || s.expires_at <= now
                        || signed_by_tainted(s, tainted)
                })
            })
            .map(|e| (*e).clone())
            .collect();
        drop(snap);
        if missing.is_empty() {
            return Ok(());
        }
        let signed = self.sign(task, &missing).await.map_err(|e| {
            tracing::warn!(task_id = %task, error = %e, "cannot get task X.509-SVIDs");
            Status::from(e)
        })?;
        self.cache.update(|s| {
            for svid in signed {
                s.tasks.insert_svid(task, svid);
            }
        });
        Ok(())
    }

    async fn sign(
        &self,
        task: &TaskId,
        entries: &[Entry],
    ) -> Result<Vec<Arc<CachedSvid>>, ClientError> {
        let count = entries.len();
        let keys = tokio::task::spawn_blocking(move || {
            (0..count)
                .map(|_| mayfly::x509::new_key_and_csr())
                .collect::<Result<Vec<KeyAndCsr>, _>>()
        })
        .await
        .map_err(|e| ClientError::Key(e.to_string()))?
        .map_err(|e| ClientError::Key(e.to_string()))?;
        let items = entries
            .iter()
            .zip(&keys)
            .map(|(e, k)| pb::X509SignItem {
                entry_id: e.id.to_string(),
                csr: k.csr_der.clone(),
                task_id: task.to_string(),
            })
            .collect();
        let results = self.signer.sign_x509(items).await?;
        let now = self.clock.now();
        let mut keys: Vec<Option<KeyAndCsr>> = keys.into_iter().map(Some).collect();
        let mut out = Vec::new();
        for r in results {
            let Some(i) = entries.iter().position(|e| e.id.as_str() == r.entry_id) else {
                tracing::warn!(entry_id = %r.entry_id, "SignX509 answered for an entry that was not asked for");
                continue;
            };
            let Some(key) = keys.get_mut(i).and_then(Option::take) else {
                continue;
            };
            match cached_svid(&entries[i], r.svid_chain, key, now) {
                Ok(svid) => {
                    tracing::debug!(task_id = %task, entry_id = %r.entry_id, expires_at = %svid.expires_at, "task X.509-SVID signed");
                    out.push(Arc::new(svid));
                }
                Err(m) => {
                    tracing::warn!(entry_id = %r.entry_id, "SignX509 returned an unusable SVID: {m}")
                }
            }
        }
        Ok(out)
    }

    /// Renews task SVIDs at half life (± jitter), like per-entry ones.
    async fn renew_loop(&self, mut shutdown: watch::Receiver<bool>) {
        let mut rx = self.cache.subscribe();
        loop {
            let now = self.clock.now();
            let snap = rx.borrow_and_update().clone();
            let mut due: Vec<(TaskId, Entry)> = Vec::new();
            let mut next: Option<OffsetDateTime> = None;
            for (task, entry_id, svid) in snap.tasks.svids() {
                let Some(e) = snap.entries.get(entry_id) else {
                    continue;
                };
                let at = svid_renew_at(svid).unwrap_or(now);
                let tainted = snap
                    .bundle
                    .as_ref()
                    .is_some_and(|b| signed_by_tainted(svid, &b.tainted_x509_authorities));
                // Due at half life, now when the entry's identity changed under
                // it, or now when its authority was tainted.
                if at <= now || svid.spiffe_id != e.spiffe_id || tainted {
                    due.push((task.clone(), (**e).clone()));
                } else {
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
            }
            drop(snap);
            let mut failed = false;
            for (task, entry) in &due {
                match self.sign(task, std::slice::from_ref(entry)).await {
                    Ok(signed) if !signed.is_empty() => self.cache.update(|s| {
                        for svid in signed {
                            s.tasks.insert_svid(task, svid);
                        }
                    }),
                    Ok(_) => {
                        failed = true;
                        tracing::warn!(task_id = %task, entry_id = %entry.id, "SignX509 returned no SVID for a task renewal; retrying");
                    }
                    Err(e) => {
                        failed = true;
                        tracing::warn!(task_id = %task, entry_id = %entry.id, error = %e, "cannot renew a task X.509-SVID; retrying");
                    }
                }
            }
            if !due.is_empty() && !failed {
                // Renewed: look again at once, with the new SVIDs' renewal times.
                continue;
            }
            let wait = if failed {
                RENEW_RETRY
            } else {
                next.map_or(RENEW_CHECK_MAX, |t| {
                    std::time::Duration::try_from(t - self.clock.now())
                        .unwrap_or_default()
                        .min(RENEW_CHECK_MAX)
                })
            };
            tokio::select! {
                () = stop_requested(&mut shutdown) => return,
                () = tokio::time::sleep(wait) => {}
                changed = rx.changed(), if !failed => {
                    if changed.is_err() {
                        return;
                    }
                }
            }
        }
    }

    /// The tonic service for `mayfly.task.v1.Task`.
    pub fn service(self: &Arc<Self>) -> TaskServer<TaskService> {
        TaskServer::new(TaskService {
            tasks: Arc::clone(self),
        })
    }
}

/// Whether `svid` was signed by one of the tainted authorities.
fn signed_by_tainted(svid: &CachedSvid, tainted: &[Vec<u8>]) -> bool {
    !tainted.is_empty()
        && svid
            .chain_der
            .first()
            .is_some_and(|leaf| crate::sync::signed_by_any(leaf, tainted))
}

/// Takes back into the registry the live tasks an earlier run recorded in `path`, before the
/// Workload API serves anything; [`Tasks::run`] then watches them, so that one that ended
/// while the agent was down is reported at once, and one still running when it ends.
fn restore(cache: &Cache, path: &Path) -> Vec<TaskId> {
    let mut restored = Vec::new();
    for issued in persist::load(path) {
        let task = match issued.task_id.parse::<TaskId>() {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring a task in the live task list");
                continue;
            }
        };
        let mut new = false;
        cache.update(|s| new = s.tasks.restore(&task, &issued));
        tracing::info!(
            task_id = %task,
            x509_serials = ?issued.x509_serials,
            jwt_ids = ?issued.jwt_ids,
            "took back a task of the previous run"
        );
        if new {
            restored.push(task);
        }
    }
    restored
}

/// `mayfly.task.v1.Task`, served beside the Workload API on its socket.
#[derive(Debug)]
pub struct TaskService {
    tasks: Arc<Tasks>,
}

#[tonic::async_trait]
impl Task for TaskService {
    async fn complete(
        &self,
        request: Request<CompleteRequest>,
    ) -> Result<Response<CompleteResponse>, Status> {
        let peer = request
            .extensions()
            .get::<PeerInfo>()
            .copied()
            .ok_or_else(|| Status::permission_denied("caller cannot be identified"))?;
        let wanted = request.get_ref().pid;
        let proc_root = &self.tasks.proc_root;
        let task = if wanted == 0 || wanted == peer.pid {
            self.tasks
                .task_of(&peer)
                .ok_or_else(|| Status::permission_denied("caller cannot be identified"))?
        } else {
            let gone = || Status::not_found(format!("process {wanted} does not exist"));
            let owner = std::fs::metadata(proc_root.join(wanted.to_string()))
                .map_err(|_| gone())?
                .uid();
            if peer.uid != 0 && peer.uid != owner {
                tracing::info!(
                    pid = peer.pid,
                    uid = peer.uid,
                    target = wanted,
                    "Task/Complete refused"
                );
                return Err(Status::permission_denied(format!(
                    "process {wanted} belongs to another user; only root or its owner may complete its task"
                )));
            }
            self.tasks.task_of_process(wanted, None).ok_or_else(gone)?
        };
        self.tasks.observe(&task);
        let end = self.tasks.end(&task, EndReason::Completed);
        let (serials, jtis) = end.map_or_else(Default::default, |e| (e.x509_serials, e.jwt_ids));
        tracing::info!(caller_pid = peer.pid, task_id = %task, "task completed on request");
        Ok(Response::new(CompleteResponse {
            task_id: task.to_string(),
            revoked_x509_serials: serials,
            revoked_jwt_ids: jtis,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::task::{PidfdWatcher, TaskWatchers};
    use crate::workload::fake_proc::write_process;

    /// Signs nothing, accepts every report.
    struct Nothing;

    #[tonic::async_trait]
    impl TaskSigner for Nothing {
        async fn sign_x509(
            &self,
            _items: Vec<pb::X509SignItem>,
        ) -> Result<Vec<pb::X509SignResult>, ClientError> {
            Ok(Vec::new())
        }
    }

    #[tonic::async_trait]
    impl crate::task::report::TaskEndSink for Nothing {
        async fn report_task_ends(&self, _tasks: Vec<pb::TaskEnd>) -> Result<u32, ClientError> {
            Ok(0)
        }
    }

    /// Pods are watched by a watcher that never sees them end.
    #[derive(Debug)]
    struct Pods;

    impl TaskWatcher for Pods {
        fn watch(&self, _task: &TaskId) -> super::super::watch::TaskEnded {
            Box::pin(std::future::pending())
        }
        fn watches(&self, kind: TaskKind) -> bool {
            kind == TaskKind::Pod
        }
    }

    fn tasks(watcher: Arc<dyn TaskWatcher>, proc_root: &Path, data: &Path) -> Arc<Tasks> {
        let mut t = Tasks::new(
            Cache::new(),
            watcher,
            Arc::new(Nothing),
            data,
            Arc::new(mayfly::clock::SystemClock),
        )
        .unwrap();
        Arc::get_mut(&mut t).unwrap().proc_root = proc_root.to_owned();
        t
    }

    #[test]
    fn a_process_in_a_pod_container_is_its_pods_task_when_pods_are_watched() {
        let uid = "7f3c1a52-1b2e-4a55-9d1e-6c0e8f2b9a11";
        let cid = "4c5d8e2f9a1b3c7d6e0f2a4b8c1d3e5f7a9b0c2d4e6f8a1b3c5d7e9f0a2b4c6d";
        let proc = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        write_process(
            proc.path(),
            10,
            500,
            &format!("0::/kubepods/pod{uid}/{cid}\n"),
        );
        write_process(proc.path(), 11, 600, "0::/system.slice/api.service\n");
        // Pod sandbox cgroup, no container: not a pod workload.
        write_process(proc.path(), 12, 700, &format!("0::/kubepods/pod{uid}\n"));
        let peer = |pid, start| PeerInfo {
            pid,
            uid: 0,
            gid: 0,
            start_time: start,
        };

        let both: Arc<dyn TaskWatcher> = Arc::new(TaskWatchers::new(vec![
            Arc::new(PidfdWatcher::with_proc_root(proc.path())),
            Arc::new(Pods),
        ]));
        let t = tasks(both, proc.path(), data.path());
        let pod = TaskId::pod(uid).unwrap();
        assert_eq!(t.task_of(&peer(10, Some(500))), Some(pod.clone()));
        assert_eq!(t.task_of(&peer(10, None)), Some(pod));
        assert_eq!(t.task_of(&peer(11, Some(600))), Some(TaskId::unix(11, 600)));
        assert_eq!(t.task_of(&peer(12, None)), Some(TaskId::unix(12, 700)));
        // A recycled pid or a vanished process has no task.
        assert_eq!(t.task_of(&peer(10, Some(499))), None);
        assert_eq!(t.task_of(&peer(13, None)), None);

        // Without a pod watcher, every process is its own task.
        let t = tasks(
            Arc::new(PidfdWatcher::with_proc_root(proc.path())),
            proc.path(),
            data.path(),
        );
        assert_eq!(t.task_of(&peer(10, Some(500))), Some(TaskId::unix(10, 500)));
    }
}
