//! `PolicyStore`: the node-facing handle. Opens the redb file, runs openraft, serves
//! incoming Raft RPCs, takes policy writes, publishes applied policy, and runs cluster
//! operations (bootstrap, learners, voters, removal, leader hand-off, status).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, RaftError};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

use crate::disk::Disk;
use crate::error::{BoxError, ClusterError, OpenError, ReadError, WriteError};
use crate::log_store::LogStore;
use crate::network::{
    self, ForwardRefused, NetworkFactory, RAFT_WIRE_VERSION, RaftReply, RaftRpc, RaftTransport,
};
use crate::policy::{
    EppConfigValidator, ObjectChange, ObjectKey, PolicyObject, PolicyOp, PolicyRequest,
    PolicyResponse, PolicyState, Rejection, TokenChange, TokenHash, TokenRole, parse_documents,
    validate_object,
};
use crate::state_machine::{PolicyPublisher, StateMachineStore};
use crate::types::{NodeId, Raft};

pub mod batch;
mod cluster;
mod config;
mod forward;

pub use batch::{BatchLimits, WriteBatcher};
pub use cluster::{ClusterStatus, MemberStatus, Role};
pub use config::StoreConfig;

/// Whether a write may be forwarded to the leader over the Raft transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Only this node; a follower answers `NotLeader`.
    Local,
    /// Forward to the leader (one hop) when this node is not the leader.
    ViaLeader,
}

/// A committed write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// Log index of the entry that carried the write (writes batched together share it;
    /// each change carries its object's new resourceVersion).
    pub index: u64,
    /// One entry per object op, in order.
    pub changes: Vec<ObjectChange>,
}

/// The policy store of one node. Cheap to clone.
#[derive(Clone)]
pub struct PolicyStore {
    inner: Arc<Inner>,
}

struct Inner {
    id: NodeId,
    raft: Raft,
    publisher: PolicyPublisher,
    transport: Arc<dyn RaftTransport>,
    /// The batching writer task's queue (see [`batch`]).
    writes: mpsc::Sender<batch::Submitted>,
    /// The forwarder task's queue: writes on their way to another leader.
    forwards: mpsc::Sender<batch::Submitted>,
    validator: EppConfigValidator,
    committed: Arc<AtomicU64>,
    config: StoreConfig,
}

impl std::fmt::Debug for PolicyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyStore")
            .field("id", &self.inner.id)
            .finish()
    }
}

fn boxed(e: impl std::error::Error + Send + Sync + 'static) -> BoxError {
    Box::new(e)
}

/// The batching writer task is gone (the store is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("the policy writer stopped")]
struct WriterStopped;

/// An error message as a source error (for answers that arrive as text over the wire).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct RemoteReason(String);

impl PolicyStore {
    /// Opens the node's redb file and starts Raft. Must run inside the tokio runtime that
    /// should drive Raft. `validator` checks EndpointPickerConfig documents before commit.
    pub async fn open(
        config: StoreConfig,
        transport: Arc<dyn RaftTransport>,
        validator: EppConfigValidator,
    ) -> Result<PolicyStore, OpenError> {
        let raft_config = Arc::new(
            config
                .raft_config()
                .map_err(|e| OpenError::Config(Box::new(e)))?,
        );
        let disk = Disk::open(&config.data_file)?;
        let log = LogStore::new(disk.clone());
        let committed = log.committed_index();
        let sm = StateMachineStore::open(disk)?;
        let publisher = sm.publisher();
        let network = NetworkFactory::new(config.node_id, transport.clone());
        let raft = Raft::new(config.node_id, raft_config, network, log, sm)
            .await
            .map_err(|e| OpenError::Start(boxed(e)))?;
        let (writes, rx) = mpsc::channel(config.write_queue.get());
        tokio::spawn(batch::run_writer(
            raft.clone(),
            config.batch_limits(),
            config.write_timeout,
            rx,
        ));
        let (forwards, rx) = mpsc::channel(config.write_queue.get());
        let forwarder = forward::ForwardContext {
            id: config.node_id,
            raft: raft.clone(),
            transport: transport.clone(),
            writes: writes.clone(),
        };
        tokio::spawn(forward::run_forwarder(forwarder, config.batch_limits(), rx));
        Ok(PolicyStore {
            inner: Arc::new(Inner {
                id: config.node_id,
                raft,
                publisher,
                transport,
                writes,
                forwards,
                validator,
                committed,
                config,
            }),
        })
    }

    /// This node's Raft id.
    pub fn id(&self) -> NodeId {
        self.inner.id
    }

    /// The underlying openraft handle (metrics, advanced operations).
    pub fn raft(&self) -> &Raft {
        &self.inner.raft
    }

