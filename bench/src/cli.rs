//! Command-line front end of the `infermesh-bench` binary.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::report::{Report, load_reports, markdown_table, save_reports};
use crate::scrape::parse_counters;
use crate::spec::{Api, Load, RunSpec, Target};
use crate::workload::{LongContextSpec, MultiTurnSpec, Popularity, SharedPrefixSpec, Workload};

/// Flags of the `infermesh-bench` binary.
#[derive(Debug, Parser)]
#[command(
    name = "infermesh-bench",
    about = "End-to-end benchmark of OpenAI-compatible LLM routers"
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a workload (one run, or a sweep when several --qps are given).
    Run(Box<RunArgs>),
    /// Print one markdown table from saved JSON reports.
    Table {
        /// Report files written by `run`.
        files: Vec<PathBuf>,
        /// Also write the table here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Draw TTFT vs QPS (SVG) from saved JSON reports of sweeps.
    Plot {
        /// Report files written by `run`.
        files: Vec<PathBuf>,
        /// The SVG to write.
        #[arg(long)]
        out: PathBuf,
    },
    /// Multi-class open-loop load (objective and fairness-id headers per class); writes a
    /// JSON report with per-class outcomes, TTFT and goodput.
    Classes(Box<ClassesArgs>),
    /// The overload-priority table from `classes` reports: every leg's rows, then each
    /// target checked against the figures.
    PriorityTable(Box<PriorityTableArgs>),
    /// Replay an overloaded leg's arrivals (its `classes --trace` CSV) through ideal
    /// band-ceiling dispatchers: each class's modelled TTFT p99 against its limit.
    IdealDispatch(Box<IdealDispatchArgs>),
    /// Size a shared-prefix workload from the pods' KV capacity: prints the number of
    /// groups whose system prompts fill `--fill` of the fleet's KV.
    SizeSharedPrefix {
        /// Pod base URLs (their /metrics give `vllm:cache_config_info`).
        #[arg(long, value_delimiter = ',', required = true)]
        metrics: Vec<String>,
        /// Share of the fleet's KV capacity the shared prefixes should fill.
        #[arg(long, default_value_t = 0.75)]
        fill: f64,
        /// System prompt length, tokens.
        #[arg(long)]
        system_prompt_tokens: usize,
    },
}

/// Which workload `run` generates.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum WorkloadKind {
    /// Groups sharing system prompts.
    SharedPrefix,
    /// Multi-round chat with growing history.
    MultiTurn,
    /// ~100k-token agent contexts mixed with short requests.
    LongContext,
}

