//! Hand-checked cases of the engine's cache accounting and time model (no sockets, no sleeps).

use super::*;

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

/// Block size 4, round numbers: prefill step = 10 ms + 1 ms/token, decode step = 5 ms + 1 ms
/// per extra sequence.
fn profile() -> EngineProfile {
    EngineProfile {
        name: "test".into(),
        block_size: 4,
        num_gpu_blocks: 64,
        max_num_seqs: 8,
        max_num_batched_tokens: 1024,
        max_model_len: 1024,
        prefill_overhead: ms(10),
        prefill_per_token: ms(1),
        decode_base: ms(5),
        decode_per_seq: ms(1),
        decode_per_context_token: Duration::ZERO,
        // 100 bytes per token over 1 MB/s: 100 µs per token.
        kv_bytes_per_token: 100,
        kv_link_bytes_per_s: 1_000_000,
        encode_per_image: ms(20),
        image_tokens: 8,
        encoder_cache_items: 2,
        max_loras: 1,
        lora_load: Duration::ZERO,
        jitter: 0.0,
        default_max_tokens: 16,
    }
}

fn engine(p: EngineProfile) -> Engine {
    Engine::new(EngineConfig {
        profile: p,
        lora_adapters: vec!["a".into(), "b".into()],
        seed: 7,
    })
}

fn req(id: u64, prompt: Vec<u32>, max_tokens: usize) -> EngineRequest {
    EngineRequest::new(
        id,
        prompt,
        max_tokens,
        FinishReason::Length,
        None,
        KvTransfer::None,
        4,
    )
}

fn toks(range: std::ops::Range<u32>) -> Vec<u32> {
    range.collect()
}

/// Runs until idle; returns (first token time, completion) per request id.
fn run(e: &mut Engine) -> HashMap<u64, (Duration, Completion)> {
    let mut first = HashMap::new();
    let mut done = HashMap::new();
    let mut guard = 0;
    loop {
        for o in e.drain_outputs() {
            match o {
                Output::Token { id, index: 0, at } => {
                    first.insert(id, at);
                }
                Output::Token { .. } | Output::Encoded { .. } => {}
                Output::Finished { id, completion } => {
                    done.insert(id, (first[&id], completion));
                }
            }
        }
        let Some(t) = e.next_wakeup() else { break };
        e.advance(t);
        guard += 1;
        assert!(guard < 10_000, "engine did not go idle");
    }
    done
}

fn submit(e: &mut Engine, now: Duration, r: EngineRequest) {
    e.advance(now);
    e.submit(now, r).unwrap();
    e.advance(now);
}

#[test]
fn ttft_is_overhead_plus_uncached_prefill_and_decode_steps_follow() {
    let mut e = engine(profile());
    submit(&mut e, ms(0), req(1, toks(0..20), 3));
    let out = run(&mut e);
    let (ttft, c) = &out[&1];
    assert_eq!(*ttft, ms(30)); // 10 + 20 × 1
    assert_eq!(c.at, ms(40)); // two decode steps of 5 ms
    assert_eq!(
        (c.prompt_tokens, c.completion_tokens, c.cached_tokens),
        (20, 3, 0)
    );
    assert_eq!(c.finish, FinishReason::Length);

    // Same prompt later: 4 of 5 blocks hit (the last block is always recomputed).
    submit(&mut e, ms(100), req(2, toks(0..20), 1));
    let out = run(&mut e);
    let (first, c) = &out[&2];
    assert_eq!(*first, ms(114)); // 10 + 4 uncached tokens
    assert_eq!(c.cached_tokens, 16);
    assert_eq!(e.stats().prefix_cache_queries, 40);
    assert_eq!(e.stats().prefix_cache_hits, 16);
}

