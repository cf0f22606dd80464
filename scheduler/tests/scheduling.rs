//! End-to-end scheduling behaviour of the built-in plugins through `Scheduler`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use infermesh_scheduler::plugins::profiles::PREFILLER_HEADER;
use infermesh_scheduler::plugins::scorers::{SESSION_TOKEN_HEADER, session_token};
use infermesh_scheduler::{
    Endpoint, InferenceRequest, LoraState, Metrics, Rejected, ResolvedConfig, Scheduler,
    load_config,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const HEAD: &str = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n";

fn sched(body: &str) -> Scheduler {
    let cfg = load_config(&format!("{HEAD}{body}")).unwrap_or_else(|e| panic!("{e}"));
    Scheduler::new(&cfg).unwrap()
}

fn ep(i: u16, labels: &[(&str, &str)], queue: u32, kv: f64, now: Instant) -> Endpoint {
    let labels: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let mut e = Endpoint::new(SocketAddr::from(([10, 0, 0, 1], 8000 + i)), labels);
    let mut m = Metrics::idle(now);
    m.waiting_queue = queue;
    m.kv_cache_usage = kv;
    e.metrics = Some(m);
    e
}

fn req(prompt_len: usize) -> InferenceRequest {
    InferenceRequest {
        id: "r".into(),
        model: "m".into(),
        target_model: "m".into(),
        prompt_bytes: (0..prompt_len).map(|i| b'a' + (i % 26) as u8).collect(),
        fairness_id: "default-flow".into(),
        ..Default::default()
    }
}

fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

fn fixture(name: &str) -> Scheduler {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    Scheduler::new(&load_config(&std::fs::read_to_string(path).unwrap()).unwrap()).unwrap()
}

#[test]
fn pd_splits_prefill_until_the_decode_pod_holds_the_prefix() {
    let s = fixture("pd-epp-config.yaml");
    let now = Instant::now();
    let eps = vec![
        ep(0, &[("llm-d.ai/role", "prefill")], 0, 0.1, now),
        ep(1, &[("llm-d.ai/role", "decode")], 0, 0.1, now),
        ep(2, &[("llm-d.ai/role", "decode")], 4, 0.1, now),
    ];
    // 400 bytes = 100 tokens >= nonCachedTokens (16): prefill runs on the prefill pod.
    let r1 = req(400);
    let res = s.schedule(&r1, &eps, now, &mut rng(1)).unwrap();
    assert_eq!(res.primary_profile, "decode");
    assert_eq!(res.destinations(), &[eps[1].address]);
    assert_eq!(res.profiles["prefill"].targets, vec![eps[0].address]);
    assert_eq!(
        res.extra_headers(),
        vec![(PREFILLER_HEADER.to_owned(), "10.0.0.1:8000".to_owned())]
    );
    s.pre_request(&r1, &res, now);
    // Both the decode and the prefill pod now hold the blocks.
    let idx = s.prefix_index().unwrap();
    let h = &res.prefix_match.as_ref().unwrap().hashes;
    assert!(idx.contains(eps[0].address, h[0]) && idx.contains(eps[1].address, h[0]));
    // Same prompt again: the decode pod has everything cached, so no prefill stage.
    let res2 = s.schedule(&r1, &eps, now, &mut rng(2)).unwrap();
    assert_eq!(res2.destinations(), &[eps[1].address]);
    assert!(!res2.profiles.contains_key("prefill"));
    assert!(res2.extra_headers().is_empty());
    // A short prompt (< 16 tokens) never splits.
    let res3 = s.schedule(&req(40), &eps, now, &mut rng(3)).unwrap();
    assert!(!res3.profiles.contains_key("prefill"));
}

#[test]
fn pd_without_decode_pods_is_unavailable() {
    let s = fixture("pd-epp-config.yaml");
    let now = Instant::now();
    let eps = vec![ep(0, &[("llm-d.ai/role", "prefill")], 0, 0.1, now)];
    assert!(s.schedule(&req(400), &eps, now, &mut rng(1)).is_err());
}

#[test]
fn always_disagg_decider_and_flat_legacy_parameters() {
    let s = sched(
        "plugins:\n- type: decode-filter\n- type: prefill-filter\n- type: always-disagg-pd-decider\n- type: disagg-profile-handler\n  parameters:\n    decodeProfile: d\n    prefillProfile: p\n    deciderPluginName: always-disagg-pd-decider\nschedulingProfiles:\n- name: d\n  plugins: [{pluginRef: decode-filter}]\n- name: p\n  plugins: [{pluginRef: prefill-filter}]\n",
    );
    let now = Instant::now();
    let eps = vec![
        ep(0, &[("llm-d.ai/role", "prefill")], 0, 0.0, now),
        ep(1, &[], 0, 0.0, now),
    ];
    let res = s.schedule(&req(10), &eps, now, &mut rng(1)).unwrap();
    // Unlabelled pods pass the decode filter, not the prefill filter.
    assert_eq!(res.destinations(), &[eps[1].address]);
    assert_eq!(res.profiles["p"].targets, vec![eps[0].address]);
}

#[test]
fn label_selector_fixture_filters_and_returns_fallbacks() {
    let s = fixture("label-selector-config.yaml");
    let now = Instant::now();
    let good = [("accelerator", "h100"), ("zone", "a")];
    let eps = vec![
        ep(0, &good, 0, 0.1, now),
        ep(1, &[("accelerator", "h100"), ("zone", "c")], 0, 0.1, now),
        ep(
            2,
            &[("accelerator", "h100"), ("zone", "b"), ("draining", "yes")],
            0,
            0.1,
            now,
        ),
        ep(
            3,
            &[("accelerator", "h100"), ("zone", "b"), ("track", "canary")],
            0,
            0.1,
            now,
        ),
        ep(4, &[("accelerator", "h100"), ("zone", "b")], 3, 0.5, now),
        ep(5, &[("accelerator", "a100"), ("zone", "a")], 0, 0.1, now),
    ];
    let res = s.schedule(&req(100), &eps, now, &mut rng(1)).unwrap();
    // Only 0 and 4 pass; maxNumOfEndpoints 3 returns both, better first.
    assert_eq!(res.destinations(), &[eps[0].address, eps[4].address]);
    assert_eq!(res.header_value(), "10.0.0.1:8000,10.0.0.1:8004");
}

#[test]
fn admission_sheds_only_sheddable_requests_when_saturated() {
    let s = Scheduler::new(&ResolvedConfig::builtin_default()).unwrap();
    let now = Instant::now();
    let busy = vec![ep(0, &[], 10, 0.9, now), ep(1, &[], 5, 0.5, now)];
    let idle = vec![ep(0, &[], 0, 0.1, now), ep(1, &[], 1, 0.2, now)];
    let mut sheddable = req(10);
    sheddable.priority = -1;
    assert!(s.saturation(&busy, now) >= 1.0);
    assert!(matches!(
        s.admit(&sheddable, &busy, now),
        Err(Rejected::Saturated { .. })
    ));
    assert!(s.admit(&req(10), &busy, now).is_ok());
    assert!(s.admit(&sheddable, &idle, now).is_ok());
    // Stale metrics count as saturated (200 ms default).
    let later = now + Duration::from_millis(500);
    assert_eq!(s.saturation(&idle, later), 1.0);
    assert!(s.admit(&sheddable, &idle, later).is_err());
    assert!(s.admit(&sheddable, &[], now).is_err());
}

#[test]
fn utilization_detector_as_filter_fails_open() {
    let s = sched(
        "plugins:\n- type: utilization-detector\n- type: random-picker\nschedulingProfiles:\n- name: x\n  plugins: [{pluginRef: utilization-detector}, {pluginRef: random-picker}]\n",
    );
    let now = Instant::now();
    let eps = vec![
        ep(0, &[], 9, 0.1, now),
        ep(1, &[], 0, 0.95, now),
        ep(2, &[], 1, 0.2, now),
    ];
    for seed in 0..10 {
        let r = s.schedule(&req(10), &eps, now, &mut rng(seed)).unwrap();
        assert_eq!(r.destinations(), &[eps[2].address]);
    }
    // Everything over the limit: fail open.
    let hot = vec![ep(0, &[], 9, 0.1, now), ep(1, &[], 9, 0.1, now)];
    assert!(s.schedule(&req(10), &hot, now, &mut rng(1)).is_ok());
}

#[test]
fn session_affinity_follows_the_token_and_sets_it() {
    let s = sched(
        "plugins:\n- type: session-affinity-scorer\n- type: queue-scorer\nschedulingProfiles:\n- name: x\n  plugins: [{pluginRef: session-affinity-scorer, weight: 10}, {pluginRef: queue-scorer}]\n",
    );
    let now = Instant::now();
    let eps = vec![ep(0, &[], 0, 0.1, now), ep(1, &[], 5, 0.1, now)];
    let first = s.schedule(&req(10), &eps, now, &mut rng(1)).unwrap();
    assert_eq!(first.destinations(), &[eps[0].address]);
    assert_eq!(
        first.response_headers,
        vec![(
            SESSION_TOKEN_HEADER.to_owned(),
            session_token(eps[0].address)
        )]
    );
    let mut r = req(10);
    r.headers
        .insert(SESSION_TOKEN_HEADER.into(), session_token(eps[1].address));
    let sticky = s.schedule(&r, &eps, now, &mut rng(1)).unwrap();
    assert_eq!(sticky.destinations(), &[eps[1].address]);
}

#[test]
fn lora_affinity_prefers_loaded_adapter() {
    let s = sched(
        "plugins:\n- type: lora-affinity-scorer\nschedulingProfiles:\n- name: x\n  plugins: [{pluginRef: lora-affinity-scorer}]\n",
    );
    let now = Instant::now();
    let mut eps = vec![ep(0, &[], 0, 0.1, now), ep(1, &[], 0, 0.1, now)];
    eps[1].metrics.as_mut().unwrap().lora = Some(LoraState {
        running: vec!["m".into()],
        waiting: vec![],
        max_lora: 2,
    });
    eps[0].metrics.as_mut().unwrap().lora = Some(LoraState {
        running: vec!["x".into(), "y".into()],
        waiting: vec![],
        max_lora: 2,
    });
    let r = s.schedule(&req(10), &eps, now, &mut rng(1)).unwrap();
    assert_eq!(r.destinations(), &[eps[1].address]);
}

#[test]
fn no_hit_lru_spreads_cold_requests() {
    let s = fixture("sim-epp-no-hit-lru.yaml");
    let now = Instant::now();
    let eps: Vec<Endpoint> = (0..4).map(|i| ep(i, &[], 0, 0.1, now)).collect();
    let mut seen = std::collections::BTreeSet::new();
    for k in 0..4u8 {
        // Distinct cold prompts.
        let mut r = req(0);
        r.prompt_bytes = vec![b'a' + k; 100];
        let res = s.schedule(&r, &eps, now, &mut rng(u64::from(k))).unwrap();
        assert!(res.cold);
        s.pre_request(&r, &res, now);
        seen.insert(res.destinations()[0]);
    }
    // Each cold request went to a pod that had not served one yet.
    assert_eq!(seen.len(), 4);
}

#[test]
fn autotune_takes_block_size_and_capacity_from_cache_info() {
    let s = Scheduler::new(&ResolvedConfig::builtin_default()).unwrap();
    let now = Instant::now();
    let mut eps = vec![ep(0, &[], 0, 0.1, now)];
    let m = eps[0].metrics.as_mut().unwrap();
    m.cache_block_size = Some(32);
    m.cache_num_blocks = Some(3);
    let r = req(1000);
    let res = s.schedule(&r, &eps, now, &mut rng(1)).unwrap();
    let pm = res.prefix_match.clone().unwrap();
    // A 32-token cache block is indexed at the 64-token floor (llm-d PR #1160).
    assert_eq!(pm.block_size_tokens, 64);
    assert_eq!(pm.total_blocks(), 1000usize.div_ceil(64 * 4));
    assert_eq!(res.cache_targets, vec![(eps[0].address, 3)]);
    s.pre_request(&r, &res, now);
    assert_eq!(s.prefix_index().unwrap().endpoint_len(eps[0].address), 3);
    // A cache block above the floor is taken as reported.
    eps[0].metrics.as_mut().unwrap().cache_block_size = Some(128);
    let res = s.schedule(&r, &eps, now, &mut rng(1)).unwrap();
    let pm = res.prefix_match.unwrap();
    assert_eq!(pm.block_size_tokens, 128);
    assert_eq!(pm.total_blocks(), 1000usize.div_ceil(128 * 4));
}

#[test]
fn explicit_block_size_without_autotune_is_not_raised_to_the_floor() {
    let s = sched(
        "plugins:\n- type: approx-prefix-cache-producer\n  parameters: {autoTune: false, blockSizeTokens: 16}\n- type: prefix-cache-scorer\n- type: queue-scorer\nschedulingProfiles:\n- name: x\n  plugins: [{pluginRef: prefix-cache-scorer}, {pluginRef: queue-scorer}]\n",
    );
    let now = Instant::now();
    let mut eps = vec![ep(0, &[], 0, 0.1, now)];
    eps[0].metrics.as_mut().unwrap().cache_block_size = Some(32);
    let res = s.schedule(&req(1000), &eps, now, &mut rng(1)).unwrap();
    let pm = res.prefix_match.unwrap();
    assert_eq!(pm.block_size_tokens, 16);
    assert_eq!(pm.total_blocks(), 1000usize.div_ceil(16 * 4));
}

#[test]
fn prefix_affinity_filter_keeps_sticky_endpoints() {
    let s = sched(
        "plugins:\n- type: prefix-cache-affinity-filter\n  parameters: {explorationProbability: 0}\n- type: queue-scorer\nschedulingProfiles:\n- name: x\n  plugins: [{pluginRef: prefix-cache-affinity-filter}, {pluginRef: queue-scorer}]\n",
    );
    let now = Instant::now();
    let eps = vec![ep(0, &[], 7, 0.1, now), ep(1, &[], 0, 0.1, now)];
    let r = req(640);
    // Cold: everyone passes; queue picks 1. Record it at 0 instead by scheduling with 1 busy.
    let busy1 = vec![ep(0, &[], 0, 0.1, now), ep(1, &[], 7, 0.1, now)];
    let first = s.schedule(&r, &busy1, now, &mut rng(1)).unwrap();
    assert_eq!(first.destinations(), &[eps[0].address]);
    s.pre_request(&r, &first, now);
    // Now 0 is sticky (score 1.0 >= 0.8) and wins despite its queue.
    let second = s.schedule(&r, &eps, now, &mut rng(1)).unwrap();
    assert_eq!(second.destinations(), &[eps[0].address]);
}

#[test]
fn remote_prefix_matches_drive_the_pick() {
    use infermesh_scheduler::{PrefixMatches, PrefixSource};
    let s = Scheduler::new(&ResolvedConfig::builtin_default()).unwrap();
    let now = Instant::now();
    let eps: Vec<Endpoint> = (0..3).map(|i| ep(i, &[], 0, 0.1, now)).collect();
    // autoTune without cache info: blockSizeTokens 16 raised to the 64-token floor.
    let r = req(2560);
    let chain = s.prefix_chain(&r, &eps).unwrap();
    assert_eq!(chain.block_size_tokens, 64);
    assert_eq!(chain.hashes.len(), 10);
    assert_eq!(chain.anchor(), Some(chain.hashes[0]));
    // The owner says endpoint 2 holds 8 blocks (and claims an impossible 99 for 1: clamped).
    let matches = PrefixMatches {
        entries: vec![(eps[2].address, 8)],
    };
    let res = s
        .schedule_with_prefix(
            &r,
            &eps,
            now,
            &mut rng(1),
            PrefixSource::Remote {
                chain: &chain,
                matches: &matches,
            },
        )
        .unwrap();
    assert_eq!(res.destinations(), &[eps[2].address]);
    assert_eq!(res.prefix_match.as_ref().unwrap().matched_blocks, 8);
    assert!(!res.prefix_local);
    // Remote data is recorded by the owner, not in the local index.
    s.pre_request(&r, &res, now);
    assert_eq!(s.prefix_index().unwrap().entries(), 0);
    // Owner unavailable: still schedules, cold, with the chain to record later.
    let res = s
        .schedule_with_prefix(&r, &eps, now, &mut rng(1), PrefixSource::Unavailable)
        .unwrap();
    assert!(res.cold);
    assert_eq!(res.prefix_match.unwrap().hashes, chain.hashes);
}

#[test]
fn concurrency_detector_admits_and_filters_on_in_flight() {
    let s = sched(
        "plugins:\n- type: concurrency-detector\n  parameters: {maxConcurrency: 4}\n- type: queue-scorer\nsaturationDetector:\n  pluginRef: concurrency-detector\nschedulingProfiles:\n- name: x\n  plugins: [{pluginRef: concurrency-detector}, {pluginRef: queue-scorer}]\n",
    );
    let now = Instant::now();
    let mut eps = vec![ep(0, &[], 0, 0.1, now), ep(1, &[], 3, 0.1, now)];
    eps[0].in_flight.requests = 4;
    eps[1].in_flight.requests = 1;
    // Endpoint 0 is at its limit: filtered out despite the better queue.
    let r = s.schedule(&req(10), &eps, now, &mut rng(1)).unwrap();
    assert_eq!(r.destinations(), &[eps[1].address]);
    let mut shed = req(10);
    shed.priority = -5;
    assert!(s.admit(&shed, &eps, now).is_ok()); // 5 / 8
    eps[1].in_flight.requests = 4;
    assert!(s.admit(&shed, &eps, now).is_err()); // 8 / 8
    assert!(s.schedule(&req(10), &eps, now, &mut rng(1)).is_err());
}

/// Same in-flight count and queue: the endpoint whose request already answered (decoding)
/// is picked over the one still prefilling; with the scorer absent they tie.
#[test]
fn prefill_load_scorer_prefers_endpoints_whose_requests_have_answered() {
    let s = sched(
        "plugins:\n- type: prefill-load-scorer\n- type: max-score-picker\nschedulingProfiles:\n- name: x\n  plugins: [{pluginRef: prefill-load-scorer}, {pluginRef: max-score-picker}]\n",
    );
    let now = Instant::now();
    for busy in 0..2u16 {
        let mut eps = vec![ep(0, &[], 0, 0.1, now), ep(1, &[], 0, 0.1, now)];
        for e in &mut eps {
            e.in_flight.requests = 1;
        }
        eps[usize::from(busy)].in_flight.prefilling = 1;
        for seed in 0..8 {
            let r = s.schedule(&req(10), &eps, now, &mut rng(seed)).unwrap();
            assert_eq!(r.destinations(), &[eps[usize::from(1 - busy)].address]);
        }
    }
    let bad = load_config(&format!(
        "{HEAD}plugins:\n- type: prefill-load-scorer\n  parameters: {{weight: 2}}\n"
    ));
    assert!(bad.is_err(), "the scorer takes no parameters");
}

/// `concurrency-detector` with these parameters as the saturation detector and the only
/// filter, before a queue scorer; two endpoints loaded as `loads` says (requests, tokens,
/// prefilling); and a sheddable request to admit.
fn concurrency_case(
    params: &str,
    loads: [(u32, u64, u32); 2],
    now: Instant,
) -> (Scheduler, Vec<Endpoint>, InferenceRequest) {
    let s = sched(&format!(
        "plugins:\n- type: concurrency-detector\n  parameters: {params}\n- type: queue-scorer\nsaturationDetector:\n  pluginRef: concurrency-detector\nschedulingProfiles:\n- name: x\n  plugins: [{{pluginRef: concurrency-detector}}, {{pluginRef: queue-scorer}}]\n"
    ));
    let eps = (0u16..)
        .zip(loads)
        .map(|(i, (requests, tokens, prefilling))| Endpoint {
            in_flight: infermesh_scheduler::InFlight {
                requests,
                tokens,
                prefilling,
            },
            ..ep(i, &[], 0, 0.1, now)
        })
        .collect();
    let mut shed = req(10);
    shed.priority = -5;
    (s, eps, shed)
}

/// With `maxPrefillConcurrency`, a pod that is only decoding has room while one that is
/// prefilling does not, and the pool is saturated once every pod prefills.
#[test]
fn prefill_concurrency_counts_requests_before_their_first_token() {
    let now = Instant::now();
    // Endpoint 0 prefills one request (1/1); endpoint 1 decodes three (3/4, none prefilling).
    let params = "{maxConcurrency: 4, maxPrefillConcurrency: 1}";
    let (s, mut eps, shed) = concurrency_case(params, [(1, 0, 1), (3, 0, 0)], now);
    // Mean (1.0 + 0.75) / 2 < 1: admitted; requests alone would say 4/8.
    assert!(s.admit(&shed, &eps, now).is_ok());
    // The prefilling endpoint is filtered out although it runs fewer requests.
    for seed in 0..8 {
        let r = s.schedule(&req(10), &eps, now, &mut rng(seed)).unwrap();
        assert_eq!(r.destinations(), &[eps[1].address]);
    }
    // Both prefilling: saturated although neither is at its request limit.
    eps[1].in_flight.prefilling = 1;
    assert!(s.admit(&shed, &eps, now).is_err());
    let bad = load_config(&format!(
        "{HEAD}plugins:\n- type: concurrency-detector\n  parameters: {{maxPrefillConcurrency: 0}}\n- type: queue-scorer\n"
    ));
    let err = bad
        .expect_err("a zero prefill limit is refused")
        .to_string();
    assert!(err.contains("maxPrefillConcurrency"), "{err}");
}

#[test]
fn hybrid_concurrency_takes_the_larger_ratio_per_endpoint_and_averages() {
    let now = Instant::now();
    // Endpoint 0: requests 1/4 but tokens 900/1000 -> 0.9; endpoint 1: 3/4 and 0 -> 0.75.
    let params = "{concurrencyMode: hybrid, maxConcurrency: 4, maxTokenConcurrency: 1000}";
    let (s, mut eps, shed) = concurrency_case(params, [(1, 900, 0), (3, 0, 0)], now);
    // Mean 0.825 < 1: admitted (requests mode alone would say 4/8, tokens 0.45).
    assert!(s.admit(&shed, &eps, now).is_ok());
    // Token-full endpoint 0 is filtered out although its request count is low.
    eps[0].in_flight.tokens = 1000;
    let r = s.schedule(&req(10), &eps, now, &mut rng(1)).unwrap();
    assert_eq!(r.destinations(), &[eps[1].address]);
    // Both ends full in one measure each: mean (1.0 + 1.0) / 2 = 1.0, saturated.
    eps[1].in_flight.requests = 4;
    assert!(s.admit(&shed, &eps, now).is_err());
    let bad = load_config(&format!(
        "{HEAD}plugins:\n- type: concurrency-detector\n  parameters: {{concurrencyMode: both}}\n- type: queue-scorer\n"
    ));
    assert!(bad.is_err(), "an unknown mode is refused");
}
