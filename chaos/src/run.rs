//! One chaos run: start the tier, keep traffic and policy writes flowing, inject each
//! fault of the scenario round after round, heal it, wait for the tier to converge, and
//! hand everything recorded to [`crate::report`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use crate::net::{Direction, Mode, Network};
use crate::relay::Relay;
use crate::scenario::{FaultKind, Scenario};
use crate::tier::{Binaries, EXT_PROC_PORT, Tier, TierSize};
use crate::traffic::{self, Load, Record, Target};
use crate::writes::{self, KeyState, Write, WriteSummary};

/// What a run does.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The scenario.
    pub scenario: Scenario,
    /// Seed of every random choice (victims, prompts, writes).
    pub seed: u64,
    /// infermesh nodes and pods.
    pub size: TierSize,
    /// Client requests per second.
    pub rate: f64,
    /// Concurrent policy writers.
    pub writers: u32,
    /// A failure within this long after an event (fault or heal) is expected; after it
    /// none should happen.
    pub detection: Duration,
    /// Longest wait for the tier to converge after a heal.
    pub converge_limit: Duration,
    /// Send traffic to the nodes' proxies instead of Envoy.
    pub via_proxies: bool,
    /// Give Envoy the plain ADS bootstrap (no stall detection): the baseline.
    pub plain_ads: bool,
    /// Run directory (logs, data); kept for inspection.
    pub dir: PathBuf,
}

/// One injected fault.
#[derive(Debug, Clone)]
pub struct Window {
    /// Its kind.
    pub kind: FaultKind,
    /// Round of its kind, from 1.
    pub round: usize,
    /// What it struck.
    pub victim: String,
    /// Times (from the run's start) of the events in it: the injection, any intermediate
    /// step (each node of a rolling restart) and the heal.
    pub events: Vec<Duration>,
    /// When the fault was injected.
    pub inject: Duration,
    /// When it was healed.
    pub heal: Duration,
    /// When the tier had converged again (`None`: not within the limit).
    pub converged: Option<Duration>,
    /// Until when this window's traffic is attributed to it (the next window's start).
    pub end: Duration,
    /// Prefix-cache hit rate over the seconds before the fault.
    pub hit_before: Option<f64>,
    /// Prefix-cache hit rate over the seconds after convergence.
    pub hit_after: Option<f64>,
    /// From the injection until every other live node had dropped the victim from the
    /// ext_proc endpoints it serves Envoy (`None`: not measured for this fault, or not
    /// within the hold).
    pub detected: Option<Duration>,
    /// Anything worth saying (a node that died of the fault, …).
    pub note: String,
}

/// One look at the cluster by the monitor.
#[derive(Debug, Clone)]
pub struct Sample {
    /// When, from the run's start.
    pub at: Duration,
    /// Raft leader id as most answering nodes see it.
    pub leader: Option<u64>,
    /// Fewest mesh members any answering node sees.
    pub members: Option<u64>,
}

/// Everything a run recorded.
#[derive(Debug)]
pub struct RunResult {
    /// The options.
    pub opts: RunOptions,
    /// Isolation mode.
    pub mode: Mode,
    /// Whether traffic went through Envoy.
    pub envoy: bool,
    /// Envoys traffic was spread over.
    pub envoys: usize,
    /// Faults, in order.
    pub windows: Vec<Window>,
    /// Client requests.
    pub records: Vec<Record>,
    /// Policy writes.
    pub writes: Vec<Write>,
    /// The write check's verdict.
    pub write_check: Result<WriteSummary, String>,
    /// Monitor samples.
    pub samples: Vec<Sample>,
    /// Faults skipped, with why.
    pub skipped: Vec<String>,
    /// Whether the tier converged at the end (members, leader, policy, xDS versions).
    pub final_converged: bool,
    /// Run length.
    pub elapsed: Duration,
    /// The run's start, which every offset counts from.
    pub t0: Instant,
    /// The machine's load averages (1, 5, 15 min) before and after the run.
    pub load: (String, String),
}

