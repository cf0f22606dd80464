//! Counters a mesh node keeps (lock-free; read as a snapshot).

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident,)*) => {
        /// Live counters, bumped from any task.
        #[derive(Debug, Default)]
        pub struct Stats {
            $($(#[$doc])* pub $name: AtomicU64,)*
        }

        /// A point-in-time copy of [`Stats`].
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct StatsSnapshot {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl Stats {
            /// Reads every counter.
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot { $($name: self.$name.load(Ordering::Relaxed),)* }
            }
        }
    };
}

counters! {
    /// Gossip datagrams dropped because their HMAC tag did not verify (wrong or no key).
    gossip_rejected_auth,
    /// Gossip datagrams dropped as malformed (bad envelope, or foca could not decode them).
    gossip_rejected_malformed,
    /// Gossip datagrams accepted and handed to foca.
    gossip_packets_in,
    /// Gossip datagrams sent.
    gossip_packets_out,
    /// Gossip bytes sent (including the envelope).
    gossip_bytes_out,
    /// Mesh RPC connections refused because the peer's certificate is not a member's.
    rpc_rejected_peers,
    /// Mesh RPC frames dropped (malformed or of another protocol version).
    rpc_rejected_frames,
    /// Bytes of answers this node sent to RPC requests (lookups, service calls).
    rpc_answer_bytes_out,
    /// Mesh RPC requests or sends that failed (connect, stream, timeout).
    rpc_errors,
    /// Load batches sent (one per peer).
    load_batches_out,
    /// Load bytes sent (all peers).
    load_bytes_out,
    /// Load batches applied from peers.
    load_batches_in,
    /// Prefix lookups answered from this node's own index.
    prefix_lookups_local,
    /// Prefix lookups sent to a remote owner and answered in budget.
    prefix_lookups_remote,
    /// Prefix lookups that fell back to no prefix data (timeout or error).
    prefix_lookup_fallbacks,
    /// Prefix lookup requests served for other nodes.
    prefix_lookups_served,
    /// Prefix lookup bytes sent (requests).
    prefix_lookup_bytes_out,
    /// Prefix records sent to remote owners.
    prefix_records_out,
    /// Prefix record bytes sent.
    prefix_record_bytes_out,
    /// Prefix records applied at this node as an owner (local and remote).
    prefix_records_applied,
    /// Prefix removals (from KV events) sent to remote owners.
    prefix_removals_out,
    /// Prefix removals applied at this node as an owner (local and remote).
    prefix_removals_applied,
    /// Endpoint clears applied at this node (local and remote).
    prefix_forgets_applied,
    /// Anchors handed to new owners.
    prefix_handoff_anchors_out,
    /// Anchors received by handoff.
    prefix_handoff_anchors_in,
    /// Handoff messages sent again after a failed try.
    prefix_handoff_retries,
    /// Anchors whose handoff was given up (the peer left, or every try failed).
    prefix_handoff_anchors_lost,
}

impl Stats {
    /// Adds `n` to a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
