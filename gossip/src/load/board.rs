//! The load board state machine: who scrapes which pod, latest metrics, fleet in-flight.
//!
//! Sans-IO: the driver task feeds it scrapes, local in-flight changes, remote batches and
//! ring changes (each with `now`), and asks it for the next outbound batch. Remote batches
//! carry absolute values, so a lost or repeated batch cannot skew a counter; a periodic full
//! batch repairs any divergence and lets newcomers catch up.
//!
//! A scrape entry is the owner's latest attempt at a pod: metrics, or a down marker when the
//! pod stopped answering, so every node drops a dead pod as soon as its owner sees it die
//! rather than when its last metrics go stale. Entries from one owner are ordered by the
//! owner's batch sequence (a delayed batch cannot undo a newer state); entries from
//! different owners (around an ownership change) by the attempt's time.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smallvec::SmallVec;

use crate::pod::PodId;
use crate::ring::{NodeId, Ring, key_of_str};
use crate::wire::{LoadBatch, PodInFlight, PodMetrics, PodScrape, PodState};

/// Requests and prompt tokens in flight to one pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InFlight {
    /// Requests dispatched and not completed.
    pub requests: u32,
    /// Estimated prompt tokens of those requests.
    pub tokens: u64,
    /// Those requests whose response has not started (still in queue or prefill).
    pub prefilling: u32,
}

/// A change of one node's in-flight work on a pod (negative to release); named fields,
/// because three bare integers are easy to pass in the wrong order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct InFlightDelta {
    /// Requests dispatched (or, negative, completed).
    pub requests: i64,
    /// Their estimated prompt tokens.
    pub tokens: i64,
    /// Requests that started prefilling (or, negative, whose response started or ended).
    pub prefilling: i64,
}

#[derive(Debug, Clone)]
struct Scraped {
    // None: the attempt failed (the pod is down).
    metrics: Option<PodMetrics>,
    scraped_at: Instant,
    by: NodeId,
    // Batch sequence of `by` that carried it (0 = this node's own attempt).
    seq: u64,
}

#[derive(Debug, Clone, Default)]
struct PodEntry {
    metrics: Option<Scraped>,
    // (node, value, seq of the batch that set it); zero values are kept for their seq.
    in_flight: SmallVec<[(NodeId, InFlight, u64); 4]>,
}

/// What every node knows about one pod's load.
#[derive(Debug, Clone, PartialEq)]
pub struct PodLoad {
    /// Latest metrics from the pod's scraper, if any arrived.
    pub metrics: Option<PodMetrics>,
    /// When those metrics were scraped (on this node's clock).
    pub scraped_at: Option<Instant>,
    /// Node that scraped them.
    pub scraped_by: Option<NodeId>,
    /// Sum of every live node's in-flight count for the pod.
    pub in_flight: InFlight,
}

impl PodLoad {
    /// The scraping node's latest attempt (at `scraped_at`) failed: the pod is not a
    /// candidate until a later scrape succeeds.
    pub fn is_down(&self) -> bool {
        self.scraped_at.is_some() && self.metrics.is_none()
    }

    /// llm-d staleness: no metrics (never scraped, or down), or metrics older than
    /// `threshold`, count as saturated.
    pub fn is_stale(&self, now: Instant, threshold: Duration) -> bool {
        self.metrics.is_none()
            || self
                .scraped_at
                .is_none_or(|t| now.saturating_duration_since(t) > threshold)
    }
}

/// An immutable snapshot of the board, published for request handlers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadView {
    /// Increases on every published change.
    pub version: u64,
    /// Per-pod load, keyed by pod identity (`ip:port`).
    pub pods: HashMap<String, PodLoad>,
    /// Pods this node must scrape now (sorted).
    pub owned: Vec<String>,
}

impl LoadView {
    /// Load of one pod, if anything is known about it.
    pub fn pod(&self, pod: &PodId) -> Option<&PodLoad> {
        self.pods.get(pod.as_str())
    }
}

/// The board one node keeps.
#[derive(Debug)]
pub struct LoadBoard {
    me: NodeId,
    ring: Arc<Ring>,
    pods: BTreeSet<String>,
    owned: Vec<String>,
    entries: HashMap<String, PodEntry>,
    local: HashMap<String, InFlight>,
    dirty_scrapes: HashSet<String>,
    dirty_in_flight: HashSet<String>,
    full_sync_every: Duration,
    last_full: Option<Instant>,
    force_full: bool,
    version: u64,
    out_seq: u64,
}

