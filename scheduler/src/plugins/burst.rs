//! `burst-prefix-cache-producer`: a batch window that places prompt-sharing requests
//! together.
//!
//! Sans-IO: the caller offers requests with the current time, asks when the window is
//! due, and hands the sealed batch with the live replicas to [`assign`]. No clock, no
//! task, no IO here; the node owns the timer and the waiting requests.
//!
//! Semantics follow llm-d's `burstprefix` producer: requests with an identical prefix form
//! a group; a group of two or more is always placed as a unit, a lone request only when
//! `minColocateBlocks > 0` and it shares that many leading blocks with another request in
//! the batch. Groups go first, then such singletons, longest prefix first within each
//! tier. A unit fills one replica up to `maxPerReplica` before spilling to the next
//! least-loaded one; its first replica prefers one already holding a unit sharing at least
//! `minColocateBlocks` leading blocks, as long as that replica is under its fair share of
//! the batch. Requests that overlap nothing get no assignment (other scorers decide).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::config::params::{BalanceBy, BurstPrefixParams};
use crate::prefix::BlockHash;

/// Why a request was not taken into the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BurstError {
    /// The open window already holds `maxBatchSize` requests (llm-d's producer errors
    /// and the request goes on without burst affinity).
    #[error("burst prefix batch full: maxBatchSize {0} reached")]
    BatchFull(usize),
}

/// One request held in the window.
#[derive(Debug, Clone, PartialEq)]
pub struct Held<T> {
    /// The caller's handle for the request.
    pub ticket: T,
    /// The request's chained block hashes, cut to the configured maximum.
    pub hashes: Vec<BlockHash>,
}

/// A replica a batch can be placed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replica {
    /// The replica's address (the final tie-break, like llm-d's name order).
    pub addr: SocketAddr,
    /// Requests running there now (breaks ties between equally loaded replicas).
    pub running: u64,
}

/// The open batch window.
#[derive(Debug)]
struct Window<T> {
    opened: Instant,
    held: Vec<Held<T>>,
}

/// The window state of one `burst-prefix-cache-producer`.
#[derive(Debug)]
pub struct BurstWindow<T> {
    window: Duration,
    max_blocks: usize,
    batch_cap: Option<usize>,
    open: Option<Window<T>>,
}

impl<T: PartialEq> BurstWindow<T> {
    /// An empty window for these (validated) parameters.
    pub fn new(params: &BurstPrefixParams) -> Self {
        BurstWindow {
            window: params.window(),
            max_blocks: params.max_blocks(),
            batch_cap: params.batch_cap(),
            open: None,
        }
    }

    /// Takes a request into the window, opening one at `now` if none is open.
    pub fn offer(
        &mut self,
        ticket: T,
        mut hashes: Vec<BlockHash>,
        now: Instant,
    ) -> Result<(), BurstError> {
        let w = self.open.get_or_insert_with(|| Window {
            opened: now,
            held: Vec::new(),
        });
        if let Some(cap) = self.batch_cap
            && w.held.len() >= cap
        {
            return Err(BurstError::BatchFull(cap));
        }
        hashes.truncate(self.max_blocks);
        w.held.push(Held { ticket, hashes });
        Ok(())
    }

    /// When the open window closes, if one is open.
    pub fn deadline(&self) -> Option<Instant> {
        self.open.as_ref().map(|w| w.opened + self.window)
    }

    /// Requests held now.
    pub fn len(&self) -> usize {
        self.open.as_ref().map_or(0, |w| w.held.len())
    }

    /// Whether no request is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops a held request whose client went away, so it takes no place in the batch.
    pub fn withdraw(&mut self, ticket: &T) -> bool {
        let Some(w) = self.open.as_mut() else {
            return false;
        };
        let before = w.held.len();
        w.held.retain(|h| &h.ticket != ticket);
        before != w.held.len()
    }

    /// Seals and returns the batch once its window has run out at `now`; the next offer
    /// opens a fresh window.
    pub fn due(&mut self, now: Instant) -> Option<Vec<Held<T>>> {
        let deadline = self.deadline()?;
        if now < deadline {
            return None;
        }
        self.open.take().map(|w| w.held)
    }
}

