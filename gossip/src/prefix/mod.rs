//! Prefix ownership: the owner-side index and its distribution over the ring.

pub mod owner;
pub mod store;
