//! Per-Envoy sync status: what each client was last sent, what it last accepted, why it
//! last rejected something. Also holds each node's accepted/rejected memory across streams.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use infermesh_proto::envoy::config::core::v3::Node;
use parking_lot::Mutex;
use serde::Serialize;

use crate::resource_type::ResourceType;
use crate::snapshot::{EncodedResource, Snapshot};
use crate::stream::{NackDetail, NodeMemory, StreamEvent, TypeMemory};
use crate::stream_core::SentResources;
use crate::vec_map::VecMap;

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
    /// The response in flight, to settle into `resources` on its ACK or NACK.
    in_flight: Option<InFlightRecord>,
    /// Every resource the client was sent and still holds, by name (for CSDS).
    resources: VecMap<String, ResourceRecord>,
}

/// A response sent and not yet answered, as the registry keeps it.
#[derive(Debug)]
struct InFlightRecord {
    nonce: String,
    version: String,
    unix_ms: u64,
    sent: SentResources,
}

/// One resource as sent to a client in a response.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    /// The resource, as sent.
    pub(crate) resource: Arc<EncodedResource>,
    /// `version_info` of the response that carried it.
    pub(crate) version_info: String,
    /// When it was sent, accepted or rejected, milliseconds since the Unix epoch.
    pub(crate) unix_ms: u64,
}

/// What a client did with one resource.
#[derive(Debug, Clone, Default)]
struct ResourceRecord {
    accepted: Option<Held>,
    /// The latest rejected version, until a version of the resource is accepted. Boxed:
    /// rejections are rare, and every node keeps a record per resource it holds.
    rejected: Option<Box<(Held, NackStatus)>>,
}

/// One resource of one client, as CSDS reports it.
#[derive(Debug, Clone)]
pub(crate) struct ResourceView {
    /// Resource name.
    pub(crate) name: String,
    /// The version the client last accepted.
    pub(crate) accepted: Option<Held>,
    /// The version it rejected since, with its reason.
    pub(crate) rejected: Option<(Held, NackStatus)>,
    /// The version sent and not answered yet.
    pub(crate) in_flight: Option<Held>,
}

/// One client's state, as CSDS reports it.
#[derive(Debug, Clone)]
pub(crate) struct ClientView {
    /// `node.id` (or the anonymous name the server gave it).
    pub(crate) node_id: String,
    /// `node.cluster`.
    pub(crate) cluster: String,
    /// The `Node` the client sent on its latest stream.
    pub(crate) node: Option<Node>,
    /// Resources per type, indexed by [`ResourceType::index`].
    pub(crate) types: [Vec<ResourceView>; 4],
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
    node: Option<Node>,
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

    /// Records stream events (with what each response sent, taken from `sent`), the
    /// names the client stopped holding without a response (`dropped`), and the stream's
    /// updated memory.
    pub(crate) fn record(
        &self,
        events: impl Iterator<Item = StreamEvent>,
        sent: &mut [SentResources; 4],
        dropped: &[Vec<String>; 4],
        memory: impl Fn(ResourceType) -> TypeMemory,
        subscription: impl Fn(ResourceType) -> SubscriptionView,
    ) {
        let mut st = self.state.lock();
        let sotw = st.protocol == Protocol::Sotw;
        let now = now_ms();
        let mut touched = [false; 4];
        for ev in events {
            match ev {
                StreamEvent::Sent {
                    ty, version, nonce, ..
                } => {
                    let t = &mut st.types[ty.index()];
                    t.in_flight = Some(InFlightRecord {
                        nonce: nonce.clone(),
                        version: version.clone(),
                        unix_ms: now,
                        sent: std::mem::take(&mut sent[ty.index()]),
                    });
                    t.last_sent = Some(VersionStamp {
                        version,
                        nonce,
                        unix_ms: now,
                    });
                }
                StreamEvent::Acked { ty, version, nonce } => {
                    let t = &mut st.types[ty.index()];
                    if let Some(f) = t.in_flight.take_if(|f| f.nonce == nonce) {
                        t.settle_ack(f, sotw, now);
                    }
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
                    let nack = NackStatus {
                        detail,
                        unix_ms: now,
                    };
                    if let Some(f) = t.in_flight.take_if(|f| f.nonce == nack.detail.nonce) {
                        t.settle_nack(f, &nack);
                    }
                    t.nack = Some(nack);
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
            for name in &dropped[ty.index()] {
                st.types[ty.index()].resources.remove(name);
            }
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
                for rec in t.resources.values_mut() {
                    rec.rejected = None;
                }
                t.resources.retain(|_, rec| rec.accepted.is_some());
            }
        }
    }
}

impl TypeStatus {
    /// The client accepted `f`: its resources are what it holds now.
    fn settle_ack(&mut self, f: InFlightRecord, sotw: bool, now: u64) {
        if sotw {
            // A SotW response is the whole state of the type for this client.
            let names: std::collections::BTreeSet<&str> =
                f.sent.resources.iter().map(|r| r.name.as_str()).collect();
            self.resources.retain(|n, _| names.contains(n.as_str()));
        }
        for name in &f.sent.removed {
            self.resources.remove(name);
        }
        for r in f.sent.resources {
            let rec = self.resources.get_or_default(r.name.clone());
            rec.accepted = Some(Held {
                resource: r,
                version_info: f.version.clone(),
                unix_ms: now,
            });
            rec.rejected = None;
        }
    }

