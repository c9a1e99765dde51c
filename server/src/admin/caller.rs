//! Who is calling the admin API, and how we know.
//!
//! The admin socket accepts only peers whose credentials (`SO_PEERCRED`) the
//! kernel vouches for; the caller is that user. Policy decides on it and the
//! audit log records it. A request that reaches a handler without a known
//! caller (only possible when the router is used without the listener) is
//! refused.

use axum::extract::connect_info::Connected;
use axum::serve::IncomingStream;

/// How an admin caller was authenticated.
pub const UNIX_PEER_CREDENTIALS: &str = "unix_peer_credentials";

/// The authenticated caller of an admin API request, available to handlers
/// and middleware as a request extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminCaller {
    /// The caller's user id.
    pub uid: u32,
    /// The caller's process id, when the kernel reported it.
    pub pid: Option<i32>,
    /// How the caller was authenticated (see [`UNIX_PEER_CREDENTIALS`]).
    pub authenticated_by: &'static str,
}

impl AdminCaller {
    /// A caller authenticated by the socket's peer credentials.
    pub fn unix(uid: u32, pid: Option<i32>) -> Self {
        Self {
            uid,
            pid,
            authenticated_by: UNIX_PEER_CREDENTIALS,
        }
    }

    /// The caller's identity as policy and audit name it: `unix:uid:<uid>`.
    pub fn id(&self) -> String {
        format!("unix:uid:{}", self.uid)
    }
}

impl Connected<IncomingStream<'_, super::OwnerOnly>> for AdminCaller {
    fn connect_info(stream: IncomingStream<'_, super::OwnerOnly>) -> Self {
        stream.remote_addr().clone()
    }
}

/// Moves the connection's caller into the request's extensions as a plain
/// [`AdminCaller`], so that handlers need not know about connect info.
pub async fn attach(
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if let Some(axum::extract::ConnectInfo(caller)) = req
        .extensions()
        .get::<axum::extract::ConnectInfo<AdminCaller>>()
        .cloned()
    {
        req.extensions_mut().insert(caller);
    }
    next.run(req).await
}
