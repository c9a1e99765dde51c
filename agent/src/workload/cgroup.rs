//! What a process's control groups say about it: the Kubernetes pod and container it runs in,
//! and the systemd unit that started it.
//!
//! `/proc/<pid>/cgroup` has one line per hierarchy, `hierarchy-id:controllers:path` (cgroup
//! v1), or the single line `0::path` (cgroup v2). The paths carry the facts we need, in layouts
//! that differ by cgroup driver and container runtime:
//!
//! | layout | example path |
//! |---|---|
//! | cgroupfs driver, containerd or Docker | `/kubepods/burstable/pod<uid>/<64 hex>` |
//! | cgroupfs driver, CRI-O | `/kubepods/burstable/pod<uid>/crio-<64 hex>` |
//! | systemd driver, containerd | `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid with _>.slice/cri-containerd-<64 hex>.scope` |
//! | systemd driver, CRI-O | `…/kubepods-pod<uid with _>.slice/crio-<64 hex>.scope` |
//! | systemd driver, Docker | `…/docker-<64 hex>.scope` |
//! | a systemd service | `/system.slice/nginx.service` |
//!
//! A static pod's UID is a 32-digit hex hash of its manifest, without dashes. An agent in its
//! own cgroup namespace sees other processes' paths relative to its own cgroup
//! (`/../../kubepods.slice/…`); only the segments matter, so those parse too.
//!
//! Parsing is pure and total: anything not recognised yields `None`, never a guess, so that a
//! process can only lose selectors, not gain wrong ones.

use std::path::Path;

use super::AttestError;
use super::unix::process_start_time;

/// The facts read from a process's cgroup paths.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CgroupFacts {
    /// The Kubernetes pod UID (with dashes; 32 hex digits for a static pod), when the process
    /// runs in a pod.
    pub pod_uid: Option<String>,
    /// The container ID (64 lower-case hex digits), when the process runs in a container.
    pub container_id: Option<String>,
    /// The systemd unit (`nginx.service`), when a systemd service started the process.
    pub systemd_unit: Option<String>,
}

/// Parses the contents of `/proc/<pid>/cgroup`. Lines that do not parse are skipped. When
/// hierarchies disagree (which a healthy system never shows), the fact is left out.
pub fn parse(contents: &str) -> CgroupFacts {
    let mut pods = Vec::new();
    let mut containers = Vec::new();
    let mut units = Vec::new();
    for line in contents.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if let Some(uid) = pod_uid(path) {
            pods.push(uid);
        }
        if let Some(id) = container_id(path) {
            containers.push(id);
        }
        // The unit is read from the systemd hierarchy (v1) or the unified one (v2): the
        // other v1 controllers may be placed elsewhere.
        if (controllers == "name=systemd" || controllers.is_empty())
            && let Some(unit) = systemd_unit(path)
        {
            units.push(unit);
        }
    }
    CgroupFacts {
        pod_uid: agreed(pods),
        container_id: agreed(containers),
        systemd_unit: agreed(units),
    }
}

impl CgroupFacts {
    /// The pod UID and container ID when the process runs in a container of a Kubernetes pod
    /// (both are named by its cgroup). A process in a pod's cgroup but in none of its
    /// containers (CRI-O's monitor, for one) is not a pod workload.
    pub fn pod_container(&self) -> Option<(&str, &str)> {
        Some((self.pod_uid.as_deref()?, self.container_id.as_deref()?))
    }
}

/// Reads and parses `<proc_root>/<pid>/cgroup`.
pub fn read(proc_root: &Path, pid: i32) -> std::io::Result<CgroupFacts> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("cgroup"))?;
    Ok(parse(&text))
}

/// Reads the cgroup facts of the process `pid` between two reads of its start time, so that
/// they describe one process: the one that started at `expected_start` when given (the start
/// time read when the caller connected). A different start time before the read is a recycled
/// pid ([`AttestError::PidReused`]); one that changes during the read, or a vanished process,
/// is [`AttestError::ProcessGone`].
pub fn read_process(
    proc_root: &Path,
    pid: i32,
    expected_start: Option<u64>,
) -> Result<CgroupFacts, AttestError> {
    let before = process_start_time(proc_root, pid)?;
    if expected_start.is_some_and(|at_accept| at_accept != before) {
        return Err(AttestError::PidReused { pid });
    }
    let facts = read(proc_root, pid).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) {
            AttestError::ProcessGone { pid }
        } else {
            AttestError::Proc {
                pid,
                path: proc_root.join(pid.to_string()).join("cgroup"),
                source: e,
            }
        }
    })?;
    if process_start_time(proc_root, pid)? != before {
        return Err(AttestError::ProcessGone { pid });
    }
    Ok(facts)
}

