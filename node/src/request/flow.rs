//! The driver of flow control (llm-d's `flowControl` feature gate): one owner task holds
//! the sans-IO [`FlowController`] and request tasks wait on it after phase one
//! (`prepare`) and before the owner lookup and scheduling.
//!
//! ```text
//!  request task ── Enqueue{id, request, reply} ──▶ owner task ── handle_enqueue
//!       │  (drop: Cancel(id)) ──────────────────▶     │         handle_cancel
//!       │                                             │ every refresh: saturation of the
//!       │                                             │   pool (fleet-wide load) → handle_pool
//!       ◀── Dispatched(waited) | DropReason ──────────┘ poll_decision until None
//! ```
//!
//! The owner follows the policy: the `flowControl` section of the EndpointPickerConfig in
//! force ([`Policy::flow`](crate::policy::Policy::flow)) can change with every policy swap.
//! The owner compares it (one pointer load) at every wake-up and on every enqueue, and the
//! swap paths (`NodeControl`, `App::set_scheduler_config`) wake it with
//! [`FlowGate::policy_changed`]. A changed section is applied with
//! [`FlowController::handle_reconfigure`] (queued requests stay); a gate turned off
//! releases every queued request at once ([`FlowController::handle_release_all`]); a gate
//! turned on takes requests from the next one on. While the gate is off, request tasks
//! never send anything here (they read the same policy), so the off path costs nothing.
//!
//! A request dispatched from a `program-aware-fairness` band carries a [`UsageReport`];
//! the request path records the response's token usage on it, and dropping it (however
//! the request ended) sends the usage to the owner, which adds it to the program's
//! attained service ([`FlowController::handle_served`]).
//!
//! The owner sleeps until the controller's next expiry, the next input, or — while
//! something is queued — the next load refresh (the scrape interval, which is also the
//! load board's cadence), when it measures saturation again with the same detector
//! admission uses (`Scheduler::saturation` over the pool's candidates).
//!
//! Between refreshes, a request this queue dispatched also gives its room back as it
//! goes: its prefill room at its first response byte (for a detector that counts
//! prefilling requests, `maxPrefillConcurrency`; the tier queue's owner learns it from the
//! origin's `Prefilled` message), the rest when it ends. Without that, a pod that finished
//! prefilling looked busy until the next refresh, up to a scrape interval later.
//!
//! A dispatch also waits for the pick of the one before it, and carries the pods this
//! queue's requests are prefilling on (`super::picks`): the queue decides when, the node
//! holding the request picks where, and without the fence two requests let through
//! together could be picked on different nodes onto the same pod.
//!
//! # The mesh-wide bound
//!
//! With a sharing mesh the tier normally has one queue at its owner
//! (`super::flow_mesh`), whose owner divides by nothing (its live-node count is 1 there). What follows is the bound of per-node queues (`--flow-control-per-node`, and
//! the fallback while the owner is unreachable).
//!
//! Every node reads the same fleet-wide load (its own scrapes plus the load board), so
//! every node computes about the same saturation `s` and gates on the same signal. The
//! measured saturation only moves when a scrape or a board update lands, so between two
//! refreshes the driver raises its own estimate after each dispatch by `step × N`: `step`
//! is what one more request adds to the detector's saturation (measured by adding one
//! request to every endpoint and dividing by their number; at least `1/(16 × endpoints)`
//! for a detector that does not move with one request, e.g. KV-bound utilization), and
//! `N` is the number of live mesh nodes, each assumed to dispatch as much as this one.
//! So with a fleet budget `B = (1 − s) / step` requests per refresh, each node dispatches
//! at most `ceil(B / N)` per refresh, and the fleet at most `N × ceil(B / N) < B + N`:
//! the overshoot past the set point is below one request per node per refresh. When a
//! node is lost, the survivors still divide by the old `N` until membership drops it
//! (SWIM, about a second): the fleet under-dispatches by the lost node's share for that
//! long, never over; requests queued on the lost node are lost with their connections
//! (clients retry through Envoy onto a live node).
//!
//! The channel is tokio's unbounded `mpsc`, not crossbeam: the owner is an async task that
//! must wake on an input *or* a timer, which `select!` over `recv()` gives directly (a
//! crossbeam receiver would block a runtime thread or need a second wake-up signal), and
//! the sender is lock-free for many producers and callable from `Drop` (a `Cancel` must
//! not await). It is unbounded because each request task has at most one message in the
//! channel at a time, so the controller's own capacity already bounds it.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use infermesh_scheduler::Endpoint;
use infermesh_scheduler::flow::{
    Decision, DropReason, FlowConfig, FlowController, FlowRequest, InvalidFlowConfig,
    Outcome as FlowOutcome, PoolStatus, Ticket as FlowTicket,
};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use super::picks::{Claims, PickLedger};
use crate::metrics::NodeMetrics;
use crate::policy::SharedPolicy;
use crate::pool::SharedPool;

/// Header with the request's time-to-first-token SLO in milliseconds.
pub const SLO_TTFT_HEADER: &str = "x-llm-d-slo-ttft-ms";
/// The deprecated alias of [`SLO_TTFT_HEADER`].
pub const SLO_TTFT_HEADER_ALIAS: &str = "x-slo-ttft-ms";

/// The smallest per-request saturation step, per endpoint (see the module doc).
const MIN_STEP_PER_ENDPOINT: f64 = 1.0 / 16.0;

