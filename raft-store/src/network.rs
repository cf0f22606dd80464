//! Raft transport: one small trait the node implements over the mesh's QUIC RPC, the
//! postcard wire messages, and openraft's `RaftNetworkFactory` built on top.
//!
//! The store never opens sockets. Outgoing RPCs go through [`RaftTransport::send`] as
//! opaque bytes; the receiving node hands the bytes to `PolicyStore::handle_rpc` and
//! returns its answer the same way.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};

use crate::policy::{PolicyRequest, PolicyResponse};
use crate::types::{Node, NodeId, TypeConfig};

/// Version of the Raft wire messages; a peer speaking another version is refused.
pub const RAFT_WIRE_VERSION: u16 = 1;

/// A failure to deliver a request or get its answer.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The target could not be reached (down, partitioned, connection refused).
    #[error("raft peer {target} unreachable: {source}")]
    Unreachable {
        /// The node we tried.
        target: NodeId,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The request or its answer was lost on the way (the target may have acted on it).
    #[error("raft message to {target} lost: {source}")]
    Lost {
        /// The node we tried.
        target: NodeId,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Carries opaque Raft messages between nodes. The node implements it over the mesh's
/// QUIC RPC; `mem_transport` implements it in-process for tests and benchmarks.
pub trait RaftTransport: Send + Sync + 'static {
    /// Sends `request` to node `target` (at `node.addr`) and returns its answer: the bytes
    /// the target's `PolicyStore::handle_rpc` produced. `target` is 0 when only the address
    /// is known (joining through a seed), so route by `node.addr`; Raft ids start at 1.
    fn send(
        &self,
        target: NodeId,
        node: &Node,
        request: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, TransportError>>;
}

/// The Raft RPCs, plus the two the store adds: leader hand-off and write forwarding.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum RaftRpc {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// The leader has stopped heartbeats and asks the target to campaign once the old
    /// leader's lease has run out (graceful step-down; openraft 0.9 has no transfer API).
    TimeoutNow {
        lease_ms: u64,
    },
    /// A write forwarded from a follower to the leader.
    Write(PolicyRequest),
    /// A node asks to join: added as a learner, then voters are rebalanced (to 3 or 5).
    Join {
        id: NodeId,
        node: Node,
    },
    /// Writes a follower queued while its earlier forwards were in flight, forwarded to
    /// the leader in one message; each is answered on its own, in order. (Appended last:
    /// postcard numbers variants by position, so the other messages keep their bytes.)
    WriteBatch(Vec<PolicyRequest>),
}

/// An answer on the Raft wire.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum RaftReply {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    TimeoutNow {
        campaigned: bool,
    },
    Write(Result<PolicyResponse, ForwardRefused>),
    Join(Result<(), ForwardRefused>),
    /// The request could not be decoded (version or codec mismatch).
    Malformed {
        version: u16,
        reason: String,
    },
    /// One answer per write of a `WriteBatch`, in order.
    WriteBatch(Vec<Result<PolicyResponse, ForwardRefused>>),
}

/// Why a forwarded write was not committed by the node it reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum ForwardRefused {
    NotLeader {
        leader: Option<NodeId>,
        leader_node: Option<Node>,
    },
    Unavailable {
        reason: String,
    },
}

/// A reply that is not the one asked for, or could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("bad raft reply from {target}: {reason}")]
pub(crate) struct BadReply {
    pub target: NodeId,
    pub reason: String,
}

/// A request is the wire version (varint) followed by the postcard `RaftRpc`, so a peer
/// can refuse another version before trying to decode the body.
pub(crate) fn encode_request(body: RaftRpc) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_stdvec(&(RAFT_WIRE_VERSION, body))
}

/// Decodes a request, refusing other wire versions.
pub(crate) fn decode_request(bytes: &[u8]) -> Result<RaftRpc, String> {
    let (version, rest) = postcard::take_from_bytes::<u16>(bytes).map_err(|e| e.to_string())?;
    if version != RAFT_WIRE_VERSION {
        return Err(format!(
            "wire version {version} is not supported (this node speaks {RAFT_WIRE_VERSION})"
        ));
    }
    postcard::from_bytes(rest).map_err(|e| e.to_string())
}

/// Encodes a reply; a reply that cannot be encoded becomes `Malformed` (which always can).
pub(crate) fn encode_reply(reply: &RaftReply) -> Vec<u8> {
    postcard::to_stdvec(reply).unwrap_or_else(|e| {
        postcard::to_stdvec(&RaftReply::Malformed {
            version: RAFT_WIRE_VERSION,
            reason: format!("reply could not be encoded: {e}"),
        })
        .unwrap_or_default()
    })
}

/// Sends one RPC through `transport` and decodes the answer.
pub(crate) async fn call(
    transport: &dyn RaftTransport,
    target: NodeId,
    node: &Node,
    body: RaftRpc,
) -> Result<RaftReply, CallError> {
    let bytes = encode_request(body).map_err(|e| {
        CallError::Codec(BadReply {
            target,
            reason: e.to_string(),
        })
    })?;
    let reply = transport
        .send(target, node, bytes)
        .await
        .map_err(CallError::Transport)?;
    let reply: RaftReply = postcard::from_bytes(&reply).map_err(|e| {
        CallError::Codec(BadReply {
            target,
            reason: e.to_string(),
        })
    })?;
    if let RaftReply::Malformed { version, reason } = &reply {
        return Err(CallError::Codec(BadReply {
            target,
            reason: format!("peer (wire v{version}) could not read our request: {reason}"),
        }));
    }
    Ok(reply)
}

