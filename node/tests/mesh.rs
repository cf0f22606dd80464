//! Multi-node mesh tests on loopback: several in-process nodes over shared simulated pods.
//! Join, leave and kill; each pod scraped by exactly one node; fleet-wide load converges
//! on every node; a shared prefix lands on the same pod whichever node takes the request.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use infermesh_gossip::{ClusterKey, MeshConfig, PodId, Ring};
use infermesh_node::app::App;
use infermesh_node::config::NodeConfig;
use infermesh_node::discovery::fleet_pool;
use infermesh_node::mesh::MeshOptions;
use infermesh_node::proxy::SERVED_HEADER;
use infermesh_node::upstream::{HttpClient, http_client};
use infermesh_scheduler::{InFlight, ResolvedConfig};
use infermesh_sim::{EngineProfile, Fleet, FleetConfig};
use support::{post, prefixed_prompt};

const KEY: &[u8] = b"mesh-integration-test-key";

struct Cluster {
    fleet: Fleet,
    pods: Vec<SocketAddr>,
    model: String,
    nodes: Vec<App>,
    client: HttpClient,
}

async fn start_node(
    name: &str,
    pods: &[SocketAddr],
    model: &str,
    seeds: Vec<SocketAddr>,
    sharing: bool,
) -> App {
    let mut cfg = NodeConfig::local(fleet_pool(pods, model), ResolvedConfig::builtin_default())
        .expect("valid node config");
    let mut mesh = MeshConfig::loopback(name, ClusterKey::new(KEY.to_vec()).expect("key"));
    mesh.seeds = seeds;
    // Tests check where requests land, not lookup latency: a budget no loaded CI machine
    // misses (the 2 ms default is measured in bench/mesh-e2e).
    mesh.prefix.lookup_budget = Duration::from_millis(500);
    cfg.mesh = Some(MeshOptions {
        config: mesh,
        sharing,
    });
    App::start(cfg).await.expect("node starts")
}

impl Cluster {
    async fn start(nodes: usize, pods: usize) -> Cluster {
        let mut fc = FleetConfig::new(pods);
        fc.profile = EngineProfile::instant();
        let model = fc.model.clone();
        let fleet = Fleet::start(fc).await.expect("simulated pods start");
        let pods = fleet.addrs();
        let mut c = Cluster {
            fleet,
            pods,
            model,
            nodes: Vec::new(),
            client: http_client(Duration::from_secs(2)),
        };
        for _ in 0..nodes {
            c.add_node().await;
        }
        c.wait_members(nodes).await;
        for n in &c.nodes {
            assert!(
                n.wait_ready(c.pods.len(), Duration::from_secs(20)).await,
                "every pod becomes ready on every node (own scrape or the board)"
            );
        }
        c
    }

    async fn add_node(&mut self) {
        let seeds = self
            .nodes
            .first()
            .map(|n| vec![n.mesh().expect("mesh").gossip_addr()])
            .unwrap_or_default();
        let name = format!("node-{}", self.nodes.len());
        let node = start_node(&name, &self.pods, &self.model, seeds, true).await;
        self.nodes.push(node);
    }

    async fn wait_members(&self, n: usize) {
        wait_for(&format!("{n} live members on every node"), || {
            self.nodes
                .iter()
                .all(|a| a.mesh().expect("mesh").members().borrow().members.len() == n)
        })
        .await;
    }

    fn pod_keys(&self) -> Vec<PodId> {
        let mut v: Vec<PodId> = self.pods.iter().map(|p| PodId::from(*p)).collect();
        v.sort();
        v
    }

    /// Every pod is owned by exactly one node, the ring's owner.
    fn partitioned(&self) -> bool {
        let mut seen: Vec<PodId> = self
            .nodes
            .iter()
            .flat_map(|a| {
                a.mesh()
                    .expect("mesh")
                    .owned_pods()
                    .borrow()
                    .as_ref()
                    .clone()
            })
            .collect();
        seen.sort();
        seen == self.pod_keys()
    }

