//! Precise mode end to end on loopback: simulated pods publish KV events, a one-node
//! sharing mesh follows the pods it owns, and its owner-side prefix index must equal the
//! pods' own caches re-keyed to request keys — after traffic sent to the pods directly, and
//! after a pod restart.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use infermesh_gossip::{ClusterKey, Mesh, MeshConfig};
use infermesh_node::app::App;
use infermesh_node::config::NodeConfig;
use infermesh_node::discovery::fleet_pool;
use infermesh_node::mesh::MeshOptions;
use infermesh_node::mesh::kv_events::{KvEventsOptions, PodEventPorts};
use infermesh_node::upstream::{HttpClient, http_client};
use infermesh_scheduler::ResolvedConfig;
use infermesh_scheduler::prefix::{request_keys, request_seed};
use infermesh_sim::engine::block_hashes;
use infermesh_sim::tokenizer::tokenize;
use infermesh_sim::{EngineProfile, Fleet, FleetConfig, KvEventsConfig};
use support::post;

fn prompt(group: usize, question: usize) -> String {
    let mut p = format!("System prompt of tenant {group}. ");
    for i in 0..20 {
        p.push_str(&format!("Rule {i} for tenant {group}: be precise. "));
    }
    p.push_str(&format!("Question {question}?"));
    p
}

/// What llm-d's matcher would answer for `prompt` given each pod's cache: walk the
/// request keys from the anchor, +1 per pod holding each block, stop at a block nobody
/// holds.
fn expected(
    prompt: &str,
    model: &str,
    block_size: usize,
    caches: &[(String, HashSet<u64>)],
) -> (u64, Vec<u64>, HashMap<String, u32>) {
    let tokens = tokenize(prompt);
    let engine = block_hashes(&tokens, None, block_size);
    let keys = request_keys(request_seed(model, None), &tokens, block_size, usize::MAX);
    assert_eq!(engine.len(), keys.len());
    let mut counts = HashMap::new();
    for e in &engine {
        let holders: Vec<&String> = caches
            .iter()
            .filter(|(_, c)| c.contains(e))
            .map(|(p, _)| p)
            .collect();
        if holders.is_empty() {
            break;
        }
        for p in holders {
            *counts.entry(p.clone()).or_insert(0) += 1;
        }
    }
    (keys[0], keys, counts)
}

