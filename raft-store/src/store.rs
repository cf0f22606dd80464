//! `PolicyStore`: the node-facing handle. Opens the redb file, runs openraft, serves
//! incoming Raft RPCs, takes policy writes, publishes applied policy, and runs cluster
//! operations (bootstrap, learners, voters, removal, leader hand-off, status).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use openraft::error::{CheckIsLeaderError, ClientWriteError, InitializeError, RaftError};
use openraft::{ChangeMembers, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::disk::Disk;
use crate::error::{BoxError, ClusterError, OpenError, ReadError, WriteError};
use crate::log_store::LogStore;
use crate::network::{
    self, ForwardRefused, NetworkFactory, RAFT_WIRE_VERSION, RaftReply, RaftRpc, RaftTransport,
};
use crate::policy::{
    EppConfigValidator, ObjectChange, ObjectKey, PolicyObject, PolicyOp, PolicyRequest,
    PolicyResponse, PolicyState, TokenHash, parse_documents, validate_object,
};
use crate::state_machine::{PolicyPublisher, StateMachineStore};
use crate::types::{Node, NodeId, Raft};

/// Configuration of one node's policy store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// This node's Raft id (unique in the cluster, never reused).
    pub node_id: NodeId,
    /// The node's redb file (created if absent).
    pub data_file: PathBuf,
    /// Leader heartbeat period (openraft default 50 ms).
    pub heartbeat_interval: Duration,
    /// Election timeout lower bound (openraft default 150 ms).
    pub election_timeout_min: Duration,
    /// Election timeout upper bound; also the leader lease (openraft default 300 ms).
    pub election_timeout_max: Duration,
    /// Build a snapshot after this many log entries since the last one.
    pub snapshot_after_entries: u64,
    /// Entries kept in the log behind a snapshot (so briefly lagging followers catch up
    /// by log rather than snapshot).
    pub keep_entries_after_snapshot: u64,
    /// How long `add_learner` waits for the learner to catch up.
    pub learner_catch_up_timeout: Duration,
    /// Largest snapshot chunk per install-snapshot message; with `max_entries_per_append`
    /// this bounds the size of one transport message.
    pub snapshot_chunk_bytes: u64,
    /// Most log entries in one append-entries message.
    pub max_entries_per_append: u64,
}

impl StoreConfig {
    /// Defaults for a LAN: openraft's own timings (50/150/300 ms), a snapshot every
    /// 1000 entries keeping 100 behind it, transport messages kept near 1 MiB (1 MiB
    /// snapshot chunks; 64 entries per append, policy documents being a few KiB).
    pub fn new(node_id: NodeId, data_file: impl Into<PathBuf>) -> Self {
        StoreConfig {
            node_id,
            data_file: data_file.into(),
            heartbeat_interval: Duration::from_millis(50),
            election_timeout_min: Duration::from_millis(150),
            election_timeout_max: Duration::from_millis(300),
            snapshot_after_entries: 1000,
            keep_entries_after_snapshot: 100,
            learner_catch_up_timeout: Duration::from_secs(30),
            snapshot_chunk_bytes: 1024 * 1024,
            max_entries_per_append: 64,
        }
    }

    #[allow(clippy::result_large_err)] // openraft's own error type; boxed by the caller
    fn raft_config(&self) -> Result<openraft::Config, openraft::ConfigError> {
        let ms = |d: Duration| d.as_millis() as u64;
        openraft::Config {
            cluster_name: "infermesh-policy".to_string(),
            heartbeat_interval: ms(self.heartbeat_interval),
            election_timeout_min: ms(self.election_timeout_min),
            election_timeout_max: ms(self.election_timeout_max),
            install_snapshot_timeout: ms(self.election_timeout_max).max(1000),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_after_entries),
            max_in_snapshot_log_to_keep: self.keep_entries_after_snapshot,
            purge_batch_size: 256,
            snapshot_max_chunk_size: self.snapshot_chunk_bytes,
            max_payload_entries: self.max_entries_per_append,
            ..Default::default()
        }
        .validate()
    }
}

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
    /// Log index of the write (the new resourceVersion of changed objects).
    pub index: u64,
    /// One entry per object op, in order.
    pub changes: Vec<ObjectChange>,
}

