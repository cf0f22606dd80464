//! End-to-end: Envoy's ext_proc filter → infermesh → simulated pods, and the same through
//! the standalone proxy. Needs Envoy (scripts/setup-test-deps.sh); fails if it is absent.

mod support;

use std::collections::HashMap;

use support::{Harness, get, post, prefixed_prompt};

const GROUPS: usize = 4;

/// Shared-prefix requests stick to the pod that has their prefix; a stopped pod leaves
/// the candidate set and its group moves elsewhere without a failed request.
async fn prefix_affinity_and_pod_loss(h: &Harness) {
    let entry = h.entry();
    let mut home = Vec::new();
    for g in 0..GROUPS {
        let r = post(
            &h.client,
            entry,
            "/v1/completions",
            prefixed_prompt(&h.model, g, 0),
            &[],
        )
        .await;
        assert_eq!(r.status, 200, "first request of group {g}: {:?}", r.body);
        home.push(h.served(&r));
    }
    for q in 1..6 {
        for (g, want) in home.iter().enumerate() {
            let r = post(
                &h.client,
                entry,
                "/v1/completions",
                prefixed_prompt(&h.model, g, q),
                &[],
            )
            .await;
            assert_eq!(r.status, 200, "group {g} question {q}: {:?}", r.body);
            assert_eq!(
                h.served(&r),
                *want,
                "group {g} question {q} left the pod holding its prefix"
            );
        }
    }

    let lost = home[0];
    let index = h
        .pods
        .iter()
        .position(|p| *p == lost)
        .expect("home is a pod");
    h.fleet.stop_pod(index).await;
    h.wait_pod_down(index).await;
    let mut new_homes = HashMap::new();
    for q in 10..16 {
        let r = post(
            &h.client,
            entry,
            "/v1/completions",
            prefixed_prompt(&h.model, 0, q),
            &[],
        )
        .await;
        assert_eq!(r.status, 200, "after pod loss, question {q}: {:?}", r.body);
        let served = h.served(&r);
        assert_ne!(served, lost, "request sent to the stopped pod");
        *new_homes.entry(served).or_insert(0) += 1;
    }
    // Group 0 re-homes: after its first request elsewhere, its prefix lives there.
    assert!(
        new_homes.len() <= 2,
        "group 0 scattered after pod loss: {new_homes:?}"
    );
    for (g, want) in home.iter().enumerate().skip(1) {
        if *want == lost {
            continue;
        }
        let r = post(
            &h.client,
            entry,
            "/v1/completions",
            prefixed_prompt(&h.model, g, 20),
            &[],
        )
        .await;
        assert_eq!(r.status, 200);
        assert_eq!(
            h.served(&r),
            *want,
            "group {g} moved although its pod is up"
        );
    }
}

