//! llm-d v0.10 parameters that changed (issue 19): `prefix-cache-scorer`'s match-length
//! term, the approximate prefix autoTune floor (in `scheduling.rs`), and
//! `inflight-load-producer`'s output-token estimate. Loading with defaults, refusals that
//! name the field, and the effect on scheduling.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

use infermesh_scheduler::config::params::{InflightLoadParams, PrefixScorerParams};
use infermesh_scheduler::config::{ConfigError, PluginSpec};
use infermesh_scheduler::{
    Endpoint, InferenceRequest, Metrics, PrefixMatches, PrefixSource, ResolvedConfig, Scheduler,
    load_config,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const HEAD: &str = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n";

#[allow(clippy::result_large_err)] // the loader's own error type, matched by the tests
fn load(body: &str) -> Result<ResolvedConfig, ConfigError> {
    load_config(&format!("{HEAD}{body}"))
}

fn sched(body: &str) -> Scheduler {
    Scheduler::new(&load(body).unwrap_or_else(|e| panic!("{e}"))).unwrap()
}

/// The field an `InvalidParameter` error names (panics on any other outcome).
fn bad_field(body: &str) -> String {
    match load(body) {
        Err(ConfigError::InvalidParameter { field, .. }) => field,
        other => panic!("expected InvalidParameter, got {other:?}"),
    }
}

fn ep(i: u16, queue: u32, now: Instant) -> Endpoint {
    let mut e = Endpoint::new(SocketAddr::from(([10, 0, 0, 1], 8000 + i)), BTreeMap::new());
    let mut m = Metrics::idle(now);
    m.waiting_queue = queue;
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

#[test]
fn fixture_loads_with_the_resolved_defaults() {
    let path = format!(
        "{}/tests/fixtures/v010-changed-params.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let cfg = load_config(&std::fs::read_to_string(path).unwrap()).unwrap();
    Scheduler::new(&cfg).unwrap();
    let Some(PluginSpec::PrefixCacheScorer(p)) = cfg.plugin("prefix-cache-scorer").map(|p| &p.spec)
    else {
        panic!("prefix-cache-scorer missing");
    };
    assert_eq!(p.match_length_weight, 0.3);
    assert_eq!(p.match_length_scale_tokens, 8192, "llm-d's default scale");
    assert_eq!(p.producer, None);
    let Some(PluginSpec::InflightLoadProducer(p)) = cfg.plugin("inflight-load").map(|p| &p.spec)
    else {
        panic!("inflight-load missing");
    };
    assert!(p.add_estimated_output_tokens);
    assert_eq!(p.output_ratio, 1.5, "llm-d's default ratio");
    assert_eq!(p.max_estimated_output_tokens, Some(2048));
    assert!(
        cfg.warnings
            .iter()
            .any(|w| w.contains("prefixMatchInfoProducerName")),
        "the missing cached-prefix discount is reported, not silent: {:?}",
        cfg.warnings
    );
}

#[test]
fn absent_parameters_take_llm_d_defaults() {
    let d = PrefixScorerParams::default();
    assert_eq!(
        (d.match_length_weight, d.match_length_scale_tokens),
        (0.0, 8192)
    );
    let d = InflightLoadParams::default();
    assert!(!d.add_estimated_output_tokens);
    assert_eq!(d.output_ratio, 1.5);
    assert_eq!(d.max_estimated_output_tokens, None);
    let cfg =
        load("plugins:\n- type: prefix-cache-scorer\n- type: inflight-load-producer\n").unwrap();
    assert_eq!(
        cfg.plugin("prefix-cache-scorer").unwrap().spec,
        PluginSpec::PrefixCacheScorer(PrefixScorerParams::default())
    );
    assert_eq!(
        cfg.plugin("inflight-load-producer").unwrap().spec,
        PluginSpec::InflightLoadProducer(InflightLoadParams::default())
    );
    // `config check` shows the defaults.
    let j = cfg
        .plugin("inflight-load-producer")
        .unwrap()
        .spec
        .params_json();
    assert_eq!(j, r#"{"addEstimatedOutputTokens":false,"outputRatio":1.5}"#);
    let j = cfg
        .plugin("prefix-cache-scorer")
        .unwrap()
        .spec
        .params_json();
    assert_eq!(
        j,
        r#"{"matchLengthWeight":0.0,"matchLengthScaleTokens":8192}"#
    );
}

#[test]
fn gie_producer_parameters_on_the_scorer_still_reach_the_producer() {
    let cfg = load(
        "plugins:\n- type: prefix-cache-scorer\n  parameters: {matchLengthWeight: 0.5, blockSizeTokens: 32, autoTune: false}\n",
    )
    .unwrap();
    let Some(PluginSpec::ApproxPrefixCacheProducer(p)) = cfg
        .prefix_producer
        .as_deref()
        .and_then(|n| cfg.plugin(n))
        .map(|p| &p.spec)
    else {
        panic!("no producer added");
    };
    assert_eq!((p.block_size_tokens, p.auto_tune), (32, false));
    let Some(PluginSpec::PrefixCacheScorer(s)) = cfg.plugin("prefix-cache-scorer").map(|p| &p.spec)
    else {
        panic!()
    };
    assert_eq!(s.match_length_weight, 0.5);
}

#[test]
fn bad_values_are_refused_naming_the_field() {
    let scorer = |p: &str| format!("plugins:\n- type: prefix-cache-scorer\n  parameters: {p}\n");
    assert_eq!(
        bad_field(&scorer("{matchLengthWeight: 1.5}")),
        "matchLengthWeight"
    );
    assert_eq!(
        bad_field(&scorer("{matchLengthWeight: -0.1}")),
        "matchLengthWeight"
    );
    assert_eq!(
        bad_field(&scorer("{matchLengthWeight: .nan}")),
        "matchLengthWeight"
    );
    assert_eq!(
        bad_field(&scorer(
            "{matchLengthWeight: 0.5, matchLengthScaleTokens: 0}"
        )),
        "matchLengthScaleTokens"
    );
    assert_eq!(
        bad_field(&scorer("{matchLengthWeight: high}")),
        "matchLengthWeight"
    );
    assert_eq!(
        bad_field(&scorer("{matchLenghtWeight: 0.5}")),
        "matchLenghtWeight"
    );
    assert_eq!(
        bad_field(&scorer("{prefixMatchInfoProducerName: other}")),
        "prefixMatchInfoProducerName"
    );
    // llm-d checks the scale only when the length term is on.
    assert!(load(&scorer("{matchLengthScaleTokens: 0}")).is_ok());

    let inflight =
        |p: &str| format!("plugins:\n- type: inflight-load-producer\n  parameters: {p}\n");
    assert_eq!(bad_field(&inflight("{outputRatio: -1}")), "outputRatio");
    assert_eq!(bad_field(&inflight("{outputRatio: .inf}")), "outputRatio");
    assert_eq!(
        bad_field(&inflight("{maxEstimatedOutputTokens: -5}")),
        "maxEstimatedOutputTokens"
    );
    assert_eq!(
        bad_field(&inflight("{addEstimatedOutputTokens: maybe}")),
        "addEstimatedOutputTokens"
    );
    assert_eq!(bad_field(&inflight("{outputRatioo: 2}")), "outputRatioo");
    assert_eq!(
        bad_field(&inflight("{prefixMatchInfoProducerName: precise}")),
        "prefixMatchInfoProducerName"
    );
    // One in-flight count per endpoint: two producers must agree.
    assert_eq!(
        bad_field(
            "plugins:\n- type: inflight-load-producer\n  name: a\n- type: inflight-load-producer\n  name: b\n  parameters: {addEstimatedOutputTokens: true}\n"
        ),
        "parameters"
    );
}

/// Endpoint 0 holds the whole 10-block prompt but has a queue; endpoint 1 holds none and
/// is idle; endpoint 2 holds none and is the busiest (it anchors the queue scale).
fn winner_with_match_length_weight(w: f64) -> usize {
    let s = sched(&format!(
        "plugins:\n- type: approx-prefix-cache-producer\n  parameters: {{autoTune: false, blockSizeTokens: 64}}\n- type: prefix-cache-scorer\n  parameters: {{matchLengthWeight: {w}, matchLengthScaleTokens: 8192}}\n- type: queue-scorer\nschedulingProfiles:\n- name: x\n  plugins: [{{pluginRef: prefix-cache-scorer}}, {{pluginRef: queue-scorer}}]\n"
    ));
    let now = Instant::now();
    let eps = vec![ep(0, 4, now), ep(1, 0, now), ep(2, 10, now)];
    let r = req(10 * 64 * 4);
    let chain = s.prefix_chain(&r, &eps).unwrap();
    assert_eq!(chain.hashes.len(), 10);
    let matches = PrefixMatches {
        entries: vec![(eps[0].address, 10)],
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
    eps.iter()
        .position(|e| e.address == res.destinations()[0])
        .unwrap()
}

#[test]
fn match_length_weight_changes_which_endpoint_wins() {
    // w = 0: prefix 1.0 + queue 0.6 beats the idle endpoint's 0 + 1.0.
    assert_eq!(winner_with_match_length_weight(0.0), 0);
    // w = 0.9: a 640-token match is short against 8192 tokens, so the prefix term drops
    // to 0.9·(640/8192)² + 0.1 ≈ 0.106 and the idle endpoint wins.
    assert_eq!(winner_with_match_length_weight(0.9), 1);
}

fn in_flight_tokens(params: &str, r: &InferenceRequest) -> u64 {
    sched(&format!(
        "plugins:\n- type: inflight-load-producer\n  parameters: {params}\n- type: queue-scorer\n"
    ))
    .in_flight_tokens(r)
}

#[test]
fn estimated_output_tokens_change_the_in_flight_token_count() {
    // 400 bytes = 100 prompt tokens.
    let mut r = req(400);
    assert_eq!(
        Scheduler::new(&ResolvedConfig::builtin_default())
            .unwrap()
            .in_flight_tokens(&r),
        100,
        "without the producer a request counts its prompt"
    );
    assert_eq!(in_flight_tokens("{}", &r), 100);
    assert_eq!(
        in_flight_tokens("{outputRatio: 3}", &r),
        100,
        "off by default"
    );
    assert_eq!(
        in_flight_tokens("{addEstimatedOutputTokens: true}", &r),
        100 + 150
    );
    assert_eq!(
        in_flight_tokens("{addEstimatedOutputTokens: true, outputRatio: 0.25}", &r),
        100 + 25
    );
    assert_eq!(
        in_flight_tokens(
            "{addEstimatedOutputTokens: true, maxEstimatedOutputTokens: 60}",
            &r
        ),
        100 + 60
    );
    // The client's max_tokens bounds the estimate too; the smaller bound wins.
    r.max_tokens = Some(40);
    assert_eq!(
        in_flight_tokens("{addEstimatedOutputTokens: true}", &r),
        100 + 40
    );
    assert_eq!(
        in_flight_tokens(
            "{addEstimatedOutputTokens: true, maxEstimatedOutputTokens: 10}",
            &r
        ),
        100 + 10
    );
}

#[test]
fn estimated_output_tokens_fill_the_token_concurrency_limit_sooner() {
    // Tokens mode, room for 300 in-flight tokens per endpoint. The load board adds what
    // the scheduler says a dispatched request holds.
    let run = |producer: &str| -> bool {
        let s = sched(&format!(
            "plugins:\n- type: inflight-load-producer\n  parameters: {producer}\n- type: concurrency-detector\n  parameters: {{concurrencyMode: tokens, maxTokenConcurrency: 300}}\n- type: queue-scorer\nsaturationDetector:\n  pluginRef: concurrency-detector\nschedulingProfiles:\n- name: x\n  plugins: [{{pluginRef: concurrency-detector}}, {{pluginRef: queue-scorer}}]\n"
        ));
        let now = Instant::now();
        let mut eps = vec![ep(0, 0, now), ep(1, 5, now)];
        let r = req(400);
        let first = s.schedule(&r, &eps, now, &mut rng(1)).unwrap();
        assert_eq!(first.destinations(), &[eps[0].address]);
        eps[0].in_flight.requests += 1;
        eps[0].in_flight.tokens += s.in_flight_tokens(&r);
        let second = s.schedule(&r, &eps, now, &mut rng(1)).unwrap();
        second.destinations()[0] == eps[0].address
    };
    // 100 prompt tokens leave endpoint 0 below its 300-token limit; 100 prompt + 200
    // estimated output tokens reach it, so the detector's filter drops endpoint 0.
    assert!(run("{}"), "prompt tokens only: endpoint 0 still has room");
    assert!(
        !run("{addEstimatedOutputTokens: true, outputRatio: 2}"),
        "100 + 200 estimated tokens fill endpoint 0"
    );
}
