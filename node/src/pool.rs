//! The pool as request handlers see it: an immutable [`PoolView`] swapped atomically by
//! the pool task (the only writer of membership), with per-endpoint slots that the
//! endpoint's scraper and the request path update without locks.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use infermesh_scheduler::{Endpoint, InFlight, Metrics, Role};
use tokio::sync::Notify;

use crate::pool_model::EndpointSpec;

/// One endpoint's live state: written by its scraper (metrics, up) and the request path
/// (in-flight counts), read by every scheduling cycle.
#[derive(Debug)]
pub struct EndpointSlot {
    /// What discovery said about the endpoint.
    pub spec: EndpointSpec,
    role: Role,
    // The labels as the scheduler sees them, shared by every request's candidate.
    labels: Arc<BTreeMap<String, String>>,
    metrics: ArcSwapOption<Metrics>,
    up: AtomicBool,
    in_flight_requests: AtomicU32,
    in_flight_tokens: AtomicU64,
    // Of `in_flight_requests`, those whose first response byte has not arrived.
    in_flight_prefilling: AtomicU32,
    // Other mesh nodes' in-flight work here (from the load board); zero without a mesh.
    remote_requests: AtomicU32,
    remote_tokens: AtomicU64,
    remote_prefilling: AtomicU32,
    // Woken on every in-flight change, so the mesh publishes it at once instead of on a
    // poll: other nodes pick pods from these counts (`None` without a mesh).
    changed: Option<Arc<Notify>>,
}

impl EndpointSlot {
    /// A slot for a newly discovered endpoint: down until its first scrape succeeds.
    pub fn new(spec: EndpointSpec) -> EndpointSlot {
        EndpointSlot {
            role: Role::from_labels(&spec.labels),
            labels: Arc::new(spec.labels.clone()),
            spec,
            metrics: ArcSwapOption::empty(),
            up: AtomicBool::new(false),
            in_flight_requests: AtomicU32::new(0),
            in_flight_tokens: AtomicU64::new(0),
            in_flight_prefilling: AtomicU32::new(0),
            remote_requests: AtomicU32::new(0),
            remote_tokens: AtomicU64::new(0),
            remote_prefilling: AtomicU32::new(0),
            changed: None,
        }
    }

    /// This slot wakes `changed` whenever its in-flight counts change.
    pub fn notifying(mut self, changed: Arc<Notify>) -> EndpointSlot {
        self.changed = Some(changed);
        self
    }

    fn signal(&self) {
        if let Some(n) = &self.changed {
            n.notify_one();
        }
    }

    /// The endpoint's address.
    pub fn address(&self) -> SocketAddr {
        self.spec.address
    }

    /// Records a successful scrape: the endpoint is up with these metrics.
    pub fn record_scrape(&self, metrics: Metrics) {
        self.metrics.store(Some(Arc::new(metrics)));
        self.up.store(true, Ordering::Release);
    }

    /// Marks the endpoint unreachable (a failed scrape or connect) until the next good scrape.
    pub fn mark_down(&self) {
        self.up.store(false, Ordering::Release);
    }

    /// Whether the last scrape succeeded.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// The last successful scrape.
    pub fn metrics(&self) -> Option<Arc<Metrics>> {
        self.metrics.load_full()
    }

    /// Whether the endpoint may be scheduled: up, with metrics no older than `staleness`.
    pub fn is_fresh(&self, now: Instant, staleness: Duration) -> bool {
        self.is_up()
            && self
                .metrics
                .load()
                .as_ref()
                .is_some_and(|m| now.saturating_duration_since(m.scraped_at) <= staleness)
    }

    /// Current in-flight load on this endpoint from this node.
    pub fn in_flight(&self) -> InFlight {
        InFlight {
            requests: self.in_flight_requests.load(Ordering::Relaxed),
            tokens: self.in_flight_tokens.load(Ordering::Relaxed),
            prefilling: self.in_flight_prefilling.load(Ordering::Relaxed),
        }
    }

    /// Sets the in-flight load other mesh nodes report on this endpoint.
    pub fn set_remote_in_flight(&self, load: InFlight) {
        self.remote_requests.store(load.requests, Ordering::Relaxed);
        self.remote_tokens.store(load.tokens, Ordering::Relaxed);
        self.remote_prefilling
            .store(load.prefilling, Ordering::Relaxed);
    }