    /// Each node's view of each pod's fleet in-flight load.
    fn in_flight(&self) -> Vec<BTreeMap<SocketAddr, InFlight>> {
        self.nodes
            .iter()
            .map(|a| {
                a.pool()
                    .slots
                    .iter()
                    .map(|s| (s.address(), s.to_endpoint().in_flight))
                    .collect()
            })
            .collect()
    }
}

/// Waits (bounded: 20 s) until `ok` holds.
async fn wait_for(what: &str, ok: impl FnMut() -> bool) {
    infermesh_testkit::wait_until(what, Duration::from_secs(20), ok).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_pod_is_scraped_by_its_ring_owner_and_load_converges() {
    let c = Cluster::start(3, 6).await;
    wait_for("pods partitioned over 3 nodes", || c.partitioned()).await;
    let ring: Ring = (*c.nodes[0].mesh().unwrap().ring()).clone();
    // Every node learns each pod's metrics from the pod's owner.
    wait_for("board scrapes come from each pod's owner", || {
        c.nodes.iter().all(|a| {
            let view = a.mesh().unwrap().load_view();
            c.pod_keys().iter().all(|p| {
                let owner = ring.owner(infermesh_gossip::ring::key_of_str(p.as_str()));
                view.pod(p)
                    .and_then(|l| l.scraped_by.as_ref())
                    .is_some_and(|by| Some(by) == owner)
            })
        })
    })
    .await;

    // In-flight work held on two different nodes is seen, summed, by all three.
    let (p0, p1) = (c.pods[0], c.pods[1]);
    let a = c.nodes[0].pool().slot(p0).unwrap().clone();
    let b = c.nodes[1].pool().slot(p0).unwrap().clone();
    let b1 = c.nodes[1].pool().slot(p1).unwrap().clone();
    for _ in 0..3 {
        a.acquire(100);
    }
    b.acquire(50);
    b.first_byte(); // b's request answered: in flight, no longer prefilling
    b1.acquire(7);
    let expect = |p: SocketAddr| match p {
        x if x == p0 => InFlight {
            requests: 4,
            tokens: 350,
            prefilling: 3,
        },
        x if x == p1 => InFlight {
            requests: 1,
            tokens: 7,
            prefilling: 1,
        },
        _ => InFlight::default(),
    };
    wait_for("fleet in-flight converges on every node", || {
        c.in_flight()
            .iter()
            .all(|m| m.iter().all(|(p, f)| *f == expect(*p)))
    })
    .await;
    for _ in 0..3 {
        a.release(100, true);
    }
    b.release(50, false);
    b1.release(7, true);
    wait_for("released load converges to zero everywhere", || {
        c.in_flight()
            .iter()
            .all(|m| m.values().all(|f| *f == InFlight::default()))
    })
    .await;

    // /metrics shows the mesh counters.
    let addr = c.nodes[0].metrics_addr.unwrap();
    let page = support::get(&c.client, addr, "/metrics").await.unwrap();
    let text = String::from_utf8_lossy(&page.body);
    assert!(text.contains("infermesh_mesh_members 3"), "{text}");
    assert!(text.contains("infermesh_mesh_prefix_lookup_fallbacks_total"));
    c.fleet.shutdown().await;
}

/// A pod that stops answering leaves every node's candidates as soon as its owner's scrape
/// fails: the staleness threshold is a minute, so only the owner's down mark on the load
/// board can take it out of the non-owners' sets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_pod_leaves_every_nodes_candidates_through_its_owners_down_mark() {
    let staleness = Duration::from_secs(60);
    let mut fc = FleetConfig::new(4);
    fc.profile = EngineProfile::instant();
    let model = fc.model.clone();
    let fleet = Fleet::start(fc).await.expect("simulated pods start");
    let pods = fleet.addrs();
    let mut nodes: Vec<App> = Vec::new();
    for i in 0..3 {
        let mut cfg =
            NodeConfig::local(fleet_pool(&pods, &model), ResolvedConfig::builtin_default())
                .expect("valid node config");
        cfg.staleness = staleness;
        let mut mesh = MeshConfig::loopback(
            format!("node-{i}"),
            ClusterKey::new(KEY.to_vec()).expect("key"),
        );
        mesh.seeds = nodes
            .first()
            .map(|n| vec![n.mesh().expect("mesh").gossip_addr()])
            .unwrap_or_default();
        cfg.mesh = Some(MeshOptions {
            config: mesh,
            sharing: true,
        });
        nodes.push(App::start(cfg).await.expect("node starts"));
    }
    let candidates = |a: &App| -> BTreeSet<SocketAddr> {
        a.pool()
            .candidates(Instant::now(), staleness, None, &[])
            .iter()
            .map(|e| e.address)
            .collect()
    };
    let all: BTreeSet<SocketAddr> = pods.iter().copied().collect();
    wait_for("3 live members on every node", || {
        nodes
            .iter()
            .all(|a| a.mesh().expect("mesh").members().borrow().members.len() == 3)
    })
    .await;
    // Settled: each node owns its ring share and every node offers every pod.
    wait_for("every pod offered by every node", || {
        let mut owned: Vec<PodId> = nodes
            .iter()
            .flat_map(|a| a.mesh().unwrap().owned_pods().borrow().as_ref().clone())
            .collect();
        owned.sort();
        let mut keys: Vec<PodId> = pods.iter().map(|p| PodId::from(*p)).collect();
        keys.sort();
        owned == keys && nodes.iter().all(|a| candidates(a) == all)
    })
    .await;
    // And every board has heard from each pod's owner since: a node that has just lost a pod
    // stops scraping it a moment after the ring says so, and a down mark of its own would
    // then race the owner's.
    let settled = Instant::now();
    wait_for("each pod scraped by its owner on every board", || {
        let owner_of = |p: &PodId| {
            nodes.iter().find_map(|a| {
                let m = a.mesh().unwrap();
                m.owned_pods()
                    .borrow()
                    .contains(p)
                    .then(|| m.node_id().clone())
            })
        };
        nodes.iter().all(|a| {
            let view = a.mesh().unwrap().load_view();
            pods.iter().all(|p| {
                let p = PodId::from(*p);
                view.pod(&p).is_some_and(|l| {
                    l.scraped_by.is_some()
                        && l.scraped_by == owner_of(&p)
                        && l.scraped_at.is_some_and(|t| t > settled)
                })
            })
        })
    })
    .await;

    // Any pod: one node owns it, so two non-owners must learn of its death. (Pods listen on
    // ephemeral ports, so which node owns which pod changes from run to run; asking for a
    // pod a given node does not own failed whenever that node happened to own all four.)
    let dead_index = 0;
    let dead = pods[dead_index];
    let owner = nodes
        .iter()
        .position(|a| {
            a.mesh()
                .unwrap()
                .owned_pods()
                .borrow()
                .contains(&PodId::from(dead))
        })
        .expect("the pod has an owner");
    fleet.stop_pod(dead_index).await;
    wait_for("no node offers the dead pod", || {
        nodes.iter().all(|a| !candidates(a).contains(&dead))
    })
    .await;
    for (i, a) in nodes.iter().enumerate() {
        let load = a.mesh().unwrap().load_view();
        let p = load
            .pod(&PodId::from(dead))
            .expect("the board knows the pod");
        assert!(p.is_down(), "node {i} sees the pod down on the board");
        assert_eq!(
            p.scraped_by.as_ref(),
            Some(nodes[owner].mesh().unwrap().node_id()),
            "node {i}: the down mark comes from the owner"
        );
        let mut others = all.clone();
        others.remove(&dead);
        assert_eq!(candidates(a), others, "node {i} still offers the live pods");
    }

    // Requests through a non-owner go to the live pods only.
    let client = http_client(Duration::from_secs(2));
    let non_owner = (owner + 1) % nodes.len();
    let proxy = nodes[non_owner].proxy_addr.unwrap();
    for q in 0..8 {
        let r = post(
            &client,
            proxy,
            "/v1/completions",
            prefixed_prompt(&model, q, 0),
            &[],
        )
        .await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        let got: SocketAddr = r.header(SERVED_HEADER).unwrap().parse().unwrap();
        assert_ne!(
            got, dead,
            "request {q} via node {non_owner} went to the dead pod"
        );
    }
    fleet.shutdown().await;
}