impl LoadBoard {
    /// A board for node `me` that sends a full batch at least every `full_sync_every`;
    /// outbound batch sequence numbers start after `first_seq` (use the start time in µs).
    pub fn new(me: NodeId, full_sync_every: Duration, first_seq: u64) -> LoadBoard {
        let ring = Arc::new(Ring::new([me.clone()]));
        LoadBoard {
            me,
            ring,
            pods: BTreeSet::new(),
            owned: Vec::new(),
            entries: HashMap::new(),
            local: HashMap::new(),
            dirty_scrapes: HashSet::new(),
            dirty_in_flight: HashSet::new(),
            full_sync_every,
            last_full: None,
            force_full: true,
            version: 0,
            out_seq: first_seq,
        }
    }

    /// Version of the board's content (bumped on every change).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Whether this node's in-flight work changed since the last outbound batch.
    pub fn has_in_flight_changes(&self) -> bool {
        !self.dirty_in_flight.is_empty()
    }

    /// Pods this node must scrape now: the pods whose rendezvous owner is this node.
    pub fn owned_pods(&self) -> &[String] {
        &self.owned
    }

    /// Replaces the set of pods in the pool (from discovery or policy).
    pub fn handle_set_pods(&mut self, pods: impl IntoIterator<Item = String>) {
        let pods: BTreeSet<String> = pods.into_iter().collect();
        if pods == self.pods {
            return;
        }
        self.entries.retain(|p, _| pods.contains(p));
        self.local.retain(|p, _| pods.contains(p));
        self.pods = pods;
        self.recompute_owned();
        self.force_full = true;
        self.version += 1;
    }

    /// Applies a new live member set: re-owns pods and forgets in-flight of departed nodes.
    pub fn handle_ring(&mut self, ring: Arc<Ring>) {
        self.ring = ring;
        let me = &self.me;
        let ring = &self.ring;
        for e in self.entries.values_mut() {
            e.in_flight.retain(|(n, _, _)| n == me || ring.contains(n));
        }
        self.recompute_owned();
        // Newcomers need our whole table; send it on the next poll.
        self.force_full = true;
        self.version += 1;
    }

    /// Records a scrape this node made of `pod` at `scraped_at`.
    pub fn handle_scrape(&mut self, pod: &str, metrics: PodMetrics, scraped_at: Instant) {
        self.record_own(pod, Some(metrics), scraped_at);
    }

    /// Records that this node's scrape of `pod` at `failed_at` failed: the pod is announced
    /// down until a later [`Self::handle_scrape`]. Repeated failures change nothing.
    pub fn handle_down(&mut self, pod: &str, failed_at: Instant) {
        let already = self.entries.get(pod).and_then(|e| e.metrics.as_ref());
        if already.is_some_and(|m| m.metrics.is_none() && m.by == self.me) {
            return;
        }
        self.record_own(pod, None, failed_at);
    }

    fn record_own(&mut self, pod: &str, metrics: Option<PodMetrics>, at: Instant) {
        let entry = self.entries.entry(pod.to_owned()).or_default();
        if entry.metrics.as_ref().is_some_and(|m| m.scraped_at > at) {
            return;
        }
        entry.metrics = Some(Scraped {
            metrics,
            scraped_at: at,
            by: self.me.clone(),
            seq: 0,
        });
        self.dirty_scrapes.insert(pod.to_owned());
        self.version += 1;
    }

    /// Adds (or with negative values, removes) this node's in-flight work on `pod`.
    pub fn handle_in_flight(&mut self, pod: &str, delta: InFlightDelta) {
        let cur = self.local.entry(pod.to_owned()).or_default();
        let count = |cur: u32, delta: i64| {
            add_clamped(u64::from(cur), delta).min(u64::from(u32::MAX)) as u32
        };
        cur.requests = count(cur.requests, delta.requests);
        cur.tokens = add_clamped(cur.tokens, delta.tokens);
        cur.prefilling = count(cur.prefilling, delta.prefilling);
        let value = *cur;
        set_in_flight(
            self.entries.entry(pod.to_owned()).or_default(),
            &self.me,
            value,
            0,
        );
        self.dirty_in_flight.insert(pod.to_owned());
        self.version += 1;
    }

