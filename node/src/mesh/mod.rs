//! The node's side of the router mesh (infermesh-gossip): which flags start it, and the
//! tasks that make N nodes route as one — scrape only the pods this node owns and share
//! the results on the load board, read fleet-wide load into the scheduler's endpoints,
//! and consult a prefix's owner before scheduling.

pub mod flags;

use infermesh_gossip::MeshConfig;

pub use flags::{InvalidMeshFlags, MeshArgs};

/// How a node takes part in the mesh.
#[derive(Debug, Clone)]
pub struct MeshOptions {
    /// The gossip crate's configuration (membership, RPC, load board, prefix ownership).
    pub config: MeshConfig,
    /// When false the node joins the mesh (membership, service channels) but routes as an
    /// independent replica: it scrapes every pod itself, schedules on its own in-flight
    /// counts only and matches prefixes against its own index.
    pub sharing: bool,
}
