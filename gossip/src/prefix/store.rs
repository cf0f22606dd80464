//! The owner-side prefix index contract and a built-in anchor-partitioned implementation.
//!
//! An owner only ever answers for anchors it owns, so the index is partitioned by anchor:
//! a lookup touches one anchor's entry, and a handoff ships one anchor's entry whole. The
//! node can plug in another index (e.g. the scheduler's) through [`PrefixStore`].

use std::collections::{BTreeMap, HashMap, HashSet};

use smallvec::SmallVec;

use crate::pod::PodId;
use crate::wire::{EndpointMatch, HandoffChain, HandoffEntry, PrefixMatch};

/// What the mesh needs from an owner-side prefix index.
pub trait PrefixStore: Send {
    /// Matches a chain (anchor first): llm-d semantics, walk blocks in order, every endpoint
    /// holding a block gets +1, stop at the first block nobody holds.
    fn match_chain(&mut self, anchor: u64, hashes: &[u64]) -> PrefixMatch;
    /// Records that `endpoint` was picked for this chain (it now holds these blocks).
    fn record(&mut self, anchor: u64, hashes: &[u64], endpoint: &str);
    /// Records that `endpoint` no longer holds these blocks of `anchor`'s chain (a KV
    /// event said so); a block nobody holds any more is dropped.
    fn remove(&mut self, anchor: u64, hashes: &[u64], endpoint: &str);
    /// Drops `endpoint` from every block under every anchor (its cache was cleared, it
    /// restarted, or its events were lost).
    fn forget_endpoint(&mut self, endpoint: &str);
    /// Anchors currently held.
    fn anchors(&self) -> Vec<u64>;
    /// Everything held under `anchor`, as chains that `record` can replay.
    fn export_anchor(&self, anchor: u64) -> Option<HandoffEntry>;
    /// Forgets an anchor (after handing it to its new owners).
    fn remove_anchor(&mut self, anchor: u64);
    /// Block entries held (for metrics and tests).
    fn len_blocks(&self) -> usize;
    /// Heap bytes the index holds (tables, endpoint lists, LRU), from its own counters.
    fn memory_bytes(&self) -> usize;
}

/// Heap bytes of a hash table with `capacity` usable slots of `slot` bytes each: hashbrown
/// allocates the next power of two ≥ capacity × 8/7 buckets, plus one control byte per bucket.
fn table_bytes(capacity: usize, slot: usize) -> usize {
    if capacity == 0 {
        return 0;
    }
    let buckets = (capacity * 8 / 7).next_power_of_two();
    buckets * (slot + 1)
}

#[derive(Debug)]
struct Block {
    parent: Option<u64>,
    endpoints: SmallVec<[u32; 4]>,
}

#[derive(Debug)]
struct AnchorEntry {
    last_used: u64,
    blocks: HashMap<u64, Block>,
}

/// Built-in index: per anchor, block hash → (parent, endpoints); LRU eviction of whole anchors.
#[derive(Debug)]
pub struct AnchoredIndex {
    capacity_blocks: usize,
    endpoints: Vec<PodId>,
    endpoint_ids: HashMap<String, u32>,
    anchors: HashMap<u64, AnchorEntry>,
    lru: BTreeMap<u64, u64>,
    tick: u64,
    blocks: usize,
}

impl AnchoredIndex {
    /// An index holding at most `capacity_blocks` block entries (oldest anchors evicted first).
    pub fn new(capacity_blocks: usize) -> AnchoredIndex {
        AnchoredIndex {
            capacity_blocks: capacity_blocks.max(1),
            endpoints: Vec::new(),
            endpoint_ids: HashMap::new(),
            anchors: HashMap::new(),
            lru: BTreeMap::new(),
            tick: 0,
            blocks: 0,
        }
    }

    fn endpoint_id(&mut self, endpoint: &str) -> u32 {
        if let Some(&id) = self.endpoint_ids.get(endpoint) {
            return id;
        }
        let id = self.endpoints.len() as u32;
        self.endpoints.push(PodId::new(endpoint));
        self.endpoint_ids.insert(endpoint.to_owned(), id);
        id
    }

    fn touch(&mut self, anchor: u64) {
        if let Some(e) = self.anchors.get_mut(&anchor) {
            self.lru.remove(&e.last_used);
            self.tick += 1;
            e.last_used = self.tick;
            self.lru.insert(self.tick, anchor);
        }
    }

