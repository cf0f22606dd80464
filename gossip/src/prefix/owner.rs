//! Owner-side index shards, record batching to remote owners, and handoff on ring changes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

use crate::membership::MemberSet;
use crate::pod::PodId;
use crate::prefix::store::PrefixStore;
use crate::ring::{NodeId, Ring};
use crate::rpc::Transport;
use crate::stats::Stats;
use crate::wire::{self, HandoffEntry, OneWay, PrefixMatch, PrefixOp, PrefixRecord, PrefixRemoval};

/// Builds one index shard given its capacity in block entries.
pub type StoreFactory = Arc<dyn Fn(usize) -> Box<dyn PrefixStore> + Send + Sync>;

/// Anchors per handoff message.
const HANDOFF_CHUNK: usize = 128;

/// Tries per handoff message before its anchors are given up. With the wait doubling from
/// [`HANDOFF_FIRST_RETRY`] that is about 3 s in all: long enough for a node that has just
/// joined to start accepting, short enough that a dead peer leaves the ring first.
const HANDOFF_ATTEMPTS: u32 = 6;

/// The wait before the first retry of a handoff message.
const HANDOFF_FIRST_RETRY: Duration = Duration::from_millis(100);

/// The node's owner-side index, split by anchor so lookups rarely contend.
pub(crate) struct Shards {
    shards: Box<[Mutex<Box<dyn PrefixStore>>]>,
}

impl Shards {
    pub(crate) fn new(count: usize, capacity_blocks: usize, factory: &StoreFactory) -> Shards {
        let count = count.max(1);
        let per = capacity_blocks.div_ceil(count).max(1);
        Shards {
            shards: (0..count).map(|_| Mutex::new(factory(per))).collect(),
        }
    }

    fn shard(&self, anchor: u64) -> &Mutex<Box<dyn PrefixStore>> {
        let mixed = anchor ^ (anchor >> 32);
        &self.shards[(mixed % self.shards.len() as u64) as usize]
    }

    pub(crate) fn match_chain(&self, anchor: u64, hashes: &[u64]) -> PrefixMatch {
        self.shard(anchor).lock().match_chain(anchor, hashes)
    }

    pub(crate) fn record(&self, anchor: u64, hashes: &[u64], endpoint: &str) {
        self.shard(anchor).lock().record(anchor, hashes, endpoint);
    }

    pub(crate) fn remove(&self, anchor: u64, hashes: &[u64], endpoint: &str) {
        self.shard(anchor).lock().remove(anchor, hashes, endpoint);
    }

    pub(crate) fn forget_endpoint(&self, endpoint: &str) {
        for shard in self.shards.iter() {
            shard.lock().forget_endpoint(endpoint);
        }
    }

    /// Applies ops in order, counting them.
    pub(crate) fn apply_ops(&self, ops: &[PrefixOp], stats: &Stats) {
        for op in ops {
            match op {
                PrefixOp::Record(r) => {
                    Stats::add(&stats.prefix_records_applied, 1);
                    self.record(r.anchor, &r.hashes, r.endpoint.as_str());
                }
                PrefixOp::Remove(r) => {
                    Stats::add(&stats.prefix_removals_applied, 1);
                    self.remove(r.anchor, &r.hashes, r.endpoint.as_str());
                }
                PrefixOp::ForgetEndpoint(ep) => {
                    Stats::add(&stats.prefix_forgets_applied, 1);
                    self.forget_endpoint(ep.as_str());
                }
            }
        }
    }

    pub(crate) fn import(&self, entry: &HandoffEntry) {
        let mut shard = self.shard(entry.anchor).lock();
        for c in &entry.chains {
            shard.record(entry.anchor, &c.hashes, c.endpoint.as_str());
        }
    }

    pub(crate) fn len_blocks(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len_blocks()).sum()
    }

    pub(crate) fn memory_bytes(&self) -> usize {
        self.shards.iter().map(|s| s.lock().memory_bytes()).sum()
    }

    /// Collects handoff entries for anchors gaining owners and drops anchors no longer ours.
    fn plan_handoff(
        &self,
        me: &NodeId,
        old: &Ring,
        new: &Ring,
        replicas: usize,
    ) -> HashMap<NodeId, Vec<HandoffEntry>> {
        let mut out: HashMap<NodeId, Vec<HandoffEntry>> = HashMap::new();
        for shard in self.shards.iter() {
            let mut shard = shard.lock();
            for anchor in shard.anchors() {
                let before = old.owners(anchor, replicas);
                let after = new.owners(anchor, replicas);
                let gained: Vec<&NodeId> = after
                    .iter()
                    .copied()
                    .filter(|n| *n != me && !before.contains(n))
                    .collect();
                if !gained.is_empty()
                    && let Some(entry) = shard.export_anchor(anchor)
                {
                    for n in gained {
                        out.entry(n.clone()).or_default().push(entry.clone());
                    }
                }
                if !after.contains(&me) {
                    shard.remove_anchor(anchor);
                }
            }
        }
        out
    }
}