#[test]
fn prefix_hits_count_whole_leading_blocks_only() {
    let mut e = engine(profile());
    submit(&mut e, ms(0), req(1, toks(0..10), 2)); // registers blocks [0..4), [4..8)
    run(&mut e);
    assert_eq!(e.stats().prefix_cache_queries, 10);
    assert_eq!(e.stats().prefix_cache_hits, 0);

    // Extends the prompt: blocks 0 and 1 hit; block 2 of request 1 was never full.
    let mut longer = toks(0..10);
    longer.extend(100..104);
    submit(&mut e, ms(100), req(2, longer, 1));
    let c = run(&mut e).remove(&2).unwrap().1;
    assert_eq!(c.cached_tokens, 8);

    // Exactly two blocks long: only one may hit (one token must be computed).
    submit(&mut e, ms(200), req(3, toks(0..8), 1));
    assert_eq!(run(&mut e)[&3].1.cached_tokens, 4);

    // A different first block misses everything even if later tokens match.
    let mut other = toks(0..10);
    other[0] = 999;
    submit(&mut e, ms(300), req(4, other, 1));
    assert_eq!(run(&mut e)[&4].1.cached_tokens, 0);

    // Same tokens on a LoRA adapter are a different cache key.
    let mut r = req(5, toks(0..10), 1);
    r = EngineRequest::new(
        r.id,
        r.prompt,
        1,
        FinishReason::Length,
        Some(0),
        KvTransfer::None,
        4,
    );
    submit(&mut e, ms(400), r);
    assert_eq!(run(&mut e)[&5].1.cached_tokens, 0);

    assert_eq!(e.stats().prefix_cache_queries, 10 + 14 + 8 + 10 + 10);
    assert_eq!(e.stats().prefix_cache_hits, 8 + 4);
}

#[test]
fn decode_step_grows_with_batch_size() {
    let mut e = engine(profile());
    e.submit(ms(0), req(1, toks(0..8), 3)).unwrap();
    e.submit(ms(0), req(2, toks(100..108), 3)).unwrap();
    e.advance(ms(0));
    let out = run(&mut e);
    // One prefill step for both (10 + 16), then decode steps of 5 + 1 for two sequences.
    assert_eq!(out[&1].0, ms(26));
    assert_eq!(out[&2].0, ms(26));
    assert_eq!(out[&1].1.at, ms(38));
    assert_eq!(e.stats().itl.count(), 4);
    assert!((e.stats().itl.sum() - 0.024).abs() < 1e-9);
}

#[test]
fn queue_wait_adds_to_ttft_when_the_batch_is_full() {
    let mut e = engine(EngineProfile {
        max_num_seqs: 1,
        ..profile()
    });
    submit(&mut e, ms(0), req(1, toks(0..8), 3));
    assert_eq!(e.num_running(), 1);
    e.submit(ms(0), req(2, toks(100..108), 1)).unwrap();
    assert_eq!(e.num_waiting(), 1);
    let out = run(&mut e);
    assert_eq!(out[&1].1.at, ms(28)); // 18 + 5 + 5
    assert_eq!(out[&2].0, ms(46)); // waits 28, then 10 + 8
}

#[test]
fn chunked_prefill_splits_long_prompts_by_the_token_budget() {
    let mut e = engine(EngineProfile {
        max_num_batched_tokens: 8,
        ..profile()
    });
    submit(&mut e, ms(0), req(1, toks(0..20), 1));
    let out = run(&mut e);
    assert_eq!(out[&1].0, ms(18 + 18 + 14));
}

#[test]
fn kv_pressure_preempts_and_every_request_still_completes() {
    let mut e = engine(EngineProfile {
        num_gpu_blocks: 6,
        ..profile()
    });
    // Two sequences of 8 prompt tokens growing to 16: 4 blocks each > 6 blocks total.
    submit(&mut e, ms(0), req(1, toks(0..8), 8));
    e.submit(ms(0), req(2, toks(100..108), 8)).unwrap();
    let out = run(&mut e);
    assert_eq!(out[&1].1.completion_tokens, 8);
    assert_eq!(out[&2].1.completion_tokens, 8);
    assert!(e.stats().preemptions >= 1);
    assert_eq!(e.pool().num_used(), 0);
}

