//! Flow control across the mesh: one node holds the pool's queue, every node's requests
//! wait in it.
//!
//! With a per-node queue, priority bands, fairness and ordering hold on each node only, and
//! the nodes share the dispatch budget by dividing it (see [`super::flow`]). Here the
//! queue's *decisions* are owned instead: the pool's flow-control owner is the rendezvous
//! owner of a fixed key over the live members, so every node that agrees on membership
//! agrees on it. A request stays on the node that received it (its body, its client or
//! ext_proc stream); only its flow-control facts travel:
//!
//! ```text
//!  origin node                                   owner node
//!  request task ── Enqueue{id, priority, fairness id, bytes, age, SLO} ──▶ service task
//!       │                      (QUIC service call)                         │ local FlowGate::wait
//!       ◀──── Dispatched{waited, revocable, claims, freed} | Dropped{reason} ─────┘ (its queue)
//!  pod picked   ── Picked{id, pod} ─────────────────────────────────────▶ next dispatch may go
//!  first token  ── Prefilled{id} ───────────────────────────────────────▶ prefill room freed
//!  request ends ── End{id} ─────────────────────────────────────────────▶ lease ends, room freed
//!  client gone  ── Cancel{id} ──────────────────────────────────────────▶ place freed
//!                ◀──────────────────────────────────────────── Revoke{id} (in-flight eviction)
//! ```
//!
//! So strict priority between bands, round-robin between flows and FCFS within a flow hold
//! across the whole tier, and the owner gates alone (its budget is not divided): while the
//! members agree, the tier dispatches at most what one node would (`B + 1` per refresh,
//! with `B` the fleet budget).
//!
//! When the owner changes (it left, or was declared down) a waiting request is enqueued
//! again at the new owner with its original arrival time, so its TTL and FCFS place carry
//! over; the old owner's leases are gone with it and the new owner starts from the load
//! board, which still shows those requests in flight. When the owner cannot be reached
//! while still a member (a paused or cut-off node, before SWIM declares it down) the
//! request falls back to this node's own queue, which divides the budget by the live node
//! count as before; so does every request while two nodes both believe they own the queue
//! (membership views disagree for about a second), bounding the tier at two owners' budgets
//! for that long.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use infermesh_gossip::{Mesh, NodeId, ServiceCall};
use infermesh_scheduler::flow::DropReason;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::flow::{Dispatched, FlowArrival, FlowGate, RemoteHold};
use super::picks::Claims;
use crate::metrics::NodeMetrics;

/// The mesh service channel of flow control ("FL").
pub const FLOW_CHANNEL: u16 = 0x464c;
/// The key whose rendezvous owner holds the queue.
pub const OWNER_KEY: &str = "infermesh/flow-control";
/// Longest an Enqueue call is held open; the owner's TTL answers long before.
const CALL_CAP: Duration = Duration::from_secs(600);
/// Bound on a one-way message (Cancel, End, Revoke) to a peer.
const CAST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the owner remembers a Cancel that overtook its Enqueue.
const EARLY_CANCEL_TTL: Duration = Duration::from_secs(60);

/// A flow-control message between nodes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Msg {
    /// Origin → owner (a call): queue this request.
    Enqueue {
        id: u64,
        priority: i32,
        fairness_id: String,
        bytes: u64,
        /// Time since the origin received it (ages travel, clocks do not).
        age_us: u64,
        slo_ttft_ms: Option<u64>,
    },
    /// Origin → owner: the client went away.
    Cancel { id: u64 },
    /// Origin → owner: the dispatched request ended, with its response's token usage
    /// (for `program-aware-fairness`).
    End { id: u64, input: u64, output: u64 },
    /// Owner → origin: in-flight eviction revoked the request.
    Revoke { id: u64 },
    /// Origin → owner: the dispatched request's response started (its first byte), so
    /// its endpoint no longer prefills it (for a detector that counts prefilling
    /// requests). After the variants above, so they keep their wire tags.
    Prefilled { id: u64 },
    /// Origin → owner: the dispatched request was scheduled onto `pod`, so the owner's
    /// next dispatch may go and counts the pod as prefilling. Last, for the same reason.
    Picked { id: u64, pod: SocketAddr },
}