/// Inputs to the record/handoff task.
#[derive(Debug)]
pub(crate) enum Input {
    /// Send this record to its remote owners (local ownership was applied by the caller).
    Record(PrefixRecord),
    /// Send this removal to its remote owners (applied locally by the caller).
    Remove(PrefixRemoval),
    /// Tell every other node to forget this endpoint (applied locally by the caller).
    Forget(PodId),
}

pub(crate) struct Settings {
    pub replicas: usize,
    pub flush_interval: Duration,
    pub batch_max: usize,
}

pub(crate) async fn run(
    shards: Arc<Shards>,
    mut inputs: mpsc::UnboundedReceiver<Input>,
    mut members: watch::Receiver<Arc<MemberSet>>,
    transport: Arc<Transport>,
    settings: Settings,
    stats: Arc<Stats>,
    handed_off: watch::Sender<Arc<Ring>>,
) {
    let me = transport.me().clone();
    let mut ring = members.borrow_and_update().ring.clone();
    handed_off.send_replace(ring.clone());
    // One ordered queue per peer: a record and a later removal of the same block reach
    // the owner in one message, in order. (Two messages may still apply out of order at
    // the receiver, which handles each stream on its own task; see `flush`.)
    let mut pending: HashMap<NodeId, Vec<PrefixOp>> = HashMap::new();
    let mut senders = Senders::new(transport.clone());
    let mut tick = tokio::time::interval(settings.flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            input = inputs.recv() => {
                let Some(input) = input else { return };
                let (anchor, op) = match input {
                    Input::Record(rec) => (rec.anchor, PrefixOp::Record(rec)),
                    Input::Remove(rem) => (rem.anchor, PrefixOp::Remove(rem)),
                    Input::Forget(endpoint) => {
                        // Every node may own some anchor of the endpoint: everyone gets it,
                        // queued behind what was already pending for them and sent now.
                        for peer in ring.nodes() {
                            if *peer == me {
                                continue;
                            }
                            // Queued, not sent at once: the follower's records come right
                            // behind it and must not overtake it.
                            pending
                                .entry(peer.clone())
                                .or_default()
                                .push(PrefixOp::ForgetEndpoint(endpoint.clone()));
                        }
                        continue;
                    }
                };
                for owner in ring.owners(anchor, settings.replicas) {
                    if *owner == me {
                        continue;
                    }
                    let queue = pending.entry(owner.clone()).or_default();
                    queue.push(op.clone());
                    if queue.len() >= settings.batch_max {
                        let batch = std::mem::take(queue);
                        flush(&mut senders, owner.clone(), batch, &stats);
                    }
                }
            }
            changed = members.changed() => {
                if changed.is_err() { return; }
                let new = members.borrow_and_update().ring.clone();
                if new != ring {
                    let plan = shards.plan_handoff(&me, &ring, &new, settings.replicas);
                    for (peer, entries) in plan {
                        send_handoff(&transport, &members, peer, entries, &stats);
                    }
                    ring = new;
                    handed_off.send_replace(ring.clone());
                }
            }
            _ = tick.tick() => {
                for (peer, queue) in pending.iter_mut() {
                    if !queue.is_empty() {
                        flush(&mut senders, peer.clone(), std::mem::take(queue), &stats);
                    }
                }
                pending.retain(|peer, _| ring.contains(peer));
                senders.retain(&ring);
            }
        }
    }
}

/// One task per peer sending its prefix messages one after the other, so a peer gets them
/// in the order they were flushed (a spawned task per message could start in any order).
struct Senders {
    transport: Arc<Transport>,
    peers: HashMap<NodeId, mpsc::UnboundedSender<Vec<u8>>>,
}

impl Senders {
    fn new(transport: Arc<Transport>) -> Senders {
        Senders {
            transport,
            peers: HashMap::new(),
        }
    }

    fn me(&self) -> &NodeId {
        self.transport.me()
    }

    fn send(&mut self, peer: NodeId, bytes: Vec<u8>) {
        let tx = self.peers.entry(peer.clone()).or_insert_with(|| {
            let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
            let transport = self.transport.clone();
            tokio::spawn(async move {
                while let Some(bytes) = rx.recv().await {
                    if let Err(e) = transport.send_encoded(&peer, &bytes).await {
                        tracing::debug!(%peer, error = %e, "prefix message not delivered");
                    }
                }
            });
            tx
        });
        let _ = tx.send(bytes);
    }