#[test]
fn requests_larger_than_the_context_or_the_cache_are_refused() {
    let mut e = engine(EngineProfile {
        num_gpu_blocks: 4,
        max_model_len: 32,
        ..profile()
    });
    assert!(matches!(
        e.submit(ms(0), req(1, toks(0..30), 8)),
        Err(SubmitError::TooLong { total: 38, .. })
    ));
    assert!(matches!(
        e.submit(ms(0), req(2, toks(0..16), 8)),
        Err(SubmitError::ExceedsKvCapacity { needed: 6, .. })
    ));
    assert_eq!(
        e.submit(ms(0), req(3, vec![], 8)),
        Err(SubmitError::EmptyPrompt)
    );
    assert_eq!(e.num_waiting(), 0);
}

#[test]
fn max_loras_keeps_a_second_adapter_waiting() {
    let mut e = engine(profile());
    let lora = |id, l| {
        EngineRequest::new(
            id,
            toks(0..8),
            2,
            FinishReason::Length,
            l,
            KvTransfer::None,
            4,
        )
    };
    e.submit(ms(0), lora(1, Some(0))).unwrap();
    e.submit(ms(0), lora(2, Some(1))).unwrap();
    e.submit(ms(0), lora(3, None)).unwrap();
    e.advance(ms(0));
    assert_eq!(e.num_running(), 2); // adapter a and the base model
    assert_eq!(e.running_loras(), vec![0]);
    assert_eq!(e.waiting_loras(), vec![1]);
    let out = run(&mut e);
    assert!(out[&2].0 > out[&1].1.at - ms(1));
}

#[test]
fn remote_prefill_skips_prefill_cost_and_remote_decode_reports_blocks() {
    let mut e = engine(profile());
    let r = EngineRequest::new(
        1,
        toks(0..21),
        2,
        FinishReason::Length,
        None,
        KvTransfer::RemotePrefill,
        4,
    );
    submit(&mut e, ms(0), r);
    let out = run(&mut e);
    // 20 tokens transferred at 0.1 ms each, then the last prompt token in a decode step
    // (5 ms), not a prefill step: the decode pod runs no prompt prefill for it.
    assert_eq!(out[&1].0, ms(7));
    assert_eq!(out[&1].1.cached_tokens, 20);
    assert_eq!(e.stats().prefix_cache_hits, 0);
    assert_eq!(e.stats().remote_prefill_tokens, 20);

    let r = EngineRequest::new(
        2,
        toks(50..70),
        1,
        FinishReason::Length,
        None,
        KvTransfer::RemoteDecode,
        4,
    );
    submit(&mut e, ms(100), r);
    let c = run(&mut e).remove(&2).unwrap().1;
    assert_eq!(c.prompt_block_ids.len(), 5);
}

#[test]
fn abort_frees_blocks_and_drops_the_request() {
    let mut e = engine(profile());
    submit(&mut e, ms(0), req(1, toks(0..20), 100));
    e.advance(ms(50));
    assert!(e.pool().num_used() > 0);
    e.abort(1);
    assert_eq!(e.pool().num_used(), 0);
    assert_eq!(e.num_running(), 0);
    assert!(run(&mut e).is_empty());
}

#[test]
fn same_seed_and_workload_give_the_same_results() {
    let go = || {
        let mut e = engine(EngineProfile {
            jitter: 0.2,
            num_gpu_blocks: 24,
            ..profile()
        });
        let mut log = Vec::new();
        for i in 0..40u64 {
            let now = ms(i * 7);
            e.advance(now);
            log.extend(e.drain_outputs());
            let base = (i % 3) as u32 * 1000;
            let mut p = toks(base..base + 12);
            p.extend(toks(i as u32 * 10..i as u32 * 10 + 5));
            e.submit(now, req(i, p, 4)).unwrap();
        }
        while let Some(t) = e.next_wakeup() {
            e.advance(t);
            log.extend(e.drain_outputs());
        }
        (log, e.stats().prefix_cache_hits, e.stats().preemptions)
    };
    let a = go();
    assert_eq!(a, go());
    assert!(a.1 > 0);
}

