//! The `infermesh` command line: `serve`, `sidecar`, `config check FILE`, `policy`,
//! `cluster`, `xds`.
//! (The demo is its own binary, `infermesh-demo`, in `infermesh-e2e`.)

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::config::{NodeConfig, NodeSettings, load_scheduler_config};

pub use crate::exit::EXIT_CONFIG;

/// infermesh: a replicated, inference-aware router for LLM serving fleets.
#[derive(Debug, Parser)]
#[command(name = "infermesh", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node: ext_proc EPP server, standalone proxy and /metrics.
    Serve(Box<ServeArgs>),
    /// Run the P/D routing sidecar beside a decode pod (llm-d's routing sidecar).
    Sidecar(Box<SidecarArgs>),
    /// Configuration tools.
    Config {
        /// What to do with a config.
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Policy objects in the Raft store (through any node's admin API).
    Policy {
        /// What to do.
        #[command(subcommand)]
        command: crate::admin::commands::PolicyCommand,
        /// Which node, token and output format.
        #[command(flatten)]
        server: crate::admin::commands::ServerArgs,
    },
    /// The policy cluster: status, member removal.
    Cluster {
        /// What to do.
        #[command(subcommand)]
        command: crate::admin::commands::ClusterCommand,
        /// Which node, token and output format.
        #[command(flatten)]
        server: crate::admin::commands::ServerArgs,
    },
    /// The admin tokens the policy cluster accepts: list, add, remove (rotation).
    Tokens {
        /// What to do.
        #[command(subcommand)]
        command: crate::admin::commands::TokenCommand,
        /// Which node, token and output format.
        #[command(flatten)]
        server: crate::admin::commands::ServerArgs,
    },
    /// xDS tools.
    Xds {
        /// What to do.
        #[command(subcommand)]
        command: crate::xds::cli::XdsCommand,
    },
}

/// `infermesh config …`
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate an EndpointPickerConfig file: say for each plugin whether its type is an
    /// llm-d v0.10 name, an accepted older alias or refused (and why), then print the
    /// config resolved (defaults filled in).
    Check {
        /// The YAML file.
        file: PathBuf,
        /// Accept Alpha plugins, as `serve --allow-experimental-plugins` would.
        #[arg(long)]
        allow_experimental_plugins: bool,
    },
    /// List every llm-d plugin type name infermesh knows, with its status.
    Names,
}

/// Flags of `infermesh serve` (defaults follow llm-d where it has one).
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// ext_proc gRPC listen address (llm-d --grpc-port 9002).
    #[arg(long, default_value = "0.0.0.0:9002")]
    pub ext_proc_addr: SocketAddr,
    /// Standalone OpenAI-compatible proxy listen address.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub proxy_addr: SocketAddr,
    /// Do not start the standalone proxy.
    #[arg(long)]
    pub no_proxy: bool,
    /// Prometheus /metrics listen address.
    #[arg(long, default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,
    /// InferencePool-like YAML listing the pool's pods (watched for changes); optional with
    /// a policy cluster, whose InferenceEndpoints add to (or replace) it, and absent when
    /// the --config-file's `dataLayer.discovery` names a `file-discovery` plugin.
    #[arg(long)]
    pub endpoints: Option<PathBuf>,
    /// EndpointPickerConfig YAML (llm-d or GIE apiVersion); default: llm-d's built-in config.
    #[arg(long)]
    pub config_file: Option<PathBuf>,
    /// How often each pod's /metrics is scraped.
    #[arg(long, default_value = "50ms", value_parser = humantime::parse_duration)]
    pub refresh_metrics_interval: Duration,
    /// Metrics older than this take a pod out of the candidate set.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub metrics_staleness_threshold: Duration,
    /// Largest request body accepted (413 above it).
    #[arg(long, default_value_t = 16 << 20)]
    pub max_body_bytes: usize,
    /// Model-server connect timeout (proxy and scrapes).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// Longest the proxy waits for a model server's response headers.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    pub response_timeout: Duration,
    /// Most endpoints the proxy tries for one request (on connect failures).
    #[arg(long, default_value_t = 3)]
    pub max_attempts: usize,
    /// Seconds to wait for in-flight requests on shutdown.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// Put every scored endpoint's scheduler score in the ext_proc reply's `envoy.lb`
    /// metadata, key `x-gateway-destination-endpoint-scores` (llm-d's flag; off).
    #[arg(long)]
    pub emit_endpoint_scores: bool,
    /// Load plugins llm-d marks Alpha (experimental), e.g. utilization-filter, the
    /// topology plugins, session-affinity-scorer, priority-holdback-policy (llm-d's flag;
    /// off: such a config is refused, naming the plugin). `--allow-experimental-plugins`
    /// alone means true.
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub allow_experimental_plugins: bool,
    /// Export OpenTelemetry traces of the request path over OTLP/gRPC (llm-d's flag; off).
    /// Configured by llm-d's variables: OTEL_EXPORTER_OTLP_ENDPOINT (http://localhost:4317),
    /// OTEL_SERVICE_NAME (infermesh), OTEL_TRACES_SAMPLER (parentbased_traceidratio),
    /// OTEL_TRACES_SAMPLER_ARG (0.1).
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub tracing: bool,
    /// Router mesh flags (--node-name, --gossip-addr, --mesh-addr, --seeds, --cluster-key-file…).
    #[command(flatten)]
    pub mesh: crate::mesh::MeshArgs,
    /// Policy cluster flags (--bootstrap, --join, --data-dir, --admin-addr, --admin-token-file).
    #[command(flatten)]
    pub cluster: crate::policy_store::ClusterArgs,
    /// xDS flags (--xds-addr, --xds-listener, --xds-failure-mode, --advertise-ext-proc-addr).
    #[command(flatten)]
    pub xds: crate::xds::XdsArgs,
    /// TLS flags of the gRPC port (--secure-serving, --cert-path, --tls-client-ca-file,
    /// --enable-cert-reload, --tls-min-version, --tls-cipher-suites).
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    /// Kubernetes controller flags (--kubernetes, --kubernetes-namespace,
    /// --kubernetes-config-map, --kubeconfig).
    #[command(flatten)]
    pub kube: crate::k8s::KubeArgs,
}

