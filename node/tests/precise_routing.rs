//! Precise prefix routing end to end on loopback, configured the llm-d way
//! (`token-producer` + `precise-prefix-cache-producer` + `prefix-cache-scorer` with
//! `prefixMatchInfoProducerName`): a node started without a mesh runs a mesh of one, follows
//! the simulated pods' KV events, tokenizes each request, and sends a prompt to the pod
//! whose engine holds its prefix even when that prefix got there by traffic the router
//! never saw. Run with both tokenizer backends: a local `tokenizer.json` the project
//! generates (the pods tokenize with the same file) and the pods' own render endpoint.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use infermesh_node::app::App;
use infermesh_node::config::NodeConfig;
use infermesh_node::discovery::fleet_pool;
use infermesh_node::upstream::{HttpClient, http_client};
use infermesh_scheduler::load_config;
use infermesh_scheduler::prefix::{request_keys, request_seed};
use infermesh_sim::Fleet;
use infermesh_sim::tokenizer::Tokenizer;
use support::post;

const PODS: usize = 4;
const BLOCK: usize = 16;

fn config(token_producer: &str) -> String {
    format!(
        r#"apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: token-producer
  parameters: {token_producer}
- type: endpoint-notification-source
- type: precise-prefix-cache-producer
  parameters:
    tokenProcessorConfig: {{blockSize: {BLOCK}}}
    kvEventsConfig: {{topicFilter: "kv@", discoverPods: true}}
- type: prefix-cache-scorer
  parameters: {{prefixMatchInfoProducerName: precise-prefix-cache-producer}}
- type: queue-scorer
- type: max-score-picker
- type: destination-endpoint-served-verifier
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: prefix-cache-scorer
    weight: 10
  - pluginRef: queue-scorer
    weight: 1
  - pluginRef: max-score-picker
"#
    )
}

fn prompt(group: usize, question: usize) -> String {
    let mut p = format!("System prompt of tenant {group}. ");
    for i in 0..20 {
        p.push_str(&format!("Rule {i} for tenant {group}: be precise. "));
    }
    p.push_str(&format!("Question {question}?"));
    p
}

fn body(text: &str) -> String {
    serde_json::json!({
        "model": infermesh_sim::DEFAULT_MODEL, "prompt": text, "max_tokens": 4
    })
    .to_string()
}

struct Setup {
    fleet: Fleet,
    pods: Vec<SocketAddr>,
    node: App,
    client: HttpClient,
    tokenizer: Tokenizer,
    _dir: tempfile::TempDir,
}

async fn start(local_tokenizer: bool) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let json = infermesh_sim::generate_tokenizer_json();
    let path = dir.path().join("tokenizer.json");
    std::fs::write(&path, &json).unwrap();
    let tokenizer = if local_tokenizer {
        Tokenizer::from_json_str(&json).expect("generated tokenizer loads")
    } else {
        Tokenizer::Builtin
    };
    let (fleet, kv) = support::kv::fleet_with_events(PODS, tokenizer.clone()).await;
    let pods = fleet.addrs();
    let token_producer = if local_tokenizer {
        format!(
            "{{local: {{tokenizerPath: {:?}}}}}",
            path.display().to_string()
        )
    } else {
        // No URL: infermesh renders at one of the request's candidate pods.
        format!("{{modelName: {:?}}}", infermesh_sim::DEFAULT_MODEL)
    };
    let scheduler = load_config(&config(&token_producer)).expect("precise config loads");
    let mut cfg = NodeConfig::local(fleet_pool(&pods, infermesh_sim::DEFAULT_MODEL), scheduler)
        .expect("valid node config");
    assert!(cfg.mesh.is_none(), "no mesh configured");
    cfg.kv_events = Some(kv);
    let node = App::start(cfg).await.expect("node starts");
    assert!(
        node.wait_ready(PODS, Duration::from_secs(15)).await,
        "pods answer their first scrape"
    );
    assert!(node.mesh().is_some(), "precise routing runs a mesh of one");
    Setup {
        fleet,
        pods,
        node,
        client: http_client(Duration::from_secs(2)),
        tokenizer,
        _dir: dir,
    }
}

/// Waits (bounded) until the tier's index holds `text`'s first block at `pod`.
async fn wait_indexed(s: &Setup, text: &str, pod: SocketAddr) {
    let tokens = s.tokenizer.tokenize(text).expect("tokenizes");
    let keys = request_keys(
        request_seed(infermesh_sim::DEFAULT_MODEL, None),
        &tokens,
        BLOCK,
        usize::MAX,
    );
    assert!(keys.len() >= 4, "prompt spans several blocks");
    let mesh = s.node.mesh().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(m) = mesh.prefix_lookup(keys[0], &keys).await
            && m.blocks_for(&pod.to_string()) as usize == keys.len()
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{pod} never showed up in the index for the prompt"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn run(local_tokenizer: bool) {
    let s = start(local_tokenizer).await;
    let proxy = s.node.proxy_addr.expect("proxy on");
    // Warm one pod behind the router's back: only its KV events tell the router.
    for (group, pod) in [(7usize, 2usize), (8, 1)] {
        let r = post(
            &s.client,
            s.pods[pod],
            "/v1/completions",
            body(&prompt(group, 0)),
            &[],
        )
        .await;
        assert_eq!(r.status, 200);
        wait_indexed(&s, &prompt(group, 0), s.pods[pod]).await;
    }
    // The same prefixes with new questions, through the router: each lands where its
    // prefix is cached.
    for q in 1..=6 {
        for (group, pod) in [(7usize, 2usize), (8, 1)] {
            let r = post(
                &s.client,
                proxy,
                "/v1/completions",
                body(&prompt(group, q)),
                &[],
            )
            .await;
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            let served = r
                .header("x-gateway-destination-endpoint-served")
                .expect("served endpoint echoed");
            assert_eq!(
                served,
                s.pods[pod].to_string(),
                "group {group} question {q} went elsewhere"
            );
        }
    }
    let metrics = reqwest_metrics(&s).await;
    let backend = if local_tokenizer { "local" } else { "render" };
    assert!(
        metrics.contains(&format!(
            "infermesh_tokenizations_total{{backend=\"{backend}\",result=\"ok\"}} 12"
        )),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("tokenizations"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    s.node.shutdown(Duration::from_secs(1)).await;
    s.fleet.shutdown().await;
}

async fn reqwest_metrics(s: &Setup) -> String {
    let addr = s.node.metrics_addr.expect("metrics on");
    let r = support::get(&s.client, addr, "/metrics")
        .await
        .expect("metrics answer");
    assert_eq!(r.status, 200);
    String::from_utf8_lossy(&r.body).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precise_routing_with_a_local_tokenizer_json() {
    run(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precise_routing_with_the_pods_render_endpoint() {
    run(false).await;
}
