//! A tier node for tests: an in-process infermesh node and its Raft policy store on their
//! own killable runtime (killing it drops every task and socket at once, like a crashed
//! process), with the config and cluster flags tests give it.

use std::net::SocketAddr;

use infermesh_gossip::{ClusterKey, MeshConfig};
use infermesh_node::app::App;
use infermesh_node::config::{EndpointSource, NodeConfig};
use infermesh_node::discovery::fleet_pool;
use infermesh_node::mesh::MeshOptions;
use infermesh_node::policy_store::{ClusterArgs, LocalBase, PolicyNode};
use infermesh_scheduler::ResolvedConfig;
use infermesh_testkit::Isolated;

/// An infermesh node on its own runtime: killing it drops every task and socket at once,
/// like a crashed process.
pub struct Node {
    app: Option<App>,
    policy: Option<PolicyNode>,
    rt: Isolated,
}

impl Node {
    /// Starts the node and its policy store (forming or joining the Raft cluster).
    pub async fn start(cfg: NodeConfig, cluster: ClusterArgs) -> Node {
        let rt = Isolated::new();
        let base = LocalBase {
            endpoints_file: None,
            initial_pool: match &cfg.endpoints {
                EndpointSource::Static(p) => Some(p.clone()),
                EndpointSource::File { initial, .. } => Some(initial.clone()),
                EndpointSource::FileDiscovery { initial, .. } => Some(initial.clone()),
            },
            scheduler: cfg.scheduler.clone(),
            allow_experimental_plugins: false,
        };
        let (app, policy) = rt
            .run(async move {
                let app = App::start(cfg).await.expect("node starts");
                let policy = PolicyNode::start(app.policy_handles(), &cluster, base)
                    .await
                    .expect("policy store starts");
                (app, policy)
            })
            .await;
        Node {
            app: Some(app),
            policy: Some(policy),
            rt,
        }
    }

    pub fn admin(&self) -> String {
        format!(
            "http://{}",
            self.policy.as_ref().expect("alive").admin_addr()
        )
    }

    pub fn app(&self) -> &App {
        self.app.as_ref().expect("node alive")
    }

    pub fn kill(&mut self) {
        self.rt.kill();
        self.policy = None;
        self.app = None;
    }

    pub fn alive(&self) -> bool {
        self.app.is_some()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn node_config(
    name: &str,
    pods: &[SocketAddr],
    model: &str,
    listener: SocketAddr,
    key: &ClusterKey,
    seeds: Vec<SocketAddr>,
) -> NodeConfig {
    let mut cfg = NodeConfig::local(fleet_pool(pods, model), ResolvedConfig::builtin_default())
        .expect("config");
    cfg.proxy_addr = None;
    cfg.xds.file_pool.listener = listener;
    let mut mesh = MeshConfig::loopback(name, key.clone());
    mesh.seeds = seeds;
    cfg.mesh = Some(MeshOptions {
        config: mesh,
        sharing: true,
    });
    cfg
}

/// Policy-store flags: the first node forms the cluster (with the write token), the
/// second joins it through the first one's admin API.
pub fn cluster_args(
    dir: &std::path::Path,
    tokens: &std::path::Path,
    join: Option<String>,
) -> ClusterArgs {
    ClusterArgs {
        bootstrap: join.is_none(),
        admin_token_file: join.is_none().then(|| tokens.to_owned()),
        join,
        data_dir: Some(dir.to_owned()),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        pool: None,
    }
}