    /// Applies a batch received from node `from` at `now`.
    pub fn handle_remote(&mut self, from: &NodeId, batch: LoadBatch, now: Instant) {
        if *from == self.me {
            return;
        }
        let seq = batch.seq;
        for s in batch.scrapes {
            let scraped_at = now
                .checked_sub(Duration::from_millis(u64::from(s.age_ms)))
                .unwrap_or(now);
            let entry = self.entries.entry(s.pod).or_default();
            let newer = match &entry.metrics {
                None => true,
                // The sender's own order: ages are re-based on arrival, so a delayed batch
                // could otherwise look newer than the one that followed it.
                Some(m) if m.by == *from => seq > m.seq,
                Some(m) => m.scraped_at <= scraped_at,
            };
            if !newer {
                continue;
            }
            entry.metrics = Some(Scraped {
                metrics: match s.state {
                    PodState::Up(m) => Some(m),
                    PodState::Down => None,
                },
                scraped_at,
                by: from.clone(),
                seq,
            });
        }
        if batch.full {
            // Absent from a full table means zero, unless a newer delta already arrived.
            let listed: HashSet<&str> = batch.in_flight.iter().map(|f| f.pod.as_str()).collect();
            for (pod, e) in &mut self.entries {
                if listed.contains(pod.as_str()) {
                    continue;
                }
                for slot in e
                    .in_flight
                    .iter_mut()
                    .filter(|(n, _, s)| n == from && *s < seq)
                {
                    slot.1 = InFlight::default();
                    slot.2 = seq;
                }
            }
        }
        for f in batch.in_flight {
            let value = InFlight {
                requests: f.requests,
                tokens: f.tokens,
                prefilling: f.prefilling,
            };
            set_in_flight(self.entries.entry(f.pod).or_default(), from, value, seq);
        }
        self.version += 1;
    }

    /// The next batch to push to every other node, or `None` when nothing changed.
    pub fn poll_outbound(&mut self, now: Instant) -> Option<LoadBatch> {
        let full = self.force_full
            || self
                .last_full
                .is_none_or(|t| now.saturating_duration_since(t) >= self.full_sync_every);
        self.out_seq += 1;
        let seq = self.out_seq;
        let batch = if full {
            self.force_full = false;
            self.last_full = Some(now);
            self.dirty_scrapes.clear();
            self.dirty_in_flight.clear();
            let scrapes = self
                .entries
                .iter()
                .filter_map(|(pod, e)| self.own_scrape(pod, e, now))
                .collect();
            let in_flight = self
                .local
                .iter()
                .filter(|(_, v)| **v != InFlight::default())
                .map(|(pod, v)| wire_in_flight(pod, *v))
                .collect();
            LoadBatch {
                seq,
                full: true,
                scrapes,
                in_flight,
            }
        } else {
            if self.dirty_scrapes.is_empty() && self.dirty_in_flight.is_empty() {
                self.out_seq -= 1;
                return None;
            }
            let scrapes = self
                .dirty_scrapes
                .drain()
                .filter_map(|pod| {
                    let e = self.entries.get(&pod)?;
                    own_scrape(&self.me, &pod, e, now)
                })
                .collect();
            let in_flight = self
                .dirty_in_flight
                .drain()
                .map(|pod| {
                    let v = self.local.get(&pod).copied().unwrap_or_default();
                    wire_in_flight(&pod, v)
                })
                .collect();
            LoadBatch {
                seq,
                full: false,
                scrapes,
                in_flight,
            }
        };
        // Zeroed counters have been announced; stop carrying them.
        self.local.retain(|_, v| *v != InFlight::default());
        Some(batch)
    }

