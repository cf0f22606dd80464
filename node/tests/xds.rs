//! Real Envoy 1.40 fed over ADS by two infermesh nodes (gossip mesh + Raft policy store,
//! each node on its own killable runtime) in front of simulated vLLM pods, in SotW and
//! Delta modes:
//! - Envoy gets its listener from infermesh; a request through it reaches the pod the
//!   infermesh ext_proc picker chose (the pick counter and the pod's own request counter
//!   move together), and both nodes serve ext_proc (EDS lists every live node);
//! - a policy change written through the admin API (the InferencePool moves to a new
//!   listener port via its `infermesh.io/envoy-listener` annotation and fails open) is
//!   committed by Raft, served by both nodes with identical versions, and reaches Envoy;
//! - the node Envoy's ADS stream is on is killed: Envoy keeps routing through the other,
//!   reconnects its ADS there, and the membership change (one node left) reaches its EDS;
//! - a listener Envoy cannot bind is NACKed, the reason shows in `infermesh xds status`,
//!   and the previous configuration keeps serving.
//!
//! Needs Envoy: `$ENVOY_BIN` or `<workspace>/.venv-test` (scripts/setup-test-deps.sh).
//! Fails (never skips) without it.

mod support;

use support::tier::{Node, cluster_args, node_config};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use infermesh_gossip::ClusterKey;
use infermesh_node::admin::client::AdminClient;
use infermesh_node::app::App;
use infermesh_node::config::NodeConfig;
use infermesh_node::discovery::fleet_pool;
use infermesh_node::upstream::{HttpClient, http_client};
use infermesh_proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use infermesh_scheduler::ResolvedConfig;
use infermesh_sim::{EngineProfile, Fleet, FleetConfig};
use infermesh_testkit::ads::{self, in_sync, status_of};
use infermesh_testkit::envoy::Envoy;
use infermesh_testkit::{block_on, free_port, wait_for};
use infermesh_xds::ResourceType;

const WAIT: Duration = Duration::from_secs(30);

async fn send(
    client: &HttpClient,
    req: http::Request<Full<Bytes>>,
) -> Result<(u16, String), String> {
    let r = tokio::time::timeout(Duration::from_secs(10), support::send(client, req))
        .await
        .map_err(|_| "timed out".to_string())??;
    Ok((r.status, String::from_utf8_lossy(&r.body).into_owned()))
}