    fn evict_to_capacity(&mut self, keep: u64) {
        while self.blocks > self.capacity_blocks {
            let Some((&tick, &victim)) = self.lru.iter().find(|(_, a)| **a != keep) else {
                return;
            };
            self.lru.remove(&tick);
            if let Some(e) = self.anchors.remove(&victim) {
                self.blocks -= e.blocks.len();
            }
        }
    }
}

impl PrefixStore for AnchoredIndex {
    fn match_chain(&mut self, anchor: u64, hashes: &[u64]) -> PrefixMatch {
        let total_blocks = u32::try_from(hashes.len()).unwrap_or(u32::MAX);
        let mut counts: SmallVec<[(u32, u32); 8]> = SmallVec::new();
        if let Some(entry) = self.anchors.get(&anchor) {
            for h in hashes {
                let Some(block) = entry.blocks.get(h) else {
                    break;
                };
                if block.endpoints.is_empty() {
                    break;
                }
                for &ep in &block.endpoints {
                    match counts.iter_mut().find(|(e, _)| *e == ep) {
                        Some(c) => c.1 += 1,
                        None => counts.push((ep, 1)),
                    }
                }
            }
            self.touch(anchor);
        }
        PrefixMatch {
            total_blocks,
            endpoints: counts
                .into_iter()
                .map(|(ep, blocks)| EndpointMatch {
                    endpoint: self.endpoints[ep as usize].clone(),
                    blocks,
                })
                .collect(),
        }
    }

    fn record(&mut self, anchor: u64, hashes: &[u64], endpoint: &str) {
        if hashes.is_empty() {
            return;
        }
        let ep = self.endpoint_id(endpoint);
        let tick = self.tick + 1;
        let entry = self.anchors.entry(anchor).or_insert_with(|| AnchorEntry {
            last_used: tick,
            blocks: HashMap::new(),
        });
        let mut added = 0;
        let mut parent = None;
        for &h in hashes {
            let block = entry.blocks.entry(h).or_insert_with(|| {
                added += 1;
                Block {
                    parent,
                    endpoints: SmallVec::new(),
                }
            });
            if !block.endpoints.contains(&ep) {
                block.endpoints.push(ep);
            }
            parent = Some(h);
        }
        self.blocks += added;
        self.lru.remove(&entry.last_used);
        self.tick = tick;
        entry.last_used = tick;
        self.lru.insert(tick, anchor);
        self.evict_to_capacity(anchor);
    }

    fn remove(&mut self, anchor: u64, hashes: &[u64], endpoint: &str) {
        let Some(&ep) = self.endpoint_ids.get(endpoint) else {
            return;
        };
        let Some(entry) = self.anchors.get_mut(&anchor) else {
            return;
        };
        let mut dropped = 0;
        for h in hashes {
            if let Some(block) = entry.blocks.get_mut(h) {
                block.endpoints.retain(|e| *e != ep);
                if block.endpoints.is_empty() {
                    // A child's parent link may now dangle; lookups stop at a missing block
                    // exactly as at an unheld one, and export stops there too.
                    entry.blocks.remove(h);
                    dropped += 1;
                }
            }
        }
        let emptied = entry.blocks.is_empty();
        self.blocks -= dropped;
        if emptied {
            self.remove_anchor(anchor);
        }
    }

    fn forget_endpoint(&mut self, endpoint: &str) {
        let Some(&ep) = self.endpoint_ids.get(endpoint) else {
            return;
        };
        let mut emptied = Vec::new();
        for (&anchor, entry) in self.anchors.iter_mut() {
            let before = entry.blocks.len();
            entry.blocks.retain(|_, b| {
                b.endpoints.retain(|e| *e != ep);
                !b.endpoints.is_empty()
            });
            self.blocks -= before - entry.blocks.len();
            if entry.blocks.is_empty() {
                emptied.push(anchor);
            }
        }
        for anchor in emptied {
            self.remove_anchor(anchor);
        }
    }

    fn anchors(&self) -> Vec<u64> {
        self.anchors.keys().copied().collect()
    }