/// A node's role in Raft.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Accepts writes.
    Leader,
    /// Voting follower.
    Follower,
    /// Campaigning.
    Candidate,
    /// Non-voting member.
    Learner,
    /// Stopped.
    Shutdown,
}

/// One member in a status report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Raft id.
    pub id: NodeId,
    /// Raft transport address.
    pub addr: String,
    /// Voter (true) or learner.
    pub voter: bool,
    /// Highest index known replicated to it (leader only).
    pub matched_index: Option<u64>,
    /// Entries it is behind the leader's last log (leader only).
    pub lag: Option<u64>,
}

/// `infermesh cluster status` data, from this node's point of view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// This node.
    pub id: NodeId,
    /// This node's role.
    pub role: Role,
    /// The leader this node knows of.
    pub leader: Option<NodeId>,
    /// Current term.
    pub term: u64,
    /// Last log index.
    pub last_log_index: Option<u64>,
    /// Last committed index known here.
    pub committed_index: u64,
    /// Last applied index.
    pub applied_index: Option<u64>,
    /// Index the current snapshot covers.
    pub snapshot_index: Option<u64>,
    /// Index up to which the log was purged.
    pub purged_index: Option<u64>,
    /// Members (voters first, then learners), by id.
    pub members: Vec<MemberStatus>,
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
        Ok(PolicyStore {
            inner: Arc::new(Inner {
                id: config.node_id,
                raft,
                publisher,
                transport,
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

    /// Whether this node has joined or formed a cluster.
    pub async fn is_initialized(&self) -> Result<bool, ClusterError> {
        self.inner
            .raft
            .is_initialized()
            .await
            .map_err(|e| ClusterError::Unavailable(boxed(e)))
    }

    /// Forms a cluster of `members` (this node among them; 1, 3 or 5 voters) and stores the
    /// SHA-256 of each write token. Run on one node only, once.
    pub async fn bootstrap(
        &self,
        members: BTreeMap<NodeId, Node>,
        tokens: &[String],
    ) -> Result<(), ClusterError> {
        if ![1, 3, 5].contains(&members.len()) {
            return Err(ClusterError::VoterCount {
                voters: members.len(),
            });
        }
        match self.inner.raft.initialize(members).await {
            Ok(()) => {}
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {
                return Err(ClusterError::AlreadyInitialized);
            }
            Err(RaftError::APIError(e)) => return Err(ClusterError::Refused(boxed(e))),
            Err(RaftError::Fatal(e)) => return Err(ClusterError::Unavailable(boxed(e))),
        }
        if tokens.is_empty() {
            return Ok(());
        }
        let hashes = tokens.iter().map(|t| TokenHash::of(t)).collect();
        let req = PolicyRequest {
            ops: vec![PolicyOp::AddTokens(hashes)],
        };
        // The first leader may take an election to appear; retry until one takes the write.
        let deadline = tokio::time::Instant::now() + self.inner.config.election_timeout_max * 20;
        loop {
            match self.submit(req.clone(), Route::ViaLeader).await {
                Ok(_) => return Ok(()),
                Err(e @ (WriteError::NotLeader { .. } | WriteError::Unavailable(_)))
                    if tokio::time::Instant::now() < deadline =>
                {
                    tracing::debug!(error = %e, "bootstrap tokens: waiting for a leader");
                    tokio::time::sleep(self.inner.config.heartbeat_interval).await;
                }
                Err(e) => return Err(ClusterError::Tokens(Box::new(e))),
            }
        }
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
    /// instead of appending it. The decision is made before submitting, never after a
    /// local failure, so one call never appends the same request twice.
    pub async fn submit(&self, req: PolicyRequest, route: Route) -> Result<Applied, WriteError> {
        if route == Route::ViaLeader {
            let m = self.metrics();
            if let Some(leader) = m.current_leader.filter(|l| *l != self.inner.id)
                && let Some(node) = m.membership_config.membership().get_node(&leader).cloned()
            {
                return self.forward(leader, node, req).await;
            }
        }
        self.submit_local(req).await
    }

    async fn submit_local(&self, req: PolicyRequest) -> Result<Applied, WriteError> {
        match self.inner.raft.client_write(req).await {
            Ok(resp) => match resp.data {
                PolicyResponse::Applied { index, changes } => Ok(Applied { index, changes }),
                PolicyResponse::Rejected(r) => Err(WriteError::Rejected(r)),
                PolicyResponse::Noop => Ok(Applied {
                    index: resp.log_id.index,
                    changes: Vec::new(),
                }),
            },
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(WriteError::NotLeader {
                    leader: f.leader_id,
                    leader_node: f.leader_node,
                })
            }
            Err(RaftError::APIError(e)) => Err(WriteError::Unavailable(boxed(e))),
            Err(RaftError::Fatal(e)) => Err(WriteError::Unavailable(boxed(e))),
        }
    }

    async fn forward(
        &self,
        leader: NodeId,
        node: Node,
        req: PolicyRequest,
    ) -> Result<Applied, WriteError> {
        let reply = network::call(
            self.inner.transport.as_ref(),
            leader,
            &node,
            RaftRpc::Write(req),
        )
        .await
        .map_err(|e| WriteError::Unavailable(boxed(e)))?;
        match reply {
            RaftReply::Write(Ok(PolicyResponse::Applied { index, changes })) => {
                Ok(Applied { index, changes })
            }
            RaftReply::Write(Ok(PolicyResponse::Noop)) => Ok(Applied {
                index: 0,
                changes: Vec::new(),
            }),
            RaftReply::Write(Ok(PolicyResponse::Rejected(r))) => Err(WriteError::Rejected(r)),
            RaftReply::Write(Err(ForwardRefused::NotLeader {
                leader,
                leader_node,
            })) => Err(WriteError::NotLeader {
                leader,
                leader_node,
            }),
            RaftReply::Write(Err(ForwardRefused::Unavailable { reason })) => {
                Err(WriteError::Unavailable(boxed(RemoteReason(reason))))
            }
            other => Err(WriteError::Unavailable(boxed(RemoteReason(format!(
                "unexpected reply to a forwarded write: {other:?}"
            ))))),
        }
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
            RaftRpc::Write(req) => RaftReply::Write(match self.submit_local(req).await {
                Ok(a) => Ok(PolicyResponse::Applied {
                    index: a.index,
                    changes: a.changes,
                }),
                Err(WriteError::Rejected(r)) => Ok(PolicyResponse::Rejected(r)),
                Err(WriteError::NotLeader {
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
        }
    }

    // ---- cluster operations ----

    fn metrics(&self) -> openraft::RaftMetrics<NodeId, Node> {
        self.inner.raft.metrics().borrow().clone()
    }

    fn not_leader(&self, m: &openraft::RaftMetrics<NodeId, Node>) -> ClusterError {
        let leader_node = m
            .current_leader
            .and_then(|l| m.membership_config.membership().get_node(&l).cloned());
        ClusterError::NotLeader {
            leader: m.current_leader,
            leader_node,
        }
    }

    fn membership_error(e: RaftError<NodeId, ClientWriteError<NodeId, Node>>) -> ClusterError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ClusterError::NotLeader {
                leader: f.leader_id,
                leader_node: f.leader_node,
            },
            RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
                ClusterError::Refused(boxed(e))
            }
            RaftError::Fatal(e) => ClusterError::Unavailable(boxed(e)),
        }
    }

    /// Adds a non-voting member and waits (bounded) until it has caught up, by log or by
    /// snapshot. Leader only.
    pub async fn add_learner(&self, id: NodeId, node: Node) -> Result<(), ClusterError> {
        let timeout = self.inner.config.learner_catch_up_timeout;
        match tokio::time::timeout(timeout, self.inner.raft.add_learner(id, node, true)).await {
            Err(_) => Err(ClusterError::Timeout {
                what: "learner catch-up",
                waited_ms: timeout.as_millis() as u64,
            }),
            Ok(r) => r.map(|_| ()).map_err(Self::membership_error),
        }
    }

    /// Asks the cluster, through any member at `seed` (its Raft address), to add this node
    /// (reachable at `me`) as a learner; voters are then rebalanced to 3 or 5. Follows one
    /// redirect to the leader. Returns once this node has caught up.
    pub async fn join(&self, seed: Node, me: Node) -> Result<(), ClusterError> {
        let transport = self.inner.transport.as_ref();
        let rpc = || RaftRpc::Join {
            id: self.inner.id,
            node: me.clone(),
        };
        let mut target = (0, seed);
        for _ in 0..2 {
            let reply = network::call(transport, target.0, &target.1, rpc())
                .await
                .map_err(|e| ClusterError::Unavailable(boxed(e)))?;
            match reply {
                RaftReply::Join(Ok(())) => return Ok(()),
                RaftReply::Join(Err(ForwardRefused::NotLeader {
                    leader: Some(l),
                    leader_node: Some(n),
                })) => target = (l, n),
                RaftReply::Join(Err(ForwardRefused::NotLeader {
                    leader,
                    leader_node,
                })) => {
                    return Err(ClusterError::NotLeader {
                        leader,
                        leader_node,
                    });
                }
                RaftReply::Join(Err(ForwardRefused::Unavailable { reason })) => {
                    return Err(ClusterError::Refused(boxed(RemoteReason(reason))));
                }
                other => {
                    return Err(ClusterError::Unavailable(boxed(RemoteReason(format!(
                        "unexpected reply to join: {other:?}"
                    )))));
                }
            }
        }
        Err(ClusterError::Unavailable(boxed(RemoteReason(
            "join redirected more than once".into(),
        ))))
    }

    /// Leader side of `join`: add as learner (waits for catch-up), then rebalance voters.
    async fn admit(&self, id: NodeId, node: Node) -> Result<(), ClusterError> {
        let m = self.metrics();
        if m.current_leader != Some(self.inner.id) {
            return Err(self.not_leader(&m));
        }
        if m.membership_config.membership().get_node(&id).is_none() {
            self.add_learner(id, node).await?;
        }
        self.rebalance_voters().await.map(|_| ())
    }

    /// Promotes learners (lowest ids first) so the cluster has 3 voters once there are 3
    /// members and 5 once there are 5; returns the voter count. Leader only.
    pub async fn rebalance_voters(&self) -> Result<usize, ClusterError> {
        let m = self.metrics();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let learners: Vec<NodeId> = membership.learner_ids().collect();
        let total = voters.len() + learners.len();
        let want = if total >= 5 {
            5
        } else if total >= 3 {
            3
        } else {
            voters.len()
        };
        if want <= voters.len() {
            return Ok(voters.len());
        }
        let promote: BTreeSet<NodeId> = learners.into_iter().take(want - voters.len()).collect();
        self.promote(promote).await?;
        Ok(want)
    }

    /// Promotes learners to voters; the resulting voter count must be 1, 3 or 5. Leader only.
    pub async fn promote(&self, ids: BTreeSet<NodeId>) -> Result<(), ClusterError> {
        let m = self.metrics();
        let membership = m.membership_config.membership();
        for id in &ids {
            if membership.get_node(id).is_none() {
                return Err(ClusterError::UnknownNode(*id));
            }
        }
        let voters: BTreeSet<NodeId> = membership.voter_ids().chain(ids.iter().copied()).collect();
        if ![1, 3, 5].contains(&voters.len()) {
            return Err(ClusterError::VoterCount {
                voters: voters.len(),
            });
        }
        self.inner
            .raft
            .change_membership(ChangeMembers::AddVoterIds(ids), true)
            .await
            .map(|_| ())
            .map_err(Self::membership_error)
    }

    /// Removes a member (voter or learner) from the cluster. Leader only. Removing a voter
    /// may leave an even count for the time it takes to add a replacement; the last voter
    /// cannot be removed.
    pub async fn remove_node(&self, id: NodeId) -> Result<(), ClusterError> {
        let m = self.metrics();
        let membership = m.membership_config.membership();
        if membership.get_node(&id).is_none() {
            return Err(ClusterError::UnknownNode(id));
        }
        let is_voter = membership.voter_ids().any(|v| v == id);
        let change = if is_voter {
            let remaining = membership.voter_ids().filter(|v| *v != id).count();
            if remaining == 0 {
                return Err(ClusterError::VoterCount { voters: 0 });
            }
            ChangeMembers::RemoveVoters(BTreeSet::from([id]))
        } else {
            ChangeMembers::RemoveNodes(BTreeSet::from([id]))
        };
        self.inner
            .raft
            .change_membership(change, false)
            .await
            .map(|_| ())
            .map_err(Self::membership_error)
    }

    /// Hands leadership to `to` (or the most caught-up voter) and returns the new leader.
    ///
    /// openraft 0.9 has no transfer-leader API, so this is a graceful step-down: wait until
    /// the target has every entry, stop this node's heartbeats and candidacy, ask the target
    /// to campaign as soon as the leader lease has run out, wait for a new leader, then
    /// re-enable this node's timers.
    pub async fn transfer_leadership(&self, to: Option<NodeId>) -> Result<NodeId, ClusterError> {
        let cfg = &self.inner.config;
        let m = self.metrics();
        if m.current_leader != Some(self.inner.id) {
            return Err(self.not_leader(&m));
        }
        let membership = m.membership_config.membership().clone();
        let others: Vec<NodeId> = membership
            .voter_ids()
            .filter(|v| *v != self.inner.id)
            .collect();
        let matched = |m: &openraft::RaftMetrics<NodeId, Node>, id: NodeId| {
            m.replication
                .as_ref()
                .and_then(|r| r.get(&id).cloned().flatten())
                .map(|l| l.index)
        };
        let target = match to {
            Some(t) if others.contains(&t) => t,
            Some(t) => return Err(ClusterError::UnknownNode(t)),
            None => *others
                .iter()
                .max_by_key(|id| matched(&m, **id))
                .ok_or(ClusterError::VoterCount { voters: 1 })?,
        };
        let node = membership
            .get_node(&target)
            .cloned()
            .ok_or(ClusterError::UnknownNode(target))?;
        let catch_up = cfg.election_timeout_max * 10;
        let me = self.inner.id;
        self.inner
            .raft
            .wait(Some(catch_up))
            .metrics(
                |m| m.last_log_index.is_some() && matched(m, target) >= m.last_log_index,
                "transfer target caught up",
            )
            .await
            .map_err(|_| ClusterError::Timeout {
                what: "transfer target catch-up",
                waited_ms: catch_up.as_millis() as u64,
            })?;
        let rc = self.inner.raft.runtime_config();
        rc.heartbeat(false);
        rc.elect(false);
        let lease = cfg.election_timeout_max + cfg.heartbeat_interval;
        let asked = tokio::time::timeout(
            lease + cfg.election_timeout_max * 4,
            network::call(
                self.inner.transport.as_ref(),
                target,
                &node,
                RaftRpc::TimeoutNow {
                    lease_ms: lease.as_millis() as u64,
                },
            ),
        )
        .await;
        let outcome = match asked {
            Ok(Ok(_)) => {
                let wait_for = cfg.election_timeout_max * 10;
                self.inner
                    .raft
                    .wait(Some(wait_for))
                    .metrics(|m| m.current_leader.is_some_and(|l| l != me), "new leader")
                    .await
                    .map(|m| m.current_leader.unwrap_or(target))
                    .map_err(|_| ClusterError::Timeout {
                        what: "leader hand-off",
                        waited_ms: wait_for.as_millis() as u64,
                    })
            }
            Ok(Err(e)) => Err(ClusterError::Unavailable(boxed(e))),
            Err(_) => Err(ClusterError::Timeout {
                what: "leader hand-off request",
                waited_ms: (lease + cfg.election_timeout_max * 4).as_millis() as u64,
            }),
        };
        rc.heartbeat(true);
        rc.elect(true);
        outcome
    }

    /// Builds a snapshot now and purges the log it covers (as soon as no replication stream
    /// is still sending those entries; a lagging follower then gets the snapshot); returns
    /// the snapshot's index.
    pub async fn compact(&self) -> Result<u64, ClusterError> {
        let applied = self.metrics().last_applied.map_or(0, |l| l.index);
        let raft = &self.inner.raft;
        raft.trigger()
            .snapshot()
            .await
            .map_err(|e| ClusterError::Unavailable(boxed(e)))?;
        let wait_for = Duration::from_secs(10);
        let m = raft
            .wait(Some(wait_for))
            .metrics(
                |m| m.snapshot.is_some_and(|s| s.index >= applied),
                "snapshot built",
            )
            .await
            .map_err(|_| ClusterError::Timeout {
                what: "snapshot",
                waited_ms: wait_for.as_millis() as u64,
            })?;
        let index = m.snapshot.map_or(0, |s| s.index);
        raft.trigger()
            .purge_log(index)
            .await
            .map_err(|e| ClusterError::Unavailable(boxed(e)))?;
        // The leader postpones a purge while a replication stream is sending those entries.
        raft.wait(Some(wait_for))
            .metrics(|m| m.purged.is_some_and(|p| p.index >= index), "log purged")
            .await
            .map_err(|_| ClusterError::Timeout {
                what: "log purge",
                waited_ms: wait_for.as_millis() as u64,
            })?;
        Ok(index)
    }

    /// Members, leader, term, indexes, and (on the leader) per-member lag.
    pub fn status(&self) -> ClusterStatus {
        let m = self.metrics();
        let membership = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
        let last = m.last_log_index;
        let mut members: Vec<MemberStatus> = membership
            .nodes()
            .map(|(id, node)| {
                let matched_index = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(id).cloned())
                    .map(|l| l.map_or(0, |l| l.index));
                let matched_index = if *id == m.id && m.state == ServerState::Leader {
                    last
                } else {
                    matched_index
                };
                MemberStatus {
                    id: *id,
                    addr: node.addr.clone(),
                    voter: voters.contains(id),
                    matched_index,
                    lag: matched_index.map(|mi| last.unwrap_or(0).saturating_sub(mi)),
                }
            })
            .collect();
        members.sort_by_key(|s| (!s.voter, s.id));
        ClusterStatus {
            id: m.id,
            role: match m.state {
                ServerState::Leader => Role::Leader,
                ServerState::Follower => Role::Follower,
                ServerState::Candidate => Role::Candidate,
                ServerState::Learner => Role::Learner,
                ServerState::Shutdown => Role::Shutdown,
            },
            leader: m.current_leader,
            term: m.current_term,
            last_log_index: m.last_log_index,
            committed_index: self.inner.committed.load(Ordering::Relaxed),
            applied_index: m.last_applied.map(|l| l.index),
            snapshot_index: m.snapshot.map(|l| l.index),
            purged_index: m.purged.map(|l| l.index),
            members,
        }
    }

    /// Stops Raft. When `hand_off` is set and this node leads other voters, leadership is
    /// handed to the most caught-up one first (best effort; failures are logged).
    pub async fn shutdown(&self, hand_off: bool) -> Result<(), ClusterError> {
        if hand_off {
            let m = self.metrics();
            let others = m
                .membership_config
                .membership()
                .voter_ids()
                .any(|v| v != self.inner.id);
            if m.current_leader == Some(self.inner.id)
                && others
                && let Err(e) = self.transfer_leadership(None).await
            {
                tracing::warn!(error = %e, "leader hand-off before shutdown failed");
            }
        }
        self.inner
            .raft
            .shutdown()
            .await
            .map_err(|e| ClusterError::Unavailable(boxed(e)))
    }
}