/// The owner's answer to an Enqueue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Answer {
    /// Dispatched after waiting this long; `revocable`: it may be revoked later;
    /// `claims`: the pods the owner's earlier dispatches are prefilling on, by count;
    /// `freed`: the pods where they stopped prefilling a moment ago (last: an older
    /// origin reads the answer without it).
    Dispatched {
        waited_us: u64,
        revocable: bool,
        claims: Vec<(SocketAddr, u32)>,
        freed: Vec<(SocketAddr, u32)>,
    },
    /// Dropped; the value of `x-llm-d-request-dropped-reason`.
    Dropped { reason: String },
}

/// `Answer::Dispatched` as owners sent it before `freed` (8eca437 to f15e0ce), read during
/// a rolling upgrade. (`Dropped` never changed, so the current type reads it.)
#[derive(Debug, Deserialize)]
enum DispatchedWithoutFreed {
    Dispatched {
        waited_us: u64,
        revocable: bool,
        claims: Vec<(SocketAddr, u32)>,
    },
}

/// `Answer::Dispatched` as owners sent it before `claims`.
#[derive(Debug, Deserialize)]
enum DispatchedWithoutClaims {
    Dispatched { waited_us: u64, revocable: bool },
}

/// Reads an owner's answer, from this version or an older one: fields are only ever added
/// at the end of `Dispatched`, and postcard cannot skip what a message lacks.
fn decode_answer(bytes: &[u8]) -> Result<Answer, postcard::Error> {
    let err = match postcard::from_bytes::<Answer>(bytes) {
        Ok(a) => return Ok(a),
        Err(e) => e,
    };
    let (waited_us, revocable, claims) = match postcard::from_bytes(bytes) {
        Ok(DispatchedWithoutFreed::Dispatched {
            waited_us,
            revocable,
            claims,
        }) => (waited_us, revocable, claims),
        Err(_) => match postcard::from_bytes(bytes).map_err(|_| err)? {
            DispatchedWithoutClaims::Dispatched {
                waited_us,
                revocable,
            } => (waited_us, revocable, Vec::new()),
        },
    };
    Ok(Answer::Dispatched {
        waited_us,
        revocable,
        claims,
        freed: Vec::new(),
    })
}

const REASONS: [DropReason; 8] = [
    DropReason::Saturated,
    DropReason::NoEndpoints,
    DropReason::TtlExpired,
    DropReason::ContextCancelled,
    DropReason::ShuttingDown,
    DropReason::Internal,
    DropReason::EvictedPriority,
    DropReason::Evicted,
];

fn reason_of(text: &str) -> DropReason {
    REASONS
        .into_iter()
        .find(|r| r.header_value() == text)
        .unwrap_or(DropReason::Internal)
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Where a waiting request goes: this node's queue, or the owner's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This node owns the queue (or there is no one else).
    Local,
    /// Another node owns it.
    Remote(NodeId),
}

/// How a wait went through the mesh, as counted in `infermesh_flow_mesh_waits_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MeshWait {
    /// Answered by the owner on another node.
    Remote,
    /// The owner changed while waiting; enqueued again at the new one.
    Rerouted,
    /// The owner could not be reached; waited in this node's queue.
    Fallback,
}

impl MeshWait {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            MeshWait::Remote => "remote",
            MeshWait::Rerouted => "rerouted",
            MeshWait::Fallback => "fallback",
        }
    }
}

/// How a wait at the owner ended, short of an answer.
#[derive(Debug)]
pub enum RemoteOutcome {
    /// The owner answered.
    Answered(Result<Dispatched, DropReason>),
    /// Membership moved the queue to another node before an answer: enqueue again there.
    OwnerChanged,
    /// The owner could not be reached: wait in this node's queue instead.
    Unreachable,
}

/// What the service task is told by this node's request tasks.
enum Local {
    /// Watch for a Revoke of `id` from `owner` (registered before the Enqueue is sent).
    Register {
        owner: NodeId,
        id: u64,
        token: CancellationToken,
    },
    /// Forget it; tell the owner `then` (Cancel or End) if given.
    Finish {
        owner: NodeId,
        id: u64,
        then: Option<Msg>,
    },
    /// Tell the owner `msg`, keeping the registration.
    Tell { owner: NodeId, msg: Msg },
}

/// A remotely dispatched request's hold: dropping it tells the owner the request ended.
pub struct RemoteLease {
    owner: NodeId,
    id: u64,
    local: mpsc::UnboundedSender<Local>,
    revoke: Option<CancellationToken>,
    usage: (u64, u64),
    /// Whether the owner was told of the first response byte.
    prefilled: bool,
    /// Whether the owner was told of the pick.
    picked: bool,
}

