//! Flow control with one queue for the tier (`request::flow_mesh`): three in-process nodes
//! on a sharing mesh in front of one slow pod with room for one request. Requests that
//! arrive at different nodes wait in the owner's queue, so strict priority holds across
//! nodes; with per-node queues (`--flow-control-per-node`) the same sequence is served in
//! the order each node's own queue allows. A request waiting at an owner that dies is
//! served anyway.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use infermesh_gossip::{ClusterKey, MeshConfig, NodeId, Ring};
use infermesh_node::app::App;
use infermesh_node::config::{EndpointSource, NodeConfig};
use infermesh_node::discovery::fleet_pool;
use infermesh_node::mesh::MeshOptions;
use infermesh_node::request::flow_mesh::OWNER_KEY;
use infermesh_sim::{EngineProfile, Fleet, FleetConfig};
use infermesh_testkit::Isolated;
use support::post;

/// One request at a time for the whole tier: a concurrency detector with room for one
/// request on the only pod, and llm-d's strict priority between bands.
fn one_slot() -> infermesh_scheduler::ResolvedConfig {
    support::one_slot_per_pod("defaultRequestTTL: 30s")
}

struct TierNode {
    name: String,
    proxy: SocketAddr,
    app: Option<App>,
    rt: Isolated,
}

impl TierNode {
    fn kill(&mut self) {
        self.app = None;
        self.rt.kill();
    }
}

async fn start_tier(pod: SocketAddr, model: &str, per_node: bool) -> Vec<TierNode> {
    start_tier_with(pod, model, per_node, one_slot, |_| {}).await
}

