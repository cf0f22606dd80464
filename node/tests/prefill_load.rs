//! `prefill-load-scorer`'s input through the real data path: a request counts as
//! prefilling on its pod from dispatch until its response's first body bytes, then only as
//! in flight until it ends, behind the proxy and behind Envoy's ext_proc alike.

mod support;

use std::time::Duration;

use infermesh_scheduler::InFlight;
use infermesh_testkit::net::wait_until;
use support::Harness;

async fn a_request_prefills_until_its_first_bytes(with_envoy: bool) {
    // A prefill long enough to be seen, then about 300 decode steps of ~6 ms.
    let mut profile = infermesh_sim::EngineProfile::llama_8b_h100();
    profile.prefill_overhead = Duration::from_millis(800);
    let h = Harness::start_with_profile(1, with_envoy, profile, |_| {}).await;
    let slot = h.node.pool().slot(h.pods[0]).unwrap().clone();
    let body =
        serde_json::json!({"model": h.model, "prompt": "hello", "max_tokens": 300, "stream": true});
    let req = http::Request::post(format!("http://{}/v1/completions", h.entry()))
        .header("content-type", "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_string(),
        )))
        .unwrap();
    let client = h.client.clone();
    let call = tokio::spawn(async move { support::send(&client, req).await });

    wait_until(
        "the request to be dispatched",
        Duration::from_secs(10),
        || slot.in_flight().requests == 1,
    )
    .await;
    let seen = slot.in_flight();
    assert_eq!(
        (seen.requests, seen.prefilling),
        (1, 1),
        "dispatched, before any token: {seen:?}"
    );
    wait_until(
        "the first token to end the prefill count while the request runs",
        Duration::from_secs(10),
        || {
            let f = slot.in_flight();
            f.requests == 1 && f.prefilling == 0
        },
    )
    .await;
    let r = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("the stream ends")
        .unwrap()
        .expect("served");
    assert_eq!(r.status, 200);
    assert!(String::from_utf8_lossy(&r.body).contains("[DONE]"));
    wait_until("the request to be released", Duration::from_secs(5), || {
        slot.in_flight() == InFlight::default()
    })
    .await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_counts_a_request_as_prefilling_until_its_first_bytes() {
    a_request_prefills_until_its_first_bytes(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_ext_proc_counts_a_request_as_prefilling_until_its_first_bytes() {
    a_request_prefills_until_its_first_bytes(true).await;
}
