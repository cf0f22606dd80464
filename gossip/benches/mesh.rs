//! Mesh benchmark on loopback: load-update convergence across 5 nodes, failure detection
//! time, remote prefix lookup latency and bytes per message. Prints a table and writes
//! `bench/results/mesh.md`. Every loop is bounded in count and time.
//!
//! Run: `cargo bench -p infermesh-gossip --bench mesh`

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use futures::future::join_all;
use infermesh_gossip::ring::key_of_str;
use infermesh_gossip::{
    ClusterKey, InFlightDelta, Mesh, MeshConfig, PodId, PodMetrics, StatsSnapshot,
};

const NODES: usize = 5;
const PODS: usize = 50;
/// Sample counts; `cargo test --all-targets` runs this binary without `--bench`, and then
/// a short smoke run checks that the program works without writing results.
struct Sizes {
    load_rounds: usize,
    in_flight_rounds: usize,
    lookups: usize,
    kills: usize,
    flow_requests: usize,
}

const FULL: Sizes = Sizes {
    load_rounds: 300,
    in_flight_rounds: 300,
    lookups: 2_000,
    kills: 8,
    flow_requests: 2_000,
};

const SMOKE: Sizes = Sizes {
    load_rounds: 10,
    in_flight_rounds: 10,
    lookups: 50,
    kills: 1,
    flow_requests: 50,
};
const WAIT: Duration = Duration::from_secs(30);

/// `n` requests (negative: completed) of `tokens_each` prompt tokens, none prefilling.
fn requests(n: i64, tokens_each: i64) -> InFlightDelta {
    InFlightDelta {
        requests: n,
        tokens: n * tokens_each,
        prefilling: 0,
    }
}

fn key() -> ClusterKey {
    ClusterKey::new(b"bench-cluster-key-0123456789".to_vec()).expect("key")
}

async fn start(name: &str, seed: Option<&Mesh>) -> Mesh {
    let mut c = MeshConfig::loopback(name, key());
    if let Some(s) = seed {
        c.seeds = vec![s.gossip_addr()];
    }
    Mesh::start(c).await.expect("mesh starts")
}

