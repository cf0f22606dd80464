//! The pool task: the one owner of pool membership. It applies discovery results and
//! model lists, starts and stops scrapers, tells the scheduler when an endpoint leaves,
//! and publishes a new [`PoolView`] after each change.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use infermesh_gossip::PodId;

use crate::metrics::NodeMetrics;
use crate::policy::SharedPolicy;
use crate::pool::{EndpointSlot, PoolView, SharedPool};
use crate::pool_model::PoolSpec;
use crate::scrape::runtime::ScrapeRuntime;
use crate::scrape::{
    MetricsSource, ModelsFeed, ScrapeConfig, ScrapeReport, ScrapeSink, Scraping, spawn_scraper,
};

pub use crate::pool_model::PoolInput;

/// Mesh mode: scrape only the pods the ring assigns to this node, publish each scrape.
struct MeshScraping {
    mesh: Arc<infermesh_gossip::Mesh>,
    owned: HashSet<SocketAddr>,
    sink: ScrapeSink,
    // Handed to every slot, so the load sync publishes in-flight changes as they happen.
    in_flight_changed: Arc<tokio::sync::Notify>,
}

/// State owned by the pool task.
pub struct PoolTask {
    pool: SharedPool,
    policy: SharedPolicy,
    client: crate::scrape::ScrapeClient,
    scrape: ScrapeConfig,
    metrics: Arc<NodeMetrics>,
    // Scrapers read /v1/models only while the pool description lists no models.
    models: ModelsFeed,
    source: Arc<MetricsSource>,
    synced: watch::Sender<bool>,
    // Fields drop after `Drop::drop`, so the scrapers are aborted before their runtime stops.
    scrape_rt: ScrapeRuntime,
    // Every endpoint has a slot; only scraped ones have a scraper task.
    scrapers: HashMap<SocketAddr, (Arc<EndpointSlot>, Option<JoinHandle<()>>)>,
    pod_models: HashMap<SocketAddr, Vec<String>>,
    spec: PoolSpec,
    mesh: Option<MeshScraping>,
}

impl std::fmt::Debug for PoolTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolTask")
            .field("endpoints", &self.scrapers.len())
            .finish()
    }
}