/// Counts the live mesh nodes (1 without a mesh).
pub type LiveNodes = Arc<dyn Fn() -> usize + Send + Sync>;

/// How the owner task samples the pool.
#[derive(Debug, Clone, Copy)]
pub struct FlowDriverConfig {
    /// How often saturation is measured again while requests wait (the scrape interval).
    pub refresh: Duration,
    /// Metrics older than this take an endpoint out of the candidates (as in `prepare`).
    pub staleness: Duration,
    /// Longest a dispatch waits for the pick of the one before it (see `picks`; zero: no
    /// fence).
    pub pick_fence: Duration,
    /// How long a prefill's end rides along with later dispatches (see
    /// [`PickLedger::with_freed_hint`]; zero: not at all). The tier's one queue only.
    pub freed_hint: Duration,
}

/// What a request asks flow control for.
#[derive(Debug, Clone)]
pub struct FlowArrival {
    /// The objective's priority.
    pub priority: i32,
    /// The flow key.
    pub fairness_id: String,
    /// The body length.
    pub bytes: u64,
    /// When the node received the request.
    pub received: Instant,
    /// `x-llm-d-slo-ttft-ms`.
    pub slo_ttft: Option<Duration>,
}

/// A dispatched request's hold on pool capacity: tracked until dropped (the request ended
/// however it ended); a sheddable one may be revoked.
#[derive(Debug)]
pub enum Lease {
    /// Dispatched by this node's queue, with in-flight eviction on.
    Local(LocalLease),
    /// Dispatched by the tier's queue on another node (always held, so the owner learns
    /// when the request ends; see `flow_mesh`).
    Remote(Box<dyn RemoteHold>),
}

/// A hold on another node's queue: dropping it tells that node the request ended.
pub trait RemoteHold: Send + Sync + std::fmt::Debug {
    /// Resolves when the owner revokes the request; `None` when it cannot be revoked.
    fn revoked(&self) -> Option<WaitForCancellationFutureOwned>;
    /// The response's token usage, sent with the end.
    fn record_usage(&mut self, input: u64, output: u64);
    /// The response's first byte arrived: the owner's prefill room is free (sent once).
    fn prefilled(&mut self);
    /// The request was scheduled onto `pod` (sent once): the owner's next dispatch may go.
    fn picked(&mut self, pod: SocketAddr);
}

impl Lease {
    /// Resolves when flow control revokes the lease (the request must end with 429
    /// `evicted`); `None` for a lease that can never be revoked.
    pub fn revoked(&self) -> Option<WaitForCancellationFutureOwned> {
        match self {
            Lease::Local(l) => l.revoke.as_ref().map(|t| t.clone().cancelled_owned()),
            Lease::Remote(r) => r.revoked(),
        }
    }

    /// The response's first byte arrived: a remote owner gets its prefill room back (a
    /// local request's [`Grant`] tells this node's queue).
    pub fn prefilled(&mut self) {
        if let Lease::Remote(r) = self {
            r.prefilled();
        }
    }

    /// The request was scheduled onto `pod`: a remote owner lets its next request through
    /// (a local request's [`Grant`] tells this node's queue).
    pub fn picked(&mut self, pod: SocketAddr) {
        if let Lease::Remote(r) = self {
            r.picked(pod);
        }
    }

    /// The response's token usage, sent to a remote owner with the end of the lease (for
    /// `program-aware-fairness`; a local request reports through its [`UsageReport`]).
    pub fn record_usage(&mut self, input: u64, output: u64) {
        if let Lease::Remote(r) = self {
            r.record_usage(input, output);
        }
    }
}

/// A lease of this node's queue.
pub struct LocalLease {
    tx: mpsc::UnboundedSender<Input>,
    ticket: FlowTicket,
    revoke: Option<CancellationToken>,
}

impl std::fmt::Debug for LocalLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalLease")
            .field("ticket", &self.ticket)
            .field("revocable", &self.revoke.is_some())
            .finish()
    }
}

impl Drop for LocalLease {
    fn drop(&mut self) {
        let _ = self.tx.send(Input::LeaseEnded(self.ticket));
    }
}

/// A dispatched request's first response byte arrived: tells whichever queue let it
/// through (through its grant here, its lease's owner elsewhere) that its prefill is done.
pub fn prefilled(grant: &mut Option<Grant>, lease: &mut Option<Lease>) {
    if let Some(g) = grant {
        g.prefilled();
    }
    if let Some(l) = lease {
        l.prefilled();
    }
}

/// A dispatched request was scheduled onto `pod`: tells whichever queue let it through,
/// so that queue lets its next request through and counts the pod as prefilling.
pub fn picked(grant: &mut Option<Grant>, lease: &mut Option<Lease>, pod: SocketAddr) {
    if let Some(g) = grant {
        g.picked(pod);
    }
    if let Some(l) = lease {
        l.picked(pod);
    }
}

/// A request this node's queue dispatched holds room until it ends: dropping the grant
/// (the request finished, failed or was never scheduled) gives the room back at once, so
/// every dispatch is released exactly once.
pub struct Grant {
    tx: mpsc::UnboundedSender<Input>,
    /// No response byte yet: the endpoint still prefills the request.
    prefilling: bool,
    /// The pod it was scheduled onto, once reported.
    pod: Option<SocketAddr>,
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Grant")
    }
}

