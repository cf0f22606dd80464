//! The node's side of the router mesh (infermesh-gossip): which flags start it, and the
//! tasks that make N nodes route as one — scrape only the pods this node owns and share
//! the results on the load board, read fleet-wide load into the scheduler's endpoints,
//! and consult a prefix's owner before scheduling.
//!
//! Coverage: load sharing (owned scraping, board scrapes, fleet in-flight) applies to every
//! request path, since it feeds the endpoint slots both paths schedule from. Prefix
//! lookups at the owner and records at the owners apply to both paths through one
//! mechanism ([`prefix::MeshPrefixOwners`] behind the request path's two phases,
//! `crate::request`): both paths await the lookup between `prepare` and `decide`, and
//! `decide` records the pick at the owners (see [`prefix`]).

pub mod flags;

use infermesh_gossip::MeshConfig;

pub use flags::{InvalidMeshFlags, MeshArgs, SeedArg};

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

pub mod kv_events;
pub mod load;
pub mod prefix;

use std::fmt::Write as _;

use infermesh_gossip::StatsSnapshot;

/// Appends the mesh's counters to a Prometheus text exposition (`infermesh_mesh_*`).
pub fn render_stats(s: &StatsSnapshot, members: usize, out: &mut String) {
    let counters: [(&str, &str, u64); 19] = [
        (
            "prefix_lookups_local",
            "Prefix lookups answered from this node's own owner index",
            s.prefix_lookups_local,
        ),
        (
            "prefix_lookups_remote",
            "Prefix lookups answered by a remote owner within the budget",
            s.prefix_lookups_remote,
        ),
        (
            "prefix_lookup_fallbacks",
            "Prefix lookups that fell back to scoring without prefix data (timeout or error)",
            s.prefix_lookup_fallbacks,
        ),
        (
            "prefix_lookups_served",
            "Prefix lookups this node answered for other nodes",
            s.prefix_lookups_served,
        ),
        (
            "prefix_records_out",
            "Prefix picks sent to remote owners",
            s.prefix_records_out,
        ),
        (
            "prefix_removals_out",
            "Prefix removals (from KV events) sent to remote owners",
            s.prefix_removals_out,
        ),
        (
            "prefix_removals_applied",
            "Prefix removals (from KV events) applied at this node as an owner",
            s.prefix_removals_applied,
        ),
        (
            "prefix_forgets_applied",
            "Endpoint clears (KV-event clears, restarts, losses, takeovers) applied at this node",
            s.prefix_forgets_applied,
        ),
        (
            "prefix_handoff_anchors_in",
            "Prefix anchors received by handoff after a membership change",
            s.prefix_handoff_anchors_in,
        ),
        (
            "prefix_handoff_anchors_out",
            "Prefix anchors handed to new owners after a membership change",
            s.prefix_handoff_anchors_out,
        ),
        (
            "prefix_handoff_retries",
            "Prefix handoff messages sent again after a failed try",
            s.prefix_handoff_retries,
        ),
        (
            "prefix_handoff_anchors_lost",
            "Prefix anchors whose handoff was given up (the new owner left or stayed unreachable)",
            s.prefix_handoff_anchors_lost,
        ),
        (
            "load_batches_out",
            "Load board batches sent",
            s.load_batches_out,
        ),
        (
            "load_batches_in",
            "Load board batches applied",
            s.load_batches_in,
        ),
        ("gossip_bytes_out", "Gossip bytes sent", s.gossip_bytes_out),
        ("load_bytes_out", "Load board bytes sent", s.load_bytes_out),
        (
            "rpc_bytes_out",
            "Prefix lookup, record and answer bytes sent",
            s.prefix_lookup_bytes_out + s.prefix_record_bytes_out + s.rpc_answer_bytes_out,
        ),
        (
            "gossip_rejected",
            "Gossip datagrams dropped (bad key or malformed)",
            s.gossip_rejected_auth + s.gossip_rejected_malformed,
        ),
        ("rpc_errors", "Mesh RPC failures", s.rpc_errors),
    ];
    for (name, help, v) in counters {
        let _ = writeln!(
            out,
            "# HELP infermesh_mesh_{name} {help}.\n# TYPE infermesh_mesh_{name} counter\ninfermesh_mesh_{name}_total {v}"
        );
    }
    let _ = writeln!(
        out,
        "# HELP infermesh_mesh_members Live mesh members this node sees.\n# TYPE infermesh_mesh_members gauge\ninfermesh_mesh_members {members}"
    );
}

/// Adds the mesh counters to a rendered exposition, before its `# EOF` line if any.
pub fn insert_stats(body: &mut String, s: &StatsSnapshot, members: usize) {
    let mut extra = String::new();
    render_stats(s, members, &mut extra);
    insert_before_eof(body, &extra);
}

/// Inserts `extra` into a rendered exposition, before its `# EOF` line if any.
pub fn insert_before_eof(body: &mut String, extra: &str) {
    match body.rfind("# EOF") {
        Some(i) => body.insert_str(i, extra),
        None => body.push_str(extra),
    }
}

/// Mesh traffic this node sent, in bytes (gossip + load board + prefix RPC).
pub fn bytes_out(s: &StatsSnapshot) -> u64 {
    s.gossip_bytes_out
        + s.load_bytes_out
        + s.prefix_lookup_bytes_out
        + s.prefix_record_bytes_out
        + s.rpc_answer_bytes_out
}
