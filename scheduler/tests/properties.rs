//! Property tests: score ranges, picker contracts, determinism, the prefix index against a
//! reference model, and no panics on arbitrary config or request input.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use infermesh_scheduler::config::params::*;
use infermesh_scheduler::plugins::pickers::{MaxScorePicker, RandomPicker, WeightedRandomPicker};
use infermesh_scheduler::plugins::scorers::*;
use infermesh_scheduler::plugins::{CycleState, Picker, PrefixCycle, Scorer};
use infermesh_scheduler::prefix::PrefixIndex;
use infermesh_scheduler::{
    ApiKind, Endpoint, InferenceRequest, LoraState, Metrics, ResolvedConfig, Scheduler,
    load_config, parse_openai,
};
use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn addr(i: usize) -> SocketAddr {
    SocketAddr::from(([10, 0, (i >> 8) as u8, (i & 0xff) as u8], 8000))
}

/// (running adapters, waiting adapters, max_lora)
type Lora = (u8, u8, u32);
/// (waiting queue, running, kv usage, lora)
type RawMetrics = (u32, u32, f64, Option<Lora>);

#[derive(Debug, Clone)]
struct Ep {
    metrics: Option<RawMetrics>,
    age_ms: u64,
    in_flight: (u32, u64),
}

fn ep_strategy() -> impl Strategy<Value = Ep> {
    let kv = prop_oneof![-1.0f64..2.0, Just(f64::NAN), Just(0.0), Just(1.0)];
    (
        proptest::option::of((
            0u32..1000,
            0u32..1000,
            kv,
            proptest::option::of((0u8..4, 0u8..4, 0u32..5)),
        )),
        0u64..1000,
        (0u32..200, 0u64..10_000_000),
    )
        .prop_map(|(metrics, age_ms, in_flight)| Ep {
            metrics,
            age_ms,
            in_flight,
        })
}

fn build(eps: &[Ep], now: Instant) -> Vec<Endpoint> {
    eps.iter()
        .enumerate()
        .map(|(i, e)| {
            let mut x = Endpoint::new(addr(i), BTreeMap::new());
            x.metrics = e.metrics.map(|(q, r, kv, lora)| Metrics {
                scraped_at: now
                    .checked_sub(Duration::from_millis(e.age_ms))
                    .unwrap_or(now),
                waiting_queue: q,
                running: r,
                kv_cache_usage: kv,
                lora: lora.map(|(run, wait, max)| LoraState {
                    running: (0..run).map(|k| format!("a{k}")).collect(),
                    waiting: (0..wait).map(|k| format!("a{}", k + 2)).collect(),
                    max_lora: max,
                }),
                cache_block_size: None,
                cache_num_blocks: None,
            });
            x.in_flight.requests = e.in_flight.0;
            x.in_flight.tokens = e.in_flight.1;
            x
        })
        .collect()
}

