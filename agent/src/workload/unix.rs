//! The `unix` workload attestor: selectors from the caller's kernel credentials and `/proc`.
//!
//! | selector | source |
//! |---|---|
//! | `unix:uid:<n>`, `unix:gid:<n>` | `SO_PEERCRED` (effective ids at connect time) |
//! | `unix:user:<name>`, `unix:group:<name>` | the system's user and group databases, when the ids resolve |
//! | `unix:supplementary_gid:<n>`, `unix:supplementary_group:<name>` | the `Groups:` line of `/proc/<pid>/status` |
//! | `unix:path:<exe>` | `readlink /proc/<pid>/exe` |
//! | `unix:sha256:<hex>` | the binary, read through `/proc/<pid>/exe` |
//!
//! The binary is hashed through `/proc/<pid>/exe`, not through its path, so a file replaced or
//! deleted since the process started is not hashed in its place. Hashes are cached by the file's
//! device, inode, mtime, ctime and size, so a busy workload is hashed once. Binaries larger than
//! a bound (512 MiB by default) get no `sha256` selector.
//!
//! A pid can be reused once its process exits. The listener reads the caller's start time right
//! after accepting the connection ([`PeerInfo::start_time`]); the attestor compares it with the
//! start time it reads now and refuses a different process ([`AttestError::PidReused`]), and it
//! reads the start time again after reading `/proc` and fails with [`AttestError::ProcessGone`]
//! if it changed meanwhile, so the selectors never mix two processes and never describe a
//! process that inherited the caller's pid.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use mayfly::selector::{Selector, SelectorSet};
use nix::unistd::{Gid, Group, Uid, User};
use sha2::{Digest, Sha256};

use super::{AttestError, PeerInfo, WorkloadAttestor};

/// Binaries larger than this are not hashed by default.
pub const DEFAULT_MAX_HASH_SIZE: u64 = 512 * 1024 * 1024;

/// Hashes kept at most; the cache is emptied when it fills, which is rare and cheap to recover.
const HASH_CACHE_CAPACITY: usize = 1024;

/// Read size while hashing.
const HASH_CHUNK: usize = 64 * 1024;

/// Identifies one version of one file: a rewrite changes mtime/ctime or size, a replacement
/// changes the inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct FileKey {
    dev: u64,
    ino: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    size: u64,
}

impl FileKey {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            size: meta.size(),
        }
    }
}

/// The unix attestor. Cheap to clone; clones share the hash cache.
#[derive(Debug, Clone)]
pub struct UnixAttestor {
    proc_root: PathBuf,
    max_hash_size: u64,
    hashes: Arc<Mutex<HashMap<FileKey, String>>>,
}

impl Default for UnixAttestor {
    fn default() -> Self {
        Self::new()
    }
}

impl UnixAttestor {
    /// An attestor reading the real `/proc`.
    pub fn new() -> Self {
        Self::with_proc_root("/proc")
    }

