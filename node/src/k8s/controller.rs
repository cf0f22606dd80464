//! The controller's IO: watches (kube-rs reflectors) on pods, InferencePools, both groups'
//! objectives and rewrites and the EndpointPickerConfig ConfigMap; a reconcile loop that,
//! on the Raft leader only, turns them into one policy write and writes status back.
//!
//! Every node runs the watches, so a new leader reconciles at once from a warm cache; only
//! the leader writes, and it writes with `Route::Local`, so a node that lost leadership
//! between deciding and writing is refused by Raft rather than writing twice. The watches
//! resume from their last resourceVersion, relist on 410 Gone and back off on errors
//! (kube-runtime's watcher); a status write that meets a conflict re-reads and retries.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use infermesh_raft_store::policy::{EppConfigValidator, PolicyRequest};
use infermesh_raft_store::{PolicyStore, Route};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::Value;
use tokio::sync::Notify;
use tokio::task::JoinSet;

use super::status::updated_status;
use super::translate::{
    ClusterView, ConfigMapConfig, CustomObject, PodView, Review, desired, plan,
};
use super::{KubeSettings, LLMD_GROUP, POOL_GROUP, XK8S_GROUP};

/// How long changes are gathered before one reconcile.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// A reconcile runs at least this often, so a write refused (conflict, lost leadership)
/// is retried even when nothing else changes.
const RESYNC: Duration = Duration::from_secs(10);
/// Attempts of one status write that meets conflicts.
const STATUS_ATTEMPTS: usize = 5;

fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: format!("{group}/{version}"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// What a watch has learned about its resource type.
#[derive(Clone, Default)]
struct WatchFlags {
    /// The last list or watch call succeeded (the CRD is installed and readable).
    installed: Arc<AtomicBool>,
    /// A first list completed, or the type turned out not to be served: the store can be
    /// trusted. Until every watch has settled nothing is written, so a new leader never
    /// deletes objects only because its cache is still empty.
    settled: Arc<AtomicBool>,
}

impl WatchFlags {
    fn settled(&self) -> bool {
        self.settled.load(Ordering::Relaxed)
    }
}

/// One watched custom resource type.
struct Watched {
    resource: ApiResource,
    api: Api<DynamicObject>,
    store: Store<DynamicObject>,
    flags: WatchFlags,
}

fn is_not_found(e: &watcher::Error) -> bool {
    let api = match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s,
        _ => return false,
    };
    api.code == 404
}

/// Runs a reflector for `api` until the task set is dropped, waking `changed` on every
/// event and tracking whether the resource is served.
fn reflect<K>(
    tasks: &mut JoinSet<()>,
    api: Api<K>,
    cfg: watcher::Config,
    writer: reflector::store::Writer<K>,
    changed: Arc<Notify>,
    flags: WatchFlags,
    what: String,
) where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let stream = reflector::reflector(writer, watcher(api, cfg)).default_backoff();
    tasks.spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(
                    kube::runtime::watcher::Event::InitDone
                    | kube::runtime::watcher::Event::Apply(_)
                    | kube::runtime::watcher::Event::Delete(_),
                ) => {
                    flags.installed.store(true, Ordering::Relaxed);
                    flags.settled.store(true, Ordering::Relaxed);
                }
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {
                    flags.installed.store(false, Ordering::Relaxed);
                    flags.settled.store(true, Ordering::Relaxed);
                    tracing::debug!(resource = %what, "not served by the API server");
                }
                Err(e) => tracing::warn!(resource = %what, error = %e, "watch failed; retrying"),
            }
            changed.notify_one();
        }
    });
}

fn reflect_dynamic(
    tasks: &mut JoinSet<()>,
    client: &Client,
    namespace: &str,
    ar: &ApiResource,
    changed: &Arc<Notify>,
) -> Watched {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, ar);
    let writer = reflector::store::Writer::new(ar.clone());
    let store = writer.as_reader();
    let flags = WatchFlags::default();
    reflect(
        tasks,
        api.clone(),
        watcher::Config::default(),
        writer,
        changed.clone(),
        flags.clone(),
        format!("{}/{}", ar.api_version, ar.plural),
    );
    Watched {
        resource: ar.clone(),
        api,
        store,
        flags,
    }
}

