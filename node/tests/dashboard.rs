//! The Grafana dashboard (`deploy/grafana/infermesh-tier.json`) and GIE dashboards read
//! only metrics a running node exports: a node with its mesh and Raft policy store, flow
//! control and precise prefix routing serves traffic (streamed, plain, and one unknown
//! model), and its `/metrics` must then hold a sample of every metric any dashboard query
//! names, and of the llm-d / GIE families a GIE dashboard uses.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use infermesh_gossip::{ClusterKey, MeshConfig};
use infermesh_node::app::App;
use infermesh_node::config::{EndpointSource, NodeConfig};
use infermesh_node::discovery::fleet_pool;
use infermesh_node::mesh::MeshOptions;
use infermesh_node::policy_store::{ClusterArgs, LocalBase, PolicyNode};
use infermesh_node::upstream::http_client;
use infermesh_sim::{EngineProfile, Fleet, FleetConfig};
use support::{get, post};

const CONFIG: &str = r#"apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
featureGates: [flowControl]
plugins:
- type: token-producer
- type: precise-prefix-cache-producer
- type: prefix-cache-scorer
  parameters: {prefixMatchInfoProducerName: precise-prefix-cache-producer}
- type: queue-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-scorer
  - pluginRef: queue-scorer
  - pluginRef: max-score-picker
"#;

/// GIE / llm-d families the upstream GIE dashboard and llm-d's PromQL reference use.
const GIE_FAMILIES: &[&str] = &[
    "inference_objective_request_total",
    "inference_objective_request_error_total",
    "inference_objective_request_duration_seconds_bucket",
    "inference_objective_request_sizes_bucket",
    "inference_objective_response_sizes_bucket",
    "inference_objective_input_tokens_bucket",
    "inference_objective_output_tokens_bucket",
    "inference_objective_running_requests",
    "inference_objective_normalized_time_per_output_token_seconds_bucket",
    "inference_pool_average_kv_cache_utilization",
    "inference_pool_average_queue_size",
    "inference_pool_per_pod_queue_size",
    "inference_pool_ready_pods",
    "inference_extension_scheduler_e2e_duration_seconds_bucket",
    "inference_extension_info",
    "inference_extension_plugin_duration_seconds_bucket",
    "llm_d_epp_plugin_duration_seconds_bucket",
    "llm_d_epp_request_total",
    "llm_d_epp_request_error_total",
    "llm_d_epp_request_ttft_seconds_bucket",
    "llm_d_epp_request_streaming_tpot_seconds_bucket",
    "llm_d_epp_request_streaming_itl_seconds_bucket",
    "llm_d_epp_request_ntpot_seconds_bucket",
    "llm_d_epp_request_running",
    "llm_d_epp_ready_endpoints",
    "llm_d_epp_average_queue_size",
    "llm_d_epp_average_running_requests",
    "llm_d_epp_std_dev_queue_size",
    "llm_d_epp_per_endpoint_queue_size",
    "llm_d_epp_scheduler_attempts_total",
    "llm_d_epp_request_processing_duration_seconds_bucket",
    "llm_d_epp_info",
    "llm_d_epp_inflight_requests",
    "llm_d_epp_inflight_tokens",
    "llm_d_epp_flow_control_requests_total",
    "llm_d_epp_flow_control_dispatch_cycle_duration_seconds_bucket",
    "llm_d_epp_flow_control_request_enqueue_duration_seconds_bucket",
    "llm_d_epp_flow_control_stale_endpoints",
    "llm_d_epp_flow_control_request_queue_duration_seconds_bucket",
];

/// Metric names in a PromQL expression (our prefixes only).
fn names_in(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        let rest = &expr[i..];
        if starts_word
            && ["llm_d_epp_", "infermesh_", "inference_"]
                .iter()
                .any(|p| rest.starts_with(p))
        {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            out.push(rest[..end].to_owned());
            i += end;
        } else {
            i += 1;
        }
    }
    out
}

fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => exprs(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| exprs(x, out)),
        _ => {}
    }
}

