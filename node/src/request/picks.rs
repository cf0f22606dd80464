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
//!
//! The board lags the other way too. A saturated queue lets the next request through the
//! moment one of its requests stops prefilling, so the next pick often comes before the
//! board shows that pod free again: it would pass over the one free pod. The dispatch
//! carries those recent ends as well ([`Claims::freed`]).

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The longest a dispatch waits for the pick of the one before it. A pick is reported
/// within a round trip of the origin (about a millisecond on one host); a request that
/// never picks (its client left, no endpoint fit) ends and opens the fence itself, so this
/// only bounds a lost report.
pub const PICK_FENCE: Duration = Duration::from_millis(5);

/// How long a prefill's end rides along with dispatches of the tier's queue: the board's
/// slowest regular push (its flush tick). In-flight changes usually reach it within a few
/// milliseconds.
pub const FREED_HINT: Duration = Duration::from_millis(10);

/// What a dispatch tells its pick about the queue's earlier dispatches, per pod.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claims {
    /// Requests prefilling there, as reported: the pick counts at least these.
    pub prefilling: Vec<(SocketAddr, u32)>,
    /// Prefills that ended there a moment ago ([`FREED_HINT`], from the tier's queue only):
    /// the board may count them still.
    pub freed: Vec<(SocketAddr, u32)>,
}

impl Claims {
    /// Requests the queue knows are prefilling on `pod`.
    pub fn prefilling_on(&self, pod: SocketAddr) -> u32 {
        count_of(&self.prefilling, pod)
    }

    /// Prefills the queue saw end on `pod` a moment ago.
    pub fn freed_on(&self, pod: SocketAddr) -> u32 {
        count_of(&self.freed, pod)
    }

    /// Whether it says nothing.
    pub fn is_empty(&self) -> bool {
        self.prefilling.is_empty() && self.freed.is_empty()
    }
}

fn count_of(list: &[(SocketAddr, u32)], pod: SocketAddr) -> u32 {
    list.iter().find(|(a, _)| *a == pod).map_or(0, |(_, n)| *n)
}

/// The queue's dispatched requests by pick state, and the fence.
#[derive(Debug, Clone, Default)]
pub struct PickLedger {
    /// Dispatched requests whose pick has not been reported.
    unpicked: u32,
    /// Until when the fence holds while `unpicked > 0`.
    fence_until: Option<Instant>,
    /// Requests picked onto each pod and still prefilling there.
    prefilling: BTreeMap<SocketAddr, u32>,
    /// Recent prefill ends, oldest first: when, and on which pod.
    ended: VecDeque<(Instant, SocketAddr)>,
    /// How long an end is kept in `ended` (zero: ends are not kept).
    freed_hint: Duration,
}

impl PickLedger {
    /// A ledger whose dispatches carry the prefill ends of the last `freed_hint` (zero: none).
    ///
    /// Only a queue that sees every request's pick should pass ends on: the pick takes them
    /// off the board's count down to the queue's own. A queue of one node among several
    /// (`--flow-control-per-node`) knows only its node's requests, whose counts the pick
    /// has exact already; taking its ends off the board would hide other nodes' prefills.
    pub fn with_freed_hint(freed_hint: Duration) -> PickLedger {
        PickLedger {
            freed_hint,
            ..PickLedger::default()
        }
    }

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

    /// A request picked onto `pod` stopped prefilling at `now` (first byte, or it ended).
    pub fn prefill_done(&mut self, pod: SocketAddr, now: Instant) {
        if let Some(n) = self.prefilling.get_mut(&pod) {
            *n -= 1;
            if *n == 0 {
                self.prefilling.remove(&pod);
            }
            self.forget_ends(now);
            if !self.freed_hint.is_zero() {
                self.ended.push_back((now, pod));
            }
        }
    }

    fn forget_ends(&mut self, now: Instant) {
        while self
            .ended
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > self.freed_hint)
        {
            self.ended.pop_front();
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

    /// What a dispatch at `now` carries to its pick: requests prefilling on each pod, and
    /// the prefills that ended within the ledger's freed hint.
    pub fn claims(&mut self, now: Instant) -> Claims {
        self.forget_ends(now);
        let mut freed: Vec<(SocketAddr, u32)> = Vec::new();
        for (_, pod) in &self.ended {
            match freed.iter_mut().find(|(a, _)| a == pod) {
                Some((_, n)) => *n += 1,
                None => freed.push((*pod, 1)),
            }
        }
        Claims {
            prefilling: self.prefilling.iter().map(|(a, n)| (*a, *n)).collect(),
            freed,
        }
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
        let mut l = PickLedger::with_freed_hint(FREED_HINT);
        for p in [1, 2, 1] {
            l.dispatched(t0, PICK_FENCE);
            l.picked(pod(p));
        }
        assert_eq!(l.claims(t0).prefilling, vec![(pod(1), 2), (pod(2), 1)]);
        l.prefill_done(pod(1), t0);
        l.prefill_done(pod(2), t0);
        l.prefill_done(pod(3), t0);
        let c = l.claims(t0);
        assert_eq!(c.prefilling, vec![(pod(1), 1)]);
        assert_eq!((c.prefilling_on(pod(1)), c.prefilling_on(pod(2))), (1, 0));
        // Ends the ledger saw ride along for a while; pod 3 was never picked here.
        assert_eq!(c.freed, vec![(pod(1), 1), (pod(2), 1)]);
        l.prefill_done(pod(1), t0 + FREED_HINT);
        let c = l.claims(t0 + FREED_HINT);
        assert_eq!((c.freed_on(pod(1)), c.freed_on(pod(2))), (2, 1));
        let later = t0 + FREED_HINT + Duration::from_millis(1);
        assert_eq!(
            l.claims(later).freed,
            vec![(pod(1), 1)],
            "older ends dropped"
        );
        assert!(l.claims(later + FREED_HINT).freed.is_empty());
        // Without the hint (a per-node queue) ends are not passed on.
        let mut l = PickLedger::default();
        l.dispatched(t0, PICK_FENCE);
        l.picked(pod(1));
        l.prefill_done(pod(1), t0);
        assert!(l.claims(t0).is_empty());
    }
}