    /// The applied policy now: an immutable snapshot, loaded lock-free.
    pub fn policy(&self) -> Arc<PolicyState> {
        self.inner.publisher.load()
    }

    /// A receiver told of every newly applied policy (for rebuilding scheduler config, xDS).
    pub fn subscribe(&self) -> watch::Receiver<Arc<PolicyState>> {
        self.inner.publisher.subscribe()
    }

    /// Whether `token` is a configured write token (checked against stored SHA-256 hashes).
    pub fn verify_token(&self, token: &str) -> bool {
        self.policy().verify_token(token)
    }

    /// What `token` allows under the applied policy (`None`: not a token).
    pub fn token_role(&self, token: &str) -> Option<TokenRole> {
        self.policy().token_role(token)
    }

    /// Adds and removes accepted token hashes, all changes in one entry or none
    /// (refused: removing the last write token, an unknown hash, a hash of the other role).
    pub async fn change_tokens(
        &self,
        changes: Vec<TokenChange>,
        route: Route,
    ) -> Result<Applied, WriteError> {
        self.submit(
            PolicyRequest {
                ops: changes.into_iter().map(PolicyOp::Tokens).collect(),
            },
            route,
        )
        .await
    }

    /// Adds more write tokens (stored hashed).
    pub async fn add_tokens(&self, tokens: &[String], route: Route) -> Result<Applied, WriteError> {
        let hashes = tokens.iter().map(|t| TokenHash::of(t)).collect();
        self.submit(
            PolicyRequest {
                ops: vec![PolicyOp::AddTokens(hashes)],
            },
            route,
        )
        .await
    }

    // ---- policy writes ----

    /// Parses multi-document YAML, validates every document (EndpointPickerConfig through
    /// the validator) and applies all of them as one log entry, or none.
    /// `metadata.resourceVersion` in a document makes its write conditional.
    pub async fn apply_yaml(&self, text: &str, route: Route) -> Result<Applied, WriteError> {
        let objects = parse_documents(text, &self.inner.validator)?;
        self.submit_objects(objects, route).await
    }

    /// Validates and applies typed objects as one log entry (all or none).
    pub async fn apply_objects(
        &self,
        objects: Vec<PolicyObject>,
        route: Route,
    ) -> Result<Applied, WriteError> {
        let mut seen = BTreeSet::new();
        for (i, o) in objects.iter().enumerate() {
            validate_object(i + 1, o, &self.inner.validator)?;
            if !seen.insert(o.key()) {
                return Err(WriteError::Invalid(crate::policy::InvalidDocument {
                    document: i + 1,
                    kind: o.kind().to_string(),
                    name: o.metadata().name.clone(),
                    field: "metadata.name".into(),
                    reason: format!("{} appears more than once in this apply", o.key()),
                }));
            }
        }
        self.submit_objects(objects, route).await
    }

    async fn submit_objects(
        &self,
        objects: Vec<PolicyObject>,
        route: Route,
    ) -> Result<Applied, WriteError> {
        let ops = objects
            .into_iter()
            .map(|o| {
                // Validation already checked it parses.
                let expected = o
                    .metadata()
                    .resource_version
                    .as_deref()
                    .and_then(|v| v.parse().ok());
                PolicyOp::Put {
                    object: Box::new(o),
                    expected_version: expected,
                }
            })
            .collect();
        self.submit(PolicyRequest { ops }, route).await
    }

    /// Deletes objects (all or none), each optionally only at a given resource version.
    pub async fn delete(
        &self,
        keys: Vec<(ObjectKey, Option<u64>)>,
        route: Route,
    ) -> Result<Applied, WriteError> {
        let ops = keys
            .into_iter()
            .map(|(key, expected_version)| PolicyOp::Delete {
                key,
                expected_version,
            })
            .collect();
        self.submit(PolicyRequest { ops }, route).await
    }

    /// Appends one request to the log and waits for it to apply.
    ///
    /// With `Route::ViaLeader` a node that knows another leader forwards the request there
    /// instead of appending it (batched with other forwarded writes, see `forward`). The
    /// decision is made before submitting, never after a local failure, so one call never
    /// appends the same request twice.
    pub async fn submit(&self, req: PolicyRequest, route: Route) -> Result<Applied, WriteError> {
        if req.has_batch_op() {
            return Err(WriteError::Rejected(Rejection::MisplacedBatch));
        }
        if route == Route::ViaLeader {
            let m = self.metrics();
            if m.current_leader.is_some_and(|l| l != self.inner.id) {
                return self.enqueue(&self.inner.forwards, req).await;
            }
        }
        self.submit_local(req).await
    }

