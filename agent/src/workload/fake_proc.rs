//! A `/proc`-like tree for tests: a pid with a start time and a cgroup file.

use std::path::Path;

/// Writes `<root>/<pid>/stat` with start time `start` (field 22; the command name holds a
/// space and parentheses, as real ones may) and `<root>/<pid>/cgroup` with `cgroup`.
pub(crate) fn write_process(root: &Path, pid: i32, start: u64, cgroup: &str) {
    let dir = root.join(pid.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cgroup"), cgroup).unwrap();
    // Field 3 is the state; fields 4..=21 are filler; field 22 is the start time.
    let filler: Vec<String> = (4..=21).map(|i| i.to_string()).collect();
    std::fs::write(
        dir.join("stat"),
        format!("{pid} (my (app)) S {} {start} 0 0\n", filler.join(" ")),
    )
    .unwrap();
}