/// Flags of `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Base URL of the endpoint under test (a router).
    #[arg(
        long,
        conflicts_with = "round_robin",
        required_unless_present_any = ["round_robin", "random"]
    )]
    pub target: Option<String>,
    /// Pod base URLs for client-side round robin (the cache-blind baseline).
    #[arg(long, value_delimiter = ',')]
    pub round_robin: Vec<String>,
    /// Base URLs to spread requests over at random (seeded), e.g. router replicas
    /// behind an L4 balancer.
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["target", "round_robin"])]
    pub random: Vec<String>,
    /// Pod base URLs to scrape for hit rate and spread (default: the round-robin list).
    #[arg(long, value_delimiter = ',')]
    pub metrics: Vec<String>,
    /// Model name sent in requests.
    #[arg(long, default_value = "meta-llama/Llama-3.1-8B-Instruct")]
    pub model: String,
    /// Workload kind.
    #[arg(long, value_enum, default_value = "shared-prefix")]
    pub workload: WorkloadKind,
    /// Shared-prefix: groups.
    #[arg(long)]
    pub groups: Option<usize>,
    /// Shared-prefix: prompts per group.
    #[arg(long)]
    pub prompts_per_group: Option<usize>,
    /// Shared-prefix: system prompt tokens.
    #[arg(long)]
    pub system_prompt_tokens: Option<usize>,
    /// Shared-prefix / multi-turn: question tokens.
    #[arg(long)]
    pub question_tokens: Option<usize>,
    /// Output tokens per request (all workloads).
    #[arg(long)]
    pub output_tokens: Option<usize>,
    /// Shared-prefix: Zipf exponent of group popularity (uniform when absent).
    #[arg(long)]
    pub zipf_alpha: Option<f64>,
    /// Shared-prefix: distinct `image_url` images per request (needs `--api chat`).
    #[arg(long, default_value_t = 0)]
    pub images: usize,
    /// Multi-turn: users.
    #[arg(long)]
    pub users: Option<usize>,
    /// Multi-turn: rounds.
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Multi-turn: system prompt shared by all users, tokens.
    #[arg(long)]
    pub shared_system_prompt_tokens: Option<usize>,
    /// Multi-turn: per-user context, tokens.
    #[arg(long)]
    pub user_history_tokens: Option<usize>,
    /// Multi-turn: replayed answer length, tokens.
    #[arg(long)]
    pub answer_tokens: Option<usize>,
    /// Long-context: agents.
    #[arg(long)]
    pub agents: Option<usize>,
    /// Long-context: turns per agent session.
    #[arg(long)]
    pub turns: Option<usize>,
    /// Long-context: context tokens.
    #[arg(long)]
    pub context_tokens: Option<usize>,
    /// Long-context: tokens appended per turn.
    #[arg(long)]
    pub step_tokens: Option<usize>,
    /// Long-context: share of short requests.
    #[arg(long)]
    pub short_fraction: Option<f64>,
    /// Open loop: Poisson rates; several values run a sweep and draw TTFT vs QPS.
    #[arg(long, value_delimiter = ',', conflicts_with = "concurrency")]
    pub qps: Vec<f64>,
    /// Closed loop: requests in flight.
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// At most this many requests per run.
    #[arg(long, default_value_t = 500)]
    pub max_requests: usize,
    /// No request is sent after this many seconds (per run).
    #[arg(long, default_value_t = 60.0)]
    pub duration_s: f64,
    /// Seed of prompts and arrivals (sweep point k uses seed + k, so each point starts cold).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// TTFT SLO for goodput, ms.
    #[arg(long, default_value_t = 2000.0)]
    pub ttft_slo_ms: f64,
    /// Per-request timeout, seconds.
    #[arg(long, default_value_t = 120.0)]
    pub request_timeout_s: f64,
    /// Grace for in-flight requests after the duration, seconds.
    #[arg(long, default_value_t = 30.0)]
    pub drain_timeout_s: f64,
    /// API used.
    #[arg(long, value_enum, default_value = "completions")]
    pub api: ApiArg,
    /// Name of the system under test in tables.
    #[arg(long, default_value = "target")]
    pub label: String,
    /// Where results are saved.
    #[arg(long, default_value = "bench/results")]
    pub out_dir: PathBuf,
    /// File stem of the saved results (default: `<label>-<workload>`).
    #[arg(long)]
    pub name: Option<String>,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

/// Flags of `classes`.
#[derive(Debug, Args)]
pub struct ClassesArgs {
    /// Router base URLs (requests spread over them at random).
    #[arg(long, value_delimiter = ',', required = true)]
    targets: Vec<String>,
    /// Model name.
    #[arg(long, default_value = "meta-llama/Llama-3.1-8B-Instruct")]
    model: String,
    /// Classes as name:objective:fairness:weight (- for no header); repeat the flag.
    #[arg(long = "class", required = true)]
    classes: Vec<crate::classes::ClassSpec>,
    /// Total arrival rate, requests/s.
    #[arg(long)]
    qps: f64,
    /// Arrival window, s.
    #[arg(long, default_value_t = 30.0)]
    duration_s: f64,
    /// Prompt length, tokens.
    #[arg(long, default_value_t = 2000)]
    prompt_tokens: usize,
    /// Output tokens per request.
    #[arg(long, default_value_t = 32)]
    output_tokens: usize,
    /// TTFT SLO for goodput, ms.
    #[arg(long, default_value_t = 1000.0)]
    ttft_slo_ms: f64,
    /// Per-request timeout, s.
    #[arg(long, default_value_t = 120.0)]
    request_timeout_s: f64,
    /// RNG seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Router label in the report.
    #[arg(long)]
    label: String,
    /// The JSON report to write.
    #[arg(long)]
    out: PathBuf,
    /// Also write every request as CSV (class, sent_s, ttft_ms, status) to this file.
    #[arg(long)]
    trace: Option<PathBuf>,
}

