//! In-process clusters for tests and benchmarks: each node has its own tokio runtime and
//! its own redb file, all joined by a [`MemNetwork`]. Killing a node drops its runtime,
//! cancelling every Raft task wherever it stands (no graceful path), which is the closest
//! in-process stand-in for SIGKILL; restarting reopens the same redb file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use openraft::BasicNode;

use crate::error::{ClusterError, OpenError};
use crate::mem_transport::MemNetwork;
use crate::policy::{EppConfigValidator, accept_any_epp_config};
use crate::store::{PolicyStore, StoreConfig};
use crate::types::{Node, NodeId};

/// A running in-process node.
pub struct TestNode {
    /// The node's store handle.
    pub store: PolicyStore,
    runtime: Option<tokio::runtime::Runtime>,
}

/// An in-process cluster of policy-store nodes.
pub struct TestCluster {
    /// The shared network (partitions, loss).
    pub net: MemNetwork,
    dir: PathBuf,
    nodes: BTreeMap<NodeId, TestNode>,
    configure: fn(StoreConfig) -> StoreConfig,
    validator: EppConfigValidator,
}

/// Errors of the test harness.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A node failed to open.
    #[error("node {id}: {source}")]
    Open {
        /// Which node.
        id: NodeId,
        /// Why.
        #[source]
        source: Box<OpenError>,
    },
    /// A node's runtime could not be built or its task panicked.
    #[error("node {id}: runtime: {reason}")]
    Runtime {
        /// Which node.
        id: NodeId,
        /// Why.
        reason: String,
    },
    /// A cluster operation failed.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// A condition was not reached in time.
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// The node is not running.
    #[error("node {0} is not running")]
    NotRunning(NodeId),
}

/// The Raft address of an in-process node.
pub fn mem_node(id: NodeId) -> Node {
    BasicNode::new(format!("mem://{id}"))
}

impl TestCluster {
    /// A cluster whose redb files live in `dir`; `seed` drives message loss.
    pub fn new(dir: &Path, seed: u64) -> Self {
        TestCluster {
            net: MemNetwork::new(seed),
            dir: dir.to_path_buf(),
            nodes: BTreeMap::new(),
            configure: |c| c,
            validator: accept_any_epp_config(),
        }
    }

    /// Adjusts every node's config before it starts (e.g. snapshot thresholds).
    pub fn with_config(mut self, configure: fn(StoreConfig) -> StoreConfig) -> Self {
        self.configure = configure;
        self
    }

    /// Uses `validator` for EndpointPickerConfig documents.
    pub fn with_validator(mut self, validator: EppConfigValidator) -> Self {
        self.validator = validator;
        self
    }

    /// The redb file of node `id`.
    pub fn data_file(&self, id: NodeId) -> PathBuf {
        self.dir.join(format!("node-{id}.redb"))
    }

    /// Starts (or restarts) node `id` on its own runtime and redb file.
    pub async fn start(&mut self, id: NodeId) -> Result<PolicyStore, HarnessError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("raft-node-{id}"))
            .enable_all()
            .build()
            .map_err(|e| HarnessError::Runtime {
                id,
                reason: e.to_string(),
            })?;
        let config = (self.configure)(StoreConfig::new(id, self.data_file(id)));
        let transport = self.net.transport(id);
        let validator = self.validator.clone();
        let store = runtime
            .spawn(async move {
                // A killed node's file handle is released when its runtime's tasks are gone;
                // retry briefly in case that is still in progress.
                let mut tries = 0;
                loop {
                    match PolicyStore::open(config.clone(), transport.clone(), validator.clone())
                        .await
                    {
                        Err(OpenError::Disk(e))
                            if tries < 50 && e.to_string().contains("already open") =>
                        {
                            tries += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        r => return r,
                    }
                }
            })
            .await
            .map_err(|e| HarnessError::Runtime {
                id,
                reason: e.to_string(),
            })?
            .map_err(|e| HarnessError::Open {
                id,
                source: Box::new(e),
            })?;
        self.net.register(store.clone());
        self.nodes.insert(
            id,
            TestNode {
                store: store.clone(),
                runtime: Some(runtime),
            },
        );
        Ok(store)
    }

    /// Starts nodes `ids` and bootstraps them as the voters, with `tokens`.
    pub async fn start_bootstrapped(
        &mut self,
        ids: &[NodeId],
        tokens: &[String],
    ) -> Result<(), HarnessError> {
        for id in ids {
            self.start(*id).await?;
        }
        let members = ids.iter().map(|id| (*id, mem_node(*id))).collect();
        self.store(ids[0])?.bootstrap(members, tokens).await?;
        Ok(())
    }

    /// The store of a running node.
    pub fn store(&self, id: NodeId) -> Result<PolicyStore, HarnessError> {
        self.nodes
            .get(&id)
            .map(|n| n.store.clone())
            .ok_or(HarnessError::NotRunning(id))
    }

    /// Ids of running nodes.
    pub fn running(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    /// Kills node `id` abruptly: unreachable at once, runtime dropped with every task in it.
    pub async fn kill(&mut self, id: NodeId) {
        self.net.unregister(id);
        if let Some(mut node) = self.nodes.remove(&id)
            && let Some(rt) = node.runtime.take()
        {
            drop(node);
            // Dropping a runtime blocks; do it off the async worker.
            let _ =
                tokio::task::spawn_blocking(move || rt.shutdown_timeout(Duration::from_secs(5)))
                    .await;
        }
    }

    /// Kills every node.
    pub async fn kill_all(&mut self) {
        for id in self.running() {
            self.kill(id).await;
        }
    }

    /// Waits until every running node in `among` agrees on one leader that is among them.
    pub async fn wait_leader(
        &self,
        among: &[NodeId],
        timeout: Duration,
    ) -> Result<NodeId, HarnessError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let leaders: Vec<Option<NodeId>> = among
                .iter()
                .filter_map(|id| self.nodes.get(id))
                .map(|n| n.store.raft().metrics().borrow().current_leader)
                .collect();
            if let Some(Some(l)) = leaders.first()
                && among.contains(l)
                && leaders.iter().all(|x| *x == Some(*l))
            {
                let m = self.store(*l)?.raft().metrics().borrow().clone();
                if m.current_leader == Some(*l) && m.state == openraft::ServerState::Leader {
                    return Ok(*l);
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(HarnessError::Timeout(format!("a leader among {among:?}")));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The leader some running node currently reports, if that node is running and agrees.
    pub fn current_leader(&self) -> Result<NodeId, HarnessError> {
        self.nodes
            .values()
            .filter_map(|n| n.store.raft().metrics().borrow().current_leader)
            .find(|l| {
                self.nodes.get(l).is_some_and(|n| {
                    n.store.raft().metrics().borrow().state == openraft::ServerState::Leader
                })
            })
            .ok_or_else(|| HarnessError::Timeout("a running leader".into()))
    }

    /// Waits until node `id` has applied index `index`.
    pub async fn wait_applied(
        &self,
        id: NodeId,
        index: u64,
        timeout: Duration,
    ) -> Result<(), HarnessError> {
        self.store(id)?
            .raft()
            .wait(Some(timeout))
            .applied_index_at_least(Some(index), "applied")
            .await
            .map(|_| ())
            .map_err(|_| HarnessError::Timeout(format!("node {id} to apply index {index}")))
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for (_, mut node) in std::mem::take(&mut self.nodes) {
            if let Some(rt) = node.runtime.take() {
                rt.shutdown_background();
            }
        }
    }
}
