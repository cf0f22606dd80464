//! The node's xDS side: every node serves the same ADS (SotW and Delta, from
//! `infermesh-xds`) on its ext_proc gRPC port — or on `--xds-addr` — so an Envoy needs one
//! address list for both. The served input is rebuilt on every change of its sources:
//! - pools: InferencePools from Raft policy when it holds any ([`policy`]; the Envoy
//!   listener from the `infermesh.io/envoy-listener` annotation); otherwise the node's own
//!   pool (endpoints file or static config) with the `--xds-listener` /
//!   `--xds-failure-mode` flags;
//! - ext_proc endpoints: this node plus every live mesh member's advertised ext_proc
//!   address ([`peers`]); membership changes reach Envoy's EDS within the xds crate's
//!   debounce (50 ms) after gossip reports them.
//!
//! Per-Envoy sync status is served as JSON by [`status::router`], and per resource over
//! CSDS on the same gRPC port as ADS; `infermesh xds status` prints either ([`csds`] for
//! `--xds`).

pub mod cli;
pub mod csds;
pub mod input;
pub mod peers;
pub mod policy;
pub mod status;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use infermesh_xds::{FailureMode, InferencePoolSpec, XdsConfig, XdsInput, XdsServer};
use tokio::sync::watch;

use crate::pool::SharedPool;
use input::{FilePoolSettings, build_input, file_pool};
use peers::{PeerBook, PeerInfo, XDS_PEER_CHANNEL};

/// How often the feed re-reads the pool view (it has no change notification) and retries
/// peers that did not answer.
const RECHECK: Duration = Duration::from_millis(200);

/// How a node serves xDS.
#[derive(Debug, Clone)]
pub struct XdsOptions {
    /// Own ADS listen address; `None` = on the ext_proc gRPC server.
    pub xds_addr: Option<SocketAddr>,
    /// Envoy listener and failure mode of the node's own pool when policy has no pools.
    pub file_pool: FilePoolSettings,
    /// ext_proc address given to Envoys and peers; `None` = derived from the bound one.
    pub advertise_ext_proc: Option<SocketAddr>,
    /// Names a proxyless gRPC client may resolve as `xds:///NAME`.
    pub grpc_services: Vec<String>,
    /// Server and translation tunables.
    pub server: XdsConfig,
}

impl Default for XdsOptions {
    fn default() -> Self {
        XdsOptions {
            xds_addr: None,
            file_pool: FilePoolSettings {
                listener: SocketAddr::from(([0, 0, 0, 0], DEFAULT_LISTENER_PORT)),
                failure_mode: FailureMode::FailClose,
            },
            advertise_ext_proc: None,
            grpc_services: vec![DEFAULT_GRPC_SERVICE.to_owned()],
            server: XdsConfig::default(),
        }
    }
}

/// Port of the Envoy listener for the node's own pool when neither flags nor policy say.
pub const DEFAULT_LISTENER_PORT: u16 = 10000;

/// The service name proxyless gRPC clients resolve to reach the ext_proc tier.
pub const DEFAULT_GRPC_SERVICE: &str = "infermesh-epp";

/// `--xds-failure-mode` values (GIE `endpointPickerRef.failureMode` spellings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailureModeArg {
    /// Requests fail when no picker answers.
    #[value(name = "FailClose")]
    FailClose,
    /// Requests go to the pool's endpoints (round robin) when no picker answers.
    #[value(name = "FailOpen")]
    FailOpen,
}

