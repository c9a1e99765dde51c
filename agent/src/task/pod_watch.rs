//! [`PodWatcher`]: a pod's task ends when the pod leaves the kubelet's pod list (it was
//! deleted and its containers are gone) or reaches phase `Succeeded` or `Failed`.
//!
//! One poller reads the pod list every [`DEFAULT_POLL_INTERVAL`] (2 s) on behalf of every
//! watched pod, through the [`PodLists`] shared with the `k8s` attestor. It runs only while
//! some pod is watched. Only lists requested after a pod started being watched count for it,
//! so a list older than the pod cannot end it. A finished phase ends the task on the first
//! list that shows it; a missing pod must be missing from two lists in a row, so that a
//! kubelet that has just restarted (and lists few pods for a moment) ends nothing. A deleted
//! pod's task therefore ends 2 to 6 s after its containers are gone. A failed list proves
//! nothing and ends nothing.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::watch::{TaskEnded, TaskWatcher};
use super::{TaskId, TaskKind};
use crate::workload::kubelet::{PodListing, PodLists};

/// How often the kubelet's pod list is read while pods are watched.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(2);

/// How many lists in a row must miss a pod before its task ends.
const ABSENT_LISTS_TO_END: u32 = 2;

/// Watches `k8s:` tasks (pods). Cheap to clone; clones share the poller.
#[derive(Debug, Clone)]
pub struct PodWatcher {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    pods: Arc<PodLists>,
    interval: Duration,
    /// The latest list the poller read (`None` before the first).
    latest: watch::Sender<Option<Arc<PodListing>>>,
    /// The poller, while one runs. Started by the first watch, stopped by the poller itself
    /// when nothing is watched any more; both decisions are taken under this lock.
    poller: Mutex<Option<JoinHandle<()>>>,
}

impl PodWatcher {
    /// A watcher reading `pods` every [`DEFAULT_POLL_INTERVAL`].
    pub fn new(pods: Arc<PodLists>) -> Self {
        Self::with_interval(pods, DEFAULT_POLL_INTERVAL)
    }

    /// A watcher reading `pods` every `interval`.
    pub fn with_interval(pods: Arc<PodLists>, interval: Duration) -> Self {
        Self {
            shared: Arc::new(Shared {
                pods,
                interval,
                latest: watch::channel(None).0,
                poller: Mutex::new(None),
            }),
        }
    }