    fn export_anchor(&self, anchor: u64) -> Option<HandoffEntry> {
        let entry = self.anchors.get(&anchor)?;
        // Per endpoint, the maximal blocks (no child held by the same endpoint) end the chains.
        let mut held: HashMap<u32, (HashSet<u64>, HashSet<u64>)> = HashMap::new();
        for (&h, b) in &entry.blocks {
            for &ep in &b.endpoints {
                let (blocks, parents) = held.entry(ep).or_default();
                blocks.insert(h);
                if let Some(p) = b.parent {
                    parents.insert(p);
                }
            }
        }
        let mut chains = Vec::new();
        for (ep, (blocks, parents)) in held {
            for &tip in blocks.difference(&parents) {
                let mut chain = vec![tip];
                let mut cur = tip;
                // Only ancestors this endpoint holds: after a KV-event removal an endpoint
                // can hold a block without its parent, and replaying the chain must not
                // give it the parent back.
                while let Some(p) = entry.blocks.get(&cur).and_then(|b| b.parent) {
                    if !blocks.contains(&p) {
                        break;
                    }
                    chain.push(p);
                    cur = p;
                }
                chain.reverse();
                chains.push(HandoffChain {
                    endpoint: self.endpoints[ep as usize].clone(),
                    hashes: chain,
                });
            }
        }
        chains.sort_by(|a, b| (&a.endpoint, &a.hashes).cmp(&(&b.endpoint, &b.hashes)));
        Some(HandoffEntry { anchor, chains })
    }

    fn remove_anchor(&mut self, anchor: u64) {
        if let Some(e) = self.anchors.remove(&anchor) {
            self.lru.remove(&e.last_used);
            self.blocks -= e.blocks.len();
        }
    }

    fn len_blocks(&self) -> usize {
        self.blocks
    }