impl ServeArgs {
    fn settings(&self) -> NodeSettings {
        NodeSettings {
            ext_proc_addr: self.ext_proc_addr,
            proxy_addr: (!self.no_proxy).then_some(self.proxy_addr),
            metrics_addr: Some(self.metrics_addr),
            endpoints_file: self.endpoints.clone().unwrap_or_default(),
            config_file: self.config_file.clone(),
            refresh_metrics_interval: self.refresh_metrics_interval,
            metrics_staleness_threshold: self.metrics_staleness_threshold,
            max_body_bytes: self.max_body_bytes,
            connect_timeout: self.connect_timeout,
            response_timeout: self.response_timeout,
            max_attempts: self.max_attempts,
            emit_endpoint_scores: self.emit_endpoint_scores,
            allow_experimental_plugins: self.allow_experimental_plugins,
        }
    }
}

/// Flags of `infermesh sidecar` (llm-d's names and defaults where it has the flag).
#[derive(Debug, Args)]
pub struct SidecarArgs {
    /// Client-facing port (llm-d --port).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// Address the client-facing port is bound on.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    pub bind: IpAddr,
    /// The local engine's port (llm-d --model-server-port; --vllm-port is its deprecated alias).
    #[arg(long, alias = "vllm-port", default_value_t = 8200)]
    pub model_server_port: u16,
    /// The local engine's host.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::LOCALHOST))]
    pub model_server_host: IpAddr,
    /// How prefill and decode engines exchange KV.
    #[arg(long, value_enum, default_value = "nixlv2")]
    pub kv_connector: crate::sidecar::KvConnector,
    /// Allow only the pool's pods in x-prefiller-host-port and x-kv-cache-source-host-port.
    #[arg(long)]
    pub enable_ssrf_protection: bool,
    /// The InferencePool whose pods are allowed (`name` or `namespace/name`; env INFERENCE_POOL).
    #[arg(long)]
    pub inference_pool: Option<String>,
    /// The endpoints file listing the pool's pods (the node's --endpoints), watched for changes.
    #[arg(long, alias = "endpoints-file")]
    pub endpoints: Option<PathBuf>,
    /// Prefill retries after a failed first attempt (llm-d default 0).
    #[arg(long, default_value_t = 0)]
    pub prefill_max_retries: u32,
    /// Wait between prefill attempts.
    #[arg(long, default_value = "200ms", value_parser = humantime::parse_duration)]
    pub prefill_retry_backoff: Duration,
    /// Longest one prefill attempt may take.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub prefill_timeout: Duration,
    /// Connect timeout towards the prefiller and the local engine.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// Longest wait for the local engine's response headers.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    pub response_timeout: Duration,
    /// Largest request body read for a handoff (413 above it).
    #[arg(long, default_value_t = 16 << 20)]
    pub max_body_bytes: usize,
    /// The engines' P2P KV connector port, named in a `remote_kv_source` pull (llm-d 7777).
    #[arg(long, default_value_t = 7777)]
    pub p2p_connector_port: u16,
    /// Seconds to wait for in-flight requests on shutdown.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
    /// Serve the client-facing port over TLS (llm-d's flag; `--secure-proxy=BOOL` also
    /// read). Unlike llm-d, off unless asked for (or --cert-path is given): the node's
    /// proxy and the Envoy configs this tier serves reach pods in plaintext.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set)]
    pub secure_proxy: Option<bool>,
    /// Directory holding `tls.crt` and `tls.key` for --secure-proxy (llm-d's flag; implies
    /// it); with --secure-proxy and no directory a self-signed certificate is made at start.
    #[arg(long)]
    pub cert_path: Option<PathBuf>,
    /// Stages reached over TLS: prefiller, decoder (the local engine), encoder;
    /// comma-separated or repeated.
    #[arg(long, value_delimiter = ',', value_enum)]
    pub enable_tls: Vec<crate::sidecar::TlsStage>,
    /// Stages whose certificate is not verified (encrypted still); else the platform's
    /// roots must vouch for it.
    #[arg(long, value_delimiter = ',', value_enum)]
    pub tls_insecure_skip_verify: Vec<crate::sidecar::TlsStage>,
    /// Deprecated llm-d spelling of --enable-tls=prefiller.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set, hide = true)]
    pub prefiller_use_tls: bool,
    /// Deprecated llm-d spelling of --enable-tls=decoder.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set, hide = true)]
    pub decoder_use_tls: bool,
    /// Deprecated llm-d spelling of --tls-insecure-skip-verify=prefiller.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set, hide = true)]
    pub prefiller_tls_insecure_skip_verify: bool,
    /// Deprecated llm-d spelling of --tls-insecure-skip-verify=decoder.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value_t = false, action = clap::ArgAction::Set, hide = true)]
    pub decoder_tls_insecure_skip_verify: bool,
}

