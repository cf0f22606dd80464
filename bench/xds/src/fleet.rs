//! Fleet-scale run: `--servers` server processes stand for the nodes of a tier, the
//! streams are spread evenly over them, and every round publishes the same change to all
//! of them at once (in a real tier a Raft commit reaches every node and each node's feed
//! publishes it). A round ends when every stream on every server has ACKed it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use clap::Args;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Semaphore, mpsc};

use crate::{
    Child, Mode, cpu_time, delta_stream, ms, percentile, raise_fd_limit, rss_kib, sotw_stream,
    wait_acked,
};

/// Where `fleet` writes its report unless `--out` says otherwise: `bench/results/xds-fleet.md`.
pub const FLEET_OUT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../results/xds-fleet.md");

/// Flags of `fleet`.
#[derive(Debug, Args)]
pub struct FleetArgs {
    /// Concurrent ADS streams in total (one connection and one Envoy node id each).
    #[arg(long, default_value_t = 10_000)]
    pub streams: usize,
    /// Server processes (nodes); stream `i` goes to server `i % servers`.
    #[arg(long, default_value_t = 3)]
    pub servers: usize,
    /// Publishes to time per mode (alternating membership and policy changes).
    #[arg(long, default_value_t = 10)]
    pub rounds: usize,
    /// Modes to run.
    #[arg(long, value_enum, num_args = 1.., default_values_t = [Mode::Sotw, Mode::Delta])]
    pub modes: Vec<Mode>,
    /// Server debounce window in milliseconds (the server default is 50).
    #[arg(long, default_value_t = 50)]
    pub debounce_ms: u64,
    /// Connections being opened at once while the streams connect.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,
    /// Give up on connecting and the initial sync after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub sync_timeout_s: u64,
    /// Give up on a round after this many seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout_s: u64,
    /// Markdown file the report is written to.
    #[arg(long, default_value = FLEET_OUT)]
    pub out: PathBuf,
}

/// One round's outcome.
#[derive(Debug)]
struct Round {
    /// Per-stream push-to-ACK latency, indexed by stream.
    latencies: Vec<Duration>,
    /// How long the publish command took to return from the slowest server.
    publish: Duration,
}

/// Results of one mode.
#[derive(Debug)]
struct FleetResult {
    mode: Mode,
    rss_before_kib: Vec<u64>,
    rss_streams_kib: Vec<u64>,
    connect_and_sync: Duration,
    /// Rounds in order; odd rounds are membership changes, even rounds policy changes.
    rounds: Vec<Round>,
    /// CPU time used during the timed rounds by the servers (each) and by this client.
    servers_cpu: Vec<Duration>,
    client_cpu: Duration,
    /// Wall time of all timed rounds together.
    rounds_wall: Duration,
}

/// Publishes round `n` on every server at once; returns the versions, which must agree
/// (they are content hashes), and the time until the slowest server answered.
async fn publish_all(children: &mut [Child], n: usize) -> anyhow::Result<(Vec<String>, Duration)> {
    let t0 = Instant::now();
    let all = futures::future::try_join_all(children.iter_mut().map(|c| c.publish(n))).await?;
    let took = t0.elapsed();
    ensure!(
        all.iter().all(|v| v == &all[0]),
        "servers disagree on the versions of round {n}: {all:?}"
    );
    Ok((all.into_iter().next().unwrap_or_default(), took))
}

/// The 1-minute load average, or "?" where /proc/loadavg cannot be read.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

fn server_cpu(children: &[Child]) -> anyhow::Result<Vec<Duration>> {
    children.iter().map(|c| cpu_time(c.pid())).collect()
}

