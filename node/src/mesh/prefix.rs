//! Prefix state owned by the anchors' owners ([`MeshPrefixOwners`], the mesh's
//! implementation of the request path's [`PrefixOwners`]): a lookup asks the anchor's
//! owner (locally when this node owns it, else over QUIC within the mesh's budget), and a
//! pick is recorded at the owners (applied here when this node is one, batched to the
//! others). The scheduler's own index is not used, so each node holds about R/N of the
//! fleet's prefix state.
//!
//! A record reaches a remote owner up to one flush interval plus a round trip after the
//! pick. A node that asks again for the same chain inside that window would get an answer
//! without its own pick, so it keeps its recent picks for anchors it does not own in a
//! small bounded cache ([`RecentPicks`]) and merges them into the owner's answer.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use infermesh_gossip::wire::PrefixMatch;
use infermesh_gossip::{Mesh, PodId};
use infermesh_scheduler::PrefixMatches;
use parking_lot::Mutex;
use smallvec::SmallVec;

use crate::request::{PrefixAnswer, PrefixLookup, PrefixOwners};

/// Lock shards of the recent-picks cache (by anchor), so concurrent requests rarely contend.
const RECENT_SHARDS: usize = 16;

/// The mesh as the request path's prefix owners.
#[derive(Debug)]
pub struct MeshPrefixOwners {
    // Weak: open client connections must not keep a stopped node's mesh alive.
    mesh: Weak<Mesh>,
    recent: RecentPicks,
    /// Precise `speculativeIndexing` entries (each with its own TTL).
    speculative: RecentPicks,
}

impl MeshPrefixOwners {
    /// Owners over `mesh`. The recent-picks cache keeps a pick for 10 record-flush
    /// intervals (at least 50 ms): a record is applied at a remote owner after at most one
    /// flush interval plus a round trip, so an answer older than that already holds it.
    pub fn new(mesh: &Arc<Mesh>) -> MeshPrefixOwners {
        let flush = mesh.config().prefix.record_flush_interval;
        MeshPrefixOwners {
            mesh: Arc::downgrade(mesh),
            recent: RecentPicks::new((flush * 10).max(Duration::from_millis(50)), 4096),
            speculative: RecentPicks::new(Duration::from_secs(2), 4096),
        }
    }

    /// The recent-picks cache's size now.
    pub fn recent_memory(&self) -> (usize, usize) {
        self.recent.memory()
    }
}

impl PrefixOwners for MeshPrefixOwners {
    fn lookup(&self, anchor: u64, hashes: &[u64]) -> PrefixLookup {
        let now = Instant::now();
        let mut recent = self.recent.matches(anchor, hashes, now);
        for (e, n) in self.speculative.matches(anchor, hashes, now) {
            match recent.iter_mut().find(|(a, _)| *a == e) {
                Some((_, b)) => *b = (*b).max(n),
                None => recent.push((e, n)),
            }
        }
        let Some(mesh) = self.mesh.upgrade() else {
            return Box::pin(std::future::ready(PrefixAnswer::Unavailable));
        };
        let hashes = hashes.to_vec();
        Box::pin(async move {
            match mesh.prefix_lookup(anchor, &hashes).await {
                Some(found) => PrefixAnswer::Matched(merge(&found, recent)),
                None if recent.is_empty() => PrefixAnswer::Unavailable,
                None => PrefixAnswer::Matched(PrefixMatches { entries: recent }),
            }
        })
    }

    fn record(&self, anchor: u64, hashes: &[u64], endpoints: &[SocketAddr]) {
        let Some(mesh) = self.mesh.upgrade() else {
            return;
        };
        let mut owner = false;
        for e in endpoints {
            owner |= mesh.prefix_record(anchor, hashes.to_vec(), PodId::from(*e));
        }
        if !owner && !endpoints.is_empty() {
            self.recent
                .insert(anchor, hashes, endpoints, Instant::now());
        }
    }