/// `infermesh sidecar` flags that do not make a working sidecar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSidecarArgs {
    /// SSRF protection without a pool to allow.
    #[error(
        "--enable-ssrf-protection needs --inference-pool (or INFERENCE_POOL) naming the pool whose pods may be named"
    )]
    NoPool,
    /// SSRF protection without a way to learn the pool's pods.
    #[error(
        "--enable-ssrf-protection needs --endpoints FILE: without Kubernetes the sidecar learns the pool's pods from the endpoints file the node reads"
    )]
    NoEndpointsFile,
    /// `POD_IP` is set but is not an IP address.
    #[error("POD_IP {0:?} is not an IP address")]
    BadPodIp(String),
    /// A certificate directory while TLS serving is turned off.
    #[error("--cert-path serves TLS, but --secure-proxy=false turns it off")]
    CertWithoutSecureProxy,
}

impl SidecarArgs {
    /// The TLS settings, with llm-d's deprecated per-stage booleans folded into the stages.
    fn tls(&self) -> crate::sidecar::SidecarTls {
        use crate::sidecar::{ServeCert, StageTls, TlsStage};
        // `use_tls` and `skip_verify`: the stage's deprecated llm-d booleans.
        let stage = |stage: TlsStage, use_tls: bool, skip_verify: bool| {
            if !(use_tls || self.enable_tls.contains(&stage)) {
                StageTls::Plain
            } else if skip_verify || self.tls_insecure_skip_verify.contains(&stage) {
                StageTls::Unverified
            } else {
                StageTls::Verified
            }
        };
        crate::sidecar::SidecarTls {
            serve: match (&self.cert_path, self.secure_proxy) {
                (Some(dir), _) => Some(ServeCert::Dir(dir.clone())),
                (None, Some(true)) => Some(ServeCert::SelfSigned),
                (None, _) => None,
            },
            prefiller: stage(
                TlsStage::Prefiller,
                self.prefiller_use_tls,
                self.prefiller_tls_insecure_skip_verify,
            ),
            decoder: stage(
                TlsStage::Decoder,
                self.decoder_use_tls,
                self.decoder_tls_insecure_skip_verify,
            ),
            encoder: stage(TlsStage::Encoder, false, false),
        }
    }

