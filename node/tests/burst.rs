//! llm-d's `burst-prefix-cache-producer` through the node's edges (proxy and Envoy
//! ext_proc), with simulated pods: concurrent requests sent within one window are held
//! until it closes and placed jointly, so requests sharing a prompt land together (up to
//! `maxPerReplica`) and different prompts spread over the pods.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::future::join_all;
use support::{Harness, post, prefixed_prompt};

/// A config whose only prefix signal is the burst producer's placement.
fn config(window_ms: u64, max_per_replica: i64) -> infermesh_scheduler::ResolvedConfig {
    config_with(window_ms, max_per_replica, 0)
}

fn config_with(
    window_ms: u64,
    max_per_replica: i64,
    min_colocate_blocks: i64,
) -> infermesh_scheduler::ResolvedConfig {
    infermesh_scheduler::load_config(&format!(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n\
         plugins:\n- type: burst-prefix-cache-producer\n  \
         parameters: {{windowDurationMs: {window_ms}, maxPerReplica: {max_per_replica}, \
         blockSizeTokens: 16, minColocateBlocks: {min_colocate_blocks}}}\n\
         - type: prefix-cache-scorer\n  \
         parameters: {{prefixMatchInfoProducerName: burst-prefix-cache-producer}}\n\
         - type: queue-scorer\n- type: max-score-picker\n\
         schedulingProfiles:\n- name: default\n  plugins:\n  \
         - {{pluginRef: prefix-cache-scorer, weight: 10}}\n  - {{pluginRef: queue-scorer}}\n  \
         - {{pluginRef: max-score-picker}}\n"
    ))
    .expect("valid config")
}

/// A completions body whose whole prompt is tenant `group`'s (identical within a group).
fn sample(model: &str, group: usize) -> String {
    let mut prompt = format!("Rollout prompt of task {group}. ");
    for i in 0..40 {
        prompt.push_str(&format!("Step {i} of task {group}: reason, then answer. "));
    }
    serde_json::json!({"model": model, "prompt": prompt, "max_tokens": 2}).to_string()
}

/// Sends every body at once; returns the serving pod of each, in order, and the time the
/// slowest took.
async fn burst(h: &Harness, bodies: &[String]) -> (Vec<SocketAddr>, Duration) {
    let started = Instant::now();
    let rs = join_all(
        bodies
            .iter()
            .map(|b| post(&h.client, h.entry(), "/v1/completions", b.clone(), &[])),
    )
    .await;
    let elapsed = started.elapsed();
    let served = rs
        .iter()
        .map(|r| {
            assert_eq!(r.status, 200, "{:?}", r.body);
            h.served(r)
        })
        .collect();
    (served, elapsed)
}

async fn shared_prompts_land_together_and_groups_spread(with_envoy: bool) {
    let h = Harness::start_with(4, with_envoy, |c| c.scheduler = config(300, -1)).await;
    // Three samples of task 1 and three of task 2, interleaved, within one window.
    let bodies: Vec<String> = (0..6).map(|i| sample(&h.model, 1 + i % 2)).collect();
    let (served, elapsed) = burst(&h, &bodies).await;
    let task1: BTreeSet<_> = served.iter().step_by(2).collect();
    let task2: BTreeSet<_> = served.iter().skip(1).step_by(2).collect();
    assert_eq!(task1.len(), 1, "task 1 on one pod: {served:?}");
    assert_eq!(task2.len(), 1, "task 2 on one pod: {served:?}");
    assert_ne!(task1, task2, "the two tasks balanced onto different pods");
    // They were held for the window (the first arrival's 300 ms), not sent at once.
    assert!(elapsed >= Duration::from_millis(250), "{elapsed:?}");

    // Four unrelated tasks of two samples each: one pod per task, all four pods used.
    let bodies: Vec<String> = (0..8).map(|i| sample(&h.model, 10 + i % 4)).collect();
    let (served, _) = burst(&h, &bodies).await;
    let mut by_task: BTreeMap<usize, BTreeSet<SocketAddr>> = BTreeMap::new();
    for (i, s) in served.iter().enumerate() {
        by_task.entry(i % 4).or_default().insert(*s);
    }
    assert!(by_task.values().all(|s| s.len() == 1), "{by_task:?}");
    let pods: BTreeSet<_> = by_task.values().flatten().collect();
    assert_eq!(pods.len(), 4, "unrelated tasks spread: {by_task:?}");
    h.stop().await;
}

async fn max_per_replica_caps_a_group(with_envoy: bool) {
    let h = Harness::start_with(4, with_envoy, |c| c.scheduler = config(300, 2)).await;
    let bodies: Vec<String> = (0..5).map(|_| sample(&h.model, 7)).collect();
    let (served, _) = burst(&h, &bodies).await;
    let mut per_pod: BTreeMap<SocketAddr, usize> = BTreeMap::new();
    for s in &served {
        *per_pod.entry(*s).or_default() += 1;
    }
    let mut counts: Vec<usize> = per_pod.values().copied().collect();
    counts.sort_unstable();
    assert_eq!(
        counts,
        [1, 2, 2],
        "filled to maxPerReplica 2, then spilled: {served:?}"
    );
    h.stop().await;
}

async fn different_prompts_sharing_a_long_prefix_colocate(with_envoy: bool) {
    // 2 pods; an identical pair of task 5, and two questions over tenant 1's long shared
    // system prompt (about 50 blocks of 16 tokens). With minColocateBlocks 8 the two
    // questions count as sharing, and the batch's fair share (4 requests / 2 pods = 2)
    // leaves room to put them together, beside the pair.
    let h = Harness::start_with(2, with_envoy, |c| c.scheduler = config_with(300, -1, 8)).await;
    let bodies = vec![
        prefixed_prompt(&h.model, 1, 1),
        sample(&h.model, 5),
        prefixed_prompt(&h.model, 1, 2),
        sample(&h.model, 5),
    ];
    let (served, _) = burst(&h, &bodies).await;
    assert_eq!(
        served[0], served[2],
        "the two questions share a pod: {served:?}"
    );
    assert_eq!(
        served[1], served[3],
        "the identical pair shares a pod: {served:?}"
    );
    assert_ne!(
        served[0], served[1],
        "and the two sets are balanced: {served:?}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_colocates_prompts_sharing_min_colocate_blocks() {
    different_prompts_sharing_a_long_prefix_colocate(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_colocates_prompts_sharing_min_colocate_blocks() {
    different_prompts_sharing_a_long_prefix_colocate(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_colocates_shared_prompts_and_spreads_groups() {
    shared_prompts_land_together_and_groups_spread(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_colocates_shared_prompts_and_spreads_groups() {
    shared_prompts_land_together_and_groups_spread(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_caps_a_group_at_max_per_replica() {
    max_per_replica_caps_a_group(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_caps_a_group_at_max_per_replica() {
    max_per_replica_caps_a_group(true).await;
}