/// xDS flags of `infermesh serve`.
#[derive(Debug, Clone, Args)]
pub struct XdsArgs {
    /// Serve ADS on its own address instead of the ext_proc gRPC port.
    #[arg(long)]
    pub xds_addr: Option<SocketAddr>,
    /// Address Envoy's listener for this node's pool binds (when policy names no pools).
    #[arg(long, default_value = "0.0.0.0:10000")]
    pub xds_listener: SocketAddr,
    /// What Envoy does when no infermesh node answers (when policy names no pools).
    #[arg(long, value_enum, default_value = "FailClose")]
    pub xds_failure_mode: FailureModeArg,
    /// ext_proc address Envoys and peers use to reach this node (default: the bound
    /// address, or its port on the mesh IP when bound to 0.0.0.0).
    #[arg(long)]
    pub advertise_ext_proc_addr: Option<SocketAddr>,
    /// For a tier serving mTLS: the CA file, on each Envoy's host, that the nodes'
    /// certificate chains to; the ext_proc cluster served over CDS then speaks mTLS.
    #[arg(long, requires_all = ["xds_envoy_cert_file", "xds_envoy_key_file", "xds_envoy_sni"])]
    pub xds_envoy_ca_file: Option<String>,
    /// The Envoys' client certificate file (on their hosts), for mTLS to ext_proc.
    #[arg(long, requires = "xds_envoy_ca_file")]
    pub xds_envoy_cert_file: Option<String>,
    /// The Envoys' client key file (on their hosts), for mTLS to ext_proc.
    #[arg(long, requires = "xds_envoy_ca_file")]
    pub xds_envoy_key_file: Option<String>,
    /// The server name Envoys check the nodes' certificate against.
    #[arg(long, requires = "xds_envoy_ca_file")]
    pub xds_envoy_sni: Option<String>,
}

/// The TLS files of an Envoy talking to the tier, when all four are given.
pub fn envoy_tls_files(
    ca: Option<&String>,
    cert: Option<&String>,
    key: Option<&String>,
    sni: Option<&String>,
) -> Option<infermesh_xds::UpstreamTlsFiles> {
    Some(infermesh_xds::UpstreamTlsFiles {
        ca_file: ca?.clone(),
        cert_file: cert?.clone(),
        key_file: key?.clone(),
        sni: sni?.clone(),
    })
}

impl XdsArgs {
    /// The options these flags describe.
    pub fn options(&self) -> XdsOptions {
        XdsOptions {
            xds_addr: self.xds_addr,
            file_pool: FilePoolSettings {
                listener: self.xds_listener,
                failure_mode: match self.xds_failure_mode {
                    FailureModeArg::FailClose => FailureMode::FailClose,
                    FailureModeArg::FailOpen => FailureMode::FailOpen,
                },
            },
            advertise_ext_proc: self.advertise_ext_proc_addr,
            server: infermesh_xds::XdsConfig {
                ext_proc_tls: envoy_tls_files(
                    self.xds_envoy_ca_file.as_ref(),
                    self.xds_envoy_cert_file.as_ref(),
                    self.xds_envoy_key_file.as_ref(),
                    self.xds_envoy_sni.as_ref(),
                ),
                ..infermesh_xds::XdsConfig::default()
            },
            ..XdsOptions::default()
        }
    }
}

/// The node's xDS server and the inputs it is fed from. Cheap to clone.
#[derive(Debug, Clone)]
pub struct XdsFeed {
    server: XdsServer,
    policy_pools: Arc<watch::Sender<Option<Vec<InferencePoolSpec>>>>,
    file_settings: Arc<watch::Sender<FilePoolSettings>>,
    advertised: SocketAddr,
    last_input: Arc<watch::Sender<Option<XdsInput>>>,
}

impl XdsFeed {
    /// Creates the server (on the current runtime); nothing is served until the feed runs.
    pub fn new(
        opts: &XdsOptions,
        advertised: SocketAddr,
    ) -> Result<XdsFeed, infermesh_xds::InvalidXdsConfig> {
        Ok(XdsFeed {
            server: XdsServer::new(opts.server.clone())?,
            policy_pools: Arc::new(watch::channel(None).0),
            file_settings: Arc::new(watch::channel(opts.file_pool).0),
            advertised,
            last_input: Arc::new(watch::channel(None).0),
        })
    }

    /// The xDS server (ADS service, sync status).
    pub fn server(&self) -> &XdsServer {
        &self.server
    }

    /// This node's advertised ext_proc (and ADS) address.
    pub fn advertised(&self) -> SocketAddr {
        self.advertised
    }

    /// Replaces the pools policy describes (`None` = policy holds no pools: serve the
    /// node's own pool). The Raft policy feed calls this after each applied change.
    pub fn set_policy_pools(&self, pools: Option<Vec<InferencePoolSpec>>) {
        self.policy_pools.send_replace(pools);
    }

    /// Envoy listener and failure mode of the node's own pool.
    pub fn file_pool_settings(&self) -> FilePoolSettings {
        *self.file_settings.borrow()
    }

    /// Changes the Envoy listener and failure mode of the node's own pool.
    pub fn set_file_pool_settings(&self, settings: FilePoolSettings) {
        self.file_settings.send_replace(settings);
    }