async fn get(client: &HttpClient, addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let req = http::Request::get(format!("http://{addr}{path}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    send(client, req).await
}

/// One completion through Envoy's listener; `Some` on 200.
async fn complete(
    client: &HttpClient,
    listener: SocketAddr,
    model: &str,
    i: usize,
) -> Option<String> {
    let body = serde_json::json!({"model": model, "prompt": format!("request {i}: say hi"),
        "max_tokens": 2, "stream": false});
    let req = http::Request::post(format!("http://{listener}/v1/completions"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    match send(client, req).await {
        Ok((200, b)) => Some(b),
        _ => None,
    }
}

/// Sums a Prometheus counter's samples by one label (or the empty key without a label).
fn counter_by(text: &str, metric: &str, label: Option<&str>) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(metric) else {
            continue;
        };
        if !rest.starts_with('{') && !rest.starts_with(' ') {
            continue;
        }
        let Some((labels, value)) = rest.rsplit_once(' ') else {
            continue;
        };
        let key = label
            .and_then(|l| {
                let start = labels.find(&format!("{l}=\""))? + l.len() + 2;
                let end = labels[start..].find('"')? + start;
                Some(labels[start..end].to_owned())
            })
            .unwrap_or_default();
        *out.entry(key).or_default() += value.trim().parse::<f64>().unwrap_or(0.0);
    }
    out
}

/// Requests each pod has completed (its own vLLM counter).
async fn pod_served(client: &HttpClient, pods: &[SocketAddr]) -> Vec<f64> {
    let mut v = Vec::new();
    for p in pods {
        let (_, text) = get(client, *p, "/metrics").await.expect("pod metrics");
        v.push(
            counter_by(&text, "vllm:request_success_total", None)
                .values()
                .sum(),
        );
    }
    v
}

/// Primary picks per pod, summed over the live nodes.
fn picks(nodes: &[Node], pods: &[SocketAddr]) -> Vec<f64> {
    let mut total = vec![0.0; pods.len()];
    for n in nodes.iter().filter(|n| n.alive()) {
        let text = n.app().metrics().render(&n.app().pool(), Instant::now());
        let by = counter_by(&text, "infermesh_endpoint_picks_total", Some("endpoint"));
        for (i, p) in pods.iter().enumerate() {
            total[i] += by.get(&p.to_string()).copied().unwrap_or(0.0);
        }
    }
    total
}

fn node_picks(n: &Node) -> f64 {
    let text = n.app().metrics().render(&n.app().pool(), Instant::now());
    counter_by(&text, "infermesh_endpoint_picks_total", Some("endpoint"))
        .values()
        .sum()
}

/// `infermesh xds status` against a node's admin API.
fn cli_status(server: &str, json: bool) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_infermesh"));
    cmd.args(["xds", "status", "--server", server]);
    if json {
        cmd.args(["-o", "json"]);
    }
    let out = cmd.output().expect("run infermesh xds status");
    assert!(
        out.status.success(),
        "infermesh xds status failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

async fn scenario(api_type: &str) {
    let envoy_id = format!("envoy-{}", api_type.to_ascii_lowercase());
    let t0 = Instant::now();
    let mut fleet_cfg = FleetConfig::new(2);
    fleet_cfg.profile = EngineProfile::instant();
    let model = fleet_cfg.model.clone();
    let fleet = Fleet::start(fleet_cfg).await.expect("simulated pods");
    let pods = fleet.addrs();
    let client = http_client(Duration::from_secs(2));
    let key = ClusterKey::new(b"infermesh-xds-node-test-key".to_vec()).unwrap();
    let listener = SocketAddr::from(([127, 0, 0, 1], free_port()));

    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "xds-test-token\n").unwrap();
    let first = Node::start(
        node_config("xds-a", &pods, &model, listener, &key, vec![]),
        cluster_args(&dir.path().join("a"), &tokens, None),
    )
    .await;
    let seed = first.app().mesh().expect("mesh").gossip_addr();
    let second = Node::start(
        node_config("xds-b", &pods, &model, listener, &key, vec![seed]),
        cluster_args(&dir.path().join("b"), &tokens, Some(first.admin())),
    )
    .await;
    let mut nodes = [first, second];
    for n in &nodes {
        assert!(n.app().wait_ready(2, WAIT).await, "pods scraped");
    }
    assert_eq!(
        nodes[0].app().xds_addr,
        nodes[0].app().ext_proc_addr,
        "ADS on the ext_proc port"
    );
    let same_versions = || async {
        let served: Vec<_> = nodes
            .iter()
            .filter(|n| n.alive())
            .map(|n| n.app().xds().server().current().map(|s| s.versions()))
            .collect();
        (served.iter().all(Option::is_some) && served.windows(2).all(|w| w[0] == w[1]))
            .then(|| served[0].clone().unwrap())
    };
    // Both nodes learn each other over the mesh and serve identical resources.
    wait_for(
        "both nodes to serve both ext_proc endpoints",
        WAIT,
        || async {
            nodes
                .iter()
                .all(|n| {
                    n.app()
                        .xds()
                        .last_input()
                        .is_some_and(|i| i.ext_proc_endpoints.len() == 2)
                })
                .then_some(())
        },
    )
    .await;
    let versions = wait_for("identical versions on both nodes", WAIT, same_versions).await;
    eprintln!("[{api_type}] both nodes serve versions {versions:?}");

    let ads: Vec<SocketAddr> = nodes.iter().map(|n| n.app().xds_addr).collect();
    let envoy = Envoy::start(&envoy_id, api_type, &ads)
        .await
        .expect("envoy starts");

    // 1. The listener arrives; requests reach the pod infermesh picked; both nodes pick.
    let t_listener = Instant::now();
    wait_for("a completion through Envoy's xDS listener", WAIT, || {
        complete(&client, listener, &model, 0)
    })
    .await;
    eprintln!(
        "[{api_type}] first completion through Envoy {:?} after Envoy started",
        t_listener.elapsed()
    );
    for i in 1..=10 {
        let picks_before = picks(&nodes, &pods);
        let served_before = pod_served(&client, &pods).await;
        complete(&client, listener, &model, i)
            .await
            .expect("completion through Envoy");
        let picks_after = picks(&nodes, &pods);
        let picked: Vec<usize> = (0..pods.len())
            .filter(|&p| picks_after[p] > picks_before[p])
            .collect();
        let served_after = pod_served(&client, &pods).await;
        let served: Vec<usize> = (0..pods.len())
            .filter(|&p| served_after[p] > served_before[p])
            .collect();
        assert_eq!(picked.len(), 1, "one pick per request: {picked:?}");
        assert_eq!(
            picked, served,
            "the pod infermesh picked served the request"
        );
    }
    wait_for("both infermesh nodes to serve ext_proc", WAIT, || async {
        for i in 0..20 {
            complete(&client, listener, &model, 100 + i).await?;
        }
        nodes.iter().all(|n| node_picks(n) > 0.0).then_some(())
    })
    .await;

    // 2. Policy change through Raft (written on either node): the pool moves to a new
    //    listener port and fails open; both nodes serve it with the same versions.
    let moved = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let ports: Vec<String> = pods
        .iter()
        .map(|p| format!("{{number: {}}}", p.port()))
        .collect();
    let pool_yaml = format!(
        "apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata:
  name: demo
  annotations: {{infermesh.io/envoy-listener: '{moved}'}}
spec:
  selector: {{matchLabels: {{app: sim}}}}
  targetPorts: [{}]
  endpointPickerRef: {{name: infermesh, port: {{number: 9002}}, failureMode: FailOpen}}
",
        ports.join(", ")
    );
    let admin = AdminClient::new(&nodes[1].admin(), Some("xds-test-token".into())).unwrap();
    let t_policy = Instant::now();
    admin
        .call(
            http::Method::POST,
            "/v1/policy",
            Some(pool_yaml.into_bytes()),
        )
        .await
        .expect("policy apply");
    wait_for("the pool on its new listener port", WAIT, || {
        complete(&client, moved, &model, 400)
    })
    .await;
    let policy_latency = t_policy.elapsed();
    wait_for("the old listener to close", WAIT, || async {
        get(&client, listener, "/").await.is_err().then_some(())
    })
    .await;
    let dump = envoy.listeners_dump().await.expect("config dump");
    assert!(
        dump.contains("\"failure_mode_allow\": true"),
        "FailOpen reached Envoy:\n{dump}"
    );
    let after_policy = wait_for("both nodes to serve the policy pool", WAIT, same_versions).await;
    assert_ne!(after_policy, versions);
    eprintln!(
        "[{api_type}] policy write -> served by Envoy on the new port after {policy_latency:?}"
    );

    // 3. Kill the node holding Envoy's ADS stream: Envoy keeps routing through the other,
    //    reconnects there, and its EDS drops the dead node.
    let connected = wait_for("Envoy in sync with one node", WAIT, || async {
        nodes
            .iter()
            .position(|n| in_sync(n.app().xds().server(), &envoy_id))
    })
    .await;
    let other = 1 - connected;
    let t_kill = Instant::now();
    nodes[connected].kill();
    let failed = std::cell::Cell::new(0usize);
    let routed = wait_for(
        "Envoy to route through the surviving node",
        WAIT,
        || async {
            let mut ok = 0;
            for i in 0..10 {
                if complete(&client, moved, &model, 200 + i).await.is_some() {
                    ok += 1;
                } else {
                    failed.set(failed.get() + 1);
                }
            }
            (ok == 10).then(|| t_kill.elapsed())
        },
    )
    .await;
    let survivor = &nodes[other];
    let one_left = wait_for(
        "the survivor's EDS to list one node, ACKed by Envoy",
        WAIT,
        || async {
            let input = survivor.app().xds().last_input()?;
            if input.ext_proc_endpoints != vec![survivor.app().xds().advertised()] {
                return None;
            }
            let eds = survivor
                .app()
                .xds()
                .server()
                .current()?
                .get(ResourceType::Endpoint)
                .version
                .clone();
            let st = status_of(survivor.app().xds().server(), &envoy_id)?;
            let t = &st.types[ResourceType::Endpoint as usize];
            (st.connected_streams > 0 && t.last_acked.as_ref()?.version == eds)
                .then(|| t_kill.elapsed())
        },
    )
    .await;
    eprintln!(
        "[{api_type}] node killed: 10/10 routed again after {routed:?} ({} requests failed meanwhile); \
         membership change ACKed in Envoy's EDS after {one_left:?}",
        failed.get()
    );
    for i in 0..10 {
        assert!(
            complete(&client, moved, &model, 300 + i).await.is_some(),
            "routing through the surviving node"
        );
    }

    // 4. A listener Envoy cannot bind (its port is taken) is NACKed; the previous config
    //    keeps serving and the reason is visible in `infermesh xds status`.
    let feed = survivor.app().xds();
    let good = feed.last_input().unwrap();
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut bad = good.clone();
    let mut busy = bad.pools[0].clone();
    busy.name = "busy".into();
    busy.listener = taken.local_addr().unwrap();
    bad.pools.push(busy);
    feed.publish(&bad).expect("the input itself is valid");
    let nack = wait_for("Envoy to NACK the listener", WAIT, || async {
        status_of(survivor.app().xds().server(), &envoy_id)?.types[ResourceType::Listener as usize]
            .nack
            .clone()
    })
    .await;
    assert!(!nack.detail.message.is_empty(), "NACK reason exposed");
    for i in 0..10 {
        assert!(
            complete(&client, moved, &model, 500 + i).await.is_some(),
            "the previous configuration keeps serving after a NACK"
        );
    }
    let server = survivor.admin();
    let table = cli_status(&server, false);
    eprintln!("[{api_type}] infermesh xds status --server {server}:\n{table}");
    let row = table
        .lines()
        .find(|l| l.starts_with(&envoy_id) && l.contains(" LDS "))
        .unwrap_or_else(|| panic!("no LDS row for {envoy_id}:\n{table}"));
    assert!(
        row.contains(&nack.detail.version) && row.contains(" no "),
        "{row}"
    );
    let json: serde_json::Value = serde_json::from_str(&cli_status(&server, true)).unwrap();
    let lds = json["envoys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["node_id"] == envoy_id.as_str())
        .unwrap()["types"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["type"] == "listener")
        .unwrap()
        .clone();
    assert_eq!(lds["nack"]["version"], nack.detail.version.as_str());
    assert_eq!(
        lds["nacks_total"], 1,
        "the NACKed version is not pushed again"
    );

    // Fixing the input brings Envoy back in sync.
    drop(taken);
    feed.publish(&good).unwrap();
    wait_for("Envoy back in sync after the fix", WAIT, || async {
        in_sync(survivor.app().xds().server(), &envoy_id).then_some(())
    })
    .await;
    eprintln!("[{api_type}] scenario took {:?}", t0.elapsed());
    drop(envoy);
    for n in &mut nodes {
        n.kill();
    }
    fleet.shutdown().await;
}

fn run(api_type: &str) {
    // Node logs (RUST_LOG=infermesh_node=info) help when a step times out.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
    block_on(scenario(api_type));
}

#[test]
fn envoy_sotw_ads_from_two_nodes() {
    run("GRPC");
}

#[test]
fn envoy_delta_ads_from_two_nodes() {
    run("DELTA_GRPC");
}

#[test]
fn xds_status_names_an_unreachable_server() {
    let port = free_port();
    let server = format!("http://127.0.0.1:{port}");
    let out = Command::new(env!("CARGO_BIN_EXE_infermesh"))
        .args(["xds", "status", "--server", &server])
        .output()
        .expect("run infermesh xds status");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("xds status from") && err.contains(&port.to_string()),
        "{err}"
    );
}

/// `--xds-addr`: ADS on its own port answers a listener request with the node's pool, and a
/// graceful shutdown ends the stream promptly.
#[test]
fn ads_on_its_own_address() {
    block_on(async {
        let pods: Vec<SocketAddr> = vec!["127.0.0.1:18000".parse().unwrap()];
        let mut cfg = NodeConfig::local(fleet_pool(&pods, "m"), ResolvedConfig::builtin_default())
            .expect("config");
        cfg.proxy_addr = None;
        cfg.xds.xds_addr = Some("127.0.0.1:0".parse().unwrap());
        cfg.xds.file_pool.listener = "127.0.0.1:10001".parse().unwrap();
        let app = App::start(cfg).await.expect("node starts");
        assert_ne!(app.xds_addr, app.ext_proc_addr);
        let mut client = ads::connect(app.xds_addr).await.expect("connect to ADS");
        let (tx, mut inbound) = ads::subscribe(&mut client, "own-port", ResourceType::Listener)
            .await
            .expect("ADS stream");
        let resp = tokio::time::timeout(WAIT, inbound.message())
            .await
            .expect("a listener response")
            .expect("stream ok")
            .expect("a message");
        assert_eq!(resp.resources.len(), 1, "the node's own pool");
        // A long grace: only closing the ADS streams lets the stream end within WAIT.
        let stopping = tokio::spawn(app.shutdown(Duration::from_secs(600)));
        let end = tokio::time::timeout(WAIT, inbound.message())
            .await
            .expect("the ADS stream ends when the node shuts down");
        assert!(!matches!(end, Ok(Some(_))), "{end:?}");
        tokio::time::timeout(WAIT, stopping)
            .await
            .expect("shutdown finishes without waiting out its grace")
            .unwrap();
        drop(tx);
    });
}

async fn next_response(inbound: &mut tonic::Streaming<DiscoveryResponse>) -> DiscoveryResponse {
    tokio::time::timeout(WAIT, inbound.message())
        .await
        .expect("a listener response")
        .expect("stream ok")
        .expect("a message")
}

/// The listener request answering `resp`: an ACK, or a NACK when `error` is given.
fn answer(resp: &DiscoveryResponse, version: &str, error: Option<&str>) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: ResourceType::Listener.type_url().into(),
        version_info: version.into(),
        response_nonce: resp.nonce.clone(),
        error_detail: error.map(|m| infermesh_proto::google::rpc::Status {
            code: 13,
            message: m.into(),
            details: vec![],
        }),
        ..Default::default()
    }
}

