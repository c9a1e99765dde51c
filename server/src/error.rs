//! The server's domain error, mapped to HTTP in `admin::error` and to gRPC
//! status codes in `node::status` — one place each.

use crate::store::StoreError;

/// What went wrong in a server operation, in terms a caller can act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// The request is malformed or a field is invalid.
    #[error("{0}")]
    InvalidArgument(String),
    /// The named thing does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The thing already exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// The caller is known but not allowed to do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The caller could not be authenticated (no, bad, expired or superseded credentials).
    #[error("{0}")]
    Unauthenticated(String),
    /// The system is not in a state that allows this (for example a banned agent).
    #[error("{0}")]
    FailedPrecondition(String),
    /// Policy (or a registration rule expressed as policy) refused the
    /// request. `reasons` are the ids of the policies that decided it.
    #[error("{message}")]
    PolicyDenied {
        /// What was refused and why, for the caller.
        message: String,
        /// Ids of the policies that determined the decision.
        reasons: Vec<String>,
    },
    /// The request needs a fresher node attestation: a re-attestable agent
    /// attests again and retries; others are refused with this message.
    #[error("{0}")]
    ReattestRequired(String),
    /// The caller exceeded its rate limit; it may retry later.
    #[error("{0}")]
    RateLimited(String),
    /// A service the server depends on (a cluster's API) failed; the
    /// caller may retry.
    #[error("{0}")]
    Unavailable(String),
    /// Storage failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Anything else; the message is safe to show (no secrets).
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<mayfly::entry::EntryError> for ServiceError {
    fn from(e: mayfly::entry::EntryError) -> Self {
        Self::InvalidArgument(e.to_string())
    }
}

impl From<mayfly::x509::X509Error> for ServiceError {
    fn from(e: mayfly::x509::X509Error) -> Self {
        match e {
            mayfly::x509::X509Error::BadCsr(_) | mayfly::x509::X509Error::NotSvid(_) => {
                Self::InvalidArgument(e.to_string())
            }
            other => Self::Internal(other.to_string()),
        }
    }
}

impl From<crate::authority::AuthorityError> for ServiceError {
    fn from(e: crate::authority::AuthorityError) -> Self {
        Self::Internal(e.to_string())
    }
}

/// Shorthand.
pub type ServiceResult<T> = Result<T, ServiceError>;
