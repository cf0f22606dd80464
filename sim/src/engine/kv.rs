//! KV block pool with a prefix cache: chained block hashes → blocks, LRU over free blocks.
//!
//! Mirrors vLLM V1's `BlockPool`: a block whose reference count drops to zero goes to the
//! tail of the free queue but keeps its hash, so a later request can still hit it; an
//! allocation takes the head of the queue (never-used blocks first, then the least
//! recently freed) and evicts its hash.
//!
//! With events on ([`BlockPool::record_events`]) the pool also logs every change to its set
//! of cached hashes, as vLLM's block pool does for KV events: an eviction is a
//! [`CacheEvent::Removed`], a reset a [`CacheEvent::Cleared`]; the engine adds
//! [`CacheEvent::Stored`] for the blocks [`BlockPool::register`] newly cached, because only
//! it knows their tokens and parent.

use std::collections::HashMap;

/// Index of a KV block inside one pod.
pub type BlockId = u32;

const NIL: u32 = u32::MAX;

/// A change to the set of cached block hashes (what vLLM publishes as a KV event).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheEvent {
    /// Consecutive full blocks of one sequence gained their hashes.
    Stored {
        /// Their chained hashes, in order.
        block_hashes: Vec<u64>,
        /// Hash of the block before the first one; `None` for a sequence's first block.
        parent: Option<u64>,
        /// Their tokens, `block_size` per block.
        token_ids: Vec<u32>,
        /// LoRA adapter index of the sequence.
        lora: Option<u32>,
    },
    /// A cached hash was evicted.
    Removed {
        /// The evicted hashes.
        block_hashes: Vec<u64>,
    },
    /// Every cached hash was dropped.
    Cleared,
}

#[derive(Debug, Clone)]
struct Block {
    hash: Option<u64>,
    ref_cnt: u32,
    prev: u32,
    next: u32,
}

/// The pod's KV blocks, the hash → block map and the free queue.
#[derive(Debug)]
pub struct BlockPool {
    total: usize,
    /// Blocks touched at least once; ids ≥ `blocks.len()` are fresh and implicitly at the
    /// head of the free queue (so an idle 100-pod process does not hold every block).
    blocks: Vec<Block>,
    free_head: u32,
    free_tail: u32,
    cached: HashMap<u64, BlockId>,
    used: usize,
    evictions: u64,
    /// Cache changes not yet taken; `None` when events are off (no cost then).
    events: Option<Vec<CacheEvent>>,
}

impl BlockPool {
    /// A pool of `total` empty blocks.
    pub fn new(total: usize) -> Self {
        Self {
            total,
            blocks: Vec::new(),
            free_head: NIL,
            free_tail: NIL,
            cached: HashMap::new(),
            used: 0,
            evictions: 0,
            events: None,
        }
    }

    /// Starts logging cache changes for [`BlockPool::take_events`].
    pub fn record_events(&mut self) {
        self.events.get_or_insert_with(Vec::new);
    }

    /// Whether cache changes are logged.
    pub fn records_events(&self) -> bool {
        self.events.is_some()
    }

    /// Logs `e` if events are on.
    pub fn push_event(&mut self, e: CacheEvent) {
        if let Some(v) = &mut self.events {
            v.push(e);
        }
    }

    /// Takes the logged cache changes, oldest first.
    pub fn take_events(&mut self) -> Vec<CacheEvent> {
        self.events.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Whether changes are waiting in the log.
    pub fn has_events(&self) -> bool {
        self.events.as_ref().is_some_and(|v| !v.is_empty())
    }

    /// Every cached hash, in no particular order (read-only view for checks).
    pub fn cached_hashes(&self) -> impl Iterator<Item = u64> + '_ {
        self.cached.keys().copied()
    }

    /// Drops every cached hash (vLLM's `reset_prefix_cache`); refused, changing nothing,
    /// while any block is held by a sequence.
    pub fn reset(&mut self) -> bool {
        if self.used > 0 {
            return false;
        }
        for b in &mut self.blocks {
            b.hash = None;
        }
        self.cached.clear();
        self.push_event(CacheEvent::Cleared);
        true
    }

    /// Total number of blocks.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Blocks that can be allocated now (never used, or free but maybe still cached).
    pub fn num_free(&self) -> usize {
        self.total - self.used
    }

    /// Blocks held by at least one sequence.
    pub fn num_used(&self) -> usize {
        self.used
    }

    /// Fraction of blocks held by sequences (vLLM's `kv_cache_usage_perc`, 0–1).
    pub fn usage(&self) -> f64 {
        self.used as f64 / self.total as f64
    }

    /// Number of cached hashes evicted so far.
    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Number of blocks that currently carry a cached hash.
    pub fn cached_blocks(&self) -> usize {
        self.cached.len()
    }

    /// The block caching `hash`, if any.
    pub fn lookup(&self, hash: u64) -> Option<BlockId> {
        self.cached.get(&hash).copied()
    }

    /// Whether taking `id` would remove it from the free queue (it is cached but unused).
    pub fn is_free(&self, id: BlockId) -> bool {
        self.blocks[id as usize].ref_cnt == 0
    }

    /// Adds a reference to a cached block, taking it off the free queue if needed.
    pub fn touch(&mut self, id: BlockId) {
        if self.blocks[id as usize].ref_cnt == 0 {
            self.unlink(id);
            self.used += 1;
        }
        self.blocks[id as usize].ref_cnt += 1;
    }

