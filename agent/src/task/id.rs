//! Task identifiers.

use std::fmt;
use std::path::Path;

use crate::workload::AttestError;
use crate::workload::cgroup::is_pod_uid;
use crate::workload::unix::process_start_time;

/// What kind of thing a task is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskKind {
    /// A process (`unix:<pid>:<start_time>`).
    Process,
    /// A Kubernetes pod (`k8s:<pod-uid>`): every process of the pod's containers.
    Pod,
}

/// An agent-local task identifier, as given to the server in `SignX509` / `MintJwt` /
/// `ReportTaskEnd`: `unix:<pid>:<start_time>` for a process (the start time makes a recycled
/// pid a different task), `k8s:<pod-uid>` for a Kubernetes pod; `docker:<container-id>` later.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TaskId(String);

impl TaskId {
    /// The task of the process `pid` that started at `start_time` (field 22 of
    /// `/proc/<pid>/stat`).
    pub fn unix(pid: i32, start_time: u64) -> Self {
        Self(format!("unix:{pid}:{start_time}"))
    }

    /// The task of the Kubernetes pod `uid` (a UUID, or a static pod's 32 hex digits).
    pub fn pod(uid: &str) -> Result<Self, TaskIdError> {
        if is_pod_uid(uid) {
            Ok(Self(format!("k8s:{uid}")))
        } else {
            Err(TaskIdError::Malformed(format!("k8s:{uid}")))
        }
    }

    /// The task of the process `pid` as it is now, read from `<proc_root>/<pid>/stat`.
    pub fn of_process(proc_root: &Path, pid: i32) -> Result<Self, AttestError> {
        Ok(Self::unix(pid, process_start_time(proc_root, pid)?))
    }

    /// The pid and start time of a `unix:` task.
    pub fn as_unix(&self) -> Option<(i32, u64)> {
        let rest = self.0.strip_prefix("unix:")?;
        let (pid, start) = rest.split_once(':')?;
        Some((pid.parse().ok()?, start.parse().ok()?))
    }

    /// The pod UID of a `k8s:` task.
    pub fn as_pod(&self) -> Option<&str> {
        self.0.strip_prefix("k8s:")
    }

    /// The kind of task.
    pub fn kind(&self) -> TaskKind {
        if self.as_pod().is_some() {
            TaskKind::Pod
        } else {
            TaskKind::Process
        }
    }

    /// The identifier as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why a string is not a task id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TaskIdError {
    /// Neither `unix:<pid>:<start_time>` nor `k8s:<pod-uid>`.
    #[error("{0:?} is not a task id (expected unix:<pid>:<start_time> or k8s:<pod-uid>)")]
    Malformed(String),
}

impl std::str::FromStr for TaskId {
    type Err = TaskIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(uid) = s.strip_prefix("k8s:") {
            return Self::pod(uid);
        }
        let id = Self(s.to_owned());
        match id.as_unix() {
            Some((pid, start)) if pid > 0 && Self::unix(pid, start) == id => Ok(id),
            _ => Err(TaskIdError::Malformed(s.to_owned())),
        }
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_proc(pid: i32, start: u64) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(pid.to_string());
        std::fs::create_dir_all(&p).unwrap();
        // The command name may hold spaces and parentheses: fields count from the last ')'.
        let mut fields = vec!["S".to_owned()];
        fields.extend((4..=21).map(|i| i.to_string()));
        fields.push(start.to_string());
        fields.extend((23..=52).map(|i| i.to_string()));
        std::fs::write(
            p.join("stat"),
            format!("{pid} (my (odd) cmd) {}\n", fields.join(" ")),
        )
        .unwrap();
        dir
    }

    #[test]
    fn task_id_from_a_fake_proc() {
        let proc = fake_proc(4242, 987_654);
        let id = TaskId::of_process(proc.path(), 4242).unwrap();
        assert_eq!(id.as_str(), "unix:4242:987654");
        assert_eq!(id.as_unix(), Some((4242, 987_654)));
        assert_eq!(id, TaskId::unix(4242, 987_654));
        // A recycled pid is another task.
        assert_ne!(id, TaskId::unix(4242, 987_655));
        assert_eq!("unix:4242:987654".parse::<TaskId>().unwrap(), id);
        for bad in [
            "unix:0:1",
            "unix:-1:1",
            "unix:01:1",
            "unix:1",
            "k8s:abc",
            "k8s:",
            "k8s:2c48913c-b29f-11e7-9350-02096814779",
            "k8s:2c48913c-b29f-11e7-9350-020968147796/x",
            "",
        ] {
            assert!(bad.parse::<TaskId>().is_err(), "{bad}");
        }
        assert_eq!(id.kind(), TaskKind::Process);
        assert_eq!(id.as_pod(), None);
        assert!(matches!(
            TaskId::of_process(proc.path(), 4243),
            Err(AttestError::ProcessGone { pid: 4243 })
        ));
    }

    #[test]
    fn pod_task_ids() {
        let uid = "2c48913c-b29f-11e7-9350-020968147796";
        let id = TaskId::pod(uid).unwrap();
        assert_eq!(id.as_str(), format!("k8s:{uid}"));
        assert_eq!(id.as_pod(), Some(uid));
        assert_eq!(id.kind(), TaskKind::Pod);
        assert_eq!(id.as_unix(), None);
        assert_eq!(format!("k8s:{uid}").parse::<TaskId>().unwrap(), id);
        // A static pod's UID is a hash.
        let hash = "6d6f0a0b1c2d3e4f5a6b7c8d9e0f1a2b";
        assert_eq!(TaskId::pod(hash).unwrap().as_pod(), Some(hash));
        for bad in [
            "",
            "pod",
            "2c48913c",
            "../../etc",
            "2c48913c-b29f-11e7-9350-020968147796 ",
        ] {
            assert!(TaskId::pod(bad).is_err(), "{bad:?}");
        }
    }
}
