//! [`ServiceError`] → gRPC [`Status`], in one place. Internal and storage
//! failures are logged here and answered with a generic message.

use tonic::Status;

use crate::error::ServiceError;

/// gRPC metadata key set (to `required`) on a `FailedPrecondition` that asks
/// the agent to attest again before it retries the call.
pub const REATTEST_METADATA: &str = "mayfly-reattest";

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::InvalidArgument(m) => Status::invalid_argument(m),
            ServiceError::NotFound(m) => Status::not_found(m),
            ServiceError::AlreadyExists(m) => Status::already_exists(m),
            ServiceError::PermissionDenied(m) => Status::permission_denied(m),
            ServiceError::Unauthenticated(m) => Status::unauthenticated(m),
            ServiceError::FailedPrecondition(m) => Status::failed_precondition(m),
            ServiceError::PolicyDenied { message, .. } => Status::permission_denied(message),
            ServiceError::ReattestRequired(m) => {
                let mut s = Status::failed_precondition(m);
                s.metadata_mut().insert(
                    REATTEST_METADATA,
                    tonic::metadata::MetadataValue::from_static("required"),
                );
                s
            }
            ServiceError::RateLimited(m) => Status::resource_exhausted(m),
            ServiceError::Unavailable(m) => Status::unavailable(m),
            ServiceError::Store(e) => {
                tracing::error!(error = %e, "store failure");
                Status::unavailable("the server's store failed; try again")
            }
            ServiceError::Internal(m) => {
                tracing::error!(error = %m, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;
    use crate::store::StoreError;

    #[test]
    fn codes_and_messages() {
        let s = Status::from(ServiceError::PermissionDenied("agent is banned".into()));
        assert_eq!(
            (s.code(), s.message()),
            (Code::PermissionDenied, "agent is banned")
        );
        let s = Status::from(ServiceError::Unauthenticated("x".into()));
        assert_eq!(s.code(), Code::Unauthenticated);
        let s = Status::from(ServiceError::InvalidArgument("x".into()));
        assert_eq!(s.code(), Code::InvalidArgument);
        let s = Status::from(ServiceError::Internal("detail with a path".into()));
        assert_eq!((s.code(), s.message()), (Code::Internal, "internal error"));
        let s = Status::from(ServiceError::Store(StoreError::Backend("disk".into())));
        assert_eq!(s.code(), Code::Unavailable);
        assert!(!s.message().contains("disk"));
    }
}