async fn served_by(c: &Cluster, node: usize, group: usize, question: usize) -> SocketAddr {
    let proxy = c.nodes[node].proxy_addr.unwrap();
    let body = prefixed_prompt(&c.model, group, question);
    let r = post(&c.client, proxy, "/v1/completions", body, &[]).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.header(SERVED_HEADER)
        .expect("served header")
        .parse()
        .unwrap()
}

/// Anchors handed off (sent, received) by the cluster's current nodes, counted since they
/// started. A node that left takes its counts along while what it sent stays in its peers'
/// "received", so after a departure compare growth since a snapshot ([`handoffs_since`]).
fn handoffs(c: &Cluster) -> (u64, u64) {
    c.nodes.iter().fold((0, 0), |(o, i), a| {
        let s = a.mesh().expect("mesh").stats();
        (
            o + s.prefix_handoff_anchors_out,
            i + s.prefix_handoff_anchors_in,
        )
    })
}

/// Whether every current node has handed off for its current ring and every anchor they
/// handed off since `base` (their [`handoffs`] then) has arrived. Totals would not do:
/// anchors a departed node sent earlier stay counted as received with no send left to
/// match them. Nor would counts alone: a node counts a handoff when it plans it, a moment
/// after it sees the membership change. Either gap once let a membership change follow a
/// handoff still in flight, losing an anchor's last copy.
fn handoffs_since(c: &Cluster, base: (u64, u64)) -> bool {
    let planned = c
        .nodes
        .iter()
        .all(|a| a.mesh().expect("mesh").prefix_handoff_current());
    let (out, got) = handoffs(c);
    planned && got - base.1 >= out - base.0
}

