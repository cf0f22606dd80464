//! Where a flow-control queue's dispatched requests went: the pods their origins picked,
//! counted while those pods prefill them, and the fence that holds a dispatch back until
//! the request dispatched before it has picked its pod.
//!
//! The queue only decides *when* a request goes; the node that holds the request picks
//! the pod, from its own counts plus the load board, which shows other nodes' picks about
//! a millisecond late. Two requests let through together and picked on different nodes
//! could both take the one pod that is free of prefill. With the fence, each pick happens
//! after the one before it was reported, and the dispatch carries the counts
//! ([`PickLedger::claims`]), so every pick sees every earlier one.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The longest a dispatch waits for the pick of the one before it. A pick is reported
/// within a round trip of the origin (about a millisecond on one host); a request that
/// never picks (its client left, no endpoint fit) ends and opens the fence itself, so this
/// only bounds a lost report.
pub const PICK_FENCE: Duration = Duration::from_millis(5);

/// The queue's dispatched requests by pick state, and the fence.
#[derive(Debug, Clone, Default)]
pub struct PickLedger {
    /// Dispatched requests whose pick has not been reported.
    unpicked: u32,
    /// Until when the fence holds while `unpicked > 0`.
    fence_until: Option<Instant>,
    /// Requests picked onto each pod and still prefilling there.
    prefilling: BTreeMap<SocketAddr, u32>,
}

impl PickLedger {
    /// A request was let through at `now`: the next one waits for its pick, at most
    /// `fence` (zero: no fence).
    pub fn dispatched(&mut self, now: Instant, fence: Duration) {
        self.unpicked = self.unpicked.saturating_add(1);
        self.fence_until = Some(now + fence);
    }

    /// A dispatched request picked `pod`: it prefills there until [`Self::prefill_done`].
    pub fn picked(&mut self, pod: SocketAddr) {
        self.unpicked = self.unpicked.saturating_sub(1);
        *self.prefilling.entry(pod).or_default() += 1;
    }

    /// A dispatched request ended without reporting a pick.
    pub fn ended_unpicked(&mut self) {
        self.unpicked = self.unpicked.saturating_sub(1);
    }

    /// A request picked onto `pod` stopped prefilling (first byte, or it ended).
    pub fn prefill_done(&mut self, pod: SocketAddr) {
        if let Some(n) = self.prefilling.get_mut(&pod) {
            *n -= 1;
            if *n == 0 {
                self.prefilling.remove(&pod);
            }
        }
    }

    /// Whether the next request may be let through at `now`.
    pub fn is_open(&self, now: Instant) -> bool {
        self.unpicked == 0 || self.fence_until.is_none_or(|t| now >= t)
    }

    /// When a closed fence opens by itself.
    pub fn opens_at(&self) -> Option<Instant> {
        self.fence_until.filter(|_| self.unpicked > 0)
    }

    /// Requests prefilling on each pod, as reported: what a dispatch carries to its pick.
    pub fn claims(&self) -> Vec<(SocketAddr, u32)> {
        self.prefilling.iter().map(|(a, n)| (*a, *n)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 8000))
    }

    #[test]
    fn the_fence_holds_until_the_pick_or_its_deadline() {
        let t0 = Instant::now();
        let mut l = PickLedger::default();
        assert!(l.is_open(t0));
        l.dispatched(t0, PICK_FENCE);
        assert!(!l.is_open(t0));
        assert_eq!(l.opens_at(), Some(t0 + PICK_FENCE));
        assert!(l.is_open(t0 + PICK_FENCE), "a lost report only delays");
        l.picked(pod(1));
        assert!(l.is_open(t0));
        assert_eq!(l.opens_at(), None);
        l.dispatched(t0, PICK_FENCE);
        l.ended_unpicked();
        assert!(l.is_open(t0), "a request that never picked opens it too");
        l.dispatched(t0, Duration::ZERO);
        assert!(l.is_open(t0), "a zero fence never holds");
    }

    #[test]
    fn claims_count_the_picks_still_prefilling() {
        let t0 = Instant::now();
        let mut l = PickLedger::default();
        for p in [1, 2, 1] {
            l.dispatched(t0, PICK_FENCE);
            l.picked(pod(p));
        }
        assert_eq!(l.claims(), vec![(pod(1), 2), (pod(2), 1)]);
        l.prefill_done(pod(1));
        l.prefill_done(pod(2));
        l.prefill_done(pod(3));
        assert_eq!(l.claims(), vec![(pod(1), 1)]);
    }
}
