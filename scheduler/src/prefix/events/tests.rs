use std::collections::{HashMap, HashSet};
use std::time::Duration;

use infermesh_sim::EngineProfile;
use infermesh_sim::engine::{
    CacheEvent, Engine, EngineConfig, EngineRequest, FinishReason, KvTransfer, block_hashes,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::prefix::precise::{model_seed, request_keys, request_seed};

const MODEL: &str = "m";

fn state() -> PodEventState {
    PodEventState::new("10.0.0.1:8000", model_seed(MODEL))
}

fn stored<'a>(keys: &'a [u64], parent: Option<u64>, tokens: &'a [u32]) -> BlockEvent<'a> {
    BlockEvent::Stored {
        engine_keys: keys,
        parent,
        tokens,
        block_size: 2,
        lora: None,
        medium: Some("GPU"),
    }
}

fn apply(s: &mut PodEventState, e: BlockEvent<'_>) -> Vec<IndexOp> {
    let mut out = Vec::new();
    s.handle_event(e, &mut out);
    out
}

/// The owners' view: anchor → request keys the pod holds, built from ops only.
#[derive(Default)]
struct Owners(HashMap<u64, HashSet<u64>>);

impl Owners {
    fn apply(&mut self, ops: &[IndexOp]) {
        for op in ops {
            match op {
                IndexOp::Record { anchor, keys, .. } => {
                    self.0.entry(*anchor).or_default().extend(keys);
                }
                IndexOp::Remove { anchor, keys, .. } => {
                    let held = self.0.get_mut(anchor).expect("remove of an unknown anchor");
                    for k in keys {
                        assert!(held.remove(k), "remove of a key never recorded");
                    }
                    if held.is_empty() {
                        self.0.remove(anchor);
                    }
                }
                IndexOp::Clear { .. } => self.0.clear(),
            }
        }
    }

    fn pairs(&self) -> HashSet<(u64, u64)> {
        self.0
            .iter()
            .flat_map(|(&a, ks)| ks.iter().map(move |&k| (a, k)))
            .collect()
    }
}

#[test]
fn stored_chain_then_child_then_removed() {
    let mut s = state();
    let keys = request_keys(request_seed(MODEL, None), &[1, 2, 3, 4, 5, 6], 2, 256);
    let ops = apply(&mut s, stored(&[100, 200], None, &[1, 2, 3, 4]));
    assert_eq!(
        ops,
        vec![IndexOp::Record {
            anchor: keys[0],
            parent: None,
            keys: keys[..2].to_vec(),
            endpoint: "10.0.0.1:8000".into(),
        }]
    );
    // A child resolves its parent through the map and joins the same anchor.
    let ops = apply(&mut s, stored(&[300], Some(200), &[5, 6]));
    assert_eq!(
        ops,
        vec![IndexOp::Record {
            anchor: keys[0],
            parent: Some(keys[1]),
            keys: vec![keys[2]],
            endpoint: "10.0.0.1:8000".into(),
        }]
    );
    assert_eq!(s.resolve(300), Some((keys[2], keys[0])));
    let ops = apply(
        &mut s,
        BlockEvent::Removed {
            engine_keys: &[300, 200, 999],
            medium: None,
        },
    );
    assert_eq!(
        ops,
        vec![IndexOp::Remove {
            anchor: keys[0],
            keys: vec![keys[2], keys[1]],
            endpoint: "10.0.0.1:8000".into(),
        }]
    );
    let c = s.counters();
    assert_eq!(
        (c.stored_blocks, c.removed_blocks, c.unknown_removed),
        (3, 2, 1)
    );
    assert_eq!(s.held().collect::<Vec<_>>(), vec![(keys[0], keys[0])]);
}

#[test]
fn orphans_offload_and_malformed_are_counted_and_skipped() {
    let mut s = state();
    assert!(apply(&mut s, stored(&[5], Some(77), &[1, 2])).is_empty());
    // CPU offload: no tokens, or a non-GPU medium.
    assert!(apply(&mut s, stored(&[6], None, &[])).is_empty());
    let cpu = BlockEvent::Stored {
        engine_keys: &[7],
        parent: None,
        tokens: &[1, 2],
        block_size: 2,
        lora: None,
        medium: Some("CPU"),
    };
    assert!(apply(&mut s, cpu).is_empty());
    // Three tokens for one block of two.
    assert!(apply(&mut s, stored(&[8], None, &[1, 2, 3])).is_empty());
    // A CPU-side removal never touches GPU mappings.
    apply(&mut s, stored(&[9], None, &[1, 2]));
    let cpu_removed = BlockEvent::Removed {
        engine_keys: &[9],
        medium: Some("CPU"),
    };
    assert!(apply(&mut s, cpu_removed).is_empty());
    let c = s.counters();
    assert_eq!((c.orphans, c.offload_skipped, c.malformed), (1, 2, 1));
    assert_eq!(s.len(), 1);
}

#[test]
fn clear_drops_everything() {
    let mut s = state();
    apply(&mut s, stored(&[1, 2], None, &[1, 2, 3, 4]));
    let ops = apply(&mut s, BlockEvent::Cleared);
    assert_eq!(
        ops,
        vec![IndexOp::Clear {
            endpoint: "10.0.0.1:8000".into()
        }]
    );
    assert!(s.is_empty() && s.held().next().is_none());
    // Children of cleared blocks are orphans now.
    assert!(apply(&mut s, stored(&[3], Some(2), &[5, 6])).is_empty());
    assert_eq!(s.counters().orphans, 1);
}

#[test]
fn shared_request_key_is_removed_with_its_last_engine_block() {
    // Two engine blocks with the same tokens (the engine hashed in something the request
    // keys do not cover, e.g. a cache salt) map to one request key.
    let mut s = state();
    apply(&mut s, stored(&[1], None, &[1, 2]));
    apply(&mut s, stored(&[2], None, &[1, 2]));
    assert_eq!(s.held().count(), 1);
    let rm = |k: &'static [u64]| BlockEvent::Removed {
        engine_keys: k,
        medium: None,
    };
    assert!(apply(&mut s, rm(&[1])).is_empty());
    assert_eq!(apply(&mut s, rm(&[2])).len(), 1);
    assert!(s.held().next().is_none());
}

