//! pd: P/D disaggregation against aggregated serving at the same pod count, through the
//! infermesh node's proxy, on simulated llama-8b-h100 pods.
//!
//! Configurations (fresh pods each, so caches start cold; same seed, so the same
//! requests):
//! - `aggregated-8`: 8 ordinary pods behind one node with the built-in scheduler config.
//! - `pd-2p6d`: 2 prefill pods and 6 decode pods, each decode pod behind an in-process
//!   `infermesh sidecar` (NIXL v2); the node runs llm-d's P/D profiles (decode-filter +
//!   queue-scorer, prefill-filter + queue-scorer, always-disagg-pd-decider) and sends every
//!   request to a decode sidecar with `x-prefiller-host-port`.
//!
//! Workload: llm-d's P/D shape, random ~5,000-token prompts (4,750 + 250 tokens, every
//! prompt distinct) and 250 output tokens, Poisson arrivals. Load arithmetic (profile:
//! prefill 5 ms + 50 µs/token, decode ≈ 6 ms/step): one prompt is ~255 ms of prefill, so a
//! pod prefills ≤ 3.9 req/s; 2 prefill pods cap P/D at ~7.8 req/s, while 8 aggregated pods
//! could prefill ~31 req/s. The default 5 req/s keeps the P/D prefill pods ~65% busy.
//!
//!   cargo run --release -p infermesh-e2e --bin pd -- [--requests N] [--qps Q] [--out FILE]

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use infermesh_bench::{Load, Report, RunSpec, SharedPrefixSpec, Target, Workload};
use infermesh_node::app::App;
use infermesh_node::config::NodeConfig;
use infermesh_node::discovery::fleet_pool;
use infermesh_node::pool_model::{EndpointSpec, Engine, PoolSpec};
use infermesh_node::sidecar::{KvConnector, Sidecar, SidecarConfig};
use infermesh_scheduler::ResolvedConfig;
use infermesh_sim::{EngineProfile, Fleet, FleetConfig, PodRole};

const PODS: usize = 8;
const PREFILL_PODS: usize = 2;

/// llm-d's P/D scheduling: decode pod first (the primary), then a prefill pod for every
/// request, each picked by queue depth.
const PD_CONFIG: &str = "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: decode-filter
- type: prefill-filter
- type: queue-scorer
- type: max-score-picker
- type: always-disagg-pd-decider
- type: disagg-profile-handler
  parameters:
    deciders: {prefill: always-disagg-pd-decider}
schedulingProfiles:
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: queue-scorer}, {pluginRef: max-score-picker}]
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: queue-scorer}, {pluginRef: max-score-picker}]
";

