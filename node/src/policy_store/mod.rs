//! Policy in Raft on a node: opens the node's `infermesh-raft-store` (redb under
//! `--data-dir`), carries Raft over the mesh's QUIC service channel, forms or joins the
//! cluster, registers the node, serves the admin API, and feeds applied policy into
//! routing (scheduler config, endpoints, objective priorities, model rewrites) without a
//! restart.
//!
//! A node without `--bootstrap`, `--join` or `--data-dir` runs without Raft, as before.

/// Policy objects → routing inputs; lives with the policy (xDS reads it too).
pub use crate::policy::derive;
pub mod feed;
/// Model rewrites live with the policy they are part of; kept here under their old path.
pub use crate::policy::rewrite;
pub mod transport;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use clap::Args;
use infermesh_gossip::{Mesh, NodeId as MeshNodeId};
use infermesh_raft_store::policy::{
    Document, EppConfigValidator, INFERMESH_API_VERSION, InfermeshNodeSpec, ObjectMeta,
    PolicyObject,
};
use infermesh_raft_store::{Node, PolicyStore, Route, StoreConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::client::AdminTls;
use crate::admin::{
    self, ADMIN_ADDRESS_ANNOTATION, ADMIN_SCHEME_ANNOTATION, AdminState, GOSSIP_ADDRESS_ANNOTATION,
    NodeInfo,
};
use crate::discovery::PoolSpec;
use crate::policy_store::rewrite::ModelRewrites;

/// Name of the store's redb file inside `--data-dir`.
pub const DATA_FILE: &str = "policy.redb";
/// Name of the file inside `--data-dir` holding this node's Raft id.
pub const RAFT_ID_FILE: &str = "raft-id";

/// `infermesh serve` flags of the policy cluster.
#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// Form a new policy cluster with this node as its first voter (ignored once the
    /// data dir holds cluster state). Needs --admin-token-file.
    #[arg(long, conflicts_with = "join")]
    pub bootstrap: bool,
    /// Join the policy cluster through any member's admin API (HOST:PORT or http://HOST:PORT);
    /// the mesh (--seeds) must reach that member. Ignored once the data dir holds cluster state.
    #[arg(long)]
    pub join: Option<String>,
    /// Directory of the node's Raft log and policy state (policy.redb) and its Raft id.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Admin HTTP/JSON API listen address (served only with Raft).
    #[arg(long, default_value = crate::admin::commands::DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// File of bearer tokens (one per line) allowed to write policy; stored hashed at
    /// --bootstrap.
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// InferencePool this node serves from policy (default: the --endpoints file's pool,
    /// else the only InferencePool in policy).
    #[arg(long)]
    pub pool: Option<String>,
}

impl ClusterArgs {
    /// Whether the node runs the policy store.
    pub fn enabled(&self) -> bool {
        self.bootstrap || self.join.is_some() || self.data_dir.is_some()
    }
}

