//! mesh-e2e: does a tier of N infermesh nodes route as well as one?
//!
//! Starts simulated vLLM pods (infermesh-sim) and N in-process infermesh nodes joined in
//! one mesh, then drives a shared-prefix workload with infermesh-bench, spread uniformly
//! at random over the nodes' proxies (an L4 spread). Configurations: 1, 3 and 5 sharing
//! nodes, and 3 independent replicas (mesh sharing off: each node scrapes every pod,
//! schedules on its own in-flight counts and its own prefix index). Pods are restarted
//! for each configuration so every run starts with cold caches.
//!
//! Also measured at the node level: load-update convergence across 5 nodes (an in-flight
//! change on one node until all 5 nodes' scheduler endpoints show it), failure detection
//! (kill → every survivor sees the member gone) and re-scrape (kill → every pod scraped
//! again by a survivor). Mesh bytes per request come from the mesh's byte counters.
//!
//!   cargo run --release -p infermesh-e2e --bin mesh-e2e -- [--requests N] [--qps Q] [--out FILE]

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use infermesh_bench::{
    Load, Report, RunSpec, SharedPrefixSpec, Target, Workload, stats::LatencySummary,
};
use infermesh_gossip::{ClusterKey, MeshConfig, StatsSnapshot};
use infermesh_node::app::{App, PrefixMemory};
use infermesh_node::config::NodeConfig;
use infermesh_node::discovery::fleet_pool;
use infermesh_node::mesh::MeshOptions;
use infermesh_scheduler::ResolvedConfig;
use infermesh_sim::{EngineProfile, Fleet, FleetConfig};

const PODS: usize = 8;

struct Args {
    requests: usize,
    qps: f64,
    out: PathBuf,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        requests: 480,
        qps: 20.0,
        out: PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../results/mesh-e2e.md"
        )),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--requests" => a.requests = value()?.parse().context("--requests")?,
            "--qps" => a.qps = value()?.parse().context("--qps")?,
            "--out" => a.out = PathBuf::from(value()?),
            other => bail!("unknown flag {other} (known: --requests, --qps, --out)"),
        }
    }
    anyhow::ensure!(
        a.requests > 0 && a.qps > 0.0,
        "--requests and --qps must be > 0"
    );
    Ok(a)
}

struct Tier {
    nodes: Vec<App>,
}

async fn start_node(
    name: &str,
    pods: &[SocketAddr],
    model: &str,
    seeds: Vec<SocketAddr>,
    sharing: bool,
) -> anyhow::Result<App> {
    let mut cfg = NodeConfig::local(fleet_pool(pods, model), ResolvedConfig::builtin_default())?;
    let mut mesh = MeshConfig::loopback(name, ClusterKey::new(b"mesh-e2e-bench-key".to_vec())?);
    mesh.seeds = seeds;
    cfg.mesh = Some(MeshOptions {
        config: mesh,
        sharing,
    });
    Ok(App::start(cfg).await?)
}

fn members(a: &App) -> usize {
    a.mesh().map_or(0, |m| m.members().borrow().members.len())
}