    /// The client rejected `f`: it keeps what it held; the resources `f` changed are
    /// marked rejected.
    fn settle_nack(&mut self, f: InFlightRecord, nack: &NackStatus) {
        for r in f.sent.resources {
            let rec = self.resources.get_or_default(r.name.clone());
            if rec
                .accepted
                .as_ref()
                .is_some_and(|a| a.resource.version == r.version)
            {
                continue;
            }
            rec.rejected = Some(Box::new((
                Held {
                    resource: r,
                    version_info: f.version.clone(),
                    unix_ms: nack.unix_ms,
                },
                nack.clone(),
            )));
        }
    }

    /// Every resource the client was sent, for CSDS.
    fn resource_views(&self) -> Vec<ResourceView> {
        let mut views: BTreeMap<&str, ResourceView> = self
            .resources
            .iter()
            .map(|(name, rec)| {
                (
                    name.as_str(),
                    ResourceView {
                        name: name.clone(),
                        accepted: rec.accepted.clone(),
                        rejected: rec.rejected.as_deref().cloned(),
                        in_flight: None,
                    },
                )
            })
            .collect();
        if let Some(f) = &self.in_flight {
            for r in &f.sent.resources {
                views
                    .entry(r.name.as_str())
                    .or_insert_with(|| ResourceView {
                        name: r.name.clone(),
                        accepted: None,
                        rejected: None,
                        in_flight: None,
                    })
                    .in_flight = Some(Held {
                    resource: Arc::clone(r),
                    version_info: f.version.clone(),
                    unix_ms: f.unix_ms,
                });
            }
        }
        views.into_values().collect()
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
        node: Option<&Node>,
        user_agent: String,
        protocol: Protocol,
    ) -> Arc<NodeEntry> {
        let cluster = node.map_or("", |n| n.cluster.as_str());
        let mut nodes = self.nodes.lock();
        let entry = nodes.entry(node_id.to_string()).or_insert_with(|| {
            Arc::new(NodeEntry {
                state: Mutex::new(NodeState {
                    cluster: String::new(),
                    node: None,
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
            st.node = node.cloned();
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
            if st.streams == 0 {
                // Nothing sent on a closed stream will be answered.
                for t in &mut st.types {
                    t.in_flight = None;
                }
            }
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

    /// Every client with an open stream, as CSDS reports them, by node id.
    pub(crate) fn client_views(&self) -> Vec<ClientView> {
        let nodes = self.nodes.lock();
        let mut views: Vec<ClientView> = nodes
            .iter()
            .filter_map(|(id, e)| {
                let st = e.state.lock();
                (st.streams > 0).then(|| ClientView {
                    node_id: id.clone(),
                    cluster: st.cluster.clone(),
                    node: st.node.clone(),
                    types: std::array::from_fn(|i| st.types[i].resource_views()),
                })
            })
            .collect();
        views.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        views
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