/// Flags of `priority-table`.
#[derive(Debug, Args)]
pub struct PriorityTableArgs {
    /// infermesh, one node, at low load (the unloaded TTFT reference).
    #[arg(long)]
    unloaded: PathBuf,
    /// infermesh, one node, overloaded.
    #[arg(long)]
    one_node: PathBuf,
    /// infermesh, three nodes, overloaded (repeated: one per flow-control mode).
    #[arg(long = "three-nodes")]
    three_nodes: Vec<PathBuf>,
    /// Peer router legs (each one setting), overloaded.
    #[arg(long = "peer")]
    peers: Vec<PathBuf>,
    /// Name of the critical class.
    #[arg(long, default_value = "critical")]
    critical: String,
    /// Name of the light tenant's class.
    #[arg(long, default_value = "light")]
    light: String,
    /// Name of the sheddable class.
    #[arg(long, default_value = "sheddable")]
    sheddable: String,
}

/// Flags of `ideal-dispatch`.
#[derive(Debug, Args)]
pub struct IdealDispatchArgs {
    /// The overloaded leg's trace CSV (its arrivals are replayed).
    #[arg(long)]
    trace: PathBuf,
    /// The unloaded leg's trace CSV (each class's fastest TTFT and its p99).
    #[arg(long)]
    unloaded: PathBuf,
    /// Pods in the fleet, each prefilling one request at a time.
    #[arg(long, default_value_t = 4)]
    pods: usize,
    /// Milliseconds one prefill holds its pod.
    #[arg(long)]
    prefill_ms: f64,
    /// Seconds a request may wait before it expires (the flow control's request TTL).
    #[arg(long, default_value_t = 1.0)]
    ttl_s: f64,
    /// A class's limit, as a multiple of its unloaded TTFT p99.
    #[arg(long, default_value_t = 1.5)]
    limit_factor: f64,
    /// Ceilings as name:pods in serving order (critical:4,light:3,heavy:3); repeat the flag.
    #[arg(long = "setting", required = true)]
    settings: Vec<crate::ideal::Setting>,
    /// The classes whose TTFT targets the table judges.
    #[arg(long, value_delimiter = ',', default_value = "critical,light")]
    judge: Vec<String>,
}

/// `--api` values.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ApiArg {
    /// /v1/completions
    Completions,
    /// /v1/chat/completions
    Chat,
}

fn secs(field: &str, v: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(v)
        .with_context(|| format!("--{field} must be a non-negative number of seconds, got {v}"))
}

