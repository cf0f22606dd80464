//! The node's typed configuration, built from flags and files and validated before any
//! port is bound.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use infermesh_scheduler::{ResolvedConfig, Scheduler, load_config};

use crate::discovery::{InvalidPoolFile, PoolSpec, load_pool_file};
use crate::proxy::ProxyConfig;
use crate::scrape::ScrapeConfig;

/// Where the pool's endpoints come from.
#[derive(Debug, Clone)]
pub enum EndpointSource {
    /// A discovery file, watched for changes; `initial` is its validated content at startup.
    File {
        /// The file.
        path: PathBuf,
        /// Its content when the config was built.
        initial: PoolSpec,
    },
    /// A fixed pool given in-process (demo, tests); replaceable through the running node.
    Static(PoolSpec),
    /// llm-d's `file-discovery` endpoints file, named by the EndpointPickerConfig's
    /// `dataLayer.discovery`; watched when `watch` (`watchFile`).
    FileDiscovery {
        /// The file.
        path: PathBuf,
        /// Re-read it when it changes.
        watch: bool,
        /// The pool's name (the plugin's).
        pool: String,
        /// Its content when the config was built.
        initial: PoolSpec,
    },
}

/// Everything a node needs to start.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// ext_proc gRPC listen address (llm-d default port 9002).
    pub ext_proc_addr: SocketAddr,
    /// Standalone proxy listen address; `None` = no proxy.
    pub proxy_addr: Option<SocketAddr>,
    /// `/metrics` listen address; `None` = not served.
    pub metrics_addr: Option<SocketAddr>,
    /// Endpoint discovery.
    pub endpoints: EndpointSource,
    /// The resolved EndpointPickerConfig.
    pub scheduler: ResolvedConfig,
    /// Metrics fetcher timing.
    pub scrape: ScrapeConfig,
    /// Metrics older than this take an endpoint out of the candidate set.
    pub staleness: Duration,
    /// Largest request body accepted.
    pub max_body_bytes: usize,
    /// Put per-endpoint scheduler scores in the ext_proc response's `envoy.lb` metadata.
    pub emit_endpoint_scores: bool,
    /// Model-server connect timeout.
    pub connect_timeout: Duration,
    /// Proxy forwarding limits.
    pub proxy: ProxyConfig,
    /// Router mesh membership and sharing; `None` = single-node mode.
    pub mesh: Option<crate::mesh::MeshOptions>,
    /// How the node serves xDS to Envoys.
    pub xds: crate::xds::XdsOptions,
    /// TLS on the gRPC port (ext_proc, ADS, health); `None` = plaintext.
    pub grpc_tls: Option<crate::tls::ServerTlsSettings>,
    /// TLS on the proxy's client side (--proxy-addr); `None` = plaintext.
    pub proxy_tls: Option<crate::tls::ServerTlsSettings>,
    /// With a sharing mesh and the flowControl gate: one queue per node (dividing the
    /// budget) instead of the tier's one queue at its owner (`--flow-control-per-node`).
    pub flow_per_node: bool,
    /// Longest a flow-control dispatch waits for the pick of the one before it
    /// (`--flow-control-pick-fence`; zero: no wait).
    pub flow_pick_fence: std::time::Duration,
    /// Follow the owned pods' KV events into the mesh's prefix index (needs a sharing
    /// mesh); `None` = off.
    pub kv_events: Option<crate::mesh::kv_events::KvEventsOptions>,
}

/// Raw settings as flags give them (every field has llm-d's default where one exists).
#[derive(Debug, Clone)]
pub struct NodeSettings {
    /// See [`NodeConfig::ext_proc_addr`].
    pub ext_proc_addr: SocketAddr,
    /// See [`NodeConfig::proxy_addr`].
    pub proxy_addr: Option<SocketAddr>,
    /// See [`NodeConfig::metrics_addr`].
    pub metrics_addr: Option<SocketAddr>,
    /// Discovery file.
    pub endpoints_file: PathBuf,
    /// EndpointPickerConfig file; `None` = the built-in default.
    pub config_file: Option<PathBuf>,
    /// Scrape interval (llm-d `--refresh-metrics-interval`, 50 ms).
    pub refresh_metrics_interval: Duration,
    /// llm-d `--metrics-staleness-threshold`, 2 s.
    pub metrics_staleness_threshold: Duration,
    /// See [`NodeConfig::max_body_bytes`].
    pub max_body_bytes: usize,
    /// See [`NodeConfig::connect_timeout`].
    pub connect_timeout: Duration,
    /// See [`ProxyConfig::response_timeout`].
    pub response_timeout: Duration,
    /// See [`ProxyConfig::max_attempts`].
    pub max_attempts: usize,
    /// llm-d `--emit-endpoint-scores`, off.
    pub emit_endpoint_scores: bool,
    /// llm-d `--allow-experimental-plugins`, off: Alpha plugins are refused without it.
    pub allow_experimental_plugins: bool,
}

