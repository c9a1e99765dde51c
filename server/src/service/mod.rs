//! Server operations shared by the node API and the admin API, as methods
//! on [`crate::state::ServerState`]: one path for each thing the server does.

pub mod agents;
pub mod entries;
pub mod mint;
pub mod sign;
pub mod tokens;
