//! infermesh-gossip: the router mesh that turns single infermesh nodes into one tier.
//!
//! Contract:
//! - **Membership**: foca SWIM over UDP; every datagram carries an HMAC-SHA256 tag under the
//!   shared cluster key, and anything unauthenticated or malformed is dropped and counted.
//!   Failure detection time follows [`SwimConfig`] (≤ 2 s by default on a LAN/loopback).
//! - **Ring**: rendezvous hashing over live members ([`Ring`]); every node that sees the
//!   same members derives the same owners for a key.
//! - **Mesh RPC**: QUIC (quinn + rustls), cluster CA or self-signed certificates pinned by
//!   fingerprint through authenticated gossip; versioned postcard frames ([`wire`]);
//!   typed messages plus opaque request/response and casts on service channels.
//! - **Load board**: each pod is scraped by exactly one live node (its rendezvous owner);
//!   scrapes and every node's own in-flight counts are pushed as compact batches, and each
//!   node reads fleet-wide load from a lock-free [`LoadView`] snapshot.
//! - **Prefix ownership**: an anchor's R owners hold its index entries; lookups go to the
//!   first owner within a budget and fall back to `None`; records are batched to owners;
//!   ring changes hand entries to new owners.
//!
//! This crate knows nothing about HTTP or Envoy. The node wires it in through [`Mesh`].

pub mod auth;
pub mod config;
pub mod load;
pub mod membership;
mod mesh;
pub mod prefix;
pub mod ring;
mod rpc;
pub mod stats;
pub mod tls;
pub mod wire;

pub use auth::ClusterKey;
pub use config::{InvalidMeshConfig, LoadConfig, MeshConfig, PrefixConfig, RpcConfig, SwimConfig};
pub use load::board::{InFlight, LoadView, PodLoad};
pub use membership::{Liveness, MemberId, MemberInfo, MemberSet, MembershipEvent};
pub use mesh::{ChannelTaken, Mesh, MeshError, ServiceCall};
pub use prefix::owner::StoreFactory;
pub use prefix::store::{AnchoredIndex, PrefixStore};
pub use ring::{NodeId, Ring};
pub use rpc::RpcError;
pub use stats::StatsSnapshot;
pub use tls::{Fingerprint, TlsConfig};
pub use wire::{PodMetrics, PrefixMatch};