struct Args {
    requests: usize,
    qps: f64,
    out: PathBuf,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        requests: 200,
        qps: 5.0,
        out: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../results/pd.md")),
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

fn endpoint(address: SocketAddr, name: String, role: &str) -> EndpointSpec {
    EndpointSpec {
        address,
        pod: name,
        labels: [("llm-d.ai/role".to_owned(), role.to_owned())].into(),
        engine: Engine::Vllm,
    }
}

fn sidecar_config(model_server: SocketAddr) -> SidecarConfig {
    SidecarConfig {
        listen: "127.0.0.1:0".parse().expect("literal address"),
        model_server,
        connector: KvConnector::Nixlv2,
        ssrf: None,
        prefill_max_retries: 0,
        prefill_retry_backoff: Duration::from_millis(10),
        prefill_timeout: Duration::from_secs(60),
        connect_timeout: Duration::from_secs(1),
        response_timeout: Duration::from_secs(60),
        max_body_bytes: 8 << 20,
        p2p_connector_port: 7777,
        pod_ip: None,
    }
}

/// Runs the workload against one configuration; `pd` chooses P/D or aggregated.
async fn run_config(a: &Args, pd: bool) -> anyhow::Result<Report> {
    let mut fc = FleetConfig::new(PODS);
    fc.profile = EngineProfile::llama_8b_h100();
    if pd {
        fc.roles = [PodRole::Prefill; PREFILL_PODS]
            .into_iter()
            .chain([PodRole::Decode; PODS - PREFILL_PODS])
            .collect();
    }
    let model = fc.model.clone();
    let fleet = Fleet::start(fc).await.context("starting simulated pods")?;
    let pods = fleet.addrs();
    let mut sidecars = Vec::new();
    let (pool, scheduler, label) = if pd {
        let mut endpoints = Vec::new();
        for (i, &p) in pods[..PREFILL_PODS].iter().enumerate() {
            endpoints.push(endpoint(p, format!("prefill-{i}"), "prefill"));
        }
        for (i, &d) in pods[PREFILL_PODS..].iter().enumerate() {
            let s = Sidecar::start(sidecar_config(d)).await?;
            endpoints.push(endpoint(s.addr, format!("decode-{i}"), "decode"));
            sidecars.push(s);
        }
        let pool = PoolSpec {
            name: "llama".into(),
            endpoints,
            models: vec![model.clone()],
            ..Default::default()
        };
        let sched = infermesh_scheduler::load_config(PD_CONFIG).context("P/D config")?;
        (pool, sched, "pd-2p6d")
    } else {
        (
            fleet_pool(&pods, &model),
            ResolvedConfig::builtin_default(),
            "aggregated-8",
        )
    };
    let node = App::start(NodeConfig::local(pool, scheduler)?).await?;
    anyhow::ensure!(
        node.wait_ready(PODS, Duration::from_secs(20)).await,
        "not every pod answered the node's scrape"
    );
    let proxy = node.proxy_addr.context("proxy enabled")?;
    let mut spec = RunSpec::new(
        Target::Url(format!("http://{proxy}")),
        // One group per request: every prompt is distinct (no prefix reuse).
        Workload::SharedPrefix(SharedPrefixSpec {
            groups: a.requests,
            prompts_per_group: 1,
            system_prompt_tokens: 4750,
            question_tokens: 250,
            output_tokens: 250,
            ..SharedPrefixSpec::default()
        }),
    );
    spec.model = model;
    spec.load = Load::Poisson { qps: a.qps };
    spec.max_requests = a.requests;
    spec.max_duration = Duration::from_secs(120);
    spec.drain_timeout = Duration::from_secs(30);
    spec.request_timeout = Duration::from_secs(60);
    spec.ttft_slo = Duration::from_secs(1);
    spec.seed = 11;
    spec.pod_metrics = pods.iter().map(|p| format!("http://{p}")).collect();
    spec.label = label.to_owned();
    eprintln!(
        "run: {label} ({} requests at {} QPS) ...",
        a.requests, a.qps
    );
    let report = infermesh_bench::run(spec).await;
    node.shutdown(Duration::from_secs(2)).await;
    for s in sidecars {
        s.shutdown(Duration::from_secs(2)).await;
    }
    fleet.shutdown().await;
    Ok(report?)
}

fn render(a: &Args, rows: &[Report]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# P/D against aggregated serving (8 simulated pods, through the node's proxy)\n"
    );
    let _ = writeln!(
        s,
        "Measured by `cargo run --release -p infermesh-e2e --bin pd -- --requests {} --qps {}` \
         (bench/pd/pd.rs). Pods: infermesh-sim `llama-8b-h100` at time scale 1 (prefill 5 ms + \
         50 µs/token, decode 6 ms/step + 30 µs/seq + 40 ns/context token, KV 128 KiB/token over a \
         50 GB/s link). Workload: {} distinct prompts of 5,000 tokens (4,750 + 250), 250 output \
         tokens, streamed, Poisson {} req/s, seed 11; each configuration on fresh pods. Goodput: \
         successful requests with TTFT ≤ 1 s, per second.\n",
        a.requests, a.qps, a.requests, a.qps
    );
    let _ = writeln!(
        s,
        "| configuration | ok / sent | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | ITL max ms | goodput req/s | SLO attainment | output tok/s |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} / {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.0} | {:.2} | {:.0}% | {:.0} |",
            r.label,
            r.succeeded,
            r.requests_sent,
            r.ttft.p50_ms,
            r.ttft.p99_ms,
            r.itl.p50_ms,
            r.itl.p99_ms,
            r.itl.max_ms,
            r.goodput_rps,
            r.slo_attainment * 100.0,
            r.output_tokens_per_s,
        );
    }
    s
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let mut rows = Vec::new();
    for pd in [false, true] {
        rows.push(run_config(&a, pd).await?);
    }
    let text = render(&a, &rows);
    print!("{text}");
    std::fs::write(&a.out, &text).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}
