//! infermesh policy store: InferencePool, InferenceObjective, InferenceModelRewrite,
//! EndpointPickerConfig, static endpoints and the node registry, replicated with Raft.
//!
//! Contract:
//! - openraft 0.9 (storage v2) with the log and the state machine in one redb file per
//!   node; every log append, vote and apply is an fsync'd commit before it is acknowledged.
//!   Snapshots are built, persisted, installed on lagging or new nodes, and the log behind
//!   them is purged.
//! - One transport: the node implements [`RaftTransport`] (opaque postcard bytes to a node
//!   id) and feeds incoming bytes to [`PolicyStore::handle_rpc`]. Raft RPCs, leader
//!   hand-off and forwarded writes all travel through it.
//! - Writes are whole-request atomic: documents are validated (EndpointPickerConfig by the
//!   caller's validator), then the request applies all or none. The leader groups writes
//!   that arrive while earlier entries are in flight into one log entry (group commit,
//!   [`store::batch`]); each request of a batch still applies or is rejected on its own and
//!   gets its own answer. Followers likewise forward queued writes to the leader together. Conditional writes check each object's resource version (the
//!   revision that last wrote it: the log index, or just above it inside a batch) at apply
//!   time.
//! - Readers get an immutable [`PolicyState`] swapped atomically after each apply
//!   ([`PolicyStore::policy`], [`PolicyStore::subscribe`]); they never see half a change.
//! - Followers refuse writes with `NotLeader { leader }` unless asked to forward.
//! - This crate knows nothing of scheduling; the policy model is a sans-IO state machine
//!   ([`policy::PolicyState`]) tested by feeding it requests.
//!
//! Wiring it into a node:
//! 1. Implement [`RaftTransport`] over the mesh's service channels: `send(_, node, bytes)`
//!    is `mesh.call_service(&NodeId::new(&node.addr), RAFT_CHANNEL, bytes, timeout)` (a
//!    member's Raft address is its mesh node name; the Raft id may be 0 for a seed);
//!    connect/unknown-peer/timeout errors map to `TransportError::Unreachable`, the rest to
//!    `Lost`. Serve `mesh.register_service(RAFT_CHANNEL, ..)`: for each call,
//!    `call.respond(store.handle_rpc(&call.payload).await)` in its own task. Messages stay
//!    near 1 MiB (see [`StoreConfig`]).
//! 2. `PolicyStore::open(StoreConfig::new(raft_id, dir.join("policy.redb")), transport,
//!    validator)`, with `validator` wrapping the scheduler's loader, e.g.
//!    `Arc::new(|yaml| load_config(yaml).map(|_| ()).map_err(Into::into))`.
//! 3. `serve --bootstrap`: `store.bootstrap({raft_id: BasicNode::new(mesh_name)}, &tokens)`;
//!    other nodes, once gossip has joined: `store.join(BasicNode::new(seed_mesh_name),
//!    BasicNode::new(own_mesh_name))` (learner, then voters rebalanced to 3 or 5). Each node
//!    then applies its own `InfermeshNode` entry with `apply_objects(.., Route::ViaLeader)`.
//! 4. Admin API: `apply_yaml(body, Route::ViaLeader)` (errors map to HTTP: `Invalid` 400,
//!    `Rejected::Conflict` 409, `Rejected::NotFound` 404, `NotLeader`/`Unavailable` 503),
//!    `policy().list(kind)` / `get(key)` with `to_document()`, `delete`, `status()`;
//!    writes require `verify_token(bearer)` (401 otherwise).
//! 5. Hot path: `policy()` (lock-free `Arc` load); rebuild derived config on `subscribe()`.
//! 6. Graceful shutdown: `shutdown(true)` hands leadership off first.

pub mod disk;
pub mod error;
pub mod log_store;
pub mod mem_transport;
pub mod network;
pub mod policy;
pub mod state_machine;
pub mod store;
pub mod testing;
pub mod types;

pub use error::{ClusterError, OpenError, ReadError, WriteError};
pub use mem_transport::MemNetwork;
pub use network::{NetworkFactory, RaftTransport, TransportError};
pub use policy::{PolicyState, parse_documents};
pub use store::{Applied, ClusterStatus, MemberStatus, PolicyStore, Role, Route, StoreConfig};
pub use types::{Node, NodeId, TypeConfig};