async fn run_mode(mode: Mode, args: &FleetArgs) -> anyhow::Result<FleetResult> {
    let timeout = Duration::from_secs(args.timeout_s);
    let mut children = Vec::with_capacity(args.servers);
    for _ in 0..args.servers {
        children.push(Child::start(args.debounce_ms).await?);
    }
    let (base, _) = publish_all(&mut children, 0).await?;
    // Let each debounce task serve the first snapshot before measuring the baseline.
    tokio::time::sleep(Duration::from_millis(args.debounce_ms + 200)).await;
    let rss_before = children
        .iter()
        .map(|c| rss_kib(c.pid()))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let (ack_tx, mut acks) = mpsc::unbounded_channel();
    let limit = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let t0 = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..args.streams {
        let tx = ack_tx.clone();
        let addr = children[s % args.servers].addr;
        let limit = Some(limit.clone());
        tasks.spawn(async move {
            let r = match mode {
                Mode::Sotw => sotw_stream(s, addr, tx, limit).await,
                Mode::Delta => delta_stream(s, addr, tx, limit).await,
            };
            if let Err(e) = r {
                tracing::warn!(stream = s, "stream ended: {e:#}");
            }
        });
    }
    drop(ack_tx);
    let mut held = vec![<[String; 4]>::default(); args.streams];
    let target: [Option<String>; 4] = [0, 1, 2, 3].map(|i| Some(base[i].clone()));
    wait_acked(
        &mut acks,
        &mut held,
        &target,
        t0,
        Duration::from_secs(args.sync_timeout_s),
    )
    .await
    .context("connecting and initial sync")?;
    let connect_and_sync = t0.elapsed();
    eprintln!(
        "  {} streams connected and synced in {} ms",
        args.streams,
        ms(connect_and_sync)
    );
    // Settle: let allocators and connection buffers reach steady state before reading RSS.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_streams = children
        .iter()
        .map(|c| rss_kib(c.pid()))
        .collect::<anyhow::Result<Vec<_>>>()?;

    let me = std::process::id();
    let servers_cpu0 = server_cpu(&children)?;
    let client_cpu0 = cpu_time(me)?;
    let wall0 = Instant::now();
    let mut previous = base;
    let mut rounds = Vec::with_capacity(args.rounds);
    for round in 1..=args.rounds {
        let t0 = Instant::now();
        let (versions, publish) = publish_all(&mut children, round).await?;
        let target: [Option<String>; 4] =
            [0, 1, 2, 3].map(|i| (versions[i] != previous[i]).then(|| versions[i].clone()));
        ensure!(
            target.iter().any(Option::is_some),
            "round {round} changed nothing"
        );
        let latencies = wait_acked(&mut acks, &mut held, &target, t0, timeout)
            .await
            .with_context(|| format!("round {round}"))?;
        let all = latencies.iter().copied().max().unwrap_or_default();
        eprintln!("  round {round}: all ACKed after {} ms", ms(all));
        rounds.push(Round { latencies, publish });
        previous = versions;
    }
    let rounds_wall = wall0.elapsed();
    let client_cpu = cpu_time(me)?.saturating_sub(client_cpu0);
    let servers_cpu = server_cpu(&children)?
        .into_iter()
        .zip(servers_cpu0)
        .map(|(after, before)| after.saturating_sub(before))
        .collect();
    for c in &mut children {
        c.stdin.write_all(b"quit\n").await?;
    }
    tasks.abort_all();
    // Bounded: every task was aborted, so this ends once each has been dropped.
    while tasks.join_next().await.is_some() {}
    Ok(FleetResult {
        mode,
        rss_before_kib: rss_before,
        rss_streams_kib: rss_streams,
        connect_and_sync,
        rounds,
        servers_cpu,
        client_cpu,
        rounds_wall,
    })
}

const KINDS: [&str; 2] = ["membership (EDS)", "policy (LDS+RDS)"];

fn kind_of(round_index: usize) -> usize {
    // Round 1 (index 0) is a membership change, round 2 a policy change, and so on.
    round_index % 2
}