/// The policy cluster could not be started or joined.
#[derive(Debug, thiserror::Error)]
pub enum PolicyStartError {
    /// A flag is missing or unusable.
    #[error("--{flag}: {reason}")]
    Flag {
        /// Flag name.
        flag: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A file under --data-dir or the token file could not be used.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
    /// The store could not be opened.
    #[error("policy store: {0}")]
    Open(#[from] infermesh_raft_store::OpenError),
    /// Forming or joining the cluster failed.
    #[error("policy cluster: {0}")]
    Cluster(#[from] infermesh_raft_store::ClusterError),
    /// The member given to --join could not tell us who it is.
    #[error("--join {server}: {reason}")]
    Join {
        /// The member.
        server: String,
        /// Why.
        reason: String,
    },
    /// The Raft channel is already taken on the mesh.
    #[error("mesh: {0}")]
    Channel(#[from] infermesh_gossip::ChannelTaken),
}

fn flag(flag: &'static str, reason: impl Into<String>) -> PolicyStartError {
    PolicyStartError::Flag {
        flag,
        reason: reason.into(),
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PolicyStartError + '_ {
    move |source| PolicyStartError::Io {
        path: path.to_owned(),
        source,
    }
}

/// What the node had before policy: its endpoints file and scheduler config.
#[derive(Debug, Clone)]
pub struct LocalBase {
    /// The `--endpoints` file, if any (watched by the feed, merged with policy endpoints).
    pub endpoints_file: Option<PathBuf>,
    /// Its content at start.
    pub initial_pool: Option<PoolSpec>,
    /// The `--config-file` (or built-in) scheduler config, used while policy holds none.
    pub scheduler: infermesh_scheduler::ResolvedConfig,
    /// `--allow-experimental-plugins`: a stored config with an Alpha plugin is refused
    /// without it (the previous scheduler keeps routing).
    pub allow_experimental_plugins: bool,
}

/// TLS of the admin API: how it serves, and what it presents and trusts when it calls
/// another node's admin API (forwarding to the leader, `--join`).
#[derive(Debug, Clone, Default)]
pub struct AdminTlsConfig {
    /// Serve https with these settings (`None`: plain http).
    pub serve: Option<crate::tls::ServerTlsSettings>,
    /// Client side towards other nodes' admin APIs.
    pub peer: AdminTls,
}

/// A running policy node: store, admin API, feed and registry tasks.
pub struct PolicyNode {
    store: PolicyStore,
    admin_addr: SocketAddr,
    rewrites: Arc<ArcSwap<ModelRewrites>>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    _watcher: Option<notify::RecommendedWatcher>,
}

impl std::fmt::Debug for PolicyNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyNode")
            .field("raft_id", &self.store.id())
            .field("admin_addr", &self.admin_addr)
            .finish()
    }
}

/// The validator the store runs on every EndpointPickerConfig before commit: the
/// scheduler's loader, then building a scheduler from it (as a node would).
pub fn epp_validator() -> EppConfigValidator {
    Arc::new(|yaml: &str| {
        let cfg = infermesh_scheduler::load_config(yaml)?;
        infermesh_scheduler::Scheduler::new(&cfg)?;
        Ok(())
    })
}

/// Reads this node's Raft id from the data dir, creating a random one on first start (a
/// fresh data dir is a new member, so ids are never reused).
pub fn raft_id(dir: &Path) -> Result<u64, PolicyStartError> {
    let path = dir.join(RAFT_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => text
            .trim()
            .parse::<u64>()
            .ok()
            .filter(|id| *id > 0)
            .ok_or_else(|| PolicyStartError::Io {
                path: path.clone(),
                source: std::io::Error::other(format!("not a Raft id: {:?}", text.trim())),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Below 2^53 so the id survives JSON tooling that reads numbers as doubles.
            let id = rand::random_range(1..(1u64 << 53));
            let tmp = dir.join(format!("{RAFT_ID_FILE}.tmp"));
            std::fs::write(&tmp, format!("{id}\n")).map_err(io(&tmp))?;
            std::fs::File::open(&tmp)
                .and_then(|f| f.sync_all())
                .map_err(io(&tmp))?;
            std::fs::rename(&tmp, &path).map_err(io(&path))?;
            Ok(id)
        }
        Err(e) => Err(PolicyStartError::Io { path, source: e }),
    }
}

fn read_tokens(path: &Path) -> Result<Vec<String>, PolicyStartError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let tokens = crate::admin::commands::tokens_in(&text);
    if tokens.is_empty() {
        return Err(flag(
            "admin-token-file",
            format!("{} holds no token", path.display()),
        ));
    }
    Ok(tokens)
}

/// What the policy side needs from the running node (`App::policy_handles`).
#[derive(Debug, Clone)]
pub struct NodeHandles {
    /// The node's mesh (required: Raft runs on it).
    pub mesh: Option<Arc<infermesh_gossip::Mesh>>,
    /// Bound ext_proc address (registered in the node registry).
    pub ext_proc_addr: SocketAddr,
    /// Bound ADS address.
    pub xds_addr: SocketAddr,
    /// Bound proxy address.
    pub proxy_addr: Option<SocketAddr>,
    /// The node's xDS feed.
    pub xds: crate::xds::XdsFeed,
    /// Swaps the node's scheduler, rewrites and pool.
    pub control: feed::NodeControl,
    /// Where the store is published for the node's `/metrics` (Raft gauges).
    pub raft_metrics: Arc<arc_swap::ArcSwapOption<PolicyStore>>,
}

impl PolicyNode {
    /// Starts the policy side of a running node (with its mesh): opens the
    /// store, serves Raft on the mesh, forms or joins the cluster, starts the admin API,
    /// registers the node and feeds applied policy into routing.
    pub async fn start(
        handles: NodeHandles,
        args: &ClusterArgs,
        base: LocalBase,
    ) -> Result<PolicyNode, PolicyStartError> {
        PolicyNode::start_with_tls(handles, args, base, AdminTlsConfig::default()).await
    }

    /// [`PolicyNode::start`] with the admin API served and called as `tls` says.
    pub async fn start_with_tls(
        handles: NodeHandles,
        args: &ClusterArgs,
        base: LocalBase,
        tls: AdminTlsConfig,
    ) -> Result<PolicyNode, PolicyStartError> {
        let mesh = handles.mesh.clone().ok_or_else(|| {
            flag(
                "gossip-addr",
                "the policy cluster needs the mesh (--gossip-addr, --seeds and a cluster key)",
            )
        })?;
        let dir = args
            .data_dir
            .clone()
            .ok_or_else(|| flag("data-dir", "required with --bootstrap/--join"))?;
        let tokens = match (&args.admin_token_file, args.bootstrap) {
            (Some(p), true) => read_tokens(p)?,
            (None, true) => {
                return Err(flag(
                    "admin-token-file",
                    "--bootstrap needs the write tokens (one per line; stored hashed)",
                ));
            }
            (Some(_), false) => {
                return Err(flag(
                    "admin-token-file",
                    "tokens are set at --bootstrap; joining nodes receive them through Raft",
                ));
            }
            (None, false) => Vec::new(),
        };
        // Bind before starting anything so a busy port fails the start cleanly.
        let admin_listener = TcpListener::bind(args.admin_addr)
            .await
            .map_err(io(Path::new("--admin-addr")))?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(io(Path::new("--admin-addr")))?;
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        let id = raft_id(&dir)?;
        let transport = Arc::new(transport::MeshTransport::new(mesh.clone()));
        let store = PolicyStore::open(
            StoreConfig::new(id, dir.join(DATA_FILE)),
            transport,
            epp_validator(),
        )
        .await?;
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = vec![transport::serve_raft_channel(
            &mesh,
            store.clone(),
            shutdown_rx.clone(),
        )?];
        let me = mesh.node_id().as_str().to_owned();
        let info = NodeInfo {
            name: me.clone(),
            raft_id: id,
            admin_address: admin_addr,
            ext_proc_address: handles.ext_proc_addr,
            xds_address: handles.xds_addr,
            proxy_address: handles.proxy_addr,
            gossip_address: mesh.gossip_addr(),
            mesh_address: mesh.rpc_addr(),
        };
        let router = admin::router(
            AdminState::new(store.clone(), info.clone(), tls.peer.clone()),
            crate::xds::status::router(handles.xds.clone()),
        );
        let scheme = match tls.serve.clone() {
            None => {
                tasks.push(tokio::spawn(admin::serve(
                    admin_listener,
                    router,
                    shutdown_rx.clone(),
                )));
                "http"
            }
            Some(settings) => {
                let reloader = crate::tls::TlsReloader::new(settings)
                    .map_err(|e| flag("admin-tls-cert-file", e.to_string()))?;
                if reloader.reloads() {
                    tasks.push(tokio::spawn(reloader.clone().run(shutdown_rx.clone())));
                }
                let listener =
                    crate::tls::TlsListener::new(admin_listener, reloader, shutdown_rx.clone())
                        .map_err(io(Path::new("--admin-addr")))?;
                tasks.push(tokio::spawn(admin::serve(
                    listener,
                    router,
                    shutdown_rx.clone(),
                )));
                "https"
            }
        };
        handles.raft_metrics.store(Some(Arc::new(store.clone())));
        tracing::info!(raft_id = id, %admin_addr, scheme, node = %me, "policy store open");

        if store.is_initialized().await? {
            tracing::info!("policy store holds cluster state; rejoining as before");
        } else if args.bootstrap {
            store
                .bootstrap([(id, Node::new(me.clone()))].into(), &tokens)
                .await?;
            tracing::info!("formed a new policy cluster");
        } else if let Some(server) = &args.join {
            join(&store, &mesh, server, &me, &tls.peer).await?;
            tracing::info!(via = %server, "joined the policy cluster");
        } else {
            return Err(flag(
                "data-dir",
                format!(
                    "{} holds no cluster state: pass --bootstrap or --join",
                    dir.display()
                ),
            ));
        }

        tasks.push(tokio::spawn(register(
            store.clone(),
            registry_entry(&info, scheme),
            shutdown_rx.clone(),
        )));
        let rewrites = Arc::new(ArcSwap::from_pointee(ModelRewrites::default()));
        let (watcher, file_rx) = match (&base.endpoints_file, &base.initial_pool) {
            (Some(path), Some(initial)) => {
                let (tx, rx) = tokio::sync::mpsc::channel(16);
                let (w, task) = crate::discovery::watch_pool_file(
                    path.clone(),
                    initial.clone(),
                    tx,
                    shutdown_rx.clone(),
                )
                .map_err(|e| PolicyStartError::Io {
                    path: path.clone(),
                    source: std::io::Error::other(e),
                })?;
                tasks.push(tokio::spawn(async move {
                    let _ = task.await;
                }));
                (Some(w), Some(rx))
            }
            _ => (None, None),
        };
        tasks.push(tokio::spawn(crate::xds::policy::feed_policy_pools(
            handles.xds.clone(),
            store.subscribe(),
            shutdown_rx.clone(),
        )));
        tasks.push(tokio::spawn(
            feed::Feed::new(
                handles.control.clone(),
                base,
                args.pool.clone(),
                rewrites.clone(),
            )
            .run(store.subscribe(), file_rx, shutdown_rx),
        ));
        Ok(PolicyNode {
            store,
            admin_addr,
            rewrites,
            shutdown,
            tasks,
            _watcher: watcher,
        })
    }

    /// The node's policy store.
    pub fn store(&self) -> &PolicyStore {
        &self.store
    }

    /// The bound admin API address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// Resolves when the policy store stopped on a fatal error (full or failing disk),
    /// naming it.
    pub async fn fatal(&self) -> String {
        self.store.fatal().await
    }

    /// The model rewrites of applied policy (swapped whole on each change), for the
    /// request path to resolve `model` → target model with the request's RNG.
    pub fn rewrites(&self) -> Arc<ArcSwap<ModelRewrites>> {
        self.rewrites.clone()
    }

    /// Stops the admin API and feed, hands leadership off when `hand_off` (graceful
    /// shutdown), and stops Raft.
    pub async fn shutdown(self, hand_off: bool) {
        if let Err(e) = self.store.shutdown(hand_off).await {
            tracing::warn!(error = %e, "policy store shutdown");
        }
        self.shutdown.send_replace(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
    }
}

/// This node's registry entry: advertised addresses, and the admin and gossip addresses
/// as annotations.
fn registry_entry(info: &NodeInfo, admin_scheme: &str) -> PolicyObject {
    let mut meta = ObjectMeta {
        name: info.name.clone(),
        namespace: infermesh_raft_store::policy::DEFAULT_NAMESPACE.to_owned(),
        labels: Default::default(),
        annotations: Default::default(),
        resource_version: None,
    };
    meta.annotations.insert(
        ADMIN_ADDRESS_ANNOTATION.to_owned(),
        info.admin_address.to_string(),
    );
    if admin_scheme != "http" {
        meta.annotations
            .insert(ADMIN_SCHEME_ANNOTATION.to_owned(), admin_scheme.to_owned());
    }
    meta.annotations.insert(
        GOSSIP_ADDRESS_ANNOTATION.to_owned(),
        info.gossip_address.to_string(),
    );
    PolicyObject::InfermeshNode(Document {
        api_version: INFERMESH_API_VERSION.to_owned(),
        kind: "InfermeshNode".to_owned(),
        metadata: meta,
        spec: InfermeshNodeSpec {
            raft_id: info.raft_id,
            ext_proc_address: info.ext_proc_address,
            xds_address: info.xds_address,
            proxy_address: info.proxy_address,
            mesh_address: Some(info.mesh_address),
        },
    })
}

/// Writes the node's registry entry (through the leader), retrying until it commits.
async fn register(store: PolicyStore, entry: PolicyObject, mut shutdown: watch::Receiver<bool>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match store
            .apply_objects(vec![entry.clone()], Route::ViaLeader)
            .await
        {
            Ok(a) => {
                tracing::info!(index = a.index, "node registered in policy");
                return;
            }
            Err(e) => tracing::debug!(error = %e, "node registration: retrying"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Joins through the member whose admin API is `server`: learns its mesh name, waits until
/// gossip sees it live, then asks it (or the leader it redirects to) to admit us.
async fn join(
    store: &PolicyStore,
    mesh: &Mesh,
    server: &str,
    me: &str,
    tls: &AdminTls,
) -> Result<(), PolicyStartError> {
    let bad = |reason: String| PolicyStartError::Join {
        server: server.to_owned(),
        reason,
    };
    let client = crate::admin::client::AdminClient::with_tls(server, None, tls)
        .map_err(|e| bad(e.to_string()))?;
    let deadline = tokio::time::Instant::now() + JOIN_TIMEOUT;
    let seed = loop {
        match client.call(http::Method::GET, "/v1/node", None).await {
            Ok(v) => match v.get("name").and_then(|n| n.as_str()) {
                Some(n) => break n.to_owned(),
                None => return Err(bad(format!("unexpected answer {v}"))),
            },
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %e, "join: member not answering yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(bad(e.to_string())),
        }
    };
    let mut members = mesh.members();
    let seed_id = MeshNodeId::new(seed.clone());
    tokio::time::timeout_at(deadline, members.wait_for(|m| m.get(&seed_id).is_some()))
        .await
        .map_err(|_| bad(format!("gossip never saw member {seed:?}: check --seeds")))?
        .map_err(|_| bad("the mesh stopped".into()))?;
    loop {
        match store
            .join(Node::new(seed.clone()), Node::new(me.to_owned()))
            .await
        {
            Ok(()) => return Ok(()),
            Err(e) if tokio::time::Instant::now() < deadline => {
                tracing::info!(error = %e, "join: retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// How long a node tries to join before giving up.
const JOIN_TIMEOUT: Duration = Duration::from_secs(60);

/// The node config of a policy-enabled node: the endpoints file is optional and watched by
/// the policy feed (which merges it with policy endpoints) rather than by the pool task.
pub fn node_config(
    s: crate::config::NodeSettings,
    endpoints: Option<&Path>,
) -> Result<(crate::config::NodeConfig, LocalBase), crate::config::InvalidNodeConfig> {
    let scheduler = crate::config::load_scheduler_config(
        s.config_file.as_deref(),
        s.allow_experimental_plugins,
    )?;
    if let Some((name, _)) = scheduler.file_discovery() {
        return Err(crate::config::InvalidNodeConfig::Flag {
            flag: "config-file",
            reason: format!(
                "dataLayer.discovery (file-discovery `{name}`) is for a node without a policy cluster; a policy node takes its endpoints from --endpoints and the cluster's InferenceEndpoints"
            ),
        });
    }
    let initial = endpoints
        .map(crate::discovery::load_pool_file)
        .transpose()?;
    let cfg = crate::config::NodeConfig::new(
        s.ext_proc_addr,
        s.proxy_addr,
        s.metrics_addr,
        crate::config::EndpointSource::Static(initial.clone().unwrap_or_default()),
        scheduler.clone(),
        &s,
    )?;
    Ok((
        cfg,
        LocalBase {
            endpoints_file: endpoints.map(Path::to_owned),
            initial_pool: initial,
            scheduler,
            allow_experimental_plugins: s.allow_experimental_plugins,
        },
    ))
}