    /// The sidecar's config; `env` reads the environment (INFERENCE_POOL, POD_IP).
    pub fn config(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<crate::sidecar::SidecarConfig, InvalidSidecarArgs> {
        let ssrf = if self.enable_ssrf_protection {
            let pool = self
                .inference_pool
                .clone()
                .or_else(|| env("INFERENCE_POOL"))
                .filter(|p| !p.is_empty())
                .ok_or(InvalidSidecarArgs::NoPool)?;
            let endpoints_file = self
                .endpoints
                .clone()
                .ok_or(InvalidSidecarArgs::NoEndpointsFile)?;
            Some(crate::sidecar::PoolSource {
                pool,
                endpoints_file,
            })
        } else {
            None
        };
        if self.cert_path.is_some() && self.secure_proxy == Some(false) {
            return Err(InvalidSidecarArgs::CertWithoutSecureProxy);
        }
        let pod_ip = env("POD_IP")
            .filter(|v| !v.is_empty())
            .map(|v| v.parse().map_err(|_| InvalidSidecarArgs::BadPodIp(v)))
            .transpose()?;
        Ok(crate::sidecar::SidecarConfig {
            listen: SocketAddr::new(self.bind, self.port),
            model_server: SocketAddr::new(self.model_server_host, self.model_server_port),
            connector: self.kv_connector,
            ssrf,
            prefill_max_retries: self.prefill_max_retries,
            prefill_retry_backoff: self.prefill_retry_backoff,
            prefill_timeout: self.prefill_timeout,
            connect_timeout: self.connect_timeout,
            response_timeout: self.response_timeout,
            max_body_bytes: self.max_body_bytes,
            p2p_connector_port: self.p2p_connector_port,
            pod_ip,
            tls: self.tls(),
        })
    }
}

fn init_tracing(default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
}

/// Runs a parsed command line and returns the process exit code.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Config {
            command:
                ConfigCommand::Check {
                    file,
                    allow_experimental_plugins,
                },
        } => config_check(&file, allow_experimental_plugins),
        Command::Config {
            command: ConfigCommand::Names,
        } => {
            print!("{}", config_names());
            ExitCode::SUCCESS
        }
        Command::Serve(args) => {
            // With --tracing the subscriber (logs and traces) starts inside the runtime.
            if !args.tracing {
                init_tracing("info");
            }
            serve(*args)
        }
        Command::Sidecar(args) => {
            init_tracing("info");
            sidecar(&args)
        }
        Command::Xds { command } => crate::xds::cli::run(command),
        Command::Policy { command, server } => crate::admin::commands::run_policy(command, server),
        Command::Cluster { command, server } => {
            crate::admin::commands::run_cluster(command, server)
        }
        Command::Tokens { command, server } => crate::admin::commands::run_tokens(command, server),
    }
}

