//! `infermesh-demo`: simulated pods and a node on loopback, the same shared-prefix
//! workload through infermesh and through client-side round-robin (each on a fresh
//! fleet, so neither inherits the other's warm caches), and a comparison table.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use infermesh_bench::{Load, Report, RunSpec, SharedPrefixSpec, Target, Workload, markdown_table};
use infermesh_node::app::App;
use infermesh_node::config::NodeConfig;
use infermesh_node::discovery::fleet_pool;
use infermesh_scheduler::ResolvedConfig;
use infermesh_sim::{Fleet, FleetConfig};

/// Flags of `infermesh-demo` (all optional).
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Simulated pods.
    #[arg(long, default_value_t = 8)]
    pub pods: usize,
    /// Requests per run (two runs).
    #[arg(long, default_value_t = 400)]
    pub requests: usize,
    /// Longest one run sends for.
    #[arg(long, default_value = "25s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Mean arrival rate (Poisson), requests per second.
    #[arg(long, default_value_t = 16.0)]
    pub qps: f64,
    /// Workload and simulator seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

impl Default for DemoArgs {
    fn default() -> Self {
        DemoArgs {
            pods: 8,
            requests: 400,
            duration: Duration::from_secs(25),
            qps: 16.0,
            seed: 1,
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

/// Runs the demo and returns the printed report.
pub async fn run(args: DemoArgs) -> anyhow::Result<String> {
    anyhow::ensure!(
        args.pods >= 2,
        "--pods must be at least 2 to compare routing"
    );
    eprintln!(
        "starting {} simulated pods and an infermesh node on 127.0.0.1 ...",
        args.pods
    );
    let fleet = start_fleet(&args).await?;
    let model = FleetConfig::new(args.pods).model;
    let addrs = fleet.addrs();
    let pod_urls: Vec<String> = addrs.iter().map(|a| format!("http://{a}")).collect();
    let cfg = NodeConfig::local(
        fleet_pool(&addrs, &model),
        ResolvedConfig::builtin_default(),
    )?;
    let node = App::start(cfg).await?;
    let proxy = node.proxy_addr.context("the demo node has a proxy")?;
    if !node.wait_ready(args.pods, Duration::from_secs(15)).await {
        node.shutdown(Duration::from_secs(2)).await;
        fleet.shutdown().await;
        anyhow::bail!("the simulated pods did not become ready within 15 s");
    }
    eprintln!(
        "run 1/2: infermesh proxy at http://{proxy} ({} requests, ≤{:?}) ...",
        args.requests, args.duration
    );
    let via_infermesh = infermesh_bench::run(spec(
        &args,
        Target::Url(format!("http://{proxy}")),
        &pod_urls,
        &model,
        "infermesh",
    ))
    .await;
    node.shutdown(Duration::from_secs(5)).await;
    fleet.shutdown().await;
    let via_infermesh = via_infermesh.context("infermesh run")?;

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
    Ok(render(&args, &via_infermesh, &rr))
}

fn pct(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |v| format!("{:.1}%", v * 100.0))
}

fn render(args: &DemoArgs, a: &Report, b: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\ninfermesh demo: {} simulated vLLM pods, {} (seed {}, Poisson {} req/s)\n",
        args.pods, a.workload, args.seed, args.qps
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
    let _ = writeln!(
        out,
        "\nFull reports:\n\n{}",
        markdown_table(&[a.clone(), b.clone()])
    );
    out
}
