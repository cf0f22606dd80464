//! The openraft type configuration shared by every part of the store.

use std::io::Cursor;

use crate::policy::{PolicyRequest, PolicyResponse};

/// Raft node id.
pub type NodeId = u64;

/// What openraft keeps per member: the address the transport dials (the mesh RPC address).
pub type Node = openraft::BasicNode;

openraft::declare_raft_types!(
    /// openraft types for the policy store.
    pub TypeConfig:
        D = PolicyRequest,
        R = PolicyResponse,
        NodeId = NodeId,
        Node = Node,
        SnapshotData = Cursor<Vec<u8>>,
);

/// A Raft log entry of the policy store.
pub type Entry = openraft::Entry<TypeConfig>;
/// A log id of the policy store.
pub type LogId = openraft::LogId<NodeId>;
/// The openraft handle type of the policy store.
pub type Raft = openraft::Raft<TypeConfig>;
/// openraft's storage error for this store.
pub type StorageError = openraft::StorageError<NodeId>;