impl Grant {
    /// The request's first response byte arrived: its endpoint is done prefilling it,
    /// which frees room for a detector that counts prefilling requests
    /// (`maxPrefillConcurrency`) before the next refresh would show it. Idempotent.
    pub fn prefilled(&mut self) {
        if std::mem::take(&mut self.prefilling) {
            let _ = self.tx.send(Input::Prefilled { pod: self.pod });
        }
    }

    /// The request was scheduled onto `pod`; only the first pick counts (a retry's
    /// reschedule is the same dispatch).
    pub fn picked(&mut self, pod: SocketAddr) {
        if self.pod.is_none() {
            self.pod = Some(pod);
            let _ = self.tx.send(Input::Picked(pod));
        }
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        let _ = self.tx.send(Input::Released {
            prefilling: self.prefilling,
            pod: self.pod,
        });
    }
}

/// A request flow control let through.
#[derive(Debug)]
pub struct Dispatched {
    /// How long it waited.
    pub waited: Duration,
    /// Its lease, when in-flight eviction is on.
    pub lease: Option<Lease>,
    /// Set when it left a `program-aware-fairness` band: the request's token usage goes
    /// to its program's attained service when this is dropped.
    pub usage: Option<UsageReport>,
    /// The room it holds in this node's queue (`None`: dispatched elsewhere, or passed
    /// through a gate turned off).
    pub grant: Option<Grant>,
    /// Requests the queue let through before, by the pod each was scheduled onto, while
    /// that pod prefills them, and the prefills that just ended: fresher than the load
    /// board, so the pick can steer clear of busy pods and take freed ones.
    pub claims: Claims,
}

impl Dispatched {
    /// A request the tier's queue on another node let through.
    pub fn remote(waited: Duration, lease: Box<dyn RemoteHold>, claims: Claims) -> Dispatched {
        Dispatched {
            waited,
            lease: Some(Lease::Remote(lease)),
            usage: None,
            grant: None,
            claims,
        }
    }

    /// Resolves when its lease is revoked; `None` when it cannot be.
    pub fn revoked(&self) -> Option<WaitForCancellationFutureOwned> {
        self.lease.as_ref()?.revoked()
    }

    /// The response's first byte arrived: the queue that dispatched it (this node's, or
    /// the owner's on another node) gets its prefill room back at once.
    pub fn prefilled(&mut self) {
        prefilled(&mut self.grant, &mut self.lease);
    }

    /// The request was scheduled onto `pod` (reported by its origin to the queue that
    /// holds it here).
    pub fn picked(&mut self, pod: SocketAddr) {
        picked(&mut self.grant, &mut self.lease, pod);
    }

    /// Records the response's token usage for its program's attained service.
    pub fn record_usage(&mut self, input: u64, output: u64) {
        if let Some(u) = &mut self.usage {
            u.record(input, output);
        }
    }
}

/// Reports a request's token usage to flow control when dropped (however the request
/// ended: a request that fails or is cancelled reports what was recorded, 0 by default),
/// so every dispatch from a `program-aware-fairness` band is reported exactly once.
pub struct UsageReport {
    tx: mpsc::UnboundedSender<Input>,
    ticket: FlowTicket,
    input: u64,
    output: u64,
}

impl std::fmt::Debug for UsageReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageReport")
            .field("ticket", &self.ticket)
            .field("input", &self.input)
            .field("output", &self.output)
            .finish()
    }
}

impl UsageReport {
    /// Records the response's usage (prompt and completion tokens), sent on drop.
    pub fn record(&mut self, input: u64, output: u64) {
        self.input = input;
        self.output = output;
    }
}

impl Drop for UsageReport {
    fn drop(&mut self) {
        let _ = self.tx.send(Input::Served {
            ticket: self.ticket,
            input: self.input,
            output: self.output,
        });
    }
}

type Reply = oneshot::Sender<Result<Dispatched, DropReason>>;

enum Input {
    Enqueue {
        id: u64,
        arrival: FlowArrival,
        reply: Reply,
    },
    Cancel(u64),
    /// A request this node dispatched ended (its [`Grant`] was dropped): one request's
    /// worth of room is free now, before the next refresh shows it (`prefilling`: it
    /// ended before its first response byte, so its prefill room is free too).
    Released {
        prefilling: bool,
        pod: Option<SocketAddr>,
    },
    /// A request this node dispatched got its first response byte: its prefill room is
    /// free now, before the next refresh shows it.
    Prefilled {
        pod: Option<SocketAddr>,
    },
    /// A request this node dispatched was scheduled onto this pod.
    Picked(SocketAddr),
    /// A lease was dropped: the request ended (or never started).
    LeaseEnded(FlowTicket),
    /// A request dispatched from a program-aware band ended with this token usage.
    Served {
        ticket: FlowTicket,
        input: u64,
        output: u64,
    },
    /// The policy was swapped: flow control may have been turned on, off or changed.
    PolicyChanged,
}