/// Places a sealed batch: for each held request (same order), the index of its replica in
/// `replicas`, or `None` when it gets no burst affinity.
pub fn assign<T>(
    held: &[Held<T>],
    replicas: &[Replica],
    params: &BurstPrefixParams,
) -> Vec<Option<usize>> {
    let mut out = vec![None; held.len()];
    if replicas.is_empty() {
        return out;
    }
    let cap = params.per_replica_cap();
    let min_colocate = usize::try_from(params.min_colocate_blocks).unwrap_or(0);
    let by_tokens = params.balance_by == BalanceBy::Tokens;

    // Groups of identical prefixes, in first-arrival order; prefix-less requests never
    // group (they have nothing to share).
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut by_key: HashMap<&[BlockHash], usize> = HashMap::new();
    for (i, h) in held.iter().enumerate() {
        if h.hashes.is_empty() {
            continue;
        }
        let g = *by_key.entry(h.hashes.as_slice()).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[g].push(i);
    }

    // A lone request is placeable only when it shares `min_colocate` leading blocks with
    // another request; the chained hash of block `min_colocate` stands for that prefix.
    let mut sharing: HashMap<BlockHash, usize> = HashMap::new();
    if min_colocate > 0 {
        for g in &groups {
            let hashes = &held[g[0]].hashes;
            if hashes.len() >= min_colocate {
                *sharing.entry(hashes[min_colocate - 1]).or_default() += g.len();
            }
        }
    }
    let shares = |g: &Vec<usize>| {
        let hashes = &held[g[0]].hashes;
        min_colocate > 0
            && hashes.len() >= min_colocate
            && sharing.get(&hashes[min_colocate - 1]).copied().unwrap_or(0) >= 2
    };
    let (mut multi, mut single): (Vec<usize>, Vec<usize>) = (Vec::new(), Vec::new());
    for (gi, g) in groups.iter().enumerate() {
        if g.len() >= 2 {
            multi.push(gi);
        } else if shares(g) {
            single.push(gi);
        }
    }
    let blocks = |gi: usize| held[groups[gi][0]].hashes.len();
    // Longest prefix first, so shorter units match against the most placed blocks.
    multi.sort_by_key(|&gi| std::cmp::Reverse(blocks(gi)));
    single.sort_by_key(|&gi| std::cmp::Reverse(blocks(gi)));

    let total: usize = multi
        .iter()
        .chain(&single)
        .map(|&gi| {
            if by_tokens {
                blocks(gi)
            } else {
                groups[gi].len()
            }
        })
        .sum();
    let mut placer = Placer {
        replicas,
        cap,
        min_colocate,
        by_tokens,
        fair_share: total.div_ceil(replicas.len()),
        load: vec![0; replicas.len()],
        holders: HashMap::new(),
    };
    for gi in multi.into_iter().chain(single) {
        let hashes = &held[groups[gi][0]].hashes;
        let targets = placer.place(hashes, groups[gi].len());
        for (&req, r) in groups[gi].iter().zip(targets) {
            out[req] = Some(r);
        }
    }
    out
}

/// Placement state while a batch is assigned.
struct Placer<'a> {
    replicas: &'a [Replica],
    cap: Option<usize>,
    min_colocate: usize,
    by_tokens: bool,
    /// ceil(batch total / replicas): past it, prefix preference would unbalance the batch.
    fair_share: usize,
    /// Per replica, in the balancing unit (requests or blocks).
    load: Vec<usize>,
    /// Which replicas hold each block placed in this batch.
    holders: HashMap<BlockHash, HashSet<usize>>,
}

