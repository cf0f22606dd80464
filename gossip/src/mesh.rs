//! The [`Mesh`] handle: starts membership, RPC, load board and prefix tasks and exposes them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use parking_lot::RwLock;
use tokio::net::UdpSocket;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::{InvalidMeshConfig, MeshConfig};
use crate::load::board::{InFlightDelta, LoadBoard, LoadView};
use crate::load::driver as load_driver;
use crate::membership::{self, Liveness, MemberId, MemberSet, MembershipEvent};
use crate::pod::PodId;
use crate::prefix::owner::{self, Shards, StoreFactory};
use crate::prefix::store::{AnchoredIndex, PrefixStore};
use crate::ring::{NodeId, Owners, Ring};
use crate::rpc::{Dispatch, RpcError, Transport};
use crate::stats::{Stats, StatsSnapshot};
use crate::tls::{TlsError, TlsIdentity};
use crate::wire::{
    OneWay, PodMetrics, PrefixMatch, PrefixRecord, PrefixRemoval, RemoteError, Request, Response,
};

/// Starting the mesh failed; nothing is left running.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] InvalidMeshConfig),
    /// TLS material could not be loaded or generated.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A socket could not be bound.
    #[error("cannot bind {what} on {addr}: {source}")]
    Bind {
        /// `gossip` or `rpc`.
        what: &'static str,
        /// Address from the config.
        addr: SocketAddr,
        /// OS error.
        source: std::io::Error,
    },
}

/// A service channel is already taken (nothing changed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("service channel {0} is already registered")]
pub struct ChannelTaken(pub u16);

/// A request or cast delivered to a registered service.
#[derive(Debug)]
pub struct ServiceCall {
    /// Sending node (authenticated by its certificate in self-signed mode).
    pub from: NodeId,
    /// Opaque payload.
    pub payload: Bytes,
    reply: Option<oneshot::Sender<Vec<u8>>>,
}

impl ServiceCall {
    /// Whether the caller waits for an answer (a request, not a cast).
    pub fn expects_reply(&self) -> bool {
        self.reply.is_some()
    }

    /// Answers the caller (ignored for casts or when the caller gave up).
    pub fn respond(self, payload: Vec<u8>) {
        if let Some(tx) = self.reply {
            let _ = tx.send(payload);
        }
    }
}

/// State shared by the handle and the RPC server.
struct Shared {
    me: NodeId,
    members: watch::Receiver<Arc<MemberSet>>,
    stats: Arc<Stats>,
    shards: Arc<Shards>,
    load_tx: mpsc::UnboundedSender<load_driver::Input>,
    services: RwLock<HashMap<u16, mpsc::Sender<ServiceCall>>>,
}

impl Dispatch for Shared {
    async fn request(&self, from: NodeId, req: Request) -> Response {
        match req {
            Request::PrefixLookup { anchor, hashes } => {
                Stats::add(&self.stats.prefix_lookups_served, 1);
                Response::PrefixMatch(self.shards.match_chain(anchor, &hashes))
            }
            Request::Service { channel, payload } => {
                let Some(tx) = self.services.read().get(&channel).cloned() else {
                    return Response::Error(RemoteError::UnknownChannel(channel));
                };
                let (reply, rx) = oneshot::channel();
                let call = ServiceCall {
                    from,
                    payload: payload.into(),
                    reply: Some(reply),
                };
                if tx.send(call).await.is_err() {
                    return Response::Error(RemoteError::ServiceUnavailable(channel));
                }
                match rx.await {
                    Ok(payload) => Response::Service { payload },
                    Err(_) => Response::Error(RemoteError::ServiceUnavailable(channel)),
                }
            }
        }
    }

    fn one_way(&self, from: NodeId, msg: OneWay) {
        match msg {
            OneWay::Load(batch) => {
                Stats::add(&self.stats.load_batches_in, 1);
                let _ = self.load_tx.send(load_driver::Input::Remote {
                    from,
                    batch,
                    at: std::time::Instant::now(),
                });
            }
            OneWay::PrefixRecords(records) => {
                Stats::add(&self.stats.prefix_records_applied, records.len() as u64);
                for r in &records {
                    self.shards.record(r.anchor, &r.hashes, r.endpoint.as_str());
                }
            }
            OneWay::PrefixOps(ops) => self.shards.apply_ops(&ops, &self.stats),
            OneWay::PrefixHandoff(entries) => {
                Stats::add(&self.stats.prefix_handoff_anchors_in, entries.len() as u64);
                for e in &entries {
                    self.shards.import(e);
                }
            }
            OneWay::Service { channel, payload } => {
                let Some(tx) = self.services.read().get(&channel).cloned() else {
                    Stats::add(&self.stats.rpc_rejected_frames, 1);
                    return;
                };
                let call = ServiceCall {
                    from,
                    payload: payload.into(),
                    reply: None,
                };
                if tx.try_send(call).is_err() {
                    tracing::debug!(channel, "service cast dropped: queue full or closed");
                }
            }
        }
    }
}

