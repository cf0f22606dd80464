//! `infermesh-demo`: simulated pods in this process and a tier of three infermesh nodes
//! as processes on loopback (behind Envoy when it is installed), the same shared-prefix
//! workload through the tier, with one node SIGKILLed mid-run, and through client-side
//! round-robin (each on a fresh fleet, so neither inherits the other's warm caches), and
//! a comparison table that includes what the kill cost.

pub mod outage;
pub mod tier;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Args;
use infermesh_bench::{Load, Report, RunSpec, SharedPrefixSpec, Target, Workload, markdown_table};
use infermesh_sim::{Fleet, FleetConfig};

use self::outage::{Outage, WINDOW};
use self::tier::{Entry, NODES, Tier};

/// Flags of `infermesh-demo` (all optional).
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Simulated pods.
    #[arg(long, default_value_t = 8)]
    pub pods: usize,
    /// Requests per run (two runs).
    #[arg(long, default_value_t = 320)]
    pub requests: usize,
    /// Longest one run sends for.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Mean arrival rate (Poisson), requests per second.
    #[arg(long, default_value_t = 16.0)]
    pub qps: f64,
    /// Workload and simulator seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Which node to SIGKILL (1-3; n1 bootstrapped Raft).
    #[arg(long, default_value_t = 2)]
    pub kill_node: usize,
    /// When to kill it, as a share of the infermesh run's expected length.
    #[arg(long, default_value_t = 0.4)]
    pub kill_at: f64,
    /// Send to the nodes' proxies even when Envoy is installed.
    #[arg(long)]
    pub no_envoy: bool,
}

impl Default for DemoArgs {
    fn default() -> Self {
        DemoArgs {
            pods: 8,
            requests: 320,
            duration: Duration::from_secs(20),
            qps: 16.0,
            seed: 1,
            kill_node: 2,
            kill_at: 0.4,
            no_envoy: false,
        }
    }
}

fn spec(args: &DemoArgs, target: Target, pods: &[String], model: &str, label: &str) -> RunSpec {
    let mut s = RunSpec::new(
        target,
        Workload::SharedPrefix(SharedPrefixSpec {
            groups: 32,
            prompts_per_group: 16,
            system_prompt_tokens: 2048,
            question_tokens: 64,
            output_tokens: 64,
            ..SharedPrefixSpec::default()
        }),
    );
    s.model = model.to_owned();
    s.load = Load::Poisson { qps: args.qps };
    s.max_requests = args.requests;
    s.max_duration = args.duration;
    s.seed = args.seed;
    s.pod_metrics = pods.to_vec();
    s.label = label.to_owned();
    s.drain_timeout = Duration::from_secs(15);
    s
}

async fn start_fleet(args: &DemoArgs) -> anyhow::Result<Fleet> {
    let mut cfg = FleetConfig::new(args.pods);
    cfg.seed = args.seed;
    Fleet::start(cfg)
        .await
        .context("starting the simulated pods")
}

/// How the infermesh leg went: its report, and what the kill cost (`None`: the run ended
/// before the kill was due).
struct TierLeg {
    report: Report,
    entry: String,
    victim: String,
    outage: Option<Outage>,
}

/// Runs the infermesh leg: a fresh fleet, the tier, the workload, the kill.
async fn tier_leg(args: &DemoArgs, model: &str) -> anyhow::Result<TierLeg> {
    let envoy = if args.no_envoy {
        None
    } else {
        tier::envoy_binary()
    };
    eprintln!(
        "starting {} simulated pods and {NODES} infermesh nodes (gossip mesh + Raft, one process each) on 127.0.0.1{} ...",
        args.pods,
        if envoy.is_some() {
            ", behind Envoy"
        } else {
            ""
        }
    );
    let fleet = start_fleet(args).await?;
    let addrs = fleet.addrs();
    let pod_urls: Vec<String> = addrs.iter().map(|a| format!("http://{a}")).collect();
    let mut tier = match Tier::start(&addrs, model, envoy.as_deref()).await {
        Ok(t) => t,
        Err(e) => {
            fleet.shutdown().await;
            return Err(e);
        }
    };
    let (target, entry) = match &tier.entry {
        Entry::Envoy(l) => (
            Target::Url(format!("http://{l}")),
            format!(
                "Envoy at http://{l}, its listener and ext_proc cluster from the nodes over ADS"
            ),
        ),
        Entry::Proxies(p) => (
            Target::Balanced(p.iter().map(|a| format!("http://{a}")).collect()),
            format!(
                "the nodes' own proxies, spread as a health-checked L4 balancer would ({})",
                if args.no_envoy {
                    "--no-envoy"
                } else {
                    "no Envoy found"
                }
            ),
        ),
    };
    let victim = args.kill_node - 1;
    let victim_name = tier.nodes[victim].name.clone();
    let expected = args
        .duration
        .min(Duration::from_secs_f64(args.requests as f64 / args.qps));
    let kill_after = expected.mul_f64(args.kill_at);
    eprintln!(
        "run 1/2: infermesh through {entry} ({} requests, ≤{:?}); {victim_name} gets SIGKILL {:.1} s in ...",
        args.requests,
        args.duration,
        kill_after.as_secs_f64()
    );
    let run = infermesh_bench::run_with_timeline(spec(args, target, &pod_urls, model, "infermesh"));
    tokio::pin!(run);
    let mut killed = None;
    let result = tokio::select! {
        r = &mut run => r,
        () = tokio::time::sleep(kill_after) => {
            // The clock reads before the signal: requests cut off by it end after the kill.
            killed = Some(Instant::now());
            tier.kill(victim);
            eprintln!("        {victim_name} killed (SIGKILL); the run goes on ...");
            run.await
        }
    };
    drop(tier);
    fleet.shutdown().await;
    let (report, timeline) = result.context("infermesh run")?;
    let outage = killed.map(|k| Outage::from_timeline(&timeline.requests, timeline.offset(k)));
    Ok(TierLeg {
        report,
        entry,
        victim: victim_name,
        outage,
    })
}