async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < WAIT, "bench gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Waits for a load snapshot on `m` satisfying `cond`; returns when it was observed.
async fn observe(m: &Mesh, cond: impl Fn(&infermesh_gossip::LoadView) -> bool) -> Instant {
    let mut changes = m.load_changes();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if cond(&m.load_view()) {
            return Instant::now();
        }
        let r = tokio::time::timeout_at(deadline, changes.changed()).await;
        assert!(matches!(r, Ok(Ok(()))), "load view never converged");
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn sum(stats: &[StatsSnapshot], f: impl Fn(&StatsSnapshot) -> u64) -> u64 {
    stats.iter().map(f).sum()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let sizes = if full { FULL } else { SMOKE };
    let mut nodes: Vec<Mesh> = Vec::new();
    for i in 0..NODES {
        let seed = nodes.first();
        let m = start(&format!("node-{i}"), seed).await;
        nodes.push(m);
    }
    until("full membership", || {
        nodes
            .iter()
            .all(|m| m.members().borrow().members.len() == NODES)
    })
    .await;
    let pods: Vec<PodId> = (0..PODS)
        .map(|i| PodId::new(format!("10.9.0.{i}:8000")))
        .collect();
    for m in &nodes {
        m.set_pods(pods.clone());
    }
    until("pod ownership settled", || {
        nodes
            .iter()
            .map(|m| m.owned_pods().borrow().len())
            .sum::<usize>()
            == PODS
    })
    .await;

    // 1. Scrape convergence: the pod's owner publishes; time until every node shows it.
    let mut scrape_all = Vec::with_capacity(sizes.load_rounds);
    let mut scrape_each = Vec::with_capacity(sizes.load_rounds * (NODES - 1));
    for round in 0..sizes.load_rounds {
        let pod = &pods[round % PODS];
        let marker = 1_000 + round as u32;
        let owner = nodes[0]
            .ring()
            .owner(key_of_str(pod.as_str()))
            .cloned()
            .expect("owner");
        let publisher = nodes
            .iter()
            .find(|m| *m.node_id() == owner)
            .expect("owner node");
        let t0 = Instant::now();
        publisher.publish_scrape(
            pod,
            PodMetrics {
                waiting_queue: marker,
                running: 1,
                kv_cache_usage: 0.5,
                ..PodMetrics::default()
            },
            t0,
        );
        let seen = join_all(nodes.iter().filter(|m| *m.node_id() != owner).map(|m| {
            observe(m, move |v| {
                v.pod(pod)
                    .and_then(|p| p.metrics.as_ref())
                    .is_some_and(|x| x.waiting_queue == marker)
            })
        }))
        .await;
        let each: Vec<Duration> = seen.iter().map(|t| t.duration_since(t0)).collect();
        scrape_all.push(*each.iter().max().expect("receivers"));
        scrape_each.extend(each);
    }

    // 2. In-flight convergence: one node changes its count; every node sees the fleet sum.
    let mut inflight_all = Vec::with_capacity(sizes.in_flight_rounds);
    let mut expected_total: i64 = 0;
    let mut per_node = [0i64; NODES];
    let pod = pods[0].clone();
    for round in 0..sizes.in_flight_rounds {
        let who = &nodes[round % NODES];
        // Releases only where something is in flight (a node's count cannot go below 0).
        let delta = if round % 3 == 2 && per_node[round % NODES] > 0 {
            -1
        } else {
            1
        };
        per_node[round % NODES] += delta;
        expected_total += delta;
        let t0 = Instant::now();
        who.add_in_flight(&pod, requests(delta, 100));
        let want = expected_total as u32;
        let pod = &pod;
        let seen = join_all(nodes.iter().map(|m| {
            observe(m, move |v| {
                v.pod(pod).is_some_and(|p| p.in_flight.requests == want)
            })
        }))
        .await;
        inflight_all.push(
            seen.iter()
                .map(|t| t.duration_since(t0))
                .max()
                .expect("nodes"),
        );
    }

    // 3. Remote prefix lookups within the default 2 ms budget, and records.
    let chains: Vec<Vec<u64>> = (0..200u64)
        .map(|i| {
            let a = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            (0..16).map(|k| a ^ k).collect()
        })
        .collect();
    for (i, c) in chains.iter().enumerate() {
        nodes[i % NODES].prefix_record(
            c[0],
            c.clone(),
            PodId::new(format!("10.9.0.{}:8000", i % PODS)),
        );
    }
    until("records applied at owners", || {
        nodes
            .iter()
            .map(|m| m.stats().prefix_records_applied)
            .sum::<u64>()
            >= 2 * chains.len() as u64
    })
    .await;
    let mut lookup_lat = Vec::new();
    let mut lookup_hits = 0usize;
    let mut lookups_done = 0usize;
    for i in 0..sizes.lookups {
        let c = &chains[i % chains.len()];
        let m = &nodes[i % NODES];
        if m.prefix_owners(c[0]).contains(m.node_id()) {
            continue; // local: not a mesh round trip
        }
        let t0 = Instant::now();
        let r = m.prefix_lookup(c[0], c).await;
        lookup_lat.push(t0.elapsed());
        lookups_done += 1;
        if r.is_some_and(|r| r.endpoints.iter().any(|e| e.blocks == 16)) {
            lookup_hits += 1;
        }
    }

    let stats: Vec<StatsSnapshot> = nodes.iter().map(|m| m.stats()).collect();

    // 4. Request flow: each request lands on a node round-robin, looks up its prefix, records
    //    the pick and holds an in-flight slot for a while; mesh payload bytes per request.
    let before: Vec<StatsSnapshot> = nodes.iter().map(|m| m.stats()).collect();
    let in_flight_of =
        |m: &Mesh, p: &PodId| m.load_view().pod(p).map_or(0, |l| l.in_flight.requests);
    let baseline: Vec<u32> = pods.iter().map(|p| in_flight_of(&nodes[0], p)).collect();
    let flow_start = Instant::now();
    let mut open: std::collections::VecDeque<(usize, PodId)> = std::collections::VecDeque::new();
    for i in 0..sizes.flow_requests {
        let node = i % NODES;
        let m = &nodes[node];
        let c = &chains[(i * 7) % chains.len()];
        let _ = m.prefix_lookup(c[0], c).await;
        let pod = pods[(i * 13) % PODS].clone();
        m.prefix_record(c[0], c.clone(), pod.clone());
        m.add_in_flight(&pod, requests(1, 1_000));
        open.push_back((node, pod));
        if open.len() > 32 {
            let (n, p) = open.pop_front().expect("open request");
            nodes[n].add_in_flight(&p, requests(-1, 1_000));
        }
        // Paced at ~1 request/ms so load batches are not artificially coalesced.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    for (n, p) in open.drain(..) {
        nodes[n].add_in_flight(&p, requests(-1, 1_000));
    }
    // Let the last batches leave (bounded wait on the flush of every node).
    until("flow traffic flushed", || {
        nodes.iter().all(|m| {
            pods.iter()
                .zip(&baseline)
                .all(|(p, b)| in_flight_of(m, p) == *b)
        })
    })
    .await;
    let flow_elapsed = flow_start.elapsed();
    let after: Vec<StatsSnapshot> = nodes.iter().map(|m| m.stats()).collect();
    let flow = |f: &dyn Fn(&StatsSnapshot) -> u64| sum(&after, f) - sum(&before, f);
    let flow_lookup = flow(&|s| s.prefix_lookup_bytes_out + s.rpc_answer_bytes_out);
    let flow_record = flow(&|s| s.prefix_record_bytes_out);
    let flow_load = flow(&|s| s.load_bytes_out);

    // 5. Failure detection: kill a node, time until every survivor dropped it.
    let mut detect = Vec::new();
    for kill in 0..sizes.kills {
        let victim = nodes.pop().expect("victim");
        let t0 = Instant::now();
        drop(victim);
        until("survivors drop the killed node", || {
            nodes
                .iter()
                .all(|m| m.members().borrow().members.len() == NODES - 1)
        })
        .await;
        detect.push(t0.elapsed());
        let m = start(&format!("node-{}", NODES + kill), nodes.first()).await;
        nodes.push(m);
        until("replacement joined", || {
            nodes
                .iter()
                .all(|m| m.members().borrow().members.len() == NODES)
        })
        .await;
    }
    let bound = MeshConfig::loopback("x", key()).swim.detection_bound();

    scrape_all.sort();
    scrape_each.sort();
    inflight_all.sort();
    lookup_lat.sort();
    detect.sort();

    let load_batches = sum(&stats, |s| s.load_batches_out);
    let load_bytes = sum(&stats, |s| s.load_bytes_out);
    let gossip_pkts = sum(&stats, |s| s.gossip_packets_out);
    let gossip_bytes = sum(&stats, |s| s.gossip_bytes_out);
    let rec = sum(&stats, |s| s.prefix_records_out);
    let rec_bytes = sum(&stats, |s| s.prefix_record_bytes_out);
    let lk_bytes = sum(&stats, |s| s.prefix_lookup_bytes_out);
    let lk_n = sum(&stats, |s| {
        s.prefix_lookups_remote + s.prefix_lookup_fallbacks
    });
    let fallbacks = sum(&stats, |s| s.prefix_lookup_fallbacks);
    let per = |b: u64, n: u64| if n == 0 { 0.0 } else { b as f64 / n as f64 };

    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Mesh benchmark (loopback, {NODES} nodes, default config)\n"
    );
    let _ = writeln!(
        out,
        "Command: `cargo bench -p infermesh-gossip --bench mesh` (release profile; 2-core shared machine).\n"
    );
    let _ = writeln!(out, "| metric | samples | p50 | p90 | p99 | max |");
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    let mut row = |name: &str, v: &[Duration]| {
        let _ = writeln!(
            out,
            "| {name} | {} | {} ms | {} ms | {} ms | {} ms |",
            v.len(),
            ms(pct(v, 0.5)),
            ms(pct(v, 0.9)),
            ms(pct(v, 0.99)),
            ms(v.last().copied().unwrap_or_default())
        );
    };
    row("scrape → all 4 other nodes (convergence)", &scrape_all);
    row("scrape → one other node", &scrape_each);
    row("in-flight change → all 5 nodes", &inflight_all);
    row("remote prefix lookup (2 ms budget)", &lookup_lat);
    row("failure detection (kill → all survivors)", &detect);
    let _ = writeln!(out);
    let _ = writeln!(out, "| traffic | messages | bytes/message |");
    let _ = writeln!(out, "|---|---|---|");
    let _ = writeln!(
        out,
        "| load batch (QUIC one-way, per peer) | {load_batches} | {:.1} |",
        per(load_bytes, load_batches)
    );
    let _ = writeln!(
        out,
        "| gossip datagram (incl. 33 B HMAC envelope) | {gossip_pkts} | {:.1} |",
        per(gossip_bytes, gossip_pkts)
    );
    let _ = writeln!(
        out,
        "| prefix record, 16-block chain (batched) | {rec} | {:.1} |",
        per(rec_bytes, rec)
    );
    let _ = writeln!(
        out,
        "| prefix lookup request, 16-block chain | {lk_n} | {:.1} |",
        per(lk_bytes, lk_n)
    );
    let _ = writeln!(out);
    let per_req = |b: u64| b as f64 / sizes.flow_requests as f64;
    let _ = writeln!(
        out,
        "Request flow: {} requests over {NODES} nodes in {:.1} s (lookup + record + in-flight +1/−1 each; 16-block chains, R=2). Mesh payload bytes per request (QUIC/UDP headers excluded):\n",
        sizes.flow_requests,
        flow_elapsed.as_secs_f64()
    );
    let _ = writeln!(out, "| part | bytes/request |");
    let _ = writeln!(out, "|---|---|");
    let _ = writeln!(
        out,
        "| prefix lookup (request + answer) | {:.1} |",
        per_req(flow_lookup)
    );
    let _ = writeln!(
        out,
        "| prefix records to owners | {:.1} |",
        per_req(flow_record)
    );
    let _ = writeln!(
        out,
        "| load batches (in-flight to all peers) | {:.1} |",
        per_req(flow_load)
    );
    let _ = writeln!(
        out,
        "| total | {:.1} |",
        per_req(flow_lookup + flow_record + flow_load)
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Remote lookups: {lookups_done} issued, {lookup_hits} returned the full 16-block match, {fallbacks} fell back (budget exceeded).  "
    );
    let _ = writeln!(
        out,
        "Configured worst-case detection bound (N×probe_period + suspect_to_down_after + gossip_interval): {} ms (target ≤ 2000 ms). Convergence target: p99 ≤ 150 ms.",
        bound.as_millis()
    );
    print!("{out}");
    if !full {
        eprintln!("smoke run (no --bench): results not written");
        return;
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench/results/mesh.md");
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    std::fs::write(&path, &out).expect("write bench/results/mesh.md");
    eprintln!("wrote {}", path.display());
}
