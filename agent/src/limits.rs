//! Process resource limits the agent adjusts at start.
//!
//! Every Workload API client holds one connection (one file descriptor) for as long as it
//! watches its SVIDs, and every watched task holds a pidfd: a host with thousands of workloads
//! needs thousands of descriptors. Many systems start services with a soft `RLIMIT_NOFILE` of
//! 1024 and a much higher hard limit, so the agent raises its soft limit to the hard limit, as
//! the Go runtime does for every Go program (SPIRE's agent included). It never tries to raise
//! the hard limit: that is the administrator's choice (`LimitNOFILE=` in a systemd unit,
//! `ulimit -Hn`, the container runtime).

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// The open-file limits before and after [`raise_open_files_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFilesLimit {
    /// The soft limit found at start (`None`: unlimited).
    pub before: Option<u64>,
    /// The soft limit now.
    pub now: Option<u64>,
    /// The hard limit (`None`: unlimited).
    pub hard: Option<u64>,
}

/// Why the open-file limit could not be raised.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LimitError {
    /// `setrlimit(RLIMIT_NOFILE)` failed.
    #[error("cannot raise the open-file limit from {from} to {to}: {source}")]
    Set {
        /// The soft limit found.
        from: u64,
        /// The limit asked for.
        to: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The soft limit to ask for given the current `(soft, hard)` limits, or `None` when nothing
/// is to be done (already at the hard limit, or either is unlimited).
fn target(soft: Option<u64>, hard: Option<u64>) -> Option<u64> {
    match (soft, hard) {
        (Some(soft), Some(hard)) if soft < hard => Some(hard),
        _ => None,
    }
}

/// Raises the soft `RLIMIT_NOFILE` of this process to its hard limit.
pub fn raise_open_files_limit() -> Result<OpenFilesLimit, LimitError> {
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    let Some(to) = target(current, maximum) else {
        return Ok(OpenFilesLimit {
            before: current,
            now: current,
            hard: maximum,
        });
    };
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(to),
            maximum,
        },
    )
    .map_err(|e| LimitError::Set {
        from: current.unwrap_or_default(),
        to,
        source: e.into(),
    })?;
    Ok(OpenFilesLimit {
        before: current,
        now: getrlimit(Resource::Nofile).current,
        hard: maximum,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_goes_up_to_hard_only() {
        assert_eq!(target(Some(1024), Some(524_288)), Some(524_288));
        assert_eq!(target(Some(4096), Some(4096)), None);
        assert_eq!(target(None, None), None);
        assert_eq!(target(Some(1024), None), None);
    }

    #[test]
    fn the_limit_ends_at_the_hard_limit() {
        let limit = raise_open_files_limit().unwrap();
        assert_eq!(limit.now, limit.hard.or(limit.before));
        assert_eq!(getrlimit(Resource::Nofile).current, limit.now);
    }
}