/// Bad input gets the right status and a JSON error naming the problem.
async fn bad_requests(h: &Harness) {
    let entry = h.entry();
    let cases: [(&str, String, u16, &str); 6] = [
        ("/v1/completions", "{not json".into(), 400, "JSON"),
        (
            "/v1/completions",
            r#"{"prompt":"hello"}"#.into(),
            400,
            "model",
        ),
        (
            "/v1/completions",
            format!(r#"{{"model":"{}"}}"#, h.model),
            400,
            "prompt",
        ),
        (
            "/v1/chat/completions",
            format!(r#"{{"model":"{}","messages":[]}}"#, h.model),
            400,
            "message",
        ),
        (
            "/v1/completions",
            r#"{"model":"no-such-model","prompt":"hi"}"#.into(),
            404,
            "no-such-model",
        ),
        (
            "/v1/completions",
            format!(
                r#"{{"model":"{}","prompt":"{}"}}"#,
                h.model,
                "x".repeat(300 << 10)
            ),
            413,
            "limit",
        ),
    ];
    for (path, body, status, needle) in cases {
        let r = post(
            &h.client,
            entry,
            path,
            body.clone(),
            &[("x-request-id", "bad-req-1")],
        )
        .await;
        assert_eq!(r.status, status, "{path} {:.60}: {:?}", body, r.body);
        let msg = r.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            msg.contains(needle),
            "error for {:.60} does not mention {needle:?}: {msg}",
            body
        );
    }
    // Chat requests route too.
    let chat = serde_json::json!({"model": h.model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2});
    let r = post(
        &h.client,
        entry,
        "/v1/chat/completions",
        chat.to_string(),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    // Streaming passes through as SSE.
    let stream =
        serde_json::json!({"model": h.model, "prompt": "count", "max_tokens": 3, "stream": true});
    let r = post(&h.client, entry, "/v1/completions", stream.to_string(), &[]).await;
    assert_eq!(r.status, 200);
    let text = String::from_utf8_lossy(&r.body);
    assert!(
        text.contains("data: ") && text.contains("[DONE]"),
        "not an SSE stream: {text}"
    );
}

async fn check_metrics(h: &Harness) {
    let m = get(
        &h.client,
        h.node.metrics_addr.expect("metrics on"),
        "/metrics",
    )
    .await
    .expect("scrape /metrics");
    let text = String::from_utf8_lossy(&m.body);
    for needle in [
        "infermesh_requests_total{",
        "outcome=\"Success\"",
        "outcome=\"BadRequest\"",
        "outcome=\"UnknownModel\"",
        "outcome=\"TooLarge\"",
        "infermesh_scheduling_duration_seconds_bucket",
        "infermesh_endpoint_picks_total",
        "infermesh_endpoint_metrics_age_seconds",
    ] {
        assert!(text.contains(needle), "/metrics lacks {needle}:\n{text}");
    }
}

async fn harness(with_envoy: bool) -> Harness {
    Harness::start_with(8, with_envoy, |c| c.max_body_bytes = 256 << 10).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_ext_proc_routes_by_prefix_and_survives_pod_loss() {
    let h = harness(true).await;
    prefix_affinity_and_pod_loss(&h).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_ext_proc_rejects_bad_requests() {
    let h = harness(true).await;
    other_parsers_route(&h).await;
    bad_requests(&h).await;
    check_metrics(&h).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_routes_by_prefix_and_survives_pod_loss() {
    let h = harness(false).await;
    prefix_affinity_and_pod_loss(&h).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_rejects_bad_requests() {
    let h = harness(false).await;
    other_parsers_route(&h).await;
    bad_requests(&h).await;
    check_metrics(&h).await;
    let models = get(&h.client, h.entry(), "/v1/models")
        .await
        .expect("models");
    assert_eq!(models.json()["data"][0]["id"], h.model.as_str());
    h.stop().await;
}

/// A pod stopped without the node noticing yet: the proxy's connect fails and it retries
/// elsewhere, so the client still gets its answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_retries_when_a_pod_refuses_connections() {
    let h = Harness::start_with(2, false, |c| {
        // Scrape rarely so the stopped pod still looks up when the request arrives.
        c.scrape.interval = std::time::Duration::from_secs(30);
        c.staleness = std::time::Duration::from_secs(60);
    })
    .await;
    let (home, r) = stop_home_then_resend(&h, 7).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_ne!(h.served(&r), home);
    h.stop().await;
}

/// Sends a prompt of prefix group `group`, stops the pod that served it (before its scraper
/// notices), and sends the group again: returns that pod and the second response.
async fn stop_home_then_resend(h: &Harness, group: usize) -> (std::net::SocketAddr, support::Resp) {
    let entry = h.entry();
    let r = post(
        &h.client,
        entry,
        "/v1/completions",
        prefixed_prompt(&h.model, group, 0),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let home = h.served(&r);
    let index = h.pods.iter().position(|p| *p == home).expect("a pod");
    h.fleet.stop_pod(index).await;
    assert!(
        h.node.pool().slot(home).expect("slot").is_up(),
        "scraper noticed too early for this test"
    );
    let r = post(
        &h.client,
        entry,
        "/v1/completions",
        prefixed_prompt(&h.model, group, 1),
        &[],
    )
    .await;
    (home, r)
}

/// The gRPC health services llm-d's EPP exposes answer SERVING once the pool is synced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_health_reports_liveness_readiness_and_the_ext_proc_service() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;

    let h = Harness::start(2, false).await;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", h.node.ext_proc_addr))
            .expect("valid URI")
            .connect()
            .await
            .expect("connect to the ext_proc port");
    let mut client = HealthClient::new(channel);
    for service in [
        "liveness",
        "readiness",
        "envoy.service.ext_proc.v3.ExternalProcessor",
    ] {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let status = client
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .map(|r| r.into_inner().status)
                .map_err(|e| e.to_string());
            if status == Ok(ServingStatus::Serving as i32) {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{service}: {status:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
    h.stop().await;
}

/// An InferenceModelRewrite maps a model the pods do not serve onto the one they do: the
/// pod receives (and answers for) the target model; a model without a rule still gets 404.
/// Paths other than completions and chat get their own parser (embeddings) or pass through
/// unread (`/tokenize`), instead of being parsed as completions or refused.
async fn other_parsers_route(h: &Harness) {
    let body = serde_json::json!({"model": h.model, "input": ["one", "two"]});
    let r = post(
        &h.client,
        h.entry(),
        "/v1/embeddings",
        body.to_string(),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["data"].as_array().map(Vec::len), Some(2));
    // An embeddings body is checked by the embeddings parser, not the completions one.
    let no_input = serde_json::json!({"model": h.model, "prompt": "x"});
    let r = post(
        &h.client,
        h.entry(),
        "/v1/embeddings",
        no_input.to_string(),
        &[],
    )
    .await;
    assert_eq!(r.status, 400, "{:?}", r.body);
    let msg = r.json()["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(msg.contains("\"input\""), "{msg}");
    let body = serde_json::json!({"model": h.model, "prompt": "hello world"});
    let r = post(&h.client, h.entry(), "/tokenize", body.to_string(), &[]).await;
    assert_eq!(r.status, 200, "passthrough: {:?}", r.body);
    assert!(r.json()["count"].as_u64().is_some_and(|n| n > 0));
}

async fn model_rewrite_reaches_the_pod(h: &Harness) {
    use infermesh_node::policy_store::rewrite::ModelRewrites;
    use infermesh_raft_store::policy::{PolicyObject, accept_any_epp_config, parse_documents};
    let yaml = format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceModelRewrite\n\
         metadata: {{name: alias}}\nspec:\n  poolRef: {{name: p}}\n  rules:\n  \
         - matches: [{{model: {{value: my-alias}}}}]\n    targets: [{{modelRewrite: {}}}]\n",
        h.model
    );
    let docs: Vec<_> = parse_documents(&yaml, &accept_any_epp_config())
        .expect("valid rewrite")
        .into_iter()
        .map(|o| match o {
            PolicyObject::InferenceModelRewrite(d) => d,
            other => panic!("{other:?}"),
        })
        .collect();
    h.node
        .control()
        .set_rewrites(std::sync::Arc::new(ModelRewrites::from_policy(
            docs.iter().map(|d| (1, d)),
        )));
    let body = serde_json::json!({"model": "my-alias", "prompt": "hello", "max_tokens": 2});
    let r = post(
        &h.client,
        h.entry(),
        "/v1/completions",
        body.to_string(),
        &[],
    )
    .await;
    // 200: the pod (which serves only the target model) got the rewritten body.
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(
        r.json()["model"],
        "my-alias",
        "the client gets its own model name back"
    );
    let streamed = serde_json::json!({"model": "my-alias", "prompt": "hello", "max_tokens": 3, "stream": true});
    let r = post(
        &h.client,
        h.entry(),
        "/v1/completions",
        streamed.to_string(),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let text = String::from_utf8_lossy(&r.body).into_owned();
    let events: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).expect("an SSE event is JSON"))
        .collect();
    assert!(!events.is_empty(), "{text}");
    for e in &events {
        assert_eq!(e["model"], "my-alias", "{text}");
    }
    let unknown = serde_json::json!({"model": "no-rule", "prompt": "hello"});
    let r = post(
        &h.client,
        h.entry(),
        "/v1/completions",
        unknown.to_string(),
        &[],
    )
    .await;
    assert_eq!(r.status, 404, "{:?}", r.body);
    let decisions = h
        .node
        .metrics()
        .model_rewrite_decisions
        .get_or_create(&infermesh_node::metrics::RewriteLabels {
            model: "my-alias".into(),
            target: h.model.clone(),
        })
        .get();
    assert_eq!(decisions, 2, "one decision per rewritten request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_forwards_the_rewritten_model() {
    let h = Harness::start(2, false).await;
    model_rewrite_reaches_the_pod(&h).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_ext_proc_forwards_the_rewritten_model() {
    let h = Harness::start(2, true).await;
    model_rewrite_reaches_the_pod(&h).await;
    h.stop().await;
}

/// Session affinity: the client gets `x-session-token` naming the pod that served it, and
/// a request carrying the token goes back to that pod.
async fn session_token_round_trip(with_envoy: bool) {
    let cfg = infermesh_scheduler::load_config(
        "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n\
         plugins:\n- type: session-affinity-scorer\n- type: queue-scorer\n\
         schedulingProfiles:\n- name: default\n  plugins: [{pluginRef: session-affinity-scorer, weight: 10}, {pluginRef: queue-scorer}]\n",
    )
    .expect("valid config");
    let h = Harness::start_with(4, with_envoy, |c| c.scheduler = cfg).await;
    let body = serde_json::json!({"model": h.model, "prompt": "hello", "max_tokens": 1});
    let first = post(
        &h.client,
        h.entry(),
        "/v1/completions",
        body.to_string(),
        &[],
    )
    .await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    let token = first
        .header("x-session-token")
        .unwrap_or_else(|| panic!("no session token in {:?}", first.headers));
    let pinned = h.served(&first);
    assert_eq!(
        token,
        infermesh_scheduler::plugins::scorers::session_token(pinned)
    );
    for _ in 0..8 {
        let r = post(
            &h.client,
            h.entry(),
            "/v1/completions",
            body.to_string(),
            &[("x-session-token", token.as_str())],
        )
        .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        assert_eq!(h.served(&r), pinned, "the token pins the pod");
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_sends_the_session_token_to_the_client() {
    session_token_round_trip(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_ext_proc_sends_the_session_token_to_the_client() {
    session_token_round_trip(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_rewrite_in_the_endpoints_file_takes_effect() {
    use infermesh_node::config::EndpointSource;
    use infermesh_raft_store::policy::{PolicyObject, accept_any_epp_config, parse_documents};
    let yaml = format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceModelRewrite\n\
         metadata: {{name: alias}}\nspec:\n  poolRef: {{name: demo}}\n  rules:\n  \
         - matches: [{{model: {{value: file-alias}}}}]\n    targets: [{{modelRewrite: {}}}]\n",
        infermesh_sim::DEFAULT_MODEL
    );
    let docs: Vec<_> = parse_documents(&yaml, &accept_any_epp_config())
        .expect("valid rewrite")
        .into_iter()
        .map(|o| match o {
            PolicyObject::InferenceModelRewrite(d) => d,
            other => panic!("{other:?}"),
        })
        .collect();
    let h = Harness::start_with(2, false, |c| {
        let EndpointSource::Static(spec) = &mut c.endpoints else {
            panic!("the harness serves a static pool");
        };
        spec.rewrites = Some(docs);
    })
    .await;
    assert_eq!(h.model, infermesh_sim::DEFAULT_MODEL);
    let body = serde_json::json!({"model": "file-alias", "prompt": "hello", "max_tokens": 1});
    let r = post(
        &h.client,
        h.entry(),
        "/v1/completions",
        body.to_string(),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["model"], "file-alias");
    h.stop().await;
}

/// Through Envoy, the scheduler's fallbacks (`maxNumOfEndpoints: 2`) are used: when the
/// primary refuses the connection, the override-host policy retries on the fallback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_takes_the_fallback_when_the_primary_refuses() {
    let cfg = infermesh_scheduler::load_config(
        "apiVersion: inference.networking.x-k8s.io/v1alpha1\nkind: EndpointPickerConfig\n\
         plugins:\n- type: queue-scorer\n- type: prefix-cache-scorer\n\
         - type: max-score-picker\n  parameters: {maxNumOfEndpoints: 2}\n\
         schedulingProfiles:\n- name: default\n  plugins:\n  \
         - {pluginRef: prefix-cache-scorer, weight: 3}\n  - {pluginRef: queue-scorer}\n  \
         - {pluginRef: max-score-picker}\n",
    )
    .expect("valid config");
    let h = Harness::start_with(3, true, |c| {
        c.scheduler = cfg;
        // Scrape rarely so the stopped pod still looks up when the request arrives.
        c.scrape.interval = std::time::Duration::from_secs(30);
        c.staleness = std::time::Duration::from_secs(60);
    })
    .await;
    // The same prefix again: the scheduler still picks the stopped pod first, with a fallback.
    let (home, r) = stop_home_then_resend(&h, 9).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_ne!(h.served(&r), home, "served by the fallback");
    h.stop().await;
}

/// `requestHandler.parsers` lists only the openai parser: a path it does not claim gets
/// llm-d's 400 naming the path and the configured parsers, before any pod is asked; the
/// openai paths still route. Listing `passthrough-parser` last routes the rest unread.
async fn configured_parsers_decide_the_paths(with_envoy: bool) {
    let only_openai = infermesh_scheduler::load_config(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n\
         requestHandler:\n  parsers:\n  - pluginRef: openai-parser\n",
    )
    .expect("valid config");
    let h = Harness::start_with(2, with_envoy, |c| c.scheduler = only_openai).await;
    let body = serde_json::json!({"model": h.model, "prompt": "hello world", "max_tokens": 1});
    for path in ["/tokenize", "/v1/messages"] {
        let r = post(&h.client, h.entry(), path, body.to_string(), &[]).await;
        assert_eq!(r.status, 400, "{path}: {:?}", r.body);
        let msg = r.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            msg.contains(path) && msg.contains("openai-parser"),
            "{path}: {msg}"
        );
    }
    let r = post(
        &h.client,
        h.entry(),
        "/v1/completions",
        body.to_string(),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    h.stop().await;

    let with_fallback = infermesh_scheduler::load_config(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\n\
         requestHandler:\n  parsers:\n  - pluginRef: openai-parser\n  - pluginRef: passthrough-parser\n",
    )
    .expect("valid config");
    let h = Harness::start_with(2, with_envoy, |c| c.scheduler = with_fallback).await;
    let r = post(&h.client, h.entry(), "/tokenize", body.to_string(), &[]).await;
    assert_eq!(r.status, 200, "passthrough: {:?}", r.body);
    assert!(r.json()["count"].as_u64().is_some_and(|n| n > 0));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_refuses_paths_no_configured_parser_takes() {
    configured_parsers_decide_the_paths(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_ext_proc_refuses_paths_no_configured_parser_takes() {
    configured_parsers_decide_the_paths(true).await;
}

/// GIE's conformance hooks, configured as llm-d configures them: the
/// `test-epp-endpoint-selection` header picks the pod (through `header-based-testing-filter`)
/// and the client learns which pod served it in `x-conformance-test-served-endpoint`
/// (`destination-endpoint-served-verifier`; through Envoy, from the `envoy.lb` metadata Envoy
/// reports back). A selection no pod matches gets 503.
async fn conformance_hooks(with_envoy: bool) {
    let cfg = infermesh_scheduler::load_config(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n\
         - type: header-based-testing-filter\n- type: queue-scorer\n\
         - type: destination-endpoint-served-verifier\n",
    )
    .expect("valid config");
    let h = Harness::start_with(3, with_envoy, |c| c.scheduler = cfg).await;
    let body = serde_json::json!({"model": h.model, "prompt": "a critic", "max_tokens": 1});
    for _ in 0..2 {
        for pod in h.pods.clone() {
            let selection = pod.to_string();
            let r = post(
                &h.client,
                h.entry(),
                "/v1/completions",
                body.to_string(),
                &[("test-epp-endpoint-selection", selection.as_str())],
            )
            .await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            assert_eq!(h.served(&r), pod, "steered to the selected pod");
            assert_eq!(
                r.header("x-conformance-test-served-endpoint").as_deref(),
                Some(selection.as_str()),
                "{:?}",
                r.headers
            );
        }
    }
    let r = post(
        &h.client,
        h.entry(),
        "/v1/completions",
        body.to_string(),
        &[("test-epp-endpoint-selection", "256.256.256.256")],
    )
    .await;
    assert_eq!(r.status, 503, "{:?}", r.body);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_serves_the_conformance_hooks() {
    conformance_hooks(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_ext_proc_serves_the_conformance_hooks() {
    conformance_hooks(true).await;
}
