//! Rendezvous (highest-random-weight) hashing over the live member set.
//!
//! Every node that sees the same set of live node ids derives the same owners for a key,
//! whatever order it learned them in. Removing a node only moves the keys it owned; adding
//! one only moves keys to it. No virtual nodes are needed: each key scores every node.

use std::fmt;

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use xxhash_rust::xxh64::xxh64;

/// A mesh node's stable name (e.g. `node-1`); the ring hashes this, not addresses.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId(pub String);

impl NodeId {
    /// Builds a node id from anything string-like.
    pub fn new(name: impl Into<String>) -> NodeId {
        NodeId(name.into())
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Owners of one key, best first (inline for the usual R ≤ 4).
pub type Owners<'a> = SmallVec<[&'a NodeId; 4]>;

/// Hashes a string key (a pod name) into the ring's key space.
pub fn key_of_str(key: &str) -> u64 {
    xxh64(key.as_bytes(), 0x696e_6665_726d_6573)
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct RingNode {
    id: NodeId,
    seed: u64,
}

/// The live member set, ready to answer "who owns key K".
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ring {
    // Sorted by id so that ties (astronomically rare) break the same way everywhere.
    nodes: Vec<RingNode>,
}

impl Ring {
    /// Builds a ring from live node ids in any order; duplicates are ignored.
    pub fn new<I: IntoIterator<Item = NodeId>>(ids: I) -> Ring {
        let mut nodes: Vec<RingNode> = ids
            .into_iter()
            .map(|id| RingNode {
                seed: xxh64(id.0.as_bytes(), 0),
                id,
            })
            .collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        nodes.dedup_by(|a, b| a.id == b.id);
        Ring { nodes }
    }

    /// Number of live nodes on the ring.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True when no node is live.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Whether `id` is on the ring.
    pub fn contains(&self, id: &NodeId) -> bool {
        self.nodes.binary_search_by(|n| n.id.cmp(id)).is_ok()
    }

    /// The live node ids in sorted order.
    pub fn nodes(&self) -> impl ExactSizeIterator<Item = &NodeId> {
        self.nodes.iter().map(|n| &n.id)
    }

    /// The single owner of `key` (the highest-scoring node), if any node is live.
    pub fn owner(&self, key: u64) -> Option<&NodeId> {
        let mut best: Option<(u64, &NodeId)> = None;
        for n in &self.nodes {
            let s = score(n.seed, key);
            // Strictly greater: on a tie the earlier (smaller) id wins, everywhere alike.
            if best.is_none_or(|(b, _)| s > b) {
                best = Some((s, &n.id));
            }
        }
        best.map(|(_, id)| id)
    }

    /// The top `r` owners of `key`, best first (fewer when fewer nodes are live).
    pub fn owners(&self, key: u64, r: usize) -> Owners<'_> {
        let r = r.min(self.nodes.len());
        let mut top: SmallVec<[(u64, usize); 4]> = SmallVec::new();
        if r == 0 {
            return SmallVec::new();
        }
        for (i, n) in self.nodes.iter().enumerate() {
            let s = score(n.seed, key);
            if top.len() == r && s <= top[r - 1].0 {
                continue;
            }
            // Insertion into a tiny sorted array (descending score, then ascending index).
            let pos = top.iter().position(|&(ts, _)| s > ts).unwrap_or(top.len());
            top.insert(pos, (s, i));
            top.truncate(r);
        }
        top.into_iter().map(|(_, i)| &self.nodes[i].id).collect()
    }

    /// Whether `id` is among the top `r` owners of `key`.
    pub fn is_owner(&self, id: &NodeId, key: u64, r: usize) -> bool {
        self.owners(key, r).contains(&id)
    }
}

/// Per-(node, key) weight: a 64-bit mix of the node's seed and the key.
fn score(seed: u64, key: u64) -> u64 {
    // xxh64 over the key bytes seeded by the node gives independent, well-spread weights.
    xxh64(&key.to_le_bytes(), seed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ids(n: usize) -> Vec<NodeId> {
        (0..n).map(|i| NodeId::new(format!("node-{i}"))).collect()
    }

    #[test]
    fn empty_ring_has_no_owner() {
        let ring = Ring::new(Vec::new());
        assert!(ring.owner(42).is_none());
        assert!(ring.owners(42, 2).is_empty());
    }

    #[test]
    fn owners_are_distinct_and_start_with_owner() {
        let ring = Ring::new(ids(5));
        for key in 0..1000u64 {
            let o = ring.owners(key, 3);
            assert_eq!(o.len(), 3);
            assert_eq!(Some(o[0]), ring.owner(key));
            assert_ne!(o[0], o[1]);
            assert_ne!(o[1], o[2]);
            assert_ne!(o[0], o[2]);
        }
        assert_eq!(ring.owners(7, 9).len(), 5);
    }

    #[test]
    fn balance_within_bounds() {
        for n in [2usize, 3, 5, 8] {
            let ring = Ring::new(ids(n));
            let mut counts = vec![0usize; n];
            let keys = 20_000u64;
            for k in 0..keys {
                let owner = ring.owner(k.wrapping_mul(0x9E37_79B9_7F4A_7C15)).unwrap();
                let idx: usize = owner.0["node-".len()..].parse().unwrap();
                counts[idx] += 1;
            }
            let mean = keys as f64 / n as f64;
            for c in counts {
                let dev = (c as f64 - mean).abs() / mean;
                assert!(
                    dev < 0.10,
                    "n={n}: count {c} deviates {dev:.3} from mean {mean}"
                );
            }
        }
    }

    proptest! {
        #[test]
        fn order_of_members_does_not_matter(perm in Just(ids(6)).prop_shuffle(), key: u64, r in 1usize..4) {
            let a = Ring::new(ids(6));
            let b = Ring::new(perm);
            prop_assert_eq!(a.owners(key, r), b.owners(key, r));
        }

        #[test]
        fn removing_a_node_only_moves_its_keys(removed in 0usize..6, keys in proptest::collection::vec(any::<u64>(), 1..200)) {
            let all = ids(6);
            let full = Ring::new(all.clone());
            let gone = all[removed].clone();
            let less = Ring::new(all.into_iter().filter(|id| *id != gone));
            for k in keys {
                let before = full.owner(k).unwrap();
                let after = less.owner(k).unwrap();
                if *before != gone {
                    prop_assert_eq!(before, after);
                }
                // Replica sets: survivors keep their place; only the removed one is replaced.
                let b2: Vec<_> = full.owners(k, 2).into_iter().filter(|id| **id != gone).cloned().collect();
                let a2: Vec<_> = less.owners(k, 2).into_iter().cloned().collect();
                prop_assert!(b2.iter().all(|id| a2.contains(id)));
            }
        }

        #[test]
        fn adding_a_node_only_moves_keys_to_it(keys in proptest::collection::vec(any::<u64>(), 1..200)) {
            let small = Ring::new(ids(4));
            let big = Ring::new(ids(5));
            let newcomer = NodeId::new("node-4");
            for k in keys {
                let after = big.owner(k).unwrap();
                if *after != newcomer {
                    prop_assert_eq!(small.owner(k).unwrap(), after);
                }
            }
        }
    }
}