#[test]
fn lora_blocks_chain_from_the_adapter_seed() {
    let mut s = state();
    let e = BlockEvent::Stored {
        engine_keys: &[1],
        parent: None,
        tokens: &[1, 2],
        block_size: 2,
        lora: Some("sql"),
        medium: None,
    };
    apply(&mut s, e);
    let want = request_keys(request_seed(MODEL, Some("sql")), &[1, 2], 2, 1)[0];
    assert_eq!(s.resolve(1), Some((want, want)));
}

#[test]
fn cap_evicts_oldest_and_tells_the_owners() {
    let mut s = PodEventState::with_capacity("p", model_seed(MODEL), 3);
    let mut owners = Owners::default();
    owners.apply(&apply(&mut s, stored(&[1, 2], None, &[1, 2, 3, 4])));
    owners.apply(&apply(&mut s, stored(&[3, 4], Some(2), &[5, 6, 7, 8])));
    assert_eq!(s.len(), 3);
    assert_eq!(s.counters().evicted, 1);
    assert_eq!(s.resolve(1), None, "the oldest went first");
    assert_eq!(owners.pairs(), s.held().collect());
    owners.apply(&apply(&mut s, stored(&[5], Some(4), &[9, 10])));
    assert_eq!(s.resolve(2), None, "then the next oldest");
    assert!(s.resolve(3).is_some() && s.resolve(5).is_some());
    assert_eq!(owners.pairs(), s.held().collect());
    // A child of an evicted block is an orphan.
    assert!(apply(&mut s, stored(&[6], Some(1), &[3, 4])).is_empty());
    assert_eq!(s.counters().orphans, 1);
}

#[test]
fn restoring_a_block_refreshes_its_age() {
    let mut s = PodEventState::with_capacity("p", model_seed(MODEL), 2);
    apply(&mut s, stored(&[1], None, &[1, 2]));
    apply(&mut s, stored(&[2], None, &[3, 4]));
    apply(&mut s, stored(&[1], None, &[1, 2]));
    apply(&mut s, stored(&[3], None, &[5, 6]));
    assert!(s.resolve(1).is_some());
    assert_eq!(s.resolve(2), None);
    assert_eq!(s.held().count(), 2);
}

