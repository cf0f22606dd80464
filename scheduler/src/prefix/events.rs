//! Applies one pod's KV-cache events to the request-keyed index, sans IO.
//!
//! [`PodEventState`] is fed the pod's events in order ([`BlockEvent`]) and returns plain
//! [`IndexOp`]s for the owners of each chain's anchor: it keeps engine key → (request key,
//! anchor) for every block the pod holds, so `BlockRemoved` (which names engine keys only)
//! can be turned into request keys, and a reference count per (anchor, request key) so a
//! key two engine blocks map to (engine inputs the request keys do not cover, such as
//! vLLM's `extra_keys`) is removed only when the last one goes.
//!
//! [`BlockEvent`] is this crate's own view of vLLM's events rather than the kvevents
//! crate's `KvEvent`: the scheduler stays free of the ZMQ/tokio stack (its Cargo.toml
//! proves it), and the node maps one to the other in a few lines.
//!
//! Memory is bounded: past `max_blocks` mapped engine keys the oldest mapping is dropped
//! and a `Remove` for its key goes out, so the owners never hold a block this state can no
//! longer take back (the index then under-reports a pod, which costs a hit, never a
//! misroute to a pod that lost the block).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use super::index::BlockHash;
use super::precise::{block_key, lora_seed};

/// vLLM's medium name for GPU memory; only GPU blocks are indexed.
pub const MEDIUM_GPU: &str = "GPU";

/// One KV-cache event of a pod, as the applier needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockEvent<'a> {
    /// Full blocks were stored (vLLM `BlockStored`).
    Stored {
        /// Engine hashes of the blocks, parent first.
        engine_keys: &'a [u64],
        /// Engine hash of the block before the first one; `None` at a prompt's start.
        parent: Option<u64>,
        /// Tokens of all blocks, `block_size` each; empty for a CPU-offload store.
        tokens: &'a [u32],
        /// Tokens per block.
        block_size: usize,
        /// LoRA adapter name the blocks were computed under.
        lora: Option<&'a str>,
        /// Where the blocks live (`None` means GPU, as vLLM's default).
        medium: Option<&'a str>,
    },
    /// Blocks were evicted (vLLM `BlockRemoved`).
    Removed {
        /// Engine hashes of the evicted blocks.
        engine_keys: &'a [u64],
        /// Where the blocks lived (`None` means GPU).
        medium: Option<&'a str>,
    },
    /// The pod's whole prefix cache was dropped (vLLM `AllBlocksCleared`).
    Cleared,
}

/// What the owners of an anchor must do to their index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IndexOp {
    /// `endpoint` now holds `keys` (consecutive blocks of one chain, `parent` before them).
    Record {
        /// First request key of the chain (selects the owners).
        anchor: BlockHash,
        /// Request key of the block before `keys[0]`; `None` when `keys[0]` is the anchor.
        parent: Option<BlockHash>,
        /// Request keys, in chain order.
        keys: Vec<BlockHash>,
        /// The pod.
        endpoint: Arc<str>,
    },
    /// `endpoint` no longer holds `keys` (all under `anchor`).
    Remove {
        /// First request key of the chain the keys belong to.
        anchor: BlockHash,
        /// Request keys.
        keys: Vec<BlockHash>,
        /// The pod.
        endpoint: Arc<str>,
    },
    /// `endpoint` holds nothing any more (cleared, restarted, or events lost).
    Clear {
        /// The pod.
        endpoint: Arc<str>,
    },
}

/// Counters of what the applier did and skipped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventCounters {
    /// Blocks mapped from `BlockStored`.
    pub stored_blocks: u64,
    /// Blocks unmapped by `BlockRemoved`.
    pub removed_blocks: u64,
    /// `BlockStored` events skipped because their parent was unknown.
    pub orphans: u64,
    /// `BlockStored` events skipped because they carried no tokens or lived off GPU.
    pub offload_skipped: u64,
    /// `BlockStored` events skipped because tokens and hashes disagreed in length.
    pub malformed: u64,
    /// `BlockRemoved` hashes that named no mapped block (never stored, orphaned or evicted).
    pub unknown_removed: u64,
    /// Mappings dropped to stay under the memory cap.
    pub evicted: u64,
    /// Clears (events, restarts, losses).
    pub clears: u64,
}