/// Hit-rate window before a fault. At 40 req/s one cold request moves a 2 s window's hit
/// rate by more than a point, so the windows are long enough for the 2-point check.
pub(crate) const PRE: Duration = Duration::from_secs(4);
/// Hit-rate window after convergence (after [`SETTLE`]).
const POST: Duration = Duration::from_secs(4);
/// Pause between convergence and the after-window: owners and caches are still moving.
const SETTLE: Duration = Duration::from_secs(1);

async fn get(addr: SocketAddr, path: &str) -> Option<String> {
    match tokio::time::timeout(
        Duration::from_millis(400),
        infermesh_testkit::net::http_get(addr, path),
    )
    .await
    {
        Ok(Ok((200, body))) => Some(body),
        _ => None,
    }
}

async fn get_json(addr: SocketAddr, path: &str) -> Option<Value> {
    serde_json::from_str(&get(addr, path).await?).ok()
}

fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Prefix-cache (hits, queries) summed over the pods that answer.
async fn cache_counters(tier: &Tier) -> (f64, f64) {
    let mut h = 0.0;
    let mut q = 0.0;
    for p in &tier.pods {
        if let Some(text) = get(
            SocketAddr::new(p.host.ip, crate::tier::POD_PORT),
            "/metrics",
        )
        .await
        {
            h += metric_sum(&text, "vllm:prefix_cache_hits_total");
            q += metric_sum(&text, "vllm:prefix_cache_queries_total");
        }
    }
    (h, q)
}

fn rate(a: (f64, f64), b: (f64, f64)) -> Option<f64> {
    let q = b.1 - a.1;
    (q > 0.0).then(|| (b.0 - a.0) / q)
}

/// Nodes that are running and not paused.
fn live(tier: &Tier) -> Vec<usize> {
    (0..tier.nodes.len())
        .filter(|i| tier.nodes[*i].proc.running() && !tier.nodes[*i].proc.paused())
        .collect()
}

/// Which node holds each Envoy's ADS stream (Envoy node id → node index), asking every
/// live node but `except`.
async fn ads_holders(tier: &Tier, except: Option<usize>) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for i in live(tier).into_iter().filter(|i| Some(*i) != except) {
        let Some(r) = get_json(tier.nodes[i].metrics(), "/debug/xds").await else {
            continue;
        };
        for e in r["envoys"].as_array().into_iter().flatten() {
            if e["connected_streams"].as_u64() > Some(0)
                && let Some(id) = e["node_id"].as_str()
            {
                out.insert(id.to_owned(), i);
            }
        }
    }
    out
}

/// Whether every live node but `victim` has dropped `victim` from the ext_proc endpoints
/// it serves.
async fn dropped_everywhere(tier: &Tier, victim: usize) -> bool {
    let gone = tier.nodes[victim].advertise.to_string();
    for i in live(tier).into_iter().filter(|i| *i != victim) {
        let Some(r) = get_json(tier.nodes[i].metrics(), "/debug/xds").await else {
            return false;
        };
        let served = r["extProcEndpoints"]
            .as_array()
            .is_some_and(|v| v.iter().any(|e| e.as_str() == Some(gone.as_str())));
        if served {
            return false;
        }
    }
    true
}

/// The Raft leader's index, as the live nodes report it.
async fn leader(tier: &Tier) -> Option<usize> {
    for i in live(tier) {
        let s = tier.nodes[i]
            .client()
            .call(http::Method::GET, "/v1/cluster/status", None)
            .await
            .ok()?;
        if s["raft"]["role"] == "Leader" {
            return Some(i);
        }
    }
    None
}

