//! Per-Envoy sync status: what each client was last sent, what it last accepted, why it
//! last rejected something. Also holds each node's accepted/rejected memory across streams.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;
use serde::Serialize;

use crate::resource_type::ResourceType;
use crate::snapshot::Snapshot;
use crate::stream::{NackDetail, NodeMemory, StreamEvent, TypeMemory};

/// Most disconnected nodes remembered; the oldest are forgotten first.
const MAX_DISCONNECTED: usize = 4096;

/// Which ADS variant a client speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// `StreamAggregatedResources`.
    Sotw,
    /// `DeltaAggregatedResources`.
    Delta,
}

/// A version handed out or accepted, with when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VersionStamp {
    /// The version.
    pub version: String,
    /// The nonce of the response.
    pub nonce: String,
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub unix_ms: u64,
}

/// A NACK with when it arrived.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NackStatus {
    /// What was rejected and the client's reason.
    #[serde(flatten)]
    pub detail: NackDetail,
    /// Wall-clock time, milliseconds since the Unix epoch.
    pub unix_ms: u64,
}

/// Sync status of one resource type on one client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TypeSyncStatus {
    /// The type.
    #[serde(rename = "type")]
    pub ty: ResourceType,
    /// Whether the client subscribes to it.
    pub subscribed: bool,
    /// Whether the subscription is a wildcard.
    pub wildcard: bool,
    /// Number of explicitly subscribed names.
    pub names: usize,
    /// The last response sent.
    pub last_sent: Option<VersionStamp>,
    /// The last response accepted.
    pub last_acked: Option<VersionStamp>,
    /// The last rejection, if the client rejected anything since it last accepted.
    pub nack: Option<NackStatus>,
    /// Whether the client has accepted the version currently published.
    pub in_sync: bool,
    /// Rejections so far.
    pub nacks_total: u64,
    /// Requests ignored for answering an older response.
    pub stale_nonces_total: u64,
}

/// Sync status of one client (Envoy or gRPC), by xDS node id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EnvoySyncStatus {
    /// `node.id`.
    pub node_id: String,
    /// `node.cluster`.
    pub cluster: String,
    /// `node.user_agent_name` and version.
    pub user_agent: String,
    /// ADS variant of its latest stream.
    pub protocol: Protocol,
    /// Streams currently open from it to this server.
    pub connected_streams: usize,
    /// Per type, in push order.
    pub types: Vec<TypeSyncStatus>,
}

/// What [`XdsServer::sync_status`](crate::XdsServer::sync_status) returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SyncStatus {
    /// Currently published version of each type, in push order (`None` before the first
    /// publish).
    pub versions: Option<Vec<(ResourceType, String)>>,
    /// Every client seen, by node id.
    pub envoys: Vec<EnvoySyncStatus>,
}

#[derive(Debug, Default)]
struct TypeStatus {
    subscribed: bool,
    wildcard: bool,
    names: usize,
    last_sent: Option<VersionStamp>,
    last_acked: Option<VersionStamp>,
    nack: Option<NackStatus>,
    nacks_total: u64,
    stale_nonces_total: u64,
    synced_version: Option<String>,
}

/// A stream's subscription to one type, as the status shows it.
#[derive(Debug, Clone, Default)]
pub(crate) struct SubscriptionView {
    pub(crate) subscribed: bool,
    pub(crate) wildcard: bool,
    pub(crate) names: usize,
    /// The published version the client holds everything of, when nothing is pending.
    pub(crate) synced_version: Option<String>,
}

#[derive(Debug)]
struct NodeState {
    cluster: String,
    user_agent: String,
    protocol: Protocol,
    streams: usize,
    /// Increases on every disconnect; orders eviction of disconnected nodes.
    disconnected_at: u64,
    memory: NodeMemory,
    types: [TypeStatus; 4],
}

