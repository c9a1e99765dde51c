//! Mayfly server: the certificate authority and registry of a SPIFFE trust
//! domain.

pub mod admin;
pub mod audit;
pub mod authority;
pub mod cli;
pub mod commit;
pub mod config;
pub mod error;
pub mod feed;
pub mod import;
pub mod k8s;
pub mod logging;
pub mod node;
pub mod policy;
pub mod public;
pub mod revocation;
pub mod run;
pub mod service;
pub mod state;
pub mod store;
pub mod tls;
