//! wip
pub mod auth;
pub mod load;
pub mod prefix;
pub mod ring;
pub mod wire;
pub mod tls;