    /// Fleet-wide in-flight load: this node's plus what other mesh nodes report.
    pub fn fleet_in_flight(&self) -> InFlight {
        let mine = self.in_flight();
        InFlight {
            requests: mine
                .requests
                .saturating_add(self.remote_requests.load(Ordering::Relaxed)),
            tokens: mine
                .tokens
                .saturating_add(self.remote_tokens.load(Ordering::Relaxed)),
            prefilling: mine
                .prefilling
                .saturating_add(self.remote_prefilling.load(Ordering::Relaxed)),
        }
    }

    /// Counts a request dispatched to this endpoint, prefilling until
    /// [`Self::first_byte`] (undone by [`Self::release`]).
    pub fn acquire(&self, tokens: u64) {
        self.in_flight_requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight_tokens.fetch_add(tokens, Ordering::Relaxed);
        self.in_flight_prefilling.fetch_add(1, Ordering::Relaxed);
        self.signal();
    }

    /// One acquired request's response started: it no longer counts as prefilling.
    /// Called at most once per acquire, before its release.
    pub fn first_byte(&self) {
        self.in_flight_prefilling.fetch_sub(1, Ordering::Relaxed);
        self.signal();
    }

    /// Undoes one [`Self::acquire`]; `prefilling` when [`Self::first_byte`] was not called.
    pub fn release(&self, tokens: u64, prefilling: bool) {
        self.in_flight_requests.fetch_sub(1, Ordering::Relaxed);
        self.in_flight_tokens.fetch_sub(tokens, Ordering::Relaxed);
        if prefilling {
            self.in_flight_prefilling.fetch_sub(1, Ordering::Relaxed);
        }
        self.signal();
    }

    /// The scheduler's view of this endpoint.
    pub fn to_endpoint(&self) -> Endpoint {
        Endpoint {
            address: self.spec.address,
            labels: Arc::clone(&self.labels),
            role: self.role.clone(),
            metrics: self.metrics.load().as_deref().cloned(),
            in_flight: self.fleet_in_flight(),
        }
    }
}

/// An immutable snapshot of the pool, replaced whole when membership or models change.
#[derive(Debug, Default)]
pub struct PoolView {
    /// Pool name.
    pub name: String,
    /// Every discovered endpoint (fresh or not), in discovery order.
    pub slots: Vec<Arc<EndpointSlot>>,
    /// Models the pool serves (from the file or the pods' /v1/models); empty = unknown.
    pub models: HashSet<String>,
    /// InferenceObjective name → priority.
    pub objectives: HashMap<String, i32>,
    by_addr: HashMap<SocketAddr, usize>,
}

impl PoolView {
    /// Builds a view; `slots` must have unique addresses.
    pub fn new(
        name: String,
        slots: Vec<Arc<EndpointSlot>>,
        models: HashSet<String>,
        objectives: HashMap<String, i32>,
    ) -> PoolView {
        let by_addr = slots
            .iter()
            .enumerate()
            .map(|(i, s)| (s.address(), i))
            .collect();
        PoolView {
            name,
            slots,
            models,
            objectives,
            by_addr,
        }
    }

    /// The slot of an endpoint, if it is in the pool.
    pub fn slot(&self, addr: SocketAddr) -> Option<&Arc<EndpointSlot>> {
        self.by_addr.get(&addr).map(|&i| &self.slots[i])
    }

    /// Whether the pool is known to serve `model` (true while no model list is known).
    pub fn serves(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.contains(model)
    }

    /// The endpoints a request may be scheduled on: fresh, and within `subset` when given,
    /// minus `exclude` (endpoints that already failed for this request).
    pub fn candidates(
        &self,
        now: Instant,
        staleness: Duration,
        subset: Option<&BTreeSet<SocketAddr>>,
        exclude: &[SocketAddr],
    ) -> Vec<Endpoint> {
        self.slots
            .iter()
            .filter(|s| subset.is_none_or(|set| set.contains(&s.address())))
            .filter(|s| !exclude.contains(&s.address()))
            .filter(|s| s.is_fresh(now, staleness))
            .map(|s| s.to_endpoint())
            .collect()
    }
}

/// The shared handle to the current pool view.
pub type SharedPool = Arc<ArcSwap<PoolView>>;