#[test]
fn zero_cost_profile_finishes_within_one_advance() {
    let mut e = engine(EngineProfile {
        prefill_overhead: Duration::ZERO,
        prefill_per_token: Duration::ZERO,
        decode_base: Duration::ZERO,
        decode_per_seq: Duration::ZERO,
        ..profile()
    });
    e.submit(ms(5), req(1, toks(0..20), 50)).unwrap();
    assert!(e.advance_bounded(ms(5), 10));
    e.advance(ms(5));
    let outs: Vec<_> = e.drain_outputs().collect();
    assert_eq!(outs.len(), 51);
    assert!(
        matches!(outs.last(), Some(Output::Finished { completion, .. }) if completion.at == ms(5))
    );
    assert_eq!(e.next_wakeup(), None);
}

#[test]
fn random_workloads_keep_block_accounting_consistent() {
    let (mut preemptions, mut remote, mut hits) = (0, 0, 0);
    for seed in 0..30u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut e = engine(EngineProfile {
            // Odd seeds: barely more KV than the largest request, so requests contend.
            num_gpu_blocks: if seed % 2 == 0 { 40 } else { 20 },
            max_num_seqs: 6,
            max_num_batched_tokens: 24,
            max_loras: 1,
            jitter: 0.1,
            ..profile()
        });
        let mut expected: HashMap<u64, usize> = HashMap::new();
        let mut finished: HashMap<u64, usize> = HashMap::new();
        let mut aborted = 0;
        let mut now = Duration::ZERO;
        for id in 0..60u64 {
            now += Duration::from_micros(rng.random_range(0..20_000));
            e.advance(now);
            let group = rng.random_range(0..4u32) * 1000;
            let mut prompt = toks(group..group + rng.random_range(4..40));
            prompt.extend(toks(
                id as u32 * 100..id as u32 * 100 + rng.random_range(0..12),
            ));
            let max = rng.random_range(1..24);
            let lora = [None, Some(0), Some(1)][rng.random_range(0..3)];
            let kv = [
                KvTransfer::None,
                KvTransfer::None,
                KvTransfer::RemotePrefill,
            ][rng.random_range(0..3)];
            let r = EngineRequest::new(id, prompt, max, FinishReason::Length, lora, kv, 4);
            e.submit(now, r).unwrap();
            expected.insert(id, max);
            for o in e.drain_outputs() {
                if let Output::Finished { id, completion } = o {
                    finished.insert(id, completion.completion_tokens);
                }
            }
            if rng.random_range(0..10) == 0 {
                let victim = rng.random_range(0..=id);
                if expected.contains_key(&victim) && !finished.contains_key(&victim) {
                    e.abort(victim);
                    expected.remove(&victim);
                    aborted += 1;
                }
            }
            e.check_invariants();
        }
        while let Some(t) = e.next_wakeup() {
            e.advance(t);
            e.check_invariants();
            for o in e.drain_outputs() {
                if let Output::Finished { id, completion } = o {
                    finished.insert(id, completion.completion_tokens);
                }
            }
        }
        // Liveness: the engine went idle only after every live request finished.
        for (id, max) in &expected {
            assert_eq!(finished.get(id), Some(max), "seed {seed}: request {id}");
        }
        assert_eq!(e.num_running() + e.num_waiting(), 0, "seed {seed}");
        assert_eq!(e.pool().num_used(), 0, "seed {seed}");
        assert_eq!(e.stats().aborted, aborted, "seed {seed}");
        preemptions += e.stats().preemptions;
        remote += e.stats().remote_prefill_tokens;
        hits += e.stats().prefix_cache_hits;
    }
    // The workloads must reach the paths they are meant to check.
    assert!(
        preemptions > 0 && remote > 0 && hits > 0,
        "{preemptions} {remote} {hits}"
    );
}

#[test]
fn slowdown_stretches_steps_and_can_be_undone() {
    let mut e = engine(profile());
    assert!(!e.set_slowdown(0.0));
    assert!(!e.set_slowdown(f64::NAN));
    assert!(e.set_slowdown(3.0));
    submit(&mut e, ms(0), req(1, toks(0..20), 1));
    assert_eq!(run(&mut e)[&1].0, ms(90)); // (10 + 20) × 3
    assert!(e.set_slowdown(1.0));
    submit(&mut e, ms(100), req(2, toks(100..120), 1));
    assert_eq!(run(&mut e)[&2].0, ms(130));
}