fn tables(results: &[FleetResult], args: &FleetArgs) -> String {
    let mut out = String::new();
    let per_server: Vec<usize> = (0..args.servers)
        .map(|i| (i..args.streams).step_by(args.servers).count())
        .collect();
    out.push_str(&format!(
        "Streams: {} concurrent ADS streams over {} server processes ({} per server), one HTTP/2 \
         connection and one node id each, ACKing every response; connected {} at a time. \
         Rounds: {} publishes per mode, alternating a membership change (ext_proc EDS) and a \
         policy change (listener port + failure mode: LDS and RDS). Each round publishes the \
         same change to all {} servers at once, modelling a Raft commit that reaches every node \
         and is published by each node's feed. Server debounce: {} ms (included in the \
         latencies). Latency: from the publish until a stream has ACKed every changed type; \
         \"all ACKed\" is the time until the last of the {} streams has.\n\n",
        args.streams,
        args.servers,
        per_server
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join("/"),
        args.connect_concurrency,
        args.rounds,
        args.servers,
        args.debounce_ms,
        args.streams,
    ));

    out.push_str("### Memory\n\n");
    out.push_str("Per stream = (sum of the servers' RSS with streams − sum before) / streams.\n\n");
    out.push_str("| mode | streams | servers | RSS before, sum (MiB) | with streams, sum (MiB) | per server with streams (MiB) | per stream (KiB) | ≤ 40 KiB | connect + initial sync (ms) |\n");
    out.push_str("|---|---|---|---|---|---|---|---|---|\n");
    for r in results {
        let before: u64 = r.rss_before_kib.iter().sum();
        let with: u64 = r.rss_streams_kib.iter().sum();
        let per = with.saturating_sub(before) as f64 / args.streams as f64;
        out.push_str(&format!(
            "| {:?} | {} | {} | {:.1} | {:.1} | {} | {:.1} | {} | {} |\n",
            r.mode,
            args.streams,
            args.servers,
            before as f64 / 1024.0,
            with as f64 / 1024.0,
            r.rss_streams_kib
                .iter()
                .map(|k| format!("{:.1}", *k as f64 / 1024.0))
                .collect::<Vec<_>>()
                .join(" / "),
            per,
            if per <= 40.0 { "yes" } else { "no" },
            ms(r.connect_and_sync),
        ));
    }

    out.push_str("\n### Push to ACK\n\n");
    out.push_str("| mode | change | rounds | per-stream p50 (ms) | per-stream p99 (ms) | all ACKed, median round (ms) | all ACKed, worst round (ms) | worst ≤ 2 s |\n");
    out.push_str("|---|---|---|---|---|---|---|---|\n");
    for r in results {
        for (k, kind) in KINDS.iter().enumerate() {
            let rounds: Vec<&Round> = r
                .rounds
                .iter()
                .enumerate()
                .filter(|(i, _)| kind_of(*i) == k)
                .map(|(_, x)| x)
                .collect();
            let mut lat: Vec<Duration> = rounds
                .iter()
                .flat_map(|x| x.latencies.iter().copied())
                .collect();
            lat.sort();
            let mut all: Vec<Duration> = rounds
                .iter()
                .map(|x| x.latencies.iter().copied().max().unwrap_or_default())
                .collect();
            all.sort();
            let worst = all.last().copied().unwrap_or_default();
            out.push_str(&format!(
                "| {:?} | {} | {} | {} | {} | {} | {} | {} |\n",
                r.mode,
                kind,
                rounds.len(),
                ms(percentile(&lat, 0.5)),
                ms(percentile(&lat, 0.99)),
                ms(percentile(&all, 0.5)),
                ms(worst),
                if worst <= Duration::from_secs(2) {
                    "yes"
                } else {
                    "no"
                },
            ));
        }
    }

    out.push_str("\n### Per server (all rounds)\n\n");
    out.push_str("| mode | server | streams | per-stream p50 (ms) | per-stream p99 (ms) | its streams all ACKed, worst round (ms) |\n");
    out.push_str("|---|---|---|---|---|---|\n");
    for r in results {
        for (srv, n) in per_server.iter().enumerate() {
            let mut lat: Vec<Duration> = r
                .rounds
                .iter()
                .flat_map(|x| x.latencies.iter().copied().skip(srv).step_by(args.servers))
                .collect();
            lat.sort();
            let worst = r
                .rounds
                .iter()
                .map(|x| {
                    x.latencies
                        .iter()
                        .copied()
                        .skip(srv)
                        .step_by(args.servers)
                        .max()
                        .unwrap_or_default()
                })
                .max()
                .unwrap_or_default();
            out.push_str(&format!(
                "| {:?} | {} | {} | {} | {} | {} |\n",
                r.mode,
                srv,
                n,
                ms(percentile(&lat, 0.5)),
                ms(percentile(&lat, 0.99)),
                ms(worst),
            ));
        }
    }

    out.push_str("\n### Where the CPU goes during the timed rounds\n\n");
    out.push_str(
        "CPU time (user + system, from /proc) used while the rounds ran, divided by the \
         number of rounds; the load client includes its ACK bookkeeping. Publish is the time \
         until the slowest server's `publish` returned (before the debounce).\n\n",
    );
    out.push_str("| mode | rounds | wall per round (ms) | servers' CPU per round, sum (ms) | client CPU per round (ms) | CPU available per round (ms) | publish, worst (ms) |\n");
    out.push_str("|---|---|---|---|---|---|---|\n");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    for r in results {
        let n = r.rounds.len().max(1) as u32;
        let servers: Duration = r.servers_cpu.iter().sum();
        let wall = r.rounds_wall / n;
        out.push_str(&format!(
            "| {:?} | {} | {} | {} | {} | {} | {} |\n",
            r.mode,
            r.rounds.len(),
            ms(wall),
            ms(servers / n),
            ms(r.client_cpu / n),
            ms(wall * cpus as u32),
            ms(r.rounds.iter().map(|x| x.publish).max().unwrap_or_default()),
        ));
    }
    out
}