/// `infermesh xds status --xds ADDR` against the rows CSDS gives on ADDR.
fn cli_csds(addr: &str, json: bool) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_infermesh"));
    cmd.args(["xds", "status", "--xds", addr]);
    if json {
        cmd.args(["-o", "json"]);
    }
    cmd.output().expect("run infermesh xds status --xds")
}

/// The node serves CSDS next to ADS on its ext_proc port; `infermesh xds status --xds`
/// shows a client's ACK, then its NACK with the reason, and names a node it cannot reach.
#[test]
fn csds_on_the_ext_proc_port_and_in_the_cli() {
    block_on(async {
        let pods: Vec<SocketAddr> = vec!["127.0.0.1:18000".parse().unwrap()];
        let mut cfg = NodeConfig::local(fleet_pool(&pods, "m"), ResolvedConfig::builtin_default())
            .expect("config");
        cfg.proxy_addr = None;
        cfg.xds.file_pool.listener = "127.0.0.1:10001".parse().unwrap();
        let app = App::start(cfg).await.expect("node starts");
        assert_eq!(app.xds_addr, app.ext_proc_addr, "ADS on the ext_proc port");
        let addr = app.ext_proc_addr.to_string();
        let mut client = ads::connect(app.xds_addr).await.expect("connect to ADS");
        let (tx, mut inbound) = ads::subscribe(&mut client, "cli-envoy", ResourceType::Listener)
            .await
            .expect("ADS stream");
        let first = next_response(&mut inbound).await;
        tx.send(answer(&first, &first.version_info, None))
            .await
            .unwrap();
        let lds_row = |status: &'static str| {
            let addr = addr.clone();
            move || {
                let addr = addr.clone();
                async move {
                    let resp = infermesh_node::xds::csds::fetch(&addr).await.ok()?;
                    infermesh_node::xds::csds::rows(&addr, &resp)
                        .into_iter()
                        .find(|r| r.node_id == "cli-envoy" && r.ty == "LDS")
                        .filter(|r| r.config_status == status)
                }
            }
        };
        let synced = wait_for("CSDS to report the ACK", WAIT, lds_row("SYNCED")).await;
        assert_eq!(synced.version, first.version_info);
        assert_eq!(synced.client_status, "ACKED");

        let out = tokio::task::spawn_blocking({
            let addr = addr.clone();
            move || cli_csds(&addr, false)
        })
        .await
        .unwrap();
        let table = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let row = table
            .lines()
            .find(|l| l.starts_with(&addr) && l.contains(" LDS "))
            .unwrap_or_else(|| panic!("no LDS row:\n{table}"));
        for cell in ["cli-envoy", "SYNCED", "ACKED", first.version_info.as_str()] {
            assert!(row.contains(cell), "{cell} missing in {row}");
        }

        // A listener the client rejects.
        let feed = app.xds();
        let mut moved = feed.last_input().expect("an input served");
        moved.pools[0].listener = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        feed.publish(&moved).expect("a valid input");
        let second = next_response(&mut inbound).await;
        assert_ne!(second.version_info, first.version_info);
        tx.send(answer(&second, &first.version_info, Some("port taken")))
            .await
            .unwrap();
        let failed = wait_for("CSDS to report the NACK", WAIT, lds_row("ERROR")).await;
        assert_eq!(failed.client_status, "NACKED");
        assert_eq!(
            failed.error.as_deref(),
            Some(format!("{}: port taken", second.version_info).as_str())
        );
        let out = tokio::task::spawn_blocking({
            let addr = addr.clone();
            move || cli_csds(&addr, true)
        })
        .await
        .unwrap();
        assert!(out.status.success());
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let lds = json
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["node_id"] == "cli-envoy" && r["type"] == "LDS")
            .unwrap_or_else(|| panic!("no LDS row in {json}"));
        assert_eq!(lds["config_status"], "ERROR");
        assert!(
            lds["error"].as_str().unwrap().contains("port taken"),
            "{lds}"
        );

        // A node that cannot be reached is named, and the exit status says so.
        let port = free_port();
        let out =
            tokio::task::spawn_blocking(move || cli_csds(&format!("127.0.0.1:{port}"), false))
                .await
                .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("xds status from") && err.contains(&port.to_string()),
            "{err}"
        );
        drop(tx);
        app.shutdown(Duration::from_secs(5)).await;
    });
}