/// A running mesh node. Dropping it stops every task at once (like a crash);
/// [`Mesh::leave`] departs gracefully.
pub struct Mesh {
    shared: Arc<Shared>,
    identity: MemberId,
    config: MeshConfig,
    transport: Arc<Transport>,
    endpoint: quinn::Endpoint,
    membership_tx: mpsc::Sender<membership::Input>,
    events: broadcast::Sender<MembershipEvent>,
    load_view: Arc<ArcSwap<LoadView>>,
    load_version: watch::Receiver<u64>,
    owned: watch::Receiver<Arc<Vec<PodId>>>,
    prefix_tx: mpsc::UnboundedSender<owner::Input>,
    prefix_ring: watch::Receiver<Arc<Ring>>,
    tasks: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl Mesh {
    /// Starts a node with the built-in prefix index.
    pub async fn start(config: MeshConfig) -> Result<Mesh, MeshError> {
        let factory: StoreFactory =
            Arc::new(|cap| Box::new(AnchoredIndex::new(cap)) as Box<dyn PrefixStore>);
        Mesh::start_with_store(config, factory).await
    }

    /// Starts a node whose owner-side prefix index shards come from `factory`.
    pub async fn start_with_store(
        config: MeshConfig,
        factory: StoreFactory,
    ) -> Result<Mesh, MeshError> {
        config.validate()?;
        let tls = TlsIdentity::from_config(&config.tls)?;
        let socket = UdpSocket::bind(config.gossip_bind)
            .await
            .map_err(|source| MeshError::Bind {
                what: "gossip",
                addr: config.gossip_bind,
                source,
            })?;
        let gossip_local = socket.local_addr().map_err(|source| MeshError::Bind {
            what: "gossip",
            addr: config.gossip_bind,
            source,
        })?;
        let mut server = tls.server_config()?;
        let mut transport_cfg = quinn::TransportConfig::default();
        transport_cfg.max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(config.rpc.idle_timeout).map_err(|_| {
                InvalidMeshConfig {
                    field: "rpc.idle_timeout",
                    reason: "too large for QUIC".into(),
                }
            })?,
        ));
        transport_cfg.keep_alive_interval(Some(config.rpc.idle_timeout / 3));
        let transport_cfg = Arc::new(transport_cfg);
        server.transport_config(transport_cfg.clone());
        let endpoint =
            quinn::Endpoint::server(server, config.rpc_bind).map_err(|source| MeshError::Bind {
                what: "rpc",
                addr: config.rpc_bind,
                source,
            })?;
        let rpc_local = endpoint.local_addr().map_err(|source| MeshError::Bind {
            what: "rpc",
            addr: config.rpc_bind,
            source,
        })?;

        let start_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        let identity = MemberId {
            node: config.node_id.clone(),
            gossip: config.advertise_gossip.unwrap_or(gossip_local),
            rpc: config.advertise_rpc.unwrap_or(rpc_local),
            fingerprint: tls.fingerprint,
            incarnation: start_us,
        };
        let stats = Arc::new(Stats::default());
        let (members_tx, members_rx) = watch::channel(Arc::new(membership::solo(identity.clone())));
        let (events_tx, _) = broadcast::channel(1024);
        let (membership_tx, membership_rx) = mpsc::channel(8);

