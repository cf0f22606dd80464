//! The approximate prefix index: block hash → endpoints, with a per-endpoint LRU.
//!
//! Layout (why it is shaped like this):
//! - The hash → endpoints map is split into shards by hash bits, each behind its own
//!   `RwLock`, so lookups on the request path only ever take one shard's read lock at a
//!   time and run concurrently with writers of other shards. There is no global lock.
//! - Each endpoint's LRU is an intrusive doubly linked list in a slab (`Vec<Node>`), under
//!   that endpoint's own mutex; the map stores, for each (hash, endpoint), the slab index of
//!   its node, so touching an entry needs no second map. An entry shared by a single
//!   endpoint is stored inline in the map value (16 bytes + 1 control byte per bucket);
//!   only hashes held by several endpoints spill into an overflow slab whose lists keep
//!   up to three endpoints inline (no allocation per shared block).
//! - Lock order is endpoint LRU → one shard at a time; readers take shard locks only.
//!   The endpoint table (address ↔ id) is an immutable snapshot swapped on the rare
//!   endpoint registration or removal, so lookups read it without any lock.
//!
//! Eviction from an endpoint's LRU removes that endpoint from the hash's entry (llm-d
//! semantics); the entry disappears when no endpoint holds it.

use std::hash::{BuildHasherDefault, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use hashbrown::HashMap;
use parking_lot::{Mutex, RwLock};
use smallvec::{SmallVec, smallvec};

/// A chained xxh64 block hash.
pub type BlockHash = u64;

const NIL: u32 = u32::MAX;
/// Marks a map value whose `node` field indexes the shard's overflow vector.
const MANY: u32 = u32::MAX;

/// Block hashes are already uniformly distributed: hash them by identity.
#[derive(Default, Clone, Copy)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type IdBuild = BuildHasherDefault<IdentityHasher>;

/// Endpoints of a block held by more than one endpoint.
type Holders = SmallVec<[Slot; 3]>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Slot {
    endpoint: u32,
    node: u32,
}

#[derive(Default)]
struct Shard {
    map: HashMap<BlockHash, Slot, IdBuild>,
    overflow: Vec<Holders>,
    free_overflow: Vec<u32>,
}

impl Shard {
    fn for_each(&self, hash: BlockHash, mut f: impl FnMut(u32)) -> bool {
        match self.map.get(&hash) {
            None => false,
            Some(s) if s.endpoint == MANY => {
                for slot in &self.overflow[s.node as usize] {
                    f(slot.endpoint);
                }
                true
            }
            Some(s) => {
                f(s.endpoint);
                true
            }
        }
    }

    fn find_node(&self, hash: BlockHash, endpoint: u32) -> Option<u32> {
        let s = self.map.get(&hash)?;
        if s.endpoint == MANY {
            self.overflow[s.node as usize]
                .iter()
                .find(|x| x.endpoint == endpoint)
                .map(|x| x.node)
        } else if s.endpoint == endpoint {
            Some(s.node)
        } else {
            None
        }
    }

    fn insert(&mut self, hash: BlockHash, endpoint: u32, node: u32) {
        let new = Slot { endpoint, node };
        match self.map.get_mut(&hash) {
            None => {
                self.map.insert(hash, new);
            }
            Some(s) if s.endpoint == MANY => self.overflow[s.node as usize].push(new),
            Some(s) => {
                let list: Holders = smallvec![*s, new];
                let idx = match self.free_overflow.pop() {
                    Some(i) => {
                        self.overflow[i as usize] = list;
                        i
                    }
                    None => {
                        self.overflow.push(list);
                        (self.overflow.len() - 1) as u32
                    }
                };
                *s = Slot {
                    endpoint: MANY,
                    node: idx,
                };
            }
        }
    }

    fn remove(&mut self, hash: BlockHash, endpoint: u32) {
        let Some(s) = self.map.get_mut(&hash) else {
            return;
        };
        if s.endpoint == MANY {
            let idx = s.node as usize;
            let list = &mut self.overflow[idx];
            list.retain(|x| x.endpoint != endpoint);
            if list.len() == 1 {
                *s = list[0];
                self.overflow[idx] = Holders::new();
                self.free_overflow.push(idx as u32);
            }
        } else if s.endpoint == endpoint {
            self.map.remove(&hash);
        }
    }

    fn memory_bytes(&self) -> usize {
        self.map.allocation_size()
            + self.overflow.capacity() * std::mem::size_of::<Holders>()
            + self
                .overflow
                .iter()
                .filter(|v| v.spilled())
                .map(|v| v.capacity() * std::mem::size_of::<Slot>())
                .sum::<usize>()
            + self.free_overflow.capacity() * 4
    }

    fn entries(&self) -> usize {
        self.map
            .values()
            .map(|s| {
                if s.endpoint == MANY {
                    self.overflow[s.node as usize].len()
                } else {
                    1
                }
            })
            .sum()
    }
}

#[derive(Clone, Copy)]
struct Node {
    hash: BlockHash,
    prev: u32,
    next: u32,
}

struct EndpointLru {
    id: u32,
    capacity: usize,
    nodes: Vec<Node>,
    free: Vec<u32>,
    /// Most recently used.
    head: u32,
    /// Least recently used: evicted first.
    tail: u32,
    len: usize,
    /// Set when the endpoint was removed; a racing writer must not add entries.
    dead: bool,
}

impl EndpointLru {
    fn new(id: u32, capacity: usize) -> Self {
        EndpointLru {
            id,
            capacity,
            nodes: Vec::new(),
            free: Vec::new(),
            head: NIL,
            tail: NIL,
            len: 0,
            dead: false,
        }
    }

    fn unlink(&mut self, n: u32) {
        let Node { prev, next, .. } = self.nodes[n as usize];
        if prev == NIL {
            self.head = next;
        } else {
            self.nodes[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.nodes[next as usize].prev = prev;
        }
    }

    fn push_front(&mut self, n: u32) {
        self.nodes[n as usize].prev = NIL;
        self.nodes[n as usize].next = self.head;
        if self.head != NIL {
            self.nodes[self.head as usize].prev = n;
        }
        self.head = n;
        if self.tail == NIL {
            self.tail = n;
        }
    }

    fn alloc(&mut self, hash: BlockHash) -> u32 {
        let node = Node {
            hash,
            prev: NIL,
            next: NIL,
        };
        if let Some(n) = self.free.pop() {
            self.nodes[n as usize] = node;
            return n;
        }
        if self.nodes.len() == self.nodes.capacity() {
            // Grow by doubling but never beyond the LRU capacity, so a full LRU wastes nothing.
            let target = (self.nodes.len() * 2).clamp(16, self.capacity.max(16));
            self.nodes
                .reserve_exact(target.saturating_sub(self.nodes.len()).max(1));
        }
        self.nodes.push(node);
        (self.nodes.len() - 1) as u32
    }

    fn memory_bytes(&self) -> usize {
        self.nodes.capacity() * std::mem::size_of::<Node>() + self.free.capacity() * 4
    }
}

#[derive(Default, Clone)]
struct EndpointTable {
    by_addr: HashMap<SocketAddr, u32>,
    slots: Vec<Option<(SocketAddr, Arc<Mutex<EndpointLru>>)>>,
    free_ids: Vec<u32>,
}

/// Sizing of a [`PrefixIndex`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefixIndexConfig {
    /// Number of shards (rounded up to a power of two).
    pub shards: usize,
}

impl Default for PrefixIndexConfig {
    fn default() -> Self {
        PrefixIndexConfig { shards: 64 }
    }
}

/// How many leading blocks each endpoint matched.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PrefixMatches {
    /// (endpoint, matched blocks), in no particular order.
    pub entries: Vec<(SocketAddr, u32)>,
}

