//! llm-d's `file-discovery` (`dataLayer.discovery.pluginRef`): a node started from an
//! EndpointPickerConfig alone takes its pods from llm-d's endpoints file, follows the file
//! when `watchFile` is on, and routes only to the pods it lists.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use infermesh_node::app::App;
use infermesh_node::config::{InvalidNodeConfig, NodeConfig};
use infermesh_node::upstream::http_client;
use infermesh_sim::{EngineProfile, Fleet, FleetConfig};
use support::post;

fn endpoints_file(pods: &[SocketAddr]) -> String {
    let mut s = String::from("endpoints:\n");
    for (i, p) in pods.iter().enumerate() {
        s.push_str(&format!(
            "  - name: vllm-{i}\n    address: \"{}\"\n    port: \"{}\"\n    labels: {{app: vllm}}\n",
            p.ip(),
            p.port()
        ));
    }
    s
}

/// Writes `text` to `path` through a rename, as ConfigMap updates and editors do.
fn replace(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn config(endpoints: &Path, watch: bool) -> String {
    format!(
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n\
         - type: file-discovery\n  name: pods\n  parameters:\n    path: {}\n    watchFile: {watch}\n\
         - type: queue-scorer\n\
         dataLayer:\n  discovery:\n    pluginRef: pods\n",
        endpoints.display()
    )
}

async fn served_set(node: &App, model: &str, n: usize) -> BTreeSet<SocketAddr> {
    let client = http_client(Duration::from_secs(2));
    let body = serde_json::json!({"model": model, "prompt": "hi", "max_tokens": 1}).to_string();
    let mut served = BTreeSet::new();
    for _ in 0..n {
        let r = post(
            &client,
            node.proxy_addr.expect("proxy"),
            "/v1/completions",
            body.clone(),
            &[],
        )
        .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let h = r
            .header("x-gateway-destination-endpoint-served")
            .expect("served header");
        served.insert(h.parse().unwrap());
    }
    served
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_takes_its_pods_from_the_watched_endpoints_file() {
    let mut fleet_cfg = FleetConfig::new(3);
    fleet_cfg.profile = EngineProfile::instant();
    let model = fleet_cfg.model.clone();
    let fleet = Fleet::start(fleet_cfg).await.expect("pods start");
    let pods = fleet.addrs();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("endpoints.yaml");
    std::fs::write(&file, endpoints_file(&pods[..2])).unwrap();
    let cfg_path = dir.path().join("epp.yaml");
    std::fs::write(&cfg_path, config(&file, true)).unwrap();

    let mut settings = NodeConfig::default_settings();
    settings.config_file = Some(cfg_path.clone());
    let cfg = NodeConfig::from_settings(settings).expect("config with file-discovery");
    let node = App::start(cfg).await.expect("node starts");
    assert!(node.wait_ready(2, Duration::from_secs(15)).await);
    assert_eq!(
        node.pool().name,
        "pods",
        "the pool is named after the plugin"
    );
    let first: BTreeSet<SocketAddr> = pods[..2].iter().copied().collect();
    let served = served_set(&node, &model, 12).await;
    assert!(served.is_subset(&first), "{served:?} outside {first:?}");

    // The file changes: pod 0 leaves, pod 2 joins.
    replace(&file, &endpoints_file(&pods[1..]));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let view = node.pool();
        let listed: BTreeSet<SocketAddr> = view.slots.iter().map(|s| s.address()).collect();
        if listed == pods[1..].iter().copied().collect() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the node never took the new file: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(node.wait_ready(2, Duration::from_secs(15)).await);
    let second: BTreeSet<SocketAddr> = pods[1..].iter().copied().collect();
    let served = served_set(&node, &model, 12).await;
    assert!(served.is_subset(&second), "{served:?} outside {second:?}");

    node.shutdown(Duration::from_secs(5)).await;
    fleet.shutdown().await;
}

#[test]
fn file_discovery_and_endpoints_flag_are_one_source_or_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("endpoints.yaml");
    std::fs::write(
        &file,
        "endpoints:\n- {name: a, address: 10.0.0.1, port: '8000'}\n",
    )
    .unwrap();
    let cfg_path = dir.path().join("epp.yaml");
    std::fs::write(&cfg_path, config(&file, false)).unwrap();

    let mut s = NodeConfig::default_settings();
    s.config_file = Some(cfg_path.clone());
    s.endpoints_file = dir.path().join("pool.yaml");
    let e = NodeConfig::from_settings(s).unwrap_err();
    assert!(
        matches!(&e, InvalidNodeConfig::Flag { flag: "endpoints", reason } if reason.contains("file-discovery `pods`")),
        "{e}"
    );

    // Neither: --endpoints is required.
    let e = NodeConfig::from_settings(NodeConfig::default_settings()).unwrap_err();
    assert!(
        matches!(
            &e,
            InvalidNodeConfig::Flag {
                flag: "endpoints",
                ..
            }
        ),
        "{e}"
    );

    // An invalid entry fails the first load, naming it.
    std::fs::write(
        &file,
        "endpoints:\n- {name: bad, address: vllm.local, port: '8000'}\n",
    )
    .unwrap();
    let mut s = NodeConfig::default_settings();
    s.config_file = Some(cfg_path);
    let e = NodeConfig::from_settings(s).unwrap_err();
    assert!(
        matches!(&e, InvalidNodeConfig::FileDiscovery(_)) && e.to_string().contains("\"bad\""),
        "{e}"
    );
}
