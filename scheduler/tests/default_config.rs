//! The built-in default configuration schedules end to end.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Instant;

use infermesh_scheduler::{
    ApiKind, Endpoint, InferenceRequest, Metrics, ResolvedConfig, Scheduler, parse_openai,
};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

fn endpoint(i: u16, queue: u32, kv: f64, now: Instant) -> Endpoint {
    let mut e = Endpoint::new(SocketAddr::from(([10, 0, 0, 1], 8000 + i)), BTreeMap::new());
    let mut m = Metrics::idle(now);
    m.waiting_queue = queue;
    m.kv_cache_usage = kv;
    e.metrics = Some(m);
    e
}

fn request(prompt: &str) -> InferenceRequest {
    let body = format!(
        r#"{{"model":"m","prompt":{}}}"#,
        serde_json::to_string(prompt).unwrap()
    );
    let p = parse_openai(ApiKind::Completions, body.as_bytes()).unwrap();
    InferenceRequest {
        id: "r1".into(),
        model: p.model.clone(),
        target_model: p.model,
        prompt_bytes: p.prompt_bytes,
        fairness_id: "default-flow".into(),
        ..InferenceRequest::default()
    }
}

#[test]
fn default_config_prefers_idle_then_prefix_holder() {
    let cfg = ResolvedConfig::builtin_default();
    let s = Scheduler::new(&cfg).unwrap();
    let now = Instant::now();
    let eps = vec![
        endpoint(0, 5, 0.5, now),
        endpoint(1, 0, 0.1, now),
        endpoint(2, 3, 0.3, now),
    ];
    let req = request(&"hello world ".repeat(100));
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let r = s.schedule(&req, &eps, now, &mut rng).unwrap();
    assert_eq!(r.destinations(), &[eps[1].address]);
    assert_eq!(r.header_value(), "10.0.0.1:8001");
    let pm = r.prefix_match.clone().unwrap();
    // autoTune without cache info falls back to blockSizeTokens 16, raised to the
    // 64-token floor (llm-d PR #1160): blocks of 64 × 4 bytes.
    assert_eq!(pm.block_size_tokens, 64);
    assert_eq!(pm.total_blocks(), 1200usize.div_ceil(64 * 4));
    assert_eq!(pm.matched_blocks, 0);
    s.pre_request(&req, &r, now);

    // Now endpoint 1 holds the prefix; even with equal load it must win again, and the
    // match is reported.
    let eps2 = vec![
        endpoint(0, 0, 0.1, now),
        endpoint(1, 0, 0.1, now),
        endpoint(2, 0, 0.1, now),
    ];
    for seed in 0..20 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let r2 = s.schedule(&req, &eps2, now, &mut rng).unwrap();
        assert_eq!(r2.destinations(), &[eps[1].address]);
        assert_eq!(
            r2.prefix_match.as_ref().unwrap().matched_blocks as usize,
            pm.total_blocks()
        );
    }
    s.remove_endpoint(eps[1].address);
    assert_eq!(s.prefix_index().unwrap().entries(), 0);
}

/// The primary profile reports every candidate's weighted score (llm-d's
/// `ScoredCandidates`, behind `--emit-endpoint-scores`), the pick included.
#[test]
fn every_scored_candidate_gets_its_weighted_score() {
    let s = Scheduler::new(&ResolvedConfig::builtin_default()).unwrap();
    let now = Instant::now();
    // queue 2 × (min-max, low is best) + kv 2 × (1 - usage) + prefix 3 × 0 (cold).
    let eps = vec![endpoint(0, 0, 0.5, now), endpoint(1, 10, 0.0, now)];
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let r = s.schedule(&request("scores"), &eps, now, &mut rng).unwrap();
    let scores: Vec<(SocketAddr, f64)> = r.primary_scores.by_address(&eps).collect();
    assert_eq!(scores, vec![(eps[0].address, 3.0), (eps[1].address, 2.0)]);
    assert_eq!(r.destinations(), &[eps[0].address]);
}

#[test]
fn no_candidates_is_an_error() {
    let s = Scheduler::new(&ResolvedConfig::builtin_default()).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    assert!(
        s.schedule(&request("x"), &[], Instant::now(), &mut rng)
            .is_err()
    );
}

#[test]
fn scheduler_is_shareable_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Scheduler>();
    assert_send_sync::<ResolvedConfig>();
    assert_send_sync::<infermesh_scheduler::SchedulingResult>();
}

#[test]
fn concurrent_schedule_and_record_on_a_shared_scheduler() {
    use std::sync::Arc;
    let s = Arc::new(Scheduler::new(&ResolvedConfig::builtin_default()).unwrap());
    let now = Instant::now();
    let eps: Arc<Vec<Endpoint>> = Arc::new(
        (0..16)
            .map(|i| endpoint(i, (i % 4) as u32, 0.2, now))
            .collect(),
    );
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            let s = Arc::clone(&s);
            let eps = Arc::clone(&eps);
            scope.spawn(move || {
                let mut rng = ChaCha8Rng::seed_from_u64(t);
                for k in 0..200u64 {
                    let req = request(&format!(
                        "conversation {} {}",
                        k % 10,
                        "lorem ipsum ".repeat(20)
                    ));
                    let r = s.schedule(&req, &eps, now, &mut rng).unwrap();
                    s.pre_request(&req, &r, now);
                    if k % 50 == 49 {
                        s.remove_endpoint(eps[(k as usize + t as usize) % eps.len()].address);
                    }
                }
            });
        }
    });
    // Every prompt recorded at least once is matched in full by some endpoint, unless its
    // holder was removed later; the index stays consistent (entries equal the LRU sizes).
    let idx = s.prefix_index().unwrap();
    let total: usize = eps.iter().map(|e| idx.endpoint_len(e.address)).sum();
    assert_eq!(idx.entries(), total);
}