impl PrefixMatches {
    /// Matched blocks for `addr` (0 when it matched nothing).
    pub fn get(&self, addr: SocketAddr) -> u32 {
        self.entries
            .iter()
            .find(|(a, _)| *a == addr)
            .map_or(0, |(_, c)| *c)
    }
}

/// The chain's anchor: its first block hash (used to pick the owners of a prefix).
pub fn anchor(hashes: &[BlockHash]) -> Option<BlockHash> {
    hashes.first().copied()
}

/// Sharded hash → endpoints index with a per-endpoint LRU (llm-d's approximate indexer).
pub struct PrefixIndex {
    shards: Box<[RwLock<Shard>]>,
    shard_shift: u32,
    endpoints: ArcSwap<EndpointTable>,
    /// Serialises table updates (copy, modify, swap).
    table_writer: Mutex<()>,
}

impl Default for PrefixIndex {
    fn default() -> Self {
        Self::new(PrefixIndexConfig::default())
    }
}

impl std::fmt::Debug for PrefixIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixIndex")
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

impl PrefixIndex {
    /// An empty index.
    pub fn new(cfg: PrefixIndexConfig) -> Self {
        let n = cfg.shards.clamp(1, 1 << 16).next_power_of_two();
        let shards = (0..n).map(|_| RwLock::new(Shard::default())).collect();
        // Shard by bits 32.. of the hash; hashbrown uses the low bits for buckets and the
        // top 7 for tags, so those stay evenly spread inside each shard.
        PrefixIndex {
            shards,
            shard_shift: n.trailing_zeros(),
            endpoints: ArcSwap::from_pointee(EndpointTable::default()),
            table_writer: Mutex::new(()),
        }
    }