    fn speculate(&self, anchor: u64, hashes: &[u64], endpoints: &[SocketAddr], ttl: Duration) {
        self.speculative
            .insert_for(anchor, hashes, endpoints, Instant::now(), ttl);
    }
}

/// The owner's answer with this node's recent picks folded in (per endpoint, the longer
/// match wins). Endpoints are named `ip:port` on the wire; others are ignored.
fn merge(found: &PrefixMatch, recent: Vec<(SocketAddr, u32)>) -> PrefixMatches {
    let mut entries = recent;
    for m in &found.endpoints {
        let Some(addr) = m.endpoint.addr() else {
            continue;
        };
        match entries.iter_mut().find(|(a, _)| *a == addr) {
            Some((_, blocks)) => *blocks = (*blocks).max(m.blocks),
            None => entries.push((addr, m.blocks)),
        }
    }
    PrefixMatches { entries }
}

#[derive(Debug)]
struct Pick {
    expires: Instant,
    hashes: Arc<[u64]>,
    endpoints: SmallVec<[SocketAddr; 2]>,
}

#[derive(Debug, Default)]
struct RecentShard {
    by_anchor: HashMap<u64, SmallVec<[Pick; 2]>>,
    order: VecDeque<(Instant, u64)>,
    picks: usize,
    hash_words: usize,
}

impl RecentShard {
    /// Drops picks from the front (oldest first) while they have expired or the shard is
    /// over `cap`. A pick with a longer TTL ahead of a shorter one holds it back here;
    /// [`RecentPicks::matches`] skips expired picks wherever they are.
    fn expire(&mut self, now: Instant, cap: usize) {
        while let Some(&(expires, anchor)) = self.order.front() {
            if now < expires && self.picks <= cap {
                break;
            }
            self.order.pop_front();
            if let Some(list) = self.by_anchor.get_mut(&anchor)
                && let Some(i) = list.iter().position(|p| p.expires == expires)
            {
                let p = list.remove(i);
                self.picks -= 1;
                self.hash_words -= p.hashes.len();
                if list.is_empty() {
                    self.by_anchor.remove(&anchor);
                }
            }
        }
    }
}

/// This node's picks for anchors it does not own, kept until the owners surely have them.
#[derive(Debug)]
pub struct RecentPicks {
    shards: Box<[Mutex<RecentShard>]>,
    ttl: Duration,
    per_shard: usize,
}

impl RecentPicks {
    /// A cache keeping picks for `ttl`, at most `capacity` of them.
    pub fn new(ttl: Duration, capacity: usize) -> RecentPicks {
        RecentPicks {
            shards: (0..RECENT_SHARDS)
                .map(|_| Mutex::new(RecentShard::default()))
                .collect(),
            ttl,
            per_shard: capacity.div_ceil(RECENT_SHARDS).max(1),
        }
    }

    fn shard(&self, anchor: u64) -> &Mutex<RecentShard> {
        &self.shards[(anchor ^ (anchor >> 32)) as usize % RECENT_SHARDS]
    }

    /// Remembers that `endpoints` were picked for the chain `hashes` at `now`.
    pub fn insert(&self, anchor: u64, hashes: &[u64], endpoints: &[SocketAddr], now: Instant) {
        self.insert_for(anchor, hashes, endpoints, now, self.ttl);
    }

    /// [`Self::insert`] kept for `ttl` instead of the cache's own TTL.
    pub fn insert_for(
        &self,
        anchor: u64,
        hashes: &[u64],
        endpoints: &[SocketAddr],
        now: Instant,
        ttl: Duration,
    ) {
        let expires = now + ttl;
        let mut s = self.shard(anchor).lock();
        s.by_anchor.entry(anchor).or_default().push(Pick {
            expires,
            hashes: hashes.into(),
            endpoints: endpoints.iter().copied().collect(),
        });
        s.order.push_back((expires, anchor));
        s.picks += 1;
        s.hash_words += hashes.len();
        s.expire(now, self.per_shard);
    }