/// Whether every live node agrees on members, leader and what it serves Envoy, and Envoy
/// holds it. `policy_too` also demands the same applied index (only when writes stopped).
/// `Err` names the first disagreement.
async fn converged(tier: &Tier, policy_too: bool) -> Result<(), String> {
    let nodes = live(tier);
    if nodes.len() != tier.nodes.len() {
        return Err(format!(
            "{} of {} nodes live",
            nodes.len(),
            tier.nodes.len()
        ));
    }
    let want: BTreeSet<String> = tier.nodes.iter().map(|n| n.advertise.to_string()).collect();
    let mut leader = None;
    let mut applied = None;
    let mut versions = None;
    let mut synced_envoys = BTreeSet::new();
    for &i in &nodes {
        let n = &tier.nodes[i];
        let name = &n.name;
        let s = n
            .client()
            .call(http::Method::GET, "/v1/cluster/status", None)
            .await
            .map_err(|e| format!("{name}: cluster status: {e}"))?;
        let l = s["raft"]["leader"].as_u64();
        if l.is_none() || (leader.is_some() && leader != l) {
            return Err(format!("{name}: leader {l:?}, others {leader:?}"));
        }
        leader = l;
        let members = s["raft"]["members"].as_array().map(Vec::len);
        if members != Some(tier.nodes.len()) {
            return Err(format!("{name}: {members:?} Raft members"));
        }
        if policy_too {
            let a = s["raft"]["applied_index"].as_u64();
            if applied.is_some() && applied != a {
                return Err(format!("{name}: applied {a:?}, others {applied:?}"));
            }
            applied = a;
        }
        let text = get(n.metrics(), "/metrics")
            .await
            .ok_or_else(|| format!("{name}: no /metrics"))?;
        let m = metric_sum(&text, "infermesh_mesh_members") as usize;
        if m != tier.nodes.len() {
            return Err(format!("{name}: {m} mesh members"));
        }
        let r = get_json(n.metrics(), "/debug/xds")
            .await
            .ok_or_else(|| format!("{name}: no /debug/xds"))?;
        let eps: BTreeSet<String> = r["extProcEndpoints"]
            .as_array()
            .map(|v| {
                v.iter()
                    .filter_map(|e| e.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        if eps != want {
            return Err(format!("{name}: serves ext_proc endpoints {eps:?}"));
        }
        let v = r["versions"].clone();
        if versions.is_some() && versions.as_ref() != Some(&v) {
            return Err(format!("{name}: xDS versions {v}, others {versions:?}"));
        }
        versions = Some(v);
        if let Some(envoys) = r["envoys"].as_array() {
            for e in envoys {
                if e["connected_streams"].as_u64() > Some(0)
                    && e["types"]
                        .as_array()
                        .is_some_and(|t| t.iter().all(|t| t["in_sync"] == true))
                    && let Some(id) = e["node_id"].as_str()
                {
                    synced_envoys.insert(id.to_owned());
                }
            }
        }
    }
    let want: BTreeSet<String> = tier.envoy_ids().into_iter().collect();
    if synced_envoys == want {
        Ok(())
    } else {
        Err(format!(
            "Envoys in sync over ADS: {synced_envoys:?} of {want:?}"
        ))
    }
}

/// Waits until [`converged`]; `Err` carries the last disagreement.
async fn wait_converged(tier: &Tier, limit: Duration, policy_too: bool) -> Result<Instant, String> {
    let deadline = Instant::now() + limit;
    loop {
        match converged(tier, policy_too).await {
            Ok(()) => return Ok(Instant::now()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// tmpfs mounts of the run, unmounted when dropped (also when the run is interrupted or
/// a later mount fails).
#[derive(Debug, Default)]
struct Mounts(Vec<PathBuf>);

impl Mounts {
    /// Mounts a small tmpfs on each node's data directory (for the disk-full fault).
    fn data_dirs(dir: &Path, nodes: usize) -> Result<Mounts> {
        let mut mounted = Mounts::default();
        for i in 1..=nodes {
            let d = dir.join(format!("n{i}"));
            std::fs::create_dir_all(&d)?;
            let st = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", "size=48m", "tmpfs"])
                .arg(&d)
                .status()
                .context("running mount")?;
            if !st.success() {
                bail!("mounting a tmpfs on {} failed (needs root)", d.display());
            }
            mounted.0.push(d);
        }
        Ok(mounted)
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for d in &self.0 {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(d)
                .status();
        }
    }
}

/// Fills the filesystem holding `dir` (returns the filler's path).
fn fill(dir: &Path) -> Result<PathBuf> {
    use std::io::Write as _;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path)?;
    let chunk = vec![0u8; 1 << 20];
    // Bounded: the tmpfs is 48 MiB.
    for _ in 0..128 {
        if f.write_all(&chunk).is_err() {
            break;
        }
    }
    let _ = f.sync_all();
    Ok(path)
}

struct Background {
    stop: Arc<AtomicBool>,
    traffic: tokio::task::JoinHandle<Vec<Record>>,
    writers: Vec<tokio::task::JoinHandle<Vec<Write>>>,
    monitor: tokio::task::JoinHandle<Vec<Sample>>,
}

fn monitor(
    admins: Vec<(infermesh_node::admin::client::AdminClient, SocketAddr)>,
    t0: Instant,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Sample>> {
    tokio::spawn(async move {
        let mut out = Vec::new();
        // Bounded by the run: the driver sets `stop`; one hour is the hard cap.
        while !stop.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(3600) {
            let at = t0.elapsed();
            let mut leaders = std::collections::BTreeMap::<u64, usize>::new();
            let mut members = None::<u64>;
            for (c, metrics) in &admins {
                if let Ok(Ok(s)) = tokio::time::timeout(
                    Duration::from_millis(200),
                    c.call(http::Method::GET, "/v1/cluster/status", None),
                )
                .await
                    && let Some(l) = s["raft"]["leader"].as_u64()
                {
                    *leaders.entry(l).or_default() += 1;
                }
                if let Some(text) = get(*metrics, "/metrics").await {
                    let m = metric_sum(&text, "infermesh_mesh_members") as u64;
                    members = Some(members.map_or(m, |x| x.min(m)));
                }
            }
            let leader = leaders.into_iter().max_by_key(|(_, n)| *n).map(|(l, _)| l);
            out.push(Sample {
                at,
                leader,
                members,
            });
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        out
    })
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Runs `opts` on `net`.
pub async fn run(opts: RunOptions, net: &Network, bins: Binaries) -> Result<RunResult> {
    let load_before = loadavg();
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let mut skipped = Vec::new();
    let faults: Vec<FaultKind> = opts
        .scenario
        .faults
        .iter()
        .copied()
        .filter(|k| {
            if k.needs_netns() && net.mode != Mode::Netns {
                skipped.push(format!("{k}: needs namespace mode"));
                return false;
            }
            if k.needs_envoy() && (bins.envoy.is_none() || opts.via_proxies) {
                skipped.push(format!("{k}: needs traffic through Envoy"));
                return false;
            }
            true
        })
        .collect();
    std::fs::create_dir_all(&opts.dir)?;
    let mounts = if faults.contains(&FaultKind::DiskFull) {
        Mounts::data_dirs(&opts.dir, opts.size.nodes)?
    } else {
        Mounts::default()
    };
    let result = run_tier(&opts, net, bins, &faults, &mut rng, skipped).await;
    // The tier's processes are gone (dropped inside run_tier) before the unmount.
    drop(mounts);
    result.map(|mut r| {
        r.load = (load_before, loadavg());
        r
    })
}

async fn run_tier(
    opts: &RunOptions,
    net: &Network,
    bins: Binaries,
    faults: &[FaultKind],
    rng: &mut ChaCha8Rng,
    skipped: Vec<String>,
) -> Result<RunResult> {
    // The delay fault needs a relay in front of one node's ext_proc server from the start
    // (Envoy learns the advertised address).
    let delay_victim = faults
        .contains(&FaultKind::Delay)
        .then(|| rng.random_range(0..opts.size.nodes));
    let client_ip = net.host("client").ip;
    let mut relay = None;
    if let Some(v) = delay_victim {
        let target = SocketAddr::new(net.host(&format!("n{}", v + 1)).ip, EXT_PROC_PORT);
        relay = Some(Relay::start(SocketAddr::new(client_ip, 19_002), target).await?);
    }
    let relay_addr = relay.as_ref().map(|r| r.addr);
    let mut tier = Tier::start(bins, net, opts.size, &opts.dir, opts.plain_ads, |i| {
        (Some(i) == delay_victim).then_some(relay_addr).flatten()
    })
    .await?;
    let t0 = Instant::now();
    if let Err(last) = wait_converged(&tier, Duration::from_secs(90), false).await {
        let mut why = format!("\nlast disagreement: {last}");
        for e in tier.envoys.iter_mut() {
            if e.exited() {
                why.push_str(&format!("\n{} exited:\n{}", e.host.name, e.log_tail(5)));
            }
        }
        bail!("the tier did not converge after start (logs in the run directory){why}");
    }

    let envoy = !tier.envoys.is_empty() && !opts.via_proxies;
    let target = if envoy {
        Target::Spread(tier.listeners())
    } else {
        Target::Spread(tier.nodes.iter().map(|n| n.proxy()).collect())
    };
    let stop = Arc::new(AtomicBool::new(false));
    let load = Load {
        rate: opts.rate,
        max_in_flight: 512,
        timeout: Duration::from_secs(15),
        tenants: 8,
    };
    let bg = Background {
        traffic: tokio::spawn(traffic::run(
            target,
            load,
            opts.seed,
            t0,
            Duration::from_secs(3600),
            stop.clone(),
        )),
        writers: (0..opts.writers)
            .map(|w| {
                let clients = tier.nodes.iter().map(|n| n.client()).collect();
                tokio::spawn(writes::writer(w, opts.seed, clients, 100_000, stop.clone()))
            })
            .collect(),
        monitor: monitor(
            tier.nodes
                .iter()
                .map(|n| (n.client(), n.metrics()))
                .collect(),
            t0,
            stop.clone(),
        ),
        stop,
    };

    let mut windows = Vec::new();
    for &kind in faults {
        for round in 1..=opts.scenario.rounds {
            let before = cache_counters(&tier).await;
            tokio::time::sleep(PRE).await;
            let at_inject = cache_counters(&tier).await;
            let mut w = inject_and_heal(&mut tier, net, kind, round, rng, relay.as_ref(), t0)
                .await
                .with_context(|| format!("fault {kind} round {round}"))?;
            w.hit_before = rate(before, at_inject);
            match wait_converged(&tier, opts.converge_limit, false).await {
                Ok(c) => w.converged = Some(c.duration_since(t0)),
                Err(last) => {
                    w.note.push_str(&format!("; not converged: {last}"));
                }
            }
            tokio::time::sleep(SETTLE).await;
            let after = cache_counters(&tier).await;
            tokio::time::sleep(POST).await;
            w.hit_after = rate(after, cache_counters(&tier).await);
            if let Some(prev) = windows.last_mut() {
                let prev: &mut Window = prev;
                prev.end = w.events[0].saturating_sub(PRE);
            }
            eprintln!(
                "[{:>6.1}s] {kind} round {round} on {}: converged {}",
                t0.elapsed().as_secs_f64(),
                w.victim,
                w.converged.map_or("never".into(), |c| format!(
                    "{:.2}s after heal",
                    c.saturating_sub(w.heal).as_secs_f64()
                ))
            );
            windows.push(w);
        }
    }

    bg.stop.store(true, Ordering::Relaxed);
    let records = bg.traffic.await?;
    let mut all_writes = Vec::new();
    for w in bg.writers {
        all_writes.extend(w.await?);
    }
    let samples = bg.monitor.await?;
    let end = t0.elapsed();
    if let Some(last) = windows.last_mut() {
        last.end = end;
    }
    let final_converged = match wait_converged(&tier, opts.converge_limit, true).await {
        Ok(_) => true,
        Err(last) => {
            eprintln!("final convergence failed: {last}");
            false
        }
    };
    let mut finals: Vec<Vec<KeyState>> = Vec::new();
    let mut read_error = None;
    for n in &tier.nodes {
        match writes::read_keys(&n.client()).await {
            Ok(v) => finals.push(v),
            Err(e) => read_error = Some(format!("reading {}: {e}", n.name)),
        }
    }
    let write_check = match read_error {
        Some(e) => Err(e),
        None => writes::check(&all_writes, &finals).map_err(|e| e.to_string()),
    };
    Ok(RunResult {
        opts: opts.clone(),
        mode: net.mode,
        envoy,
        envoys: tier.envoys.len(),
        windows,
        records,
        writes: all_writes,
        write_check,
        samples,
        skipped,
        final_converged,
        elapsed: end,
        t0,
        load: Default::default(),
    })
}

async fn inject_and_heal(
    tier: &mut Tier,
    net: &Network,
    kind: FaultKind,
    round: usize,
    rng: &mut ChaCha8Rng,
    relay: Option<&Relay>,
    t0: Instant,
) -> Result<Window> {
    let n = tier.nodes.len();
    let mut note = String::new();
    let victim_node = match kind {
        FaultKind::PauseAds => ads_holders(tier, None)
            .await
            .into_values()
            .next()
            .context("no node holds Envoy's ADS stream")?,
        FaultKind::LeaderKill | FaultKind::LeaderPartition | FaultKind::DiskFull => {
            leader(tier).await.context("no Raft leader")?
        }
        FaultKind::Delay => tier
            .nodes
            .iter()
            .position(|x| Some(x.advertise) == relay.map(|r| r.addr))
            .context("no node behind the relay")?,
        _ => rng.random_range(0..n),
    };
    let victim_pod = rng.random_range(0..tier.pods.len());
    let victim_envoy = rng.random_range(0..tier.envoys.len().max(1));
    let others: Vec<std::net::IpAddr> = (0..n)
        .filter(|j| *j != victim_node)
        .map(|j| tier.nodes[j].ip())
        .collect();
    let vname = tier.nodes[victim_node].name.clone();
    let victim = if kind.strikes_node() {
        vname.clone()
    } else if kind == FaultKind::EnvoyRestart {
        format!("envoy{}", victim_envoy + 1)
    } else {
        format!("pod{victim_pod}")
    };
    // Whether the fault strikes the node holding Envoy's ADS stream: then the stream has to
    // move, and the hold watches for it.
    let on_victim: Vec<String> = if kind.strikes_node() {
        ads_holders(tier, None)
            .await
            .into_iter()
            .filter(|(_, i)| *i == victim_node)
            .map(|(id, _)| id)
            .collect()
    } else {
        Vec::new()
    };
    let watch_ads = !on_victim.is_empty();
    let mut ads_moved = None;
    // Faults that should take the victim out of rotation: time how long that takes.
    let watch_detect = matches!(
        kind,
        FaultKind::Kill
            | FaultKind::Pause
            | FaultKind::PauseAds
            | FaultKind::Partition
            | FaultKind::OneWay
            | FaultKind::Blackhole
            | FaultKind::LeaderKill
            | FaultKind::LeaderPartition
    );
    let mut detected = None;
    let mut events = vec![t0.elapsed()];
    let inject = events[0];
    match kind {
        FaultKind::Kill | FaultKind::LeaderKill => tier.nodes[victim_node].proc.kill(),
        FaultKind::Pause | FaultKind::PauseAds => tier.nodes[victim_node].proc.pause()?,
        FaultKind::Partition | FaultKind::LeaderPartition => {
            net.block(&vname, &others, Direction::Both)?
        }
        FaultKind::OneWay => net.block(&vname, &others, Direction::Inbound)?,
        FaultKind::Blackhole => {
            let all: Vec<_> = net
                .hosts()
                .iter()
                .filter(|h| h.name != vname)
                .map(|h| h.ip)
                .collect();
            net.block(&vname, &all, Direction::Both)?
        }
        FaultKind::Loss => net.loss(&vname, 30)?,
        FaultKind::Delay => relay
            .context("no relay")?
            .set_delay(Duration::from_millis(400)),
        FaultKind::DiskFull => {
            let dir = tier.nodes[victim_node]
                .data_dir
                .parent()
                .context("data dir")?
                .to_owned();
            let filler = fill(&dir)?;
            note = format!("filled {}", filler.display());
        }
        FaultKind::PodKill => tier.pods[victim_pod].kill(),
        FaultKind::PodHang => tier.pods[victim_pod].pause()?,
        FaultKind::PodSlow => {}
        FaultKind::EnvoyRestart => {
            let bin = tier.bins.envoy.clone().context("no envoy")?;
            if let Some(e) = tier.envoys.get_mut(victim_envoy) {
                e.kill();
            }
            tier.start_envoy(victim_envoy, &bin)?;
        }
        FaultKind::RollingRestart => {
            for i in 0..n {
                tier.nodes[i].proc.terminate(Duration::from_secs(15));
                events.push(t0.elapsed());
                tier.restart_node(i).await?;
                if let Err(e) = wait_converged(tier, Duration::from_secs(30), false).await {
                    bail!("{} did not rejoin: {e}", tier.nodes[i].name);
                }
                events.push(t0.elapsed());
            }
        }
    }
    // Hold the fault (the stutter runs its cycles during the hold).
    let hold_end = Instant::now() + kind.hold();
    while Instant::now() < hold_end {
        if kind == FaultKind::PodSlow {
            tier.pods[victim_pod].pause()?;
            tokio::time::sleep(Duration::from_millis(800)).await;
            tier.pods[victim_pod].resume()?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        } else {
            if watch_detect && detected.is_none() && dropped_everywhere(tier, victim_node).await {
                detected = Some(t0.elapsed().saturating_sub(inject));
            }
            if watch_ads && ads_moved.is_none() && kind != FaultKind::RollingRestart && {
                let now = ads_holders(tier, Some(victim_node)).await;
                on_victim.iter().all(|id| now.contains_key(id))
            } {
                ads_moved = Some(t0.elapsed().saturating_sub(inject));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let heal = t0.elapsed();
    match kind {
        FaultKind::Kill | FaultKind::LeaderKill => tier.restart_node(victim_node).await?,
        FaultKind::Pause | FaultKind::PauseAds => tier.nodes[victim_node].proc.resume()?,
        FaultKind::Partition
        | FaultKind::LeaderPartition
        | FaultKind::OneWay
        | FaultKind::Blackhole
        | FaultKind::Loss => net.heal(&vname)?,
        FaultKind::Delay => relay.context("no relay")?.set_delay(Duration::ZERO),
        FaultKind::DiskFull => {
            let dir = tier.nodes[victim_node]
                .data_dir
                .parent()
                .context("data dir")?
                .to_owned();
            std::fs::remove_file(dir.join("filler"))?;
            if tier.nodes[victim_node].proc.exited() {
                note.push_str("; the node exited on the storage error and was restarted");
                tier.nodes[victim_node].proc.kill();
                tier.restart_node(victim_node).await?;
            } else {
                note.push_str("; the node stayed up (no write needed new space)");
            }
        }
        FaultKind::PodKill => tier.restart_pod(victim_pod)?,
        FaultKind::PodHang | FaultKind::PodSlow => {
            if tier.pods[victim_pod].paused() {
                tier.pods[victim_pod].resume()?;
            }
        }
        FaultKind::EnvoyRestart | FaultKind::RollingRestart => {}
    }
    events.push(heal);
    if watch_ads && kind != FaultKind::RollingRestart {
        if !note.is_empty() {
            note.push_str("; ");
        }
        note.push_str(&match ads_moved {
            Some(d) => format!(
                "ADS of {} moved off {vname} after {} ms",
                on_victim.join(", "),
                d.as_millis()
            ),
            None => format!(
                "ADS of {} stayed on {vname} for the whole fault",
                on_victim.join(", ")
            ),
        });
    }
    Ok(Window {
        kind,
        round,
        victim,
        events,
        inject,
        heal,
        converged: None,
        end: Duration::MAX,
        hit_before: None,
        hit_after: None,
        detected,
        note,
    })
}
