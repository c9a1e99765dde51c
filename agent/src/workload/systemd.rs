//! The `systemd` workload attestor: the service unit a caller runs in, from its cgroup.
//!
//! Selector: `systemd:id:<unit>` (for example `systemd:id:nginx.service`), spelled as SPIRE
//! spells it so that entries port. A caller outside any service (a login session, a
//! container) gets no `systemd` selector.

use std::path::PathBuf;

use mayfly::selector::{Selector, SelectorSet};

use super::{AttestError, PeerInfo, WorkloadAttestor, cgroup};

/// The systemd attestor.
#[derive(Debug, Clone)]
pub struct SystemdAttestor {
    proc_root: PathBuf,
}

impl Default for SystemdAttestor {
    fn default() -> Self {
        Self::new()
    }
}

impl SystemdAttestor {
    /// An attestor reading the real `/proc`.
    pub fn new() -> Self {
        Self::with_proc_root("/proc")
    }

    /// An attestor reading a `/proc`-like tree at `root`.
    pub fn with_proc_root(root: impl Into<PathBuf>) -> Self {
        Self {
            proc_root: root.into(),
        }
    }

    /// Attests `peer`, blocking (reads `/proc`). The cgroup is read between two reads of the
    /// process start time, and both must match the one taken at accept, so that a recycled
    /// pid cannot lend its unit to the caller.
    pub fn attest_blocking(&self, peer: &PeerInfo) -> Result<SelectorSet, AttestError> {
        let facts = cgroup::read_process(&self.proc_root, peer.pid, peer.start_time)?;
        let mut out = SelectorSet::new();
        if let Some(unit) = facts.systemd_unit
            && let Ok(s) = Selector::new("systemd", format!("id:{unit}"))
        {
            out.insert(s);
        }
        Ok(out)
    }
}

#[tonic::async_trait]
impl WorkloadAttestor for SystemdAttestor {
    async fn attest(&self, peer: &PeerInfo) -> Result<SelectorSet, AttestError> {
        let this = self.clone();
        let peer = *peer;
        tokio::task::spawn_blocking(move || this.attest_blocking(&peer))
            .await
            .map_err(|e| AttestError::Internal(e.to_string()))?
    }

    fn attest_blocking_now(&self, peer: &PeerInfo) -> Option<Result<SelectorSet, AttestError>> {
        Some(self.attest_blocking(peer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proc_tree(cgroup: &str, start: u64) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        crate::workload::fake_proc::write_process(root.path(), 77, start, cgroup);
        root
    }

    fn peer(start: Option<u64>) -> PeerInfo {
        PeerInfo {
            pid: 77,
            uid: 1000,
            gid: 1000,
            start_time: start,
        }
    }

    #[test]
    fn a_service_gets_its_unit_and_others_nothing() {
        let root = proc_tree("0::/system.slice/api.service\n", 4242);
        let a = SystemdAttestor::with_proc_root(root.path());
        let got = a.attest_blocking(&peer(Some(4242))).unwrap();
        let want: SelectorSet = ["systemd:id:api.service".parse::<Selector>().unwrap()]
            .into_iter()
            .collect();
        assert_eq!(got, want);

        let root = proc_tree("0::/user.slice/user-1000.slice/session-2.scope\n", 4242);
        let a = SystemdAttestor::with_proc_root(root.path());
        assert!(a.attest_blocking(&peer(None)).unwrap().is_empty());
    }

    #[test]
    fn a_recycled_or_vanished_pid_is_refused() {
        let root = proc_tree("0::/system.slice/api.service\n", 4242);
        let a = SystemdAttestor::with_proc_root(root.path());
        assert!(matches!(
            a.attest_blocking(&peer(Some(1))),
            Err(AttestError::PidReused { pid: 77 })
        ));
        let empty = tempfile::tempdir().unwrap();
        let a = SystemdAttestor::with_proc_root(empty.path());
        assert!(matches!(
            a.attest_blocking(&peer(None)),
            Err(AttestError::ProcessGone { pid: 77 })
        ));
    }
}
