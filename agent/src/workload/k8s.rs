//! The `k8s` workload attestor: the pod and container a caller runs in, described by the
//! kubelet.
//!
//! 1. The caller's cgroup names its pod UID and container ID ([`super::cgroup`]), read between
//!    two reads of its start time like every attestor. A process whose cgroup names no pod
//!    container gets no `k8s` selectors; that is not an error.
//! 2. The kubelet's pod list ([`super::kubelet`]) gives the pod with that UID, and in it the
//!    app, init or ephemeral container whose `containerID` (`containerd://<id>`,
//!    `cri-o://<id>`, `docker://<id>`) is that container.
//! 3. A container the kubelet does not list yet (it has just started, and the kubelet
//!    publishes its ID a moment later) is looked for again, up to `max_poll_attempts` lists
//!    `poll_retry_interval` apart, each list newer than the last; then the caller is refused
//!    ([`AttestError::NotInKubelet`]).
//!
//! The selectors are [`Pod::selectors`](super::pod::Pod::selectors).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mayfly::selector::SelectorSet;
use tracing::Instrument as _;

use super::kubelet::PodLists;
use super::{AttestError, PeerInfo, WorkloadAttestor, cgroup};

/// A pod list this recent is good enough for a first look (shared by concurrent callers).
const FIRST_LOOK_MAX_AGE: Duration = Duration::from_secs(1);

/// The k8s attestor.
#[derive(Debug, Clone)]
pub struct K8sAttestor {
    proc_root: PathBuf,
    pods: Arc<PodLists>,
    max_poll_attempts: u32,
    poll_retry_interval: Duration,
    node_name: Option<String>,
}

impl K8sAttestor {
    /// An attestor reading `/proc` and the pod lists of `pods`, looking up a container up to
    /// `max_poll_attempts` times (at least once) `poll_retry_interval` apart.
    pub fn new(pods: Arc<PodLists>, max_poll_attempts: u32, poll_retry_interval: Duration) -> Self {
        Self {
            proc_root: PathBuf::from("/proc"),
            pods,
            max_poll_attempts: max_poll_attempts.max(1),
            poll_retry_interval,
            node_name: None,
        }
    }

    /// Reads a `/proc`-like tree at `root` instead (tests, or a host `/proc` mounted
    /// elsewhere).
    pub fn with_proc_root(mut self, root: impl Into<PathBuf>) -> Self {
        self.proc_root = root.into();
        self
    }

    /// The node this agent runs on: a pod the kubelet places on another node is refused
    /// (the kubelet URL then points at another node's kubelet).
    pub fn with_node_name(mut self, node: Option<String>) -> Self {
        self.node_name = node;
        self
    }
}

#[tonic::async_trait]
impl WorkloadAttestor for K8sAttestor {
    async fn attest(&self, peer: &PeerInfo) -> Result<SelectorSet, AttestError> {
        let (root, pid, start) = (self.proc_root.clone(), peer.pid, peer.start_time);
        let facts = tokio::task::spawn_blocking(move || cgroup::read_process(&root, pid, start))
            .await
            .map_err(|e| AttestError::Internal(e.to_string()))??;
        let Some((pod_uid, container_id)) = facts.pod_container() else {
            return Ok(SelectorSet::new());
        };
        let span = tracing::debug_span!("k8s_attest", pid, pod_uid, container_id);
        self.find(pid, pod_uid, container_id).instrument(span).await
    }
}

impl K8sAttestor {
    /// The selectors of `container_id` in pod `pod_uid`, looked for in up to
    /// `max_poll_attempts` lists.
    async fn find(
        &self,
        pid: i32,
        pod_uid: &str,
        container_id: &str,
    ) -> Result<SelectorSet, AttestError> {
        let mut listing = self.pods.recent(FIRST_LOOK_MAX_AGE).await;
        for attempt in 1..=self.max_poll_attempts {
            let index = listing
                .result
                .as_ref()
                .map_err(|e| AttestError::Kubelet(e.clone()))?;
            if let Some(pod) = index.get(pod_uid) {
                if let Some(node) = &self.node_name
                    && !pod.spec.node_name.is_empty()
                    && &pod.spec.node_name != node
                {
                    return Err(AttestError::WrongNode {
                        pod_uid: pod_uid.to_owned(),
                        pod_node: pod.spec.node_name.clone(),
                        agent_node: node.clone(),
                    });
                }
                if let Some(container) = pod.container(container_id) {
                    tracing::debug!(attempt, container = %container.name, "pod container found");
                    return Ok(pod.selectors(container));
                }
            }
            if attempt == self.max_poll_attempts {
                break;
            }
            tracing::debug!(
                attempt,
                retry_in = ?self.poll_retry_interval,
                "container not in the kubelet's pod list yet"
            );
            tokio::time::sleep(self.poll_retry_interval).await;
            // Strictly newer than the list just read.
            let after = listing.fetched_at + Duration::from_nanos(1);
            listing = self.pods.since(after).await;
        }
        tracing::warn!(
            pid,
            pod_uid,
            container_id,
            attempts = self.max_poll_attempts,
            "the caller's container is not in the kubelet's pod list; refusing"
        );
        Err(AttestError::NotInKubelet {
            pod_uid: pod_uid.to_owned(),
            container_id: container_id.to_owned(),
            attempts: self.max_poll_attempts,
        })
    }
}