async fn index_matches_caches(
    mesh: &Mesh,
    fleet: &Fleet,
    pods: &[SocketAddr],
    prompts: &[String],
    model: &str,
    block_size: usize,
) -> Result<(), String> {
    let mut caches = Vec::new();
    for (i, p) in pods.iter().enumerate() {
        let c = fleet.cached_hashes(i).await.map_err(|e| e.to_string())?;
        caches.push((p.to_string(), c.into_iter().collect::<HashSet<u64>>()));
    }
    for (n, text) in prompts.iter().enumerate() {
        let (anchor, keys, want) = expected(text, model, block_size, &caches);
        let got = mesh
            .prefix_lookup(anchor, &keys)
            .await
            .ok_or("lookup fell back")?;
        for pod in pods {
            let pod = pod.to_string();
            let (w, g) = (want.get(&pod).copied().unwrap_or(0), got.blocks_for(&pod));
            if w != g {
                return Err(format!(
                    "prompt {n}, {pod}: cache says {w} blocks, index {g} (pods {pods:?}, {:?})",
                    mesh.stats()
                ));
            }
        }
    }
    Ok(())
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> Result<(), String>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match check().await {
            Ok(()) => return,
            Err(e) if Instant::now() > deadline => panic!("{what}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

async fn start_node(
    name: &str,
    fleet: &Fleet,
    kv: &KvEventsOptions,
    seeds: Vec<SocketAddr>,
) -> App {
    let model = infermesh_sim::DEFAULT_MODEL;
    let mut cfg = NodeConfig::local(
        fleet_pool(&fleet.addrs(), model),
        ResolvedConfig::builtin_default(),
    )
    .expect("valid node config");
    let mut mesh = MeshConfig::loopback(
        name,
        ClusterKey::new(b"kv-events-test-key".to_vec()).expect("key"),
    );
    mesh.seeds = seeds;
    mesh.prefix.lookup_budget = Duration::from_millis(500);
    cfg.mesh = Some(MeshOptions {
        config: mesh,
        sharing: true,
    });
    cfg.kv_events = Some(kv.clone());
    App::start(cfg).await.expect("node starts")
}

/// Sends requests one at a time (`next(i)` gives the pod's index and the prompt, which is
/// kept in `prompts`) until every mesh's index equals the caches of the fleet's
/// instant-profile pods, after at least `min` requests; panics naming `what` when
/// [`eventually`] gives up. A follower that subscribed after a pod's last batch learns what
/// it missed only when the pod publishes again (the gap triggers the replay), so traffic
/// goes on as to live pods.
async fn traffic_until_index_matches(
    what: &str,
    client: &HttpClient,
    fleet: &Fleet,
    meshes: &[Arc<Mesh>],
    prompts: &mut Vec<String>,
    min: usize,
    next: impl Fn(usize) -> (usize, String),
) {
    let pods = fleet.addrs();
    let (model, block_size) = (
        infermesh_sim::DEFAULT_MODEL,
        EngineProfile::instant().block_size,
    );
    let mut sent = 0;
    eventually(what, async || {
        let (pod, text) = next(sent);
        sent += 1;
        complete(client, pods[pod], &text).await;
        prompts.push(text);
        for mesh in meshes {
            index_matches_caches(mesh, fleet, &pods, prompts, model, block_size).await?;
        }
        if sent < min {
            return Err(format!("{sent} of at least {min} requests sent"));
        }
        Ok(())
    })
    .await;
}

async fn complete(client: &HttpClient, pod: SocketAddr, text: &str) {
    let body = serde_json::json!({
        "model": infermesh_sim::DEFAULT_MODEL, "prompt": text, "max_tokens": 4
    });
    let r = post(client, pod, "/v1/completions", body.to_string(), &[]).await;
    assert_eq!(r.status, 200);
}

/// The node owning some pods dies: the survivor takes them over; the entries of an idle
/// pod stay right as they are, and a pod that changes is cleared tier-wide and rebuilt
/// from its replay socket, then followed live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_owner_rebuilds_the_pods_it_takes_over() {
    let (fleet, kv) = support::kv::fleet_with_events(6, Default::default()).await;
    let pods = fleet.addrs();
    let first = start_node("kv-a", &fleet, &kv, vec![]).await;
    let seed = first.mesh().expect("mesh").gossip_addr();
    let mut nodes = vec![first, start_node("kv-b", &fleet, &kv, vec![seed]).await];
    let owned = |a: &App| a.mesh().expect("mesh").owned_pods().borrow().len();
    let deadline = Instant::now() + Duration::from_secs(20);
    while nodes.iter().map(owned).sum::<usize>() != pods.len()
        || nodes
            .iter()
            .any(|a| a.mesh().expect("mesh").members().borrow().members.len() != 2)
    {
        assert!(Instant::now() < deadline, "two members partition the pods");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client = http_client(Duration::from_secs(5));
    let mut prompts = Vec::new();
    for q in 0..12 {
        let text = prompt(q % 4, q);
        complete(&client, pods[q % pods.len()], &text).await;
        prompts.push(text);
    }
    let meshes: Vec<_> = nodes
        .iter()
        .map(|a| a.mesh_handle().expect("mesh"))
        .collect();
    let spread = |i: usize| (i % pods.len(), prompt(200 + i, i));
    let (what, min) = ("every node agrees", pods.len() + 1);
    traffic_until_index_matches(what, &client, &fleet, &meshes, &mut prompts, min, spread).await;
    drop(meshes);

    // Kill the node that follows more pods (it follows at least one).
    let victim = if owned(&nodes[0]) >= owned(&nodes[1]) {
        0
    } else {
        1
    };
    let taken: Vec<String> = nodes[victim]
        .mesh()
        .expect("mesh")
        .owned_pods()
        .borrow()
        .iter()
        .map(|p| p.as_str().to_owned())
        .collect();
    assert!(!taken.is_empty());
    drop(nodes.remove(victim));
    let survivor = nodes.pop().expect("one left");
    let mesh = survivor.mesh_handle().expect("mesh");
    // Failure detection, not a graceful leave: allow for a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(60);
    while mesh.owned_pods().borrow().len() != pods.len() {
        assert!(Instant::now() < deadline, "the survivor owns every pod");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // One taken-over pod drops its cache (AllBlocksCleared) and gets new traffic; only a
    // follower of that pod can tell the index.
    let moved = pods
        .iter()
        .position(|p| taken.contains(&p.to_string()))
        .expect("a taken-over pod");
    assert!(fleet.reset_prefix_cache(moved).await.expect("reset"));
    // The survivor's follower of that pod may subscribe after the reset was published (a
    // ZMQ subscriber sees nothing sent before it joined), so traffic goes to that pod.
    let to_moved = |i: usize| (moved, prompt(50 + i, 50 + i));
    let what = "the survivor's index equals the caches";
    let survivors = [mesh];
    traffic_until_index_matches(what, &client, &fleet, &survivors, &mut prompts, 1, to_moved).await;
    survivor.shutdown(Duration::from_secs(1)).await;
    fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_index_follows_the_pods_caches() {
    let mut fc = FleetConfig::new(2);
    fc.profile = EngineProfile::instant();
    fc.kv_events = Some(KvEventsConfig {
        endpoint: "tcp://127.0.0.1:0".into(),
        replay_endpoint: Some("tcp://127.0.0.1:0".into()),
        bind: true,
        ..KvEventsConfig::default()
    });
    let model = fc.model.clone();
    let block_size = fc.profile.block_size;
    let fleet = Fleet::start(fc).await.expect("simulated pods start");
    let pods = fleet.addrs();

    let mut kv = KvEventsOptions {
        reconnect_interval: Duration::from_millis(100),
        ..KvEventsOptions::default()
    };
    for (pod, ports) in pods.iter().zip(fleet.kv_event_ports()) {
        let ports = ports.expect("pods publish");
        kv.pod_ports.insert(
            pod.to_string(),
            PodEventPorts {
                publish: ports.publish.expect("bound PUB port"),
                replay: ports.replay,
            },
        );
    }
    let mut cfg = NodeConfig::local(fleet_pool(&pods, &model), ResolvedConfig::builtin_default())
        .expect("valid node config");
    cfg.mesh = Some(MeshOptions {
        config: MeshConfig::loopback(
            "kv-0",
            ClusterKey::new(b"kv-events-test-key".to_vec()).expect("key"),
        ),
        sharing: true,
    });
    cfg.kv_events = Some(kv);
    let app = App::start(cfg).await.expect("node starts");
    let mesh = app.mesh_handle().expect("mesh on");
    let client = http_client(Duration::from_secs(5));

    // Traffic straight to the pods (the router never sees it): four prefixes each pod
    // holds, then private ones, one at a time so each pod publishes several batches.
    let mut prompts = Vec::new();
    let sends = (0..12).map(|q| (prompt(q % 4, q), (q / 4) % 2));
    let private = (0..8).map(|q| (prompt(10 + q, q), q % 2));
    for (text, pod) in sends.chain(private) {
        let body = serde_json::json!({"model": model, "prompt": text, "max_tokens": 4});
        let r = post(&client, pods[pod], "/v1/completions", body.to_string(), &[]).await;
        assert_eq!(r.status, 200);
        prompts.push(text);
    }
    eventually("index equals the caches", async || {
        index_matches_caches(&mesh, &fleet, &pods, &prompts, &model, block_size).await
    })
    .await;
    assert!(mesh.prefix_index_blocks() > 0);

    // A restart empties pod 0's cache: the index forgets it, then learns its new traffic.
    // The SUB reconnects on its own schedule and misses what the new process publishes
    // meanwhile; the next batch it sees reveals the restart, so traffic keeps coming (as to
    // a live pod) until the index agrees with the caches again.
    fleet.restart_pod(0).await.expect("pod restarts");
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0.. {
        // A new prefix each time, so each request stores blocks and publishes a batch.
        let text = prompt(100 + i, i);
        let body = serde_json::json!({"model": model, "prompt": text, "max_tokens": 4});
        let r = post(&client, pods[0], "/v1/completions", body.to_string(), &[]).await;
        assert_eq!(r.status, 200);
        prompts.push(text);
        tokio::time::sleep(Duration::from_millis(100)).await;
        match index_matches_caches(&mesh, &fleet, &pods, &prompts, &model, block_size).await {
            Ok(()) => break,
            Err(e) if Instant::now() > deadline => panic!("index follows the restart: {e}"),
            Err(_) => {}
        }
    }
    // The old run's blocks are gone from the index, the new run's are there.
    let fresh = fleet.cached_hashes(0).await.expect("pod 0");
    assert!(!fresh.is_empty());
    // Two takeover clears (one per pod) and the restart's.
    assert!(
        mesh.stats().prefix_forgets_applied >= 3,
        "{:?}",
        mesh.stats()
    );
    let page = support::get(&client, app.metrics_addr.expect("metrics on"), "/metrics")
        .await
        .expect("metrics page");
    let text = String::from_utf8_lossy(&page.body);
    let forgets = text
        .lines()
        .find_map(|l| l.strip_prefix("infermesh_mesh_prefix_forgets_applied_total "))
        .and_then(|v| v.parse::<u64>().ok());
    assert!(forgets.is_some_and(|n| n >= 3), "{text}");
    assert!(text.contains("infermesh_kv_events_batches_total"), "{text}");
    assert!(
        text.contains("infermesh_kv_events_orphans_total 0"),
        "{text}"
    );
    app.shutdown(Duration::from_secs(1)).await;
    fleet.shutdown().await;
}