fn to_block_event<'a>(e: &'a CacheEvent, adapters: &'a [String], bs: usize) -> BlockEvent<'a> {
    match e {
        CacheEvent::Stored {
            block_hashes,
            parent,
            token_ids,
            lora,
        } => BlockEvent::Stored {
            engine_keys: block_hashes,
            parent: *parent,
            tokens: token_ids,
            block_size: bs,
            lora: lora.map(|l| adapters[l as usize].as_str()),
            medium: Some("GPU"),
        },
        CacheEvent::Removed { block_hashes } => BlockEvent::Removed {
            engine_keys: block_hashes,
            medium: Some("GPU"),
        },
        CacheEvent::Cleared => BlockEvent::Cleared,
    }
}

/// A real sim engine under capacity pressure (evictions, preemptions, a cache reset): the
/// applier's view equals stored-minus-removed and the engine's own cache, every engine key
/// maps to the request key computed from the prompt, and the owners' view built from the
/// ops equals what the applier says the pod holds.
#[test]
fn mirrors_a_sim_engine() {
    let bs = 4;
    let adapters = vec!["a".to_owned(), "b".to_owned()];
    let mut totals = EventCounters::default();
    for seed in 0..10u64 {
        let profile = EngineProfile {
            block_size: bs,
            num_gpu_blocks: 20,
            max_num_seqs: 6,
            max_num_batched_tokens: 24,
            jitter: 0.1,
            ..EngineProfile::instant()
        };
        let mut e = Engine::new(EngineConfig {
            profile,
            lora_adapters: adapters.clone(),
            seed,
        });
        e.enable_kv_events();
        let mut s = PodEventState::new("pod", model_seed(MODEL));
        let mut owners = Owners::default();
        let mut mirror: HashSet<u64> = HashSet::new();
        let mut prompts: Vec<(Vec<u32>, Option<u32>)> = Vec::new();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut now = Duration::ZERO;
        let mut ops = Vec::new();
        let mut drain = |e: &mut Engine,
                         s: &mut PodEventState,
                         owners: &mut Owners,
                         mirror: &mut HashSet<u64>| {
            for step in e.take_kv_events() {
                for ev in &step.events {
                    match ev {
                        CacheEvent::Stored { block_hashes, .. } => mirror.extend(block_hashes),
                        CacheEvent::Removed { block_hashes } => {
                            for h in block_hashes {
                                mirror.remove(h);
                            }
                        }
                        CacheEvent::Cleared => mirror.clear(),
                    }
                    ops.clear();
                    s.handle_event(to_block_event(ev, &adapters, bs), &mut ops);
                    owners.apply(&ops);
                }
            }
            let mapped: HashSet<u64> = s.engine_keys().collect();
            assert_eq!(mapped, *mirror, "seed {seed}: stored minus removed");
            assert_eq!(owners.pairs(), s.held().collect(), "seed {seed}: owners");
        };
        for id in 0..60u64 {
            now += Duration::from_micros(rng.random_range(0..20_000));
            let group = rng.random_range(0..4u32) * 1000;
            let mut prompt: Vec<u32> = (group..group + rng.random_range(4..40)).collect();
            prompt.extend(id as u32 * 100..id as u32 * 100 + rng.random_range(0..12));
            let lora = [None, Some(0), Some(1)][rng.random_range(0..3)];
            e.advance(now);
            let r = EngineRequest::new(
                id,
                prompt.clone(),
                rng.random_range(1..24),
                FinishReason::Length,
                lora,
                KvTransfer::None,
                bs,
            );
            e.submit(now, r).unwrap();
            e.drain_outputs().for_each(drop);
            prompts.push((prompt, lora));
            drain(&mut e, &mut s, &mut owners, &mut mirror);
            if id == 30 && e.num_running() + e.num_waiting() == 0 && e.reset_prefix_cache() {
                drain(&mut e, &mut s, &mut owners, &mut mirror);
                assert!(s.is_empty());
            }
        }
        while let Some(t) = e.next_wakeup() {
            e.advance(t);
            e.drain_outputs().for_each(drop);
            drain(&mut e, &mut s, &mut owners, &mut mirror);
        }
        drain(&mut e, &mut s, &mut owners, &mut mirror);
        // Idle: the engine's own cache is exactly what the events said.
        let cached: HashSet<u64> = e.pool().cached_hashes().collect();
        assert_eq!(cached, mirror, "seed {seed}: engine cache");
        // Re-keyed: each cached prompt block maps to the key the request path computes.
        let mut checked = 0;
        for (prompt, lora) in &prompts {
            let engine = block_hashes(prompt, *lora, bs);
            let name = lora.map(|l| adapters[l as usize].as_str());
            let request = request_keys(request_seed(MODEL, name), prompt, bs, usize::MAX);
            assert_eq!(engine.len(), request.len());
            for (eng, req) in engine.iter().zip(&request) {
                if cached.contains(eng) {
                    assert_eq!(s.resolve(*eng), Some((*req, request[0])), "seed {seed}");
                    checked += 1;
                }
            }
        }
        assert!(checked > 0, "seed {seed}: some prompt blocks stay cached");
        let c = s.counters();
        totals.stored_blocks += c.stored_blocks;
        totals.removed_blocks += c.removed_blocks;
        totals.orphans += c.orphans;
        totals.unknown_removed += c.unknown_removed;
    }
    assert!(
        totals.removed_blocks > 0,
        "the workload must evict: {totals:?}"
    );
    assert_eq!(totals.orphans, 0, "a complete stream has no orphans");
    assert_eq!(totals.unknown_removed, 0, "{totals:?}");
}