impl std::fmt::Debug for RemoteLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteLease")
            .field("owner", &self.owner)
            .field("id", &self.id)
            .field("revocable", &self.revoke.is_some())
            .finish()
    }
}

impl RemoteHold for RemoteLease {
    fn revoked(&self) -> Option<WaitForCancellationFutureOwned> {
        self.revoke.as_ref().map(|t| t.clone().cancelled_owned())
    }

    fn record_usage(&mut self, input: u64, output: u64) {
        self.usage = (input, output);
    }

    fn prefilled(&mut self) {
        if !std::mem::replace(&mut self.prefilled, true) {
            let _ = self.local.send(Local::Tell {
                owner: self.owner.clone(),
                msg: Msg::Prefilled { id: self.id },
            });
        }
    }

    fn picked(&mut self, pod: SocketAddr) {
        if !std::mem::replace(&mut self.picked, true) {
            let _ = self.local.send(Local::Tell {
                owner: self.owner.clone(),
                msg: Msg::Picked { id: self.id, pod },
            });
        }
    }
}

impl Drop for RemoteLease {
    fn drop(&mut self) {
        let _ = self.local.send(Local::Finish {
            owner: self.owner.clone(),
            id: self.id,
            then: Some(Msg::End {
                id: self.id,
                input: self.usage.0,
                output: self.usage.1,
            }),
        });
    }
}

/// What a wait leaves behind when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnDrop {
    /// No answer (the client went away, the owner changed or could not be reached): tell
    /// the owner to forget the request.
    Cancel,
    /// Dropped by the owner: only forget the registration here.
    Forget,
    /// Dispatched: the lease took the registration over.
    Nothing,
}

/// Cleans up after a wait at the owner, however it ended.
struct WaitGuard {
    owner: NodeId,
    id: u64,
    local: mpsc::UnboundedSender<Local>,
    on_drop: OnDrop,
}

impl Drop for WaitGuard {
    fn drop(&mut self) {
        let then = match self.on_drop {
            OnDrop::Nothing => return,
            OnDrop::Cancel => Some(Msg::Cancel { id: self.id }),
            OnDrop::Forget => None,
        };
        let _ = self.local.send(Local::Finish {
            owner: self.owner.clone(),
            id: self.id,
            then,
        });
    }
}

/// The gate requests wait at: this node's queue, or, with a tier queue, its owner's.
#[derive(Debug, Clone)]
pub struct TierGate {
    local: FlowGate,
    mesh: Option<Arc<MeshFlow>>,
}

impl From<FlowGate> for TierGate {
    fn from(local: FlowGate) -> TierGate {
        TierGate { local, mesh: None }
    }
}

impl TierGate {
    /// Waits in the tier's queue held by `mesh`'s owner (this node's `local` queue when it
    /// is the owner, or when the owner cannot be reached).
    pub fn with_mesh(local: FlowGate, mesh: Arc<MeshFlow>) -> TierGate {
        TierGate {
            local,
            mesh: Some(mesh),
        }
    }

    /// Waits for the request's turn: `Ok` when dispatched, else why it was dropped.
    /// Dropping the future frees the request's place in the queue at once.
    pub async fn wait(&self, arrival: FlowArrival) -> Result<Dispatched, DropReason> {
        let Some(mesh) = &self.mesh else {
            return self.local.wait(arrival).await;
        };
        loop {
            match mesh.route() {
                Route::Local => return self.local.wait(arrival).await,
                Route::Remote(owner) => match mesh.wait_at(owner, &arrival).await {
                    RemoteOutcome::Answered(r) => return r,
                    RemoteOutcome::OwnerChanged => mesh.count(MeshWait::Rerouted),
                    RemoteOutcome::Unreachable => {
                        mesh.count(MeshWait::Fallback);
                        return self.local.wait(arrival).await;
                    }
                },
            }
        }
    }
}

/// This node's side of mesh flow control: routes waits to the owner and serves the
/// owner's role for the others.
pub struct MeshFlow {
    mesh: Arc<Mesh>,
    members: watch::Receiver<Arc<infermesh_gossip::MemberSet>>,
    key: u64,
    next_id: AtomicU64,
    local: mpsc::UnboundedSender<Local>,
    metrics: Arc<NodeMetrics>,
}