/// The request side's handle to the owner task; cheap to clone.
#[derive(Debug, Clone)]
pub struct FlowGate {
    tx: mpsc::UnboundedSender<Input>,
    next_id: Arc<AtomicU64>,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Input::Enqueue { id, .. } => write!(f, "Enqueue({id})"),
            Input::Cancel(id) => write!(f, "Cancel({id})"),
            Input::Released { prefilling, pod } => f
                .debug_struct("Released")
                .field("prefilling", prefilling)
                .field("pod", pod)
                .finish(),
            Input::Prefilled { pod } => write!(f, "Prefilled({pod:?})"),
            Input::Picked(pod) => write!(f, "Picked({pod})"),
            Input::LeaseEnded(t) => write!(f, "LeaseEnded({t:?})"),
            Input::PolicyChanged => f.write_str("PolicyChanged"),
            Input::Served { ticket, .. } => write!(f, "Served({ticket:?})"),
        }
    }
}

/// Sends `Cancel` when a wait is dropped before its answer arrived (the client went away).
struct CancelOnDrop<'a> {
    gate: &'a FlowGate,
    id: u64,
    answered: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if !self.answered {
            let _ = self.gate.tx.send(Input::Cancel(self.id));
        }
    }
}

impl FlowGate {
    /// Waits for the request's turn in this node's queue: `Ok(waited)` when dispatched,
    /// else why it was dropped. Dropping the future frees the request's place at once.
    pub async fn wait(&self, arrival: FlowArrival) -> Result<Dispatched, DropReason> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Input::Enqueue { id, arrival, reply }).is_err() {
            return Err(DropReason::ShuttingDown);
        }
        let mut guard = CancelOnDrop {
            gate: self,
            id,
            answered: false,
        };
        let answer = rx.await;
        guard.answered = true;
        answer.unwrap_or(Err(DropReason::ShuttingDown))
    }

    /// Wakes the owner after a policy swap, so it applies the new flow control now (a gate
    /// turned off releases its queue at once).
    pub fn policy_changed(&self) {
        let _ = self.tx.send(Input::PolicyChanged);
    }

    /// Starts the owner task (on the current tokio runtime) until `shutdown`. It follows
    /// `policy`'s flow control from then on; it fails only when the flow control in force
    /// now is invalid.
    pub fn spawn(
        driver: FlowDriverConfig,
        pool: SharedPool,
        policy: SharedPolicy,
        metrics: Arc<NodeMetrics>,
        live_nodes: LiveNodes,
        shutdown: watch::Receiver<bool>,
    ) -> Result<(FlowGate, tokio::task::JoinHandle<()>), InvalidFlowConfig> {
        let applied = policy.load().flow.clone();
        // While off, the controller holds llm-d's defaults; turning the gate on
        // reconfigures it, so tickets stay unique for the task's lifetime.
        let cfg = applied.as_deref().cloned().unwrap_or_default();
        let fc = FlowController::new(cfg, Instant::now())?;
        metrics.set_flow_enabled(applied.is_some());
        let (tx, rx) = mpsc::unbounded_channel();
        let owner = Owner {
            fc,
            seen: applied.clone(),
            applied,
            driver,
            pool,
            policy,
            metrics,
            live_nodes,
            waiting: HashMap::new(),
            by_ticket: HashMap::new(),
            revokers: HashMap::new(),
            tx: tx.clone(),
            estimate: SaturationEstimate::default(),
            next_refresh: Instant::now(),
            picks: PickLedger::with_freed_hint(driver.freed_hint),
            fenced: VecDeque::new(),
            lifted_counted: 0,
        };
        let task = tokio::spawn(owner.run(rx, shutdown));
        Ok((
            FlowGate {
                tx,
                next_id: Arc::new(AtomicU64::new(0)),
            },
            task,
        ))
    }
}

/// The saturation the controller is given between two refreshes: the measured value,
/// raised after each of this node's dispatches by `step × live nodes` and lowered for each
/// of this node's requests that finished or got its first response byte since (its room
/// is really free: reusing it one for one cannot push the fleet past the bound), and never
/// below what this queue's running requests add.
///
/// A request adds `step` while its endpoint prefills it and `step_requests` after: the
/// two differ only for a detector that counts prefilling requests
/// (`maxPrefillConcurrency`), where a request that is decoding holds a request slot but no
/// prefill slot.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SaturationEstimate {
    /// Saturation measured at the last refresh.
    pub measured: f64,
    /// Saturation one more request adds while it prefills.
    pub step: f64,
    /// Saturation one more request adds once its response has started.
    pub step_requests: f64,
    /// Live mesh nodes at the last refresh (at least 1).
    pub nodes: usize,
    /// This node's dispatches since the last refresh.
    pub dispatched: u32,
    /// This node's requests that finished since the last refresh.
    pub released: u32,
    /// This node's requests that stopped prefilling since the last refresh (first
    /// response byte, or ended before one).
    pub prefill_freed: u32,
    /// Whether the pool had endpoints at the last refresh.
    pub has_endpoints: bool,
    /// Requests this queue dispatched that have not ended (carried across refreshes).
    pub outstanding: u32,
    /// Of those, the ones with no response byte yet (carried across refreshes).
    pub prefilling: u32,
}

impl SaturationEstimate {
    /// A fresh estimate at a refresh, for a detector whose steps are `step` while a
    /// request prefills and `step_requests` after.
    pub fn refresh(
        measured: f64,
        (step, step_requests): (f64, f64),
        nodes: usize,
        has_endpoints: bool,
    ) -> Self {
        SaturationEstimate {
            measured,
            step,
            step_requests: step_requests.min(step),
            nodes: nodes.max(1),
            dispatched: 0,
            released: 0,
            prefill_freed: 0,
            has_endpoints,
            outstanding: 0,
            prefilling: 0,
        }
    }