    fn memory_bytes(&self) -> usize {
        let per_anchor: usize = self
            .anchors
            .values()
            .map(|e| {
                let spilled: usize = e
                    .blocks
                    .values()
                    .filter(|b| b.endpoints.spilled())
                    .map(|b| b.endpoints.capacity() * std::mem::size_of::<u32>())
                    .sum();
                table_bytes(e.blocks.capacity(), std::mem::size_of::<(u64, Block)>()) + spilled
            })
            .sum();
        // A BTreeMap leaf holds up to 11 (key, value) pairs; count whole nodes.
        let lru = self.lru.len().div_ceil(11) * (11 * 16 + 16);
        let names: usize = self.endpoints.iter().map(|n| n.as_str().len() * 2).sum();
        per_anchor
            + table_bytes(
                self.anchors.capacity(),
                std::mem::size_of::<(u64, AnchorEntry)>(),
            )
            + lru
            + names
            + table_bytes(
                self.endpoint_ids.capacity(),
                std::mem::size_of::<(String, u32)>(),
            )
            + self.endpoints.capacity() * std::mem::size_of::<PodId>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_grows_with_blocks_and_falls_when_anchors_go() {
        let mut ix = AnchoredIndex::new(1_000_000);
        let empty = ix.memory_bytes();
        for a in 0..50u64 {
            let chain: Vec<u64> = (0..100).map(|i| a * 1000 + i).collect();
            ix.record(a, &chain, "10.0.0.1:8000");
        }
        let full = ix.memory_bytes();
        // 5,000 blocks of at least a hash, a parent and an endpoint list each.
        assert!(full > empty + 5_000 * 40, "{empty} -> {full}");
        for a in 0..50u64 {
            ix.remove_anchor(a);
        }
        assert!(ix.memory_bytes() < full / 10, "{}", ix.memory_bytes());
    }

    #[test]
    fn longest_prefix_match_per_endpoint() {
        let mut ix = AnchoredIndex::new(1000);
        ix.record(1, &[1, 2, 3, 4], "a");
        ix.record(1, &[1, 2, 9], "b");
        let m = ix.match_chain(1, &[1, 2, 3, 5]);
        assert_eq!(m.total_blocks, 4);
        assert_eq!(m.blocks_for("a"), 3);
        assert_eq!(m.blocks_for("b"), 2);
        assert_eq!(ix.match_chain(1, &[1, 2, 9]).blocks_for("b"), 3);
        assert_eq!(
            ix.match_chain(2, &[2, 3]),
            PrefixMatch {
                total_blocks: 2,
                endpoints: vec![]
            }
        );
        assert_eq!(ix.len_blocks(), 5);
    }

    #[test]
    fn export_then_replay_reproduces_matches() {
        let mut ix = AnchoredIndex::new(1000);
        ix.record(1, &[1, 2, 3, 4], "a");
        ix.record(1, &[1, 2], "a");
        ix.record(1, &[1, 2, 7], "b");
        ix.record(1, &[1, 5], "b");
        let entry = ix.export_anchor(1).unwrap();
        assert_eq!(entry.chains.len(), 3, "{entry:?}");
        let mut other = AnchoredIndex::new(1000);
        for c in &entry.chains {
            other.record(entry.anchor, &c.hashes, c.endpoint.as_str());
        }
        for q in [&[1u64, 2, 3, 4][..], &[1, 2, 7], &[1, 5, 6], &[1]] {
            let mut x = ix.match_chain(1, q);
            let mut y = other.match_chain(1, q);
            x.endpoints.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
            y.endpoints.sort_by(|a, b| a.endpoint.cmp(&b.endpoint));
            assert_eq!(x, y);
        }
        ix.remove_anchor(1);
        assert_eq!(ix.len_blocks(), 0);
        assert!(ix.export_anchor(1).is_none());
    }

    #[test]
    fn remove_drops_one_endpoint_and_empty_blocks() {
        let mut ix = AnchoredIndex::new(1000);
        ix.record(1, &[1, 2, 3], "a");
        ix.record(1, &[1, 2], "b");
        ix.remove(1, &[3], "a");
        assert_eq!(ix.len_blocks(), 2, "block 3 had only a");
        assert_eq!(ix.match_chain(1, &[1, 2, 3]).blocks_for("a"), 2);
        ix.remove(1, &[2], "a");
        let m = ix.match_chain(1, &[1, 2]);
        assert_eq!((m.blocks_for("a"), m.blocks_for("b")), (1, 2));
        // Unknown endpoint, anchor or block: nothing changes.
        ix.remove(1, &[1], "zz");
        ix.remove(9, &[1], "a");
        ix.remove(1, &[77], "a");
        assert_eq!(ix.len_blocks(), 2);
        ix.remove(1, &[1, 2], "b");
        ix.remove(1, &[1], "a");
        assert_eq!(ix.len_blocks(), 0);
        assert!(ix.anchors().is_empty(), "an emptied anchor goes");
        assert!(ix.lru.is_empty());
    }

    #[test]
    fn forget_endpoint_clears_it_everywhere() {
        let mut ix = AnchoredIndex::new(1000);
        ix.record(1, &[1, 2], "a");
        ix.record(1, &[1], "b");
        ix.record(5, &[5, 6], "a");
        ix.forget_endpoint("a");
        assert_eq!(ix.len_blocks(), 1);
        assert_eq!(ix.anchors(), vec![1]);
        assert_eq!(ix.match_chain(1, &[1, 2]).blocks_for("a"), 0);
        assert_eq!(ix.match_chain(1, &[1, 2]).blocks_for("b"), 1);
        ix.forget_endpoint("nobody");
        assert_eq!(ix.len_blocks(), 1);
        // Recording again after a forget works as new.
        ix.record(5, &[5], "a");
        assert_eq!(ix.match_chain(5, &[5, 6]).blocks_for("a"), 1);
    }

    #[test]
    fn export_after_removal_gives_no_block_back() {
        let mut ix = AnchoredIndex::new(1000);
        ix.record(1, &[1, 2, 3], "a");
        ix.record(1, &[1, 2], "b");
        // a lost its middle block but kept the tip (an engine may evict out of order).
        ix.remove(1, &[2], "a");
        let entry = ix.export_anchor(1).unwrap();
        let mut other = AnchoredIndex::new(1000);
        for c in &entry.chains {
            other.record(entry.anchor, &c.hashes, c.endpoint.as_str());
        }
        for q in [&[1u64, 2, 3][..], &[1], &[3]] {
            for ep in ["a", "b"] {
                assert_eq!(
                    ix.match_chain(1, q).blocks_for(ep),
                    other.match_chain(1, q).blocks_for(ep),
                    "{q:?} {ep}"
                );
            }
        }
        let held_a: Vec<&Vec<u64>> = entry
            .chains
            .iter()
            .filter(|c| c.endpoint.as_str() == "a")
            .map(|c| &c.hashes)
            .collect();
        assert_eq!(held_a.len(), 2, "{held_a:?}");
        assert!(held_a.iter().all(|c| !c.contains(&2)));
    }

    #[test]
    fn capacity_evicts_least_recently_used_anchor() {
        let mut ix = AnchoredIndex::new(6);
        ix.record(1, &[1, 2, 3], "a");
        ix.record(10, &[10, 11, 12], "a");
        let _ = ix.match_chain(1, &[1]); // anchor 1 is now the most recent
        ix.record(20, &[20, 21], "a");
        assert!(ix.len_blocks() <= 6);
        assert_eq!(ix.match_chain(1, &[1, 2, 3]).blocks_for("a"), 3);
        assert_eq!(ix.match_chain(10, &[10]).blocks_for("a"), 0);
        assert_eq!(ix.match_chain(20, &[20, 21]).blocks_for("a"), 2);
    }
}