#[derive(Debug, Clone, Copy)]
struct Mapping {
    request: BlockHash,
    anchor: BlockHash,
    tick: u64,
}

/// One pod's engine-key → request-key state and the ops its events produce.
#[derive(Debug)]
pub struct PodEventState {
    endpoint: Arc<str>,
    model_seed: BlockHash,
    max_blocks: usize,
    map: HashMap<u64, Mapping>,
    /// Insertion tick → engine key, oldest first, for eviction.
    order: BTreeMap<u64, u64>,
    /// Per anchor, request key → how many engine keys map to it.
    held: HashMap<BlockHash, HashMap<BlockHash, u32>>,
    tick: u64,
    counters: EventCounters,
}

impl PodEventState {
    /// Default cap on mapped blocks per pod (a large vLLM pod holds ~100k GPU blocks).
    pub const DEFAULT_MAX_BLOCKS: usize = 1 << 20;

    /// Empty state for the pod `endpoint`, whose chains start at `model_seed`
    /// ([`super::precise::model_seed`] of the served model).
    pub fn new(endpoint: impl Into<Arc<str>>, model_seed: BlockHash) -> PodEventState {
        PodEventState::with_capacity(endpoint, model_seed, PodEventState::DEFAULT_MAX_BLOCKS)
    }

    /// [`PodEventState::new`] holding at most `max_blocks` mappings (at least 1).
    pub fn with_capacity(
        endpoint: impl Into<Arc<str>>,
        model_seed: BlockHash,
        max_blocks: usize,
    ) -> PodEventState {
        PodEventState {
            endpoint: endpoint.into(),
            model_seed,
            max_blocks: max_blocks.max(1),
            map: HashMap::new(),
            order: BTreeMap::new(),
            held: HashMap::new(),
            tick: 0,
            counters: EventCounters::default(),
        }
    }

    /// The pod this state tracks.
    pub fn endpoint(&self) -> &Arc<str> {
        &self.endpoint
    }

    /// What was applied and skipped so far.
    pub fn counters(&self) -> EventCounters {
        self.counters
    }

    /// Engine keys currently mapped.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether no block is mapped.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The (request key, anchor) an engine key maps to.
    pub fn resolve(&self, engine_key: u64) -> Option<(BlockHash, BlockHash)> {
        self.map.get(&engine_key).map(|m| (m.request, m.anchor))
    }

