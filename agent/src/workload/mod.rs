//! Workload attestation: who is calling the Workload API.
//!
//! The listener reads the caller's credentials from the socket (`SO_PEERCRED`) when the
//! connection is accepted; an attestor turns them into selectors (`unix:uid:1000`, ...), which
//! the Workload API matches against the registration entries it holds.

pub mod cgroup;
#[cfg(test)]
pub(crate) mod fake_proc;
pub mod k8s;
pub mod kubelet;
pub mod pod;
pub mod systemd;
pub mod unix;

use std::path::PathBuf;
use std::sync::Arc;

use mayfly::selector::SelectorSet;

pub use k8s::K8sAttestor;
pub use systemd::SystemdAttestor;
pub use unix::UnixAttestor;

/// The caller's credentials as the kernel reported them for the connection (`SO_PEERCRED`):
/// taken when the peer connected, so they cannot be forged by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerInfo {
    /// Process id of the process that connected.
    pub pid: i32,
    /// Its effective user id at connect time.
    pub uid: u32,
    /// Its effective group id at connect time.
    pub gid: u32,
    /// Its start time (field 22 of `/proc/<pid>/stat`, clock ticks since boot), read right
    /// after the connection was accepted. The attestor checks that the pid still names this
    /// process, so that a process started later under a recycled pid cannot inherit the
    /// caller's identity. `None` when it was not captured (then only the attestor's own
    /// before/after check applies).
    pub start_time: Option<u64>,
}

/// Why a caller could not be attested. The Workload API answers `PermissionDenied` to all of
/// them: a caller that cannot be attested gets no identity.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The process that opened the connection has exited (or its pid now belongs to another
    /// process), so nothing can be said about it.
    #[error("process {pid} is gone")]
    ProcessGone {
        /// The caller's pid.
        pid: i32,
    },
    /// The pid now belongs to a process started after the connection was accepted: the
    /// caller exited and its pid was recycled.
    #[error("process {pid} is not the process that connected (pid reused)")]
    PidReused {
        /// The caller's pid.
        pid: i32,
    },
    /// A file under `/proc` could not be read for a reason other than the process being gone.
    #[error("cannot read {path} for process {pid}: {source}")]
    Proc {
        /// The caller's pid.
        pid: i32,
        /// The file that failed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file under `/proc` had content the attestor does not understand.
    #[error("malformed {path} for process {pid}: {reason}")]
    Malformed {
        /// The caller's pid.
        pid: i32,
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// The kubelet's pod list could not be had (the caller runs in a pod, so its `k8s`
    /// selectors cannot be left out).
    #[error("cannot attest the caller's pod: {0}")]
    Kubelet(#[source] kubelet::KubeletError),
    /// The caller's cgroup names a pod container that the kubelet did not list after every
    /// attempt: a container still starting for longer than the attempts allow, or a pod
    /// being removed.
    #[error(
        "container {container_id} of pod {pod_uid} is not in the kubelet's pod list after {attempts} attempts \
         (raise agent.k8s.max_poll_attempts or poll_retry_interval if containers take longer to be listed)"
    )]
    NotInKubelet {
        /// The pod UID from the cgroup.
        pod_uid: String,
        /// The container ID from the cgroup.
        container_id: String,
        /// How many lists were read.
        attempts: u32,
    },
    /// The kubelet lists the caller's pod on another node than the agent's: the agent is
    /// talking to another node's kubelet.
    #[error(
        "the kubelet places pod {pod_uid} on node {pod_node}, but this agent runs on {agent_node}: \
         check agent.k8s.kubelet_url"
    )]
    WrongNode {
        /// The pod UID.
        pod_uid: String,
        /// The node in the pod's spec.
        pod_node: String,
        /// This agent's node.
        agent_node: String,
    },
    /// The attestation task failed (panicked or was cancelled).
    #[error("workload attestation did not complete: {0}")]
    Internal(String),
}

/// Produces the selectors of a caller. Implementations are defined per platform (`unix`,
/// `systemd`, `k8s`; `docker` later) and used as `dyn WorkloadAttestor`.
#[tonic::async_trait]
pub trait WorkloadAttestor: Send + Sync + std::fmt::Debug {
    /// Every selector that holds for the caller. A selector that cannot be established is left
    /// out, never guessed: fewer selectors can only match fewer entries.
    async fn attest(&self, peer: &PeerInfo) -> Result<SelectorSet, AttestError>;