    /// Stops the senders of peers that left the ring.
    fn retain(&mut self, ring: &Ring) {
        self.peers.retain(|peer, _| ring.contains(peer));
    }
}

/// Sends one peer's queued ops: as plain records when that is all they are (the
/// approximate path's message, unchanged), else as one ordered [`OneWay::PrefixOps`].
///
/// Known limit: the receiver handles each message on its own task, so two messages sent
/// back to back can still apply in either order; a removal can then overtake the record
/// it undoes when they fall into different flushes, and the block stays listed for the
/// pod until its next clear or the anchor's LRU eviction.
fn flush(senders: &mut Senders, peer: NodeId, batch: Vec<PrefixOp>, stats: &Arc<Stats>) {
    if batch.is_empty() {
        return;
    }
    let (mut records, mut removals) = (0, 0);
    for op in &batch {
        match op {
            PrefixOp::Record(_) => records += 1,
            PrefixOp::Remove(_) => removals += 1,
            PrefixOp::ForgetEndpoint(_) => {}
        }
    }
    Stats::add(&stats.prefix_records_out, records);
    Stats::add(&stats.prefix_removals_out, removals);
    let bytes = if records == batch.len() as u64 {
        let records: Vec<PrefixRecord> = batch
            .into_iter()
            .filter_map(|op| match op {
                PrefixOp::Record(r) => Some(r),
                _ => None,
            })
            .collect();
        wire::encode(senders.me(), &OneWay::PrefixRecords(records))
    } else {
        wire::encode(senders.me(), &OneWay::PrefixOps(batch))
    };
    Stats::add(&stats.prefix_record_bytes_out, bytes.len() as u64);
    senders.send(peer, bytes);
}

/// Hands `entries` to `peer` in chunks, in the background. A chunk that fails is retried
/// while the peer is still in the ring: the sender may already have dropped anchors it no
/// longer owns, so an undelivered chunk can be the last copy.
fn send_handoff(
    transport: &Arc<Transport>,
    members: &watch::Receiver<Arc<MemberSet>>,
    peer: NodeId,
    entries: Vec<HandoffEntry>,
    stats: &Arc<Stats>,
) {
    Stats::add(&stats.prefix_handoff_anchors_out, entries.len() as u64);
    let transport = transport.clone();
    let members = members.clone();
    let stats = stats.clone();
    tokio::spawn(async move {
        let mut chunks = entries.chunks(HANDOFF_CHUNK);
        for chunk in chunks.by_ref() {
            let bytes = wire::encode(transport.me(), &OneWay::PrefixHandoff(chunk.to_vec()));
            let delivered = deliver(
                || transport.send_encoded(&peer, &bytes),
                || members.borrow().ring.contains(&peer),
                || Stats::add(&stats.prefix_handoff_retries, 1),
            )
            .await;
            if let Err(e) = delivered {
                tracing::warn!(%peer, error = %e, "prefix handoff not delivered");
                Stats::add(&stats.prefix_handoff_anchors_lost, chunk.len() as u64);
                break;
            }
        }
        // Later chunks are not tried once one is given up: the peer is gone or unreachable.
        let rest: usize = chunks.map(<[HandoffEntry]>::len).sum();
        Stats::add(&stats.prefix_handoff_anchors_lost, rest as u64);
    });
}

/// Why a handoff message was given up.
#[derive(Debug, thiserror::Error)]
enum HandoffError {
    /// The peer left the ring before the message got through.
    #[error("the peer left the ring")]
    PeerLeft,
    /// Every try failed.
    #[error("{HANDOFF_ATTEMPTS} tries failed, the last with: {0}")]
    Failed(crate::rpc::RpcError),
}