    /// Engine keys the pod holds, as far as its events said.
    pub fn engine_keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.map.keys().copied()
    }

    /// (anchor, request key) pairs the pod holds, as the owners were told.
    pub fn held(&self) -> impl Iterator<Item = (BlockHash, BlockHash)> + '_ {
        self.held
            .iter()
            .flat_map(|(&a, keys)| keys.keys().map(move |&k| (a, k)))
    }

    /// Applies one event, appending the resulting ops to `out`.
    pub fn handle_event(&mut self, event: BlockEvent<'_>, out: &mut Vec<IndexOp>) {
        match event {
            BlockEvent::Stored {
                engine_keys,
                parent,
                tokens,
                block_size,
                lora,
                medium,
            } => self.handle_stored(engine_keys, parent, tokens, block_size, lora, medium, out),
            BlockEvent::Removed {
                engine_keys,
                medium,
            } => {
                if is_gpu(medium) {
                    self.handle_removed(engine_keys, out);
                }
            }
            BlockEvent::Cleared => self.handle_clear(out),
        }
    }

    /// Forgets everything and tells the owners so (`AllBlocksCleared`, or the caller
    /// saw the publisher restart or events it cannot recover).
    pub fn handle_clear(&mut self, out: &mut Vec<IndexOp>) {
        self.map.clear();
        self.order.clear();
        self.held.clear();
        self.counters.clears += 1;
        out.push(IndexOp::Clear {
            endpoint: self.endpoint.clone(),
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn handle_stored(
        &mut self,
        engine_keys: &[u64],
        parent: Option<u64>,
        tokens: &[u32],
        block_size: usize,
        lora: Option<&str>,
        medium: Option<&str>,
        out: &mut Vec<IndexOp>,
    ) {
        if engine_keys.is_empty() {
            return;
        }
        if tokens.is_empty() || !is_gpu(medium) {
            self.counters.offload_skipped += 1;
            return;
        }
        if block_size == 0 || tokens.len() != engine_keys.len() * block_size {
            self.counters.malformed += 1;
            return;
        }
        let (mut prev, anchor, parent_request) = match parent {
            None => (lora_seed(self.model_seed, lora), None, None),
            Some(p) => match self.map.get(&p) {
                Some(m) => (m.request, Some(m.anchor), Some(m.request)),
                None => {
                    self.counters.orphans += 1;
                    return;
                }
            },
        };
        let mut keys = Vec::with_capacity(engine_keys.len());
        for block in tokens.chunks_exact(block_size) {
            prev = block_key(prev, block);
            keys.push(prev);
        }
        let anchor = anchor.unwrap_or(keys[0]);
        for (&engine, &request) in engine_keys.iter().zip(&keys) {
            self.tick += 1;
            let old = self.map.insert(
                engine,
                Mapping {
                    request,
                    anchor,
                    tick: self.tick,
                },
            );
            self.order.insert(self.tick, engine);
            match old {
                // A re-store of a block it holds: only its age changes.
                Some(o) if o.request == request && o.anchor == anchor => {
                    self.order.remove(&o.tick);
                }
                Some(o) => {
                    // The engine reused a hash for other content: drop the old key first.
                    self.order.remove(&o.tick);
                    let mut removes = Vec::new();
                    self.release(o.anchor, o.request, &mut removes);
                    self.flush_removes(removes, out);
                    self.hold(anchor, request);
                }
                None => self.hold(anchor, request),
            }
        }
        self.counters.stored_blocks += keys.len() as u64;
        out.push(IndexOp::Record {
            anchor,
            parent: parent_request,
            keys,
            endpoint: self.endpoint.clone(),
        });
        self.evict_to_cap(out);
    }

    fn handle_removed(&mut self, engine_keys: &[u64], out: &mut Vec<IndexOp>) {
        let mut removes: Vec<(BlockHash, BlockHash)> = Vec::new();
        for engine in engine_keys {
            match self.map.remove(engine) {
                Some(m) => {
                    self.order.remove(&m.tick);
                    self.counters.removed_blocks += 1;
                    self.release(m.anchor, m.request, &mut removes);
                }
                None => self.counters.unknown_removed += 1,
            }
        }
        self.flush_removes(removes, out);
    }

    fn hold(&mut self, anchor: BlockHash, request: BlockHash) {
        *self
            .held
            .entry(anchor)
            .or_default()
            .entry(request)
            .or_insert(0) += 1;
    }

    /// Drops one reference; queues a removal when it was the last.
    fn release(
        &mut self,
        anchor: BlockHash,
        request: BlockHash,
        removes: &mut Vec<(BlockHash, BlockHash)>,
    ) {
        let Some(keys) = self.held.get_mut(&anchor) else {
            return;
        };
        if let Some(n) = keys.get_mut(&request) {
            *n -= 1;
            if *n == 0 {
                keys.remove(&request);
                removes.push((anchor, request));
            }
        }
        if keys.is_empty() {
            self.held.remove(&anchor);
        }
    }

    /// Emits one `Remove` per anchor, keys in the order they were removed.
    fn flush_removes(&self, removes: Vec<(BlockHash, BlockHash)>, out: &mut Vec<IndexOp>) {
        let mut per_anchor: Vec<(BlockHash, Vec<BlockHash>)> = Vec::new();
        for (anchor, key) in removes {
            match per_anchor.iter_mut().find(|(a, _)| *a == anchor) {
                Some((_, keys)) => keys.push(key),
                None => per_anchor.push((anchor, vec![key])),
            }
        }
        out.extend(
            per_anchor
                .into_iter()
                .map(|(anchor, keys)| IndexOp::Remove {
                    anchor,
                    keys,
                    endpoint: self.endpoint.clone(),
                }),
        );
    }

    fn evict_to_cap(&mut self, out: &mut Vec<IndexOp>) {
        let mut removes = Vec::new();
        while self.map.len() > self.max_blocks {
            let Some((_, engine)) = self.order.pop_first() else {
                break;
            };
            if let Some(m) = self.map.remove(&engine) {
                self.counters.evicted += 1;
                self.release(m.anchor, m.request, &mut removes);
            }
        }
        self.flush_removes(removes, out);
    }
}

fn is_gpu(medium: Option<&str>) -> bool {
    medium.is_none_or(|m| m.eq_ignore_ascii_case(MEDIUM_GPU))
}

#[cfg(test)]
mod tests;