impl PoolTask {
    /// Creates the task state; scrapers run on `scrape` (its runtime and HTTP client), and
    /// `tx` must be the sender of the channel passed to [`Self::run`].
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        pool: SharedPool,
        policy: SharedPolicy,
        (scrape_rt, client): (ScrapeRuntime, crate::scrape::ScrapeClient),
        scrape: ScrapeConfig,
        metrics: Arc<NodeMetrics>,
        tx: mpsc::Sender<PoolInput>,
        synced: watch::Sender<bool>,
    ) -> PoolTask {
        PoolTask {
            pool,
            policy,
            client,
            scrape,
            metrics,
            models: ModelsFeed::always(tx),
            source: Arc::new(MetricsSource::default()),
            synced,
            scrape_rt,
            scrapers: HashMap::new(),
            pod_models: HashMap::new(),
            spec: PoolSpec::default(),
            mesh: None,
        }
    }

    /// Reads pods' metrics from `source` (path, engine label, metric names per engine).
    pub fn with_metrics_source(mut self, source: MetricsSource) -> PoolTask {
        self.source = Arc::new(source);
        self
    }

    /// Mesh mode: scrape only the pods `mesh` assigns to this node (updated through
    /// [`PoolInput::Owned`]) and publish every scrape, and every failed one, on its load
    /// board. Every slot wakes `in_flight_changed` when its in-flight counts change (see
    /// [`crate::mesh::load::run`]).
    pub fn with_mesh(
        mut self,
        mesh: Arc<infermesh_gossip::Mesh>,
        in_flight_changed: Arc<tokio::sync::Notify>,
    ) -> PoolTask {
        // Weak: scrapers must not keep a stopped node's mesh alive.
        let publisher = Arc::downgrade(&mesh);
        let sink: ScrapeSink = Arc::new(move |slot, report| {
            let Some(mesh) = publisher.upgrade() else {
                return;
            };
            let pod = PodId::from(slot.address());
            match report {
                ScrapeReport::Up(m) => {
                    mesh.publish_scrape(&pod, crate::mesh::load::to_pod_metrics(m), m.scraped_at)
                }
                // Every failure, not just the first: the board ignores repeats, and a pod
                // this node just took over may still be up in an old owner's last word.
                ScrapeReport::Down(at) => mesh.publish_down(&pod, at),
            }
        });
        self.mesh = Some(MeshScraping {
            mesh,
            owned: HashSet::new(),
            sink,
            in_flight_changed,
        });
        self
    }

    fn scrapes(&self, addr: SocketAddr) -> bool {
        self.mesh.as_ref().is_none_or(|m| m.owned.contains(&addr))
    }

    fn spawn_scraper(&self, slot: Arc<EndpointSlot>) -> JoinHandle<()> {
        spawn_scraper(
            self.scrape_rt.handle(),
            slot,
            Scraping {
                client: self.client.clone(),
                cfg: self.scrape,
                models: self.models.clone(),
                metrics: self.metrics.clone(),
                source: self.source.clone(),
                sink: self.mesh.as_ref().map(|m| m.sink.clone()),
            },
        )
    }

    fn apply_owned(&mut self, owned: &[PodId]) {
        let Some(m) = self.mesh.as_mut() else {
            return;
        };
        m.owned = owned.iter().filter_map(PodId::addr).collect();
        let addrs: Vec<SocketAddr> = self.scrapers.keys().copied().collect();
        for addr in addrs {
            let want = self.scrapes(addr);
            let Some((slot, handle)) = self.scrapers.get(&addr) else {
                continue;
            };
            match (want, handle.is_some()) {
                (true, false) => {
                    let h = self.spawn_scraper(slot.clone());
                    tracing::debug!(endpoint = %addr, "now scraping (ring owner)");
                    if let Some(e) = self.scrapers.get_mut(&addr) {
                        e.1 = Some(h);
                    }
                }
                (false, true) => {
                    if let Some(h) = self.scrapers.get_mut(&addr).and_then(|e| e.1.take()) {
                        h.abort();
                    }
                    tracing::debug!(endpoint = %addr, "no longer scraping (another node owns it)");
                }
                _ => {}
            }
        }
    }

    /// Runs until the channel closes or `shutdown` fires; stops every scraper on exit.
    pub async fn run(
        mut self,
        mut rx: mpsc::Receiver<PoolInput>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                input = rx.recv() => match input {
                    Some(input) => self.handle_input(input),
                    None => break,
                },
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
        for (_, (_, handle)) in self.scrapers.drain() {
            if let Some(h) = handle {
                h.abort();
            }
        }
    }

    /// Applies one input and publishes the resulting view.
    pub fn handle_input(&mut self, input: PoolInput) {
        match input {
            PoolInput::Spec(spec) => self.apply_spec(spec),
            PoolInput::Models { addr, models } => {
                if !self.scrapers.contains_key(&addr) || self.pod_models.get(&addr) == Some(&models)
                {
                    return;
                }
                tracing::info!(endpoint = %addr, ?models, "endpoint serves models");
                self.pod_models.insert(addr, models);
            }
            PoolInput::Owned(owned) => self.apply_owned(&owned),
        }
        self.publish();
    }

    fn apply_spec(&mut self, spec: PoolSpec) {
        if let Some(docs) = &spec.rewrites {
            // The pool description owns the rewrites (an endpoints file): swap them in with
            // the scheduler unchanged; requests already scheduled keep theirs.
            let rewrites = crate::policy::rewrite::ModelRewrites::from_policy(
                docs.iter().enumerate().map(|(i, d)| (i as u64, d)),
            );
            let policy = self.policy.load().with_rewrites(Arc::new(rewrites));
            self.policy.store(Arc::new(policy));
        }
        self.models
            .wanted
            .store(spec.models.is_empty(), std::sync::atomic::Ordering::Relaxed);
        let wanted: HashMap<SocketAddr, &crate::discovery::EndpointSpec> =
            spec.endpoints.iter().map(|e| (e.address, e)).collect();
        // Drop endpoints that left, or whose labels changed (they get a fresh slot).
        let gone: Vec<SocketAddr> = self
            .scrapers
            .iter()
            .filter(|(addr, (slot, _))| wanted.get(addr).is_none_or(|e| **e != slot.spec))
            .map(|(addr, _)| *addr)
            .collect();
        let policy = self.policy.load();
        for addr in gone {
            if let Some((_, Some(handle))) = self.scrapers.remove(&addr) {
                handle.abort();
            }
            self.pod_models.remove(&addr);
            if !wanted.contains_key(&addr) {
                policy.scheduler.remove_endpoint(addr);
                tracing::info!(endpoint = %addr, "endpoint removed from the pool");
            }
        }
        for e in &spec.endpoints {
            if self.scrapers.contains_key(&e.address) {
                continue;
            }
            let mut slot = EndpointSlot::new(e.clone());
            if let Some(m) = &self.mesh {
                slot = slot.notifying(m.in_flight_changed.clone());
            }
            let slot = Arc::new(slot);
            let handle = self
                .scrapes(e.address)
                .then(|| self.spawn_scraper(slot.clone()));
            tracing::info!(endpoint = %e.address, pod = %e.pod, "endpoint added to the pool");
            self.scrapers.insert(e.address, (slot, handle));
        }
        if let Some(m) = &self.mesh {
            m.mesh.set_pods(
                spec.endpoints
                    .iter()
                    .map(|e| PodId::from(e.address))
                    .collect(),
            );
        }
        self.spec = spec;
        self.synced.send_replace(true);
    }

    fn publish(&self) {
        let slots: Vec<Arc<EndpointSlot>> = self
            .spec
            .endpoints
            .iter()
            .filter_map(|e| self.scrapers.get(&e.address).map(|(s, _)| s.clone()))
            .collect();
        let models: HashSet<String> = if self.spec.models.is_empty() {
            self.pod_models.values().flatten().cloned().collect()
        } else {
            self.spec.models.iter().cloned().collect()
        };
        let view = PoolView::new(
            self.spec.name.clone(),
            slots,
            models,
            self.spec.objectives.clone(),
        );
        self.pool.store(Arc::new(view));
    }

    /// Addresses of the endpoints in the pool (for tests and diagnostics).
    pub fn endpoints(&self) -> BTreeSet<SocketAddr> {
        self.scrapers.keys().copied().collect()
    }
}

impl Drop for PoolTask {
    // Dropping a JoinHandle does not stop its task: stop the scrapers even when the pool
    // task is aborted rather than shut down.
    fn drop(&mut self) {
        for (_, (_, handle)) in self.scrapers.drain() {
            if let Some(h) = handle {
                h.abort();
            }
        }
    }
}