/// The configuration is invalid; nothing was started.
#[derive(Debug, thiserror::Error)]
pub enum InvalidNodeConfig {
    /// The EndpointPickerConfig file could not be read.
    #[error("cannot read --config-file {path}: {source}")]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// The EndpointPickerConfig is invalid.
    #[error("invalid EndpointPickerConfig {path}: {source}")]
    SchedulerConfig {
        /// The file (or "built-in default").
        path: String,
        /// The loader's error, naming plugin and field.
        source: Box<infermesh_scheduler::ConfigError>,
    },
    /// The discovery file is invalid.
    #[error("invalid --endpoints file: {0}")]
    Endpoints(#[from] InvalidPoolFile),
    /// The `file-discovery` endpoints file is invalid.
    #[error("file-discovery: {0}")]
    FileDiscovery(#[from] crate::file_discovery::InvalidEndpointsFile),
    /// The mesh flags are unusable.
    #[error("mesh: {0}")]
    Mesh(#[from] crate::mesh::InvalidMeshFlags),
    /// The TLS flags or files are unusable.
    #[error("tls: {0}")]
    Tls(#[from] crate::tls::TlsConfigError),
    /// A flag has an unusable value.
    #[error("--{flag}: {reason}")]
    Flag {
        /// Flag name.
        flag: &'static str,
        /// What is wrong.
        reason: String,
    },
}

fn flag(flag: &'static str, reason: impl Into<String>) -> InvalidNodeConfig {
    InvalidNodeConfig::Flag {
        flag,
        reason: reason.into(),
    }
}

/// Loads an EndpointPickerConfig file (or the built-in default) and checks it builds a scheduler.
pub fn load_scheduler_config(
    path: Option<&std::path::Path>,
    allow_experimental_plugins: bool,
) -> Result<ResolvedConfig, InvalidNodeConfig> {
    let (cfg, name) = match path {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).map_err(|source| InvalidNodeConfig::ReadConfig {
                    path: p.to_owned(),
                    source,
                })?;
            let cfg = load_config(&text).map_err(|source| InvalidNodeConfig::SchedulerConfig {
                path: p.display().to_string(),
                source: Box::new(source),
            })?;
            (cfg, p.display().to_string())
        }
        None => (
            ResolvedConfig::builtin_default(),
            "built-in default".to_owned(),
        ),
    };
    Scheduler::new(&cfg).map_err(|source| InvalidNodeConfig::SchedulerConfig {
        path: name.clone(),
        source: Box::new(source),
    })?;
    cfg.check_stability(allow_experimental_plugins)
        .map_err(|source| InvalidNodeConfig::SchedulerConfig {
            path: name.clone(),
            source: Box::new(source),
        })?;
    // llm-d loads a config with deprecated plugins or fields and logs each; so does this.
    for w in &cfg.warnings {
        tracing::warn!(config = %name, "{w}");
    }
    Ok(cfg)
}

impl NodeConfig {
    /// Validates settings and reads both files.
    pub fn from_settings(s: NodeSettings) -> Result<NodeConfig, InvalidNodeConfig> {
        let scheduler =
            load_scheduler_config(s.config_file.as_deref(), s.allow_experimental_plugins)?;
        let endpoints = match scheduler.file_discovery() {
            Some((name, p)) => {
                if !s.endpoints_file.as_os_str().is_empty() {
                    return Err(flag(
                        "endpoints",
                        format!(
                            "the EndpointPickerConfig's dataLayer.discovery names file-discovery `{name}` ({}): give one endpoint source",
                            p.path
                        ),
                    ));
                }
                let path = PathBuf::from(&p.path);
                let initial = crate::file_discovery::load_endpoints(&path, name)?;
                EndpointSource::FileDiscovery {
                    path,
                    watch: p.watch_file,
                    pool: name.to_owned(),
                    initial,
                }
            }
            None if s.endpoints_file.as_os_str().is_empty() => {
                return Err(flag(
                    "endpoints",
                    "is required (or dataLayer.discovery naming a file-discovery plugin in --config-file, or a policy cluster)",
                ));
            }
            None => EndpointSource::File {
                path: s.endpoints_file.clone(),
                initial: load_pool_file(&s.endpoints_file)?,
            },
        };
        NodeConfig::new(
            s.ext_proc_addr,
            s.proxy_addr,
            s.metrics_addr,
            endpoints,
            scheduler,
            &s,
        )
    }

    /// A config with the given endpoints and scheduler config, the rest from `s`.
    pub fn new(
        ext_proc_addr: SocketAddr,
        proxy_addr: Option<SocketAddr>,
        metrics_addr: Option<SocketAddr>,
        endpoints: EndpointSource,
        scheduler: ResolvedConfig,
        s: &NodeSettings,
    ) -> Result<NodeConfig, InvalidNodeConfig> {
        if s.refresh_metrics_interval.is_zero() {
            return Err(flag(
                "refresh-metrics-interval",
                "must be greater than zero",
            ));
        }
        if s.metrics_staleness_threshold < s.refresh_metrics_interval {
            return Err(flag(
                "metrics-staleness-threshold",
                format!(
                    "{:?} is shorter than --refresh-metrics-interval {:?}: every endpoint would always be stale",
                    s.metrics_staleness_threshold, s.refresh_metrics_interval
                ),
            ));
        }
        if s.max_body_bytes == 0 {
            return Err(flag("max-body-bytes", "must be greater than zero"));
        }
        if s.connect_timeout.is_zero() || s.response_timeout.is_zero() {
            return Err(flag(
                "connect-timeout/response-timeout",
                "must be greater than zero",
            ));
        }
        if s.max_attempts == 0 {
            return Err(flag("max-attempts", "must be at least 1"));
        }
        Ok(NodeConfig {
            ext_proc_addr,
            proxy_addr,
            metrics_addr,
            endpoints,
            scheduler,
            scrape: ScrapeConfig {
                interval: s.refresh_metrics_interval,
                // A scrape slower than the staleness threshold is as good as none.
                timeout: s.metrics_staleness_threshold.min(Duration::from_secs(1)),
                models_refresh: Duration::from_secs(10),
            },
            staleness: s.metrics_staleness_threshold,
            max_body_bytes: s.max_body_bytes,
            emit_endpoint_scores: s.emit_endpoint_scores,
            connect_timeout: s.connect_timeout,
            proxy: ProxyConfig {
                response_timeout: s.response_timeout,
                max_attempts: s.max_attempts,
            },
            mesh: None,
            xds: Default::default(),
            grpc_tls: None,
            proxy_tls: None,
            flow_per_node: false,
            flow_pick_fence: crate::request::picks::PICK_FENCE,
            kv_events: None,
        })
    }

    /// Settings with every default, for in-process nodes (demo, tests, benchmarks).
    pub fn default_settings() -> NodeSettings {
        NodeSettings {
            ext_proc_addr: "127.0.0.1:0".parse().expect("valid"),
            proxy_addr: Some("127.0.0.1:0".parse().expect("valid")),
            metrics_addr: Some("127.0.0.1:0".parse().expect("valid")),
            endpoints_file: PathBuf::new(),
            config_file: None,
            refresh_metrics_interval: Duration::from_millis(50),
            metrics_staleness_threshold: Duration::from_secs(2),
            max_body_bytes: 16 << 20,
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(300),
            max_attempts: 3,
            emit_endpoint_scores: false,
            allow_experimental_plugins: false,
        }
    }

    /// An in-process node on loopback ephemeral ports over a fixed pool.
    pub fn local(
        pool: PoolSpec,
        scheduler: ResolvedConfig,
    ) -> Result<NodeConfig, InvalidNodeConfig> {
        let s = NodeConfig::default_settings();
        NodeConfig::new(
            s.ext_proc_addr,
            s.proxy_addr,
            s.metrics_addr,
            EndpointSource::Static(pool),
            scheduler,
            &s,
        )
    }
}