    /// An attestor reading a `/proc`-like tree at `root` (for tests, or a host `/proc`
    /// mounted elsewhere in a container).
    pub fn with_proc_root(root: impl Into<PathBuf>) -> Self {
        Self {
            proc_root: root.into(),
            max_hash_size: DEFAULT_MAX_HASH_SIZE,
            hashes: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Binaries larger than `bytes` get no `unix:sha256` selector.
    pub fn with_max_hash_size(mut self, bytes: u64) -> Self {
        self.max_hash_size = bytes;
        self
    }

    /// Attests `peer`, blocking (reads `/proc`, may hash a binary, may query NSS). The async
    /// [`WorkloadAttestor::attest`] runs this on the blocking pool.
    pub fn attest_blocking(&self, peer: &PeerInfo) -> Result<SelectorSet, AttestError> {
        let pid = peer.pid;
        let dir = self.proc_root.join(pid.to_string());
        let started = read_start_time(&dir, pid)?;
        if peer
            .start_time
            .is_some_and(|at_accept| at_accept != started)
        {
            tracing::warn!(
                pid,
                "the caller's pid now belongs to another process (pid reused); refusing"
            );
            return Err(AttestError::PidReused { pid });
        }

        let mut out = SelectorSet::new();
        push(&mut out, format!("uid:{}", peer.uid));
        push(&mut out, format!("gid:{}", peer.gid));
        if let Some(name) = user_name(peer.uid) {
            push(&mut out, format!("user:{name}"));
        }
        if let Some(name) = group_name(peer.gid) {
            push(&mut out, format!("group:{name}"));
        }

        let status_path = dir.join("status");
        let status =
            std::fs::read_to_string(&status_path).map_err(|e| proc_error(pid, &status_path, e))?;
        for gid in supplementary_gids(&status, pid, &status_path)? {
            push(&mut out, format!("supplementary_gid:{gid}"));
            if let Some(name) = group_name(gid) {
                push(&mut out, format!("supplementary_group:{name}"));
            }
        }

        let exe = dir.join("exe");
        match std::fs::read_link(&exe) {
            Ok(path) => {
                push(&mut out, format!("path:{}", path.display()));
                if let Some(hex) = self.binary_sha256(&exe, pid)? {
                    push(&mut out, format!("sha256:{hex}"));
                }
            }
            // Reading another user's /proc/<pid>/exe needs ptrace access; an agent that lacks
            // it still attests ids and groups, and entries that need a path do not match.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                tracing::warn!(
                    pid,
                    "cannot read the caller's executable (permission denied); no path or sha256 selectors"
                );
            }
            Err(e) => return Err(proc_error(pid, &exe, e)),
        }

        // Everything above must describe one process: if the pid was reused meanwhile, fail.
        ensure_same_process(&dir, pid, started)?;
        Ok(out)
    }