/// Runs the demo and returns the printed report.
pub async fn run(args: DemoArgs) -> anyhow::Result<String> {
    anyhow::ensure!(
        args.pods >= 2,
        "--pods must be at least 2 to compare routing"
    );
    anyhow::ensure!(
        (1..=NODES).contains(&args.kill_node),
        "--kill-node must be 1 to {NODES}"
    );
    anyhow::ensure!(
        args.kill_at > 0.0 && args.kill_at < 1.0,
        "--kill-at must be between 0 and 1 (a share of the run)"
    );
    anyhow::ensure!(
        args.qps.is_finite() && args.qps > 0.0,
        "--qps must be positive"
    );
    let model = FleetConfig::new(args.pods).model;
    let leg = tier_leg(&args, &model).await?;

    eprintln!("run 2/2: client-side round-robin on a fresh fleet ...");
    let fleet = start_fleet(&args).await?;
    let pod_urls: Vec<String> = fleet
        .addrs()
        .iter()
        .map(|a| format!("http://{a}"))
        .collect();
    let rr = infermesh_bench::run(spec(
        &args,
        Target::RoundRobin(pod_urls.clone()),
        &pod_urls,
        &model,
        "round-robin",
    ))
    .await;
    fleet.shutdown().await;
    let rr = rr.context("round-robin run")?;
    Ok(render(&args, &leg, &rr))
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{:.1}%", v * 100.0))
}

fn render(args: &DemoArgs, leg: &TierLeg, b: &Report) -> String {
    let a = &leg.report;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\ninfermesh demo: {} simulated vLLM pods, {} (seed {}, Poisson {} req/s)\n",
        args.pods, a.workload, args.seed, args.qps
    );
    let _ = writeln!(
        out,
        "infermesh: {NODES} nodes (gossip mesh + Raft), one process each, entered through {}; {} SIGKILLed mid-run.",
        leg.entry, leg.victim
    );
    let _ = writeln!(
        out,
        "round-robin: the client spreads the same requests over the pods itself, no router, no kill.\n"
    );
    let _ = writeln!(out, "| | infermesh | round-robin |\n|---|---|---|");
    let _ = writeln!(
        out,
        "| prefix-cache hit rate | {} | {} |",
        pct(a.fleet_hit_rate),
        pct(b.fleet_hit_rate)
    );
    let _ = writeln!(
        out,
        "| TTFT p50 | {:.1} ms | {:.1} ms |",
        a.ttft.p50_ms, b.ttft.p50_ms
    );
    let _ = writeln!(
        out,
        "| TTFT p90 | {:.1} ms | {:.1} ms |",
        a.ttft.p90_ms, b.ttft.p90_ms
    );
    let _ = writeln!(
        out,
        "| throughput | {:.1} req/s, {:.0} tok/s | {:.1} req/s, {:.0} tok/s |",
        a.request_throughput, a.output_tokens_per_s, b.request_throughput, b.output_tokens_per_s
    );
    let _ = writeln!(
        out,
        "| succeeded / sent | {} / {} | {} / {} |",
        a.succeeded, a.requests_sent, b.succeeded, b.requests_sent
    );
    let window = WINDOW.as_secs_f64();
    match &leg.outage {
        Some(o) => {
            let _ = writeln!(
                out,
                "| node killed | {} at {:.1} s | none |",
                leg.victim, o.kill_at
            );
            let _ = writeln!(
                out,
                "| requests in flight at the kill | {} | - |",
                o.in_flight
            );
            let _ = writeln!(out, "| failed around the kill | {} | - |", o.failed_around);
            let _ = writeln!(out, "| failed after the window | {} | - |", o.failed_after);
            let _ = writeln!(out, "| time to recover | {:.2} s | - |", o.recovery);
            let _ = writeln!(
                out,
                "\nAround the kill: requests in flight at it or sent within {window:.0} s after it. \
                 After the window: requests sent later. Time to recover: from the kill to the end \
                 of the last failed request; the {} requests sent after that all succeeded.",
                o.sent_after_recovery
            );
            if o.failed_before > 0 {
                let _ = writeln!(
                    out,
                    "{} request(s) failed before the kill.",
                    o.failed_before
                );
            }
        }
        None => {
            let _ = writeln!(
                out,
                "| node killed | none (the run ended before the kill was due) | none |"
            );
        }
    }
    let _ = writeln!(
        out,
        "\nFull reports:\n\n{}",
        markdown_table(&[a.clone(), b.clone()])
    );
    out
}