#[test]
fn loading_a_lora_adapter_costs_time_once_per_slot() {
    let mut e = engine(EngineProfile {
        lora_load: ms(7),
        ..profile()
    });
    let lora = |id, l| {
        EngineRequest::new(
            id,
            toks(id as u32 * 100..id as u32 * 100 + 8),
            1,
            FinishReason::Length,
            l,
            KvTransfer::None,
            4,
        )
    };
    submit(&mut e, ms(0), lora(1, Some(0)));
    assert_eq!(run(&mut e)[&1].0, ms(25)); // 7 + 10 + 8
    submit(&mut e, ms(100), lora(2, Some(0)));
    assert_eq!(run(&mut e)[&2].0, ms(118)); // already in the slot
    submit(&mut e, ms(200), lora(3, Some(1)));
    assert_eq!(run(&mut e)[&3].0, ms(225)); // evicts adapter 0
    submit(&mut e, ms(300), lora(4, Some(0)));
    assert_eq!(run(&mut e)[&4].0, ms(325));
    submit(&mut e, ms(400), lora(5, None));
    assert_eq!(run(&mut e)[&5].0, ms(418)); // the base model needs no slot
    assert_eq!(e.stats().lora_loads, 3);
}

/// Drains outputs into per-request token times and encode results.
fn collect(
    e: &mut Engine,
    tokens: &mut HashMap<u64, Vec<Duration>>,
    encoded: &mut HashMap<u64, (usize, usize, Duration)>,
) {
    for o in e.drain_outputs() {
        match o {
            Output::Token { id, at, .. } => tokens.entry(id).or_default().push(at),
            Output::Encoded {
                id,
                images,
                hits,
                at,
            } => {
                encoded.insert(id, (images, hits, at));
            }
            Output::Finished { .. } => {}
        }
    }
}

/// Runs until idle, collecting every token time and encode result.
fn run_all(
    e: &mut Engine,
    tokens: &mut HashMap<u64, Vec<Duration>>,
    encoded: &mut HashMap<u64, (usize, usize, Duration)>,
) {
    for _ in 0..10_000 {
        collect(e, tokens, encoded);
        let Some(t) = e.next_wakeup() else { return };
        e.advance(t);
    }
    panic!("engine did not go idle");
}

