//! What the status page shows, as one JSON document built from the node's own views (no
//! IO): members and their Raft roles, the policy cluster's term and indexes, every pod with
//! its load and owning node, the prefix state held here, request totals (the page turns
//! them into rates), connected Envoys with their xDS sync state, and flow control's queue.

use std::time::Instant;

use infermesh_gossip::{Liveness, LoadView, MemberSet, PodId};
use infermesh_raft_store::ClusterStatus;
use infermesh_xds::SyncStatus;
use serde::Serialize;

use crate::metrics::epp::TotalsSnapshot;
use crate::pool::PoolView;

/// One status-page update.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Snapshot {
    /// This node's name.
    pub node: String,
    /// Wall-clock time of the snapshot, ms since the Unix epoch.
    pub unix_ms: u64,
    /// Live mesh members (this node included), by name.
    pub members: Vec<MemberView>,
    /// The policy cluster as this node sees it (`None`: no policy store).
    pub raft: Option<RaftView>,
    /// The pool's name.
    pub pool: String,
    /// Every endpoint of the pool.
    pub pods: Vec<PodView>,
    /// Prefix blocks this node holds as an anchor owner.
    pub prefix_blocks: usize,
    /// Heap bytes of those blocks.
    pub prefix_bytes: usize,
    /// Request totals since start.
    pub totals: TotalsSnapshot,
    /// Envoys with an open ADS stream to this node.
    pub envoys: Vec<EnvoyView>,
    /// Requests waiting in flow control here (`None`: flow control off).
    pub queued: Option<i64>,
}

/// A mesh member.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MemberView {
    /// Node name.
    pub name: String,
    /// Gossip address.
    pub gossip: String,
    /// `alive` or `suspect`.
    pub liveness: &'static str,
    /// `voter`, `learner`, or `none` (not in the policy cluster / unknown).
    pub raft: &'static str,
    /// Leads the policy cluster.
    pub leader: bool,
    /// This node.
    pub this: bool,
}

/// The policy cluster.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RaftView {
    /// This node's role.
    pub role: &'static str,
    /// Current term.
    pub term: u64,
    /// The leader's name, if known.
    pub leader: Option<String>,
    /// Last committed index.
    pub committed: u64,
    /// Last applied index.
    pub applied: u64,
}

/// One endpoint.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PodView {
    /// `ip:port`.
    pub address: String,
    /// Its last scrape succeeded.
    pub up: bool,
    /// Waiting requests.
    pub waiting: Option<u32>,
    /// Running requests.
    pub running: Option<u32>,
    /// KV-cache utilization in [0, 1].
    pub kv: Option<f64>,
    /// Requests in flight through the tier (this node's plus the board's).
    pub in_flight: u32,
    /// Seconds since its last scrape.
    pub age_s: Option<f64>,
    /// The node that scrapes it (its owner), when the mesh shares load.
    pub owner: Option<String>,
}

/// One connected Envoy.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct EnvoyView {
    /// `node.id`.
    pub node_id: String,
    /// `sotw` or `delta`.
    pub protocol: &'static str,
    /// Open streams.
    pub streams: usize,
    /// Per subscribed type.
    pub types: Vec<TypeView>,
}

/// One type's sync state.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TypeView {
    /// `CDS`, `EDS`, `LDS`, `RDS`.
    pub r#type: &'static str,
    /// Version last sent.
    pub sent: Option<String>,
    /// Version last acknowledged.
    pub acked: Option<String>,
    /// The last rejection's message, if the client rejected since it last accepted.
    pub nack: Option<String>,
}

/// Everything a snapshot is built from.
#[derive(Debug)]
pub struct Inputs<'a> {
    /// This node's name.
    pub node: &'a str,
    /// Wall-clock ms.
    pub unix_ms: u64,
    /// The mesh's live members.
    pub members: Option<&'a MemberSet>,
    /// The load board (pod owners).
    pub load: Option<&'a LoadView>,
    /// The policy cluster's status.
    pub raft: Option<&'a ClusterStatus>,
    /// The pool.
    pub pool: &'a PoolView,
    /// Now (for scrape ages).
    pub now: Instant,
    /// Owner-side prefix blocks and bytes.
    pub prefix: (usize, usize),
    /// Request totals.
    pub totals: TotalsSnapshot,
    /// xDS sync state.
    pub xds: &'a SyncStatus,
    /// Flow control's queue, when on.
    pub queued: Option<i64>,
}

