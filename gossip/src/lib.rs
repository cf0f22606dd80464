//! infermesh-gossip: the router mesh that turns single infermesh nodes into one tier.
//!
//! Contract:
//! - **Membership**: foca SWIM over UDP; every datagram carries an HMAC-SHA256 tag under the
//!   shared cluster key, and anything unauthenticated or malformed is dropped and counted.
//!   Failure detection time follows [`SwimConfig`] (worst case 1.7 s by default for 5
//!   nodes on a LAN/loopback).
//! - **Ring**: rendezvous hashing over live members ([`Ring`]); every node that sees the
//!   same members derives the same owners for a key.
//! - **Mesh RPC**: QUIC (quinn + rustls), cluster CA or self-signed certificates pinned by
//!   fingerprint through authenticated gossip; versioned postcard frames ([`wire`]);
//!   typed messages plus opaque request/response and casts on service channels.
//! - **Load board**: each pod is scraped by exactly one live node (its rendezvous owner);
//!   scrapes and every node's own in-flight counts are pushed as compact batches, and each
//!   node reads fleet-wide load from a lock-free [`LoadView`] snapshot. An owner whose
//!   scrape fails publishes the pod as down, so every node drops it at once.
//! - **Prefix ownership**: an anchor's R owners hold its index entries; lookups go to the
//!   first owner within a budget and fall back to `None`; records are batched to owners;
//!   ring changes hand entries to new owners.
//!
//! This crate knows nothing about HTTP or Envoy. The node wires it in through [`Mesh`]:
//!
//! ```no_run
//! # async fn wire() -> Result<(), Box<dyn std::error::Error>> {
//! use infermesh_gossip::{ClusterKey, InFlightDelta, Mesh, MeshConfig, PodId, PodMetrics};
//!
//! let mut config = MeshConfig::loopback("node-1", ClusterKey::new(b"shared-secret-16+".to_vec())?);
//! config.seeds = vec!["127.0.0.1:7946".parse()?];
//! let mesh = Mesh::start(config).await?;
//!
//! // Discovery/policy feeds the pod set; scrape only the pods this node owns.
//! mesh.set_pods(vec!["10.0.0.1:8000".into(), "10.0.0.2:8000".into()]);
//! let owned = mesh.owned_pods(); // watch: re-read on every change
//! for pod in owned.borrow().iter() {
//!     mesh.publish_scrape(pod, PodMetrics::default(), std::time::Instant::now());
//! }
//!
//! // Request path: prefix match from the anchor's owner, fleet load, record the pick.
//! let chain: Vec<u64> = vec![0xa1, 0xb2, 0xc3];
//! let matched = mesh.prefix_lookup(chain[0], &chain).await; // None → score without prefix
//! let load = mesh.load_view(); // lock-free snapshot
//! # let _ = (matched, load);
//! let pod = PodId::new("10.0.0.1:8000");
//! let dispatched = InFlightDelta { requests: 1, tokens: 512, prefilling: 1 };
//! mesh.add_in_flight(&pod, dispatched);
//! mesh.prefix_record(chain[0], chain, pod.clone());
//! // ... on its first response byte:
//! // mesh.add_in_flight(&pod, InFlightDelta { prefilling: -1, ..Default::default() });
//! // ... when it ends: mesh.add_in_flight(&pod, InFlightDelta { requests: -1, tokens: -512, prefilling: 0 });
//!
//! // Raft (or any other service) rides the same QUIC connections.
//! let mut raft_rx = mesh.register_service(1, 1024)?;
//! # let _ = raft_rx.recv();
//! mesh.leave(std::time::Duration::from_secs(1)).await;
//! # Ok(())
//! # }
//! ```

pub mod auth;
pub mod config;
pub mod load;
pub mod membership;
mod mesh;
pub mod pod;
pub mod prefix;
pub mod ring;
mod rpc;
pub mod stats;
pub mod tls;
pub mod wire;

pub use auth::{ClusterKey, Keyring};
pub use config::{
    InvalidMeshConfig, LoadConfig, MeshConfig, PrefixConfig, RpcConfig, SwimConfig, check_host_port,
};
pub use load::board::{InFlight, InFlightDelta, LoadView, PodLoad};
pub use membership::{Liveness, MemberId, MemberInfo, MemberSet, MembershipEvent};
pub use mesh::{ChannelTaken, Mesh, MeshError, ServiceCall};
pub use pod::PodId;
pub use prefix::owner::StoreFactory;
pub use prefix::store::{AnchoredIndex, PrefixStore};
pub use ring::{NodeId, Ring};
pub use rpc::RpcError;
pub use stats::StatsSnapshot;
pub use tls::{Fingerprint, TlsConfig};
pub use wire::{PodMetrics, PodState, PrefixMatch};