impl RunArgs {
    fn workload(&self) -> Workload {
        match self.workload {
            WorkloadKind::SharedPrefix => {
                let d = SharedPrefixSpec::default();
                Workload::SharedPrefix(SharedPrefixSpec {
                    groups: self.groups.unwrap_or(d.groups),
                    prompts_per_group: self.prompts_per_group.unwrap_or(d.prompts_per_group),
                    system_prompt_tokens: self
                        .system_prompt_tokens
                        .unwrap_or(d.system_prompt_tokens),
                    question_tokens: self.question_tokens.unwrap_or(d.question_tokens),
                    output_tokens: self.output_tokens.unwrap_or(d.output_tokens),
                    popularity: self
                        .zipf_alpha
                        .map_or(Popularity::Uniform, |alpha| Popularity::Zipf { alpha }),
                    images_per_request: self.images,
                })
            }
            WorkloadKind::MultiTurn => {
                let d = MultiTurnSpec::default();
                Workload::MultiTurn(MultiTurnSpec {
                    users: self.users.unwrap_or(d.users),
                    rounds: self.rounds.unwrap_or(d.rounds),
                    shared_system_prompt_tokens: self
                        .shared_system_prompt_tokens
                        .unwrap_or(d.shared_system_prompt_tokens),
                    user_history_tokens: self.user_history_tokens.unwrap_or(d.user_history_tokens),
                    question_tokens: self.question_tokens.unwrap_or(d.question_tokens),
                    answer_tokens: self.answer_tokens.unwrap_or(d.answer_tokens),
                    output_tokens: self.output_tokens.unwrap_or(d.output_tokens),
                })
            }
            WorkloadKind::LongContext => {
                let d = LongContextSpec::default();
                Workload::LongContext(LongContextSpec {
                    agents: self.agents.unwrap_or(d.agents),
                    turns: self.turns.unwrap_or(d.turns),
                    context_tokens: self.context_tokens.unwrap_or(d.context_tokens),
                    step_tokens: self.step_tokens.unwrap_or(d.step_tokens),
                    output_tokens: self.output_tokens.unwrap_or(d.output_tokens),
                    short_fraction: self.short_fraction.unwrap_or(d.short_fraction),
                    ..d
                })
            }
        }
    }

    /// The run specs this invocation asks for (one per QPS point, or one closed-loop run).
    pub fn specs(&self) -> anyhow::Result<Vec<RunSpec>> {
        let target = match &self.target {
            Some(url) => Target::Url(url.clone()),
            None if !self.round_robin.is_empty() => Target::RoundRobin(self.round_robin.clone()),
            None if !self.random.is_empty() => Target::Random(self.random.clone()),
            None => bail!("give --target URL, --round-robin URL,URL,... or --random URL,URL,..."),
        };
        let metrics = if self.metrics.is_empty() && self.target.is_none() {
            self.round_robin.clone()
        } else {
            self.metrics.clone()
        };
        let loads: Vec<Load> = match (self.concurrency, self.qps.as_slice()) {
            (Some(concurrency), _) => vec![Load::Closed { concurrency }],
            (None, []) => vec![Load::Poisson { qps: 4.0 }],
            (None, qps) => qps.iter().map(|&qps| Load::Poisson { qps }).collect(),
        };
        let mut base = RunSpec::new(target, self.workload());
        base.model = self.model.clone();
        base.max_requests = self.max_requests;
        base.max_duration = secs("duration-s", self.duration_s)?;
        base.pod_metrics = metrics;
        base.ttft_slo = secs("ttft-slo-ms", self.ttft_slo_ms / 1000.0)?;
        base.progress = !self.no_progress;
        base.request_timeout = secs("request-timeout-s", self.request_timeout_s)?;
        base.drain_timeout = secs("drain-timeout-s", self.drain_timeout_s)?;
        base.api = match self.api {
            ApiArg::Completions => Api::Completions,
            ApiArg::Chat => Api::Chat,
        };
        base.label = self.label.clone();
        let specs: Vec<RunSpec> = loads
            .into_iter()
            .enumerate()
            .map(|(k, load)| RunSpec {
                load,
                seed: self.seed + k as u64,
                ..base.clone()
            })
            .collect();
        for s in &specs {
            s.validate()?;
        }
        Ok(specs)
    }

    fn stem(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            let kind = self
                .workload
                .to_possible_value()
                .map(|v| v.get_name().to_string())
                .unwrap_or_default();
            format!("{}-{kind}", self.label)
        })
    }
}