fn custom(o: &DynamicObject, ar: &ApiResource) -> CustomObject {
    CustomObject {
        api_version: ar.api_version.clone(),
        kind: ar.kind.clone(),
        namespace: o.namespace().unwrap_or_default(),
        name: o.name_any(),
        generation: o.metadata.generation,
        spec: o.data.get("spec").cloned().unwrap_or(Value::Null),
    }
}

fn pod_view(p: &Pod) -> PodView {
    let status = p.status.as_ref();
    PodView {
        name: p.name_any(),
        namespace: p.namespace().unwrap_or_default(),
        ip: status
            .and_then(|s| s.pod_ip.as_deref())
            .and_then(|ip| ip.parse().ok()),
        ready: status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")),
        terminating: p.metadata.deletion_timestamp.is_some(),
        labels: p.labels().clone(),
    }
}

/// The controller's watches and what it needs to write.
pub(crate) struct Controller {
    settings: KubeSettings,
    store: PolicyStore,
    validator: EppConfigValidator,
    pools: Watched,
    objectives: [Watched; 2],
    rewrites: [Watched; 2],
    pods: Store<Pod>,
    config_maps: Store<ConfigMap>,
    /// Pods and the ConfigMap.
    core_flags: [WatchFlags; 2],
    changed: Arc<Notify>,
    // Held so the watch tasks stop with the controller.
    _tasks: JoinSet<()>,
}

impl Controller {
    pub(crate) fn new(
        client: Client,
        settings: KubeSettings,
        store: PolicyStore,
        validator: EppConfigValidator,
    ) -> Controller {
        let ns = settings.namespace.clone();
        let changed = Arc::new(Notify::new());
        let mut tasks = JoinSet::new();
        let pools = reflect_dynamic(
            &mut tasks,
            &client,
            &ns,
            &resource(POOL_GROUP, "v1", "InferencePool", "inferencepools"),
            &changed,
        );
        let mut group = |g: &str, kind: &str, plural: &str| {
            reflect_dynamic(
                &mut tasks,
                &client,
                &ns,
                &resource(g, "v1alpha2", kind, plural),
                &changed,
            )
        };
        let objectives = [
            group(LLMD_GROUP, "InferenceObjective", "inferenceobjectives"),
            group(XK8S_GROUP, "InferenceObjective", "inferenceobjectives"),
        ];
        let rewrites = [
            group(
                LLMD_GROUP,
                "InferenceModelRewrite",
                "inferencemodelrewrites",
            ),
            group(
                XK8S_GROUP,
                "InferenceModelRewrite",
                "inferencemodelrewrites",
            ),
        ];
        let (pods, pod_writer) = reflector::store::<Pod>();
        let pod_flags = WatchFlags::default();
        reflect(
            &mut tasks,
            Api::<Pod>::namespaced(client.clone(), &ns),
            watcher::Config::default(),
            pod_writer,
            changed.clone(),
            pod_flags.clone(),
            "pods".into(),
        );
        let (config_maps, cm_writer) = reflector::store::<ConfigMap>();
        let cm_flags = WatchFlags::default();
        if let Some((name, _)) = &settings.config_map {
            reflect(
                &mut tasks,
                Api::<ConfigMap>::namespaced(client, &ns),
                watcher::Config::default().fields(&format!("metadata.name={name}")),
                cm_writer,
                changed.clone(),
                cm_flags.clone(),
                "configmaps".into(),
            );
        } else {
            cm_flags.settled.store(true, Ordering::Relaxed);
        }
        Controller {
            settings,
            store,
            validator,
            pools,
            objectives,
            rewrites,
            pods,
            config_maps,
            core_flags: [pod_flags, cm_flags],
            changed,
            _tasks: tasks,
        }
    }

    /// The objectives or rewrites in force: llm-d's group when it is served (llm-d reads
    /// only that one when both are installed), else the older x-k8s group.
    fn in_force(pair: &[Watched; 2]) -> &Watched {
        if pair[0].flags.installed.load(Ordering::Relaxed)
            || !pair[1].flags.installed.load(Ordering::Relaxed)
        {
            &pair[0]
        } else {
            &pair[1]
        }
    }

