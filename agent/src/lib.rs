pub mod api;
pub mod cache;
