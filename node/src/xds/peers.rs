//! Live infermesh nodes' ext_proc addresses, learned over the mesh: gossip names the live
//! members (and their QUIC addresses) but not the ports they serve Envoy on, so each node
//! answers a small request on its own service channel with its advertised ext_proc address,
//! and every node asks each new member (per incarnation) once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use infermesh_gossip::{MemberSet, Mesh, NodeId};
use serde::{Deserialize, Serialize};

/// Mesh service channel of the xDS peer-address exchange ("XD").
pub const XDS_PEER_CHANNEL: u16 = 0x5844;

/// Longest a peer may take to answer before it is asked again on the next change or tick.
pub const PEER_CALL_TIMEOUT: Duration = Duration::from_millis(500);

/// What a node answers on [`XDS_PEER_CHANNEL`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PeerInfo {
    /// The node's advertised ext_proc (and ADS) address.
    pub ext_proc: SocketAddr,
}

/// Serves [`XDS_PEER_CHANNEL`] until the mesh drops the channel.
pub async fn answer_peers(
    mut calls: tokio::sync::mpsc::Receiver<infermesh_gossip::ServiceCall>,
    me: PeerInfo,
) {
    let reply = serde_json::to_vec(&me).expect("PeerInfo serializes");
    while let Some(call) = calls.recv().await {
        call.respond(reply.clone());
    }
}

/// Known ext_proc addresses of live peers, keyed by node and incarnation (a restarted node
/// may come back on another port).
#[derive(Debug, Default)]
pub struct PeerBook {
    known: HashMap<NodeId, (u64, SocketAddr)>,
}

impl PeerBook {
    /// Forgets members that left; returns the live peers whose address is not known yet.
    pub fn prune(&mut self, members: &MemberSet) -> Vec<(NodeId, u64)> {
        self.known.retain(|node, (inc, _)| {
            members
                .peers()
                .any(|m| &m.id.node == node && m.id.incarnation == *inc)
        });
        members
            .peers()
            .filter(|m| !self.known.contains_key(&m.id.node))
            .map(|m| (m.id.node.clone(), m.id.incarnation))
            .collect()
    }

    /// Records a peer's answer.
    pub fn learn(&mut self, node: NodeId, incarnation: u64, info: PeerInfo) {
        self.known.insert(node, (incarnation, info.ext_proc));
    }

    /// Every known live peer's ext_proc address.
    pub fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.known.values().map(|(_, a)| *a)
    }
}

/// Asks each of `missing` for its address (concurrently, bounded by [`PEER_CALL_TIMEOUT`])
/// and records the answers; peers that do not answer are asked again later.
pub async fn resolve(mesh: &Mesh, book: &mut PeerBook, missing: Vec<(NodeId, u64)>) {
    let calls = missing.into_iter().map(|(node, inc)| async move {
        let r = mesh
            .call_service(&node, XDS_PEER_CHANNEL, Vec::new(), PEER_CALL_TIMEOUT)
            .await;
        (node, inc, r)
    });
    for (node, inc, r) in futures::future::join_all(calls).await {
        match r
            .map_err(|e| e.to_string())
            .and_then(|bytes| serde_json::from_slice::<PeerInfo>(&bytes).map_err(|e| e.to_string()))
        {
            Ok(info) => book.learn(node, inc, info),
            Err(e) => {
                tracing::debug!(peer = %node.as_str(), error = %e, "xds: peer ext_proc address not known yet")
            }
        }
    }
}