    /// One of this queue's requests stopped prefilling (first byte, or ended before it).
    fn prefill_done(&mut self) {
        self.prefill_freed = self.prefill_freed.saturating_add(1);
        self.prefilling = self.prefilling.saturating_sub(1);
    }

    /// What to give [`FlowController::handle_pool`].
    pub fn status(&self) -> PoolStatus {
        if !self.has_endpoints {
            return PoolStatus::empty();
        }
        let prefill = self.step - self.step_requests;
        let raised = self.step * f64::from(self.dispatched) * self.nodes as f64;
        let freed =
            self.step_requests * f64::from(self.released) + prefill * f64::from(self.prefill_freed);
        // What this queue knows it has running is a floor the measurement may not show
        // yet: other nodes' in-flight counts reach it through the load board, a period
        // late, and a refresh must not forget the dispatches made meanwhile.
        let known =
            self.step_requests * f64::from(self.outstanding) + prefill * f64::from(self.prefilling);
        PoolStatus::serving((self.measured + raised - freed).max(known).max(0.0))
    }
}

/// Saturation of `candidates` and the steps one more request adds (see the module doc):
/// while it prefills, and once its response has started.
fn measure(
    saturation: impl Fn(&[Endpoint]) -> f64,
    candidates: &mut [Endpoint],
) -> (f64, (f64, f64)) {
    let base = saturation(candidates);
    if candidates.is_empty() {
        return (base, (1.0, 1.0));
    }
    let n = candidates.len() as f64;
    let step_of = |s: f64| ((s - base) / n).max(MIN_STEP_PER_ENDPOINT / n);
    for e in candidates.iter_mut() {
        e.in_flight.requests = e.in_flight.requests.saturating_add(1);
        if let Some(m) = &mut e.metrics {
            m.waiting_queue = m.waiting_queue.saturating_add(1);
        }
    }
    let step_requests = step_of(saturation(candidates));
    // A request just dispatched is in flight and has not answered yet: a detector that
    // counts prefilling requests (`maxPrefillConcurrency`) must see it too, or the step is
    // that of the request ratio alone and one refresh's budget overfills the pods.
    for e in candidates.iter_mut() {
        e.in_flight.prefilling = e.in_flight.prefilling.saturating_add(1);
    }
    let step = step_of(saturation(candidates)).max(step_requests);
    (base, (step, step_requests))
}

struct Owner {
    fc: FlowController,
    /// The policy's flow control as last looked at (compared by pointer: cheap per wake-up).
    seen: Option<Arc<FlowConfig>>,
    /// The flow control in force (`None`: the gate is off and requests pass through).
    applied: Option<Arc<FlowConfig>>,
    driver: FlowDriverConfig,
    pool: SharedPool,
    policy: SharedPolicy,
    metrics: Arc<NodeMetrics>,
    live_nodes: LiveNodes,
    // request id → (ticket, reply); ticket → request id.
    waiting: HashMap<u64, (FlowTicket, Reply)>,
    by_ticket: HashMap<FlowTicket, u64>,
    /// Revocable leases (sheddable, eviction on) by ticket.
    revokers: HashMap<FlowTicket, CancellationToken>,
    /// For the leases this task hands out.
    tx: mpsc::UnboundedSender<Input>,
    estimate: SaturationEstimate,
    next_refresh: Instant,
    /// Where dispatched requests were scheduled, and the fence between two dispatches.
    picks: PickLedger,
    /// Dispatches decided while the fence held, delivered in order as it opens.
    fenced: VecDeque<Decision>,
    /// The controller's lifted dispatches already counted in the metric.
    lifted_counted: u64,
}