    /// The shard a block hash lives in.
    pub fn shard_of(&self, hash: BlockHash) -> usize {
        if self.shard_shift == 0 {
            0
        } else {
            ((hash >> 32) as usize) & ((1usize << self.shard_shift) - 1)
        }
    }

    fn shard(&self, hash: BlockHash) -> &RwLock<Shard> {
        &self.shards[self.shard_of(hash)]
    }

    /// Copies the endpoint table, applies `f`, and publishes the copy.
    fn update_table<R>(&self, f: impl FnOnce(&mut EndpointTable) -> R) -> R {
        let _writer = self.table_writer.lock();
        let mut t = EndpointTable::clone(&self.endpoints.load());
        let r = f(&mut t);
        self.endpoints.store(Arc::new(t));
        r
    }

    fn lru_for(&self, addr: SocketAddr, capacity: usize) -> Arc<Mutex<EndpointLru>> {
        let existing = |t: &EndpointTable| {
            t.by_addr
                .get(&addr)
                .and_then(|id| t.slots[*id as usize].as_ref())
                .map(|(_, l)| Arc::clone(l))
        };
        if let Some(lru) = existing(&self.endpoints.load()) {
            return lru;
        }
        self.update_table(|t| {
            if let Some(lru) = existing(t) {
                return lru;
            }
            let id = match t.free_ids.pop() {
                Some(id) => id,
                None => {
                    t.slots.push(None);
                    (t.slots.len() - 1) as u32
                }
            };
            let lru = Arc::new(Mutex::new(EndpointLru::new(id, capacity)));
            t.slots[id as usize] = Some((addr, Arc::clone(&lru)));
            t.by_addr.insert(addr, id);
            lru
        })
    }

    /// Records that `addr` now caches the chain `hashes` (most recent last), with an LRU of
    /// `capacity` blocks; evicts the endpoint's least recently used blocks beyond it.
    pub fn record(&self, addr: SocketAddr, capacity: usize, hashes: &[BlockHash]) {
        if hashes.is_empty() {
            return;
        }
        let capacity = capacity.max(1);
        let lru = self.lru_for(addr, capacity);
        let mut lru = lru.lock();
        if lru.dead {
            return;
        }
        if lru.capacity != capacity {
            lru.capacity = capacity;
            while lru.len > capacity {
                self.evict_tail(&mut lru);
            }
        }
        let id = lru.id;
        for &h in hashes {
            let found = self.shard(h).read().find_node(h, id);
            match found {
                Some(n) => {
                    lru.unlink(n);
                    lru.push_front(n);
                }
                None => {
                    if lru.len >= lru.capacity {
                        self.evict_tail(&mut lru);
                    }
                    let n = lru.alloc(h);
                    lru.push_front(n);
                    lru.len += 1;
                    self.shard(h).write().insert(h, id, n);
                }
            }
        }
    }