/// Whether the exposition holds a sample of `name`.
fn has_sample(text: &str, name: &str) -> bool {
    text.lines().any(|l| {
        l.strip_prefix(name)
            .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_query_names_an_exported_metric() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/grafana/infermesh-tier.json"
        ))
        .expect("dashboard file"),
    )
    .expect("dashboard is JSON");
    let mut queries = Vec::new();
    exprs(&dashboard, &mut queries);
    assert!(queries.len() >= 20, "the dashboard has its queries");
    let wanted: BTreeSet<String> = queries.iter().flat_map(|e| names_in(e)).collect();

    let mut fc = FleetConfig::new(2);
    fc.profile = EngineProfile::instant();
    let model = fc.model.clone();
    let fleet = Fleet::start(fc).await.expect("simulated pods");
    let pods = fleet.addrs();
    let scheduler = infermesh_scheduler::load_config(CONFIG).expect("config loads");
    let mut cfg = NodeConfig::local(fleet_pool(&pods, &model), scheduler).expect("node config");
    cfg.mesh = Some(MeshOptions {
        config: MeshConfig::loopback(
            "dash-a",
            ClusterKey::new(b"dashboard-test-key".to_vec()).unwrap(),
        ),
        sharing: true,
    });
    let base = LocalBase {
        endpoints_file: None,
        initial_pool: match &cfg.endpoints {
            EndpointSource::Static(p) => Some(p.clone()),
            _ => None,
        },
        scheduler: cfg.scheduler.clone(),
        allow_experimental_plugins: false,
    };
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "dashboard-test-token\n").unwrap();
    let app = App::start(cfg).await.expect("node starts");
    let policy = PolicyNode::start(
        app.policy_handles(),
        &ClusterArgs {
            bootstrap: true,
            admin_token_file: Some(tokens),
            join: None,
            data_dir: Some(dir.path().join("raft")),
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            pool: None,
        },
        base,
    )
    .await
    .expect("policy store starts");
    assert!(
        app.wait_ready(2, Duration::from_secs(30)).await,
        "pods scraped"
    );
    let client = http_client(Duration::from_secs(5));
    let proxy = app.proxy_addr.expect("proxy");
    let prompt = "A long shared system prompt for the dashboard test. ".repeat(20);
    for i in 0..4 {
        let streamed = serde_json::json!({
            "model": model, "prompt": format!("{prompt} question {i}"), "max_tokens": 8,
            "stream": true, "stream_options": {"include_usage": true}
        });
        let r = post(&client, proxy, "/v1/completions", streamed.to_string(), &[]).await;
        assert_eq!(r.status, 200);
        let plain = serde_json::json!({
            "model": model, "prompt": format!("{prompt} plain {i}"), "max_tokens": 8
        });
        let r = post(&client, proxy, "/v1/completions", plain.to_string(), &[]).await;
        assert_eq!(r.status, 200);
    }
    let unknown = serde_json::json!({"model": "no-such-model", "prompt": "x"});
    let r = post(&client, proxy, "/v1/completions", unknown.to_string(), &[]).await;
    assert_eq!(r.status, 404);

    // Raft gauges appear once the store is up and has a leader.
    let metrics_addr = app.metrics_addr.expect("metrics");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let text = loop {
        let r = get(&client, metrics_addr, "/metrics")
            .await
            .expect("metrics");
        let text = String::from_utf8_lossy(&r.body).into_owned();
        if text.lines().any(|l| l == "infermesh_raft_is_leader 1") {
            break text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no Raft leader:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let missing: Vec<&String> = wanted.iter().filter(|n| !has_sample(&text, n)).collect();
    assert!(
        missing.is_empty(),
        "dashboard queries metrics the node does not export: {missing:?}"
    );
    let gie_missing: Vec<&&str> = GIE_FAMILIES
        .iter()
        .filter(|n| !has_sample(&text, n))
        .collect();
    assert!(
        gie_missing.is_empty(),
        "GIE families missing: {gie_missing:?}"
    );
    // Values, not just names: the streamed requests were timed.
    assert!(
        text.lines()
            .any(|l| l.starts_with("llm_d_epp_request_ttft_seconds_count{")
                && l.contains("streaming=\"true\"")
                && !l.ends_with(" 0")),
        "TTFT of streamed requests recorded"
    );
    drop(policy);
    app.shutdown(Duration::from_secs(1)).await;
    fleet.shutdown().await;
}

#[test]
fn expression_names_are_found() {
    assert_eq!(
        names_in(
            "histogram_quantile(0.9, sum by (le) (rate(llm_d_epp_request_ttft_seconds_bucket[5m]))) / infermesh_raft_term"
        ),
        vec![
            "llm_d_epp_request_ttft_seconds_bucket",
            "infermesh_raft_term"
        ]
    );
}