    /// Builds the read snapshot handed to request handlers.
    pub fn view(&self) -> LoadView {
        let pods = self
            .entries
            .iter()
            .map(|(pod, e)| {
                let mut total = InFlight::default();
                for (_, f, _) in &e.in_flight {
                    total.requests = total.requests.saturating_add(f.requests);
                    total.tokens = total.tokens.saturating_add(f.tokens);
                    total.prefilling = total.prefilling.saturating_add(f.prefilling);
                }
                let load = PodLoad {
                    metrics: e.metrics.as_ref().and_then(|m| m.metrics.clone()),
                    scraped_at: e.metrics.as_ref().map(|m| m.scraped_at),
                    scraped_by: e.metrics.as_ref().map(|m| m.by.clone()),
                    in_flight: total,
                };
                (pod.clone(), load)
            })
            .collect();
        LoadView {
            version: self.version,
            pods,
            owned: self.owned.clone(),
        }
    }

    fn own_scrape(&self, pod: &str, e: &PodEntry, now: Instant) -> Option<PodScrape> {
        own_scrape(&self.me, pod, e, now)
    }

    fn recompute_owned(&mut self) {
        self.owned = self
            .pods
            .iter()
            .filter(|p| self.ring.owner(key_of_str(p)) == Some(&self.me))
            .cloned()
            .collect();
    }
}

fn own_scrape(me: &NodeId, pod: &str, e: &PodEntry, now: Instant) -> Option<PodScrape> {
    let m = e.metrics.as_ref().filter(|m| m.by == *me)?;
    let age = now.saturating_duration_since(m.scraped_at).as_millis();
    Some(PodScrape {
        pod: pod.to_owned(),
        age_ms: u32::try_from(age).unwrap_or(u32::MAX),
        state: match &m.metrics {
            Some(metrics) => PodState::Up(metrics.clone()),
            None => PodState::Down,
        },
    })
}

fn wire_in_flight(pod: &str, v: InFlight) -> PodInFlight {
    PodInFlight {
        pod: pod.to_owned(),
        requests: v.requests,
        tokens: v.tokens,
        prefilling: v.prefilling,
    }
}

/// Sets `node`'s count unless a newer batch already set it (`seq` 0 = local, always applies).
fn set_in_flight(entry: &mut PodEntry, node: &NodeId, value: InFlight, seq: u64) {
    if let Some(slot) = entry.in_flight.iter_mut().find(|(n, _, _)| n == node) {
        if seq == 0 || seq > slot.2 {
            slot.1 = value;
            slot.2 = seq;
        }
    } else {
        entry.in_flight.push((node.clone(), value, seq));
    }
}