fn scorers() -> Vec<Arc<dyn Scorer>> {
    vec![
        Arc::new(PrefixCacheScorer::default()),
        Arc::new(KvCacheUtilizationScorer),
        Arc::new(QueueScorer),
        Arc::new(RunningRequestsScorer),
        Arc::new(LoraAffinityScorer),
        Arc::new(LoadAwareScorer::new(&LoadAwareParams { threshold: 7 })),
        Arc::new(LoadAwareScorer::new(&LoadAwareParams::default())),
        Arc::new(ActiveRequestScorer::new(&ActiveRequestParams::default())),
        Arc::new(ActiveRequestScorer::new(&ActiveRequestParams {
            idle_threshold: 3,
            max_busy_score: 0.5,
            request_timeout: None,
        })),
        Arc::new(SessionAffinityScorer::new(&SessionAffinityParams::default())),
        Arc::new(SessionAffinityScorer::new(&SessionAffinityParams {
            strategy: SessionStrategy::SessionId,
            ..SessionAffinityParams::default()
        })),
        Arc::new(HeaderLabelAffinityScorer::new(HeaderLabelAffinityParams {
            header_name: "x-zone".into(),
            label_key: "zone".into(),
        })),
        Arc::new(NoHitLruScorer::new(&NoHitLruParams::default())),
        Arc::new(TokenLoadScorer::new(&TokenLoadParams::default())),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn every_score_is_in_unit_range(
        eps in proptest::collection::vec(ep_strategy(), 1..24),
        matched in proptest::collection::vec(0u32..40, 24),
        total in 0usize..40,
        subset_seed in any::<u64>(),
        session in proptest::option::of(0usize..30),
    ) {
        let now = Instant::now();
        let endpoints = build(&eps, now);
        let mut req = InferenceRequest { target_model: "a1".into(), ..Default::default() };
        if let Some(s) = session {
            req.headers.insert(SESSION_TOKEN_HEADER.into(), session_token(addr(s)));
        }
        let prefix = PrefixCycle {
            hashes: (0..total as u64).collect(),
            block_size_tokens: 16,
            matched: matched[..endpoints.len()].iter().map(|m| (*m).min(total as u32)).collect(),
        };
        let cycle = CycleState { request: &req, endpoints: &endpoints, now, prefix: Some(prefix), burst: None, cold: false, peer: None };
        let cands: Vec<usize> = (0..endpoints.len()).filter(|i| (subset_seed >> (i % 64)) & 1 == 1 || *i == 0).collect();
        for s in scorers() {
            let mut out = vec![f64::NAN; cands.len()];
            s.score(&cycle, &cands, &mut out);
            for v in &out {
                prop_assert!((0.0..=1.0).contains(v), "{s:?} gave {v}");
            }
        }
    }

    #[test]
    fn pickers_return_only_distinct_candidates_and_are_deterministic(
        scores in proptest::collection::vec(prop_oneof![0.0f64..8.0, Just(0.0), Just(1.0)], 1..40),
        offset in 0usize..1000,
        max in 1usize..6,
        seed in any::<u64>(),
    ) {
        let cands: Vec<usize> = (0..scores.len()).map(|i| i * 3 + offset).collect();
        let pickers: Vec<Box<dyn Picker>> = vec![
            Box::new(MaxScorePicker::new(max)),
            Box::new(RandomPicker::new(max)),
            Box::new(WeightedRandomPicker::new(max)),
        ];
        for p in &pickers {
            let mut a = Vec::new();
            p.pick(&cands, &scores, &mut ChaCha8Rng::seed_from_u64(seed), &mut a);
            let mut b = Vec::new();
            p.pick(&cands, &scores, &mut ChaCha8Rng::seed_from_u64(seed), &mut b);
            prop_assert_eq!(&a, &b);
            prop_assert_eq!(a.len(), max.min(cands.len()));
            prop_assert!(a.iter().all(|x| cands.contains(x)));
            let mut d = a.clone();
            d.sort_unstable();
            d.dedup();
            prop_assert_eq!(d.len(), a.len());
        }
        // max-score: the first pick has the highest score.
        let mut a = Vec::new();
        MaxScorePicker::new(max).pick(&cands, &scores, &mut ChaCha8Rng::seed_from_u64(seed), &mut a);
        let best = scores.iter().cloned().fold(f64::MIN, f64::max);
        let pos = cands.iter().position(|c| *c == a[0]).unwrap();
        prop_assert_eq!(scores[pos], best);
    }

    #[test]
    fn scheduling_is_deterministic_and_picks_candidates(
        eps in proptest::collection::vec(ep_strategy(), 1..32),
        prompt in proptest::collection::vec(any::<u8>(), 0..3000),
        seed in any::<u64>(),
    ) {
        let now = Instant::now();
        let endpoints = build(&eps, now);
        let req = InferenceRequest { target_model: "m".into(), prompt_bytes: prompt, ..Default::default() };
        let a = Scheduler::new(&ResolvedConfig::builtin_default()).unwrap();
        let b = Scheduler::new(&ResolvedConfig::builtin_default()).unwrap();
        let mut ra = a.schedule(&req, &endpoints, now, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
        let mut rb = b.schedule(&req, &endpoints, now, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
        // Plugin timings are measurements, not decisions: same calls, different durations.
        prop_assert_eq!(
            ra.plugin_timings.iter().map(|t| t.plugin).collect::<Vec<_>>(),
            rb.plugin_timings.iter().map(|t| t.plugin).collect::<Vec<_>>()
        );
        ra.plugin_timings.clear();
        rb.plugin_timings.clear();
        prop_assert_eq!(&ra, &rb);
        prop_assert!(ra.destinations().iter().all(|d| endpoints.iter().any(|e| e.address == *d)));
        a.pre_request(&req, &ra, now);
        let again = a.schedule(&req, &endpoints, now, &mut ChaCha8Rng::seed_from_u64(seed)).unwrap();
        if let Some(pm) = again.prefix_match {
            // After recording, the recorded endpoint holds the whole chain.
            let holder = ra.destinations()[0];
            let m = a.prefix_index().unwrap().match_prefix(&pm.hashes);
            prop_assert_eq!(m.get(holder) as usize, pm.hashes.len());
        }
    }
}

/// Reference model of the index: per-endpoint LRU as a deque, most recent at the back.
#[derive(Default)]
struct Model {
    lru: HashMap<SocketAddr, (usize, VecDeque<u64>)>,
}

impl Model {
    fn record(&mut self, a: SocketAddr, cap: usize, chain: &[u64]) {
        // Recording an empty chain is a no-op (not even a capacity change).
        if chain.is_empty() {
            return;
        }
        let cap = cap.max(1);
        let e = self.lru.entry(a).or_insert_with(|| (cap, VecDeque::new()));
        e.0 = cap;
        while e.1.len() > cap {
            e.1.pop_front();
        }
        for h in chain {
            if let Some(p) = e.1.iter().position(|x| x == h) {
                e.1.remove(p);
            } else if e.1.len() >= cap {
                e.1.pop_front();
            }
            e.1.push_back(*h);
        }
    }
    fn holders(&self, h: u64) -> Vec<SocketAddr> {
        let mut v: Vec<_> = self
            .lru
            .iter()
            .filter(|(_, (_, d))| d.contains(&h))
            .map(|(a, _)| *a)
            .collect();
        v.sort();
        v
    }
}

#[derive(Debug, Clone)]
enum Op {
    Record(usize, usize, Vec<u64>),
    Remove(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0usize..5, 1usize..12, proptest::collection::vec(0u64..30, 0..15)).prop_map(|(a, c, v)| Op::Record(a, c, v)),
        1 => (0usize..5).prop_map(Op::Remove),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn index_matches_reference_lru(ops in proptest::collection::vec(op(), 1..60)) {
        // Hashes 0..30 spread over shards by their high bits.
        let spread = |h: u64| h.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let idx = PrefixIndex::default();
        let mut model = Model::default();
        for o in &ops {
            match o {
                Op::Record(a, c, v) => {
                    let chain: Vec<u64> = v.iter().map(|h| spread(*h)).collect();
                    idx.record(addr(*a), *c, &chain);
                    model.record(addr(*a), *c, &chain);
                }
                Op::Remove(a) => {
                    idx.remove_endpoint(addr(*a));
                    model.lru.remove(&addr(*a));
                }
            }
            for a in 0..5 {
                let want = model.lru.get(&addr(a)).map_or(0, |(_, d)| d.len());
                prop_assert_eq!(idx.endpoint_len(addr(a)), want);
                if let Some((cap, d)) = model.lru.get(&addr(a)) {
                    prop_assert!(d.len() <= *cap);
                }
            }
            let mut total = 0;
            for h in 0..30u64 {
                let h = spread(h);
                let holders = model.holders(h);
                total += holders.len();
                for a in 0..5 {
                    prop_assert_eq!(idx.contains(addr(a), h), holders.contains(&addr(a)));
                }
                let mut got: Vec<SocketAddr> = idx.match_prefix(&[h]).entries.iter().map(|(a, _)| *a).collect();
                got.sort();
                prop_assert_eq!(got, holders);
            }
            prop_assert_eq!(idx.entries(), total);
        }
    }
}

const KEYS: &[&str] = &[
    "apiVersion",
    "kind",
    "plugins",
    "schedulingProfiles",
    "name",
    "type",
    "parameters",
    "pluginRef",
    "weight",
    "saturationDetector",
    "dataLayer",
    "sources",
    "extractors",
    "featureGates",
    "parser",
    "threshold",
    "maxNumOfEndpoints",
    "matchLabels",
    "matchExpressions",
    "key",
    "operator",
    "values",
    "deciders",
    "profiles",
    "prefill",
    "decode",
    "blockSizeTokens",
    "autoTune",
    "lruSize",
    "queueDepthThreshold",
    "metricsStalenessThreshold",
    "injectDefaults",
    "engineConfigs",
];
const VALUES: &[&str] = &[
    "llm-d.ai/v1alpha1",
    "EndpointPickerConfig",
    "queue-scorer",
    "prefix-cache-scorer",
    "max-score-picker",
    "decode-filter",
    "prefill-filter",
    "disagg-profile-handler",
    "prefix-based-pd-decider",
    "label-selector-filter",
    "utilization-detector",
    "metrics-data-source",
    "core-metrics-extractor",
    "default",
    "decode",
    "prefill",
    "In",
    "Exists",
    "1",
    "-3",
    "0.5",
    "2.0",
    ".nan",
    "200ms",
    "true",
    "null",
    "~",
    "[]",
    "{}",
    "x",
    "\"quoted\"",
    "'q'",
    "&a",
    "*a",
    "!!binary aGk=",
    "1e999",
];

fn yaml_node(depth: u32) -> BoxedStrategy<String> {
    let leaf = proptest::sample::select(VALUES)
        .prop_map(|s| s.to_string())
        .boxed();
    if depth == 0 {
        return leaf;
    }
    prop_oneof![
        3 => leaf,
        2 => proptest::collection::vec((proptest::sample::select(KEYS), yaml_node(depth - 1)), 0..5)
            .prop_map(|kv| format!("{{{}}}", kv.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join(", "))),
        2 => proptest::collection::vec(yaml_node(depth - 1), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
    ]
    .boxed()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn config_loader_never_panics_on_arbitrary_text(s in ".{0,300}") {
        let _ = load_config(&s);
    }

    #[test]
    fn config_loader_never_panics_on_config_shaped_yaml(
        body in proptest::collection::vec((proptest::sample::select(KEYS), yaml_node(3)), 0..8),
        header in any::<bool>(),
    ) {
        let mut s = String::new();
        if header {
            s.push_str("apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n");
        }
        for (k, v) in body {
            s.push_str(&format!("{k}: {v}\n"));
        }
        if let Ok(cfg) = load_config(&s) {
            // Whatever loads must also build and render.
            let _ = cfg.to_string();
            prop_assert!(Scheduler::new(&cfg).is_ok());
        }
    }

    #[test]
    fn openai_parser_never_panics(body in proptest::collection::vec(any::<u8>(), 0..200), chat in any::<bool>()) {
        let kind = if chat { ApiKind::ChatCompletions } else { ApiKind::Completions };
        let _ = parse_openai(kind, &body);
    }

    #[test]
    fn openai_parser_never_panics_on_json_shapes(v in yaml_node(3), chat in any::<bool>()) {
        let kind = if chat { ApiKind::ChatCompletions } else { ApiKind::Completions };
        let body = format!("{{\"model\": \"m\", \"messages\": {v}, \"prompt\": {v}}}");
        let _ = parse_openai(kind, body.as_bytes());
    }
}

const ROLES: &[&str] = &[
    "",
    "prefill",
    "decode",
    "prefill-decode",
    "both",
    "encode",
    "encode-prefill",
    "encode-prefill-decode",
    "weird",
];

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    #[test]
    fn pd_targets_respect_roles(
        roles in proptest::collection::vec(0usize..ROLES.len(), 1..20),
        queues in proptest::collection::vec(0u32..10, 20),
        prompt_len in 0usize..2000,
        seed in any::<u64>(),
    ) {
        let path = format!("{}/tests/fixtures/pd-epp-config.yaml", env!("CARGO_MANIFEST_DIR"));
        let s = Scheduler::new(&load_config(&std::fs::read_to_string(path).unwrap()).unwrap()).unwrap();
        let now = Instant::now();
        let eps: Vec<Endpoint> = roles
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut labels = BTreeMap::new();
                if !ROLES[*r].is_empty() {
                    labels.insert("llm-d.ai/role".to_owned(), ROLES[*r].to_owned());
                }
                let mut e = Endpoint::new(addr(i), labels);
                let mut m = Metrics::idle(now);
                m.waiting_queue = queues[i];
                e.metrics = Some(m);
                e
            })
            .collect();
        let decode_ok = |a: &SocketAddr| {
            let e = eps.iter().find(|e| e.address == *a).unwrap();
            matches!(e.labels.get("llm-d.ai/role").map(String::as_str), None | Some("decode" | "prefill-decode" | "both" | "encode-prefill-decode"))
        };
        let prefill_ok = |a: &SocketAddr| {
            let e = eps.iter().find(|e| e.address == *a).unwrap();
            matches!(e.labels.get("llm-d.ai/role").map(String::as_str), Some("prefill" | "encode-prefill" | "prefill-decode" | "both" | "encode-prefill-decode"))
        };
        let req = InferenceRequest { target_model: "m".into(), prompt_bytes: vec![b'x'; prompt_len], ..Default::default() };
        let any_decode = eps.iter().any(|e| decode_ok(&e.address));
        match s.schedule(&req, &eps, now, &mut ChaCha8Rng::seed_from_u64(seed)) {
            Ok(r) => {
                prop_assert!(r.destinations().iter().all(decode_ok));
                if let Some(p) = r.profiles.get("prefill") {
                    prop_assert!(p.targets.iter().all(prefill_ok));
                    prop_assert_eq!(r.extra_headers().len(), 1);
                } else {
                    prop_assert!(r.extra_headers().is_empty());
                }
            }
            Err(_) => prop_assert!(!any_decode),
        }
    }
}