/// Whether `s` is a Kubernetes pod UID as the kubelet writes it: a UUID, or the 32 hex digits
/// of a static pod.
pub fn is_pod_uid(s: &str) -> bool {
    is_uuid(s) || is_static_pod_uid(s)
}

/// The one value every hierarchy agrees on, if any.
fn agreed(mut values: Vec<String>) -> Option<String> {
    values.dedup();
    let first = values.first()?;
    values.iter().all(|v| v == first).then(|| first.clone())
}

/// The pod UID in a path segment `pod<uid>` (cgroupfs) or `…-pod<uid_with_underscores>.slice`
/// (systemd driver).
fn pod_uid(path: &str) -> Option<String> {
    path.split('/').find_map(|segment| {
        let segment = segment.strip_suffix(".slice").unwrap_or(segment);
        let at = segment.rfind("pod")?;
        // `pod` must start the segment or follow a `-` (kubepods-burstable-pod…), so that
        // `kubepods` itself is not read as a pod.
        if at > 0 && !segment[..at].ends_with('-') {
            return None;
        }
        let uid = segment[at + 3..].replace('_', "-");
        is_pod_uid(&uid).then_some(uid)
    })
}

/// A static pod's UID: the kubelet's 32-digit hex hash of the manifest.
fn is_static_pod_uid(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The container ID: the last path segment that names one, bare (cgroupfs driver with
/// containerd or Docker), `crio-<id>` (cgroupfs driver with CRI-O) or a runtime's systemd scope
/// (`cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope`). A process in a
/// sub-cgroup of its container (a container that runs systemd) is still in that container.
/// CRI-O's monitor process (`crio-conmon-<id>.scope`) is not the container.
fn container_id(path: &str) -> Option<String> {
    path.rsplit('/').find_map(container_id_segment)
}

fn container_id_segment(segment: &str) -> Option<String> {
    let id = match segment.strip_suffix(".scope") {
        Some(scope) => ["cri-containerd-", "crio-", "docker-"]
            .iter()
            .find_map(|prefix| scope.strip_prefix(prefix))?,
        None => segment.strip_prefix("crio-").unwrap_or(segment),
    };
    (id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then(|| id.to_owned())
}

/// The systemd service unit a process belongs to: the last `*.service` segment of its path
/// (a user service under `user@1000.service/app.slice/foo.service` is `foo.service`).
/// Processes in containers, pods or session scopes have none.
fn systemd_unit(path: &str) -> Option<String> {
    if pod_uid(path).is_some() || container_id(path).is_some() {
        return None;
    }
    let last = path.rsplit('/').find(|s| !s.is_empty())?;
    let unit = last.strip_suffix(".service")?;
    let valid = !unit.is_empty()
        && unit
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":-_.\\@".contains(&b));
    valid.then(|| last.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "2c48913c-b29f-11e7-9350-020968147796";
    const CID: &str = "9bca8d63d5fa610783847915bcff0ecac1273e5b4bed3f6fa1b07350e0135961";

    #[test]
    fn cgroup_v1_cgroupfs_driver() {
        let text = format!(
            "12:pids:/kubepods/burstable/pod{UID}/{CID}\n\
             11:memory:/kubepods/burstable/pod{UID}/{CID}\n\
             1:name=systemd:/kubepods/burstable/pod{UID}/{CID}\n"
        );
        let f = parse(&text);
        assert_eq!(f.pod_uid.as_deref(), Some(UID));
        assert_eq!(f.container_id.as_deref(), Some(CID));
        assert_eq!(f.systemd_unit, None);
    }

    #[test]
    fn cgroup_v2_systemd_driver_containerd() {
        let under = UID.replace('-', "_");
        let text = format!(
            "0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{under}.slice/cri-containerd-{CID}.scope\n"
        );
        let f = parse(&text);
        assert_eq!(f.pod_uid.as_deref(), Some(UID));
        assert_eq!(f.container_id.as_deref(), Some(CID));
        assert_eq!(f.systemd_unit, None);
    }

    #[test]
    fn cgroup_v2_systemd_driver_crio_and_its_monitor() {
        let under = UID.replace('-', "_");
        let text = format!("0::/kubepods.slice/kubepods-pod{under}.slice/crio-{CID}.scope\n");
        let f = parse(&text);
        assert_eq!(f.pod_uid.as_deref(), Some(UID));
        assert_eq!(f.container_id.as_deref(), Some(CID));
        let conmon =
            format!("0::/kubepods.slice/kubepods-pod{under}.slice/crio-conmon-{CID}.scope\n");
        let f = parse(&conmon);
        assert_eq!(f.pod_uid.as_deref(), Some(UID));
        assert_eq!(f.container_id, None, "the monitor is not the container");
    }

    #[test]
    fn cgroup_v1_systemd_driver_crio() {
        let under = UID.replace('-', "_");
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{under}.slice/crio-{CID}.scope"
        );
        let text = format!("4:cpu,cpuacct:{path}\n1:name=systemd:{path}\n");
        let f = parse(&text);
        assert_eq!(f.pod_uid.as_deref(), Some(UID));
        assert_eq!(f.container_id.as_deref(), Some(CID));
    }

    #[test]
    fn cgroup_v2_cgroupfs_driver_containerd() {
        let f = parse(&format!("0::/kubepods/besteffort/pod{UID}/{CID}\n"));
        assert_eq!(f.pod_uid.as_deref(), Some(UID));
        assert_eq!(f.container_id.as_deref(), Some(CID));
        assert_eq!(f.systemd_unit, None);
    }

    #[test]
    fn cgroup_v2_cgroupfs_driver_crio() {
        let f = parse(&format!("0::/kubepods/burstable/pod{UID}/crio-{CID}\n"));
        assert_eq!(f.pod_uid.as_deref(), Some(UID));
        assert_eq!(f.container_id.as_deref(), Some(CID));
    }

    #[test]
    fn cgroup_v1_cgroupfs_driver_crio() {
        let path = format!("/kubepods/pod{UID}/crio-{CID}");
        let f = parse(&format!(
            "7:cpuset:{path}\n3:memory:{path}\n1:name=systemd:{path}\n"
        ));
        assert_eq!(f.pod_uid.as_deref(), Some(UID));
        assert_eq!(f.container_id.as_deref(), Some(CID));
    }

    #[test]
    fn cgroup_v1_systemd_driver_containerd_and_docker() {
        let under = UID.replace('-', "_");
        for scope in [
            format!("cri-containerd-{CID}.scope"),
            format!("docker-{CID}.scope"),
        ] {
            let path = format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{under}.slice/{scope}"
            );
            let f = parse(&format!(
                "11:devices:{path}\n4:memory:{path}\n1:name=systemd:{path}\n0::/\n"
            ));
            assert_eq!(f.pod_uid.as_deref(), Some(UID), "{scope}");
            assert_eq!(f.container_id.as_deref(), Some(CID), "{scope}");
            assert_eq!(f.systemd_unit, None);
        }
    }

    #[test]
    fn static_pods_nested_kubelets_and_cgroup_namespaces() {
        // A static pod's UID is a hash of its manifest.
        let hash = "6d6f0a0b1c2d3e4f5a6b7c8d9e0f1a2b";
        let f = parse(&format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{hash}.slice/cri-containerd-{CID}.scope\n"
        ));
        assert_eq!(f.pod_uid.as_deref(), Some(hash));
        assert_eq!(f.container_id.as_deref(), Some(CID));
        // kind and other nested kubelets prefix the slices.
        let under = UID.replace('-', "_");
        let f = parse(&format!(
            "0::/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{under}.slice/cri-containerd-{CID}.scope\n"
        ));
        assert_eq!(f.pod_uid.as_deref(), Some(UID));
        assert_eq!(f.container_id.as_deref(), Some(CID));
        // Read from inside another cgroup namespace: relative to the reader's cgroup.
        let f = parse(&format!(
            "0::/../../kubepods-besteffort-pod{under}.slice/cri-containerd-{CID}.scope\n"
        ));
        assert_eq!(f.pod_uid.as_deref(), Some(UID));
        assert_eq!(f.container_id.as_deref(), Some(CID));
        // A container that runs systemd puts its processes in sub-cgroups of its scope.
        let f = parse(&format!(
            "0::/kubepods.slice/kubepods-pod{under}.slice/cri-containerd-{CID}.scope/system.slice/app.service\n"
        ));
        assert_eq!(f.pod_uid.as_deref(), Some(UID));
        assert_eq!(f.container_id.as_deref(), Some(CID));
        assert_eq!(
            f.systemd_unit, None,
            "a unit inside a container is not the host's"
        );
    }

    #[test]
    fn systemd_services_v1_and_v2() {
        let f = parse("0::/system.slice/nginx.service\n");
        assert_eq!(f.systemd_unit.as_deref(), Some("nginx.service"));
        assert_eq!((f.pod_uid, f.container_id), (None, None));
        let f =
            parse("0::/user.slice/user-1000.slice/user@1000.service/app.slice/sync@home.service\n");
        assert_eq!(f.systemd_unit.as_deref(), Some("sync@home.service"));
        let v1 = "5:memory:/user.slice\n1:name=systemd:/system.slice/api.service\n";
        assert_eq!(parse(v1).systemd_unit.as_deref(), Some("api.service"));
        // A login session or a plain slice is not a service.
        assert_eq!(
            parse("0::/user.slice/user-1000.slice/session-3.scope\n").systemd_unit,
            None
        );
        assert_eq!(parse("0::/\n").systemd_unit, None);
    }

    #[test]
    fn garbage_and_disagreement_yield_nothing() {
        assert_eq!(parse(""), CgroupFacts::default());
        assert_eq!(parse("not a cgroup line\n::\n0::"), CgroupFacts::default());
        // `kubepods` alone is not a pod; a short hex segment is not a container.
        assert_eq!(
            parse("0::/kubepods/besteffort/abc123\n"),
            CgroupFacts::default()
        );
        let other = "0f".repeat(32);
        let text = format!(
            "2:memory:/kubepods/pod{UID}/{CID}\n1:name=systemd:/kubepods/pod{UID}/{other}\n"
        );
        let f = parse(&text);
        assert_eq!(f.pod_uid.as_deref(), Some(UID));
        assert_eq!(f.container_id, None, "hierarchies disagree");
    }

    #[test]
    fn reads_a_proc_tree() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("42")).unwrap();
        std::fs::write(
            root.path().join("42/cgroup"),
            "0::/system.slice/db.service\n",
        )
        .unwrap();
        let f = read(root.path(), 42).unwrap();
        assert_eq!(f.systemd_unit.as_deref(), Some("db.service"));
        assert!(read(root.path(), 43).is_err());
        // This very process: whatever it is in, parsing the real file works.
        let own = read(
            Path::new("/proc"),
            i32::try_from(std::process::id()).unwrap(),
        );
        assert!(own.is_ok());
    }

    proptest::proptest! {
        /// Whatever the file holds, parsing is total and only ever yields well-formed facts.
        #[test]
        fn parsing_never_panics_and_yields_only_well_formed_facts(
            text in "([0-9]{1,2}:[a-z=,_]{0,12}:(/[a-z0-9_.@-]{0,70}){0,6}\n){0,4}",
            noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
        ) {
            for input in [text, String::from_utf8_lossy(&noise).into_owned()] {
                let f = parse(&input);
                if let Some(uid) = &f.pod_uid {
                    proptest::prop_assert!(is_pod_uid(uid), "{uid}");
                }
                if let Some(id) = &f.container_id {
                    proptest::prop_assert!(id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()));
                }
                if let Some(unit) = &f.systemd_unit {
                    proptest::prop_assert!(unit.ends_with(".service") && !unit.contains('/'));
                }
            }
        }

        /// A pod path built from any UID and container ID reads back as them, in every layout.
        #[test]
        fn any_pod_and_container_read_back(
            uid in "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
            cid in "[0-9a-f]{64}",
            qos in proptest::sample::select(vec!["", "burstable", "besteffort"]),
        ) {
            let under = uid.replace('-', "_");
            let slice = if qos.is_empty() {
                format!("/kubepods.slice/kubepods-pod{under}.slice")
            } else {
                format!("/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{under}.slice")
            };
            let dir = if qos.is_empty() { format!("/kubepods/pod{uid}") } else { format!("/kubepods/{qos}/pod{uid}") };
            for path in [
                format!("{dir}/{cid}"),
                format!("{dir}/crio-{cid}"),
                format!("{slice}/cri-containerd-{cid}.scope"),
                format!("{slice}/crio-{cid}.scope"),
                format!("{slice}/docker-{cid}.scope"),
            ] {
                for text in [format!("0::{path}\n"), format!("4:memory:{path}\n1:name=systemd:{path}\n")] {
                    let f = parse(&text);
                    proptest::prop_assert_eq!(f.pod_container(), Some((uid.as_str(), cid.as_str())), "{}", text);
                }
            }
        }
    }
}