async fn wait_until(
    what: &str,
    limit: Duration,
    mut ok: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !ok() {
        if Instant::now() > deadline {
            bail!("timed out after {limit:?} waiting until {what}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

impl Tier {
    async fn start(
        n: usize,
        pods: &[SocketAddr],
        model: &str,
        sharing: bool,
    ) -> anyhow::Result<Tier> {
        let mut t = Tier { nodes: Vec::new() };
        for _ in 0..n {
            t.add(pods, model, sharing).await?;
        }
        t.wait_members(n).await?;
        for a in &t.nodes {
            anyhow::ensure!(
                a.wait_ready(pods.len(), Duration::from_secs(20)).await,
                "pods not ready on every node"
            );
        }
        Ok(t)
    }

    async fn add(&mut self, pods: &[SocketAddr], model: &str, sharing: bool) -> anyhow::Result<()> {
        let seeds = self
            .nodes
            .first()
            .and_then(|a| a.mesh())
            .map(|m| vec![m.gossip_addr()])
            .unwrap_or_default();
        // Unique for the process: a replacement node never reuses a killed node's name.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let name = format!(
            "node-{}",
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        self.nodes
            .push(start_node(&name, pods, model, seeds, sharing).await?);
        Ok(())
    }

    async fn wait_members(&self, n: usize) -> anyhow::Result<()> {
        wait_until(
            &format!("{n} members on every node"),
            Duration::from_secs(20),
            || self.nodes.iter().all(|a| members(a) == n),
        )
        .await
    }

    fn stats(&self) -> Vec<StatsSnapshot> {
        self.nodes
            .iter()
            .map(|a| a.mesh().map(|m| m.stats()).unwrap_or_default())
            .collect()
    }

    async fn shutdown(self) {
        for a in self.nodes {
            a.shutdown(Duration::from_secs(2)).await;
        }
    }
}

/// Mesh traffic of a run, summed over nodes.
#[derive(Debug, Default, Clone, Copy)]
struct Traffic {
    prefix: u64,
    load: u64,
    gossip: u64,
    lookups_remote: u64,
    lookups_local: u64,
    fallbacks: u64,
}

fn traffic(before: &[StatsSnapshot], after: &[StatsSnapshot]) -> Traffic {
    let mut t = Traffic::default();
    for (b, a) in before.iter().zip(after) {
        t.prefix +=
            (a.prefix_lookup_bytes_out + a.prefix_record_bytes_out + a.rpc_answer_bytes_out)
                - (b.prefix_lookup_bytes_out + b.prefix_record_bytes_out + b.rpc_answer_bytes_out);
        t.load += a.load_bytes_out - b.load_bytes_out;
        t.gossip += a.gossip_bytes_out - b.gossip_bytes_out;
        t.lookups_remote += a.prefix_lookups_remote - b.prefix_lookups_remote;
        t.lookups_local += a.prefix_lookups_local - b.prefix_lookups_local;
        t.fallbacks += a.prefix_lookup_fallbacks - b.prefix_lookup_fallbacks;
    }
    t
}

struct Row {
    label: String,
    nodes: usize,
    sharing: bool,
    report: Report,
    traffic: Traffic,
    memory: Vec<PrefixMemory>,
}

async fn run_config(a: &Args, label: &str, n: usize, sharing: bool) -> anyhow::Result<Row> {
    let mut fc = FleetConfig::new(PODS);
    fc.profile = EngineProfile::llama_8b_h100();
    let model = fc.model.clone();
    let fleet = Fleet::start(fc).await.context("starting simulated pods")?;
    let pods = fleet.addrs();
    let tier = Tier::start(n, &pods, &model, sharing).await?;
    let urls: Vec<String> = tier
        .nodes
        .iter()
        .map(|a| format!("http://{}", a.proxy_addr.expect("proxy")))
        .collect();
    let mut spec = RunSpec::new(
        if urls.len() == 1 {
            Target::Url(urls[0].clone())
        } else {
            Target::Random(urls)
        },
        Workload::SharedPrefix(SharedPrefixSpec {
            groups: 32,
            prompts_per_group: 16,
            system_prompt_tokens: 2048,
            question_tokens: 64,
            output_tokens: 32,
            ..SharedPrefixSpec::default()
        }),
    );
    spec.model = model;
    spec.load = Load::Poisson { qps: a.qps };
    spec.max_requests = a.requests;
    spec.max_duration = Duration::from_secs(40);
    spec.drain_timeout = Duration::from_secs(10);
    spec.seed = 7;
    spec.pod_metrics = pods.iter().map(|p| format!("http://{p}")).collect();
    spec.label = label.to_owned();
    eprintln!(
        "run: {label} ({} requests at {} QPS) ...",
        a.requests, a.qps
    );
    let before = tier.stats();
    let report = infermesh_bench::run(spec).await;
    let after = tier.stats();
    let memory: Vec<PrefixMemory> = tier.nodes.iter().map(App::prefix_memory).collect();
    tier.shutdown().await;
    fleet.shutdown().await;
    let report = report.with_context(|| format!("run {label}"))?;
    eprintln!(
        "  {label}: hit rate {}, TTFT p90 {:.0} ms, {} ok of {}",
        pct(report.fleet_hit_rate),
        report.ttft.p90_ms,
        report.succeeded,
        report.requests_sent
    );
    Ok(Row {
        label: label.to_owned(),
        nodes: n,
        sharing,
        traffic: traffic(&before, &after),
        report,
        memory,
    })
}

/// In-flight change on one node → all 5 nodes' scheduler endpoints show it.
async fn convergence(samples: usize) -> anyhow::Result<LatencySummary> {
    let mut fc = FleetConfig::new(4);
    fc.profile = EngineProfile::instant();
    let model = fc.model.clone();
    let fleet = Fleet::start(fc).await?;
    let pods = fleet.addrs();
    let tier = Tier::start(5, &pods, &model, true).await?;
    let mut out = Vec::with_capacity(samples);
    for i in 0..samples {
        // Pairs: +1 then −1 on the same node and pod, so counts return to zero.
        let node = (i / 2) % 5;
        let pod = pods[(i / 10) % pods.len()];
        let slot = tier.nodes[node].pool().slot(pod).context("slot")?.clone();
        let acquire = i % 2 == 0;
        let want = if acquire { 1 } else { 0 };
        let t0 = Instant::now();
        if acquire {
            slot.acquire(1);
        } else {
            slot.release(1, true);
        }
        wait_until(
            "in-flight visible on all nodes",
            Duration::from_secs(5),
            || {
                tier.nodes.iter().all(|a| {
                    a.pool()
                        .slot(pod)
                        .is_some_and(|s| s.to_endpoint().in_flight.requests == want)
                })
            },
        )
        .await?;
        out.push(t0.elapsed().as_secs_f64());
    }
    tier.shutdown().await;
    fleet.shutdown().await;
    Ok(LatencySummary::from_secs(out))
}

/// Kill a node (no leave message): time until every survivor drops it, and until every
/// pod has been scraped again by a survivor.
async fn detection(rounds: usize) -> anyhow::Result<(LatencySummary, LatencySummary)> {
    let mut fc = FleetConfig::new(8);
    fc.profile = EngineProfile::instant();
    let model = fc.model.clone();
    let fleet = Fleet::start(fc).await?;
    let pods = fleet.addrs();
    let mut tier = Tier::start(5, &pods, &model, true).await?;
    let (mut detect, mut rescrape) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        // Kill the node that joined last-but-one so node 0 (the seed) survives.
        let victim = tier.nodes.remove(tier.nodes.len() - 2);
        let name = victim.mesh().context("mesh")?.node_id().clone();
        let t0 = Instant::now();
        drop(victim);
        wait_until(
            "survivors drop the killed node",
            Duration::from_secs(10),
            || tier.nodes.iter().all(|a| members(a) == 4),
        )
        .await?;
        detect.push(t0.elapsed().as_secs_f64());
        let keys: Vec<infermesh_gossip::PodId> = pods.iter().map(|p| (*p).into()).collect();
        wait_until("every pod scraped again", Duration::from_secs(10), || {
            tier.nodes.iter().all(|a| {
                let view = a.mesh().map(|m| m.load_view());
                keys.iter().all(|k| {
                    view.as_ref().and_then(|v| v.pod(k)).is_some_and(|l| {
                        l.scraped_by.as_ref().is_some_and(|b| *b != name)
                            && l.scraped_at.is_some_and(|t| t > t0)
                    })
                })
            })
        })
        .await?;
        rescrape.push(t0.elapsed().as_secs_f64());
        tier.add(&pods, &model, true).await?;
        tier.wait_members(5).await?;
        let last = tier.nodes.last().context("node")?;
        anyhow::ensure!(last.wait_ready(pods.len(), Duration::from_secs(20)).await);
    }
    tier.shutdown().await;
    fleet.shutdown().await;
    Ok((
        LatencySummary::from_secs(detect),
        LatencySummary::from_secs(rescrape),
    ))
}

fn pct(x: Option<f64>) -> String {
    x.map_or("n/a".into(), |v| format!("{:.1}%", v * 100.0))
}

fn render(
    a: &Args,
    rows: &[Row],
    conv: &LatencySummary,
    det: &LatencySummary,
    re: &LatencySummary,
) -> String {
    let mut s = String::new();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let _ = writeln!(
        s,
        "# Mesh end-to-end benchmark (loopback, in-process nodes)\n"
    );
    let _ = writeln!(
        s,
        "Command: `bench/mesh-e2e/run.sh` (= `cargo run --release -p infermesh-e2e --bin mesh-e2e -- --requests {} --qps {}`), {cpus} CPUs shared by pods, nodes and load generator.\n",
        a.requests, a.qps
    );
    let _ = writeln!(
        s,
        "Workload: shared prefix, 32 groups × 16 prompts, 2048-token system prompts, 64-token questions, 32 output tokens; Poisson {} QPS, {} requests (seed 7), spread uniformly at random over the nodes' proxies. {PODS} infermesh-sim pods (llama-3.1-8B on H100 profile), restarted per configuration. Lookup budget 2 ms (default), R = 2.\n",
        a.qps, a.requests
    );
    let base = rows.first().and_then(|r| r.report.fleet_hit_rate);
    let _ = writeln!(
        s,
        "| configuration | nodes | sharing | sent | ok | fleet hit rate | Δ vs 1 node | oracle | TTFT p50 | TTFT p90 | remote lookups | fallbacks | mesh B/request (prefix + load + gossip) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let sent = r.report.requests_sent.max(1) as f64;
        let t = r.traffic;
        let delta = match (r.report.fleet_hit_rate, base) {
            (Some(h), Some(b)) => format!("{:+.1} pp", (h - b) * 100.0),
            _ => "n/a".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {:.1}% | {:.0} ms | {:.0} ms | {} | {} | {:.0} ({:.0} + {:.0} + {:.0}) |",
            r.label,
            r.nodes,
            if r.sharing { "on" } else { "off" },
            r.report.requests_sent,
            r.report.succeeded,
            pct(r.report.fleet_hit_rate),
            delta,
            r.report.oracle_hit_rate * 100.0,
            r.report.ttft.p50_ms,
            r.report.ttft.p90_ms,
            t.lookups_remote,
            t.fallbacks,
            (t.prefix + t.load + t.gossip) as f64 / sent,
            t.prefix as f64 / sent,
            t.load as f64 / sent,
            t.gossip as f64 / sent,
        );
    }
    let _ = writeln!(
        s,
        "\nMesh bytes are payload bytes the nodes' mesh counters report (prefix lookups, answers and records; load batches; gossip datagrams), QUIC/UDP headers excluded. Load and gossip bytes are time-driven (scrapes every 50 ms, SWIM probes), so per request they fall as the request rate rises.\n"
    );
    render_memory(&mut s, rows);
    let _ = writeln!(
        s,
        "| node-level measurement | samples | p50 | p90 | p99 | max |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for (name, l) in [
        (
            "load-update convergence: in-flight change on one node → visible in all 5 nodes' scheduler endpoints",
            conv,
        ),
        (
            "failure detection: kill (no leave) → all 4 survivors drop the member",
            det,
        ),
        (
            "re-scrape after kill: every pod scraped again by a survivor (all 4 see it)",
            re,
        ),
    ] {
        let _ = writeln!(
            s,
            "| {name} | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms |",
            l.count, l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
        );
    }
    let _ = writeln!(
        s,
        "\nConvergence is polled with a 1 ms timer, so values carry up to ~1 ms of polling error. The gossip crate's own benchmark (`bench/results/mesh.md`, `cargo bench -p infermesh-gossip --bench mesh`) measures the board alone, without nodes; its figures are in that report, not repeated here."
    );
    s
}

/// Prefix-state memory per node after each run, next to the hit rate, against the
/// one-node index and the design's target (R/N + 10% of it).
fn render_memory(s: &mut String, rows: &[Row]) {
    const R: f64 = 2.0;
    let base = rows.first().map_or(0.0, |r| {
        r.memory
            .iter()
            .map(PrefixMemory::total_bytes)
            .sum::<usize>() as f64
    });
    let _ = writeln!(
        s,
        "Prefix state held per node at the end of each run, from the structures' own counters: the owner-side index (anchors this node owns; blocks and heap bytes), the recent-picks cache (this node's picks for anchors owned elsewhere, kept 50 ms) and the scheduler's own index (used only without sharing). Ratio = the node's bytes / the one-node run's bytes; target at N sharing nodes: R/N + 10% (R = 2).\n"
    );
    let _ = writeln!(
        s,
        "| configuration | nodes | fleet hit rate | owner blocks per node (mean / max) | recent picks (max) | local index entries (max) | prefix bytes per node (mean / max) | ratio to 1 node (mean / max) | target |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let n = r.memory.len().max(1) as f64;
        let bytes: Vec<usize> = r.memory.iter().map(PrefixMemory::total_bytes).collect();
        let blocks: Vec<usize> = r.memory.iter().map(|m| m.owner_blocks).collect();
        let mean = |v: &[usize]| v.iter().sum::<usize>() as f64 / n;
        let max = |v: &[usize]| v.iter().copied().max().unwrap_or(0);
        let ratio = |x: f64| {
            if base > 0.0 {
                format!("{:.2}", x / base)
            } else {
                "n/a".into()
            }
        };
        let target = if r.sharing && r.nodes > 1 {
            format!("≤ {:.2}", R / r.nodes as f64 + 0.10)
        } else {
            "—".into()
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.0} / {} | {} | {} | {:.0} KiB / {:.0} KiB | {} / {} | {} |",
            r.label,
            r.nodes,
            pct(r.report.fleet_hit_rate),
            mean(&blocks),
            max(&blocks),
            r.memory.iter().map(|m| m.recent_picks).max().unwrap_or(0),
            r.memory.iter().map(|m| m.local_entries).max().unwrap_or(0),
            mean(&bytes) / 1024.0,
            max(&bytes) as f64 / 1024.0,
            ratio(mean(&bytes)),
            ratio(max(&bytes) as f64),
            target,
        );
    }
    let _ = writeln!(s);
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let mut rows = Vec::new();
    for (label, n, sharing) in [
        ("1 node", 1, true),
        ("3 nodes", 3, true),
        ("5 nodes", 5, true),
        ("3 independent replicas", 3, false),
    ] {
        rows.push(run_config(&a, label, n, sharing).await?);
    }
    eprintln!("measuring load convergence and failure detection ...");
    let conv = convergence(200).await?;
    let (det, re) = detection(5).await?;
    let md = render(&a, &rows, &conv, &det, &re);
    println!("{md}");
    if let Some(dir) = a.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&a.out, &md).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}