/// One client's entry; a stream holds it and updates it without touching the registry.
#[derive(Debug)]
pub(crate) struct NodeEntry {
    state: Mutex<NodeState>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl NodeEntry {
    /// The node's memory, to seed a new stream.
    pub(crate) fn memory(&self) -> NodeMemory {
        self.state.lock().memory.clone()
    }

    /// Records stream events and the stream's updated memory.
    pub(crate) fn record(
        &self,
        events: impl Iterator<Item = StreamEvent>,
        memory: impl Fn(ResourceType) -> TypeMemory,
        subscription: impl Fn(ResourceType) -> SubscriptionView,
    ) {
        let mut st = self.state.lock();
        let now = now_ms();
        let mut touched = [false; 4];
        for ev in events {
            match ev {
                StreamEvent::Sent {
                    ty, version, nonce, ..
                } => {
                    st.types[ty.index()].last_sent = Some(VersionStamp {
                        version,
                        nonce,
                        unix_ms: now,
                    });
                }
                StreamEvent::Acked { ty, version, nonce } => {
                    let t = &mut st.types[ty.index()];
                    t.last_acked = Some(VersionStamp {
                        version,
                        nonce,
                        unix_ms: now,
                    });
                    t.nack = None;
                    touched[ty.index()] = true;
                }
                StreamEvent::Nacked { ty, detail } => {
                    let t = &mut st.types[ty.index()];
                    t.nack = Some(NackStatus {
                        detail,
                        unix_ms: now,
                    });
                    t.nacks_total += 1;
                    touched[ty.index()] = true;
                }
                StreamEvent::StaleNonce { ty, .. } => {
                    st.types[ty.index()].stale_nonces_total += 1;
                }
                StreamEvent::UnknownType { .. } => {}
            }
        }
        for ty in ResourceType::ALL {
            if touched[ty.index()] {
                st.memory[ty.index()] = memory(ty);
            }
            let view = subscription(ty);
            let t = &mut st.types[ty.index()];
            t.subscribed = view.subscribed;
            t.wildcard = view.wildcard;
            t.names = view.names;
            t.synced_version = view.synced_version;
            if t.synced_version.is_some() {
                // The client holds the published version: an earlier rejection is history.
                t.nack = None;
            }
        }
    }
}

/// All clients seen by this server.
#[derive(Debug, Default)]
pub(crate) struct StatusRegistry {
    nodes: Mutex<HashMap<String, Arc<NodeEntry>>>,
    disconnects: Mutex<u64>,
}

impl StatusRegistry {
    /// Registers a new stream from `node`.
    pub(crate) fn open(
        &self,
        node_id: &str,
        cluster: &str,
        user_agent: String,
        protocol: Protocol,
    ) -> Arc<NodeEntry> {
        let mut nodes = self.nodes.lock();
        let entry = nodes.entry(node_id.to_string()).or_insert_with(|| {
            Arc::new(NodeEntry {
                state: Mutex::new(NodeState {
                    cluster: String::new(),
                    user_agent: String::new(),
                    protocol,
                    streams: 0,
                    disconnected_at: 0,
                    memory: Default::default(),
                    types: Default::default(),
                }),
            })
        });
        {
            let mut st = entry.state.lock();
            st.streams += 1;
            st.protocol = protocol;
            st.cluster = cluster.to_string();
            st.user_agent = user_agent;
        }
        Arc::clone(entry)
    }

    /// Unregisters a stream; forgets the oldest disconnected nodes beyond the cap.
    pub(crate) fn close(&self, entry: &NodeEntry) {
        let stamp = {
            let mut d = self.disconnects.lock();
            *d += 1;
            *d
        };
        {
            let mut st = entry.state.lock();
            st.streams = st.streams.saturating_sub(1);
            st.disconnected_at = stamp;
        }
        let mut nodes = self.nodes.lock();
        let mut idle: Vec<(u64, String)> = nodes
            .iter()
            .filter_map(|(id, e)| {
                let st = e.state.lock();
                (st.streams == 0).then(|| (st.disconnected_at, id.clone()))
            })
            .collect();
        if idle.len() > MAX_DISCONNECTED {
            idle.sort();
            for (_, id) in idle.iter().take(idle.len() - MAX_DISCONNECTED) {
                nodes.remove(id);
            }
        }
    }

    /// The status of every client against `snapshot`.
    pub(crate) fn status(&self, snapshot: Option<&Snapshot>) -> SyncStatus {
        let nodes = self.nodes.lock();
        let mut envoys: Vec<EnvoySyncStatus> = nodes
            .iter()
            .map(|(id, e)| {
                let st = e.state.lock();
                let types = ResourceType::ALL
                    .into_iter()
                    .map(|ty| {
                        let t = &st.types[ty.index()];
                        let current = snapshot.map(|s| s.get(ty).version.as_str());
                        let in_sync = !t.subscribed
                            || (t.nack.is_none() && t.synced_version.as_deref() == current);
                        TypeSyncStatus {
                            ty,
                            subscribed: t.subscribed,
                            wildcard: t.wildcard,
                            names: t.names,
                            last_sent: t.last_sent.clone(),
                            last_acked: t.last_acked.clone(),
                            nack: t.nack.clone(),
                            in_sync,
                            nacks_total: t.nacks_total,
                            stale_nonces_total: t.stale_nonces_total,
                        }
                    })
                    .collect();
                EnvoySyncStatus {
                    node_id: id.clone(),
                    cluster: st.cluster.clone(),
                    user_agent: st.user_agent.clone(),
                    protocol: st.protocol,
                    connected_streams: st.streams,
                    types,
                }
            })
            .collect();
        envoys.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        SyncStatus {
            versions: snapshot.map(|s| {
                ResourceType::ALL
                    .into_iter()
                    .map(|t| (t, s.get(t).version.clone()))
                    .collect()
            }),
            envoys,
        }
    }
}
