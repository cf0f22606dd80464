//! The Kubernetes controller: InferencePools and the pods their selectors pick,
//! InferenceObjectives and InferenceModelRewrites (llm-d's `llm-d.ai` group, or the older
//! x-k8s group when llm-d's is not installed), and the EndpointPickerConfig from a
//! ConfigMap, mirrored into Raft policy by the leader alone, so every node (and every Envoy
//! through xDS) sees one version; status conditions are written back on the objects.
//!
//! [`translate`] and [`status`] are plain functions (tested without an API server);
//! `controller` holds the watches and the writes.

use std::path::PathBuf;

use clap::Args;
use infermesh_raft_store::PolicyStore;
use infermesh_raft_store::policy::EppConfigValidator;

mod controller;
pub mod status;
pub mod translate;

/// InferencePool's group (GIE v1).
pub const POOL_GROUP: &str = "inference.networking.k8s.io";
/// llm-d's group of InferenceObjective and InferenceModelRewrite.
pub const LLMD_GROUP: &str = "llm-d.ai";
/// The older GIE group of the same kinds.
pub const XK8S_GROUP: &str = "inference.networking.x-k8s.io";
/// The ConfigMap key read when `--kubernetes-config-map` names none.
pub const DEFAULT_CONFIG_KEY: &str = "epp-config.yaml";

/// Every API access the controller makes: (group, resource, verbs). The Role shipped in
/// `deploy/kubernetes/base/rbac.yaml` grants exactly this (a test compares them).
pub const ACCESS: &[(&str, &str, &[&str])] = &[
    ("", "pods", &["get", "list", "watch"]),
    ("", "configmaps", &["get", "list", "watch"]),
    (POOL_GROUP, "inferencepools", &["get", "list", "watch"]),
    (POOL_GROUP, "inferencepools/status", &["get", "update"]),
    (LLMD_GROUP, "inferenceobjectives", &["get", "list", "watch"]),
    (LLMD_GROUP, "inferenceobjectives/status", &["get", "update"]),
    (
        LLMD_GROUP,
        "inferencemodelrewrites",
        &["get", "list", "watch"],
    ),
    (
        LLMD_GROUP,
        "inferencemodelrewrites/status",
        &["get", "update"],
    ),
    (XK8S_GROUP, "inferenceobjectives", &["get", "list", "watch"]),
    (XK8S_GROUP, "inferenceobjectives/status", &["get", "update"]),
    (
        XK8S_GROUP,
        "inferencemodelrewrites",
        &["get", "list", "watch"],
    ),
    (
        XK8S_GROUP,
        "inferencemodelrewrites/status",
        &["get", "update"],
    ),
];

/// `infermesh serve` flags of the Kubernetes controller.
#[derive(Debug, Clone, Args)]
pub struct KubeArgs {
    /// Read InferencePools, their pods, objectives and model rewrites from the Kubernetes
    /// API (in-cluster credentials, else $KUBECONFIG or ~/.kube/config) and mirror them
    /// into policy. Needs the policy cluster (--data-dir).
    #[arg(long)]
    pub kubernetes: bool,
    /// Namespace watched (default: $POD_NAMESPACE, else the credentials' namespace).
    #[arg(long, requires = "kubernetes")]
    pub kubernetes_namespace: Option<String>,
    /// ConfigMap holding the EndpointPickerConfig, `NAME` or `NAME/KEY` (key default
    /// `epp-config.yaml`); stored in policy as the config every node runs.
    #[arg(long, requires = "kubernetes")]
    pub kubernetes_config_map: Option<String>,
    /// A kubeconfig file to use instead of the in-cluster or default credentials.
    #[arg(long, requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
    /// Name of the tier's own entry in an InferencePool's `status.parents`.
    #[arg(long, default_value = "infermesh", requires = "kubernetes")]
    pub kubernetes_tier_name: String,
}

/// What the controller was told, resolved.
#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// Namespace watched.
    pub namespace: String,
    /// EndpointPickerConfig ConfigMap and key.
    pub config_map: Option<(String, String)>,
    /// Name of the tier's parent entry on pools.
    pub tier_name: String,
}

/// The controller could not start.
#[derive(Debug, thiserror::Error)]
pub enum KubeStartError {
    /// No usable credentials or kubeconfig.
    #[error("kubernetes: cannot load credentials: {0}")]
    Config(String),
    /// The client could not be built.
    #[error("kubernetes: cannot build a client: {0}")]
    Client(#[from] kube::Error),
    /// A flag value is unusable.
    #[error("--{flag}: {reason}")]
    Flag {
        /// Flag name.
        flag: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl KubeArgs {
    fn config_map(&self) -> Result<Option<(String, String)>, KubeStartError> {
        let Some(v) = &self.kubernetes_config_map else {
            return Ok(None);
        };
        let (name, key) = v.split_once('/').unwrap_or((v, DEFAULT_CONFIG_KEY));
        if name.is_empty() || key.is_empty() {
            return Err(KubeStartError::Flag {
                flag: "kubernetes-config-map",
                reason: format!("{v:?}: expected NAME or NAME/KEY"),
            });
        }
        Ok(Some((name.to_owned(), key.to_owned())))
    }

    async fn client(&self) -> Result<(kube::Client, String), KubeStartError> {
        let config = match &self.kubeconfig {
            Some(path) => {
                let file = kube::config::Kubeconfig::read_from(path)
                    .map_err(|e| KubeStartError::Config(format!("{}: {e}", path.display())))?;
                kube::Config::from_custom_kubeconfig(file, &Default::default())
                    .await
                    .map_err(|e| KubeStartError::Config(format!("{}: {e}", path.display())))?
            }
            None => kube::Config::infer()
                .await
                .map_err(|e| KubeStartError::Config(e.to_string()))?,
        };
        let ns = config.default_namespace.clone();
        Ok((kube::Client::try_from(config)?, ns))
    }
}

/// A running controller; dropping it stops the watches.
pub struct KubeController {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for KubeController {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl KubeController {
    /// Connects and starts the watches and the reconcile loop (on the current runtime).
    pub async fn start(
        args: &KubeArgs,
        store: PolicyStore,
        validator: EppConfigValidator,
    ) -> Result<KubeController, KubeStartError> {
        let config_map = args.config_map()?;
        let (client, default_ns) = args.client().await?;
        let namespace = args
            .kubernetes_namespace
            .clone()
            .or_else(|| {
                std::env::var("POD_NAMESPACE")
                    .ok()
                    .filter(|n| !n.is_empty())
            })
            .unwrap_or(default_ns);
        let settings = KubeSettings {
            namespace,
            config_map,
            tier_name: args.kubernetes_tier_name.clone(),
        };
        tracing::info!(namespace = %settings.namespace, "watching the Kubernetes API");
        let controller = controller::Controller::new(client, settings, store, validator);
        Ok(KubeController {
            task: tokio::spawn(controller.run()),
        })
    }
}