    fn ensure_poller(&self) {
        let mut poller = lock(&self.shared.poller);
        if poller.as_ref().is_none_or(JoinHandle::is_finished) {
            *poller = Some(tokio::spawn(poll(Arc::clone(&self.shared))));
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Only a handle is kept under this lock; a panic cannot leave it half-written.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Reads the pod list every `interval` while anyone watches it.
async fn poll(shared: Arc<Shared>) {
    loop {
        {
            let mut poller = lock(&shared.poller);
            if shared.latest.receiver_count() == 0 {
                // Nothing watched: stop. A watch starting now sees no poller and starts one.
                *poller = None;
                return;
            }
        }
        let listing = shared.pods.since(Instant::now()).await;
        if let Err(e) = &listing.result {
            tracing::warn!(error = %e, "cannot read the kubelet's pod list to see pods end; retrying");
        }
        shared.latest.send_replace(Some(listing));
        tokio::time::sleep(shared.interval).await;
    }
}

impl TaskWatcher for PodWatcher {
    fn watch(&self, task: &TaskId) -> TaskEnded {
        let Some(uid) = task.as_pod().map(str::to_owned) else {
            return Box::pin(std::future::pending());
        };
        let since = Instant::now();
        let mut rx = self.shared.latest.subscribe();
        self.ensure_poller();
        // Holding `shared` keeps the sender alive, so `changed` fails only if it panicked.
        let shared = Arc::clone(&self.shared);
        Box::pin(async move {
            let _shared = shared;
            let mut absent = 0;
            loop {
                if rx.changed().await.is_err() {
                    return std::future::pending().await;
                }
                let Some(listing) = rx.borrow_and_update().clone() else {
                    continue;
                };
                if listing.fetched_at < since {
                    continue;
                }
                let Ok(index) = &listing.result else {
                    continue;
                };
                match index.get(&uid) {
                    Some(pod) if pod.is_finished() => {
                        tracing::debug!(pod_uid = %uid, phase = %pod.status.phase, "pod finished");
                        return;
                    }
                    Some(_) => absent = 0,
                    None => {
                        absent += 1;
                        if absent >= ABSENT_LISTS_TO_END {
                            tracing::debug!(pod_uid = %uid, "pod no longer listed by the kubelet");
                            return;
                        }
                    }
                }
            }
        })
    }

    fn watches(&self, kind: TaskKind) -> bool {
        kind == TaskKind::Pod
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::workload::kubelet::{KubeletError, PodSource};
    use crate::workload::pod::{PodIndex, PodList};

    const A: &str = "7f3c1a52-1b2e-4a55-9d1e-6c0e8f2b9a11";
    const B: &str = "5a5a5a5a-1111-4222-8333-944444444444";

    /// Serves the lists of `script` in turn (the last one for ever); `None` is a failure.
    #[derive(Debug)]
    struct Script {
        lists: Vec<Option<Vec<(&'static str, &'static str)>>>,
        calls: AtomicUsize,
    }

    #[tonic::async_trait]
    impl PodSource for Script {
        async fn fetch(&self) -> Result<PodIndex, KubeletError> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            let step = &self.lists[n.min(self.lists.len() - 1)];
            let Some(pods) = step else {
                return Err(KubeletError::Request {
                    url: "https://kubelet.test:10250".into(),
                    reason: "connection refused".into(),
                });
            };
            let items: Vec<serde_json::Value> = pods
                .iter()
                .map(|(uid, phase)| {
                    serde_json::json!({"metadata": {"uid": uid}, "status": {"phase": phase}})
                })
                .collect();
            let list: PodList =
                serde_json::from_value(serde_json::json!({ "items": items })).expect("test list");
            Ok(PodIndex::new(list))
        }
    }

    fn watcher(lists: Vec<Option<Vec<(&'static str, &'static str)>>>) -> (PodWatcher, Arc<Script>) {
        let script = Arc::new(Script {
            lists,
            calls: AtomicUsize::new(0),
        });
        let pods = Arc::new(PodLists::new(script.clone()));
        (
            PodWatcher::with_interval(pods, Duration::from_secs(2)),
            script,
        )
    }

    fn pod(uid: &str) -> TaskId {
        TaskId::pod(uid).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_deleted_pod_ends_its_task_and_a_running_one_does_not() {
        let running = Some(vec![(A, "Running"), (B, "Running")]);
        let a_deleted = Some(vec![(B, "Running")]);
        let (w, _) = watcher(vec![running.clone(), running, None, a_deleted]);
        let start = Instant::now();
        let a = w.watch(&pod(A));
        let b = w.watch(&pod(B));
        // Lists: running at 0 s and 2 s, a failure at 4 s (proves nothing), A missing at 6 s
        // and 8 s: A ends at the second list that misses it.
        tokio::time::timeout(Duration::from_secs(60), a)
            .await
            .unwrap();
        assert_eq!(start.elapsed(), Duration::from_secs(8));
        assert!(
            tokio::time::timeout(Duration::from_secs(60), b)
                .await
                .is_err(),
            "B is still running"
        );
        // Not a pod: never ends here.
        assert!(!w.watches(TaskKind::Process));
        assert!(
            tokio::time::timeout(Duration::from_secs(10), w.watch(&TaskId::unix(1, 1)))
                .await
                .is_err()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_finished_pod_ends_at_once_and_one_missing_list_is_not_enough() {
        let (w, _) = watcher(vec![
            Some(vec![(A, "Running")]),
            Some(vec![]),
            Some(vec![(A, "Running")]),
            Some(vec![(A, "Succeeded")]),
        ]);
        let start = Instant::now();
        tokio::time::timeout(Duration::from_secs(60), w.watch(&pod(A)))
            .await
            .unwrap();
        // Missing once at 2 s (a kubelet restart, say), listed again at 4 s, finished at 6 s.
        assert_eq!(start.elapsed(), Duration::from_secs(6));
        let (w, _) = watcher(vec![Some(vec![(A, "Failed")])]);
        tokio::time::timeout(Duration::from_secs(1), w.watch(&pod(A)))
            .await
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_poller_runs_only_while_pods_are_watched() {
        let (w, script) = watcher(vec![Some(vec![(A, "Running")])]);
        let watched = w.watch(&pod(A));
        tokio::time::sleep(Duration::from_secs(5)).await;
        let while_watched = script.calls.load(Ordering::SeqCst);
        assert_eq!(while_watched, 3, "lists at 0, 2 and 4 s");
        drop(watched);
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(
            script.calls.load(Ordering::SeqCst) <= while_watched + 1,
            "the poller stops once nothing is watched"
        );
        // And starts again for the next pod.
        let again = w.watch(&pod(A));
        let before = script.calls.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(script.calls.load(Ordering::SeqCst) > before);
        drop(again);
    }
}
