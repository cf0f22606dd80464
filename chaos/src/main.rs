//! `infermesh-chaos`: runs a chaos scenario against a real tier and writes its report.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use infermesh_chaos::net::{Mode, Network};
use infermesh_chaos::run::RunOptions;
use infermesh_chaos::scenario::{FaultKind, GROUPS, scenario};
use infermesh_chaos::tier::{Binaries, TierSize};
use infermesh_chaos::{report, run};

/// Chaos suite for an infermesh tier.
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the scenarios.
    List,
    /// Run one scenario and write its report.
    Run(RunArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// A scenario (`list` shows them): a fault kind or a group.
    #[arg(long)]
    scenario: String,
    /// Seed of every random choice; printed first, random when not given.
    #[arg(long)]
    seed: Option<u64>,
    /// Hosts as loopback addresses (process faults only) or network namespaces.
    #[arg(long, value_enum, default_value = "netns")]
    mode: Mode,
    /// Rounds of each fault (default: the scenario's).
    #[arg(long)]
    rounds: Option<usize>,
    /// infermesh nodes.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Simulated pods.
    #[arg(long, default_value_t = 4)]
    pods: usize,
    /// Envoys (default: 2 in namespace mode, 1 on loopback, where they would share the
    /// listener port).
    #[arg(long)]
    envoys: Option<usize>,
    /// Client requests per second.
    #[arg(long, default_value_t = 40.0)]
    rate: f64,
    /// Concurrent policy writers.
    #[arg(long, default_value_t = 4)]
    writers: u32,
    /// Detection window: failures within it after an event are expected.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    detection: Duration,
    /// Send traffic to the nodes' proxies even when Envoy is installed.
    #[arg(long)]
    via_proxies: bool,
    /// Give Envoy a plain ADS bootstrap without keepalives and health checks (the baseline
    /// the stall detection is measured against).
    #[arg(long)]
    plain_ads_bootstrap: bool,
    /// Directory for the report and timeline.
    #[arg(long, default_value = "bench/results/chaos")]
    out: PathBuf,
    /// Keep the run directory (logs, Raft data) instead of removing it.
    #[arg(long)]
    keep: bool,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::List => {
            for (name, what) in GROUPS {
                println!("{name:<16} {what}");
            }
            for k in FaultKind::ALL {
                let needs = if k.needs_netns() {
                    " (namespace mode)"
                } else if k.needs_envoy() {
                    " (Envoy)"
                } else {
                    ""
                };
                println!("{:<16} one fault kind, three rounds{needs}", k.name());
            }
            ExitCode::SUCCESS
        }
        Command::Run(args) => match run_cmd(args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        },
    }
}

/// Runs; `Ok(false)` when an invariant broke.
fn run_cmd(a: RunArgs) -> Result<bool> {
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    println!("infermesh-chaos: scenario {} seed {seed}", a.scenario);
    let sc = scenario(&a.scenario, a.rounds).with_context(|| {
        format!(
            "unknown scenario {:?} (infermesh-chaos list shows them)",
            a.scenario
        )
    })?;
    if a.nodes < 3 || a.nodes > 8 {
        bail!("--nodes must be 3..=8 (Raft needs a majority to survive one fault)");
    }
    if a.pods == 0 || a.rate <= 0.0 {
        bail!("--pods and --rate must be above zero");
    }
    let bins = Binaries::beside_self()?;
    let envoys = match (a.mode, a.envoys) {
        (Mode::Loopback, Some(n)) if n > 1 => {
            bail!("--envoys above 1 needs --mode netns (on loopback they share the listener port)")
        }
        (_, Some(n)) if n == 0 || n > 8 => bail!("--envoys must be 1..=8"),
        (_, Some(n)) => n,
        (Mode::Netns, None) => 2,
        (Mode::Loopback, None) => 1,
    };
    let size = TierSize {
        nodes: a.nodes,
        pods: a.pods,
        envoys,
    };
    let names = size.host_names();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let run_id = (std::process::id() & 0xffff) as u16;
    // Before any thread starts: namespace mode moves this thread into the client host.
    let net = match a.mode {
        Mode::Loopback => Network::loopback(&names, run_id),
        Mode::Netns => Network::netns(&names, run_id)?,
    };
    let work = tempfile::Builder::new()
        .prefix("infermesh-chaos-")
        .tempdir()?;
    let opts = RunOptions {
        scenario: sc.clone(),
        seed,
        size,
        rate: a.rate,
        writers: a.writers,
        detection: a.detection,
        converge_limit: Duration::from_secs(30),
        via_proxies: a.via_proxies,
        plain_ads: a.plain_ads_bootstrap,
        dir: work.path().to_owned(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Ctrl-C drops the run: its processes are killed and its mounts and namespaces
    // removed by their guards, instead of being left behind.
    let result = rt.block_on(async {
        tokio::select! {
            r = run::run(opts, &net, bins) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    drop(rt);
    let result = match result {
        Ok(r) => r,
        Err(e) => {
            let kept = work.keep();
            bail!("{e:#}\n(logs kept in {})", kept.display());
        }
    };
    std::fs::create_dir_all(&a.out)?;
    let base = format!(
        "{}-{seed}{}",
        sc.name,
        if a.plain_ads_bootstrap {
            "-plain-ads"
        } else {
            ""
        }
    );
    let svg = format!("{base}.svg");
    let plotted = report::timeline(&result, &a.out.join(&svg));
    if let Err(e) = &plotted {
        eprintln!("warning: no timeline: {e:#}");
    }
    let md = report::markdown(&result, plotted.is_ok().then_some(svg.as_str()));
    let path = a.out.join(format!("{base}.md"));
    std::fs::write(&path, &md)?;
    print!("{md}");
    println!("report: {}", path.display());
    let verdict = report::verdict(&result);
    if a.keep || !verdict.broken.is_empty() {
        println!("run directory kept: {}", work.keep().display());
    }
    drop(net);
    Ok(verdict.broken.is_empty())
}