    /// The input most recently accepted by the server.
    pub fn last_input(&self) -> Option<XdsInput> {
        self.last_input.borrow().clone()
    }

    /// Publishes an input directly, bypassing the sources (tests provoking a NACK with an
    /// input Envoy rejects). The next source change overwrites it.
    pub fn publish(
        &self,
        input: &XdsInput,
    ) -> Result<infermesh_xds::PublishReceipt, infermesh_xds::PublishError> {
        let r = self.server.publish(input)?;
        self.last_input.send_replace(Some(input.clone()));
        Ok(r)
    }

    /// Runs the feed until `shutdown` turns true: rebuilds the input on every source
    /// change and publishes it when it differs from the last one.
    pub async fn run(
        self,
        pool: SharedPool,
        mesh: Option<Arc<infermesh_gossip::Mesh>>,
        grpc_services: Vec<String>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        if let Some(m) = &mesh {
            match m.register_service(XDS_PEER_CHANNEL, 64) {
                Ok(calls) => {
                    tokio::spawn(peers::answer_peers(
                        calls,
                        PeerInfo {
                            ext_proc: self.advertised,
                        },
                    ));
                }
                Err(e) => tracing::error!(error = %e, "xds: cannot answer peers"),
            }
        }
        let mut members = mesh.as_ref().map(|m| m.members());
        let mut policy_rx = self.policy_pools.subscribe();
        let mut settings_rx = self.file_settings.subscribe();
        let mut book = PeerBook::default();
        let mut tick = tokio::time::interval(RECHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_pool: Arc<crate::pool::PoolView>;
        let mut last_warning: Option<String> = None;
        let mut last_error: Option<String> = None;
        let mut current: Option<XdsInput> = None;
        loop {
            if let (Some(m), Some(rx)) = (&mesh, &members) {
                let set = rx.borrow().clone();
                let missing = book.prune(&set);
                if !missing.is_empty() {
                    peers::resolve(m, &mut book, missing).await;
                }
            }
            let view = pool.load_full();
            last_pool = Arc::clone(&view);
            let (own, warning) = file_pool(&view, *settings_rx.borrow_and_update());
            if warning.is_some() && warning != last_warning {
                tracing::warn!("xds: {}", warning.as_deref().unwrap_or_default());
            }
            last_warning = warning;
            let policy = policy_rx.borrow_and_update().clone();
            let input = build_input(
                own.as_ref(),
                policy.as_deref(),
                std::iter::once(self.advertised).chain(book.addrs()),
                &grpc_services,
            );
            let servable = !input.pools.is_empty() || current.is_some();
            if servable && current.as_ref() != Some(&input) {
                match self.server.publish(&input) {
                    Ok(receipt) => {
                        tracing::info!(
                            pools = ?input
                                .pools
                                .iter()
                                .map(|p| (&p.name, p.listener, p.failure_mode))
                                .collect::<Vec<_>>(),
                            ext_proc = input.ext_proc_endpoints.len(),
                            versions = ?receipt.versions,
                            "xds: publishing"
                        );
                        self.last_input.send_replace(Some(input.clone()));
                        current = Some(input);
                        last_error = None;
                    }
                    Err(e) => {
                        let msg = e.to_string();
                        if last_error.as_ref() != Some(&msg) {
                            tracing::error!(error = %msg, "xds: input refused; the previous one stays served");
                        }
                        last_error = Some(msg);
                    }
                }
            }
            // Wait for the next change of any source.
            loop {
                tokio::select! {
                    _ = shutdown.wait_for(|s| *s) => return,
                    r = async {
                        match members.as_mut() {
                            Some(rx) => rx.changed().await,
                            None => std::future::pending().await,
                        }
                    } => {
                        if r.is_err() {
                            members = None;
                        }
                        break;
                    }
                    r = policy_rx.changed() => { if r.is_ok() { break; } }
                    r = settings_rx.changed() => { if r.is_ok() { break; } }
                    _ = tick.tick() => {
                        let peers_missing = mesh.is_some()
                            && members.as_ref().is_some_and(|rx| {
                                rx.borrow().peers().count() > book.addrs().count()
                            });
                        if peers_missing || !Arc::ptr_eq(&pool.load(), &last_pool) {
                            break;
                        }
                    }
                }
            }
        }
    }
}