    fn view(&self) -> ClusterView {
        let list = |w: &Watched| {
            let mut v: Vec<CustomObject> = w
                .store
                .state()
                .iter()
                .map(|o| custom(o, &w.resource))
                .collect();
            v.sort_by(|a, b| a.name.cmp(&b.name));
            v
        };
        let config = self.settings.config_map.as_ref().map(|(name, key)| {
            let text = self
                .config_maps
                .state()
                .iter()
                .find(|c| c.name_any() == *name)
                .and_then(|c| c.data.as_ref())
                .and_then(|d| d.get(key).cloned());
            ConfigMapConfig {
                namespace: self.settings.namespace.clone(),
                name: name.clone(),
                key: key.clone(),
                text,
            }
        });
        ClusterView {
            pools: list(&self.pools),
            pods: self.pods.state().iter().map(|p| pod_view(p)).collect(),
            objectives: list(Self::in_force(&self.objectives)),
            rewrites: list(Self::in_force(&self.rewrites)),
            config,
        }
    }

    fn is_leader(&self) -> bool {
        self.store.raft().metrics().borrow().current_leader == Some(self.store.id())
    }

    fn settled(&self) -> bool {
        std::iter::once(&self.pools)
            .chain(&self.objectives)
            .chain(&self.rewrites)
            .all(|w| w.flags.settled())
            && self.core_flags.iter().all(WatchFlags::settled)
    }

    /// One reconcile: on the leader, once every watch has settled, the policy write and
    /// the status writes.
    async fn reconcile(&self) {
        if !self.is_leader() || !self.settled() {
            return;
        }
        let view = self.view();
        let d = desired(&view, &self.validator);
        if let Some(p) = &d.config_problem {
            tracing::warn!("{p}");
        }
        let ops = plan(&d, &self.store.policy());
        if !ops.is_empty() {
            let n = ops.len();
            tracing::info!(changes = n, "writing the cluster's changes to policy");
            match self.store.submit(PolicyRequest { ops }, Route::Local).await {
                Ok(a) => tracing::info!(
                    changes = n,
                    index = a.index,
                    "mirrored the cluster into policy"
                ),
                // Refused (a racing write, or leadership moved): the next reconcile
                // recomputes from what is then in force.
                Err(e) => {
                    tracing::info!(error = %e, "policy write from the cluster refused; will retry");
                    return;
                }
            }
        }
        for r in &d.reviews {
            if let Err(e) = self.write_status(r).await {
                tracing::warn!(object = %r.name, kind = %r.kind, error = %e, "status write failed");
            }
        }
    }

    fn api_for(&self, r: &Review) -> Option<&Api<DynamicObject>> {
        let all = std::iter::once(&self.pools)
            .chain(self.objectives.iter())
            .chain(self.rewrites.iter());
        for w in all {
            if w.resource.api_version == r.api_version && w.resource.kind == r.kind {
                return Some(&w.api);
            }
        }
        None
    }

    /// Writes the review's condition if the object's status does not say it already,
    /// re-reading and retrying on a conflict.
    async fn write_status(&self, r: &Review) -> Result<(), kube::Error> {
        let Some(api) = self.api_for(r) else {
            return Ok(());
        };
        for _ in 0..STATUS_ATTEMPTS {
            let mut obj = match api.get_status(&r.name).await {
                Ok(o) => o,
                Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
                Err(e) => return Err(e),
            };
            if obj.metadata.generation != r.generation {
                // The object changed since the verdict; the next reconcile judges it anew.
                return Ok(());
            }
            let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
            let Some(status) =
                updated_status(r, obj.data.get("status"), &self.settings.tier_name, &now)
            else {
                return Ok(());
            };
            obj.data["status"] = status;
            match api
                .replace_status(&r.name, &PostParams::default(), &obj)
                .await
            {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reconciles on every change (gathered for [`DEBOUNCE`]), on every leadership change
    /// and every [`RESYNC`], until dropped.
    pub(crate) async fn run(self) {
        let mut metrics = self.store.raft().metrics();
        let mut was_leader = false;
        loop {
            tokio::select! {
                () = self.changed.notified() => {
                    tokio::time::sleep(DEBOUNCE).await;
                }
                r = metrics.changed() => {
                    if r.is_err() {
                        return;
                    }
                    let leader = self.is_leader();
                    if leader == was_leader {
                        continue;
                    }
                    was_leader = leader;
                    if leader {
                        tracing::info!("policy leader: mirroring the Kubernetes objects");
                    }
                }
                () = tokio::time::sleep(RESYNC) => {}
            }
            self.reconcile().await;
        }
    }
}
