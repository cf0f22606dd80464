//! The load board: pod scrape ownership, metrics and fleet-wide in-flight counts.

pub mod board;
pub(crate) mod driver;
