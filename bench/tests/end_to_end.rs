//! End-to-end runs of the benchmark against a real in-process simulated fleet.

use std::time::Duration;

use infermesh_bench::{
    Api, BLOCK_TOKENS, FailureKind, Load, Popularity, RunSpec, SharedPrefixSpec, Target, Workload,
    oracle_bound,
};
use infermesh_sim::{EngineProfile, Fleet, FleetConfig};

fn small_workload() -> SharedPrefixSpec {
    SharedPrefixSpec {
        groups: 2,
        prompts_per_group: 4,
        system_prompt_tokens: 64,
        question_tokens: 16,
        output_tokens: 4,
        popularity: Popularity::Uniform,
        images_per_request: 0,
    }
}

async fn fleet(pods: usize) -> Fleet {
    let cfg = FleetConfig {
        profile: EngineProfile::instant(),
        ..FleetConfig::new(pods)
    };
    Fleet::start(cfg).await.expect("fleet starts")
}

fn spec(target: Target, pods: Vec<String>, load: Load, n: usize) -> RunSpec {
    RunSpec {
        load,
        max_requests: n,
        max_duration: Duration::from_secs(30),
        request_timeout: Duration::from_secs(10),
        drain_timeout: Duration::from_secs(5),
        pod_metrics: pods,
        seed: 7,
        label: "test".into(),
        ..RunSpec::new(target, Workload::SharedPrefix(small_workload()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_run_measures_every_request_and_the_fleet_hit_rate() {
    let fleet = fleet(2).await;
    let pods = fleet.urls();
    // One request at a time: the order each pod sees is the plan's order, so its hits are
    // exactly the oracle bound of its own share of the plan (instant pods never evict).
    let s = spec(
        Target::RoundRobin(pods.clone()),
        pods.clone(),
        Load::Closed { concurrency: 1 },
        8,
    );
    let plan = s.workload.plan(s.seed, 8);
    let r = infermesh_bench::run(s).await.expect("run succeeds");

    assert_eq!(
        (r.requests_sent, r.succeeded, r.failed),
        (8, 8, 0),
        "{:?}",
        r.failures
    );
    assert_eq!(r.ttft.count, 8);
    assert!(r.ttft.p50_ms > 0.0 && r.ttft.p99_ms >= r.ttft.p50_ms);
    assert!(r.output_tokens_per_s > 0.0);
    assert_eq!(r.per_pod_requests, [4.0, 4.0]);
    assert_eq!(r.load_imbalance_cv, Some(0.0));

    let per_pod: Vec<_> = (0..2)
        .map(|p| {
            let share: Vec<_> = plan.iter().skip(p).step_by(2).cloned().collect();
            oracle_bound(7, &share, BLOCK_TOKENS)
        })
        .collect();
    let hits: u64 = per_pod.iter().map(|o| o.hit_tokens).sum();
    let queries: u64 = per_pod.iter().map(|o| o.query_tokens).sum();
    assert_eq!(
        r.fleet_query_tokens,
        Some(queries as f64),
        "pods count the tokens the bench sent"
    );
    assert_eq!(r.fleet_hit_rate, Some(hits as f64 / queries as f64));
    assert!(r.fleet_hit_rate.unwrap() <= r.oracle_hit_rate);
    assert!(r.oracle_hit_rate > 0.0);
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_stops_at_the_duration_and_dead_targets_are_counted() {
    let fleet = fleet(2).await;
    let pods = fleet.urls();
    fleet.stop_pod(1).await;
    // Poisson at 1000 qps for 0.5 s would be ~500 requests; max_requests caps it at 40,
    // half of which go to the stopped pod.
    let mut s = spec(
        Target::RoundRobin(pods.clone()),
        vec![pods[0].clone()],
        Load::Poisson { qps: 1000.0 },
        40,
    );
    s.max_duration = Duration::from_millis(500);
    let r = infermesh_bench::run(s).await.expect("run succeeds");
    assert_eq!(r.requests_sent, 40);
    assert_eq!(r.succeeded, 20);
    assert_eq!(
        r.failures.get(&FailureKind::Connect.to_string()),
        Some(&20),
        "{:?}",
        r.failures
    );
    assert!((r.error_rate - 0.5).abs() < 1e-12);

    // The duration bounds a run whose request budget it cannot reach: 20 qps for 0.3 s.
    let mut s = spec(
        Target::Url(pods[0].clone()),
        vec![pods[0].clone()],
        Load::Poisson { qps: 20.0 },
        1000,
    );
    s.max_duration = Duration::from_millis(300);
    let r = infermesh_bench::run(s).await.expect("run succeeds");
    assert!(
        r.requests_sent >= 1 && r.requests_sent < 1000,
        "sent {}",
        r.requests_sent
    );
    assert_eq!(r.succeeded, r.requests_sent);
    fleet.shutdown().await;
}

/// A sim counter read from `/metrics` over one raw HTTP/1.1 GET (summed over label sets).
async fn sim_counter(base: &str, name: &str) -> f64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    conn.write_all(b"GET /metrics HTTP/1.1\r\nhost: sim\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut text = String::new();
    conn.read_to_string(&mut text).await.expect("read");
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_parts_reach_the_pod_as_distinct_images_through_the_chat_api() {
    let fleet = fleet(1).await;
    let pods = fleet.urls();
    let mut s = spec(
        Target::Url(pods[0].clone()),
        pods.clone(),
        Load::Closed { concurrency: 1 },
        3,
    );
    s.workload = Workload::SharedPrefix(SharedPrefixSpec {
        images_per_request: 2,
        ..small_workload()
    });
    let refused = infermesh_bench::run(s.clone())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        refused.contains("api"),
        "images need the chat API: {refused}"
    );

    s.api = Api::Chat;
    let r = infermesh_bench::run(s).await.expect("run succeeds");
    assert_eq!((r.requests_sent, r.succeeded), (3, 3), "{:?}", r.failures);
    // Six distinct images, each looked up once in the pod's encoder cache and missed.
    let queries = sim_counter(&pods[0], "vllm:mm_cache_queries_total").await;
    let hits = sim_counter(&pods[0], "vllm:mm_cache_hits_total").await;
    assert_eq!((queries, hits), (6.0, 0.0));
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_spec_is_refused_before_sending() {
    let s = spec(
        Target::Url("127.0.0.1:1".into()),
        vec![],
        Load::Closed { concurrency: 1 },
        1,
    );
    let e = infermesh_bench::run(s).await.unwrap_err().to_string();
    assert!(e.contains("target") && e.contains("http://"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balanced_target_stops_sending_to_a_dead_url_and_the_timeline_shows_where_each_went() {
    let fleet = fleet(2).await;
    let pods = fleet.urls();
    // A port nothing listens on: every connection to it is refused.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    let n = 40;
    let s = spec(
        Target::Balanced(vec![dead, pods[0].clone(), pods[1].clone()]),
        pods.clone(),
        Load::Closed { concurrency: 1 },
        n,
    );
    let (r, timeline) = infermesh_bench::run_with_timeline(s)
        .await
        .expect("run succeeds");
    assert_eq!(r.requests_sent, n);
    assert_eq!(timeline.requests.len(), n);
    // The first request sent to the dead URL fails; from then on it is held down and its
    // health check keeps failing, so the live URLs get everything else: one failure.
    assert_eq!(r.failures.get("connect"), Some(&1), "{:?}", r.failures);
    assert_eq!(r.succeeded, n - 1);
    let failed: Vec<_> = timeline
        .requests
        .iter()
        .filter(|t| t.failure.is_some())
        .collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(
        (failed[0].target, failed[0].failure),
        (0, Some(FailureKind::Connect))
    );
    assert!(timeline.requests.iter().filter(|t| t.target == 0).count() == 1);
    assert!(
        timeline
            .requests
            .windows(2)
            .all(|w| w[0].sent_at <= w[1].sent_at),
        "the timeline is in send order"
    );
    fleet.shutdown().await;
}