/// Builds the snapshot.
pub fn build(i: &Inputs<'_>) -> Snapshot {
    // Raft members are named by their node name (the transport address is the mesh name).
    let raft_name = |id: u64| {
        i.raft
            .and_then(|r| r.members.iter().find(|m| m.id == id))
            .map(|m| m.addr.clone())
    };
    let leader = i.raft.and_then(|r| r.leader).and_then(raft_name);
    let members = i
        .members
        .map(|set| {
            set.members
                .iter()
                .map(|(name, info)| {
                    let name = name.as_str().to_owned();
                    let raft = i
                        .raft
                        .and_then(|r| r.members.iter().find(|m| m.addr == name))
                        .map_or("none", |m| if m.voter { "voter" } else { "learner" });
                    MemberView {
                        leader: leader.as_deref() == Some(name.as_str()),
                        this: name == i.node,
                        gossip: info.id.gossip.to_string(),
                        liveness: match info.liveness {
                            Liveness::Alive => "alive",
                            Liveness::Suspect => "suspect",
                        },
                        raft,
                        name,
                    }
                })
                .collect()
        })
        .unwrap_or_else(|| {
            vec![MemberView {
                name: i.node.to_owned(),
                gossip: String::new(),
                liveness: "alive",
                raft: "none",
                leader: false,
                this: true,
            }]
        });
    let raft = i.raft.map(|r| RaftView {
        role: r.role.as_str(),
        term: r.term,
        leader: leader.clone(),
        committed: r.committed_index,
        applied: r.applied_index.unwrap_or(0),
    });
    let pods = i
        .pool
        .slots
        .iter()
        .map(|slot| {
            let m = slot.metrics();
            let owner = i
                .load
                .and_then(|l| l.pod(&PodId::from(slot.address())))
                .and_then(|p| p.scraped_by.as_ref())
                .map(|n| n.as_str().to_owned());
            PodView {
                address: slot.address().to_string(),
                up: slot.is_up(),
                waiting: m.as_ref().map(|m| m.waiting_queue),
                running: m.as_ref().map(|m| m.running),
                kv: m.as_ref().map(|m| m.kv_cache_usage),
                in_flight: slot.in_flight().requests,
                age_s: m
                    .as_ref()
                    .map(|m| i.now.saturating_duration_since(m.scraped_at).as_secs_f64()),
                owner,
            }
        })
        .collect();
    let envoys = i
        .xds
        .envoys
        .iter()
        .filter(|e| e.connected_streams > 0)
        .map(|e| EnvoyView {
            node_id: e.node_id.clone(),
            protocol: match e.protocol {
                infermesh_xds::status::Protocol::Sotw => "sotw",
                infermesh_xds::status::Protocol::Delta => "delta",
            },
            streams: e.connected_streams,
            types: e
                .types
                .iter()
                .filter(|t| t.subscribed)
                .map(|t| TypeView {
                    r#type: t.ty.short_name(),
                    sent: t.last_sent.as_ref().map(|v| v.version.clone()),
                    acked: t.last_acked.as_ref().map(|v| v.version.clone()),
                    nack: t
                        .nack
                        .as_ref()
                        .map(|n| format!("{}: {}", n.detail.version, n.detail.message)),
                })
                .collect(),
        })
        .collect();
    Snapshot {
        node: i.node.to_owned(),
        unix_ms: i.unix_ms,
        members,
        raft,
        pool: i.pool.name.clone(),
        pods,
        prefix_blocks: i.prefix.0,
        prefix_bytes: i.prefix.1,
        totals: i.totals,
        envoys,
        queued: i.queued,
    }
}
