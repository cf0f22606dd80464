//! Errors of the simulator library.

use std::net::SocketAddr;

/// Why a fleet could not be configured or started; nothing is left running when returned.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The profile name is not one of the built-in profiles.
    #[error("unknown engine profile `{name}` (known: {known})")]
    UnknownProfile {
        /// The name asked for.
        name: String,
        /// The names that exist.
        known: String,
    },
    /// A profile constant is out of range.
    #[error("invalid engine profile: `{field}` {reason}")]
    InvalidProfile {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A fleet setting is out of range.
    #[error("invalid fleet config: `{field}` {reason}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The pod index does not exist or the pod was stopped; nothing changed.
    #[error("no running pod {index}")]
    NoSuchPod {
        /// The index asked for.
        index: usize,
    },
    /// A pod's KV-event publisher could not start (port taken, bad endpoint); pods already
    /// started were stopped.
    #[error("pod {pod}: KV-event publisher: {source}")]
    KvEvents {
        /// Index of the pod.
        pod: usize,
        /// The publisher's error.
        source: infermesh_kvevents::PublisherError,
    },
    /// A pod's listener could not be bound; pods already started were stopped.
    #[error("cannot bind pod {pod} to {addr}: {source}")]
    Bind {
        /// Index of the pod.
        pod: usize,
        /// Address it tried.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}
