//! Configuration of one node's policy store, and its translation to openraft's config.

use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use openraft::SnapshotPolicy;

use crate::types::NodeId;

/// Configuration of one node's policy store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// This node's Raft id (unique in the cluster, never reused).
    pub node_id: NodeId,
    /// The node's redb file (created if absent).
    pub data_file: PathBuf,
    /// Leader heartbeat period (openraft default 50 ms).
    pub heartbeat_interval: Duration,
    /// Election timeout lower bound (openraft default 150 ms).
    pub election_timeout_min: Duration,
    /// Election timeout upper bound; also the leader lease (openraft default 300 ms).
    pub election_timeout_max: Duration,
    /// Build a snapshot after this many log entries since the last one.
    pub snapshot_after_entries: u64,
    /// Entries kept in the log behind a snapshot (so briefly lagging followers catch up
    /// by log rather than snapshot).
    pub keep_entries_after_snapshot: u64,
    /// How long `add_learner` waits for the learner to catch up.
    pub learner_catch_up_timeout: Duration,
    /// Largest snapshot chunk per install-snapshot message; with `max_entries_per_append`
    /// this bounds the size of one transport message.
    pub snapshot_chunk_bytes: u64,
    /// Most log entries in one append-entries message.
    pub max_entries_per_append: u64,
    /// Most client writes grouped into one log entry by the leader.
    pub batch_max_requests: NonZeroUsize,
    /// Most encoded write bytes grouped into one log entry; times `max_entries_per_append`
    /// it must stay below the mesh's 16 MiB frame.
    pub batch_max_bytes: NonZeroUsize,
    /// Log entries of grouped writes submitted and not yet applied; writes arriving
    /// meanwhile queue up for the next entry.
    pub batch_max_in_flight: NonZeroUsize,
    /// Writes waiting for the batcher beyond one full batch; callers past it wait.
    pub write_queue: NonZeroUsize,
    /// How long a submitted entry may go unanswered before its writes are answered
    /// `Unavailable` (they may still commit) and its in-flight slot is freed: a leader that
    /// lost its quorum keeps uncommitted entries pending indefinitely.
    pub write_timeout: Duration,
}

impl StoreConfig {
    /// Defaults for a LAN: openraft's own timings (50/150/300 ms), a snapshot every
    /// 1000 entries keeping 100 behind it, transport messages kept near 1 MiB (1 MiB
    /// snapshot chunks; 64 entries per append, policy documents being a few KiB).
    /// Batching: up to 256 writes or 128 KiB per entry (so 64 entries per append stay
    /// within 8 MiB), 2 entries in flight, 4096 queued writes, 5 s for an entry's answer
    /// (an overloaded 3-node cluster on 2 CPUs answered within 2 s).
    pub fn new(node_id: NodeId, data_file: impl Into<PathBuf>) -> Self {
        StoreConfig {
            node_id,
            data_file: data_file.into(),
            heartbeat_interval: Duration::from_millis(50),
            election_timeout_min: Duration::from_millis(150),
            election_timeout_max: Duration::from_millis(300),
            snapshot_after_entries: 1000,
            keep_entries_after_snapshot: 100,
            learner_catch_up_timeout: Duration::from_secs(30),
            snapshot_chunk_bytes: 1024 * 1024,
            max_entries_per_append: 64,
            batch_max_requests: NonZeroUsize::new(256).expect("non-zero"),
            batch_max_bytes: NonZeroUsize::new(128 * 1024).expect("non-zero"),
            batch_max_in_flight: NonZeroUsize::new(2).expect("non-zero"),
            write_queue: NonZeroUsize::new(4096).expect("non-zero"),
            write_timeout: Duration::from_secs(5),
        }
    }

    /// The batcher's bounds.
    pub(super) fn batch_limits(&self) -> super::batch::BatchLimits {
        super::batch::BatchLimits {
            max_requests: self.batch_max_requests,
            max_bytes: self.batch_max_bytes,
            max_in_flight: self.batch_max_in_flight,
        }
    }

    #[allow(clippy::result_large_err)] // openraft's own error type; boxed by the caller
    pub(super) fn raft_config(&self) -> Result<openraft::Config, openraft::ConfigError> {
        let ms = |d: Duration| d.as_millis() as u64;
        openraft::Config {
            cluster_name: "infermesh-policy".to_string(),
            heartbeat_interval: ms(self.heartbeat_interval),
            election_timeout_min: ms(self.election_timeout_min),
            election_timeout_max: ms(self.election_timeout_max),
            install_snapshot_timeout: ms(self.election_timeout_max).max(1000),
            snapshot_policy: SnapshotPolicy::LogsSinceLast(self.snapshot_after_entries),
            max_in_snapshot_log_to_keep: self.keep_entries_after_snapshot,
            purge_batch_size: 256,
            snapshot_max_chunk_size: self.snapshot_chunk_bytes,
            max_payload_entries: self.max_entries_per_append,
            ..Default::default()
        }
        .validate()
    }
}