impl Placer<'_> {
    /// Per replica, how many leading blocks of `hashes` it already holds in this batch.
    fn matched(&self, hashes: &[BlockHash]) -> Vec<usize> {
        let mut m = vec![0; self.replicas.len()];
        for h in hashes {
            // A whole prefix is recorded at once, so holding block i means holding 0..i:
            // stopping at the first unheld block gives each replica's contiguous match.
            let Some(hs) = self.holders.get(h).filter(|s| !s.is_empty()) else {
                break;
            };
            for &r in hs {
                m[r] += 1;
            }
        }
        m
    }

    /// Whether replica `a` is a better target than `b`: lower batch load, then fewer
    /// running requests, then lower address.
    fn better(&self, a: usize, b: usize) -> bool {
        let (ra, rb) = (&self.replicas[a], &self.replicas[b]);
        (self.load[a], ra.running, ra.addr) < (self.load[b], rb.running, rb.addr)
    }

    fn under_cap(&self, on: &[usize], r: usize) -> bool {
        self.cap.is_none_or(|k| on[r] < k)
    }

    /// The least-loaded replica with room for this unit, else the least-loaded overall.
    fn least_loaded(&self, on: &[usize]) -> usize {
        let pick = |room: bool| {
            (0..self.replicas.len())
                .filter(|&r| !room || self.under_cap(on, r))
                .reduce(|best, r| if self.better(r, best) { r } else { best })
        };
        pick(true).or_else(|| pick(false)).unwrap_or(0)
    }

    /// The replica sharing the longest prefix (>= min_colocate) with room and under its
    /// fair share.
    fn best_match(&self, on: &[usize], matched: &[usize]) -> Option<usize> {
        (0..self.replicas.len())
            .filter(|&r| {
                self.under_cap(on, r)
                    && self.load[r] < self.fair_share
                    && matched[r] >= self.min_colocate
            })
            .reduce(|best, r| {
                let longer = matched[r] > matched[best];
                let tie = matched[r] == matched[best] && self.better(r, best);
                if longer || tie { r } else { best }
            })
    }

    /// Places `members` requests of one unit; returns one replica per member, in order.
    fn place(&mut self, hashes: &[BlockHash], members: usize) -> Vec<usize> {
        let mut prefer = self.min_colocate > 0;
        let matched = if prefer || self.by_tokens {
            self.matched(hashes)
        } else {
            vec![0; self.replicas.len()]
        };
        let mut on = vec![0usize; self.replicas.len()];
        let mut out = Vec::with_capacity(members);
        while out.len() < members {
            let target = prefer
                .then(|| self.best_match(&on, &matched))
                .flatten()
                .unwrap_or_else(|| self.least_loaded(&on));
            let left = members - out.len();
            // Past k on every replica, place one at a time and rebalance (llm-d's overflow).
            let run = match self.cap {
                Some(k) => left.min(k.saturating_sub(on[target]).max(1)),
                None => left,
            };
            let first_touch = on[target] == 0;
            on[target] += run;
            if !self.by_tokens {
                self.load[target] += run;
            } else if first_touch {
                // A replica prefills the prefix once; blocks it already holds are free.
                self.load[target] += hashes.len().saturating_sub(matched[target]);
            }
            out.extend(std::iter::repeat_n(target, run));
            // Only the first replica of a unit gets the prefix preference.
            prefer = false;
        }
        for (r, &n) in on.iter().enumerate() {
            if n > 0 {
                for &h in hashes {
                    self.holders.entry(h).or_default().insert(r);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> BurstPrefixParams {
        BurstPrefixParams::default()
    }

    fn replicas(n: usize) -> Vec<Replica> {
        (0..n)
            .map(|i| Replica {
                addr: SocketAddr::from(([10, 0, 0, i as u8 + 1], 8000)),
                running: 0,
            })
            .collect()
    }

    /// Chained-looking hashes: a shared `stem` of `shared` blocks, then `own` blocks
    /// distinct to `tag`.
    fn prompt(stem: u64, shared: usize, tag: u64, own: usize) -> Vec<BlockHash> {
        let mut v: Vec<BlockHash> = (0..shared as u64).map(|i| stem * 1_000 + i).collect();
        v.extend((0..own as u64).map(|i| tag * 1_000_000 + i));
        v
    }

    fn held(prompts: &[Vec<BlockHash>]) -> Vec<Held<usize>> {
        prompts
            .iter()
            .enumerate()
            .map(|(i, h)| Held {
                ticket: i,
                hashes: h.clone(),
            })
            .collect()
    }

    #[test]
    fn identical_prompts_in_one_window_land_together() {
        let p = params();
        let group = prompt(1, 8, 0, 0);
        let batch = held(&vec![group; 6]);
        let out = assign(&batch, &replicas(3), &p);
        assert!(out.iter().all(|r| *r == out[0] && r.is_some()), "{out:?}");
    }

    #[test]
    fn max_per_replica_spills_a_group_to_the_next_replica() {
        let p = BurstPrefixParams {
            max_per_replica: 2,
            ..params()
        };
        let batch = held(&vec![prompt(1, 8, 0, 0); 5]);
        let out = assign(&batch, &replicas(3), &p);
        let mut per = [0; 3];
        for r in out.iter().flatten() {
            per[*r] += 1;
        }
        per.sort_unstable();
        assert_eq!(per, [1, 2, 2], "filled to k=2, then spilled: {out:?}");
        // The first two arrivals fill one replica before the next is touched.
        assert_eq!(out[0], out[1]);
        assert_ne!(out[1], out[2]);
    }

    #[test]
    fn two_groups_are_balanced_by_requests() {
        let p = params();
        let mut prompts = vec![prompt(1, 4, 0, 0); 3];
        prompts.extend(vec![prompt(2, 4, 0, 0); 3]);
        let out = assign(&held(&prompts), &replicas(2), &p);
        assert!(out[..3].iter().all(|r| *r == out[0]));
        assert!(out[3..].iter().all(|r| *r == out[3]));
        assert_ne!(
            out[0], out[3],
            "the second group goes to the emptier replica"
        );
    }

    #[test]
    fn unrelated_lone_requests_get_no_affinity() {
        let p = BurstPrefixParams {
            min_colocate_blocks: 2,
            ..params()
        };
        let prompts = vec![prompt(1, 4, 0, 0), prompt(2, 4, 0, 0), vec![]];
        let out = assign(&held(&prompts), &replicas(2), &p);
        assert_eq!(out, vec![None, None, None]);
    }

    #[test]
    fn min_colocate_blocks_is_the_threshold_for_different_prompts() {
        // Two prompts sharing 4 leading blocks, then differing, beside an unrelated pair
        // (so the fair share, ceil(4 requests / 2 replicas) = 2, leaves room to co-locate).
        let mut prompts = vec![prompt(1, 4, 7, 2), prompt(1, 4, 8, 2)];
        prompts.extend(vec![prompt(9, 3, 0, 0); 2]);
        let off = assign(&held(&prompts), &replicas(2), &params());
        assert_eq!(
            &off[..2],
            [None, None],
            "minColocateBlocks 0: only identical groups"
        );
        assert!(off[2].is_some() && off[2] == off[3]);

        let at = BurstPrefixParams {
            min_colocate_blocks: 4,
            ..params()
        };
        let on = assign(&held(&prompts), &replicas(2), &at);
        assert!(
            on[0].is_some() && on[0] == on[1],
            "4 shared blocks >= 4: {on:?}"
        );
        assert_ne!(on[0], on[2], "and beside, not on, the unrelated pair");

        let above = BurstPrefixParams {
            min_colocate_blocks: 5,
            ..params()
        };
        let out = assign(&held(&prompts), &replicas(2), &above);
        assert_eq!(&out[..2], [None, None], "4 shared blocks < 5");
    }

    #[test]
    fn prefix_preference_stops_at_the_fair_share() {
        // Two lone prompts sharing a prefix, over 2 replicas: the fair share is one
        // request each, so the second does not stack on the first.
        let p = BurstPrefixParams {
            min_colocate_blocks: 4,
            ..params()
        };
        let prompts = vec![prompt(1, 4, 7, 2), prompt(1, 4, 8, 2)];
        let out = assign(&held(&prompts), &replicas(2), &p);
        assert!(
            out[0].is_some() && out[1].is_some() && out[0] != out[1],
            "{out:?}"
        );
    }

    #[test]
    fn prefix_sharing_groups_colocate_within_fair_share() {
        // Families x and y; each has two distinct groups of two sharing 6 leading blocks.
        let p = BurstPrefixParams {
            min_colocate_blocks: 4,
            ..params()
        };
        let mut prompts = Vec::new();
        for (stem, tag) in [(1, 11), (1, 12), (2, 21), (2, 22)] {
            prompts.extend(vec![prompt(stem, 6, tag, 2); 2]);
        }
        let out = assign(&held(&prompts), &replicas(2), &p);
        assert_eq!(out[0], out[2], "x groups co-locate: {out:?}");
        assert_eq!(out[4], out[6], "y groups co-locate: {out:?}");
        assert_ne!(out[0], out[4], "families spread, 4 requests each");
    }

    #[test]
    fn balance_by_tokens_spreads_long_prefixes() {
        // One long group (2 requests, 40 blocks) and three short groups (2 requests, 2
        // blocks each) over 2 replicas.
        let mut prompts = vec![prompt(1, 40, 0, 0); 2];
        for stem in 2..5 {
            prompts.extend(vec![prompt(stem, 2, 0, 0); 2]);
        }
        let by_req = assign(&held(&prompts), &replicas(2), &params());
        let by_tok = assign(
            &held(&prompts),
            &replicas(2),
            &BurstPrefixParams {
                balance_by: BalanceBy::Tokens,
                ..params()
            },
        );
        let long = by_tok[0];
        assert!(
            by_tok[2..].iter().all(|r| *r != long),
            "by tokens the short groups all avoid the 40-block replica: {by_tok:?}"
        );
        let with_long = by_req[2..].iter().filter(|r| **r == by_req[0]).count();
        assert_eq!(
            with_long, 2,
            "by requests one short group joins it: {by_req:?}"
        );
    }

    #[test]
    fn running_requests_break_ties() {
        let mut rs = replicas(2);
        rs[0].running = 5;
        let batch = held(&vec![prompt(1, 3, 0, 0); 2]);
        assert_eq!(assign(&batch, &rs, &params()), vec![Some(1), Some(1)]);
    }

    #[test]
    fn window_holds_until_due_and_a_lone_request_waits_no_longer() {
        let mut w: BurstWindow<u32> = BurstWindow::new(&params());
        let t0 = Instant::now();
        assert_eq!(w.deadline(), None);
        w.offer(1, prompt(1, 2, 0, 0), t0).unwrap();
        assert_eq!(w.deadline(), Some(t0 + Duration::from_millis(100)));
        assert!(w.due(t0 + Duration::from_millis(99)).is_none());
        // A later arrival joins the same window; it does not extend it.
        w.offer(2, prompt(1, 2, 0, 0), t0 + Duration::from_millis(90))
            .unwrap();
        assert_eq!(w.deadline(), Some(t0 + Duration::from_millis(100)));
        let batch = w.due(t0 + Duration::from_millis(100)).unwrap();
        assert_eq!(batch.iter().map(|h| h.ticket).collect::<Vec<_>>(), [1, 2]);
        assert!(w.is_empty() && w.deadline().is_none());
        // The next arrival opens a fresh window from its own arrival.
        let t1 = t0 + Duration::from_millis(150);
        w.offer(3, vec![], t1).unwrap();
        assert_eq!(w.deadline(), Some(t1 + Duration::from_millis(100)));
        assert_eq!(w.due(t1 + Duration::from_millis(100)).unwrap().len(), 1);
    }

    #[test]
    fn max_batch_size_refuses_past_the_cap() {
        let mut w: BurstWindow<u32> = BurstWindow::new(&BurstPrefixParams {
            max_batch_size: 2,
            ..params()
        });
        let t0 = Instant::now();
        w.offer(1, vec![1], t0).unwrap();
        w.offer(2, vec![1], t0).unwrap();
        assert_eq!(w.offer(3, vec![1], t0), Err(BurstError::BatchFull(2)));
        assert_eq!(w.len(), 2);
        // A freed place can be taken again.
        assert!(w.withdraw(&1));
        w.offer(4, vec![1], t0).unwrap();
    }

    #[test]
    fn withdrawn_request_leaves_the_batch() {
        let mut w: BurstWindow<u32> = BurstWindow::new(&params());
        let t0 = Instant::now();
        w.offer(1, vec![1], t0).unwrap();
        w.offer(2, vec![1], t0).unwrap();
        assert!(w.withdraw(&1));
        assert!(!w.withdraw(&1));
        let batch = w.due(t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].ticket, 2);
    }

    #[test]
    fn hashes_are_cut_to_max_prefix_tokens() {
        let mut w: BurstWindow<u32> = BurstWindow::new(&BurstPrefixParams {
            max_prefix_tokens_to_match: 128,
            ..params()
        });
        let t0 = Instant::now();
        w.offer(1, prompt(1, 2, 5, 3), t0).unwrap();
        w.offer(2, prompt(1, 2, 6, 3), t0).unwrap();
        let batch = w.due(t0 + Duration::from_secs(1)).unwrap();
        assert_eq!(batch[0].hashes.len(), 2);
        // Cut to the 2 shared blocks, the two differing prompts form one group.
        let out = assign(&batch, &replicas(2), &params());
        assert!(out[0].is_some() && out[0] == out[1]);
    }
}