    /// The hex SHA-256 of the process's binary, or `None` when it is over the size bound.
    fn binary_sha256(&self, exe: &Path, pid: i32) -> Result<Option<String>, AttestError> {
        let mut file = match File::open(exe) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
                tracing::warn!(
                    pid,
                    "cannot open the caller's executable (permission denied); no sha256 selector"
                );
                return Ok(None);
            }
            Err(e) => return Err(proc_error(pid, exe, e)),
        };
        let meta = file.metadata().map_err(|e| proc_error(pid, exe, e))?;
        if meta.size() > self.max_hash_size {
            tracing::debug!(
                pid,
                size = meta.size(),
                max = self.max_hash_size,
                "binary too large to hash; no sha256 selector"
            );
            return Ok(None);
        }
        let key = FileKey::of(&meta);
        if let Some(hex) = self.lock_hashes().get(&key) {
            return Ok(Some(hex.clone()));
        }
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; HASH_CHUNK];
        loop {
            let n = file.read(&mut buf).map_err(|e| proc_error(pid, exe, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let hex = hex::encode(hasher.finalize());
        let mut hashes = self.lock_hashes();
        if hashes.len() >= HASH_CACHE_CAPACITY {
            hashes.clear();
        }
        hashes.insert(key, hex.clone());
        Ok(Some(hex))
    }

    fn lock_hashes(&self) -> std::sync::MutexGuard<'_, HashMap<FileKey, String>> {
        // The map holds only finished hashes, so a panic elsewhere cannot leave it half-written.
        self.hashes
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[tonic::async_trait]
impl WorkloadAttestor for UnixAttestor {
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

fn push(set: &mut SelectorSet, value: String) {
    // The type is a constant and every value here is non-empty, so this cannot fail; a value
    // that somehow did would only mean one selector fewer.
    if let Ok(s) = Selector::new("unix", value) {
        set.insert(s);
    }
}

/// Maps an I/O error on a `/proc` file: "no such file" or "no such process" mean the process
/// exited.
fn proc_error(pid: i32, path: &Path, e: io::Error) -> AttestError {
    if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) {
        AttestError::ProcessGone { pid }
    } else {
        AttestError::Proc {
            pid,
            path: path.to_owned(),
            source: e,
        }
    }
}

/// The start time of process `pid` (field 22 of `<proc_root>/<pid>/stat`, clock ticks since
/// boot).
pub fn process_start_time(proc_root: &Path, pid: i32) -> Result<u64, AttestError> {
    read_start_time(&proc_root.join(pid.to_string()), pid)
}

/// Field 22 of `/proc/<pid>/stat`: the process start time in clock ticks since boot.
fn read_start_time(dir: &Path, pid: i32) -> Result<u64, AttestError> {
    let path = dir.join("stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| proc_error(pid, &path, e))?;
    parse_start_time(&stat).ok_or_else(|| AttestError::Malformed {
        pid,
        path,
        reason: "no start time (field 22)".into(),
    })
}

/// Fails with [`AttestError::ProcessGone`] unless the process at `dir` still has start time
/// `started`.
fn ensure_same_process(dir: &Path, pid: i32, started: u64) -> Result<(), AttestError> {
    if read_start_time(dir, pid)? == started {
        Ok(())
    } else {
        Err(AttestError::ProcessGone { pid })
    }
}

fn parse_start_time(stat: &str) -> Option<u64> {
    // The command name (field 2) is in parentheses and may itself contain ')' and spaces, so
    // count fields from the last ')': the next field is field 3.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_ascii_whitespace().nth(22 - 3)?.parse().ok()
}

/// The supplementary group ids from a `/proc/<pid>/status` document.
fn supplementary_gids(status: &str, pid: i32, path: &Path) -> Result<Vec<u32>, AttestError> {
    let Some(line) = status.lines().find_map(|l| l.strip_prefix("Groups:")) else {
        return Ok(Vec::new());
    };
    line.split_ascii_whitespace()
        .map(|g| {
            g.parse::<u32>().map_err(|_| AttestError::Malformed {
                pid,
                path: path.to_owned(),
                reason: format!("Groups: entry {g:?} is not a number"),
            })
        })
        .collect()
}

fn user_name(uid: u32) -> Option<String> {
    match User::from_uid(Uid::from_raw(uid)) {
        Ok(Some(u)) => Some(u.name),
        Ok(None) => None,
        Err(e) => {
            tracing::debug!(uid, error = %e, "user lookup failed");
            None
        }
    }
}

fn group_name(gid: u32) -> Option<String> {
    match Group::from_gid(Gid::from_raw(gid)) {
        Ok(Some(g)) => Some(g.name),
        Ok(None) => None,
        Err(e) => {
            tracing::debug!(gid, error = %e, "group lookup failed");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn sel(s: &str) -> Selector {
        s.parse().unwrap()
    }

    fn stat_line(pid: i32, start: u64) -> String {
        // A command name with a space and a parenthesis, as the kernel allows.
        let mut fields = vec!["S".to_owned()];
        fields.extend((4..22).map(|n| n.to_string()));
        fields.push(start.to_string());
        fields.extend((23..=52).map(|n| n.to_string()));
        format!("{pid} (my (odd) prog) {}\n", fields.join(" "))
    }

    struct FakeProc {
        root: tempfile::TempDir,
        binary: PathBuf,
    }

    fn fake_proc(pid: i32, groups: &str, binary_content: &[u8]) -> FakeProc {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join(pid.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("stat"), stat_line(pid, 4242)).unwrap();
        std::fs::write(
            dir.join("status"),
            format!(
                "Name:\tprog\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t{groups}\nVmRSS:\t1 kB\n"
            ),
        )
        .unwrap();
        let binary = root.path().join("usr-bin-prog");
        std::fs::write(&binary, binary_content).unwrap();
        symlink(&binary, dir.join("exe")).unwrap();
        FakeProc { root, binary }
    }

    #[test]
    fn parses_start_time_after_odd_command_names() {
        assert_eq!(parse_start_time(&stat_line(7, 99)), Some(99));
        assert_eq!(parse_start_time("7 (x) S 1 2"), None);
        assert_eq!(parse_start_time("garbage"), None);
    }

    #[test]
    fn fake_proc_tree_gives_every_selector() {
        let fake = fake_proc(4321, "0 27 1234", b"hello workload");
        let attestor = UnixAttestor::with_proc_root(fake.root.path());
        let peer = PeerInfo {
            pid: 4321,
            uid: 0,
            gid: 0,
            start_time: None,
        };
        let got = attestor.attest_blocking(&peer).unwrap();
        let expected_hash = hex::encode(Sha256::digest(b"hello workload"));
        for s in [
            "unix:uid:0".to_owned(),
            "unix:gid:0".to_owned(),
            "unix:user:root".to_owned(),
            "unix:group:root".to_owned(),
            "unix:supplementary_gid:0".to_owned(),
            "unix:supplementary_gid:27".to_owned(),
            "unix:supplementary_gid:1234".to_owned(),
            "unix:supplementary_group:root".to_owned(),
            format!("unix:path:{}", fake.binary.display()),
            format!("unix:sha256:{expected_hash}"),
        ] {
            assert!(got.contains(&sel(&s)), "missing {s} in {got:?}");
        }
        assert!(got.iter().all(|s| s.kind() == "unix"));
    }

    #[test]
    fn empty_groups_and_unknown_ids() {
        let fake = fake_proc(10, "", b"x");
        let attestor = UnixAttestor::with_proc_root(fake.root.path());
        // An id no system has a name for still yields the numeric selector.
        let peer = PeerInfo {
            pid: 10,
            uid: 3_999_999_999,
            gid: 3_999_999_998,
            start_time: None,
        };
        let got = attestor.attest_blocking(&peer).unwrap();
        assert!(got.contains(&sel("unix:uid:3999999999")));
        assert!(got.contains(&sel("unix:gid:3999999998")));
        assert!(!got.iter().any(|s| s.value().starts_with("user:")
            || s.value().starts_with("group:")
            || s.value().starts_with("supplementary")));
    }

    #[test]
    fn missing_process_is_an_error_not_a_panic() {
        let fake = fake_proc(10, "", b"x");
        let attestor = UnixAttestor::with_proc_root(fake.root.path());
        let peer = PeerInfo {
            pid: 11,
            uid: 0,
            gid: 0,
            start_time: None,
        };
        assert!(matches!(
            attestor.attest_blocking(&peer),
            Err(AttestError::ProcessGone { pid: 11 })
        ));
        // Exe gone (a zombie, or exited half-way): also "gone".
        std::fs::remove_file(fake.root.path().join("10/exe")).unwrap();
        let peer = PeerInfo { pid: 10, ..peer };
        assert!(matches!(
            attestor.attest_blocking(&peer),
            Err(AttestError::ProcessGone { pid: 10 })
        ));
    }

    #[test]
    fn malformed_groups_line_is_an_error() {
        let fake = fake_proc(10, "1 two", b"x");
        let attestor = UnixAttestor::with_proc_root(fake.root.path());
        let peer = PeerInfo {
            pid: 10,
            uid: 0,
            gid: 0,
            start_time: None,
        };
        assert!(matches!(
            attestor.attest_blocking(&peer),
            Err(AttestError::Malformed { .. })
        ));
    }

    #[test]
    fn large_binaries_get_no_hash() {
        let fake = fake_proc(10, "", &[7u8; 100]);
        let attestor = UnixAttestor::with_proc_root(fake.root.path()).with_max_hash_size(99);
        let peer = PeerInfo {
            pid: 10,
            uid: 0,
            gid: 0,
            start_time: None,
        };
        let got = attestor.attest_blocking(&peer).unwrap();
        assert!(got.iter().any(|s| s.value().starts_with("path:")));
        assert!(!got.iter().any(|s| s.value().starts_with("sha256:")));
    }

    #[test]
    fn hash_is_cached_until_the_file_changes() {
        let fake = fake_proc(10, "", b"version one");
        let attestor = UnixAttestor::with_proc_root(fake.root.path());
        let peer = PeerInfo {
            pid: 10,
            uid: 0,
            gid: 0,
            start_time: None,
        };
        let hash_of = |set: &SelectorSet| {
            set.iter()
                .find_map(|s| s.value().strip_prefix("sha256:").map(str::to_owned))
                .unwrap()
        };
        let first = hash_of(&attestor.attest_blocking(&peer).unwrap());
        assert_eq!(first, hex::encode(Sha256::digest(b"version one")));
        assert_eq!(attestor.lock_hashes().len(), 1);
        let again = hash_of(&attestor.attest_blocking(&peer).unwrap());
        assert_eq!(again, first);
        assert_eq!(attestor.lock_hashes().len(), 1);

        // A rewrite of the file (new size, mtime, ctime) is hashed afresh.
        std::fs::write(&fake.binary, b"version two, longer").unwrap();
        let changed = hash_of(&attestor.attest_blocking(&peer).unwrap());
        assert_eq!(changed, hex::encode(Sha256::digest(b"version two, longer")));
        assert_eq!(attestor.lock_hashes().len(), 2);
    }

    #[test]
    fn pid_reuse_during_attestation_is_detected() {
        let fake = fake_proc(10, "", b"x");
        let dir = fake.root.path().join("10");
        assert!(ensure_same_process(&dir, 10, 4242).is_ok());
        // Another process now holds pid 10: its start time differs.
        std::fs::write(dir.join("stat"), stat_line(10, 5000)).unwrap();
        assert!(matches!(
            ensure_same_process(&dir, 10, 4242),
            Err(AttestError::ProcessGone { pid: 10 })
        ));
        std::fs::remove_file(dir.join("stat")).unwrap();
        assert!(matches!(
            ensure_same_process(&dir, 10, 4242),
            Err(AttestError::ProcessGone { pid: 10 })
        ));
    }

    #[test]
    fn a_recycled_pid_is_refused() {
        let fake = fake_proc(10, "", b"x");
        let attestor = UnixAttestor::with_proc_root(fake.root.path());
        // Captured at accept time: the process started at tick 4242.
        let at_accept = process_start_time(fake.root.path(), 10).unwrap();
        assert_eq!(at_accept, 4242);
        let peer = PeerInfo {
            pid: 10,
            uid: 0,
            gid: 0,
            start_time: Some(at_accept),
        };
        assert!(attestor.attest_blocking(&peer).is_ok());
        // The caller exited and another process got pid 10.
        std::fs::write(fake.root.path().join("10/stat"), stat_line(10, 9000)).unwrap();
        assert!(matches!(
            attestor.attest_blocking(&peer),
            Err(AttestError::PidReused { pid: 10 })
        ));
        // Refused as PermissionDenied by the Workload API.
        let status = tonic::Status::from(crate::api::ApiError::from(AttestError::PidReused {
            pid: 10,
        }));
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        // The new process itself, connecting anew, is attested on its own.
        let newcomer = PeerInfo {
            start_time: Some(9000),
            ..peer
        };
        assert!(attestor.attest_blocking(&newcomer).is_ok());
    }

    #[tokio::test]
    async fn real_current_process() {
        let attestor = UnixAttestor::new();
        let peer = PeerInfo {
            pid: i32::try_from(std::process::id()).unwrap(),
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
            start_time: None,
        };
        let got = attestor.attest(&peer).await.unwrap();
        let exe = std::env::current_exe().unwrap();
        let bytes = std::fs::read(&exe).unwrap();
        let expected_hash = hex::encode(Sha256::digest(&bytes));
        for s in [
            format!("unix:uid:{}", peer.uid),
            format!("unix:gid:{}", peer.gid),
            format!("unix:path:{}", exe.display()),
            format!("unix:sha256:{expected_hash}"),
        ] {
            assert!(got.contains(&sel(&s)), "missing {s} in {got:?}");
        }
        if let Some(name) = user_name(peer.uid) {
            assert!(got.contains(&sel(&format!("unix:user:{name}"))));
        }
    }
}