fn records_applied(c: &Cluster) -> u64 {
    c.nodes
        .iter()
        .map(|a| a.mesh().unwrap().stats().prefix_records_applied)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_prefix_lands_on_the_same_pod_through_any_node() {
    let c = Cluster::start(3, 4).await;
    let groups = 6;
    let mut sent = 0;
    for g in 0..groups {
        let first = served_by(&c, g % 3, g, 0).await;
        sent += 1;
        // Every pick so far (follow-ups of earlier groups included) is recorded at its
        // anchor's two owners before the next request is routed.
        wait_for("all picks reach both owners", || {
            records_applied(&c) == 2 * sent
        })
        .await;
        for (q, node) in [(1, (g + 1) % 3), (2, (g + 2) % 3), (3, g % 3)] {
            let got = served_by(&c, node, g, q).await;
            sent += 1;
            assert_eq!(
                got, first,
                "group {g}: request {q} via node {node} went elsewhere"
            );
        }
    }
    let fallbacks: u64 = c
        .nodes
        .iter()
        .map(|a| a.mesh().unwrap().stats().prefix_lookup_fallbacks)
        .sum();
    let remote: u64 = c
        .nodes
        .iter()
        .map(|a| a.mesh().unwrap().stats().prefix_lookups_remote)
        .sum();
    assert!(remote > 0, "some lookups went to a remote owner");
    eprintln!("lookups: remote {remote}, fallbacks {fallbacks}");
    c.fleet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_leave_and_kill_move_scraping_and_keep_prefixes() {
    let mut c = Cluster::start(3, 6).await;
    wait_for("pods partitioned over 3 nodes", || c.partitioned()).await;

    // Prefixes recorded before membership changes.
    let mut homes = Vec::new();
    for g in 0..4u64 {
        homes.push(served_by(&c, 0, g as usize, 0).await);
        wait_for("pick recorded at both owners", || {
            records_applied(&c) == 2 * (g + 1)
        })
        .await;
    }

    // Join: a fourth node takes a share of the pods and becomes ready.
    c.add_node().await;
    c.wait_members(4).await;
    wait_for("pods partitioned over 4 nodes", || c.partitioned()).await;
    assert!(
        c.nodes[3]
            .wait_ready(c.pods.len(), Duration::from_secs(20))
            .await
    );
    // Prefix state lives only at the anchors' owners: before the next membership change,
    // every anchor handed off on this one has arrived (else a leave followed at once by a
    // kill can take both copies of an anchor, which no design with R = 2 survives).
    wait_for("handoffs after the join delivered", || {
        handoffs_since(&c, (0, 0))
    })
    .await;

    // Leave: graceful departure is seen at once, its pods re-owned.
    let leaver = c.nodes.remove(1);
    let base = handoffs(&c);
    leaver.shutdown(Duration::from_secs(2)).await;
    c.wait_members(3).await;
    wait_for("pods partitioned after a leave", || c.partitioned()).await;
    wait_for("handoffs after the leave delivered", || {
        handoffs_since(&c, base)
    })
    .await;

    // Kill: no goodbye; detected by SWIM, pods re-owned and scraped again.
    let victim = c.nodes.remove(0);
    let base = handoffs(&c);
    let victim_name = victim.mesh().unwrap().node_id().clone();
    drop(victim);
    let killed_at = Instant::now();
    c.wait_members(2).await;
    wait_for("pods partitioned over the 2 survivors", || c.partitioned()).await;
    wait_for("every pod scraped by a survivor after the kill", || {
        c.nodes.iter().all(|a| {
            let view = a.mesh().unwrap().load_view();
            c.pod_keys().iter().all(|p| {
                view.pod(p).is_some_and(|l| {
                    l.scraped_by.as_ref().is_some_and(|b| *b != victim_name)
                        && l.scraped_at.is_some_and(|t| t > killed_at)
                })
            })
        })
    })
    .await;
    wait_for("handoffs after the kill delivered", || {
        handoffs_since(&c, base)
    })
    .await;

    // The prefixes recorded before survive the join, the leave and the kill (replicas and
    // handoff): requests through either survivor still land on the same pods.
    for (g, home) in homes.iter().enumerate() {
        for node in 0..c.nodes.len() {
            let got = served_by(&c, node, g, 10 + node).await;
            assert_eq!(got, *home, "group {g} via survivor {node}");
        }
    }
    let ids: BTreeSet<String> = c
        .nodes
        .iter()
        .map(|a| a.mesh().unwrap().node_id().to_string())
        .collect();
    assert_eq!(ids.len(), 2);
    c.fleet.shutdown().await;
}

/// One request through a node's ext_proc server as Envoy would send it (full-duplex
/// bodies), answered 200 by the pod: returns the destination the node picked.
async fn ext_proc_pick(c: &Cluster, node: usize, group: usize, question: usize) -> SocketAddr {
    use infermesh_node::request::DESTINATION_HEADER;
    use infermesh_proto::envoy::config::core::v3::{HeaderMap, HeaderValue};
    use infermesh_proto::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
    use infermesh_proto::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
    use infermesh_proto::envoy::service::ext_proc::v3::{
        HttpBody, HttpHeaders, ProcessingRequest, ProtocolConfiguration, processing_request,
        processing_response,
    };
    fn headers(pairs: &[(&str, &str)]) -> HttpHeaders {
        HttpHeaders {
            headers: Some(HeaderMap {
                headers: pairs
                    .iter()
                    .map(|(k, v)| HeaderValue {
                        key: (*k).into(),
                        value: String::new(),
                        raw_value: v.as_bytes().to_vec(),
                    })
                    .collect(),
            }),
            end_of_stream: pairs.iter().any(|(k, _)| *k == ":status"),
            ..Default::default()
        }
    }
    let body = prefixed_prompt(&c.model, group, question);
    let msgs = vec![
        ProcessingRequest {
            protocol_config: Some(ProtocolConfiguration {
                request_body_mode: BodySendMode::FullDuplexStreamed as i32,
                response_body_mode: BodySendMode::FullDuplexStreamed as i32,
                ..Default::default()
            }),
            request: Some(processing_request::Request::RequestHeaders(headers(&[
                (":method", "POST"),
                (":path", "/v1/completions"),
                ("content-type", "application/json"),
            ]))),
            ..Default::default()
        },
        ProcessingRequest {
            request: Some(processing_request::Request::RequestBody(HttpBody {
                body: body.into_bytes(),
                end_of_stream: true,
                ..Default::default()
            })),
            ..Default::default()
        },
        ProcessingRequest {
            request: Some(processing_request::Request::ResponseHeaders(headers(&[(
                ":status", "200",
            )]))),
            ..Default::default()
        },
    ];
    let addr = c.nodes[node].ext_proc_addr;
    let mut client = ExternalProcessorClient::connect(format!("http://{addr}"))
        .await
        .expect("connect to ext_proc");
    let mut replies = client
        .process(futures::stream::iter(msgs))
        .await
        .expect("ext_proc stream")
        .into_inner();
    let mut dest = None;
    let mut response_headers_seen = false;
    while let Some(r) = replies.message().await.expect("ext_proc reply") {
        match r.response {
            Some(processing_response::Response::RequestHeaders(h)) => {
                let m = h.response.and_then(|c| c.header_mutation).expect("headers");
                dest = m
                    .set_headers
                    .iter()
                    .filter_map(|o| o.header.as_ref())
                    .find(|h| h.key == DESTINATION_HEADER)
                    .map(|h| String::from_utf8_lossy(&h.raw_value).into_owned());
            }
            Some(processing_response::Response::ResponseHeaders(_)) => {
                response_headers_seen = true;
                break;
            }
            Some(processing_response::Response::ImmediateResponse(i)) => {
                panic!("ext_proc refused the request: {i:?}")
            }
            _ => {}
        }
    }
    assert!(response_headers_seen, "the response headers were answered");
    dest.expect("a destination").parse().expect("one address")
}

/// The ext_proc path shares prefixes like the proxy: the node taking a request asks the
/// anchor's owner before scheduling, and the pick is recorded at the owners.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_prefix_lands_on_the_same_pod_through_any_nodes_ext_proc() {
    let c = Cluster::start(3, 4).await;
    let remote = |n: usize| c.nodes[n].mesh().unwrap().stats().prefix_lookups_remote;
    let mut sent = 0;
    let mut remote_hits = 0;
    for g in 0..6 {
        let first = ext_proc_pick(&c, g % 3, g, 0).await;
        sent += 1;
        wait_for("the ext_proc pick reaches both owners", || {
            records_applied(&c) == 2 * sent
        })
        .await;
        for (q, node) in [(1, (g + 1) % 3), (2, (g + 2) % 3)] {
            let before = remote(node);
            let got = ext_proc_pick(&c, node, g, q).await;
            sent += 1;
            assert_eq!(
                got, first,
                "group {g}: request {q} via node {node}'s ext_proc went elsewhere"
            );
            if remote(node) > before {
                remote_hits += 1;
            }
            wait_for("the follow-up reaches both owners", || {
                records_applied(&c) == 2 * sent
            })
            .await;
        }
    }
    assert!(
        remote_hits > 0,
        "some follow-ups were matched at a remote owner"
    );
    c.fleet.shutdown().await;
}