/// `fleet`: the fleet-scale benchmark.
pub async fn fleet(args: FleetArgs) -> anyhow::Result<()> {
    ensure!(
        args.streams > 0 && args.servers > 0 && args.rounds >= 2,
        "need at least one stream, one server and two rounds"
    );
    // One socket per stream here, plus the pipes to the servers and some slack; each
    // server raises its own limit at start (see `serve`).
    let needed = args.streams as u64 + 4 * args.servers as u64 + 64;
    let limit = raise_fd_limit(needed)?;
    eprintln!("open-file limit {limit}");
    let load_before = load_average();
    let mut results = Vec::new();
    for mode in &args.modes {
        eprintln!(
            "fleet {mode:?}: {} streams over {} servers...",
            args.streams, args.servers
        );
        results.push(run_mode(*mode, &args).await?);
    }
    let load_after = load_average();
    let tables = tables(&results, &args);
    println!("{tables}");
    let modes: Vec<&str> = args
        .modes
        .iter()
        .map(|m| match m {
            Mode::Sotw => "sotw",
            Mode::Delta => "delta",
        })
        .collect();
    let mut doc = format!(
        "# xDS fleet: {} ADS streams over {} servers\n\n",
        args.streams, args.servers
    );
    doc.push_str(&format!(
        "Generated by `cargo run --release -p infermesh-xds-bench -- fleet --streams {} --servers {} --rounds {} --modes {} --debounce-ms {} --connect-concurrency {}`.\n",
        args.streams,
        args.servers,
        args.rounds,
        modes.join(" "),
        args.debounce_ms,
        args.connect_concurrency,
    ));
    doc.push_str(
        "Targets: a change ACKed by every stream within 2 s of the publish; at most 40 KiB of \
         server memory per stream.\n",
    );
    doc.push_str(&format!(
        "Machine: {} CPUs. The load client (every simulated Envoy) runs on the same CPUs as the \
         {} server processes, so the latencies are upper bounds: the servers compete with the \
         client for CPU.\n\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.servers,
    ));
    doc.push_str(&format!(
        "Load average (1 min, from /proc/loadavg) before the run: {load_before}, after: \
         {load_after}; other jobs on the machine would show here.\n\n"
    ));
    doc.push_str(&tables);
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(&args.out, doc).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("wrote {}", args.out.display());
    Ok(())
}