impl Owner {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Input>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let now = Instant::now();
            self.follow_policy(now);
            if self.applied.is_some() {
                if now >= self.next_refresh {
                    self.refresh(now);
                }
                self.drain(now);
                self.metrics
                    .flow
                    .dispatch_cycle
                    .observe(now.elapsed().as_secs_f64());
            }
            self.publish_gauges();
            let mut wake = self.fc.next_deadline();
            if !self.fc.is_empty() {
                wake = Some(wake.map_or(self.next_refresh, |w| w.min(self.next_refresh)));
            }
            if !self.fenced.is_empty()
                && let Some(open) = self.picks.opens_at()
            {
                wake = Some(wake.map_or(open, |w| w.min(open)));
            }
            let sleep = async {
                match wake {
                    Some(w) => tokio::time::sleep_until(w.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                msg = rx.recv() => {
                    let Some(msg) = msg else { break };
                    self.handle(msg);
                    // Take everything already sent before polling once.
                    while let Ok(msg) = rx.try_recv() {
                        self.handle(msg);
                    }
                }
                () = sleep => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
        let mut out: Vec<Decision> = self.fenced.drain(..).collect();
        self.fc.handle_shutdown(Instant::now(), &mut out);
        for d in out {
            self.deliver(d);
        }
        self.publish_gauges();
    }

    /// Brings the controller in line with the policy's flow control, if it changed.
    fn follow_policy(&mut self, now: Instant) {
        let policy = self.policy.load();
        let unchanged = match (&self.seen, &policy.flow) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if unchanged {
            return;
        }
        self.seen = policy.flow.clone();
        match &policy.flow {
            // A new scheduler with the same section (most policy swaps) changes nothing.
            Some(new) if self.applied.as_deref() == Some(&**new) => {
                self.applied = Some(new.clone());
            }
            Some(new) => match self.fc.handle_reconfigure((**new).clone()) {
                Ok(()) => {
                    tracing::info!(
                        was_on = self.applied.is_some(),
                        queued = self.fc.len(),
                        "flow control follows the new policy"
                    );
                    self.applied = Some(new.clone());
                    self.metrics.set_flow_enabled(true);
                }
                Err(e) => {
                    tracing::error!(error = %e, on = self.applied.is_some(), "flow control: the new policy's flowControl section is invalid; keeping the one in force");
                }
            },
            None => {
                if self.applied.take().is_none() {
                    return;
                }
                let mut out: Vec<Decision> = self.fenced.drain(..).collect();
                self.fc.handle_release_all(now, &mut out);
                tracing::info!(
                    released = out.len(),
                    "flow control turned off: every queued request is dispatched"
                );
                for d in out {
                    self.deliver(d);
                }
                self.metrics.set_flow_enabled(false);
            }
        }
    }

    fn handle(&mut self, msg: Input) {
        let now = Instant::now();
        match msg {
            Input::Enqueue { id, arrival, reply } => {
                // The request read a policy with the gate on; this one may be newer.
                self.follow_policy(now);
                if self.applied.is_none() {
                    // Turned off meanwhile: pass through, as a request that read the new
                    // policy does.
                    let _ = reply.send(Ok(Dispatched {
                        waited: Duration::ZERO,
                        lease: None,
                        usage: None,
                        grant: None,
                        claims: Claims::default(),
                    }));
                    return;
                }
                if self.fc.is_empty() && now >= self.next_refresh {
                    // The first request after an idle spell sees a fresh measurement.
                    self.refresh(now);
                }
                let req = FlowRequest {
                    priority: arrival.priority,
                    fairness_id: &arrival.fairness_id,
                    bytes: arrival.bytes,
                    received: arrival.received,
                    slo_ttft: arrival.slo_ttft,
                    deadline: None,
                };
                let enqueued = self.fc.handle_enqueue(&req, now);
                self.metrics
                    .flow
                    .enqueue_duration
                    .get_or_create(&crate::metrics::EnqueueLabels {
                        outcome: if enqueued.is_ok() {
                            "enqueued"
                        } else {
                            "rejected"
                        },
                    })
                    .observe(now.elapsed().as_secs_f64());
                match enqueued {
                    Ok(ticket) => {
                        self.waiting.insert(id, (ticket, reply));
                        self.by_ticket.insert(ticket, id);
                    }
                    Err(r) => {
                        self.metrics.count_flow_outcome(r.outcome, None);
                        let _ = reply.send(Err(r.reason));
                    }
                }
            }
            Input::Released { prefilling, pod } => {
                let e = &mut self.estimate;
                e.released = e.released.saturating_add(1);
                e.outstanding = e.outstanding.saturating_sub(1);
                if prefilling {
                    self.prefill_done(pod, now);
                }
                if pod.is_none() {
                    self.picks.ended_unpicked();
                }
            }
            Input::Prefilled { pod } => self.prefill_done(pod, now),
            Input::Picked(pod) => self.picks.picked(pod),
            Input::LeaseEnded(t) => {
                self.revokers.remove(&t);
                self.fc.handle_lease_end(t, now);
            }
            Input::Cancel(id) => {
                if let Some((ticket, _)) = self.waiting.get(&id)
                    && let Some(d) = self.fc.handle_cancel(*ticket, now)
                {
                    self.deliver(d);
                }
            }
            // The loop looks at the policy after every batch of inputs.
            Input::PolicyChanged => {}
            Input::Served {
                ticket,
                input,
                output,
            } => self.fc.handle_served(ticket, input, output, now),
        }
    }

    /// One of this queue's requests stopped prefilling (on `pod`, when it was reported).
    fn prefill_done(&mut self, pod: Option<SocketAddr>, now: Instant) {
        self.estimate.prefill_done();
        if let Some(pod) = pod {
            self.picks.prefill_done(pod, now);
        }
    }

    /// Measures the pool's saturation the way admission does, over fleet-wide load.
    fn refresh(&mut self, now: Instant) {
        let pool = self.pool.load();
        let mut candidates = pool.candidates(now, self.driver.staleness, None, &[]);
        let stale = pool
            .slots
            .iter()
            .filter(|s| !s.is_fresh(now, self.driver.staleness))
            .count();
        self.metrics
            .flow
            .stale_endpoints
            .set(i64::try_from(stale).unwrap_or(i64::MAX));
        let scheduler = self.policy.load().scheduler.clone();
        let has_endpoints = !candidates.is_empty();
        let (measured, steps) = measure(|c| scheduler.saturation(c, now), &mut candidates);
        // What is running is carried over: only the measurement starts again.
        let SaturationEstimate {
            outstanding,
            prefilling,
            ..
        } = self.estimate;
        self.estimate =
            SaturationEstimate::refresh(measured, steps, (self.live_nodes)(), has_endpoints);
        self.estimate.outstanding = outstanding;
        self.estimate.prefilling = prefilling;
        self.metrics.set_flow_saturation(measured);
        self.next_refresh = now + self.driver.refresh;
    }

    /// Sends every decision due at `now`, raising the saturation estimate per dispatch.
    /// A dispatch waits behind the fence (the pick of the one before it); the estimate
    /// counts it from the decision on, so the fence never lets more through.
    fn drain(&mut self, now: Instant) {
        while self.picks.is_open(now)
            && let Some(d) = self.fenced.pop_front()
        {
            self.deliver(d);
        }
        self.fc.handle_pool(self.estimate.status(), now);
        while let Some(d) = self.fc.poll_decision(now) {
            if d.is_dispatched() {
                self.estimate.dispatched += 1;
                self.fc.handle_pool(self.estimate.status(), now);
                if !self.fenced.is_empty() || !self.picks.is_open(now) {
                    self.fenced.push_back(d);
                    continue;
                }
            }
            self.deliver(d);
        }
        self.revoke(now);
    }

    fn deliver(&mut self, d: Decision) {
        self.metrics.count_flow_outcome(d.outcome, Some(d.waited));
        let reply = self
            .by_ticket
            .remove(&d.ticket)
            .and_then(|id| self.waiting.remove(&id));
        let Some((_, reply)) = reply else {
            if d.is_dispatched() {
                let now = Instant::now();
                self.fc.handle_lease_end(d.ticket, now);
                self.fc.handle_served(d.ticket, 0, 0, now);
            }
            return;
        };
        let answer = match d.reason {
            None if d.outcome == FlowOutcome::Dispatched => {
                // Counted where its grant is made, so every count has one release.
                self.estimate.outstanding = self.estimate.outstanding.saturating_add(1);
                self.estimate.prefilling = self.estimate.prefilling.saturating_add(1);
                let now = Instant::now();
                let claims = self.picks.claims(now);
                self.picks.dispatched(now, self.driver.pick_fence);
                Ok(Dispatched {
                    waited: d.waited,
                    lease: self.lease(d.ticket, d.priority),
                    usage: self.fc.wants_usage(d.ticket).then(|| UsageReport {
                        tx: self.tx.clone(),
                        ticket: d.ticket,
                        input: 0,
                        output: 0,
                    }),
                    grant: Some(Grant {
                        tx: self.tx.clone(),
                        prefilling: true,
                        pod: None,
                    }),
                    claims,
                })
            }
            None => Err(DropReason::Internal),
            Some(r) => Err(r),
        };
        // A closed reply is a client that went away; its Cancel is on its way, and the
        // returned lease and usage report end themselves on drop.
        let _ = reply.send(answer);
    }

    /// The lease of a dispatched request when in-flight eviction is on (only sheddable
    /// ones can be revoked).
    fn lease(&mut self, ticket: FlowTicket, priority: i32) -> Option<Lease> {
        if !self.fc.config().enable_eviction {
            return None;
        }
        let revoke = (priority < 0).then(|| {
            let token = CancellationToken::new();
            self.revokers.insert(ticket, token.clone());
            token
        });
        Some(Lease::Local(LocalLease {
            tx: self.tx.clone(),
            ticket,
            revoke,
        }))
    }

    /// Revokes the leases flow control chose; a lease already gone is ended at once.
    fn revoke(&mut self, now: Instant) {
        while let Some(t) = self.fc.poll_revocation() {
            // A dispatch still behind the fence goes out now, to be revoked as any other.
            if let Some(d) = self
                .fenced
                .iter()
                .position(|d| d.ticket == t)
                .and_then(|i| self.fenced.remove(i))
            {
                self.deliver(d);
            }
            match self.revokers.remove(&t) {
                Some(token) => {
                    tracing::info!(ticket = ?t, "in-flight eviction: revoking a sheddable request");
                    self.metrics.count_flow_revocation();
                    token.cancel();
                }
                None => self.fc.handle_lease_end(t, now),
            }
        }
    }

    fn publish_gauges(&mut self) {
        // The controller lives as long as this owner (reconfigured in place), so its
        // count only grows.
        let lifted = self.fc.lifted_dispatches();
        self.metrics.count_flow_lifted(lifted - self.lifted_counted);
        self.lifted_counted = lifted;
        self.metrics.set_flow_queue(self.fc.len(), self.fc.bytes());
        if let Some(j) = self.fc.program_fairness_index() {
            self.metrics.set_program_fairness_index(j);
        }
        self.metrics.set_flow_pending_reclaim(self.fc.leases().1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use infermesh_scheduler::flow::FlowRequest;

    /// Dispatches the controller allows from one refresh with `nodes` live nodes.
    fn burst(measured: f64, step: f64, nodes: usize) -> u32 {
        let t0 = Instant::now();
        let mut fc = FlowController::new(FlowConfig::default(), t0).unwrap();
        for _ in 0..100 {
            fc.handle_enqueue(&FlowRequest::new(0, "f", 1, t0), t0)
                .unwrap();
        }
        let mut est = SaturationEstimate::refresh(measured, (step, step), nodes, true);
        fc.handle_pool(est.status(), t0);
        while let Some(d) = fc.poll_decision(t0) {
            assert!(d.is_dispatched());
            est.dispatched += 1;
            fc.handle_pool(est.status(), t0);
        }
        est.dispatched
    }

    #[test]
    fn each_node_dispatches_at_most_its_share_of_the_budget_per_refresh() {
        // Budget B = (1 - 0.5) / 0.1 = 5 requests per refresh, fleet-wide.
        assert_eq!(burst(0.5, 0.1, 1), 5);
        assert_eq!(burst(0.5, 0.1, 2), 3, "ceil(5 / 2)");
        assert_eq!(burst(0.5, 0.1, 5), 1);
        assert_eq!(burst(0.5, 0.1, 10), 1, "a node always gets one");
        assert_eq!(burst(1.0, 0.1, 1), 0, "saturated: nothing");
        // Zero nodes reads as one.
        assert_eq!(burst(0.5, 0.1, 0), 5);
    }

    #[test]
    fn a_finished_request_frees_one_step_until_the_next_refresh() {
        let mut est = SaturationEstimate::refresh(0.5, (0.1, 0.1), 3, true);
        est.dispatched = 1;
        // One dispatch counts for every node (0.3); one release frees one request (0.1).
        assert!((est.status().saturation - 0.8).abs() < 1e-12);
        est.released = 2;
        assert!((est.status().saturation - 0.6).abs() < 1e-12);
        // Never below zero.
        est.released = 100;
        assert_eq!(est.status().saturation, 0.0);
        // A refresh measures the freed room itself and starts again.
        let est = SaturationEstimate::refresh(0.4, (0.1, 0.1), 3, true);
        assert_eq!((est.dispatched, est.released), (0, 0));
    }

    #[test]
    fn what_the_queue_has_running_is_a_floor_across_refreshes() {
        // The board has not shown 3 of this queue's running requests yet: 0.1 measured.
        let mut est = SaturationEstimate::refresh(0.1, (0.125, 0.125), 1, true);
        est.outstanding = 5;
        assert!((est.status().saturation - 0.625).abs() < 1e-12);
        // Once the measurement catches up (or exceeds it), it rules.
        let mut est = SaturationEstimate::refresh(0.75, (0.125, 0.125), 1, true);
        est.outstanding = 5;
        assert!((est.status().saturation - 0.75).abs() < 1e-12);
    }

    #[test]
    fn a_request_past_its_first_byte_keeps_only_its_request_step() {
        // maxPrefillConcurrency 1 beside a request limit of 10 on 4 endpoints: 0.25 while
        // a request prefills, 0.025 after.
        let steps = (0.25, 0.025);
        let mut est = SaturationEstimate::refresh(0.5, steps, 1, true);
        est.dispatched = 1;
        assert!((est.status().saturation - 0.75).abs() < 1e-12);
        // Its first byte frees the prefill slot at once, not at the next refresh.
        est.prefill_freed = 1;
        assert!((est.status().saturation - 0.525).abs() < 1e-12);
        // Its end frees the request slot too.
        est.released = 1;
        assert!((est.status().saturation - 0.5).abs() < 1e-12);
        // The floor counts a running request at its request step, and one still
        // prefilling at both: 4 decoding and 1 prefilling is 4 × 0.025 + 0.25.
        let mut est = SaturationEstimate::refresh(0.0, steps, 1, true);
        est.outstanding = 5;
        est.prefilling = 1;
        assert!((est.status().saturation - 0.35).abs() < 1e-12);
    }

    #[test]
    fn the_step_is_one_request_spread_over_the_endpoints_with_a_floor() {
        let mut eps: Vec<Endpoint> = (0..4u8)
            .map(|i| {
                let mut e = Endpoint::new(([10, 0, 0, i], 8000).into(), Default::default());
                e.metrics = Some(infermesh_scheduler::Metrics::idle(Instant::now()));
                e
            })
            .collect();
        // Concurrency-like: in-flight over a capacity of 10 per endpoint.
        let conc = |c: &[Endpoint]| {
            c.iter()
                .map(|e| f64::from(e.in_flight.requests))
                .sum::<f64>()
                / (10.0 * c.len() as f64)
        };
        let (s, (step, step_requests)) = measure(conc, &mut eps.clone());
        assert_eq!(s, 0.0);
        assert!((step - 1.0 / 40.0).abs() < 1e-12, "{step}");
        assert_eq!(step_requests, step, "prefilling is not counted");
        // One prefill per endpoint (maxPrefillConcurrency 1 beside a request limit of 10):
        // one more request fills an endpoint, so the step is a whole endpoint's share.
        let prefill = |c: &[Endpoint]| {
            c.iter()
                .map(|e| {
                    (f64::from(e.in_flight.requests) / 10.0).max(f64::from(e.in_flight.prefilling))
                })
                .sum::<f64>()
                / c.len() as f64
        };
        let (s, (step, step_requests)) = measure(prefill, &mut eps.clone());
        assert_eq!(s, 0.0);
        assert!((step - 1.0 / 4.0).abs() < 1e-12, "{step}");
        // Once its response has started, a request holds only a request slot.
        assert!(
            (step_requests - 1.0 / 40.0).abs() < 1e-12,
            "{step_requests}"
        );
        // A detector that does not move gets the floor.
        let (_, (step, step_requests)) = measure(|_| 0.3, &mut eps);
        assert!((step - MIN_STEP_PER_ENDPOINT / 4.0).abs() < 1e-12);
        assert_eq!(step_requests, step);
        // No endpoints: saturated, and the step no longer matters.
        let (s, _) = measure(|_| 1.0, &mut []);
        assert_eq!(s, 1.0);
    }
}
