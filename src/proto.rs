//! Protocol code generated from `proto/` by `build.rs`.
#![allow(missing_docs, clippy::all, missing_debug_implementations)]

/// The SPIFFE Workload API (no proto package).
pub mod workload {
    tonic::include_proto!("_");
}

/// Mayfly's node API, `mayfly.node.v1`.
pub mod node {
    tonic::include_proto!("mayfly.node.v1");
}

/// The agent's task service, `mayfly.task.v1`.
pub mod task {
    tonic::include_proto!("mayfly.task.v1");
}