    /// The same answer as [`WorkloadAttestor::attest`], computed on the calling thread, for an
    /// attestor that only does blocking work (reading `/proc`, hashing a binary, user and
    /// group look-ups); `None` for one that must be awaited (the kubelet's pod list).
    /// [`Attestors`] runs all the blocking ones in one trip to the blocking pool, instead of
    /// one trip each: every Workload API call is attested, and each trip is two thread
    /// switches.
    fn attest_blocking_now(&self, peer: &PeerInfo) -> Option<Result<SelectorSet, AttestError>> {
        let _ = peer;
        None
    }
}

/// Several attestors as one: the caller's selectors are the union of theirs. Any attestor's
/// refusal (the process is gone, its pid was reused) refuses the caller: a partial answer
/// could match an entry meant for another process.
#[derive(Debug, Clone)]
pub struct Attestors(Vec<Arc<dyn WorkloadAttestor>>);

impl Attestors {
    /// The union of `attestors`, run in order.
    pub fn new(attestors: Vec<Arc<dyn WorkloadAttestor>>) -> Self {
        Self(attestors)
    }

    /// What the agent runs by default on a host: `unix` and `systemd`.
    pub fn host_defaults() -> Self {
        Self::new(vec![
            Arc::new(UnixAttestor::new()),
            Arc::new(SystemdAttestor::new()),
        ])
    }

    /// These attestors and `more`.
    pub fn with(mut self, more: Arc<dyn WorkloadAttestor>) -> Self {
        self.0.push(more);
        self
    }
}

#[tonic::async_trait]
impl WorkloadAttestor for Attestors {
    async fn attest(&self, peer: &PeerInfo) -> Result<SelectorSet, AttestError> {
        let all = self.0.clone();
        let at = *peer;
        // The blocking attestors in one trip; the indexes of the others.
        let (mut out, awaited) = tokio::task::spawn_blocking(move || {
            let mut out = SelectorSet::new();
            let mut awaited = Vec::new();
            for (i, a) in all.iter().enumerate() {
                match a.attest_blocking_now(&at) {
                    Some(selectors) => out.extend(selectors?),
                    None => awaited.push(i),
                }
            }
            Ok::<_, AttestError>((out, awaited))
        })
        .await
        .map_err(|e| AttestError::Internal(e.to_string()))??;
        for a in awaited.iter().filter_map(|i| self.0.get(*i)) {
            out.extend(a.attest(peer).await?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers `selector`, or refuses; blocking or awaited.
    #[derive(Debug)]
    struct Fake {
        selector: Option<&'static str>,
        blocking: bool,
    }

    impl Fake {
        fn answer(&self, peer: &PeerInfo) -> Result<SelectorSet, AttestError> {
            match self.selector {
                Some(s) => Ok([s.parse().unwrap()].into_iter().collect()),
                None => Err(AttestError::ProcessGone { pid: peer.pid }),
            }
        }
    }

    #[tonic::async_trait]
    impl WorkloadAttestor for Fake {
        async fn attest(&self, peer: &PeerInfo) -> Result<SelectorSet, AttestError> {
            self.answer(peer)
        }

        fn attest_blocking_now(&self, peer: &PeerInfo) -> Option<Result<SelectorSet, AttestError>> {
            self.blocking.then(|| self.answer(peer))
        }
    }

    fn fake(selector: Option<&'static str>, blocking: bool) -> Arc<dyn WorkloadAttestor> {
        Arc::new(Fake { selector, blocking })
    }

    #[tokio::test]
    async fn the_union_of_blocking_and_awaited_attestors_and_any_refusal_refuses() {
        let peer = PeerInfo {
            pid: 7,
            uid: 1000,
            gid: 1000,
            start_time: None,
        };
        let both = Attestors::new(vec![
            fake(Some("unix:uid:1000"), true),
            fake(Some("k8s:ns:a"), false),
            fake(Some("systemd:id:a.service"), true),
        ]);
        let got = both.attest(&peer).await.unwrap();
        let want: SelectorSet = ["unix:uid:1000", "k8s:ns:a", "systemd:id:a.service"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(got, want);
        for refusing in [fake(None, true), fake(None, false)] {
            let some = Attestors::new(vec![fake(Some("unix:uid:1000"), true), refusing]);
            assert!(matches!(
                some.attest(&peer).await,
                Err(AttestError::ProcessGone { pid: 7 })
            ));
        }
    }
}