mod prop {
    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Step {
        /// Store `blocks` new engine blocks after the `parent`-th key seen so far (or at a
        /// prompt's start), with tokens from a tiny alphabet so request keys collide.
        Store {
            parent: Option<usize>,
            blocks: usize,
            token: u32,
        },
        /// Remove the `i`-th and `j`-th keys seen so far (mapped or not).
        Remove {
            i: usize,
            j: usize,
        },
        /// Store the `i`-th key seen so far again, as a prompt's first block with `token`
        /// (the same content refreshes it; other content replaces it).
        Restore {
            i: usize,
            token: u32,
        },
        Clear,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (proptest::option::of(0usize..64), 1usize..4, 0u32..3)
                .prop_map(|(parent, blocks, token)| Step::Store { parent, blocks, token }),
            3 => (0usize..64, 0usize..64).prop_map(|(i, j)| Step::Remove { i, j }),
            2 => (0usize..64, 0u32..3).prop_map(|(i, token)| Step::Restore { i, token }),
            1 => Just(Step::Clear),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Whatever the stream (orphans, unknown removals, colliding keys, clears, the cap),
        /// the owners' view built from the ops equals what the applier says the pod holds,
        /// and the map stays under its cap.
        #[test]
        fn owners_view_always_equals_holdings(
            steps in proptest::collection::vec(step(), 1..80),
            cap in 1usize..12,
        ) {
            let mut s = PodEventState::with_capacity("p", model_seed(MODEL), cap);
            let mut owners = Owners::default();
            let mut seen: Vec<u64> = Vec::new();
            let mut next = 1u64;
            let mut ops = Vec::new();
            for st in steps {
                ops.clear();
                match st {
                    Step::Store { parent, blocks, token } => {
                        let keys: Vec<u64> = (0..blocks as u64).map(|i| next + i).collect();
                        next += blocks as u64;
                        let parent = parent.and_then(|p| seen.get(p).copied());
                        let tokens = vec![token; blocks * 2];
                        s.handle_event(stored(&keys, parent, &tokens), &mut ops);
                        seen.extend(&keys);
                    }
                    Step::Remove { i, j } => {
                        let keys: Vec<u64> =
                            [i, j].iter().filter_map(|&k| seen.get(k).copied()).collect();
                        s.handle_event(
                            BlockEvent::Removed { engine_keys: &keys, medium: None },
                            &mut ops,
                        );
                    }
                    Step::Restore { i, token } => {
                        if let Some(&k) = seen.get(i) {
                            s.handle_event(stored(&[k], None, &[token, token]), &mut ops);
                        }
                    }
                    Step::Clear => s.handle_event(BlockEvent::Cleared, &mut ops),
                }
                owners.apply(&ops);
                prop_assert!(s.len() <= cap);
                prop_assert_eq!(owners.pairs(), s.held().collect::<HashSet<_>>());
                // Every mapped engine key is held under its anchor.
                for e in s.engine_keys() {
                    let (req, anchor) = s.resolve(e).unwrap();
                    prop_assert!(owners.pairs().contains(&(anchor, req)));
                }
            }
        }
    }
}