    /// Takes a block off the head of the free queue, evicting its cached hash.
    pub fn allocate(&mut self) -> Option<BlockId> {
        if self.used == self.total {
            return None;
        }
        let id = if self.blocks.len() < self.total {
            self.blocks.push(Block {
                hash: None,
                ref_cnt: 0,
                prev: NIL,
                next: NIL,
            });
            (self.blocks.len() - 1) as BlockId
        } else {
            let id = self.free_head;
            debug_assert_ne!(id, NIL, "used < total implies a free block");
            self.unlink(id);
            if let Some(h) = self.blocks[id as usize].hash.take() {
                self.cached.remove(&h);
                self.evictions += 1;
                self.push_event(CacheEvent::Removed {
                    block_hashes: vec![h],
                });
            }
            id
        };
        self.blocks[id as usize].ref_cnt = 1;
        self.used += 1;
        Some(id)
    }

    /// Drops one reference; at zero the block joins the tail of the free queue.
    pub fn release(&mut self, id: BlockId) {
        let b = &mut self.blocks[id as usize];
        debug_assert!(b.ref_cnt > 0, "release of a free block");
        b.ref_cnt -= 1;
        if b.ref_cnt == 0 {
            self.used -= 1;
            self.push_tail(id);
        }
    }

    /// References held on block `id` (0 for never-used blocks).
    pub fn ref_count(&self, id: BlockId) -> u32 {
        self.blocks.get(id as usize).map_or(0, |b| b.ref_cnt)
    }

    /// Marks a full block as holding `hash`, unless it already has one or another block
    /// caches `hash`; returns whether `hash` became cached.
    pub fn register(&mut self, id: BlockId, hash: u64) -> bool {
        if self.blocks[id as usize].hash.is_some() {
            return false;
        }
        if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(hash) {
            e.insert(id);
            self.blocks[id as usize].hash = Some(hash);
            return true;
        }
        false
    }

    fn unlink(&mut self, id: BlockId) {
        let (prev, next) = {
            let b = &self.blocks[id as usize];
            (b.prev, b.next)
        };
        if prev == NIL {
            self.free_head = next;
        } else {
            self.blocks[prev as usize].next = next;
        }
        if next == NIL {
            self.free_tail = prev;
        } else {
            self.blocks[next as usize].prev = prev;
        }
        let b = &mut self.blocks[id as usize];
        b.prev = NIL;
        b.next = NIL;
    }

    fn push_tail(&mut self, id: BlockId) {
        let tail = self.free_tail;
        {
            let b = &mut self.blocks[id as usize];
            b.prev = tail;
            b.next = NIL;
        }
        if tail == NIL {
            self.free_head = id;
        } else {
            self.blocks[tail as usize].next = id;
        }
        self.free_tail = id;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_blocks_first_then_least_recently_freed() {
        let mut p = BlockPool::new(3);
        let a = p.allocate().unwrap();
        let b = p.allocate().unwrap();
        p.register(a, 11);
        p.register(b, 22);
        p.release(a);
        p.release(b);
        assert_eq!(p.num_free(), 3);
        // The never-used block goes first; cached ones survive.
        let c = p.allocate().unwrap();
        assert_eq!(c, 2);
        assert_eq!(p.lookup(11), Some(a));
        // Then the least recently freed (a) is evicted, b still cached.
        assert_eq!(p.allocate().unwrap(), a);
        assert_eq!(p.lookup(11), None);
        assert_eq!(p.lookup(22), Some(b));
        assert_eq!(p.evictions(), 1);
        // A hit takes b off the free queue: nothing left to allocate.
        p.touch(b);
        assert_eq!(p.allocate(), None);
        assert_eq!(p.usage(), 1.0);
    }

    #[test]
    fn a_touched_block_moves_to_the_lru_tail_when_freed_again() {
        let mut p = BlockPool::new(2);
        let a = p.allocate().unwrap();
        let b = p.allocate().unwrap();
        p.register(a, 1);
        p.register(b, 2);
        p.release(a);
        p.release(b);
        p.touch(a);
        p.release(a);
        // Queue is now b, a: b is evicted first.
        assert_eq!(p.allocate().unwrap(), b);
        assert_eq!(p.lookup(1), Some(a));
    }

    #[test]
    fn events_log_evictions_and_resets_only_when_on() {
        let mut p = BlockPool::new(1);
        let a = p.allocate().unwrap();
        assert!(p.register(a, 5));
        p.release(a);
        assert_eq!(p.allocate(), Some(a)); // evicts 5 with events off: nothing logged
        assert!(p.take_events().is_empty());
        p.record_events();
        assert!(p.register(a, 6));
        assert!(!p.reset(), "a held block refuses the reset");
        p.release(a);
        assert_eq!(p.allocate(), Some(a)); // evicts 6
        assert!(p.register(a, 7));
        p.release(a);
        assert!(p.reset());
        assert_eq!(p.cached_blocks(), 0);
        assert_eq!(p.lookup(7), None);
        assert_eq!(
            p.take_events(),
            vec![
                CacheEvent::Removed {
                    block_hashes: vec![6]
                },
                CacheEvent::Cleared
            ]
        );
        assert!(p.take_events().is_empty());
    }

    #[test]
    fn duplicate_hash_is_not_registered_twice() {
        let mut p = BlockPool::new(2);
        let a = p.allocate().unwrap();
        let b = p.allocate().unwrap();
        p.register(a, 7);
        p.register(b, 7);
        assert_eq!(p.lookup(7), Some(a));
        assert_eq!(p.cached_blocks(), 1);
    }
}
