//! Per-publisher sequence tracking, sans-IO: every batch applied once, in order.
//!
//! A publisher numbers its batches 0, 1, 2, … A subscriber feeds the tracker each live
//! sequence number ([`SequenceTracker::on_live`]) and each replayed one
//! ([`SequenceTracker::on_replayed`]); the verdict says whether to apply the batch, drop it
//! as already applied, or first fetch a gap from the replay socket. A live number at or
//! below the previous live one cannot come from the same publisher run (PUB never
//! resends), so it means the publisher restarted and counts from 0 again. So does a first
//! live number below a resume point: the point was learned before subscribing, so the
//! same run can only have moved past it.
//!
//! After a restart the tracker expects 0: the caller offers the batch again with
//! [`SequenceTracker::on_replayed`], which reports a gap from 0 if the subscription missed
//! the new run's first batches.

/// What to do with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Next in order: apply it.
    Apply,
    /// Already applied: drop it.
    Duplicate,
    /// Batches `from..to` (end exclusive) are missing before this one: replay them, then
    /// offer this one again with [`SequenceTracker::on_replayed`].
    Gap {
        /// First missing sequence number.
        from: u64,
        /// This batch's sequence number.
        to: u64,
    },
    /// The publisher restarted (its numbering went back): state learned from its earlier
    /// run is stale. The tracker now expects 0; offer this batch again with
    /// [`SequenceTracker::on_replayed`] (a gap from 0 means the new run's start was missed).
    Restarted,
}

/// Sequence state of one publisher.
#[derive(Debug, Clone, Default)]
pub struct SequenceTracker {
    /// Next sequence number to apply; `None` until the first batch (or a resume point).
    next: Option<u64>,
    /// Highest live sequence number seen in this publisher run.
    last_live: Option<u64>,
}

impl SequenceTracker {
    /// A tracker that takes the first batch it sees as the start.
    pub fn new() -> Self {
        Self::default()
    }

    /// A tracker that expects `next` first (a new owner resuming from what it knows), so
    /// anything later is a gap to replay.
    pub fn resume_from(next: u64) -> Self {
        Self {
            next: Some(next),
            last_live: None,
        }
    }

    /// Next sequence number to apply, if known.
    pub fn next(&self) -> Option<u64> {
        self.next
    }

    /// Classifies a live batch; on `Apply` it counts as applied.
    pub fn on_live(&mut self, seq: u64) -> Verdict {
        let went_back = match self.last_live {
            Some(l) => seq <= l,
            None => self.next.is_some_and(|n| seq < n),
        };
        if went_back {
            self.next = Some(0);
            self.last_live = Some(seq);
            return Verdict::Restarted;
        }
        self.last_live = Some(seq);
        self.order(seq)
    }

    /// Classifies a replayed batch (or a live one offered again after its gap was
    /// replayed); on `Apply` it counts as applied. A `Gap` here means the publisher's
    /// buffer no longer holds `from..to`: call [`SequenceTracker::skip_to`] to accept the loss.
    pub fn on_replayed(&mut self, seq: u64) -> Verdict {
        self.order(seq)
    }

    /// Gives up on everything before `seq` (lost for good); `seq` is next to apply.
    pub fn skip_to(&mut self, seq: u64) {
        if self.next.is_none_or(|n| n < seq) {
            self.next = Some(seq);
        }
    }

