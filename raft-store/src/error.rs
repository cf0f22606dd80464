//! Errors at the store's boundary. Each variant says whether state changed.

use crate::disk::DiskError;
use crate::policy::{InvalidDocument, Rejection};
use crate::types::{Node, NodeId};

/// A boxed source error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The store could not be opened; nothing was started.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The redb file could not be opened or read.
    #[error("policy store file: {0}")]
    Disk(#[from] DiskError),
    /// The Raft timings are inconsistent.
    #[error("raft config: {0}")]
    Config(#[source] Box<openraft::ConfigError>),
    /// openraft refused to start (storage error while loading).
    #[error("raft start: {0}")]
    Start(#[source] BoxError),
}

/// A policy write was not applied.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// This node is not (or no longer) the leader. Refused up front, nothing changed; but if
    /// leadership was lost while the write was in flight it may still commit, so re-read
    /// before retrying a conditional write. Retry at `leader` (the node forwards).
    #[error("not the leader; leader is {}", leader.map_or("unknown".to_string(), |l| l.to_string()))]
    NotLeader {
        /// The leader's id, if known.
        leader: Option<NodeId>,
        /// The leader's Raft address, if known.
        leader_node: Option<Node>,
    },
    /// A document is invalid (HTTP 400); nothing changed.
    #[error(transparent)]
    Invalid(#[from] InvalidDocument),
    /// The state machine refused the write at its log position (409 conflict / 404 not
    /// found); nothing changed.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    /// No quorum, shutting down, or the forward failed. The write may or may not have
    /// been committed (as with any lost answer); re-read before retrying a conditional write.
    #[error("policy store unavailable: {0}")]
    Unavailable(#[source] BoxError),
}

/// A linearizable read could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// This node is not the leader; read at `leader`.
    #[error("not the leader; leader is {}", leader.map_or("unknown".to_string(), |l| l.to_string()))]
    NotLeader {
        /// The leader's id, if known.
        leader: Option<NodeId>,
        /// The leader's Raft address, if known.
        leader_node: Option<Node>,
    },
    /// The leader could not confirm its leadership with a quorum.
    #[error("policy store unavailable: {0}")]
    Unavailable(#[source] BoxError),
}

/// A cluster operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Only the leader changes membership; nothing changed.
    #[error("not the leader; leader is {}", leader.map_or("unknown".to_string(), |l| l.to_string()))]
    NotLeader {
        /// The leader's id, if known.
        leader: Option<NodeId>,
        /// The leader's Raft address, if known.
        leader_node: Option<Node>,
    },
    /// `bootstrap` on a node that already has state; nothing changed.
    #[error("this node is already part of an initialised cluster")]
    AlreadyInitialized,
    /// The requested voter set size is not allowed (1, 3 or 5); nothing changed.
    #[error("a cluster has 1, 3 or 5 voters; this change would leave {voters}")]
    VoterCount {
        /// The voter count the change would produce.
        voters: usize,
    },
    /// The node is not a member; nothing changed.
    #[error("node {0} is not a member")]
    UnknownNode(NodeId),
    /// openraft refused the change (another change in progress, learner missing, ...);
    /// nothing changed.
    #[error("membership change refused: {0}")]
    Refused(#[source] BoxError),
    /// The operation did not finish in time; it may complete later.
    #[error("{what} did not finish within {waited_ms} ms")]
    Timeout {
        /// Which operation.
        what: &'static str,
        /// How long we waited.
        waited_ms: u64,
    },
    /// The store is shutting down or its storage failed.
    #[error("policy store unavailable: {0}")]
    Unavailable(#[source] BoxError),
    /// Writing the bootstrap tokens failed.
    #[error("bootstrap token write: {0}")]
    Tokens(#[source] Box<WriteError>),
}
