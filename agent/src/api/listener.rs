//! The Workload API's Unix socket: binding it, and turning accepted connections into
//! transports that carry the caller's kernel credentials.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::server::Connected;

use super::authority::NormalizeAuthority;
use crate::workload::PeerInfo;

/// The `:authority` every request is rewritten to (see [`NormalizeAuthority`]).
const AUTHORITY: &str = "localhost";

/// How long the accept loop pauses after an accept error (for example too many open files),
/// so that it does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Why the Workload API socket could not be bound.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ListenerError {
    /// The socket's directory could not be created.
    #[error("cannot create the socket directory {path}: {source}")]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Something that is not a socket is in the way; it is never deleted.
    #[error("{0} exists and is not a socket; remove it or choose another socket_path")]
    NotASocket(PathBuf),
    /// Another process is serving on the socket (a second agent?).
    #[error("another process is already serving on {0}")]
    InUse(PathBuf),
    /// A stale socket could not be removed.
    #[error("cannot remove the stale socket {path}: {source}")]
    RemoveStale {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// `bind` failed.
    #[error("cannot bind {path}: {source}")]
    Bind {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The socket's permissions could not be set.
    #[error("cannot set permissions on {path}: {source}")]
    Chmod {
        /// The socket.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Binds the Workload API socket at `path`.
///
/// Creates the parent directory if needed, removes a stale socket left by a previous run
/// (refusing when something else is in the way or another process is still serving on it),
/// binds, and makes the socket connectable by every local user (mode 0777): the Workload API
/// decides what a caller gets by attesting it, not by file permissions.
///
/// Must be called inside a Tokio runtime.
pub fn bind(path: &Path) -> Result<UnixListener, ListenerError> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| ListenerError::CreateDir {
            path: parent.to_owned(),
            source,
        })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(ListenerError::InUse(path.to_owned()));
            }
            std::fs::remove_file(path).map_err(|source| ListenerError::RemoveStale {
                path: path.to_owned(),
                source,
            })?;
        }
        Ok(_) => return Err(ListenerError::NotASocket(path.to_owned())),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| ListenerError::Bind {
        path: path.to_owned(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).map_err(|source| {
        ListenerError::Chmod {
            path: path.to_owned(),
            source,
        }
    })?;
    Ok(listener)
}

/// An accepted Workload API connection: the socket, wrapped so that every request's
/// `:authority` is `localhost`, with the caller's credentials read when it was accepted.
/// Tonic hands [`PeerInfo`] to every request on it as a request extension.
#[derive(Debug)]
pub struct WorkloadConnection {
    io: NormalizeAuthority<UnixStream>,
    peer: PeerInfo,
}

impl WorkloadConnection {
    /// Reads the peer's credentials from `stream` and wraps it.
    pub fn new(stream: UnixStream) -> io::Result<Self> {
        let cred = stream.peer_cred()?;
        let pid = cred.pid().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::Unsupported,
                "the kernel did not report the peer's pid",
            )
        })?;
        // Read at once, while the pid most likely still names the process that connected; the
        // attestor compares it again later to catch a recycled pid.
        let start_time = crate::workload::unix::process_start_time(Path::new("/proc"), pid)
            .map_err(|e| io::Error::new(io::ErrorKind::NotFound, e.to_string()))?;
        let peer = PeerInfo {
            pid,
            uid: cred.uid(),
            gid: cred.gid(),
            start_time: Some(start_time),
        };
        Ok(Self {
            io: NormalizeAuthority::new(stream, AUTHORITY),
            peer,
        })
    }

    /// The caller's credentials.
    pub fn peer(&self) -> PeerInfo {
        self.peer
    }

    /// The underlying socket.
    pub fn get_ref(&self) -> &UnixStream {
        self.io.get_ref()
    }
}

impl Connected for WorkloadConnection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer
    }
}

impl AsyncRead for WorkloadConnection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for WorkloadConnection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Accepts connections forever, reading each caller's credentials at once. A connection whose
/// credentials cannot be read is logged and dropped; accept errors are logged and retried after
/// a short pause. The stream never yields an error, so one bad connection never stops the server.
pub fn incoming(
    listener: UnixListener,
) -> impl Stream<Item = Result<WorkloadConnection, io::Error>> + Send + 'static {
    async_stream::stream! {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => match WorkloadConnection::new(stream) {
                    Ok(conn) => yield Ok(conn),
                    Err(e) => {
                        tracing::warn!(error = %e, "dropping a Workload API connection: cannot read its peer credentials");
                    }
                },
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a Workload API connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bind_replaces_stale_socket_and_opens_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/agent.sock");
        let first = bind(&path).unwrap();
        // While it is being served, a second bind is refused.
        assert!(matches!(bind(&path), Err(ListenerError::InUse(_))));
        drop(first);
        // The socket file is left behind (stale); binding again replaces it.
        assert!(path.exists());
        let _second = bind(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o777);
    }

    #[tokio::test]
    async fn bind_never_deletes_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        std::fs::write(&path, b"not a socket").unwrap();
        assert!(matches!(bind(&path), Err(ListenerError::NotASocket(_))));
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket");
    }

    #[tokio::test]
    async fn accepted_connections_carry_peer_credentials() {
        use futures::StreamExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = bind(&path).unwrap();
        let mut conns = Box::pin(incoming(listener));
        let _client = UnixStream::connect(&path).await.unwrap();
        let conn = conns.next().await.unwrap().unwrap();
        let peer = conn.connect_info();
        assert_eq!(peer.pid, i32::try_from(std::process::id()).unwrap());
        assert_eq!(peer.uid, nix::unistd::geteuid().as_raw());
        assert_eq!(peer.gid, nix::unistd::getegid().as_raw());
        let own = crate::workload::unix::process_start_time(Path::new("/proc"), peer.pid).unwrap();
        assert_eq!(peer.start_time, Some(own));
    }
}