    fn order(&mut self, seq: u64) -> Verdict {
        match self.next {
            Some(n) if seq < n => Verdict::Duplicate,
            Some(n) if seq > n => Verdict::Gap { from: n, to: seq },
            _ => {
                self.next = Some(seq.saturating_add(1));
                Verdict::Apply
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn in_order_duplicate_gap_restart() {
        let mut t = SequenceTracker::new();
        assert_eq!(t.on_live(5), Verdict::Apply);
        assert_eq!(t.on_live(6), Verdict::Apply);
        assert_eq!(t.on_live(9), Verdict::Gap { from: 7, to: 9 });
        assert_eq!(t.on_replayed(7), Verdict::Apply);
        assert_eq!(t.on_replayed(8), Verdict::Apply);
        assert_eq!(t.on_replayed(9), Verdict::Apply);
        assert_eq!(t.on_replayed(9), Verdict::Duplicate);
        // Live 10 was already replayed: a duplicate, not a restart.
        assert_eq!(t.on_replayed(10), Verdict::Apply);
        assert_eq!(t.on_live(10), Verdict::Duplicate);
        assert_eq!(t.on_live(11), Verdict::Apply);
        assert_eq!(t.on_live(0), Verdict::Restarted);
        assert_eq!(t.on_replayed(0), Verdict::Apply);
        assert_eq!(t.on_live(1), Verdict::Apply);
        // A restart seen late: the new run's first batches are a gap from 0.
        assert_eq!(t.on_live(1), Verdict::Restarted);
        assert_eq!(t.on_replayed(1), Verdict::Gap { from: 0, to: 1 });
    }

    #[test]
    fn a_live_number_below_the_resume_point_is_a_new_run() {
        let mut t = SequenceTracker::resume_from(500);
        assert_eq!(t.on_live(10), Verdict::Restarted);
        assert_eq!(t.on_replayed(10), Verdict::Gap { from: 0, to: 10 });
        let mut t = SequenceTracker::resume_from(500);
        assert_eq!(t.on_live(500), Verdict::Apply);
    }

    #[test]
    fn resume_replays_from_the_known_point_and_skip_accepts_loss() {
        let mut t = SequenceTracker::resume_from(3);
        assert_eq!(t.on_live(8), Verdict::Gap { from: 3, to: 8 });
        // The buffer starts at 5: 3 and 4 are gone.
        assert_eq!(t.on_replayed(5), Verdict::Gap { from: 3, to: 5 });
        t.skip_to(5);
        assert_eq!(t.on_replayed(5), Verdict::Apply);
        assert_eq!(t.next(), Some(6));
    }

    /// A subscriber loop over a lossy live stream with a replay buffer of the last `keep`
    /// batches (replies overlap what was already applied): applies each batch once and in order, loses only what the
    /// buffer no longer had.
    fn drive(n: u64, delivered: &BTreeSet<u64>, keep: u64) -> (Vec<u64>, Vec<u64>) {
        let mut t = SequenceTracker::new();
        let mut applied = Vec::new();
        let mut lost = Vec::new();
        for seq in 0..n {
            if !delivered.contains(&seq) {
                continue;
            }
            {
                match t.on_live(seq) {
                    Verdict::Apply => applied.push(seq),
                    Verdict::Duplicate => {}
                    Verdict::Restarted => panic!("no restart in this stream"),
                    Verdict::Gap { from, to } => {
                        // The publisher buffer holds seq - keep + 1 ..= seq at this point.
                        let oldest = (seq + 1).saturating_sub(keep);
                        // Replays start a little early sometimes: overlap must be dropped.
                        for r in from.saturating_sub(seq % 2).max(oldest)..=to {
                            match t.on_replayed(r) {
                                Verdict::Apply => applied.push(r),
                                Verdict::Duplicate => {}
                                Verdict::Gap { from, to } => {
                                    lost.extend(from..to);
                                    t.skip_to(to);
                                    assert_eq!(t.on_replayed(r), Verdict::Apply);
                                    applied.push(r);
                                }
                                Verdict::Restarted => unreachable!(),
                            }
                        }
                    }
                }
            }
        }
        (applied, lost)
    }

    proptest! {
        #[test]
        fn every_batch_once_in_order(
            n in 1u64..200,
            drops in proptest::collection::btree_set(0u64..200, 0..100),
            keep in 1u64..50,
        ) {
            let delivered: BTreeSet<u64> = (0..n).filter(|s| !drops.contains(s)).collect();
            let (applied, lost) = drive(n, &delivered, keep);
            // Applied is strictly increasing: nothing twice, nothing out of order.
            prop_assert!(applied.windows(2).all(|w| w[0] < w[1]));
            // Nothing lost is applied, and together they cover everything up to the last
            // delivered batch (the stream start is the first delivered one).
            if let (Some(&first), Some(&last)) = (delivered.first(), delivered.last()) {
                let mut all: Vec<u64> = applied.iter().chain(&lost).copied().collect();
                all.sort_unstable();
                prop_assert_eq!(all, (first..=last).collect::<Vec<_>>());
            }
            // With a buffer longer than the stream nothing is lost.
            if keep >= n {
                prop_assert!(lost.is_empty());
            }
        }
    }
}