    /// Hands one request to the batching writer and waits for its own answer.
    async fn submit_local(&self, request: PolicyRequest) -> Result<Applied, WriteError> {
        if request.has_batch_op() {
            return Err(WriteError::Rejected(Rejection::MisplacedBatch));
        }
        self.enqueue(&self.inner.writes, request).await
    }

    /// Queues one request on the writer or the forwarder and waits for its answer.
    async fn enqueue(
        &self,
        queue: &mpsc::Sender<batch::Submitted>,
        request: PolicyRequest,
    ) -> Result<Applied, WriteError> {
        // Sized here, on the caller's task, so the batching task only adds numbers.
        let bytes = postcard::experimental::serialized_size(&request).unwrap_or(0);
        let (reply, answer) = oneshot::channel();
        queue
            .send(batch::Submitted {
                request,
                bytes,
                reply,
            })
            .await
            .map_err(|_| WriteError::Unavailable(boxed(WriterStopped)))?;
        answer
            .await
            .map_err(|_| WriteError::Unavailable(boxed(WriterStopped)))?
    }

    // ---- reads ----

    /// The applied policy after confirming leadership with a quorum and applying up to the
    /// commit point seen then: a linearizable read. Only the leader serves it.
    pub async fn read_linearizable(&self) -> Result<Arc<PolicyState>, ReadError> {
        match self.inner.raft.ensure_linearizable().await {
            Ok(_) => Ok(self.policy()),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(f))) => {
                Err(ReadError::NotLeader {
                    leader: f.leader_id,
                    leader_node: f.leader_node,
                })
            }
            Err(RaftError::APIError(e)) => Err(ReadError::Unavailable(boxed(e))),
            Err(RaftError::Fatal(e)) => Err(ReadError::Unavailable(boxed(e))),
        }
    }

    // ---- serving the transport ----

    /// Answers one incoming Raft transport message (the bytes a peer's
    /// [`RaftTransport::send`] carried); returns the bytes to send back.
    pub async fn handle_rpc(&self, request: &[u8]) -> Vec<u8> {
        let reply = match network::decode_request(request) {
            Err(reason) => RaftReply::Malformed {
                version: RAFT_WIRE_VERSION,
                reason,
            },
            Ok(rpc) => self.dispatch(rpc).await,
        };
        network::encode_reply(&reply)
    }

    async fn dispatch(&self, rpc: RaftRpc) -> RaftReply {
        let raft = &self.inner.raft;
        match rpc {
            RaftRpc::AppendEntries(r) => RaftReply::AppendEntries(raft.append_entries(r).await),
            RaftRpc::Vote(r) => RaftReply::Vote(raft.vote(r).await),
            RaftRpc::InstallSnapshot(r) => {
                RaftReply::InstallSnapshot(raft.install_snapshot(r).await)
            }
            RaftRpc::TimeoutNow { lease_ms } => {
                // Campaigning before the old leader's lease runs out would be refused by the
                // other voters, so wait it out first.
                tokio::time::sleep(Duration::from_millis(lease_ms)).await;
                RaftReply::TimeoutNow {
                    campaigned: raft.trigger().elect().await.is_ok(),
                }
            }
            RaftRpc::Join { id, node } => RaftReply::Join(match self.admit(id, node).await {
                Ok(()) => Ok(()),
                Err(ClusterError::NotLeader {
                    leader,
                    leader_node,
                }) => Err(ForwardRefused::NotLeader {
                    leader,
                    leader_node,
                }),
                Err(e) => Err(ForwardRefused::Unavailable {
                    reason: e.to_string(),
                }),
            }),
            RaftRpc::Write(req) => RaftReply::Write(forward::to_wire(self.submit_local(req).await)),
            RaftRpc::WriteBatch(reqs) => {
                // A forwarded batch must not smuggle batch ops in either.
                let (bad, good): (Vec<_>, Vec<_>) = reqs
                    .into_iter()
                    .enumerate()
                    .partition(|(_, r)| r.has_batch_op());
                let mut answers: Vec<Option<Result<PolicyResponse, ForwardRefused>>> =
                    vec![None; bad.len() + good.len()];
                for (i, _) in bad {
                    answers[i] = Some(Ok(PolicyResponse::Rejected(Rejection::MisplacedBatch)));
                }
                let (at, good): (Vec<usize>, Vec<PolicyRequest>) = good.into_iter().unzip();
                let results = forward::submit_all(&self.inner.writes, good).await;
                for (i, r) in at.into_iter().zip(results) {
                    answers[i] = Some(forward::to_wire(r));
                }
                RaftReply::WriteBatch(answers.into_iter().flatten().collect())
            }
        }
    }
}