    /// Leading blocks of `hashes` each endpoint got from a pick still in the cache.
    pub fn matches(&self, anchor: u64, hashes: &[u64], now: Instant) -> Vec<(SocketAddr, u32)> {
        let mut s = self.shard(anchor).lock();
        s.expire(now, self.per_shard);
        let mut out: Vec<(SocketAddr, u32)> = Vec::new();
        let Some(list) = s.by_anchor.get(&anchor) else {
            return out;
        };
        for p in list.iter().filter(|p| now < p.expires) {
            let n = hashes
                .iter()
                .zip(p.hashes.iter())
                .take_while(|(a, b)| a == b)
                .count();
            let n = u32::try_from(n).unwrap_or(u32::MAX);
            for &e in &p.endpoints {
                match out.iter_mut().find(|(a, _)| *a == e) {
                    Some((_, b)) => *b = (*b).max(n),
                    None => out.push((e, n)),
                }
            }
        }
        out.retain(|(_, n)| *n > 0);
        out
    }

    /// (picks held, heap bytes) — the cache's own counters.
    pub fn memory(&self) -> (usize, usize) {
        let mut picks = 0;
        let mut bytes = 0;
        for s in self.shards.iter() {
            let s = s.lock();
            picks += s.picks;
            bytes += s.hash_words * std::mem::size_of::<u64>()
                + s.picks * std::mem::size_of::<Pick>()
                + s.order.capacity() * std::mem::size_of::<(Instant, u64)>()
                + s.by_anchor.capacity() * std::mem::size_of::<(u64, SmallVec<[Pick; 2]>)>();
        }
        (picks, bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 8000))
    }

    #[test]
    fn recent_picks_match_leading_blocks_and_expire() {
        let cache = RecentPicks::new(Duration::from_millis(50), 64);
        let t0 = Instant::now();
        cache.insert(1, &[1, 2, 3, 4], &[addr(1)], t0);
        cache.insert(1, &[1, 2, 9], &[addr(2)], t0);
        let mut m = cache.matches(1, &[1, 2, 3, 5], t0);
        m.sort();
        assert_eq!(m, vec![(addr(1), 3), (addr(2), 2)]);
        assert!(cache.matches(2, &[1, 2], t0).is_empty(), "other anchor");
        assert_eq!(cache.memory().0, 2);
        let later = t0 + Duration::from_millis(51);
        assert!(cache.matches(1, &[1, 2, 3], later).is_empty(), "expired");
        assert_eq!(cache.memory().0, 0);
    }

    #[test]
    fn recent_picks_stay_bounded() {
        let cache = RecentPicks::new(Duration::from_secs(3600), 32);
        let t0 = Instant::now();
        for a in 0..10_000u64 {
            cache.insert(a, &[a, a + 1], &[addr(1)], t0);
        }
        let (picks, _) = cache.memory();
        assert!(picks <= 32 + RECENT_SHARDS, "{picks}");
        assert_eq!(
            cache.matches(9_999, &[9_999, 10_000], t0),
            vec![(addr(1), 2)]
        );
    }

    #[test]
    fn owner_answer_and_recent_picks_merge_by_longest_match() {
        let found = PrefixMatch {
            total_blocks: 4,
            endpoints: vec![
                infermesh_gossip::wire::EndpointMatch {
                    endpoint: PodId::from(addr(1)),
                    blocks: 2,
                },
                infermesh_gossip::wire::EndpointMatch {
                    endpoint: PodId::new("not-an-address"),
                    blocks: 4,
                },
            ],
        };
        let mut m = merge(&found, vec![(addr(1), 3), (addr(2), 1)]).entries;
        m.sort();
        assert_eq!(m, vec![(addr(1), 3), (addr(2), 1)]);
    }
}
