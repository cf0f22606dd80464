//! Policy-store benchmark on a 3-node IN-PROCESS cluster: three openraft nodes, each with
//! its own tokio runtime and redb file (fsync on every commit), joined by the in-process
//! MemNetwork (no sockets, no network latency). It measures:
//! write latency (p50/p99, one client at the leader), writes/s (concurrent clients), time
//! from a write's submission until every node has applied it, and recovery time after the
//! leader is killed (until a new leader commits a write).
//!
//! Run: `cargo bench -p infermesh-raft-store --bench raft`. Prints a markdown table and
//! writes it to `bench/results/raft.md`. Every loop is bounded in count and time.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use infermesh_raft_store::testing::TestCluster;
use infermesh_raft_store::{NodeId, Route, StoreConfig};

const NODES: [NodeId; 3] = [1, 2, 3];
const THROUGHPUT_CLIENTS: usize = 8;
const THROUGHPUT_CAP: Duration = Duration::from_secs(30);

/// How much work one run does.
#[derive(Clone, Copy)]
struct Sizes {
    latency_writes: usize,
    throughput_writes: u64,
    recovery_trials: usize,
}

/// `cargo bench` (which passes `--bench`): the full run, saved to bench/results.
const FULL: Sizes = Sizes {
    latency_writes: 400,
    throughput_writes: 1600,
    recovery_trials: 5,
};
/// `cargo test --all-targets` runs this program without `--bench`: a quick smoke run of
/// every section, printed but not saved.
const SMOKE: Sizes = Sizes {
    latency_writes: 20,
    throughput_writes: 80,
    recovery_trials: 1,
};
const WAIT: Duration = Duration::from_secs(20);

fn objective_yaml(name: &str, priority: i64) -> String {
    format!(
        "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\n\
         metadata: {{name: {name}}}\nspec:\n  priority: {priority}\n  poolRef: {{name: pool}}\n"
    )
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// The filesystem type holding `path` (from /proc/mounts), so readers know whether fsync
/// was real (tmpfs would make it free).
fn filesystem_of(path: &Path) -> String {
    let Ok(mounts) = std::fs::read_to_string("/proc/mounts") else {
        return "unknown".into();
    };
    let path = path.canonicalize().unwrap_or_else(|_| path.to_path_buf());
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, mnt, fs) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(mnt).then(|| (mnt.len(), fs.to_string()))
        })
        .max()
        .map_or("unknown".into(), |(_, fs)| fs)
}

struct Report {
    rows: Vec<(String, String, String)>,
}

impl Report {
    fn row(&mut self, metric: &str, value: String, note: &str) {
        println!("{metric:<48} {value:>12}  {note}");
        self.rows.push((metric.into(), value, note.into()));
    }
}

