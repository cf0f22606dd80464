//! The running node: binds its listeners, starts one task per state owner (pool,
//! scrapers, discovery watcher) and the servers (ext_proc + health, proxy, /metrics),
//! and stops them all on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use axum::routing::get;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;

use crate::config::{EndpointSource, NodeConfig};
use crate::discovery::{PoolSpec, watch_pool_file};
use crate::extproc::ExtProcService;
use crate::mesh::prefix::MeshPrefixOwners;
use crate::metrics::NodeMetrics;
use crate::policy::{Policy, SharedPolicy};
use crate::pool::{PoolView, SharedPool};
use crate::pool_task::{PoolInput, PoolTask};
use crate::request::{DispatchConfig, Dispatcher};
use crate::upstream::http_client;

/// The node failed to start; whatever it had started was stopped.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        /// Which listener.
        what: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The IO error.
        source: std::io::Error,
    },
    /// The HTTPS client for pods could not be built.
    #[error("metrics-data-source https: {0}")]
    PodTls(#[from] crate::upstream::PodTlsError),
    /// The token producer's local tokenizer could not be loaded.
    #[error("token-producer: {0}")]
    Tokenizer(#[from] crate::tokens::TokenizeError),
    /// The scheduler rejected the config.
    #[error("scheduler config: {0}")]
    Scheduler(#[from] Box<infermesh_scheduler::ConfigError>),
    /// The endpoints file could not be watched.
    #[error("cannot watch the endpoints file: {0}")]
    Watch(#[from] notify::Error),
    /// The router mesh could not start.
    #[error("mesh: {0}")]
    Mesh(#[from] infermesh_gossip::MeshError),
    /// A mesh service channel is taken twice (a wiring bug).
    #[error("mesh: {0}")]
    Channel(#[from] infermesh_gossip::ChannelTaken),
    /// The xDS server settings are invalid.
    #[error("xds: {0}")]
    Xds(#[from] infermesh_xds::InvalidXdsConfig),
    /// A listener's TLS files are unusable.
    #[error("tls: {0}")]
    Tls(#[from] crate::tls::TlsConfigError),
    /// The scrapers' thread could not start.
    #[error("cannot start the metrics fetcher's thread: {0}")]
    ScrapeThread(std::io::Error),
    /// The config's metrics data source cannot be honoured.
    #[error("scheduler config: {0}")]
    MetricsSource(#[from] crate::scrape::InvalidMetricsSource),
    /// The `flowControl` section cannot build a flow controller.
    #[error("flow control: {0}")]
    FlowControl(#[from] infermesh_scheduler::flow::InvalidFlowConfig),
}

/// A started node: its bound addresses and the handles later subsystems (gossip, Raft
/// policy, xDS) plug into. Built from a [`NodeConfig`] by [`App::start`].
#[derive(Debug)]
pub struct App {
    /// Bound ext_proc (gRPC) address.
    pub ext_proc_addr: SocketAddr,
    /// Bound proxy address.
    pub proxy_addr: Option<SocketAddr>,
    /// Bound `/metrics` address.
    pub metrics_addr: Option<SocketAddr>,
    /// Bound ADS address (the ext_proc address unless `--xds-addr` is given).
    pub xds_addr: SocketAddr,
    pool: SharedPool,
    policy: SharedPolicy,
    pool_tx: mpsc::Sender<PoolInput>,
    synced: watch::Receiver<bool>,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
    _watcher: Option<notify::RecommendedWatcher>,
    metrics: Arc<NodeMetrics>,
    mesh: Option<Arc<infermesh_gossip::Mesh>>,
    prefix_owners: Option<Arc<MeshPrefixOwners>>,
    kv_stats: Option<Arc<crate::mesh::kv_events::KvEventStats>>,
    raft_metrics: Arc<arc_swap::ArcSwapOption<infermesh_raft_store::PolicyStore>>,
    xds: crate::xds::XdsFeed,
    flow: crate::request::FlowGate,
}

/// The prefix state one node holds, from each structure's own counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefixMemory {
    /// Block entries in the owner-side index (anchors this node owns).
    pub owner_blocks: usize,
    /// Heap bytes of the owner-side index.
    pub owner_bytes: usize,
    /// Picks in the recent-picks cache (anchors owned elsewhere).
    pub recent_picks: usize,
    /// Heap bytes of the recent-picks cache.
    pub recent_bytes: usize,
    /// (block, endpoint) entries in the scheduler's own index (empty when shared).
    pub local_entries: usize,
    /// Heap bytes of the scheduler's own index.
    pub local_bytes: usize,
}

impl PrefixMemory {
    /// All prefix-state bytes on the node.
    pub fn total_bytes(&self) -> usize {
        self.owner_bytes + self.recent_bytes + self.local_bytes
    }
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { what, addr, source })
}

fn local(l: &TcpListener, what: &'static str, addr: SocketAddr) -> Result<SocketAddr, StartError> {
    l.local_addr()
        .map_err(|source| StartError::Bind { what, addr, source })
}

/// The node's bound listeners (bound before any task starts, so a busy port fails the
/// start cleanly).
struct Listeners {
    grpc: TcpListener,
    ext_proc_addr: SocketAddr,
    proxy: Option<TcpListener>,
    proxy_addr: Option<SocketAddr>,
    metrics: Option<TcpListener>,
    metrics_addr: Option<SocketAddr>,
    xds: Option<TcpListener>,
    xds_addr: SocketAddr,
}

impl Listeners {
    async fn bind(cfg: &NodeConfig) -> Result<Listeners, StartError> {
        let grpc = bind("ext_proc", cfg.ext_proc_addr).await?;
        let ext_proc_addr = local(&grpc, "ext_proc", cfg.ext_proc_addr)?;
        let (proxy, proxy_addr) = bind_optional("proxy", cfg.proxy_addr).await?;
        let (metrics, metrics_addr) = bind_optional("metrics", cfg.metrics_addr).await?;
        let (xds, xds_addr) = bind_optional("xds", cfg.xds.xds_addr).await?;
        Ok(Listeners {
            grpc,
            ext_proc_addr,
            proxy,
            proxy_addr,
            metrics,
            metrics_addr,
            xds,
            // ADS shares the ext_proc port unless it has its own.
            xds_addr: xds_addr.unwrap_or(ext_proc_addr),
        })
    }
}

async fn bind_optional(
    what: &'static str,
    addr: Option<SocketAddr>,
) -> Result<(Option<TcpListener>, Option<SocketAddr>), StartError> {
    let Some(a) = addr else {
        return Ok((None, None));
    };
    let l = bind(what, a).await?;
    let bound = local(&l, what, a)?;
    Ok((Some(l), Some(bound)))
}

/// gRPC health: liveness at once; readiness (and the ext_proc service) once the pool is
/// synced, until shutdown.
async fn spawn_health(
    tasks: &mut JoinSet<()>,
    mut synced: watch::Receiver<bool>,
    mut sd: watch::Receiver<bool>,
) -> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    let (reporter, health_service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("liveness", ServingStatus::Serving)
        .await;
    tasks.spawn(async move {
        let synced = tokio::select! {
            r = synced.wait_for(|s| *s) => r.is_ok(),
            _ = sd.wait_for(|s| *s) => false,
        };
        if synced {
            for service in [
                "readiness",
                "envoy.service.ext_proc.v3.ExternalProcessor",
                infermesh_xds::bootstrap::ADS_HEALTH_SERVICE,
                "",
            ] {
                reporter
                    .set_service_status(service, ServingStatus::Serving)
                    .await;
            }
            let _ = sd.wait_for(|s| *s).await;
        }
    });
    health_service
}

/// `/metrics` (node, scheduler and mesh counters) and the xDS status pages.
/// What the metrics port serves from.
struct MetricsPort<'a> {
    metrics: Arc<NodeMetrics>,
    pool: SharedPool,
    policy: SharedPolicy,
    mesh: Option<&'a Arc<infermesh_gossip::Mesh>>,
    kv_stats: Option<Arc<crate::mesh::kv_events::KvEventStats>>,
    raft: Arc<arc_swap::ArcSwapOption<infermesh_raft_store::PolicyStore>>,
    xds: crate::xds::XdsFeed,
}

fn metrics_router(port: MetricsPort<'_>) -> axum::Router {
    let MetricsPort {
        metrics,
        pool,
        policy,
        mesh,
        kv_stats,
        raft,
        xds,
    } = port;
    let xds_status = xds.clone();
    let mesh_stats = mesh.map(Arc::downgrade);
    let page = crate::status_page::router(crate::status_page::Sources {
        node: mesh.map_or_else(
            || "infermesh".to_owned(),
            |m| m.node_id().as_str().to_owned(),
        ),
        metrics: metrics.clone(),
        pool: pool.clone(),
        mesh: mesh_stats.clone(),
        raft: raft.clone(),
        xds: xds.clone(),
    });
    crate::xds::status::router(xds).merge(page).route(
        "/metrics",
        get(move || {
            let mesh = mesh_stats.as_ref().and_then(std::sync::Weak::upgrade);
            let entries = mesh.as_ref().map_or(0, |m| m.prefix_index_blocks())
                + policy
                    .load()
                    .scheduler
                    .prefix_index()
                    .map_or(0, |ix| ix.entries());
            let mut body = metrics.render_with(&pool.load(), Instant::now(), entries);
            if let Some(mesh) = mesh {
                let members = mesh.members().borrow().members.len();
                crate::mesh::insert_stats(&mut body, &mesh.stats(), members);
            }
            let mut extra = String::new();
            if let Some(kv) = &kv_stats {
                kv.render(&mut extra);
            }
            if let Some(store) = raft.load().as_deref() {
                crate::metrics::cluster::render_raft(&store.status(), &mut extra);
            }
            crate::metrics::cluster::render_xds(&xds_status.server().sync_status(), &mut extra);
            crate::mesh::insert_before_eof(&mut body, &extra);
            async move {
                (
                    [(
                        http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    body,
                )
            }
        }),
    )
}

async fn start(cfg: NodeConfig) -> Result<App, StartError> {
    let metrics = Arc::new(NodeMetrics::new());
    let policy: SharedPolicy = Arc::new(ArcSwap::from_pointee(Policy::new(&cfg.scheduler)?));
    let pool: SharedPool = Arc::new(ArcSwap::from_pointee(PoolView::default()));
    let client = http_client(cfg.connect_timeout);
    let mut dispatcher = Dispatcher::new(
        pool.clone(),
        policy.clone(),
        metrics.clone(),
        DispatchConfig {
            max_body_bytes: cfg.max_body_bytes,
            staleness: cfg.staleness,
            emit_endpoint_scores: cfg.emit_endpoint_scores,
        },
    );

    // A local tokenizer.json is loaded before serving, so a bad path fails the start.
    let tokenizers = Arc::new(crate::tokens::Tokenizers::new(client.clone()));
    if let Some(tp) = policy.load().scheduler.token_producer() {
        tokenizers.prepare(tp)?;
    }
    dispatcher = dispatcher.with_tokenizers(tokenizers);
    // TLS files are read before a port is bound, so a bad certificate fails the start.
    let grpc_tls = cfg
        .grpc_tls
        .clone()
        .map(crate::tls::TlsReloader::new)
        .transpose()?;
    let proxy_tls = cfg
        .proxy_tls
        .clone()
        .map(crate::tls::TlsReloader::new)
        .transpose()?;
    // Bind everything first so a busy port fails the start before any task runs.
    let Listeners {
        grpc: grpc_listener,
        ext_proc_addr,
        proxy: proxy_listener,
        proxy_addr,
        metrics: metrics_listener,
        metrics_addr,
        xds: xds_listener,
        xds_addr,
    } = Listeners::bind(&cfg).await?;

    // Precise prefix routing keeps its index in the mesh's prefix store, fed by the pods'
    // owners: a node started without a mesh runs a mesh of one on loopback for it.
    let solo_mesh = (cfg.mesh.is_none() && cfg.scheduler.precise_prefix().is_some()).then(|| {
        crate::mesh::MeshOptions {
            config: infermesh_gossip::MeshConfig::loopback(
                "infermesh-solo",
                infermesh_gossip::ClusterKey::new(rand::random::<[u8; 32]>().to_vec())
                    .expect("32 random bytes are a valid cluster key"),
            ),
            sharing: true,
        }
    });
    let mesh_opts = cfg.mesh.as_ref().or(solo_mesh.as_ref());
    let mesh = match mesh_opts {
        Some(m) => Some(Arc::new(
            infermesh_gossip::Mesh::start(m.config.clone()).await?,
        )),
        None => None,
    };

    let advertised = crate::xds::input::advertised_ext_proc(
        cfg.xds.advertise_ext_proc,
        ext_proc_addr,
        mesh.as_ref().map(|m| m.gossip_addr().ip()),
    );
    let xds = crate::xds::XdsFeed::new(&cfg.xds, advertised)?;

    let (shutdown, shutdown_rx) = watch::channel(false);
    let (synced_tx, synced) = watch::channel(false);
    let (pool_tx, pool_rx) = mpsc::channel(1024);
    let mut tasks = JoinSet::new();

    // Scrapes get their own thread and connection pool (see scrape::runtime).
    let scrape_rt =
        crate::scrape::runtime::ScrapeRuntime::start().map_err(StartError::ScrapeThread)?;
    let source = crate::scrape::MetricsSource::from_config(&cfg.scheduler)?;
    let scrape_client = crate::scrape::ScrapeClient::for_source(
        &source,
        http_client(cfg.connect_timeout),
        cfg.connect_timeout,
    )?;
    let pool_task = PoolTask::new(
        pool.clone(),
        policy.clone(),
        (scrape_rt, scrape_client),
        cfg.scrape,
        metrics.clone(),
        pool_tx.clone(),
        synced_tx,
    )
    .with_metrics_source(source);
    // Sharing mesh: scrape owned pods only, schedule on the fleet's load board.
    let sharing = mesh
        .clone()
        .filter(|_| mesh_opts.is_some_and(|m| m.sharing));
    // KV events need a sharing mesh: one index for the tier, fed by each pod's owner. The
    // follower runs whenever there is one, and follows while the node's config or the
    // policy's precise producer asks it to.
    let raft_metrics: Arc<arc_swap::ArcSwapOption<infermesh_raft_store::PolicyStore>> =
        Arc::default();
    let kv_stats: Option<Arc<crate::mesh::kv_events::KvEventStats>> =
        sharing.as_ref().map(|_| Arc::default());
    let pool_task = match &sharing {
        Some(m) => {
            tasks.spawn(crate::mesh::load::forward_owned(
                m.clone(),
                pool_tx.clone(),
                shutdown_rx.clone(),
            ));
            let in_flight_changed = Arc::new(tokio::sync::Notify::new());
            tasks.spawn(crate::mesh::load::run(
                m.clone(),
                pool.clone(),
                in_flight_changed.clone(),
                shutdown_rx.clone(),
            ));
            if let Some(stats) = &kv_stats {
                tasks.spawn(crate::mesh::kv_events::run(
                    m.clone(),
                    cfg.kv_events.clone(),
                    policy.clone(),
                    stats.clone(),
                    shutdown_rx.clone(),
                ));
            }
            pool_task.with_mesh(m.clone(), in_flight_changed)
        }
        None => pool_task,
    };
    tasks.spawn(pool_task.run(pool_rx, shutdown_rx.clone()));
    // Shared prefix state needs a prefix producer to hash chains with.
    let prefix_owners = sharing
        .as_ref()
        .filter(|_| cfg.scheduler.prefix_producer.is_some())
        .map(|m| Arc::new(MeshPrefixOwners::new(m)));
    if let Some(o) = &prefix_owners {
        dispatcher = dispatcher.with_prefix_owners(o.clone());
    }
    // The `flowControl` gate. With a sharing mesh the tier has one queue, held by the
    // owner of a rendezvous key (request::flow_mesh); otherwise (or with
    // --flow-control-per-node) each node has its own and they divide the budget by the
    // live node count (request::flow). Either way every node gates on the fleet-wide
    // saturation. The owner task runs whatever the start-time config says, because a
    // policy swap can turn the gate on later; while it is off, requests never reach it.
    let mesh_queue = sharing.as_ref().filter(|_| !cfg.flow_per_node);
    let live_nodes: crate::request::flow::LiveNodes = match (&mesh, mesh_queue) {
        (_, Some(m)) => crate::request::flow_mesh::MeshFlow::live_nodes(m),
        (Some(m), None) => {
            let members = m.members();
            Arc::new(move || members.borrow().members.len())
        }
        (None, None) => Arc::new(|| 1),
    };
    let (flow_gate, flow_task) = crate::request::FlowGate::spawn(
        crate::request::flow::FlowDriverConfig {
            refresh: cfg.scrape.interval,
            staleness: cfg.staleness,
            pick_fence: cfg.flow_pick_fence,
            freed_hint: if mesh_queue.is_some() {
                crate::request::picks::FREED_HINT
            } else {
                Duration::ZERO
            },
        },
        pool.clone(),
        policy.clone(),
        metrics.clone(),
        live_nodes,
        shutdown_rx.clone(),
    )?;
    tasks.spawn(async move {
        let _ = flow_task.await;
    });
    let tier_gate = match mesh_queue {
        Some(m) => {
            let (mesh_flow, task) = crate::request::flow_mesh::MeshFlow::start(
                m.clone(),
                flow_gate.clone(),
                metrics.clone(),
                shutdown_rx.clone(),
            )?;
            tasks.spawn(async move {
                let _ = task.await;
            });
            crate::request::flow_mesh::TierGate::with_mesh(flow_gate.clone(), mesh_flow)
        }
        None => flow_gate.clone().into(),
    };
    dispatcher = dispatcher.with_flow(tier_gate);
    let (initial, watcher) = match cfg.endpoints {
        EndpointSource::Static(spec) => (spec, None),
        EndpointSource::File { path, initial } => {
            let (w, task) =
                watch_pool_file(path, initial.clone(), pool_tx.clone(), shutdown_rx.clone())?;
            tasks.spawn(async move {
                let _ = task.await;
            });
            (initial, Some(w))
        }
        EndpointSource::FileDiscovery {
            path,
            watch,
            pool,
            initial,
        } => {
            if watch {
                let load =
                    move |p: &std::path::Path| crate::file_discovery::reload_endpoints(p, &pool);
                let (w, task) = crate::discovery::watch_file(
                    path,
                    initial.clone(),
                    load,
                    pool_tx.clone(),
                    shutdown_rx.clone(),
                )?;
                tasks.spawn(async move {
                    let _ = task.await;
                });
                (initial, Some(w))
            } else {
                (initial, None)
            }
        }
    };
    let _ = pool_tx.send(PoolInput::Spec(initial)).await;

    // ext_proc + gRPC health.
    let health_service = spawn_health(&mut tasks, synced.clone(), shutdown_rx.clone()).await;
    let ext_proc = ExtProcService::new(dispatcher.clone());
    let ext_proc = ext_proc
        .into_server()
        .max_decoding_message_size(cfg.max_body_bytes.saturating_add(1 << 20));
    // ADS shares the ext_proc port unless it has its own, so an Envoy needs one address.
    let ads_here = xds_listener.is_none().then(|| xds.server().service());
    let csds_here = xds_listener.is_none().then(|| xds.server().csds_service());
    let router = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(ext_proc)
        .add_optional_service(ads_here)
        .add_optional_service(csds_here);
    let mut sd = shutdown_rx.clone();
    let stop = async move {
        let _ = sd.wait_for(|s| *s).await;
    };
    match grpc_tls {
        None => {
            let incoming = TcpIncoming::from(grpc_listener).with_nodelay(Some(true));
            tasks.spawn(async move {
                if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop).await {
                    tracing::error!(error = %e, "ext_proc server failed");
                }
            });
        }
        Some(tls) => {
            if tls.reloads() {
                tasks.spawn(tls.clone().run(shutdown_rx.clone()));
            }
            let incoming = crate::tls::TlsIncoming::serve(grpc_listener, tls, shutdown_rx.clone());
            tasks.spawn(async move {
                if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop).await {
                    tracing::error!(error = %e, "ext_proc server failed");
                }
            });
        }
    }

    if let Some(l) = xds_listener {
        let server = xds.server().clone();
        let mut sd = shutdown_rx.clone();
        tasks.spawn(async move {
            let res = server
                .serve(l, async move {
                    let _ = sd.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = res {
                tracing::error!(error = %e, "xds server failed");
            }
        });
    }
    tasks.spawn(xds.clone().run(
        pool.clone(),
        mesh.clone(),
        cfg.xds.grpc_services.clone(),
        shutdown_rx.clone(),
    ));

    if let Some(l) = proxy_listener {
        let app = crate::proxy::router(dispatcher.clone(), client.clone(), cfg.proxy);
        match proxy_tls {
            None => {
                let l = l.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                crate::serve::spawn_http(&mut tasks, "proxy", l, app, shutdown_rx.clone());
            }
            Some(tls) => {
                if tls.reloads() {
                    tasks.spawn(tls.clone().run(shutdown_rx.clone()));
                }
                // The TLS accept loop sets TCP_NODELAY itself.
                let addr = proxy_addr.unwrap_or_else(|| ([0, 0, 0, 0], 0).into());
                let l = crate::tls::TlsListener::new(l, tls, shutdown_rx.clone()).map_err(
                    |source| StartError::Bind {
                        what: "proxy",
                        addr,
                        source,
                    },
                )?;
                crate::serve::spawn_http(&mut tasks, "proxy", l, app, shutdown_rx.clone());
            }
        }
    }
    if let Some(l) = metrics_listener {
        let app = metrics_router(MetricsPort {
            metrics: metrics.clone(),
            pool: pool.clone(),
            policy: policy.clone(),
            mesh: mesh.as_ref(),
            kv_stats: kv_stats.clone(),
            raft: raft_metrics.clone(),
            xds: xds.clone(),
        });
        crate::serve::spawn_http(&mut tasks, "metrics", l, app, shutdown_rx.clone());
    }

    tracing::info!(%ext_proc_addr, ?proxy_addr, ?metrics_addr, "infermesh node started");
    Ok(App {
        ext_proc_addr,
        proxy_addr,
        metrics_addr,
        xds_addr,
        pool,
        policy,
        pool_tx,
        synced,
        shutdown,
        tasks,
        _watcher: watcher,
        metrics,
        mesh,
        prefix_owners,
        kv_stats,
        raft_metrics,
        xds,
        flow: flow_gate,
    })
}

impl App {
    /// Binds every listener, starts the tasks, and returns once the node serves.
    pub async fn start(cfg: NodeConfig) -> Result<App, StartError> {
        start(cfg).await
    }

    /// A cloneable handle to swap the scheduler and the pool description, for tasks that
    /// outlive a borrow of the [`App`] (the policy feed).
    pub fn control(&self) -> crate::policy_store::feed::NodeControl {
        crate::policy_store::feed::NodeControl::new(self.policy.clone(), self.pool_tx.clone())
            .with_flow(self.flow.clone())
    }

    /// What the policy side of the node needs from the running node.
    pub fn policy_handles(&self) -> crate::policy_store::NodeHandles {
        crate::policy_store::NodeHandles {
            mesh: self.mesh.clone(),
            ext_proc_addr: self.ext_proc_addr,
            xds_addr: self.xds_addr,
            proxy_addr: self.proxy_addr,
            xds: self.xds.clone(),
            control: self.control(),
            raft_metrics: self.raft_metrics.clone(),
        }
    }

    /// Swaps in a new EndpointPickerConfig; requests already scheduled keep the old one.
    /// Flow control follows the new config's `flowControl` gate and section.
    pub fn set_scheduler_config(
        &self,
        cfg: &infermesh_scheduler::ResolvedConfig,
    ) -> Result<(), Box<infermesh_scheduler::ConfigError>> {
        self.policy.store(Arc::new(Policy::new(cfg)?));
        self.flow.policy_changed();
        Ok(())
    }

    /// The current pool view.
    pub fn pool(&self) -> Arc<PoolView> {
        self.pool.load_full()
    }

    /// The router mesh this node belongs to (`None` in single-node mode). Other
    /// subsystems ride its QUIC service channels (`register_service`/`call_service`).
    pub fn mesh(&self) -> Option<&infermesh_gossip::Mesh> {
        self.mesh.as_deref()
    }

    /// A shared handle to the mesh, for tasks that outlive a borrow of the [`App`].
    pub fn mesh_handle(&self) -> Option<Arc<infermesh_gossip::Mesh>> {
        self.mesh.clone()
    }

    /// The KV-event follower's counters (`None` without a sharing mesh).
    pub fn kv_event_stats(&self) -> Option<&crate::mesh::kv_events::KvEventStats> {
        self.kv_stats.as_deref()
    }

    /// The prefix state this node holds now.
    pub fn prefix_memory(&self) -> PrefixMemory {
        let mut m = PrefixMemory::default();
        if let Some(mesh) = &self.mesh {
            m.owner_blocks = mesh.prefix_index_blocks();
            m.owner_bytes = mesh.prefix_index_bytes();
        }
        if let Some(o) = &self.prefix_owners {
            (m.recent_picks, m.recent_bytes) = o.recent_memory();
        }
        if let Some(ix) = self.policy.load().scheduler.prefix_index() {
            m.local_entries = ix.entries();
            m.local_bytes = ix.memory_bytes();
        }
        m
    }

    /// The node's xDS server and its feed (sync status, policy pools hook).
    pub fn xds(&self) -> &crate::xds::XdsFeed {
        &self.xds
    }

    /// The node's metrics registry.
    pub fn metrics(&self) -> &Arc<NodeMetrics> {
        &self.metrics
    }

    /// Replaces the pool description (for nodes started with a static pool).
    pub async fn set_pool(&self, spec: PoolSpec) {
        let _ = self.pool_tx.send(PoolInput::Spec(spec)).await;
    }

    /// Waits until discovery applied a pool and `n` endpoints answered their scrape, or `limit` passes.
    pub async fn wait_ready(&self, n: usize, limit: Duration) -> bool {
        let mut synced = self.synced.clone();
        let deadline = tokio::time::Instant::now() + limit;
        if tokio::time::timeout_at(deadline, synced.wait_for(|s| *s))
            .await
            .is_err()
        {
            return false;
        }
        loop {
            let up = self.pool.load().slots.iter().filter(|s| s.is_up()).count();
            if up >= n {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops every task and server, waiting at most `grace` for in-flight work.
    pub async fn shutdown(mut self, grace: Duration) {
        // ADS streams never end by themselves: end them so Envoys move to another node
        // now and the gRPC server's graceful stop does not wait out the grace period.
        self.xds.server().close_streams();
        self.shutdown.send_replace(true);
        let drained = tokio::time::timeout(grace, async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("shutdown grace period over; aborting remaining tasks");
            self.tasks.abort_all();
            while self.tasks.join_next().await.is_some() {}
        }
        // Announce departure so peers re-own our pods and prefixes at once, not after
        // failure detection. Someone still holding a handle means a plain drop later.
        if let Some(mesh) = self.mesh.take().and_then(|m| Arc::try_unwrap(m).ok()) {
            mesh.leave(Duration::from_secs(1)).await;
        }
    }
}