/// Why a call failed before a typed answer came back.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    #[error(transparent)]
    Transport(TransportError),
    #[error(transparent)]
    Codec(BadReply),
}

/// openraft's network factory over a [`RaftTransport`].
#[derive(Clone)]
pub struct NetworkFactory {
    id: NodeId,
    transport: Arc<dyn RaftTransport>,
}

impl NetworkFactory {
    /// A factory for node `id` sending through `transport`.
    pub fn new(id: NodeId, transport: Arc<dyn RaftTransport>) -> Self {
        NetworkFactory { id, transport }
    }
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = NetworkConnection;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> NetworkConnection {
        NetworkConnection {
            id: self.id,
            target,
            node: node.clone(),
            transport: self.transport.clone(),
        }
    }
}

/// openraft's per-peer client over a [`RaftTransport`].
pub struct NetworkConnection {
    id: NodeId,
    target: NodeId,
    node: Node,
    transport: Arc<dyn RaftTransport>,
}

impl NetworkConnection {
    async fn rpc<E: std::error::Error>(
        &self,
        action: RPCTypes,
        body: RaftRpc,
        ttl: Duration,
    ) -> Result<RaftReply, RPCError<NodeId, Node, E>> {
        let fut = call(self.transport.as_ref(), self.target, &self.node, body);
        match tokio::time::timeout(ttl, fut).await {
            Err(_) => Err(RPCError::Timeout(Timeout {
                action,
                id: self.id,
                target: self.target,
                timeout: ttl,
            })),
            Ok(Err(CallError::Transport(e @ TransportError::Unreachable { .. }))) => {
                Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
            Ok(Err(CallError::Transport(e))) => Err(RPCError::Network(NetworkError::new(&e))),
            Ok(Err(CallError::Codec(e))) => Err(RPCError::Network(NetworkError::new(&e))),
            Ok(Ok(reply)) => Ok(reply),
        }
    }

    fn unexpected<E: std::error::Error>(&self, reply: &RaftReply) -> RPCError<NodeId, Node, E> {
        let e = BadReply {
            target: self.target,
            reason: format!("unexpected reply {reply:?}"),
        };
        RPCError::Network(NetworkError::new(&e))
    }

    fn remote<E: std::error::Error>(&self, e: E) -> RPCError<NodeId, Node, E> {
        RPCError::RemoteError(RemoteError::new_with_node(
            self.target,
            self.node.clone(),
            e,
        ))
    }
}

impl RaftNetwork<TypeConfig> for NetworkConnection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        match self
            .rpc(
                RPCTypes::AppendEntries,
                RaftRpc::AppendEntries(rpc),
                option.hard_ttl(),
            )
            .await?
        {
            RaftReply::AppendEntries(Ok(r)) => Ok(r),
            RaftReply::AppendEntries(Err(e)) => Err(self.remote(e)),
            other => Err(self.unexpected(&other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        match self
            .rpc(
                RPCTypes::InstallSnapshot,
                RaftRpc::InstallSnapshot(rpc),
                option.hard_ttl(),
            )
            .await?
        {
            RaftReply::InstallSnapshot(Ok(r)) => Ok(r),
            RaftReply::InstallSnapshot(Err(e)) => Err(self.remote(e)),
            other => Err(self.unexpected(&other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        match self
            .rpc(RPCTypes::Vote, RaftRpc::Vote(rpc), option.hard_ttl())
            .await?
        {
            RaftReply::Vote(Ok(r)) => Ok(r),
            RaftReply::Vote(Err(e)) => Err(self.remote(e)),
            other => Err(self.unexpected(&other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_their_version_and_other_versions_are_refused() {
        let bytes = encode_request(RaftRpc::TimeoutNow { lease_ms: 7 }).unwrap();
        assert!(matches!(
            decode_request(&bytes),
            Ok(RaftRpc::TimeoutNow { lease_ms: 7 })
        ));
        let mut other = postcard::to_stdvec(&(RAFT_WIRE_VERSION + 1, 0u8)).unwrap();
        other.extend_from_slice(&bytes[1..]);
        let err = decode_request(&other).unwrap_err();
        assert!(err.contains("wire version"), "{err}");
        assert!(decode_request(b"").is_err());
        assert!(decode_request(&[1, 250, 250, 250]).is_err());
    }

    #[test]
    fn replies_round_trip() {
        let reply = RaftReply::Write(Err(ForwardRefused::NotLeader {
            leader: Some(3),
            leader_node: Some(Node::new("mem://3")),
        }));
        let back: RaftReply = postcard::from_bytes(&encode_reply(&reply)).unwrap();
        assert!(matches!(
            back,
            RaftReply::Write(Err(ForwardRefused::NotLeader {
                leader: Some(3),
                ..
            }))
        ));
    }
}
