//! The Raft transport over the mesh's QUIC service channel: a member's Raft address is its
//! mesh node name, so Raft needs no listener of its own.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use infermesh_gossip::{Mesh, NodeId as MeshNodeId, RpcError};
use infermesh_raft_store::{Node, NodeId, PolicyStore, RaftTransport, TransportError};
use tokio::sync::watch;

/// Mesh service channel carrying Raft messages, forwarded writes and joins.
pub const RAFT_CHANNEL: u16 = 0x5241; // "RA"

/// Upper bound on one exchange. openraft bounds its own RPCs more tightly; this bounds
/// forwarded writes and joins. It is short because a QUIC connection to a peer that just
/// died looks open until the mesh's idle timeout: a write forwarded to a leader killed a
/// moment ago must fail fast (503, client retries) rather than hang for that long. A join
/// that outlasts it is retried by the joining node (admission is idempotent).
pub const RAFT_CALL_TIMEOUT: Duration = Duration::from_secs(1);

/// Most Raft messages queued for the local store before the mesh applies backpressure.
const QUEUE: usize = 256;

/// [`RaftTransport`] over `Mesh::call_service`.
pub struct MeshTransport {
    mesh: Arc<Mesh>,
}

impl MeshTransport {
    /// A transport sending through `mesh`.
    pub fn new(mesh: Arc<Mesh>) -> MeshTransport {
        MeshTransport { mesh }
    }
}

fn unreachable(e: &RpcError) -> bool {
    matches!(
        e,
        RpcError::UnknownPeer(_) | RpcError::Connect(_) | RpcError::Timeout
    )
}

impl RaftTransport for MeshTransport {
    fn send(
        &self,
        target: NodeId,
        node: &Node,
        request: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, TransportError>> {
        let mesh = self.mesh.clone();
        let peer = MeshNodeId::new(node.addr.clone());
        Box::pin(async move {
            match mesh
                .call_service(&peer, RAFT_CHANNEL, request, RAFT_CALL_TIMEOUT)
                .await
            {
                Ok(bytes) => Ok(bytes.to_vec()),
                Err(e) if unreachable(&e) => Err(TransportError::Unreachable {
                    target,
                    source: Box::new(e),
                }),
                Err(e) => Err(TransportError::Lost {
                    target,
                    source: Box::new(e),
                }),
            }
        })
    }
}

/// Serves incoming Raft messages from the mesh to `store`, one task per call (a slow
/// install-snapshot or forwarded write must not hold up heartbeats), until `shutdown`.
pub fn serve_raft_channel(
    mesh: &Mesh,
    store: PolicyStore,
    mut shutdown: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, infermesh_gossip::ChannelTaken> {
    let mut calls = mesh.register_service(RAFT_CHANNEL, QUEUE)?;
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                call = calls.recv() => match call {
                    Some(call) => {
                        let store = store.clone();
                        tokio::spawn(async move {
                            let reply = store.handle_rpc(&call.payload).await;
                            call.respond(reply);
                        });
                    }
                    None => break,
                },
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
    }))
}