fn add_clamped(cur: u64, delta: i64) -> u64 {
    if delta >= 0 {
        cur.saturating_add(delta.unsigned_abs())
    } else {
        cur.saturating_sub(delta.unsigned_abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> NodeId {
        NodeId::new(s)
    }

    fn d(requests: i64, tokens: i64, prefilling: i64) -> InFlightDelta {
        InFlightDelta {
            requests,
            tokens,
            prefilling,
        }
    }

    fn metrics(waiting: u32) -> PodMetrics {
        PodMetrics {
            waiting_queue: waiting,
            ..PodMetrics::default()
        }
    }

    fn pods(k: usize) -> Vec<String> {
        (0..k).map(|i| format!("10.0.0.{i}:8000")).collect()
    }

    #[test]
    fn every_pod_has_exactly_one_owner_and_dead_nodes_pods_move() {
        let names = ["a", "b", "c"];
        let mut boards: Vec<LoadBoard> = names
            .iter()
            .map(|s| LoadBoard::new(n(s), Duration::from_secs(1), 0))
            .collect();
        let ring = Arc::new(Ring::new(names.iter().map(|s| n(s))));
        for b in &mut boards {
            b.handle_set_pods(pods(60));
            b.handle_ring(ring.clone());
        }
        let mut all: Vec<String> = boards
            .iter()
            .flat_map(|b| b.owned_pods().to_vec())
            .collect();
        all.sort();
        let mut expected = pods(60);
        expected.sort();
        assert_eq!(all, expected, "pods owned exactly once");
        assert!(boards.iter().all(|b| !b.owned_pods().is_empty()));

        // "c" dies: a and b take over its pods and keep their own.
        let before: Vec<Vec<String>> = boards.iter().map(|b| b.owned_pods().to_vec()).collect();
        let ring2 = Arc::new(Ring::new([n("a"), n("b")]));
        boards[0].handle_ring(ring2.clone());
        boards[1].handle_ring(ring2);
        for i in 0..2 {
            assert!(before[i].iter().all(|p| boards[i].owned_pods().contains(p)));
        }
        let mut now: Vec<String> = boards[..2]
            .iter()
            .flat_map(|b| b.owned_pods().to_vec())
            .collect();
        now.sort();
        assert_eq!(now, expected);
    }

    #[test]
    fn in_flight_sums_over_nodes_and_forgets_departed() {
        let t0 = Instant::now();
        let mut a = LoadBoard::new(n("a"), Duration::from_secs(60), 0);
        let mut b = LoadBoard::new(n("b"), Duration::from_secs(60), 0);
        let ring = Arc::new(Ring::new([n("a"), n("b")]));
        a.handle_ring(ring.clone());
        b.handle_ring(ring);
        let pod = "10.0.0.1:8000";
        a.handle_in_flight(pod, d(3, 300, 2));
        b.handle_in_flight(pod, d(2, 50, 1));
        b.handle_in_flight(pod, d(-1, -10, 0));
        let batch = b.poll_outbound(t0).unwrap();
        assert!(batch.full, "first batch after a ring change is full");
        a.handle_remote(&n("b"), batch, t0);
        let v = a.view();
        assert_eq!(
            v.pod(&PodId::new(pod)).unwrap().in_flight,
            InFlight {
                requests: 4,
                tokens: 340,
                prefilling: 3
            }
        );

        // Delta batch: only the changed pod, absolute value.
        b.handle_in_flight(pod, d(-1, -40, -1));
        let delta = b.poll_outbound(t0).unwrap();
        assert!(!delta.full);
        assert_eq!(delta.in_flight.len(), 1);
        assert_eq!(delta.in_flight[0].requests, 0);
        let stale = LoadBatch {
            seq: delta.seq - 1,
            full: false,
            scrapes: vec![],
            in_flight: vec![PodInFlight {
                pod: pod.into(),
                requests: 9,
                tokens: 9,
                prefilling: 9,
            }],
        };
        a.handle_remote(&n("b"), delta.clone(), t0);
        a.handle_remote(&n("b"), delta, t0); // repeated: idempotent
        a.handle_remote(&n("b"), stale, t0); // reordered older batch: ignored
        assert_eq!(
            a.view().pod(&PodId::new(pod)).unwrap().in_flight,
            InFlight {
                requests: 3,
                tokens: 300,
                prefilling: 2
            }
        );
        assert!(b.poll_outbound(t0).is_none(), "nothing changed");

        b.handle_in_flight(pod, d(5, 0, 0));
        a.handle_remote(&n("b"), b.poll_outbound(t0).unwrap(), t0);
        assert_eq!(
            a.view().pod(&PodId::new(pod)).unwrap().in_flight.requests,
            8
        );
        a.handle_ring(Arc::new(Ring::new([n("a")])));
        assert_eq!(
            a.view().pod(&PodId::new(pod)).unwrap().in_flight.requests,
            3
        );
    }

    #[test]
    fn scrapes_propagate_with_age_and_newest_wins() {
        let t0 = Instant::now();
        let later = t0 + Duration::from_millis(500);
        let mut a = LoadBoard::new(n("a"), Duration::from_secs(60), 0);
        let mut b = LoadBoard::new(n("b"), Duration::from_secs(60), 0);
        let pod = "10.0.0.9:8000";
        let _ = a.poll_outbound(t0); // initial full
        a.handle_scrape(pod, metrics(7), t0);
        let batch = a.poll_outbound(t0 + Duration::from_millis(20)).unwrap();
        assert_eq!(batch.scrapes[0].age_ms, 20);
        b.handle_remote(&n("a"), batch, later);
        let v = b.view();
        let p = v.pod(&PodId::new(pod)).unwrap();
        assert_eq!(p.metrics.as_ref().unwrap().waiting_queue, 7);
        assert_eq!(p.scraped_by, Some(n("a")));
        assert_eq!(p.scraped_at, Some(later - Duration::from_millis(20)));
        assert!(!p.is_stale(later, Duration::from_secs(2)));
        assert!(p.is_stale(later + Duration::from_secs(3), Duration::from_secs(2)));

        // An older scrape (e.g. from a previous owner, delayed) does not replace a newer one.
        let old = LoadBatch {
            seq: 1,
            full: false,
            scrapes: vec![PodScrape {
                pod: pod.into(),
                age_ms: 5_000,
                state: PodState::Up(metrics(1)),
            }],
            in_flight: vec![],
        };
        b.handle_remote(&n("c"), old, later);
        assert_eq!(
            b.view()
                .pod(&PodId::new(pod))
                .unwrap()
                .metrics
                .as_ref()
                .unwrap()
                .waiting_queue,
            7
        );
    }

    fn state(b: &LoadBoard, pod: &str) -> (bool, Option<u32>, Option<NodeId>) {
        let v = b.view();
        let p = v.pod(&PodId::new(pod)).expect("pod known");
        (
            p.is_down(),
            p.metrics.as_ref().map(|m| m.waiting_queue),
            p.scraped_by.clone(),
        )
    }

    #[test]
    fn a_down_marker_propagates_and_a_later_scrape_clears_it() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut a = LoadBoard::new(n("a"), Duration::from_secs(60), 0);
        let mut b = LoadBoard::new(n("b"), Duration::from_secs(60), 0);
        let pod = "10.0.0.3:8000";
        a.handle_scrape(pod, metrics(4), t0);
        b.handle_remote(&n("a"), a.poll_outbound(t0).unwrap(), t0);
        assert_eq!(state(&b, pod), (false, Some(4), Some(n("a"))));
        assert!(
            !b.view()
                .pod(&PodId::new(pod))
                .unwrap()
                .is_stale(t0, Duration::from_secs(60))
        );

        // The owner's scrape fails: the next (delta) batch says so, and b drops the pod
        // although its last metrics are far from stale.
        a.handle_down(pod, t0 + ms(50));
        let batch = a.poll_outbound(t0 + ms(51)).unwrap();
        assert!(!batch.full);
        assert_eq!(batch.scrapes.len(), 1);
        assert_eq!(batch.scrapes[0].state, PodState::Down);
        assert_eq!(batch.scrapes[0].age_ms, 1);
        b.handle_remote(&n("a"), batch, t0 + ms(52));
        assert_eq!(state(&b, pod), (true, None, Some(n("a"))));
        let p = b.view().pod(&PodId::new(pod)).unwrap().clone();
        assert_eq!(p.scraped_at, Some(t0 + ms(51)));
        assert!(p.is_stale(t0 + ms(52), Duration::from_secs(60)));
        assert!(
            a.view().pod(&PodId::new(pod)).unwrap().is_down(),
            "the owner's own view says down too"
        );

        // Further failures change nothing and send nothing.
        let v = a.version();
        a.handle_down(pod, t0 + ms(100));
        assert_eq!(a.version(), v);
        assert!(a.poll_outbound(t0 + ms(101)).is_none());

        // The periodic full batch repeats the marker (a newcomer learns it too).
        let mut c = LoadBoard::new(n("c"), Duration::from_secs(60), 0);
        a.handle_ring(Arc::new(Ring::new([n("a"), n("b"), n("c")])));
        let full = a.poll_outbound(t0 + ms(110)).unwrap();
        assert!(full.full);
        c.handle_remote(&n("a"), full, t0 + ms(111));
        assert_eq!(state(&c, pod), (true, None, Some(n("a"))));

        // The pod answers again: the next scrape clears the mark everywhere.
        a.handle_scrape(pod, metrics(9), t0 + ms(150));
        let batch = a.poll_outbound(t0 + ms(150)).unwrap();
        b.handle_remote(&n("a"), batch.clone(), t0 + ms(151));
        c.handle_remote(&n("a"), batch, t0 + ms(151));
        assert_eq!(state(&b, pod), (false, Some(9), Some(n("a"))));
        assert_eq!(state(&c, pod), (false, Some(9), Some(n("a"))));
        assert!(
            !b.view()
                .pod(&PodId::new(pod))
                .unwrap()
                .is_stale(t0 + ms(151), Duration::from_secs(60))
        );
    }

    #[test]
    fn a_reordered_older_down_marker_does_not_override_a_newer_scrape() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut a = LoadBoard::new(n("a"), Duration::from_secs(60), 1_000);
        let mut b = LoadBoard::new(n("b"), Duration::from_secs(60), 0);
        let pod = "10.0.0.4:8000";
        let _ = a.poll_outbound(t0); // initial full
        a.handle_down(pod, t0 + ms(10));
        // Held up in flight long enough that its re-based time looks newer than the scrape.
        let down = a.poll_outbound(t0 + ms(10)).unwrap();
        a.handle_scrape(pod, metrics(2), t0 + ms(20));
        let up = a.poll_outbound(t0 + ms(20)).unwrap();
        assert!(up.seq > down.seq);
        b.handle_remote(&n("a"), up.clone(), t0 + ms(21));
        b.handle_remote(&n("a"), down.clone(), t0 + ms(500));
        assert_eq!(state(&b, pod), (false, Some(2), Some(n("a"))));
        // Repeated batches are idempotent.
        b.handle_remote(&n("a"), up, t0 + ms(501));
        b.handle_remote(&n("a"), down, t0 + ms(502));
        assert_eq!(state(&b, pod), (false, Some(2), Some(n("a"))));

        // Same in the other direction: a delayed scrape does not revive a newer down.
        let mut c = LoadBoard::new(n("c"), Duration::from_secs(60), 0);
        a.handle_down(pod, t0 + ms(30));
        let down2 = a.poll_outbound(t0 + ms(30)).unwrap();
        a.handle_scrape(pod, metrics(3), t0 + ms(25)); // older than the down: ignored
        assert!(a.poll_outbound(t0 + ms(31)).is_none());
        let mut old_up = down2.clone();
        old_up.seq = down2.seq - 1;
        old_up.scrapes[0].state = PodState::Up(metrics(3));
        c.handle_remote(&n("a"), down2, t0 + ms(31));
        c.handle_remote(&n("a"), old_up, t0 + ms(900));
        assert_eq!(state(&c, pod), (true, None, Some(n("a"))));
    }

    #[test]
    fn a_new_owner_overrides_the_old_owners_state_by_time() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let names = ["a", "b", "c"];
        let mut boards: Vec<LoadBoard> = names
            .iter()
            .map(|s| LoadBoard::new(n(s), Duration::from_secs(60), 0))
            .collect();
        let ring = Arc::new(Ring::new(names.iter().map(|s| n(s))));
        let all = pods(20);
        for b in &mut boards {
            b.handle_set_pods(all.clone());
            b.handle_ring(ring.clone());
            let _ = b.poll_outbound(t0);
        }
        // A pod "a" owns that moves to "b" when "a" leaves.
        let ring2 = Arc::new(Ring::new([n("b"), n("c")]));
        let pod = all
            .iter()
            .find(|p| {
                boards[0].owned_pods().contains(p) && ring2.owner(key_of_str(p)) == Some(&n("b"))
            })
            .expect("some pod moves from a to b")
            .clone();

        // Old owner "a" last said the pod was down.
        boards[0].handle_scrape(&pod, metrics(1), t0);
        boards[0].handle_down(&pod, t0 + ms(10));
        let batch = boards[0].poll_outbound(t0 + ms(10)).unwrap();
        boards[2].handle_remote(&n("a"), batch.clone(), t0 + ms(11));
        boards[1].handle_remote(&n("a"), batch, t0 + ms(11));
        assert!(state(&boards[2], &pod).0);

        // "a" leaves; the new owner "b" scrapes the pod successfully: up again on "c".
        boards[1].handle_ring(ring2.clone());
        boards[2].handle_ring(ring2);
        assert!(boards[1].owned_pods().contains(&pod));
        boards[1].handle_scrape(&pod, metrics(5), t0 + ms(100));
        let batch = boards[1].poll_outbound(t0 + ms(100)).unwrap();
        boards[2].handle_remote(&n("b"), batch, t0 + ms(101));
        assert_eq!(state(&boards[2], &pod), (false, Some(5), Some(n("b"))));

        // A late batch from the old owner (its last full table, delayed) loses by time,
        // even though its sequence is new to "c".
        let mut late = LoadBatch {
            seq: u64::MAX / 2,
            full: false,
            scrapes: vec![PodScrape {
                pod: pod.clone(),
                age_ms: 90,
                state: PodState::Down,
            }],
            in_flight: vec![],
        };
        boards[2].handle_remote(&n("a"), late.clone(), t0 + ms(102));
        assert_eq!(state(&boards[2], &pod), (false, Some(5), Some(n("b"))));

        // The new owner's scrape fails in turn: down everywhere, owned by "b".
        boards[1].handle_down(&pod, t0 + ms(200));
        let batch = boards[1].poll_outbound(t0 + ms(200)).unwrap();
        boards[2].handle_remote(&n("b"), batch, t0 + ms(201));
        assert_eq!(state(&boards[2], &pod), (true, None, Some(n("b"))));
        // ... and a newer attempt by another node (here, a stale old owner that scraped
        // later) is still taken by time.
        late.seq += 1;
        late.scrapes[0].age_ms = 0;
        late.scrapes[0].state = PodState::Up(metrics(8));
        boards[2].handle_remote(&n("a"), late, t0 + ms(300));
        assert_eq!(state(&boards[2], &pod), (false, Some(8), Some(n("a"))));
    }

    #[test]
    fn periodic_full_sync_repeats_own_state() {
        let t0 = Instant::now();
        let mut a = LoadBoard::new(n("a"), Duration::from_secs(1), 0);
        a.handle_scrape("p", metrics(1), t0);
        a.handle_in_flight("p", d(1, 1, 1));
        assert!(a.poll_outbound(t0).unwrap().full);
        assert!(a.poll_outbound(t0 + Duration::from_millis(10)).is_none());
        let f = a.poll_outbound(t0 + Duration::from_secs(1)).unwrap();
        assert!(f.full);
        assert_eq!(f.scrapes.len(), 1);
        assert_eq!(f.in_flight.len(), 1);
    }

    #[test]
    fn only_in_flight_changes_ask_for_a_push_and_a_push_clears_them() {
        let t0 = Instant::now();
        let mut a = LoadBoard::new(n("a"), Duration::from_secs(60), 0);
        let _ = a.poll_outbound(t0); // initial full
        a.handle_scrape("p", metrics(1), t0);
        assert!(!a.has_in_flight_changes(), "a scrape waits for the tick");
        a.handle_in_flight("p", d(1, 10, 1));
        assert!(a.has_in_flight_changes());
        let batch = a.poll_outbound(t0).unwrap();
        assert_eq!((batch.scrapes.len(), batch.in_flight.len()), (1, 1));
        assert!(!a.has_in_flight_changes());
    }

    mod reorder {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Batches delivered late, out of order and twice still converge to the truth.
            #[test]
            fn shuffled_duplicated_batches_converge(
                ops in proptest::collection::vec((0usize..3, 0usize..4, -2i64..4), 1..60),
                order_seed: u64,
            ) {
                let t0 = Instant::now();
                let names = ["a", "b", "c"];
                let mut boards: Vec<LoadBoard> = names
                    .iter()
                    .map(|s| LoadBoard::new(n(s), Duration::from_secs(3600), 1_000))
                    .collect();
                let mut truth = [[0i64; 4]; 3];
                let mut in_transit: Vec<(usize, LoadBatch)> = Vec::new();
                for (node, pod, delta) in ops {
                    let delta = delta.max(-truth[node][pod]);
                    truth[node][pod] += delta;
                    boards[node].handle_in_flight(&format!("p{pod}"), d(delta, delta * 10, 0));
                    if let Some(b) = boards[node].poll_outbound(t0) {
                        in_transit.push((node, b.clone()));
                        in_transit.push((node, b));
                    }
                }
                // Deterministic shuffle from the seed.
                let mut x = order_seed | 1;
                for i in (1..in_transit.len()).rev() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    in_transit.swap(i, (x % (i as u64 + 1)) as usize);
                }
                for (from, batch) in in_transit {
                    for (to, board) in boards.iter_mut().enumerate() {
                        if to != from {
                            board.handle_remote(&n(names[from]), batch.clone(), t0);
                        }
                    }
                }
                for board in &boards {
                    let v = board.view();
                    for pod in 0..4 {
                        let want: i64 = truth.iter().map(|t| t[pod]).sum();
                        let got = v.pod(&PodId::new(format!("p{pod}"))).map_or(0, |p| p.in_flight.requests);
                        prop_assert_eq!(i64::from(got), want, "pod p{}", pod);
                    }
                }
            }
        }
    }
}
