//! Policy as code at request time (Cedar).
//!
//! Registration says who may be a workload; policy decides, at the moment
//! of each request, whether it gets a credential now. Every node
//! attestation and renewal, every X.509 and JWT issuance and every admin
//! API call is decided here. The model (entities, actions, context) is the
//! schema in [`schema`], documented in `docs/policy.md`; the built-in
//! policies ([`loader::DEFAULT_POLICY`]) reproduce the registration rules.

pub mod engine;
pub mod facts;
pub mod loader;
pub mod prefilter;
pub mod reload;
pub mod request;
pub mod schema;

pub use engine::{Decision, Engine};
pub use loader::{LoadError, LoadErrors, PolicySources};
pub use reload::PolicyStore;
pub use request::{Action, AdminCall, Issue, PolicyRequest};

#[cfg(test)]
mod prefilter_tests;
#[cfg(test)]
mod tests;