        let transport = Arc::new(Transport::new(
            config.node_id.clone(),
            endpoint.clone(),
            tls.clone(),
            config.rpc.clone(),
            members_rx.clone(),
            stats.clone(),
        ));
        let shards = Arc::new(Shards::new(
            config.prefix.shards.get(),
            config.prefix.capacity_blocks.get(),
            &factory,
        ));
        let (load_tx, load_rx) = mpsc::unbounded_channel();
        let (prefix_tx, prefix_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            me: config.node_id.clone(),
            members: members_rx.clone(),
            stats: stats.clone(),
            shards: shards.clone(),
            load_tx,
            services: RwLock::new(HashMap::new()),
        });

        let mut tasks = Vec::new();
        let (seed_hosts_tx, seed_hosts_rx) = watch::channel(Vec::new());
        tasks.push(tokio::spawn(membership::resolve_seed_hosts(
            config.seed_hosts.clone(),
            config.swim.join_retry,
            members_rx.clone(),
            seed_hosts_tx,
        )));
        let driver = membership::Driver::new(
            identity.clone(),
            config.swim.foca_config(),
            socket,
            crate::auth::Keyring::new(config.cluster_key.clone(), config.accepted_keys.clone()),
            membership::Seeds {
                fixed: config.seeds.clone(),
                resolved: seed_hosts_rx,
            },
            config.swim.join_retry,
            membership::Outputs {
                members: members_tx,
                events: events_tx.clone(),
                stats: stats.clone(),
            },
        );
        tasks.push(tokio::spawn(driver.run(membership_rx)));
        tasks.push(tokio::spawn(crate::rpc::serve(
            config.node_id.clone(),
            endpoint.clone(),
            shared.clone(),
            members_rx.clone(),
            config.rpc.admission_timeout,
            stats.clone(),
        )));

        let load_view = Arc::new(ArcSwap::from_pointee(LoadView::default()));
        let (owned_tx, owned_rx) = watch::channel(Arc::new(Vec::new()));
        let (version_tx, version_rx) = watch::channel(0);
        let board = LoadBoard::new(
            config.node_id.clone(),
            config.load.full_sync_interval,
            start_us,
        );
        tasks.push(tokio::spawn(load_driver::run(
            board,
            load_rx,
            members_rx.clone(),
            transport.clone(),
            config.load.flush_interval,
            load_driver::Published {
                view: load_view.clone(),
                owned: owned_tx,
                version: version_tx,
            },
            stats.clone(),
        )));
        let (prefix_ring_tx, prefix_ring) = watch::channel(members_rx.borrow().ring.clone());
        tasks.push(tokio::spawn(owner::run(
            shards,
            prefix_rx,
            members_rx.clone(),
            transport.clone(),
            owner::Settings {
                replicas: config.prefix.replicas.get(),
                flush_interval: config.prefix.record_flush_interval,
                batch_max: config.prefix.record_batch_max.get(),
            },
            stats.clone(),
            prefix_ring_tx,
        )));
        tasks.push(tokio::spawn(warm_connections(
            members_rx,
            transport.clone(),
        )));

        Ok(Mesh {
            shared,
            identity,
            config,
            transport,
            endpoint,
            membership_tx,
            events: events_tx,
            load_view,
            load_version: version_rx,
            owned: owned_rx,
            prefix_tx,
            prefix_ring,
            tasks,
        })
    }

    /// This node's id.
    pub fn node_id(&self) -> &NodeId {
        &self.shared.me
    }

    /// This node's gossip identity (addresses, fingerprint, incarnation).
    pub fn identity(&self) -> &MemberId {
        &self.identity
    }

    /// Address other nodes use as a seed to join through this one.
    pub fn gossip_addr(&self) -> SocketAddr {
        self.identity.gossip
    }

    /// Address of this node's mesh RPC endpoint.
    pub fn rpc_addr(&self) -> SocketAddr {
        self.identity.rpc
    }

    /// The configuration the node runs with.
    pub fn config(&self) -> &MeshConfig {
        &self.config
    }

    /// Live members, updated on every change (read `borrow()`, await `changed()`).
    pub fn members(&self) -> watch::Receiver<Arc<MemberSet>> {
        self.shared.members.clone()
    }

    /// Membership events from now on.
    pub fn events(&self) -> broadcast::Receiver<MembershipEvent> {
        self.events.subscribe()
    }

    /// The ring over the current live members.
    pub fn ring(&self) -> Arc<Ring> {
        self.shared.members.borrow().ring.clone()
    }

    /// Whether prefix state has been handed off for the current ring: after a membership
    /// change, every anchor that gained an owner here is sent (or on its way) once this holds.
    pub fn prefix_handoff_current(&self) -> bool {
        **self.prefix_ring.borrow() == *self.ring()
    }

    /// Counters.
    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats.snapshot()
    }

    // ---- load board ----

    /// Sets the pods of the pool (from discovery or policy); ownership is recomputed.
    pub fn set_pods(&self, pods: Vec<PodId>) {
        let pods = pods.into_iter().map(|p| p.as_str().to_owned()).collect();
        let _ = self.shared.load_tx.send(load_driver::Input::SetPods(pods));
    }

    /// Pods this node must scrape now; changes when membership or the pod set changes.
    pub fn owned_pods(&self) -> watch::Receiver<Arc<Vec<PodId>>> {
        self.owned.clone()
    }

    /// Publishes a scrape result for `pod` taken at `scraped_at`.
    pub fn publish_scrape(&self, pod: &PodId, metrics: PodMetrics, scraped_at: std::time::Instant) {
        let _ = self.shared.load_tx.send(load_driver::Input::Scrape {
            pod: pod.as_str().to_owned(),
            metrics,
            at: scraped_at,
        });
    }

    /// Publishes that this node's scrape of `pod` failed at `failed_at`: every node takes
    /// the pod out of its candidates until a later [`Self::publish_scrape`] for it.
    pub fn publish_down(&self, pod: &PodId, failed_at: std::time::Instant) {
        let _ = self.shared.load_tx.send(load_driver::Input::Down {
            pod: pod.as_str().to_owned(),
            at: failed_at,
        });
    }

    /// Changes this node's in-flight counters for `pod` (negative to release): requests,
    /// their prompt tokens, and those of them still prefilling (no response yet).
    pub fn add_in_flight(&self, pod: &PodId, delta: InFlightDelta) {
        let _ = self.shared.load_tx.send(load_driver::Input::InFlight {
            pod: pod.as_str().to_owned(),
            delta,
        });
    }

    /// The latest fleet-wide load snapshot (lock-free read).
    pub fn load_view(&self) -> Arc<LoadView> {
        self.load_view.load_full()
    }

    /// Notifies on every published load snapshot (value = its version).
    pub fn load_changes(&self) -> watch::Receiver<u64> {
        self.load_version.clone()
    }

    // ---- prefix ownership ----

    /// The R owners of `anchor` under the current ring, best first.
    pub fn prefix_owners(&self, anchor: u64) -> Vec<NodeId> {
        let ring = self.ring();
        let owners: Owners<'_> = ring.owners(anchor, self.config.prefix.replicas.get());
        owners.into_iter().cloned().collect()
    }

    /// Matches a chain: locally when this node owns `anchor`, else at the first owner within
    /// the configured budget. `None` means "score without prefix data" (counted).
    pub async fn prefix_lookup(&self, anchor: u64, hashes: &[u64]) -> Option<PrefixMatch> {
        self.prefix_lookup_within(anchor, hashes, self.config.prefix.lookup_budget)
            .await
    }

    /// [`Mesh::prefix_lookup`] with an explicit budget.
    pub async fn prefix_lookup_within(
        &self,
        anchor: u64,
        hashes: &[u64],
        budget: Duration,
    ) -> Option<PrefixMatch> {
        let first = {
            let set = self.shared.members.borrow().clone();
            let owners = set.ring.owners(anchor, self.config.prefix.replicas.get());
            if owners.contains(&&self.shared.me) {
                Stats::add(&self.shared.stats.prefix_lookups_local, 1);
                return Some(self.shared.shards.match_chain(anchor, hashes));
            }
            // Skip a suspected first owner (likely dead) when a replica is known alive.
            owners
                .iter()
                .find(|n| set.get(n).is_some_and(|m| m.liveness == Liveness::Alive))
                .or(owners.first())
                .map(|n| (*n).clone())
        };
        let Some(first) = first else {
            Stats::add(&self.shared.stats.prefix_lookup_fallbacks, 1);
            return None;
        };
        let req = Request::PrefixLookup {
            anchor,
            hashes: hashes.to_vec(),
        };
        let bytes = crate::wire::encode(&self.shared.me, &req);
        Stats::add(
            &self.shared.stats.prefix_lookup_bytes_out,
            bytes.len() as u64,
        );
        match self.transport.request_encoded(&first, &bytes, budget).await {
            Ok(Response::PrefixMatch(m)) => {
                Stats::add(&self.shared.stats.prefix_lookups_remote, 1);
                Some(m)
            }
            other => {
                Stats::add(&self.shared.stats.prefix_lookup_fallbacks, 1);
                tracing::debug!(owner = %first, result = ?other.err(), "prefix lookup fell back");
                None
            }
        }
    }

    /// Records a pick at the anchor's owners (here if this node owns it, batched otherwise);
    /// true when this node is one of the owners.
    pub fn prefix_record(&self, anchor: u64, hashes: Vec<u64>, endpoint: PodId) -> bool {
        let ring = self.ring();
        let owners = ring.owners(anchor, self.config.prefix.replicas.get());
        let local = owners.contains(&&self.shared.me);
        let remote = owners.len() > usize::from(local);
        if local {
            Stats::add(&self.shared.stats.prefix_records_applied, 1);
            self.shared
                .shards
                .record(anchor, &hashes, endpoint.as_str());
        }
        if remote {
            let _ = self.prefix_tx.send(owner::Input::Record(PrefixRecord {
                anchor,
                hashes,
                endpoint,
            }));
        }
        local
    }

    /// Removes blocks `endpoint` evicted at the anchor's owners (here if this node owns
    /// it, batched in order with records otherwise); true when this node is one of them.
    pub fn prefix_remove(&self, anchor: u64, hashes: Vec<u64>, endpoint: PodId) -> bool {
        let ring = self.ring();
        let owners = ring.owners(anchor, self.config.prefix.replicas.get());
        let local = owners.contains(&&self.shared.me);
        let remote = owners.len() > usize::from(local);
        if local {
            Stats::add(&self.shared.stats.prefix_removals_applied, 1);
            self.shared
                .shards
                .remove(anchor, &hashes, endpoint.as_str());
        }
        if remote {
            let _ = self.prefix_tx.send(owner::Input::Remove(PrefixRemoval {
                anchor,
                hashes,
                endpoint,
            }));
        }
        local
    }

    /// Drops `endpoint` from the owner-side index on every node (its cache was cleared,
    /// it restarted, or its events were lost).
    pub fn prefix_forget_endpoint(&self, endpoint: PodId) {
        Stats::add(&self.shared.stats.prefix_forgets_applied, 1);
        self.shared.shards.forget_endpoint(endpoint.as_str());
        let _ = self.prefix_tx.send(owner::Input::Forget(endpoint));
    }

    /// Block entries this node's owner-side index holds.
    pub fn prefix_index_blocks(&self) -> usize {
        self.shared.shards.len_blocks()
    }

    /// Heap bytes of this node's owner-side index (the index's own estimate).
    pub fn prefix_index_bytes(&self) -> usize {
        self.shared.shards.memory_bytes()
    }

    // ---- generic service channels (e.g. Raft) ----

    /// Registers a service channel; requests and casts for it arrive on the returned queue.
    pub fn register_service(
        &self,
        channel: u16,
        queue: usize,
    ) -> Result<mpsc::Receiver<ServiceCall>, ChannelTaken> {
        let mut services = self.shared.services.write();
        if services.get(&channel).is_some_and(|tx| !tx.is_closed()) {
            return Err(ChannelTaken(channel));
        }
        let (tx, rx) = mpsc::channel(queue.max(1));
        services.insert(channel, tx);
        Ok(rx)
    }

    /// Sends an opaque request to `node`'s service `channel` and waits (bounded) for the answer.
    pub async fn call_service(
        &self,
        node: &NodeId,
        channel: u16,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<Bytes, RpcError> {
        match self
            .transport
            .request(node, &Request::Service { channel, payload }, timeout)
            .await?
        {
            Response::Service { payload } => Ok(payload.into()),
            _ => Err(RpcError::UnexpectedResponse),
        }
    }

    /// Sends an opaque one-way message to `node`'s service `channel`.
    pub async fn cast_service(
        &self,
        node: &NodeId,
        channel: u16,
        payload: Vec<u8>,
    ) -> Result<(), RpcError> {
        self.transport
            .send(node, &OneWay::Service { channel, payload })
            .await
    }

    // ---- lifecycle ----

    /// Announces departure to the cluster (bounded by `timeout`), then stops everything.
    pub async fn leave(self, timeout: Duration) {
        let (tx, rx) = oneshot::channel();
        if self
            .membership_tx
            .send(membership::Input::Leave(tx))
            .await
            .is_ok()
        {
            let _ = tokio::time::timeout(timeout, rx).await;
        }
        // Drop does the rest.
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.endpoint
            .close(quinn::VarInt::from_u32(0), b"node stopped");
    }
}

/// Opens connections to new members in the background so the first lookup is not a handshake.
async fn warm_connections(mut members: watch::Receiver<Arc<MemberSet>>, transport: Arc<Transport>) {
    loop {
        let set = members.borrow_and_update().clone();
        transport.retain_peers(&set);
        for peer in set.peers() {
            let transport = transport.clone();
            let node = peer.id.node.clone();
            tokio::spawn(async move {
                let _ = transport.connection(&node).await;
            });
        }
        if members.changed().await.is_err() {
            return;
        }
    }
}