    fn evict_tail(&self, lru: &mut EndpointLru) {
        let t = lru.tail;
        if t == NIL {
            return;
        }
        let h = lru.nodes[t as usize].hash;
        lru.unlink(t);
        lru.free.push(t);
        lru.len -= 1;
        self.shard(h).write().remove(h, lru.id);
    }

    /// Drops everything the index holds for `addr` (it left the pool).
    pub fn remove_endpoint(&self, addr: SocketAddr) {
        let taken = self.update_table(|t| match t.by_addr.remove(&addr) {
            Some(id) => t.slots[id as usize].take().map(|(_, l)| (id, l)),
            None => None,
        });
        let Some((id, lru)) = taken else {
            return;
        };
        {
            let mut l = lru.lock();
            l.dead = true;
            let mut n = l.head;
            while n != NIL {
                let node = l.nodes[n as usize];
                self.shard(node.hash).write().remove(node.hash, id);
                n = node.next;
            }
            l.nodes = Vec::new();
            l.free = Vec::new();
            l.head = NIL;
            l.tail = NIL;
            l.len = 0;
        }
        // Only now may the id be reused: no shard entry refers to it any more.
        self.update_table(|t| t.free_ids.push(id));
    }

    /// Longest-prefix match (llm-d `matchLongestPrefix`): walks the chain in order, credits
    /// every endpoint holding each block, and stops at the first block nobody holds.
    pub fn match_prefix(&self, hashes: &[BlockHash]) -> PrefixMatches {
        let mut out = PrefixMatches::default();
        self.match_prefix_into(hashes, &mut out);
        out
    }

    /// [`Self::match_prefix`] into a caller-owned buffer (cleared first).
    pub fn match_prefix_into(&self, hashes: &[BlockHash], out: &mut PrefixMatches) {
        out.entries.clear();
        // (endpoint id, count), sorted by id.
        let mut counts: Vec<(u32, u32)> = Vec::new();
        for &h in hashes {
            let shard = self.shard(h).read();
            let any = shard.for_each(h, |id| {
                match counts.binary_search_by_key(&id, |(i, _)| *i) {
                    Ok(pos) => counts[pos].1 += 1,
                    Err(pos) => counts.insert(pos, (id, 1)),
                }
            });
            if !any {
                break;
            }
        }
        if counts.is_empty() {
            return;
        }
        let t = self.endpoints.load();
        for (id, c) in counts {
            if let Some(Some((addr, _))) = t.slots.get(id as usize) {
                out.entries.push((*addr, c));
            }
        }
    }

    /// Whether `addr` currently holds block `hash`.
    pub fn contains(&self, addr: SocketAddr, hash: BlockHash) -> bool {
        let id = match self.endpoints.load().by_addr.get(&addr) {
            Some(id) => *id,
            None => return false,
        };
        self.shard(hash).read().find_node(hash, id).is_some()
    }

    /// Number of blocks held for `addr`.
    pub fn endpoint_len(&self, addr: SocketAddr) -> usize {
        let lru = {
            let t = self.endpoints.load();
            match t
                .by_addr
                .get(&addr)
                .and_then(|id| t.slots[*id as usize].as_ref())
            {
                Some((_, l)) => Arc::clone(l),
                None => return 0,
            }
        };
        lru.lock().len
    }