async fn bench(dir: &Path, report: &mut Report, sizes: Sizes) -> Result<()> {
    let Sizes {
        latency_writes,
        throughput_writes,
        recovery_trials,
    } = sizes;
    let mut c = TestCluster::new(dir, 42);
    c.start_bootstrapped(&NODES, &[]).await?;
    let leader = c.wait_leader(&NODES, WAIT).await?;
    let store = c.store(leader)?;

    // 1. Sequential writes at the leader: for each, the time until the client has its
    //    acknowledgement and the time until every node has applied it.
    let stores: Vec<_> = NODES
        .iter()
        .map(|id| c.store(*id))
        .collect::<Result<_, _>>()?;
    let mut lat = Vec::with_capacity(latency_writes);
    let mut prop = Vec::with_capacity(latency_writes);
    for i in 0..latency_writes {
        let doc = objective_yaml(&format!("lat{}", i % 50), i as i64);
        let t = Instant::now();
        let applied = store.apply_yaml(&doc, Route::Local).await?;
        lat.push(t.elapsed());
        for s in &stores {
            s.raft()
                .wait(Some(WAIT))
                .applied_index_at_least(Some(applied.index), "applied everywhere")
                .await
                .context("propagation")?;
        }
        prop.push(t.elapsed());
    }
    lat.sort();
    prop.sort();
    let n = format!("{latency_writes} sequential writes");
    report.row(
        "write latency p50 (ms), 1 client at leader",
        ms(pct(&lat, 0.5)),
        &n,
    );
    report.row(
        "write latency p99 (ms), 1 client at leader",
        ms(pct(&lat, 0.99)),
        &n,
    );
    report.row(
        "write -> applied on all 3 nodes p50 (ms)",
        ms(pct(&prop, 0.5)),
        "same writes, from submit",
    );
    report.row(
        "write -> applied on all 3 nodes p99 (ms)",
        ms(pct(&prop, 0.99)),
        "same writes, from submit",
    );

    // 2. Throughput with concurrent clients (bounded in count and time).
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..THROUGHPUT_CLIENTS {
        let store = store.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= throughput_writes || started.elapsed() > THROUGHPUT_CAP {
                    return Ok::<u64, anyhow::Error>(done);
                }
                let doc = objective_yaml(&format!("tp{client}-{}", n % 20), n as i64);
                store.apply_yaml(&doc, Route::Local).await?;
                done += 1;
            }
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    let elapsed = started.elapsed();
    report.row(
        "writes/s, concurrent clients at leader",
        format!("{:.0}", total as f64 / elapsed.as_secs_f64()),
        &format!(
            "{THROUGHPUT_CLIENTS} clients, {total} writes in {:.2} s",
            elapsed.as_secs_f64()
        ),
    );

    // 3. Recovery after leader loss: kill the leader abruptly, time until a new leader has
    //    committed a write; then restart the old one and repeat.
    let mut rec = Vec::with_capacity(recovery_trials);
    for trial in 0..recovery_trials {
        let leader = c.wait_leader(&NODES, WAIT).await?;
        let rest: Vec<NodeId> = NODES.iter().copied().filter(|n| *n != leader).collect();
        let t = Instant::now();
        c.kill(leader).await;
        let deadline = t + WAIT;
        loop {
            let mut ok = false;
            for id in &rest {
                let s = c.store(*id)?;
                let doc = objective_yaml("recovery", trial as i64);
                if let Ok(Ok(_)) = tokio::time::timeout(
                    Duration::from_millis(500),
                    s.apply_yaml(&doc, Route::Local),
                )
                .await
                {
                    ok = true;
                    break;
                }
            }
            if ok {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "no recovery within {WAIT:?}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        rec.push(t.elapsed());
        c.start(leader).await?;
        let l = c.wait_leader(&NODES, WAIT).await?;
        let idx = c.store(l)?.status().last_log_index.unwrap_or(0);
        for id in NODES {
            c.wait_applied(id, idx, WAIT).await?;
        }
    }
    rec.sort();
    report.row(
        "recovery after leader kill p50 (ms)",
        ms(pct(&rec, 0.5)),
        &format!(
            "{recovery_trials} trials; kill to first commit by a new leader (floor: lease {} ms + election timeout)",
            StoreConfig::new(0, "").election_timeout_max.as_millis()
        ),
    );
    report.row(
        "recovery after leader kill max (ms)",
        ms(*rec.last().unwrap_or(&Duration::ZERO)),
        "",
    );
    c.kill_all().await;
    Ok(())
}

fn main() -> Result<()> {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(base)?;
    let dir = tempfile::tempdir_in(base)?;
    let fs = filesystem_of(dir.path());
    let defaults = StoreConfig::new(0, "");
    // Other work on the machine moves these numbers; record how busy it was.
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut report = Report { rows: Vec::new() };
    println!("raft-store benchmark: 3 in-process nodes, redb on {fs}");
    let full = std::env::args().any(|a| a == "--bench");
    rt.block_on(bench(
        dir.path(),
        &mut report,
        if full { FULL } else { SMOKE },
    ))?;
    if !full {
        println!("smoke run (no --bench): results not saved; run `cargo bench` for the table");
        return Ok(());
    }

    let mut md = String::new();
    md.push_str("# raft-store: policy store benchmark (IN-PROCESS cluster)\n\n");
    md.push_str(
        "Three openraft 0.9 nodes **in one process**, each with its own tokio runtime and its own \
         redb file (fsync'd commit for every log append, vote and apply), connected by the \
         in-process `MemNetwork` transport: real Raft messages and codec, but **no sockets and no \
         network latency**. Numbers over the QUIC mesh will be higher by the network round trips.\n\n",
    );
    md.push_str(&format!(
        "- redb files on: `{fs}` filesystem ({})\n- Raft timings: heartbeat {} ms, election timeout {}-{} ms (openraft defaults)\n\
         - machine: {} CPUs; 1-minute load average when the run started: {load}\n\
         - command: `cargo bench -p infermesh-raft-store --bench raft`\n\n",
        base.display(),
        defaults.heartbeat_interval.as_millis(),
        defaults.election_timeout_min.as_millis(),
        defaults.election_timeout_max.as_millis(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    ));
    md.push_str("| metric | value | notes |\n|---|---:|---|\n");
    for (m, v, n) in &report.rows {
        md.push_str(&format!("| {m} | {v} | {n} |\n"));
    }
    let out = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .join("bench/results/raft.md");
    std::fs::create_dir_all(out.parent().context("results dir")?)?;
    std::fs::write(&out, md)?;
    println!("saved {}", out.display());
    Ok(())
}