fn load_classes(path: &std::path::Path) -> anyhow::Result<crate::classes::ClassesReport> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Runs the parsed command line.
pub async fn run_cli(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Classes(a) => {
            let spec = crate::classes::ClassesSpec {
                targets: a.targets,
                model: a.model,
                classes: a.classes,
                qps: a.qps,
                duration: secs("duration-s", a.duration_s)?,
                prompt_tokens: a.prompt_tokens,
                output_tokens: a.output_tokens,
                ttft_slo: secs("ttft-slo-ms", a.ttft_slo_ms / 1000.0)?,
                request_timeout: secs("request-timeout-s", a.request_timeout_s)?,
                seed: a.seed,
                label: a.label,
            };
            eprintln!(
                "classes: {} at {} req/s for {:?}",
                spec.label, spec.qps, spec.duration
            );
            let report = crate::classes::run_classes(spec).await?;
            eprint!("{}", crate::classes::class_rows(&report));
            std::fs::write(&a.out, serde_json::to_vec_pretty(&report)?)
                .with_context(|| format!("writing {}", a.out.display()))?;
            if let Some(path) = &a.trace {
                std::fs::write(path, crate::classes::trace_csv(&report))
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
        Command::PriorityTable(a) => {
            let unloaded = load_classes(&a.unloaded)?;
            let one = load_classes(&a.one_node)?;
            let three = a
                .three_nodes
                .iter()
                .map(|p| load_classes(p))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let peers = a
                .peers
                .iter()
                .map(|p| load_classes(p))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let names = crate::classes::PriorityNames {
                critical: &a.critical,
                light: &a.light,
                sheddable: &a.sheddable,
            };
            print!(
                "{}",
                crate::classes::priority_table(&unloaded, &one, &three, &peers, &names)
            );
        }
        Command::IdealDispatch(a) => {
            let read = |p: &PathBuf| {
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))
            };
            let mut arrivals = crate::ideal::parse_trace(&read(&a.trace)?)
                .map_err(|e| anyhow::anyhow!("{}: {e}", a.trace.display()))?;
            arrivals.sort_by(|x, y| x.sent_s.total_cmp(&y.sent_s));
            let base = crate::ideal::unloaded_base(
                &crate::ideal::parse_trace(&read(&a.unloaded)?)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", a.unloaded.display()))?,
            );
            anyhow::ensure!(a.pods > 0, "--pods must be at least 1");
            let fleet = crate::ideal::Fleet {
                pods: a.pods,
                prefill_s: secs("prefill-ms", a.prefill_ms / 1000.0)?.as_secs_f64(),
                ttl_s: secs("ttl-s", a.ttl_s)?.as_secs_f64(),
            };
            print!(
                "{}",
                crate::ideal::table(
                    &arrivals,
                    &a.settings,
                    fleet,
                    &base,
                    &a.judge,
                    a.limit_factor
                )
            );
        }
        Command::Run(args) => {
            let specs = args.specs()?;
            let mut reports: Vec<Report> = Vec::new();
            for spec in specs {
                eprintln!(
                    "running {} with {:?} ({})",
                    spec.label,
                    spec.load,
                    spec.workload.describe()
                );
                let report = crate::run(spec).await?;
                eprint!("{}", Report::markdown_header());
                eprint!("{}", report.to_markdown_row());
                reports.push(report);
            }
            let stem = args.stem();
            let json = save_reports(&reports, &args.out_dir, &stem)?;
            print!("{}", markdown_table(&reports));
            println!("\nsaved {}", json.display());
            if reports.len() > 1 {
                let svg = args.out_dir.join(format!("{stem}-ttft.svg"));
                crate::plot_ttft_vs_qps(&reports, &svg)?;
                println!("saved {}", svg.display());
            }
        }
        Command::Table { files, out } => {
            let mut all = Vec::new();
            for f in &files {
                all.extend(load_reports(f)?);
            }
            let table = markdown_table(&all);
            print!("{table}");
            if let Some(out) = out {
                std::fs::write(&out, table)
                    .with_context(|| format!("writing {}", out.display()))?;
            }
        }
        Command::Plot { files, out } => {
            let mut all = Vec::new();
            for f in &files {
                all.extend(load_reports(f)?);
            }
            crate::plot_ttft_vs_qps(&all, &out)?;
            println!("saved {}", out.display());
        }
        Command::SizeSharedPrefix {
            metrics,
            fill,
            system_prompt_tokens,
        } => {
            if !(fill > 0.0 && fill <= 1.0) {
                bail!("--fill must be in (0, 1], got {fill}");
            }
            if system_prompt_tokens == 0 {
                bail!("--system-prompt-tokens must be at least 1");
            }
            let client = crate::client::HttpClient::new();
            let mut capacity = 0u64;
            for base in &metrics {
                let uri = format!("{}/metrics", base.trim_end_matches('/'))
                    .parse()
                    .with_context(|| format!("bad URL {base:?}"))?;
                let text = client
                    .get_text(uri, Duration::from_secs(5))
                    .await
                    .with_context(|| format!("scraping {base}/metrics"))?;
                let c = parse_counters(&text).with_context(|| format!("reading {base}/metrics"))?;
                capacity += c.kv_capacity_tokens().with_context(|| {
                    format!(
                        "{base}/metrics has no vllm:cache_config_info{{block_size,num_gpu_blocks}}"
                    )
                })?;
            }
            let groups = ((capacity as f64 * fill) / system_prompt_tokens as f64)
                .round()
                .max(1.0) as u64;
            eprintln!(
                "fleet KV capacity {capacity} tokens over {} pods; {fill} x {capacity} / {system_prompt_tokens} = {groups} groups",
                metrics.len()
            );
            println!("{groups}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(args: &[&str]) -> anyhow::Result<Vec<RunSpec>> {
        let cli = Cli::try_parse_from(["infermesh-bench", "run"].iter().chain(args))?;
        let Command::Run(run) = cli.command else {
            anyhow::bail!("not a run")
        };
        run.specs()
    }

    #[test]
    fn every_target_mode_parses_and_metrics_default_to_the_pods() {
        let s = specs(&[
            "--target",
            "http://127.0.0.1:1",
            "--metrics",
            "http://127.0.0.1:2",
        ])
        .unwrap();
        assert_eq!(s[0].target, Target::Url("http://127.0.0.1:1".into()));
        assert_eq!(s[0].pod_metrics, ["http://127.0.0.1:2"]);
        let s = specs(&["--round-robin", "http://127.0.0.1:1,http://127.0.0.1:2"]).unwrap();
        assert!(matches!(&s[0].target, Target::RoundRobin(u) if u.len() == 2));
        assert_eq!(s[0].pod_metrics.len(), 2);
        let s = specs(&["--random", "http://127.0.0.1:1,http://127.0.0.1:2"]).unwrap();
        assert!(matches!(&s[0].target, Target::Random(u) if u.len() == 2));
        assert!(s[0].pod_metrics.is_empty());
        assert!(specs(&[]).is_err());
        assert!(specs(&["--target", "http://a:1", "--random", "http://b:1"]).is_err());
    }

    #[test]
    fn a_qps_list_is_a_sweep_with_a_seed_per_point() {
        let s = specs(&[
            "--target",
            "http://127.0.0.1:1",
            "--qps",
            "2,4,8",
            "--seed",
            "10",
        ])
        .unwrap();
        let loads: Vec<_> = s.iter().map(|s| (s.load, s.seed)).collect();
        assert_eq!(
            loads,
            [
                (Load::Poisson { qps: 2.0 }, 10),
                (Load::Poisson { qps: 4.0 }, 11),
                (Load::Poisson { qps: 8.0 }, 12)
            ]
        );
        let s = specs(&[
            "--target",
            "http://127.0.0.1:1",
            "--concurrency",
            "3",
            "--workload",
            "multi-turn",
        ])
        .unwrap();
        assert_eq!(s[0].load, Load::Closed { concurrency: 3 });
        assert!(matches!(s[0].workload, Workload::MultiTurn(_)));
    }

    #[test]
    fn bad_values_name_the_flag() {
        let e = specs(&["--target", "http://127.0.0.1:1", "--qps", "0"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("qps"), "{e}");
        let e = specs(&["--target", "http://127.0.0.1:1", "--zipf-alpha=-1"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("zipf_alpha"), "{e}");
        let e = specs(&["--target", "127.0.0.1:1"]).unwrap_err().to_string();
        assert!(e.contains("http://"), "{e}");
    }
}