    /// Endpoints the index knows.
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        self.endpoints.load().by_addr.keys().copied().collect()
    }

    /// Total (block, endpoint) entries.
    pub fn entries(&self) -> usize {
        self.shards.iter().map(|s| s.read().entries()).sum()
    }

    /// Distinct block hashes held by at least one endpoint.
    pub fn distinct_blocks(&self) -> usize {
        self.shards.iter().map(|s| s.read().map.len()).sum()
    }

    /// Heap bytes held by the index structures (tables, overflow lists, LRU slabs).
    pub fn memory_bytes(&self) -> usize {
        let shards: usize = self.shards.iter().map(|s| s.read().memory_bytes()).sum();
        let t = self.endpoints.load();
        let lrus: usize = t
            .slots
            .iter()
            .flatten()
            .map(|(_, l)| l.lock().memory_bytes() + std::mem::size_of::<EndpointLru>())
            .sum();
        shards
            + lrus
            + t.by_addr.allocation_size()
            + t.slots.capacity() * std::mem::size_of::<Option<(SocketAddr, Arc<()>)>>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u16) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, 1], 8000 + i))
    }

    #[test]
    fn match_counts_leading_blocks_and_stops_at_first_miss() {
        let idx = PrefixIndex::default();
        idx.record(addr(1), 100, &[1, 2, 3]);
        idx.record(addr(2), 100, &[1, 2]);
        let m = idx.match_prefix(&[1, 2, 3, 4]);
        assert_eq!(m.get(addr(1)), 3);
        assert_eq!(m.get(addr(2)), 2);
        let m = idx.match_prefix(&[9, 1, 2]);
        assert!(m.entries.is_empty());
    }

    #[test]
    fn lru_evicts_oldest_and_removes_endpoint_from_hash() {
        let idx = PrefixIndex::default();
        idx.record(addr(1), 3, &[1, 2, 3]);
        idx.record(addr(2), 3, &[1]);
        idx.record(addr(1), 3, &[1]); // touch 1: LRU order now 2,3,1
        idx.record(addr(1), 3, &[4]); // evicts 2
        assert!(!idx.contains(addr(1), 2));
        assert!(idx.contains(addr(1), 1));
        assert!(idx.contains(addr(1), 3));
        assert!(idx.contains(addr(1), 4));
        assert_eq!(idx.endpoint_len(addr(1)), 3);
        // Hash 1 is still held by both endpoints.
        assert_eq!(idx.match_prefix(&[1]).entries.len(), 2);
        idx.record(addr(1), 3, &[5, 6, 7]);
        assert!(!idx.contains(addr(1), 1));
        assert!(idx.contains(addr(2), 1));
        assert_eq!(idx.entries(), 4);
    }

    #[test]
    fn capacity_shrink_evicts() {
        let idx = PrefixIndex::default();
        idx.record(addr(1), 10, &[1, 2, 3, 4, 5]);
        idx.record(addr(1), 2, &[6]);
        assert_eq!(idx.endpoint_len(addr(1)), 2);
        assert!(idx.contains(addr(1), 5));
        assert!(idx.contains(addr(1), 6));
    }

    #[test]
    fn remove_endpoint_drops_its_entries_and_reuses_the_id_safely() {
        let idx = PrefixIndex::default();
        idx.record(addr(1), 10, &[1, 2]);
        idx.record(addr(2), 10, &[1, 2]);
        idx.remove_endpoint(addr(1));
        assert_eq!(idx.match_prefix(&[1, 2]).entries, vec![(addr(2), 2)]);
        idx.record(addr(3), 10, &[7]);
        assert!(!idx.contains(addr(3), 1));
        assert_eq!(idx.entries(), 3);
        idx.remove_endpoint(addr(2));
        idx.remove_endpoint(addr(3));
        assert_eq!(idx.entries(), 0);
        assert_eq!(idx.distinct_blocks(), 0);
    }

    #[test]
    fn anchor_is_first_hash() {
        assert_eq!(anchor(&[5, 6]), Some(5));
        assert_eq!(anchor(&[]), None);
    }

    #[test]
    fn concurrent_readers_and_writers() {
        let idx = Arc::new(PrefixIndex::default());
        let chain: Vec<u64> = (0..200u64)
            .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
            .collect();
        std::thread::scope(|s| {
            for w in 0..4u16 {
                let idx = Arc::clone(&idx);
                let chain = chain.clone();
                s.spawn(move || {
                    for _ in 0..50 {
                        idx.record(addr(w), 150, &chain);
                    }
                });
            }
            for _ in 0..4 {
                let idx = Arc::clone(&idx);
                let chain = chain.clone();
                s.spawn(move || {
                    for _ in 0..50 {
                        let m = idx.match_prefix(&chain);
                        assert!(m.entries.iter().all(|(_, c)| *c as usize <= chain.len()));
                    }
                });
            }
        });
        for w in 0..4u16 {
            assert_eq!(idx.endpoint_len(addr(w)), 150);
        }
        assert_eq!(idx.entries(), 600);
    }
}
