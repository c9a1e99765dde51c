//! Mayfly core: the identity types, registration entries and their matching
//! rules, SVID minting and validation, and the SPIFFE bundle format.
//!
//! This crate performs no I/O: it takes bytes, keys and the current time and
//! returns credentials and decisions, so that every rule here can be tested
//! without sockets, files or a runtime. The server and the agent own all I/O.

pub mod authority;
pub mod bundle;
pub mod clock;
pub mod config;
pub mod entry;
pub mod id;
pub mod jwt;
pub mod k8s_psat;
pub mod matching;
pub mod proto;
pub mod revocation;
pub mod selector;
pub mod template;
pub mod ttl;
pub mod x509;
pub mod x509pop;

pub use spiffe::{SpiffeId, TrustDomain};