impl std::fmt::Debug for MeshFlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshFlow")
            .field("node", self.mesh.node_id())
            .finish_non_exhaustive()
    }
}

impl MeshFlow {
    /// Registers the flow channel on `mesh` and starts the service task, which queues
    /// other nodes' requests in `queue` (this node's own flow controller) until `shutdown`.
    pub fn start(
        mesh: Arc<Mesh>,
        queue: FlowGate,
        metrics: Arc<NodeMetrics>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(Arc<MeshFlow>, tokio::task::JoinHandle<()>), infermesh_gossip::ChannelTaken> {
        let calls = mesh.register_service(FLOW_CHANNEL, 4096)?;
        let (local, local_rx) = mpsc::unbounded_channel();
        let service = Service {
            mesh: mesh.clone(),
            queue,
            held: HashMap::new(),
            early_cancels: HashMap::new(),
            revokers: HashMap::new(),
        };
        let task = tokio::spawn(service.run(calls, local_rx, shutdown));
        Ok((
            Arc::new(MeshFlow {
                key: infermesh_gossip::ring::key_of_str(OWNER_KEY),
                // Random start: a restarted node must not reuse ids an owner still holds.
                next_id: AtomicU64::new(rand::random::<u64>() >> 1),
                members: mesh.members(),
                mesh,
                local,
                metrics,
            }),
            task,
        ))
    }

    /// Where a request waits now.
    pub fn route(&self) -> Route {
        let set = self.members.borrow();
        match set.ring.owner(self.key) {
            Some(owner) if *owner != set.me => Route::Remote(owner.clone()),
            _ => Route::Local,
        }
    }

    /// Counts one wait by how it went through the mesh.
    pub fn count(&self, how: MeshWait) {
        self.metrics.count_flow_mesh_wait(how.as_str());
    }

    /// The live nodes a queue divides its dispatch budget by: 1 on the owner (it gates for
    /// the whole tier), every live member elsewhere (a node waiting in its own queue
    /// because the owner is unreachable shares the budget as per-node queues do).
    pub fn live_nodes(mesh: &Mesh) -> super::flow::LiveNodes {
        let members = mesh.members();
        let key = infermesh_gossip::ring::key_of_str(OWNER_KEY);
        Arc::new(move || {
            let set = members.borrow();
            match set.ring.owner(key) {
                Some(owner) if *owner == set.me => 1,
                _ => set.members.len().max(1),
            }
        })
    }

    /// Waits for `arrival`'s turn in `owner`'s queue.
    pub async fn wait_at(&self, owner: NodeId, arrival: &FlowArrival) -> RemoteOutcome {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let token = CancellationToken::new();
        if self
            .local
            .send(Local::Register {
                owner: owner.clone(),
                id,
                token: token.clone(),
            })
            .is_err()
        {
            return RemoteOutcome::Unreachable;
        }
        let mut guard = WaitGuard {
            owner: owner.clone(),
            id,
            local: self.local.clone(),
            on_drop: OnDrop::Cancel,
        };
        let msg = Msg::Enqueue {
            id,
            priority: arrival.priority,
            fairness_id: arrival.fairness_id.clone(),
            bytes: arrival.bytes,
            age_us: micros(arrival.received.elapsed()),
            slo_ttft_ms: arrival
                .slo_ttft
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        };
        let Ok(payload) = postcard::to_stdvec(&msg) else {
            return RemoteOutcome::Unreachable;
        };
        let mut members = self.mesh.members();
        let call = self
            .mesh
            .call_service(&owner, FLOW_CHANNEL, payload, CALL_CAP);
        let answer = tokio::select! {
            r = call => r,
            () = owner_moved(&mut members, self.key, &owner) => return RemoteOutcome::OwnerChanged,
        };
        let answer = match answer.map(|b| decode_answer(&b)) {
            Ok(Ok(a)) => a,
            Ok(Err(e)) => {
                tracing::warn!(%owner, error = %e, "flow control: unreadable answer from the owner");
                return RemoteOutcome::Unreachable;
            }
            Err(e) => {
                tracing::debug!(%owner, error = %e, "flow control: owner unreachable");
                return RemoteOutcome::Unreachable;
            }
        };
        // Answered: the owner needs no Cancel (an End follows a dispatch, through the lease).
        guard.on_drop = OnDrop::Forget;
        self.count(MeshWait::Remote);
        match answer {
            Answer::Dispatched {
                waited_us,
                revocable,
                claims,
                freed,
            } => {
                // The lease now finishes the registration; the guard must not.
                guard.on_drop = OnDrop::Nothing;
                RemoteOutcome::Answered(Ok(Dispatched::remote(
                    Duration::from_micros(waited_us),
                    Box::new(RemoteLease {
                        owner,
                        id,
                        local: self.local.clone(),
                        revoke: revocable.then_some(token),
                        usage: (0, 0),
                        prefilled: false,
                        picked: false,
                    }),
                    Claims {
                        prefilling: claims,
                        freed,
                    },
                )))
            }
            // The owner is stopping: the request is not at fault; wait here instead.
            Answer::Dropped { reason } if reason_of(&reason) == DropReason::ShuttingDown => {
                RemoteOutcome::Unreachable
            }
            Answer::Dropped { reason } => RemoteOutcome::Answered(Err(reason_of(&reason))),
        }
    }
}

/// Resolves once membership makes a node other than `owner` own `key`.
async fn owner_moved(
    members: &mut watch::Receiver<Arc<infermesh_gossip::MemberSet>>,
    key: u64,
    owner: &NodeId,
) {
    loop {
        if members.borrow_and_update().ring.owner(key) != Some(owner) {
            return;
        }
        if members.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

/// A request held for another node.
enum Held {
    /// Waiting in this node's queue (the task doing the wait).
    Waiting(AbortHandle),
    /// Dispatched: its lease (in-flight eviction) and the task relaying a revocation.
    Leased {
        lease: Dispatched,
        relay: Option<AbortHandle>,
    },
}

/// A wait finished on this node for another node.
struct Decided {
    key: (NodeId, u64),
    answer: Result<Dispatched, DropReason>,
    call: ServiceCall,
}

/// The task behind the flow channel: the owner's side for other nodes' requests, and the
/// origin's side for revocations and the messages its request tasks leave behind.
struct Service {
    mesh: Arc<Mesh>,
    queue: FlowGate,
    held: HashMap<(NodeId, u64), Held>,
    /// Cancels that arrived before their Enqueue (separate QUIC streams may reorder).
    early_cancels: HashMap<(NodeId, u64), Instant>,
    /// This node's remote waits and leases that may be revoked, by (owner, id).
    revokers: HashMap<(NodeId, u64), CancellationToken>,
}

impl Service {
    async fn run(
        mut self,
        mut calls: mpsc::Receiver<ServiceCall>,
        mut local: mpsc::UnboundedReceiver<Local>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let (decided_tx, mut decided) = mpsc::unbounded_channel::<Decided>();
        let mut members = self.mesh.members();
        let mut sweep = tokio::time::interval(EARLY_CANCEL_TTL);
        loop {
            tokio::select! {
                call = calls.recv() => match call {
                    Some(call) => self.on_call(call, &decided_tx),
                    None => break,
                },
                Some(msg) = local.recv() => self.on_local(msg),
                Some(d) = decided.recv() => self.on_decided(d),
                r = members.changed() => {
                    if r.is_err() {
                        break;
                    }
                    let set = members.borrow_and_update().clone();
                    self.drop_departed(&set);
                }
                _ = sweep.tick() => {
                    let now = Instant::now();
                    self.early_cancels.retain(|_, at| now.duration_since(*at) < EARLY_CANCEL_TTL);
                }
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
        for (_, h) in self.held.drain() {
            if let Held::Waiting(a) = h {
                a.abort();
            }
        }
    }

    fn on_call(&mut self, call: ServiceCall, decided: &mpsc::UnboundedSender<Decided>) {
        let msg = match postcard::from_bytes::<Msg>(&call.payload) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(from = %call.from, error = %e, "flow control: unreadable message");
                return;
            }
        };
        let from = call.from.clone();
        match msg {
            Msg::Enqueue {
                id,
                priority,
                fairness_id,
                bytes,
                age_us,
                slo_ttft_ms,
            } => {
                let key = (from, id);
                if self.early_cancels.remove(&key).is_some() {
                    respond(
                        call,
                        &Answer::Dropped {
                            reason: DropReason::ContextCancelled.header_value().to_owned(),
                        },
                    );
                    return;
                }
                let now = Instant::now();
                let arrival = FlowArrival {
                    priority,
                    fairness_id,
                    bytes,
                    received: now
                        .checked_sub(Duration::from_micros(age_us))
                        .unwrap_or(now),
                    slo_ttft: slo_ttft_ms.map(Duration::from_millis),
                };
                let queue = self.queue.clone();
                let decided = decided.clone();
                let k = key.clone();
                let task = tokio::spawn(async move {
                    let answer = queue.wait(arrival).await;
                    let _ = decided.send(Decided {
                        key: k,
                        answer,
                        call,
                    });
                });
                self.held.insert(key, Held::Waiting(task.abort_handle()));
            }
            Msg::Cancel { id } => {
                let key = (from, id);
                if self.end(&key, (0, 0)).is_none() {
                    self.early_cancels.insert(key, Instant::now());
                }
            }
            Msg::End { id, input, output } => {
                self.end(&(from, id), (input, output));
            }
            Msg::Revoke { id } => {
                if let Some(token) = self.revokers.remove(&(from, id)) {
                    token.cancel();
                }
            }
            Msg::Prefilled { id } => {
                if let Some(Held::Leased { lease, .. }) = self.held.get_mut(&(from, id)) {
                    lease.prefilled();
                }
            }
            Msg::Picked { id, pod } => {
                if let Some(Held::Leased { lease, .. }) = self.held.get_mut(&(from, id)) {
                    lease.picked(pod);
                }
            }
        }
    }

    /// Ends what is held for `key`: a wait is dropped (its place freed), a lease ends and
    /// its grant gives the room back at once.
    fn end(&mut self, key: &(NodeId, u64), usage: (u64, u64)) -> Option<()> {
        match self.held.remove(key)? {
            Held::Waiting(task) => task.abort(),
            Held::Leased { mut lease, relay } => {
                if let Some(r) = relay {
                    r.abort();
                }
                lease.record_usage(usage.0, usage.1);
                // Its grant gives the room back.
                drop(lease);
            }
        }
        Some(())
    }

    fn on_decided(&mut self, d: Decided) {
        let Decided { key, answer, call } = d;
        if !matches!(self.held.get(&key), Some(Held::Waiting(_))) {
            // Cancelled while its answer was on the way: its grant gives the room back.
            drop(answer);
            return;
        }
        match answer {
            Ok(mut lease) => {
                let waited = lease.waited;
                let claims = std::mem::take(&mut lease.claims);
                let relay = lease.revoked().map(|revoked| {
                    let mesh = self.mesh.clone();
                    let (origin, id) = key.clone();
                    tokio::spawn(async move {
                        revoked.await;
                        cast(&mesh, &origin, &Msg::Revoke { id }).await;
                    })
                    .abort_handle()
                });
                respond(
                    call,
                    &Answer::Dispatched {
                        waited_us: micros(waited),
                        revocable: relay.is_some(),
                        claims: claims.prefilling,
                        freed: claims.freed,
                    },
                );
                self.held.insert(key, Held::Leased { lease, relay });
            }
            Err(reason) => {
                self.held.remove(&key);
                respond(
                    call,
                    &Answer::Dropped {
                        reason: reason.header_value().to_owned(),
                    },
                );
            }
        }
    }

    fn on_local(&mut self, msg: Local) {
        match msg {
            Local::Register { owner, id, token } => {
                self.revokers.insert((owner, id), token);
            }
            Local::Finish { owner, id, then } => {
                self.revokers.remove(&(owner.clone(), id));
                if let Some(m) = then {
                    let mesh = self.mesh.clone();
                    tokio::spawn(async move { cast(&mesh, &owner, &m).await });
                }
            }
            Local::Tell { owner, msg } => {
                let mesh = self.mesh.clone();
                tokio::spawn(async move { cast(&mesh, &owner, &msg).await });
            }
        }
    }

    /// A node that left takes its requests with it: their waits and leases end here.
    fn drop_departed(&mut self, set: &infermesh_gossip::MemberSet) {
        let gone: Vec<(NodeId, u64)> = self
            .held
            .keys()
            .filter(|(n, _)| !set.members.contains_key(n))
            .cloned()
            .collect();
        for key in gone {
            self.end(&key, (0, 0));
        }
        self.early_cancels
            .retain(|(n, _), _| set.members.contains_key(n));
    }
}

fn respond(call: ServiceCall, answer: &Answer) {
    match postcard::to_stdvec(answer) {
        Ok(bytes) => call.respond(bytes),
        Err(e) => tracing::warn!(error = %e, "flow control: cannot encode an answer"),
    }
}

/// Sends one message (bounded); a lost one is covered by membership (a departed node's
/// holds end) and by the load board (in-flight counts are measured, not only credited).
async fn cast(mesh: &Mesh, to: &NodeId, msg: &Msg) {
    let Ok(payload) = postcard::to_stdvec(msg) else {
        return;
    };
    match tokio::time::timeout(CAST_TIMEOUT, mesh.cast_service(to, FLOW_CHANNEL, payload)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(%to, error = %e, "flow control: message lost"),
        Err(_) => tracing::debug!(%to, "flow control: message timed out"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_drop_reason_survives_the_wire() {
        for r in REASONS {
            assert_eq!(reason_of(r.header_value()), r);
        }
        assert_eq!(reason_of("no-such-reason"), DropReason::Internal);
    }

    #[test]
    fn messages_round_trip() {
        let m = Msg::Enqueue {
            id: 7,
            priority: -1,
            fairness_id: "tenant-a".into(),
            bytes: 1234,
            age_us: 55,
            slo_ttft_ms: Some(300),
        };
        let b = postcard::to_stdvec(&m).unwrap();
        assert_eq!(postcard::from_bytes::<Msg>(&b).unwrap(), m);
        let a = Answer::Dispatched {
            waited_us: 9,
            revocable: true,
            claims: vec![("10.0.0.1:8000".parse().unwrap(), 2)],
            freed: vec![("10.0.0.2:8000".parse().unwrap(), 1)],
        };
        let b = postcard::to_stdvec(&a).unwrap();
        assert_eq!(postcard::from_bytes::<Answer>(&b).unwrap(), a);
        // An origin one version older (no `freed`) still reads it.
        #[derive(Debug, PartialEq, Deserialize)]
        enum OlderAnswer {
            Dispatched {
                waited_us: u64,
                revocable: bool,
                claims: Vec<(SocketAddr, u32)>,
            },
        }
        assert_eq!(
            postcard::from_bytes::<OlderAnswer>(&b).unwrap(),
            OlderAnswer::Dispatched {
                waited_us: 9,
                revocable: true,
                claims: vec![("10.0.0.1:8000".parse().unwrap(), 2)],
            }
        );
        // A new origin reads the answers of owners one and two versions older.
        #[derive(Serialize)]
        enum OldestAnswer {
            Dispatched { waited_us: u64, revocable: bool },
        }
        let b = postcard::to_stdvec(&OldestAnswer::Dispatched {
            waited_us: 9,
            revocable: false,
        })
        .unwrap();
        assert!(postcard::from_bytes::<Answer>(&b).is_err());
        assert_eq!(
            decode_answer(&b).unwrap(),
            Answer::Dispatched {
                waited_us: 9,
                revocable: false,
                claims: vec![],
                freed: vec![],
            }
        );
        let older = Answer::Dispatched {
            waited_us: 9,
            revocable: true,
            claims: vec![("10.0.0.1:8000".parse().unwrap(), 2)],
            freed: vec![],
        };
        let b = postcard::to_stdvec(&older).unwrap();
        // Drop `freed` (an empty vec is one byte, its length) to make an older owner's bytes.
        let b_older = &b[..b.len() - 1];
        assert!(postcard::from_bytes::<Answer>(b_older).is_err());
        assert_eq!(decode_answer(b_older).unwrap(), older);
        let dropped = Answer::Dropped {
            reason: "rejected-ttl-expired".into(),
        };
        let b = postcard::to_stdvec(&dropped).unwrap();
        assert_eq!(decode_answer(&b).unwrap(), dropped);
        assert!(decode_answer(&[9, 9]).is_err());
        // Prefilled came last: the messages before it kept their tags (Revoke is 3).
        let b = postcard::to_stdvec(&Msg::Revoke { id: 1 }).unwrap();
        assert_eq!(b[0], 3);
        let m = Msg::Prefilled { id: 7 };
        let b = postcard::to_stdvec(&m).unwrap();
        assert_eq!(postcard::from_bytes::<Msg>(&b).unwrap(), m);
        assert_eq!(b[0], 4);
        let m = Msg::Picked {
            id: 7,
            pod: "10.0.0.1:8000".parse().unwrap(),
        };
        let b = postcard::to_stdvec(&m).unwrap();
        assert_eq!(postcard::from_bytes::<Msg>(&b).unwrap(), m);
    }
}
