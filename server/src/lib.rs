//! Mayfly server: the certificate authority and registry of a SPIFFE trust
//! domain.

pub mod ca;
pub mod config;
pub mod error;
pub mod state;
pub mod store;
