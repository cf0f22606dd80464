//! An in-process [`RaftTransport`] for tests and benchmarks: every node's handler in one
//! map, with partitions, isolation and seeded message loss. It carries the same encoded
//! bytes a network transport would, so codec and error paths are exercised for real.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::future::BoxFuture;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::network::{RaftTransport, TransportError};
use crate::store::PolicyStore;
use crate::types::{Node, NodeId};

/// The in-process network all test nodes share.
#[derive(Clone)]
pub struct MemNetwork {
    state: Arc<Mutex<NetState>>,
}

struct NetState {
    nodes: HashMap<NodeId, PolicyStore>,
    /// Partition group per node; nodes talk only within a group (absent = group 0).
    groups: HashMap<NodeId, u32>,
    drop_rate: f64,
    rng: ChaCha8Rng,
}

#[derive(Debug, thiserror::Error)]
enum MemNetError {
    #[error("node is not running")]
    Down,
    #[error("partitioned away")]
    Partitioned,
    #[error("message dropped")]
    Dropped,
}

impl MemNetwork {
    /// A fully connected network with no loss; `seed` drives message-loss decisions.
    pub fn new(seed: u64) -> Self {
        MemNetwork {
            state: Arc::new(Mutex::new(NetState {
                nodes: HashMap::new(),
                groups: HashMap::new(),
                drop_rate: 0.0,
                rng: ChaCha8Rng::seed_from_u64(seed),
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, NetState> {
        // A panic while holding this lock is a test failure already; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The transport node `from` sends through.
    pub fn transport(&self, from: NodeId) -> Arc<dyn RaftTransport> {
        Arc::new(MemEndpoint {
            from,
            net: self.clone(),
        })
    }

    /// Makes `store` reachable as node `store.id()`.
    pub fn register(&self, store: PolicyStore) {
        self.lock().nodes.insert(store.id(), store);
    }

    /// Makes node `id` unreachable (it was killed).
    pub fn unregister(&self, id: NodeId) {
        self.lock().nodes.remove(&id);
    }

    /// Splits the network: each slice is a group that only talks within itself; nodes not
    /// listed join the first group.
    pub fn partition(&self, groups: &[&[NodeId]]) {
        let mut st = self.lock();
        st.groups.clear();
        for (g, ids) in groups.iter().enumerate() {
            for id in *ids {
                st.groups.insert(*id, g as u32);
            }
        }
    }

    /// Cuts node `id` off from every other node.
    pub fn isolate(&self, id: NodeId) {
        // A group of its own: two isolated nodes must not reach each other either.
        self.lock()
            .groups
            .insert(id, u32::MAX - (id % u64::from(u32::MAX / 2)) as u32);
    }

    /// Reconnects everything.
    pub fn heal(&self) {
        self.lock().groups.clear();
    }

    /// Drops each request or reply with probability `p` (0.0 to 1.0).
    pub fn set_drop_rate(&self, p: f64) {
        self.lock().drop_rate = p.clamp(0.0, 1.0);
    }

    fn check(&self, from: NodeId, to: NodeId) -> Result<Option<PolicyStore>, MemNetError> {
        let mut st = self.lock();
        let g = |id| st.groups.get(&id).copied().unwrap_or(0);
        if g(from) != g(to) {
            return Err(MemNetError::Partitioned);
        }
        let drop_rate = st.drop_rate;
        if drop_rate > 0.0 && st.rng.random_bool(drop_rate) {
            return Err(MemNetError::Dropped);
        }
        Ok(st.nodes.get(&to).cloned())
    }
}

struct MemEndpoint {
    from: NodeId,
    net: MemNetwork,
}

impl RaftTransport for MemEndpoint {
    fn send(
        &self,
        target: NodeId,
        node: &Node,
        request: Vec<u8>,
    ) -> BoxFuture<'static, Result<Vec<u8>, TransportError>> {
        let net = self.net.clone();
        let from = self.from;
        // Route by address like a real transport would (the id may be 0 for a seed).
        let target = node
            .addr
            .strip_prefix("mem://")
            .and_then(|id| id.parse().ok())
            .unwrap_or(target);
        Box::pin(async move {
            let unreachable = |e: MemNetError| TransportError::Unreachable {
                target,
                source: Box::new(e),
            };
            let store = net
                .check(from, target)
                .map_err(unreachable)?
                .ok_or_else(|| unreachable(MemNetError::Down))?;
            let reply = store.handle_rpc(&request).await;
            // The answer crosses the network too: it can be cut or lost after the target acted.
            match net.check(target, from) {
                Ok(_) => Ok(reply),
                Err(e) => Err(TransportError::Lost {
                    target,
                    source: Box::new(e),
                }),
            }
        })
    }
}