/// [`start_tier`] with each node's scheduler config from `scheduler` and `tweak` applied.
async fn start_tier_with(
    pod: SocketAddr,
    model: &str,
    per_node: bool,
    scheduler: fn() -> infermesh_scheduler::ResolvedConfig,
    tweak: impl Fn(&mut NodeConfig),
) -> Vec<TierNode> {
    let key = ClusterKey::new(b"flow-mesh-test-cluster-key-0123456789".to_vec()).unwrap();
    let mut nodes: Vec<TierNode> = Vec::new();
    let mut seeds = Vec::new();
    for i in 0..3 {
        let name = format!("fm{i}");
        let mut cfg = NodeConfig::local(fleet_pool(&[pod], model), scheduler()).unwrap();
        cfg.proxy_addr = Some(([127, 0, 0, 1], 0).into());
        cfg.ext_proc_addr = ([127, 0, 0, 1], 0).into();
        cfg.flow_per_node = per_node;
        cfg.staleness = Duration::from_secs(30);
        if let EndpointSource::Static(p) = &mut cfg.endpoints {
            p.objectives.insert("standard".into(), 0);
            p.objectives.insert("critical".into(), 10);
        }
        tweak(&mut cfg);
        let mut mesh = MeshConfig::loopback(&name, key.clone());
        mesh.seeds = seeds.clone();
        cfg.mesh = Some(MeshOptions {
            config: mesh,
            sharing: true,
        });
        let rt = Isolated::new();
        let app = rt
            .run(async move { App::start(cfg).await.expect("node starts") })
            .await;
        seeds.push(app.mesh().expect("mesh").gossip_addr());
        nodes.push(TierNode {
            name,
            proxy: app.proxy_addr.expect("proxy"),
            app: Some(app),
            rt,
        });
    }
    // Until every node sees the other two and has scraped the pod.
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in &nodes {
        let app = n.app.as_ref().unwrap();
        loop {
            let members = app.mesh().unwrap().members().borrow().members.len();
            if members == 3 && app.wait_ready(1, Duration::from_millis(50)).await {
                break;
            }
            assert!(Instant::now() < deadline, "{} never saw the tier", n.name);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    nodes
}

/// The node whose queue the tier shares.
fn owner(nodes: &[TierNode]) -> usize {
    let ring = Ring::new(nodes.iter().map(|n| NodeId::new(n.name.clone())));
    let owner = ring
        .owner(infermesh_gossip::ring::key_of_str(OWNER_KEY))
        .unwrap()
        .clone();
    nodes.iter().position(|n| n.name == owner.as_str()).unwrap()
}

/// Completes a request through `proxy` as `objective`; returns its status and when it
/// finished.
async fn request(
    proxy: SocketAddr,
    model: String,
    objective: &'static str,
    max_tokens: u32,
) -> (u16, Instant) {
    let client = infermesh_node::upstream::http_client(Duration::from_secs(2));
    let body = serde_json::json!({"model": model, "prompt": format!("{objective} job"), "max_tokens": max_tokens});
    let r = post(
        &client,
        proxy,
        "/v1/completions",
        body.to_string(),
        &[("x-llm-d-inference-objective", objective)],
    )
    .await;
    (r.status, Instant::now())
}

fn mesh_waits(app: &App, result: &str) -> u64 {
    app.metrics()
        .flow_mesh_waits
        .get_or_create(&infermesh_node::metrics::MeshWaitLabels {
            result: match result {
                "remote" => "remote",
                "rerouted" => "rerouted",
                _ => "fallback",
            },
        })
        .get()
}

/// Occupies the slot from the owner, queues three standard requests at a second node and
/// then three critical ones at the third; returns whether every critical request finished
/// before any standard one (strict priority over one slot).
async fn critical_overtakes(nodes: &[TierNode], model: &str) -> bool {
    let o = owner(nodes);
    let (a, b) = ((o + 1) % 3, (o + 2) % 3);
    // About 2 s of decode on the only slot.
    let long = tokio::spawn(request(nodes[o].proxy, model.to_owned(), "standard", 120));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let mut standard = Vec::new();
    for _ in 0..3 {
        standard.push(tokio::spawn(request(
            nodes[a].proxy,
            model.to_owned(),
            "standard",
            8,
        )));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut critical = Vec::new();
    for _ in 0..3 {
        critical.push(tokio::spawn(request(
            nodes[b].proxy,
            model.to_owned(),
            "critical",
            8,
        )));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(long.await.unwrap().0, 200);
    let mut last_critical = None;
    for c in critical {
        let (status, at) = c.await.unwrap();
        assert_eq!(status, 200, "critical request");
        last_critical = last_critical.max(Some(at));
    }
    let mut first_standard = None;
    for s in standard {
        let (status, at) = s.await.unwrap();
        assert_eq!(status, 200, "standard request");
        first_standard = Some(first_standard.map_or(at, |f: Instant| f.min(at)));
    }
    last_critical < first_standard
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_queue_for_the_tier_keeps_strict_priority_across_nodes() {
    let mut cfg = FleetConfig::new(1);
    cfg.profile = EngineProfile::llama_8b_h100();
    let model = cfg.model.clone();
    let fleet = Fleet::start(cfg).await.unwrap();
    let pod = fleet.addrs()[0];
    let nodes = start_tier(pod, &model, false).await;
    for round in 0..2 {
        assert!(
            critical_overtakes(&nodes, &model).await,
            "round {round}: a standard request queued earlier on another node was served before the critical ones"
        );
    }
    let o = owner(&nodes);
    for (i, n) in nodes.iter().enumerate() {
        let remote = mesh_waits(n.app.as_ref().unwrap(), "remote");
        if i == o {
            assert_eq!(remote, 0, "the owner waits in its own queue");
        } else {
            assert!(remote >= 1, "{} never waited at the owner", n.name);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_at_a_dead_owner_is_served() {
    let mut cfg = FleetConfig::new(1);
    cfg.profile = EngineProfile::llama_8b_h100();
    let model = cfg.model.clone();
    let fleet = Fleet::start(cfg).await.unwrap();
    let pod = fleet.addrs()[0];
    let mut nodes = start_tier(pod, &model, false).await;
    let o = owner(&nodes);
    let (a, b) = ((o + 1) % 3, (o + 2) % 3);
    // The slot is taken from node a; node b's request waits at the owner.
    let long = tokio::spawn(request(nodes[a].proxy, model.clone(), "standard", 120));
    tokio::time::sleep(Duration::from_millis(400)).await;
    let waiting = tokio::spawn(request(nodes[b].proxy, model.clone(), "critical", 2));
    tokio::time::sleep(Duration::from_millis(300)).await;
    nodes[o].kill();
    let (long, waiting) = (long.await.unwrap(), waiting.await.unwrap());
    assert_eq!(long.0, 200);
    assert_eq!(
        waiting.0, 200,
        "the waiting request was lost with the owner"
    );
    let app = nodes[b].app.as_ref().unwrap();
    assert!(
        mesh_waits(app, "rerouted") + mesh_waits(app, "fallback") >= 1,
        "the wait never left the dead owner"
    );
    // The survivors keep serving.
    let after = request(nodes[a].proxy, model.clone(), "standard", 2).await;
    assert_eq!(after.0, 200);
}

/// A request dispatched by the owner's queue for another node gives its prefill room back
/// at its first token, not at the owner's next refresh: with refreshes 2 s apart, one pod
/// with maxPrefillConcurrency 1 (and room for 10 requests) and a 1.5 s TTL, a request sent
/// while the first one decodes would otherwise wait out its TTL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_first_token_frees_the_owners_prefill_slot() {
    let mut cfg = FleetConfig::new(1);
    cfg.profile = EngineProfile::llama_8b_h100();
    let model = cfg.model.clone();
    let fleet = Fleet::start(cfg).await.unwrap();
    let pod = fleet.addrs()[0];
    let refresh = Duration::from_secs(2);
    let one_prefill = || support::one_prefill_per_pod("defaultRequestTTL: 1500ms");
    let nodes = start_tier_with(pod, &model, false, one_prefill, |c| {
        c.scrape.interval = refresh;
    })
    .await;
    let o = owner(&nodes);
    let (a, b) = ((o + 1) % 3, (o + 2) % 3);
    // Past the owner's refresh at start.
    tokio::time::sleep(refresh + Duration::from_millis(200)).await;
    let client = infermesh_node::upstream::http_client(Duration::from_secs(2));
    let running = support::past_first_token(&client, nodes[a].proxy, &model).await;
    let (status, _) = request(nodes[b].proxy, model.clone(), "standard", 1).await;
    assert_eq!(status, 200, "the second request waited out its TTL");
    for n in [a, b] {
        assert_eq!(
            mesh_waits(nodes[n].app.as_ref().unwrap(), "remote"),
            1,
            "{} waited at the owner",
            nodes[n].name
        );
    }
    drop(running);
}
