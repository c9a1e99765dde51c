//! What every scenario shares: the real server and agent processes, the
//! closed-loop load driver, latency statistics, result rows, the table and
//! the JSON document.

pub mod load;
pub mod procs;
pub mod report;
pub mod stats;

pub use load::{Worker, measure_variant};
pub use procs::{Agent, Server, TRUST_DOMAIN};
pub use report::{Report, Row};
pub use stats::Latency;