fn max_gap(times: &[Duration]) -> Duration {
    times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

fn with_kv(mut r: EngineRequest, kv: KvTransfer) -> EngineRequest {
    r.kv_transfer = kv;
    r
}

/// The effect P/D exists for, on the engine's simulated clock: a request decoding on an
/// aggregated pod stalls for the whole prefill of a long prompt that arrives meanwhile
/// (both share one step); on a decode pod the same newcomer's KV is pulled instead, and
/// its only local work is a one-token decode, so the first request's inter-token gap
/// stays one decode step.
#[test]
fn a_long_prefill_stalls_decodes_on_an_aggregated_pod_but_not_on_a_decode_pod() {
    let run_with = |newcomer: KvTransfer| {
        let mut e = engine(EngineProfile {
            num_gpu_blocks: 256,
            ..profile()
        });
        let (mut tokens, mut enc) = (HashMap::new(), HashMap::new());
        submit(&mut e, ms(0), req(1, toks(0..8), 40));
        e.advance(ms(60));
        collect(&mut e, &mut tokens, &mut enc);
        // 400 prompt tokens: one 410 ms prefill chunk when computed here.
        submit(&mut e, ms(60), with_kv(req(2, toks(100..500), 2), newcomer));
        run_all(&mut e, &mut tokens, &mut enc);
        e.check_invariants();
        (max_gap(&tokens[&1]), tokens[&2][0] - ms(60))
    };
    let (aggregated_gap, aggregated_ttft) = run_with(KvTransfer::None);
    let (decode_gap, decode_ttft) = run_with(KvTransfer::RemotePrefill);
    // Aggregated: request 1's token waits for the step that prefills 400 tokens
    // (10 + 400 ms) and also decodes request 1 (5 ms).
    assert!(aggregated_gap >= ms(410), "{aggregated_gap:?}");
    // Decode pod: every step is a decode of at most two sequences (5 + 1 ms).
    assert_eq!(decode_gap, ms(6));
    assert!(decode_gap * 50 < aggregated_gap);
    // The newcomer's own first token: 399 tokens pulled at 0.1 ms (39.9 ms) then one
    // decode step, against the full prefill.
    assert!(
        decode_ttft < aggregated_ttft / 5,
        "{decode_ttft:?} {aggregated_ttft:?}"
    );
}

#[test]
fn kv_pulls_into_one_pod_queue_on_its_link() {
    let mut e = engine(profile());
    let (mut tokens, mut enc) = (HashMap::new(), HashMap::new());
    for id in [1, 2] {
        let r = with_kv(
            req(id, toks(id as u32 * 100..id as u32 * 100 + 21), 2),
            KvTransfer::RemotePrefill,
        );
        submit(&mut e, ms(0), r);
    }
    run_all(&mut e, &mut tokens, &mut enc);
    // Each pull is 20 tokens × 100 B over 1 MB/s = 2 ms; the second starts when the first
    // ends (link free at 2 ms, its KV in at 4 ms). Request 1 decodes its last prompt token
    // at 2..7; request 2 joins the next step, 7..13 (two sequences: 5 + 1 ms).
    assert_eq!(tokens[&1][0], ms(7));
    assert_eq!(tokens[&2][0], ms(13));
    assert_eq!(profile().kv_transfer_time(20), ms(2));
}

#[test]
fn images_cost_encoder_time_unless_cached_or_encoded_elsewhere() {
    let mut e = engine(profile());
    let (mut tokens, mut enc) = (HashMap::new(), HashMap::new());
    let img = |hash, remote| MmItem { hash, remote };
    let ttft = |e: &mut Engine,
                tokens: &mut HashMap<u64, Vec<Duration>>,
                enc: &mut HashMap<u64, (usize, usize, Duration)>,
                id: u64,
                mm: Vec<MmItem>| {
        let start = e.next_wakeup().unwrap_or(ms(id * 1000)).max(ms(id * 1000));
        submit(
            e,
            start,
            req(id, toks(id as u32 * 100..id as u32 * 100 + 8), 1).with_mm(mm),
        );
        run_all(e, tokens, enc);
        tokens[&id][0] - start
    };
    // Text only: 10 + 8 ms of prefill.
    assert_eq!(ttft(&mut e, &mut tokens, &mut enc, 1, vec![]), ms(18));
    // One new image: + 20 ms of encoding in the same step.
    assert_eq!(
        ttft(&mut e, &mut tokens, &mut enc, 2, vec![img(7, false)]),
        ms(38)
    );
    // The same image again: an encoder-cache hit.
    assert_eq!(
        ttft(&mut e, &mut tokens, &mut enc, 3, vec![img(7, false)]),
        ms(18)
    );
    // Encoded by an encode pod: no local encoding, not a cache query.
    assert_eq!(
        ttft(&mut e, &mut tokens, &mut enc, 4, vec![img(8, true)]),
        ms(18)
    );
    // Capacity 2: images 9 and 10 push 7 out, so 7 is encoded again.
    assert_eq!(
        ttft(
            &mut e,
            &mut tokens,
            &mut enc,
            5,
            vec![img(9, false), img(10, false)]
        ),
        ms(58)
    );
    assert_eq!(
        ttft(&mut e, &mut tokens, &mut enc, 6, vec![img(7, false)]),
        ms(38)
    );
    let st = e.stats();
    assert_eq!((st.encoder_cache_queries, st.encoder_cache_hits), (5, 1));
    assert_eq!(st.remote_encoded_images, 1);
}

#[test]
fn an_encode_pod_encodes_misses_and_answers_hits_from_its_cache() {
    let mut e = engine(profile());
    let (mut tokens, mut enc) = (HashMap::new(), HashMap::new());
    e.submit_encode(1, vec![1, 2]).unwrap();
    e.advance(ms(0));
    run_all(&mut e, &mut tokens, &mut enc);
    assert_eq!(
        enc[&1],
        (2, 0, ms(40)),
        "two misses, 20 ms each, in one step"
    );
    e.advance(ms(100));
    e.submit_encode(2, vec![2, 3]).unwrap();
    e.advance(ms(100));
    run_all(&mut e, &mut tokens, &mut enc);
    assert_eq!(enc[&2], (2, 1, ms(120)), "image 2 is cached, 3 is encoded");
    assert_eq!(
        e.submit_encode(3, vec![]),
        Err(SubmitError::NothingToEncode)
    );
    assert!(tokens.is_empty(), "encode-only requests generate nothing");
    e.check_invariants();
}

/// Applies the engine's KV events to `mirror` (as a subscriber's index would) and checks
/// each against the cache: stored blocks re-hash from their tokens and parent, nothing is
/// stored twice or removed unless stored, and afterwards the mirror is the cache's hash set.
fn apply_kv_events(
    e: &mut Engine,
    mirror: &mut std::collections::HashSet<u64>,
    seen: &mut [u64; 3],
    checks: &mut [u64; 1],
) {
    let bs = e.config().profile.block_size;
    for step in e.take_kv_events() {
        assert!(!step.events.is_empty(), "no empty batches");
        for ev in step.events {
            match ev {
                CacheEvent::Stored {
                    block_hashes,
                    parent,
                    token_ids,
                    lora,
                } => {
                    seen[0] += 1;
                    assert_eq!(token_ids.len(), block_hashes.len() * bs);
                    let mut h = parent.unwrap_or_else(|| root_hash(lora));
                    for (i, want) in block_hashes.iter().enumerate() {
                        h = chain_hash(h, &token_ids[i * bs..(i + 1) * bs]);
                        assert_eq!(h, *want, "block {i} re-hashes");
                        assert!(mirror.insert(h), "stored twice");
                    }
                }
                CacheEvent::Removed { block_hashes } => {
                    seen[1] += 1;
                    for h in block_hashes {
                        assert!(mirror.remove(&h), "removed before stored");
                    }
                }
                CacheEvent::Cleared => {
                    seen[2] += 1;
                    mirror.clear();
                }
            }
        }
    }
    // Mid-step, the step's scheduling may have evicted or registered blocks whose events
    // come out with the step; between steps the mirror is exact.
    if e.in_flight.is_none() {
        let cached: std::collections::HashSet<u64> = e.pool().cached_hashes().collect();
        assert_eq!(*mirror, cached);
        checks[0] += 1;
    }
}

#[test]
fn kv_events_mirror_the_cache_exactly_and_change_nothing_else() {
    let mut seen = [0u64; 3];
    let mut checks = [0u64; 1];
    let mut preemptions = 0;
    for seed in 0..20u64 {
        let p = EngineProfile {
            num_gpu_blocks: 20,
            max_num_seqs: 6,
            max_num_batched_tokens: 24,
            jitter: 0.1,
            ..profile()
        };
        let mut on = engine(p.clone());
        on.enable_kv_events();
        let mut off = engine(p);
        let mut mirror = std::collections::HashSet::new();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut now = Duration::ZERO;
        let mut outs = (Vec::new(), Vec::new());
        for id in 0..50u64 {
            now += Duration::from_micros(rng.random_range(0..20_000));
            let group = rng.random_range(0..4u32) * 1000;
            let mut prompt = toks(group..group + rng.random_range(4..40));
            prompt.extend(toks(
                id as u32 * 100..id as u32 * 100 + rng.random_range(0..12),
            ));
            let max = rng.random_range(1..24);
            let lora = [None, Some(0), Some(1)][rng.random_range(0..3)];
            let kv = [
                KvTransfer::None,
                KvTransfer::None,
                KvTransfer::RemotePrefill,
            ][rng.random_range(0..3)];
            for (e, out) in [(&mut on, &mut outs.0), (&mut off, &mut outs.1)] {
                e.advance(now);
                let r =
                    EngineRequest::new(id, prompt.clone(), max, FinishReason::Length, lora, kv, 4);
                e.submit(now, r).unwrap();
                out.extend(e.drain_outputs().map(|o| format!("{o:?}")));
            }
            apply_kv_events(&mut on, &mut mirror, &mut seen, &mut checks);
            if id == 25 && on.num_running() + on.num_waiting() == 0 {
                assert!(on.reset_prefix_cache() && off.reset_prefix_cache());
                apply_kv_events(&mut on, &mut mirror, &mut seen, &mut checks);
            }
        }
        while let Some(t) = on.next_wakeup() {
            on.advance(t);
            outs.0.extend(on.drain_outputs().map(|o| format!("{o:?}")));
            apply_kv_events(&mut on, &mut mirror, &mut seen, &mut checks);
        }
        while let Some(t) = off.next_wakeup() {
            off.advance(t);
            outs.1.extend(off.drain_outputs().map(|o| format!("{o:?}")));
        }
        apply_kv_events(&mut on, &mut mirror, &mut seen, &mut checks);
        assert_eq!(
            outs.0, outs.1,
            "seed {seed}: events must not change behaviour"
        );
        assert!(off.take_kv_events().is_empty(), "off means off");
        preemptions += on.stats().preemptions;
        // A reset with nothing running clears the mirror too.
        assert!(on.reset_prefix_cache());
        apply_kv_events(&mut on, &mut mirror, &mut seen, &mut checks);
        assert!(mirror.is_empty());
    }
    assert!(
        seen.iter().all(|&n| n > 0),
        "stored/removed/cleared seen: {seen:?}"
    );
    assert!(preemptions > 0, "the workload must preempt");
    assert!(checks[0] > 100, "exact comparisons: {}", checks[0]);
}

/// The token ids of one finished request's stored blocks, in order (a fresh engine).
fn stored_tokens(e: &mut Engine) -> Vec<u32> {
    let mut out = Vec::new();
    for step in e.take_kv_events() {
        for ev in step.events {
            if let CacheEvent::Stored { token_ids, .. } = ev {
                out.extend(token_ids);
            }
        }
    }
    out
}

#[test]
fn generated_tokens_carry_the_configured_output_ids() {
    // Prompt of 2 blocks, 10 generated tokens: blocks 3 to 5 hold generated tokens.
    let prompt = toks(500..508);
    let mut builtin = engine(profile());
    builtin.enable_kv_events();
    submit(&mut builtin, ms(0), req(1, prompt.clone(), 10));
    run(&mut builtin);
    let got = stored_tokens(&mut builtin);
    assert!(got.len() >= 16, "{got:?}");
    let stored = got.len();
    assert_eq!(got[..8], prompt[..]);
    for (i, t) in got[8..].iter().enumerate() {
        assert_eq!(*t, filler_id(i), "builtin output {i}");
    }

    let mut json = engine(profile());
    json.enable_kv_events();
    json.set_output_ids(Some(Arc::from(vec![7u32, 8, 9])));
    submit(&mut json, ms(0), req(1, prompt.clone(), 10));
    run(&mut json);
    let got = stored_tokens(&mut json);
    assert_eq!(got.len(), stored);
    assert_eq!(got[..8], prompt[..]);
    for (i, t) in got[8..].iter().enumerate() {
        assert_eq!(*t, [7, 8, 9][i % 3], "configured output {i}");
    }
    // The prompt's blocks hash the same either way; the output blocks do not.
    let a: std::collections::HashSet<u64> = builtin.pool().cached_hashes().collect();
    let b: std::collections::HashSet<u64> = json.pool().cached_hashes().collect();
    assert_eq!(a.intersection(&b).count(), 2);

    // An empty list falls back to the built-in ids.
    let mut empty = engine(profile());
    empty.enable_kv_events();
    empty.set_output_ids(Some(Arc::from(Vec::<u32>::new())));
    submit(&mut empty, ms(0), req(1, prompt, 10));
    run(&mut empty);
    assert_eq!(
        empty
            .pool()
            .cached_hashes()
            .collect::<std::collections::HashSet<_>>(),
        a
    );
}
