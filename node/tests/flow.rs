//! llm-d's `flowControl` gate through the node's edges (proxy and Envoy ext_proc), with
//! simulated pods: requests are dispatched while the pool has room, and a request that
//! cannot be dispatched within its TTL gets 429 with `x-llm-d-request-dropped-reason`.

mod support;

use std::time::Duration;

use infermesh_scheduler::flow::{FlowConfig, Outcome, UsageLimitPolicy};
use infermesh_testkit::net::wait_until;
use support::{Harness, one_slot_per_pod, post};

fn outcome_total(h: &Harness, outcome: Outcome) -> u64 {
    h.node
        .metrics()
        .flow
        .requests
        .get_or_create(&infermesh_node::metrics::FlowOutcomeLabels {
            outcome: outcome.as_str(),
        })
        .get()
}

async fn dispatched_while_the_pool_has_room(with_envoy: bool) {
    let h = Harness::start_with(2, with_envoy, |c| {
        c.scheduler.flow_control = Some(FlowConfig::default());
    })
    .await;
    let body = serde_json::json!({"model": h.model, "prompt": "hello", "max_tokens": 1});
    for _ in 0..3 {
        let r = post(
            &h.client,
            h.entry(),
            "/v1/completions",
            body.to_string(),
            &[("x-llm-d-inference-fairness-id", "tenant-a")],
        )
        .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    assert_eq!(outcome_total(&h, Outcome::Dispatched), 3);
    assert_eq!(h.node.metrics().flow.queue_size.get(), 0);
    let text = h
        .node
        .metrics()
        .render(&Default::default(), std::time::Instant::now());
    for line in [
        "llm_d_epp_flow_control_requests_total{outcome=\"Dispatched\"} 3",
        "llm_d_epp_flow_control_queue_size 0",
        "llm_d_epp_flow_control_queue_bytes 0",
        "llm_d_epp_flow_control_request_queue_duration_seconds_count{outcome=\"Dispatched\"} 3",
        "llm_d_epp_flow_control_pool_saturation{stage=\"effective\"}",
        "infermesh_requests_total{",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }
    h.stop().await;
}

async fn ttl_expiry_answers_429(with_envoy: bool) {
    // A usage limit of 0 never dispatches: every request waits out its TTL.
    let h = Harness::start_with(2, with_envoy, |c| {
        c.scheduler.flow_control = Some(FlowConfig {
            usage_limit: UsageLimitPolicy::Static { threshold: 0.0 },
            default_request_ttl: Some(Duration::from_millis(100)),
            ..FlowConfig::default()
        });
    })
    .await;
    let body = serde_json::json!({"model": h.model, "prompt": "hello", "max_tokens": 1});
    let r = post(
        &h.client,
        h.entry(),
        "/v1/completions",
        body.to_string(),
        &[("x-slo-ttft-ms", "500")],
    )
    .await;
    assert_eq!(r.status, 429, "{:?}", r.body);
    assert_eq!(
        r.header("x-llm-d-request-dropped-reason").as_deref(),
        Some("rejected-ttl-expired")
    );
    assert_eq!(r.json()["error"]["code"], 429);
    assert_eq!(outcome_total(&h, Outcome::EvictedTtl), 1);
    assert_eq!(h.node.metrics().flow.queue_size.get(), 0);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_dispatches_through_flow_control_while_the_pool_has_room() {
    dispatched_while_the_pool_has_room(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_ext_proc_dispatches_through_flow_control_while_the_pool_has_room() {
    dispatched_while_the_pool_has_room(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_answers_429_ttl_expired_when_no_request_can_be_dispatched() {
    ttl_expiry_answers_429(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_ext_proc_answers_429_ttl_expired_when_no_request_can_be_dispatched() {
    ttl_expiry_answers_429(true).await;
}

/// A request that finishes frees its room for the next one at once, not at the next
/// saturation refresh: with refreshes 2 s apart, one slot (concurrency-detector, one pod,
/// maxConcurrency 1) and a 1.5 s TTL, the second of two back-to-back requests would
/// otherwise wait out its TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_request_frees_its_slot_before_the_next_refresh() {
    let scheduler = one_slot_per_pod("defaultRequestTTL: 1500ms");
    let refresh = Duration::from_secs(2);
    let h = Harness::start_with(1, false, |c| {
        c.scheduler = scheduler;
        c.scrape.interval = refresh;
        c.staleness = Duration::from_secs(30);
    })
    .await;
    // Past the owner's first refresh (made at start, possibly before the first scrape).
    tokio::time::sleep(refresh + Duration::from_millis(200)).await;
    let body = serde_json::json!({"model": h.model, "prompt": "hello", "max_tokens": 1});
    for i in 0..2 {
        let r = post(
            &h.client,
            h.entry(),
            "/v1/completions",
            body.to_string(),
            &[],
        )
        .await;
        assert_eq!(r.status, 200, "request {i}: {:?}", r.body);
    }
    assert_eq!(outcome_total(&h, Outcome::Dispatched), 2);
    assert_eq!(outcome_total(&h, Outcome::EvictedTtl), 0);
    h.stop().await;
}

/// A request's first token frees its prefill slot for the next one at once, not at the
/// next saturation refresh: with refreshes 2 s apart, one pod with maxPrefillConcurrency 1
/// (and room for 10 requests) and a 1.5 s TTL, a request sent while the first one decodes
/// would otherwise wait out its TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_token_frees_the_prefill_slot_before_the_next_refresh() {
    let scheduler = support::one_prefill_per_pod("defaultRequestTTL: 1500ms");
    let refresh = Duration::from_secs(2);
    let h = Harness::one_pod_refreshing_every(scheduler, refresh).await;
    tokio::time::sleep(refresh + Duration::from_millis(200)).await;
    let running = support::past_first_token(&h.client, h.entry(), &h.model).await;
    let body = serde_json::json!({"model": h.model, "prompt": "hello", "max_tokens": 1});
    let r = post(
        &h.client,
        h.entry(),
        "/v1/completions",
        body.to_string(),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(outcome_total(&h, Outcome::Dispatched), 2);
    assert_eq!(outcome_total(&h, Outcome::EvictedTtl), 0);
    drop(running);
    h.stop().await;
}

/// In-flight eviction (`enableEviction`): a critical request blocked behind a running
/// sheddable one (one pod, one slot) revokes it; the sheddable stream ends early (cut off,
/// or 429 `evicted` before its headers) and the critical request is served within its TTL.
/// With `prefilling`, the sheddable prompt is long enough (60,000 tokens, seconds of
/// prefill) that it is evicted before its first token, which must then be a 429.
async fn a_blocked_critical_request_evicts_a_running_sheddable_one(
    with_envoy: bool,
    prefilling: bool,
) {
    let scheduler = one_slot_per_pod("defaultRequestTTL: 5s\n  enableEviction: true");
    let h = Harness::start_with_profile(
        1,
        with_envoy,
        infermesh_sim::EngineProfile::llama_8b_h100(),
        |c| {
            c.scheduler = scheduler;
            if let infermesh_node::config::EndpointSource::Static(p) = &mut c.endpoints {
                p.objectives.insert("batch".into(), -1);
                p.objectives.insert("critical".into(), 10);
            }
        },
    )
    .await;
    // About 3,000 decode steps: tens of seconds unless it is evicted.
    let long = if prefilling {
        let prompt = "word".repeat(60_000);
        serde_json::json!({"model": h.model, "prompt": prompt, "max_tokens": 16, "stream": true})
    } else {
        serde_json::json!({"model": h.model, "prompt": "long job", "max_tokens": 3000, "stream": true})
    };
    let req = http::Request::post(format!("http://{}/v1/completions", h.entry()))
        .header("content-type", "application/json")
        .header("x-llm-d-inference-objective", "batch")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            long.to_string(),
        )))
        .unwrap();
    let client = h.client.clone();
    let sheddable = tokio::spawn(async move { support::send(&client, req).await });
    // Until the sheddable request holds the slot.
    wait_until(
        "the sheddable request to be dispatched",
        Duration::from_secs(10),
        || outcome_total(&h, Outcome::Dispatched) >= 1,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let body = serde_json::json!({"model": h.model, "prompt": "urgent", "max_tokens": 1});
    let r = post(
        &h.client,
        h.entry(),
        "/v1/completions",
        body.to_string(),
        &[("x-llm-d-inference-objective", "critical")],
    )
    .await;
    assert_eq!(r.status, 200, "critical: {:?}", r.body);
    let cut = tokio::time::timeout(Duration::from_secs(10), sheddable)
        .await
        .expect("the evicted request ended")
        .unwrap();
    match cut {
        Err(e) => assert!(!prefilling, "evicted while prefilling, yet cut off: {e}"),
        Ok(r) => {
            let text = String::from_utf8_lossy(&r.body).into_owned();
            assert!(
                r.status == 429 || !text.contains("[DONE]"),
                "the sheddable request ran to completion: {} {text:.200}",
                r.status
            );
            assert!(
                r.status == 429 || !prefilling,
                "evicted while prefilling, yet answered {}: {text:.200}",
                r.status
            );
            if r.status == 429 {
                assert_eq!(
                    r.header("x-llm-d-request-dropped-reason").as_deref(),
                    Some("evicted")
                );
            }
        }
    }
    assert_eq!(h.node.metrics().flow_revocations.get(), 1);
    assert_eq!(outcome_total(&h, Outcome::EvictedTtl), 0);
    // The revoked request was torn down: nothing is pending reclaim.
    wait_until(
        "the revocation to be confirmed",
        Duration::from_secs(5),
        || h.node.metrics().flow.pending_reclaim.get() == 0,
    )
    .await;
    let text = h
        .node
        .metrics()
        .render(&Default::default(), std::time::Instant::now());
    assert!(
        text.contains("llm_d_epp_flow_control_pending_reclaim 0"),
        "{text}"
    );
    assert!(
        text.contains("infermesh_flow_control_revocations_total 1"),
        "{text}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_in_flight_eviction_revokes_a_running_sheddable_request() {
    a_blocked_critical_request_evicts_a_running_sheddable_one(false, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_eviction_before_the_first_token_answers_429_evicted() {
    a_blocked_critical_request_evicts_a_running_sheddable_one(false, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_in_flight_eviction_revokes_a_running_sheddable_request() {
    a_blocked_critical_request_evicts_a_running_sheddable_one(true, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_eviction_before_the_first_token_answers_429_evicted() {
    a_blocked_critical_request_evicts_a_running_sheddable_one(true, true).await;
}

/// The EndpointPickerConfig the policy swaps in: `queue-scorer` alone, plus `extra` (the
/// `flowControl` gate and section, or nothing).
fn epp_config(extra: &str) -> infermesh_scheduler::ResolvedConfig {
    infermesh_scheduler::load_config(&format!(
        "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: queue-scorer
{extra}"
    ))
    .expect("valid config")
}

/// Flow control follows the EndpointPickerConfig swapped in at runtime, through the swap
/// the policy feed applies (`NodeControl::set_scheduler_config`): a node started without
/// the gate serves everything at once; with the gate on (a queue of one that never
/// dispatches) the first request waits and the second gets 429 `rejected-saturated`; with
/// the gate off again the waiting request is served and new ones bypass the queue.
async fn flow_control_follows_a_runtime_config_swap(with_envoy: bool) {
    let h = Harness::start(1, with_envoy).await;
    let control = h.node.control();
    let body = serde_json::json!({"model": h.model, "prompt": "hello", "max_tokens": 1});
    let send = |client: infermesh_node::upstream::HttpClient, entry| {
        let body = body.to_string();
        async move { post(&client, entry, "/v1/completions", body, &[]).await }
    };
    assert!(!h.node.metrics().flow_enabled());
    for _ in 0..2 {
        assert_eq!(send(h.client.clone(), h.entry()).await.status, 200);
    }
    assert_eq!(
        outcome_total(&h, Outcome::Dispatched),
        0,
        "no flow control yet"
    );

    control
        .set_scheduler_config(&epp_config(
            "- type: static-usage-limit-policy
  name: never
  parameters: {threshold: 0}
featureGates: [flowControl]
flowControl:
  maxRequests: 1
  defaultRequestTTL: 30s
  usageLimitPolicyPluginRef: never
",
        ))
        .expect("config applies");
    let first = tokio::spawn(send(h.client.clone(), h.entry()));
    wait_until(
        "the first request to queue",
        Duration::from_secs(10),
        || h.node.metrics().flow.queue_size.get() == 1,
    )
    .await;
    assert!(h.node.metrics().flow_enabled());
    let r = send(h.client.clone(), h.entry()).await;
    assert_eq!(r.status, 429, "{:?}", r.body);
    assert_eq!(
        r.header("x-llm-d-request-dropped-reason").as_deref(),
        Some("rejected-saturated")
    );
    assert_eq!(outcome_total(&h, Outcome::RejectedCapacity), 1);
    assert!(
        !first.is_finished(),
        "still waiting: the usage limit never dispatches"
    );

    control
        .set_scheduler_config(&epp_config(""))
        .expect("config applies");
    let r = first.await.expect("request task");
    assert_eq!(
        r.status, 200,
        "released when the gate went off, not dropped"
    );
    assert_eq!(outcome_total(&h, Outcome::Dispatched), 1);
    assert_eq!(h.node.metrics().flow.queue_size.get(), 0);
    assert!(!h.node.metrics().flow_enabled());
    for _ in 0..2 {
        assert_eq!(send(h.client.clone(), h.entry()).await.status, 200);
    }
    assert_eq!(
        outcome_total(&h, Outcome::Dispatched),
        1,
        "new requests bypass flow control"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_flow_control_follows_a_runtime_config_swap() {
    flow_control_follows_a_runtime_config_swap(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_ext_proc_flow_control_follows_a_runtime_config_swap() {
    flow_control_follows_a_runtime_config_swap(true).await;
}

/// Posts a completion of `max_tokens` tokens as fairness id `program` through `h`'s entry,
/// on its own task so that several can wait at once; yields the status and when it ended.
fn run_program(
    h: &Harness,
    program: &'static str,
    max_tokens: u32,
) -> tokio::task::JoinHandle<(u16, std::time::Instant)> {
    let (client, entry) = (h.client.clone(), h.entry());
    let body = serde_json::json!({"model": h.model, "prompt": format!("work for {program}"), "max_tokens": max_tokens});
    tokio::spawn(async move {
        let r = post(
            &client,
            entry,
            "/v1/completions",
            body.to_string(),
            &[("x-llm-d-inference-fairness-id", program)],
        )
        .await;
        (r.status, std::time::Instant::now())
    })
}

/// Gives program "heavy" far more attained service than "light", then starts a long
/// "holder" request and waits until it is dispatched (the third dispatch); returns it.
async fn heavy_light_history_then_a_holder(
    h: &Harness,
) -> tokio::task::JoinHandle<(u16, std::time::Instant)> {
    assert_eq!(run_program(h, "heavy", 200).await.unwrap().0, 200);
    assert_eq!(run_program(h, "light", 1).await.unwrap().0, 200);
    let holder = run_program(h, "holder", 300);
    wait_until(
        "the holder to be dispatched",
        Duration::from_secs(10),
        || outcome_total(h, Outcome::Dispatched) == 3,
    )
    .await;
    holder
}

/// `program-aware-fairness` through the node: each finished request's usage (from the
/// model server's `usage`) goes to its program's attained service, so of two programs
/// queued behind one busy slot, the one that used fewer tokens goes first even though the
/// other arrived first; Jain's index over their queue waits is exported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_program_aware_fairness_serves_the_program_with_less_service_first() {
    let scheduler = infermesh_scheduler::load_config(
        "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: program-aware-fairness
- type: concurrency-detector
  parameters: {maxConcurrency: 1}
flowControl:
  saturationDetector: {pluginRef: concurrency-detector}
  defaultRequestTTL: 60s
  defaultPriorityBand: {fairnessPolicyRef: program-aware-fairness}
",
    )
    .expect("valid config");
    // Refreshes far apart: a slot frees only when its request finishes.
    let h = Harness::one_pod_refreshing_every(scheduler, Duration::from_secs(5)).await;
    // A long request holds the only slot while both programs queue, heavy first.
    let holder = heavy_light_history_then_a_holder(&h).await;
    let heavy = run_program(&h, "heavy", 20);
    wait_until("heavy to queue", Duration::from_secs(10), || {
        h.node.metrics().flow.queue_size.get() == 1
    })
    .await;
    let light = run_program(&h, "light", 20);
    wait_until("light to queue", Duration::from_secs(10), || {
        h.node.metrics().flow.queue_size.get() == 2
    })
    .await;
    assert!(!holder.is_finished(), "the holder still runs");
    let (holder, heavy, light) = (
        holder.await.unwrap(),
        heavy.await.unwrap(),
        light.await.unwrap(),
    );
    assert_eq!((holder.0, heavy.0, light.0), (200, 200, 200));
    assert!(
        light.1 < heavy.1,
        "light (less attained service) was served before heavy, which arrived first"
    );
    let text = h
        .node
        .metrics()
        .render(&Default::default(), std::time::Instant::now());
    let jain = text
        .lines()
        .find_map(|l| l.strip_prefix("llm_d_epp_program_aware_jains_fairness_index "))
        .unwrap_or_else(|| panic!("no fairness index in:\n{text}"));
    let jain: f64 = jain.parse().unwrap();
    assert!(
        jain > 0.0 && jain < 1.0,
        "programs waited unequally: {jain}"
    );
    h.stop().await;
}

/// `fair-share-holdback-policy` through the node: one running request puts the pool past
/// the default band's ceiling (0.5 against 0.4), so a queued request of the program with
/// the most attained service waits, while one of the program with the least goes at once,
/// up to the higher band's ceiling (1.0), and finishes before the running request does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_fair_share_holdback_lets_the_light_program_past_the_band_ceiling() {
    let scheduler = infermesh_scheduler::load_config(
        "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: queue-scorer
- type: program-aware-fairness
- type: fair-share-holdback-policy
  parameters: {minCeiling: 0.4}
- type: concurrency-detector
  parameters: {maxConcurrency: 2}
flowControl:
  saturationDetector: {pluginRef: concurrency-detector}
  usageLimitPolicyPluginRef: fair-share-holdback-policy
  defaultRequestTTL: 60s
  priorityBands:
  - priority: 10
  - priority: 0
    fairnessPolicyRef: program-aware-fairness
",
    )
    .expect("valid config");
    let h = Harness::one_pod_refreshing_every(scheduler, Duration::from_secs(5)).await;
    let holder = heavy_light_history_then_a_holder(&h).await;
    let heavy = run_program(&h, "heavy", 20);
    wait_until("heavy to queue", Duration::from_secs(10), || {
        h.node.metrics().flow.queue_size.get() == 1
    })
    .await;
    let light = run_program(&h, "light", 20).await.unwrap();
    assert_eq!(light.0, 200);
    assert_eq!(
        h.node.metrics().flow.queue_size.get(),
        1,
        "heavy still waits for the holder"
    );
    wait_until("the lift to be counted", Duration::from_secs(5), || {
        h.node.metrics().flow_lifted.get() == 1
    })
    .await;
    let (holder, heavy) = (holder.await.unwrap(), heavy.await.unwrap());
    assert_eq!((holder.0, heavy.0), (200, 200));
    assert!(
        light.1 < holder.1 && holder.1 <= heavy.1,
        "light went past the band's ceiling and finished first; heavy waited for the holder"
    );
    let text = h
        .node
        .metrics()
        .render(&Default::default(), std::time::Instant::now());
    assert!(
        text.contains("infermesh_flow_control_lifted_dispatches_total 1"),
        "only light was lifted:\n{text}"
    );
    h.stop().await;
}
