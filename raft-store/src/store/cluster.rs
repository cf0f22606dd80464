//! Cluster operations on a `PolicyStore`: bootstrap, join, learners and voters, removal,
//! leader hand-off, compaction, status and shutdown.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{ChangeMembers, ServerState};
use serde::{Deserialize, Serialize};

use super::{PolicyStore, RemoteReason, Route, boxed};
use crate::error::{ClusterError, WriteError};
use crate::network::{self, ForwardRefused, RaftReply, RaftRpc};
use crate::policy::{PolicyOp, PolicyRequest, TokenHash};
use crate::types::{Node, NodeId};

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

impl Role {
    /// The role's lower-case name (metric labels, the status page).
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::Learner => "learner",
            Role::Shutdown => "shutdown",
        }
    }
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

impl PolicyStore {
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

    /// Resolves when Raft has stopped on a fatal error (a storage failure such as a full
    /// disk), naming it. Raft does not recover from those in-process: the caller should
    /// exit so that its supervisor restarts it on the same data.
    pub async fn fatal(&self) -> String {
        let mut rx = self.inner.raft.metrics();
        loop {
            if let Err(e) = &rx.borrow_and_update().running_state {
                return e.to_string();
            }
            if rx.changed().await.is_err() {
                return "Raft stopped".to_owned();
            }
        }
    }

    pub(super) fn metrics(&self) -> openraft::RaftMetrics<NodeId, Node> {
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
    pub(super) async fn admit(&self, id: NodeId, node: Node) -> Result<(), ClusterError> {
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