/// Runs `send` until it succeeds, up to [`HANDOFF_ATTEMPTS`] tries with a doubling wait,
/// stopping early once `wanted` says the peer is gone; `on_retry` counts each retry.
async fn deliver<F, Fut>(
    mut send: F,
    wanted: impl Fn() -> bool,
    on_retry: impl Fn(),
) -> Result<(), HandoffError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), crate::rpc::RpcError>>,
{
    let mut wait = HANDOFF_FIRST_RETRY;
    let mut attempt = 1;
    loop {
        match send().await {
            Ok(()) => return Ok(()),
            Err(e) if attempt >= HANDOFF_ATTEMPTS => return Err(HandoffError::Failed(e)),
            Err(e) => tracing::debug!(attempt, error = %e, "prefix handoff retried"),
        }
        tokio::time::sleep(wait).await;
        if !wanted() {
            return Err(HandoffError::PeerLeft);
        }
        on_retry();
        wait *= 2;
        attempt += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prefix::store::AnchoredIndex;

    fn factory() -> StoreFactory {
        Arc::new(|cap| Box::new(AnchoredIndex::new(cap)) as Box<dyn PrefixStore>)
    }

    fn ring(names: &[&str]) -> Ring {
        Ring::new(names.iter().map(|n| NodeId::new(*n)))
    }

    /// Runs `deliver` against a send that fails its first `failures` tries; returns the
    /// outcome, the tries made, the retries counted and the virtual time it took.
    async fn deliver_failing(
        failures: u32,
        wanted_for: Duration,
    ) -> (Result<(), HandoffError>, u32, u32, Duration) {
        use std::sync::atomic::{AtomicU32, Ordering};
        let tries = AtomicU32::new(0);
        let retries = AtomicU32::new(0);
        let start = tokio::time::Instant::now();
        let res = deliver(
            || async {
                if tries.fetch_add(1, Ordering::Relaxed) < failures {
                    Err(crate::rpc::RpcError::Timeout)
                } else {
                    Ok(())
                }
            },
            || start.elapsed() < wanted_for,
            || {
                retries.fetch_add(1, Ordering::Relaxed);
            },
        )
        .await;
        (
            res,
            tries.into_inner(),
            retries.into_inner(),
            start.elapsed(),
        )
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_handoff_is_retried_with_a_doubling_wait_until_it_gets_through() {
        let (res, tries, retries, took) = deliver_failing(3, Duration::MAX).await;
        assert!(res.is_ok(), "{res:?}");
        assert_eq!((tries, retries), (4, 3));
        // 100 + 200 + 400 ms of waiting.
        assert_eq!(took, Duration::from_millis(700));
    }

    #[tokio::test(start_paused = true)]
    async fn a_handoff_is_given_up_after_its_last_try_or_once_the_peer_left() {
        let (res, tries, retries, _) = deliver_failing(u32::MAX, Duration::MAX).await;
        assert!(matches!(res, Err(HandoffError::Failed(_))), "{res:?}");
        assert_eq!((tries, retries), (HANDOFF_ATTEMPTS, HANDOFF_ATTEMPTS - 1));
        // The peer leaves the ring during the second wait: no third try.
        let (res, tries, retries, _) = deliver_failing(u32::MAX, Duration::from_millis(250)).await;
        assert!(matches!(res, Err(HandoffError::PeerLeft)), "{res:?}");
        assert_eq!((tries, retries), (2, 1));
    }

    #[test]
    fn handoff_moves_exactly_what_changes_owners() {
        let r = 2;
        let old = ring(&["a", "b", "c"]);
        let new = ring(&["a", "b", "c", "d"]);
        let me = NodeId::new("a");
        let shards = Shards::new(4, 100_000, &factory());
        let anchors: Vec<u64> = (1..=400u64)
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .filter(|a| old.is_owner(&me, *a, r))
            .collect();
        for &a in &anchors {
            shards.record(a, &[a, a ^ 1], "ep");
        }
        let plan = shards.plan_handoff(&me, &old, &new, r);
        let d = NodeId::new("d");
        assert!(plan.keys().all(|k| *k == d), "only the newcomer receives");
        let sent: Vec<u64> = plan
            .get(&d)
            .map(|v| v.iter().map(|e| e.anchor).collect())
            .unwrap_or_default();
        for &a in &anchors {
            let gains = new.is_owner(&d, a, r);
            assert_eq!(sent.contains(&a), gains, "anchor {a:#x}");
            // Kept exactly when still an owner.
            let kept = shards.match_chain(a, &[a]).blocks_for("ep") == 1;
            assert_eq!(kept, new.is_owner(&me, a, r));
        }
        assert!(!sent.is_empty(), "a 4th node takes some anchors");

        // Removal: the surviving replica re-replicates to the next owner.
        let shards = Shards::new(4, 100_000, &factory());
        let mut expected = 0;
        for i in 1..=400u64 {
            let a = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            if new.is_owner(&me, a, r) {
                shards.record(a, &[a], "ep");
                if new.is_owner(&d, a, r) {
                    expected += 1;
                }
            }
        }
        let plan = shards.plan_handoff(&me, &new, &old, r);
        let total: usize = plan.values().map(Vec::len).sum();
        assert_eq!(
            total, expected,
            "every anchor that lost d gets a new second owner"
        );
    }
}
