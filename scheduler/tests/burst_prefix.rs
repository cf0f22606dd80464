//! llm-d v0.10's `burst-prefix-cache-producer` (issue 19): its parameters load with
//! llm-d's names and defaults, bad input names the field, it is an Alpha v0.10 name, and a
//! `prefix-cache-scorer` naming it scores the batch's placement (the placed endpoint
//! matches the whole prefix, the others nothing).

use std::net::SocketAddr;
use std::time::Instant;

use infermesh_scheduler::config::params::{BalanceBy, BurstPrefixParams};
use infermesh_scheduler::config::{ConfigError, NameStatus, PluginSpec, name_status};
use infermesh_scheduler::{
    Endpoint, InferenceRequest, Metrics, PrefixSource, ResolvedConfig, Scheduler, load_config,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

const HEAD: &str = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n";

#[allow(clippy::result_large_err)] // the loader's own error type, matched by the tests
fn load(body: &str) -> Result<ResolvedConfig, ConfigError> {
    load_config(&format!("{HEAD}{body}"))
}

fn fixture() -> ResolvedConfig {
    let path = format!(
        "{}/tests/fixtures/v010-burst-prefix.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    load_config(&std::fs::read_to_string(path).unwrap()).unwrap_or_else(|e| panic!("{e}"))
}

fn params_of(cfg: &ResolvedConfig) -> &BurstPrefixParams {
    match cfg.plugin("burst-prefix-cache-producer").map(|p| &p.spec) {
        Some(PluginSpec::BurstPrefixCacheProducer(p)) => p,
        other => panic!("{other:?}"),
    }
}

fn bad_field(params: &str) -> String {
    match load(&format!(
        "plugins:\n- type: burst-prefix-cache-producer\n  parameters: {params}\n"
    )) {
        Err(ConfigError::InvalidParameter { field, .. }) => field,
        other => panic!("expected InvalidParameter for {params}, got {other:?}"),
    }
}

#[test]
fn fixture_loads_with_the_readme_parameters() {
    let cfg = fixture();
    assert_eq!(
        params_of(&cfg),
        &BurstPrefixParams {
            window_duration_ms: 50,
            max_per_replica: 4,
            block_size_tokens: 16,
            max_prefix_tokens_to_match: 4096,
            min_colocate_blocks: 8,
            max_batch_size: 256,
            balance_by: BalanceBy::Tokens,
        }
    );
    let s = Scheduler::new(&cfg).unwrap();
    assert_eq!(s.burst().map(|b| b.max_blocks()), Some(256));
    // The scorer reads the burst producer, so no approximate prefix index is added.
    assert_eq!(cfg.prefix_producer, None);
    assert!(s.prefix_index().is_none());
}

#[test]
fn defaults_are_llm_d_s() {
    let cfg = load("plugins:\n- type: burst-prefix-cache-producer\n").unwrap();
    let p = params_of(&cfg);
    assert_eq!(
        (
            p.window_duration_ms,
            p.max_per_replica,
            p.block_size_tokens,
            p.max_prefix_tokens_to_match,
            p.min_colocate_blocks,
            p.max_batch_size,
            p.balance_by
        ),
        (100, -1, 64, 0, 0, 1000, BalanceBy::Requests)
    );
    assert_eq!(p.max_blocks(), 2048);
    assert_eq!(p.per_replica_cap(), None);
    assert_eq!(p.batch_cap(), Some(1000));
}

#[test]
fn bad_parameters_name_the_field() {
    for (params, field) in [
        ("{windowDurationMs: 0}", "windowDurationMs"),
        ("{windowDurationMs: 10001}", "windowDurationMs"),
        ("{maxPerReplica: 0}", "maxPerReplica"),
        ("{maxPerReplica: -2}", "maxPerReplica"),
        ("{blockSizeTokens: 0}", "blockSizeTokens"),
        ("{maxPrefixTokensToMatch: -1}", "maxPrefixTokensToMatch"),
        ("{maxPrefixTokensToMatch: 32}", "maxPrefixTokensToMatch"),
        ("{minColocateBlocks: -1}", "minColocateBlocks"),
        ("{maxBatchSize: 0}", "maxBatchSize"),
        ("{balanceBy: bytes}", "balanceBy"),
        ("{windowDurationMs: soon}", "windowDurationMs"),
        ("{windowMs: 10}", "windowMs"),
    ] {
        assert_eq!(bad_field(params), field, "{params}");
    }
    // Unlimited sentinels are accepted.
    load("plugins:\n- type: burst-prefix-cache-producer\n  parameters: {maxPerReplica: -1, maxBatchSize: -1}\n").unwrap();
}

#[test]
fn it_is_an_alpha_v0_10_name() {
    assert_eq!(
        name_status("burst-prefix-cache-producer"),
        NameStatus::Current { alpha: true }
    );
    let cfg = fixture();
    let e = cfg.check_stability(false).unwrap_err();
    assert!(
        matches!(e, ConfigError::ExperimentalPlugin { ref type_name, .. } if type_name == "burst-prefix-cache-producer")
    );
    cfg.check_stability(true).unwrap();
}

#[test]
fn a_second_burst_producer_is_refused() {
    let e = load("plugins:\n- type: burst-prefix-cache-producer\n  name: a\n- type: burst-prefix-cache-producer\n  name: b\n").unwrap_err();
    assert!(
        matches!(e, ConfigError::InvalidParameter { ref plugin, .. } if plugin == "b"),
        "{e}"
    );
}

#[test]
fn a_scorer_may_name_the_burst_producer_but_not_a_missing_one() {
    let e = load("plugins:\n- type: prefix-cache-scorer\n  parameters: {prefixMatchInfoProducerName: burst}\n").unwrap_err();
    assert!(
        matches!(e, ConfigError::InvalidParameter { ref field, .. } if field == "prefixMatchInfoProducerName"),
        "{e}"
    );
    load("plugins:\n- type: burst-prefix-cache-producer\n  name: burst\n- type: prefix-cache-scorer\n  parameters: {prefixMatchInfoProducerName: burst}\n").unwrap();
}

fn ep(i: u8, waiting: u32, now: Instant) -> Endpoint {
    let mut e = Endpoint::new(SocketAddr::from(([10, 0, 0, i], 8000)), Default::default());
    e.metrics = Some(Metrics {
        waiting_queue: waiting,
        ..Metrics::idle(now)
    });
    e
}

#[test]
fn the_scorer_naming_the_producer_follows_the_placement() {
    let s = Scheduler::new(&fixture()).unwrap();
    let now = Instant::now();
    // The placed endpoint is the busier one: the placement (weight 3) outweighs the
    // queue (weight 1).
    let eps = vec![ep(1, 0, now), ep(2, 5, now)];
    let r = InferenceRequest {
        id: "r".into(),
        model: "m".into(),
        target_model: "m".into(),
        prompt_bytes: vec![b'x'; 16 * 4 * 10],
        ..Default::default()
    };
    assert_eq!(s.burst_hashes(&r).len(), 10);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let placed = eps[1].address;
    let res = s
        .schedule_with_burst(&r, &eps, now, &mut rng, PrefixSource::Local, Some(placed))
        .unwrap();
    assert_eq!(res.destinations()[0], placed);
    let scores: Vec<(SocketAddr, f64)> = res.primary_scores.by_address(&eps).collect();
    assert_eq!(scores[1].1 - scores[0].1, 3.0 - 1.0, "{scores:?}");
    // No placement: the scorer gives 0 everywhere and the queue decides.
    let res = s
        .schedule_with_burst(&r, &eps, now, &mut rng, PrefixSource::Local, None)
        .unwrap();
    assert_eq!(res.destinations()[0], eps[0].address);
}