/// `infermesh config check FILE`.
fn config_check(file: &std::path::Path, allow_experimental_plugins: bool) -> ExitCode {
    // The name report comes first and covers every plugin, even when loading stops at the
    // first refused one.
    if let Ok(text) = std::fs::read_to_string(file) {
        print!("{}", plugin_names_table(&text));
    }
    match load_scheduler_config(Some(file), allow_experimental_plugins) {
        Ok(cfg) => {
            println!("{}: OK\n", file.display());
            println!("{cfg}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// One line per `plugins[]` entry: name, type, status.
fn plugin_names_table(yaml: &str) -> String {
    use std::fmt::Write as _;
    let report = infermesh_scheduler::config::plugin_name_report(yaml);
    if report.is_empty() {
        return String::new();
    }
    let w_name = report.iter().map(|r| r.name.len()).max().unwrap_or(0);
    let w_type = report.iter().map(|r| r.type_name.len()).max().unwrap_or(0);
    let mut out = String::from("plugin types (llm-d v0.10):\n");
    for r in &report {
        let _ = writeln!(
            out,
            "  {:w_name$}  {:w_type$}  {}",
            r.name, r.type_name, r.status
        );
    }
    out.push('\n');
    out
}

/// `infermesh config names`: every known llm-d type name with its status.
fn config_names() -> String {
    use std::fmt::Write as _;
    let names = infermesh_scheduler::config::all_names();
    let w = names.iter().map(|(t, _)| t.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (t, status) in names {
        let _ = writeln!(out, "{t:w$}  {status}");
    }
    out
}

fn serve(args: ServeArgs) -> ExitCode {
    // Parse and validate everything before a port is bound.
    if args.kube.kubernetes && !args.cluster.enabled() {
        eprintln!(
            "error: --kubernetes needs the policy cluster (--data-dir with --bootstrap or --join)"
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let built = if args.cluster.enabled() {
        crate::policy_store::node_config(args.settings(), args.endpoints.as_deref())
            .map(|(c, b)| (c, Some(b)))
    } else {
        NodeConfig::from_settings(args.settings()).map(|c| (c, None))
    };
    let (cfg, base, admin_tls) = match built
        .and_then(|(mut c, b)| {
            c.mesh = args.mesh.options()?;
            c.xds = args.xds.options();
            c.grpc_tls = args.tls.settings()?;
            c.proxy_tls = args.tls.proxy_settings()?;
            c.flow_per_node = args.mesh.flow_control_per_node;
            c.flow_pick_fence = args.mesh.flow_control_pick_fence;
            Ok((c, b))
        })
        .and_then(|(c, b)| {
            let admin = crate::policy_store::AdminTlsConfig {
                serve: args.tls.admin_settings()?,
                peer: args.tls.admin_peer(),
            };
            Ok((c, b, admin))
        }) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("invalid configuration: {e}");
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let telemetry = if args.tracing {
        let _in_runtime = rt.enter();
        let env: std::collections::HashMap<String, String> = std::env::vars().collect();
        match crate::telemetry::TracingOptions::from_env(&env)
            .and_then(|o| crate::telemetry::init("info", Some(&o)))
        {
            Ok(t) => t,
            Err(e) => {
                init_tracing("info");
                eprintln!("error: --tracing: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        }
    } else {
        crate::telemetry::Telemetry::default()
    };
    let code = rt.block_on(async move {
        let node = match crate::app::App::start(cfg).await {
            Ok(n) => n,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        let policy = match base {
            Some(base) => {
                match crate::policy_store::PolicyNode::start_with_tls(
                    node.policy_handles(),
                    &args.cluster,
                    base,
                    admin_tls,
                )
                .await
                {
                    Ok(p) => {
                        // One line on stdout that scripts (and tests) wait for.
                        println!("infermesh admin API listening on {}", p.admin_addr());
                        Some(p)
                    }
                    Err(e) => {
                        eprintln!("error: {e}");
                        node.shutdown(args.shutdown_grace).await;
                        return ExitCode::FAILURE;
                    }
                }
            }
            None => None,
        };
        // The controller mirrors the cluster into policy (the Raft leader writes).
        let _kube = match (&policy, args.kube.kubernetes) {
            (Some(p), true) => match crate::k8s::KubeController::start(
                &args.kube,
                p.store().clone(),
                crate::policy_store::epp_validator(),
            )
            .await
            {
                Ok(c) => Some(c),
                Err(e) => {
                    eprintln!("error: {e}");
                    if let Some(p) = policy {
                        p.shutdown(true).await;
                    }
                    node.shutdown(args.shutdown_grace).await;
                    return ExitCode::from(EXIT_CONFIG);
                }
            },
            _ => None,
        };
        // A node whose policy store died (its disk filled up or failed) exits, so that its
        // supervisor restarts it on the same data once the disk is usable again; serving
        // on with a dead Raft member would leave it routing on policy it can no longer
        // follow.
        let fatal = async {
            match &policy {
                Some(p) => Some(p.fatal().await),
                None => std::future::pending().await,
            }
        };
        let failed = tokio::select! {
            () = wait_for_signal() => None,
            e = fatal => e,
        };
        let code = match &failed {
            Some(e) => {
                tracing::error!(error = %e, "the policy store stopped; exiting for a restart");
                eprintln!("error: the policy store stopped: {e}");
                ExitCode::FAILURE
            }
            None => ExitCode::SUCCESS,
        };
        tracing::info!("shutting down");
        if let Some(p) = policy {
            // Hand Raft leadership off before leaving, so writes pause for one hand-off
            // instead of an election timeout.
            p.shutdown(failed.is_none()).await;
        }
        node.shutdown(args.shutdown_grace).await;
        code
    });
    telemetry.shutdown();
    code
}

fn sidecar(args: &SidecarArgs) -> ExitCode {
    // clap hides which spelling was used; llm-d warns on the old one, so does this.
    if std::env::args().any(|a| a == "--vllm-port" || a.starts_with("--vllm-port=")) {
        tracing::warn!("--vllm-port is deprecated; use --model-server-port");
    }
    let cfg = match args.config(|k| std::env::var(k).ok()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let sidecar = match crate::sidecar::Sidecar::start(cfg).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("error: {e}");
                let bad_config = matches!(
                    e,
                    crate::sidecar::SidecarStartError::PoolFile(_)
                        | crate::sidecar::SidecarStartError::PoolMismatch { .. }
                );
                return if bad_config {
                    ExitCode::from(EXIT_CONFIG)
                } else {
                    ExitCode::FAILURE
                };
            }
        };
        // One line on stdout that scripts (and tests) wait for.
        println!("infermesh sidecar listening on {}", sidecar.addr);
        wait_for_signal().await;
        tracing::info!("shutting down");
        sidecar.shutdown(args.shutdown_grace).await;
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> NodeSettings {
        let argv = ["infermesh", "serve", "--endpoints", "pool.yaml"];
        let cli = Cli::try_parse_from(argv.iter().chain(args)).expect("valid flags");
        match cli.command {
            Command::Serve(s) => s.settings(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn emit_endpoint_scores_is_off_unless_asked_as_in_llm_d() {
        assert!(!serve(&[]).emit_endpoint_scores);
        assert!(serve(&["--emit-endpoint-scores"]).emit_endpoint_scores);
    }

    fn sidecar(args: &[&str]) -> Result<crate::sidecar::SidecarConfig, InvalidSidecarArgs> {
        let cli =
            Cli::try_parse_from(["infermesh", "sidecar"].iter().chain(args)).expect("valid flags");
        match cli.command {
            Command::Sidecar(s) => s.config(|_| None),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sidecar_tls_flags_take_llm_ds_spellings_old_and_new() {
        use crate::sidecar::{ServeCert, SidecarTls, StageTls};
        assert_eq!(sidecar(&[]).unwrap().tls, SidecarTls::default());
        let tls = sidecar(&[
            "--secure-proxy",
            "--enable-tls=prefiller,encoder",
            "--tls-insecure-skip-verify",
            "prefiller",
        ])
        .unwrap()
        .tls;
        assert_eq!(tls.serve, Some(ServeCert::SelfSigned));
        assert_eq!(
            (tls.prefiller, tls.decoder, tls.encoder),
            (StageTls::Unverified, StageTls::Plain, StageTls::Verified)
        );
        // The deprecated booleans fold into the stages.
        let tls = sidecar(&[
            "--decoder-use-tls=true",
            "--decoder-tls-insecure-skip-verify",
            "--prefiller-use-tls",
            "--cert-path",
            "/certs",
        ])
        .unwrap()
        .tls;
        assert_eq!(tls.serve, Some(ServeCert::Dir("/certs".into())));
        assert_eq!(
            (tls.prefiller, tls.decoder, tls.encoder),
            (StageTls::Verified, StageTls::Unverified, StageTls::Plain)
        );
        assert_eq!(sidecar(&["--secure-proxy=false"]).unwrap().tls.serve, None);
        let e = sidecar(&["--secure-proxy=false", "--cert-path", "/certs"]).unwrap_err();
        assert!(e.to_string().contains("--secure-proxy=false"), "{e}");
        let e = Cli::try_parse_from(["infermesh", "sidecar", "--enable-tls", "gateway"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("gateway") && e.contains("prefiller") && e.contains("decoder"),
            "{e}"
        );
    }

    #[test]
    fn allow_experimental_plugins_is_off_unless_asked_in_either_spelling() {
        assert!(!serve(&[]).allow_experimental_plugins);
        assert!(serve(&["--allow-experimental-plugins"]).allow_experimental_plugins);
        assert!(serve(&["--allow-experimental-plugins=true"]).allow_experimental_plugins);
        assert!(!serve(&["--allow-experimental-plugins=false"]).allow_experimental_plugins);
    }
}
