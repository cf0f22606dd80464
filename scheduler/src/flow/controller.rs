//! The flow controller: bands by priority, capacity, TTL, saturation gating and eviction.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::{Duration, Instant};

use hashbrown::HashMap;

use super::band::{Band, OrderKey};
use super::config::{FairnessPolicy, FlowConfig, InvalidFlowConfig, OrderingPolicy};
use super::outcome::{Decision, DropReason, Outcome, Rejection, Ticket};
use super::programs::{Head, Programs};
use super::reclaim::{Reclaimer, revocations};

/// A request asking for a place in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowRequest<'a> {
    /// Priority from the InferenceObjective (0 when none; < 0 is sheddable).
    pub priority: i32,
    /// Flow key within the band (`x-llm-d-inference-fairness-id`, default `default-flow`).
    pub fairness_id: &'a str,
    /// Size counted against the byte caps (the request body length).
    pub bytes: u64,
    /// When the router received the request (base of the SLO deadline).
    pub received: Instant,
    /// `x-llm-d-slo-ttft-ms`, for `slo-deadline-ordering-policy`.
    pub slo_ttft: Option<Duration>,
    /// A client or gateway deadline: the request is evicted (`EvictedTTL`) when it passes.
    pub deadline: Option<Instant>,
}

impl<'a> FlowRequest<'a> {
    /// A request with no SLO header and no deadline of its own.
    pub fn new(priority: i32, fairness_id: &'a str, bytes: u64, received: Instant) -> Self {
        FlowRequest {
            priority,
            fairness_id,
            bytes,
            received,
            slo_ttft: None,
            deadline: None,
        }
    }
}

/// What the driver knows about the pool; given to [`FlowController::handle_pool`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PoolStatus {
    /// Pool saturation from the saturation detector (1.0 is the set point; not clamped).
    pub saturation: f64,
    /// Whether the candidate pool has any endpoint.
    pub has_endpoints: bool,
}

impl PoolStatus {
    /// A pool with endpoints at `saturation`.
    pub fn serving(saturation: f64) -> Self {
        PoolStatus {
            saturation,
            has_endpoints: true,
        }
    }

    /// A pool with no endpoints (scaled to zero); reads as saturated, as llm-d's detectors do.
    pub fn empty() -> Self {
        PoolStatus {
            saturation: 1.0,
            has_endpoints: false,
        }
    }
}

/// Occupancy of one band, for `flow_control_capacity_utilization_{requests,bytes}{priority}`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BandStats {
    /// The band's priority.
    pub priority: i32,
    /// Queued requests.
    pub len: u64,
    /// Queued bytes.
    pub bytes: u64,
    /// Live flows (fairness ids with queued requests).
    pub flows: usize,
    /// The band's request cap.
    pub max_requests: u64,
    /// The band's byte cap.
    pub max_bytes: u64,
    /// The usage limit's saturation ceiling for the band at the last pool status.
    pub ceiling: f64,
}

impl BandStats {
    /// `len / max_requests`.
    pub fn requests_utilization(&self) -> f64 {
        self.len as f64 / self.max_requests as f64
    }

    /// `bytes / max_bytes`.
    pub fn bytes_utilization(&self) -> f64 {
        self.bytes as f64 / self.max_bytes as f64
    }
}

struct Item {
    band: i32,
    flow: u32,
    bytes: u64,
    enqueued: Instant,
    enqueued_ns: u64,
    key: OrderKey,
    deadline_ns: Option<u64>,
    /// `received + x-llm-d-slo-ttft-ms`, kept so a reconfigured ordering can key it again.
    slo_ns: Option<u64>,
}

/// The sans-IO flow controller. See the [module docs](super) for how a driver calls it.
pub struct FlowController {
    cfg: FlowConfig,
    /// Origin of the nanosecond clock used in keys (the `now` given to `new`).
    epoch: Instant,
    next_seq: u64,
    items: HashMap<u64, Item>,
    bands: BTreeMap<i32, Band>,
    /// Every band's priority, highest first (the usage limit ranks bands among these).
    priorities: Vec<i32>,
    /// Calls to the usage limit (the soft-reflective policy alternates on it).
    usage_tick: u64,
    /// Dispatches past their band's own ceiling (`fair-share-holdback-policy`'s lift).
    lifted: u64,
    /// Priorities of bands with queued requests.
    nonempty: BTreeSet<i32>,
    /// (enqueued ns, seq): the oldest request expires first under the shared TTL.
    by_enqueue: BTreeSet<(u64, u64)>,
    /// (own deadline ns, seq) of requests that carry a deadline.
    by_deadline: BTreeSet<(u64, u64)>,
    total_len: u64,
    total_bytes: u64,
    pool: PoolStatus,
    /// When the current endpoint regime (has endpoints or not) began, in ns.
    regime_since_ns: u64,
    /// Dispatched requests' leases and in-flight eviction (`enableEviction`).
    reclaim: Reclaimer,
    /// Leases revoked and not yet handed to the driver.
    revocations: VecDeque<Ticket>,
    /// `program-aware-fairness` accounting, shared by the bands that use it.
    programs: Programs,
    outcomes: [u64; Outcome::ALL.len()],
    shut_down: bool,
}

impl std::fmt::Debug for FlowController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowController")
            .field("queued", &self.total_len)
            .field("bytes", &self.total_bytes)
            .field("bands", &self.bands.len())
            .field("pool", &self.pool)
            .finish_non_exhaustive()
    }
}

/// Band 0 always exists (it takes requests without an objective), as in llm-d.
fn provision_band_zero(cfg: &mut FlowConfig) {
    let zero = cfg.band_config(0).clone();
    cfg.priority_bands.entry(0).or_insert(zero);
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl FlowController {
    /// A controller with no queued requests. `now` starts its clock; the pool is assumed to
    /// have endpoints and to be saturated until [`handle_pool`](Self::handle_pool) says
    /// otherwise (fail closed).
    pub fn new(mut cfg: FlowConfig, now: Instant) -> Result<Self, InvalidFlowConfig> {
        cfg.validate()?;
        provision_band_zero(&mut cfg);
        let bands: BTreeMap<i32, Band> = cfg
            .priority_bands
            .iter()
            .map(|(p, b)| (*p, Band::new(b.clone())))
            .collect();
        let priorities = bands.keys().rev().copied().collect();
        let mut programs = Programs::default();
        programs.set_params(cfg.las_params());
        Ok(FlowController {
            cfg,
            epoch: now,
            next_seq: 0,
            items: HashMap::new(),
            bands,
            priorities,
            usage_tick: 0,
            lifted: 0,
            nonempty: BTreeSet::new(),
            by_enqueue: BTreeSet::new(),
            by_deadline: BTreeSet::new(),
            total_len: 0,
            total_bytes: 0,
            pool: PoolStatus::serving(1.0),
            regime_since_ns: 0,
            reclaim: Reclaimer::default(),
            revocations: VecDeque::new(),
            programs,
            outcomes: [0; Outcome::ALL.len()],
            shut_down: false,
        })
    }

    /// Puts `cfg` in force without dropping anything: every queued request stays queued
    /// with its ticket, its original enqueue time (so TTLs count from when it arrived) and
    /// its own deadline. Each band takes its new configuration (explicit, else the
    /// template a new enqueue at that priority would get, so a request whose band is no
    /// longer listed lands where a new request of its priority would); requests are keyed
    /// again under the new ordering policy in arrival order, and the fairness and usage
    /// policies decide from the next poll on. Smaller caps refuse new enqueues until the
    /// queue drains below them; nothing queued is evicted for them. Leases and pending
    /// revocations are kept. On `Err` nothing changed.
    /// No `now` is needed: keys and expiries are built from the times stored at enqueue.
    pub fn handle_reconfigure(&mut self, mut cfg: FlowConfig) -> Result<(), InvalidFlowConfig> {
        cfg.validate()?;
        provision_band_zero(&mut cfg);
        let mut bands: BTreeMap<i32, Band> = cfg
            .priority_bands
            .iter()
            .map(|(p, b)| (*p, Band::new(b.clone())))
            .collect();
        // Empty on-the-fly bands are dropped: a later enqueue makes them again from the
        // new template, and they no longer count in the usage limit's ranking.
        for &p in &self.nonempty {
            bands
                .entry(p)
                .or_insert_with(|| Band::new(cfg.band_config(p).clone()));
        }
        self.programs.set_params(cfg.las_params());
        self.cfg = cfg;
        let old = std::mem::replace(&mut self.bands, bands);
        let mut seqs: Vec<u64> = self.items.keys().copied().collect();
        seqs.sort_unstable();
        for seq in seqs {
            let item = &self.items[&seq];
            let band = item.band;
            let ordering = self.bands[&band].cfg.ordering;
            let key = (
                self.order_value(ordering, item.enqueued_ns, item.deadline_ns, item.slo_ns),
                seq,
            );
            let fairness_id = old[&band].flow_id(item.flow);
            let bytes = item.bytes;
            let flow = self
                .bands
                .get_mut(&band)
                .expect("every queued band was provisioned")
                .push(fairness_id, key, bytes);
            let item = self.items.get_mut(&seq).expect("listed above");
            item.flow = flow;
            item.key = key;
        }
        self.priorities = self.bands.keys().rev().copied().collect();
        Ok(())
    }

    /// The primary order value of a request under `ordering` (lower leaves first).
    fn order_value(
        &self,
        ordering: OrderingPolicy,
        enqueued_ns: u64,
        deadline_ns: Option<u64>,
        slo_ns: Option<u64>,
    ) -> u64 {
        match ordering {
            OrderingPolicy::Fcfs => 0,
            OrderingPolicy::Edf => {
                let ttl = self
                    .cfg
                    .default_request_ttl
                    .map(|t| enqueued_ns.saturating_add(nanos(t)));
                match (ttl, deadline_ns) {
                    (Some(a), Some(b)) => a.min(b),
                    (a, b) => a.or(b).unwrap_or(u64::MAX),
                }
            }
            OrderingPolicy::SloDeadline => slo_ns.unwrap_or(u64::MAX),
        }
    }

    /// Dispatches every queued request at once, highest band first and in each band's
    /// fairness order, whatever the usage limit says (the `flowControl` gate was turned
    /// off: the queue is released, not dropped).
    pub fn handle_release_all(&mut self, now: Instant, out: &mut Vec<Decision>) {
        let now_ns = self.ns(now);
        while let Some(&priority) = self.nonempty.last() {
            let Some(key) = self.pick(priority, now_ns, None) else {
                break;
            };
            out.push(self.finish(key.1, Outcome::Dispatched, None, now));
        }
    }

    /// The configuration in force (with band 0 filled in).
    pub fn config(&self) -> &FlowConfig {
        &self.cfg
    }

    fn ns(&self, t: Instant) -> u64 {
        nanos(t.saturating_duration_since(self.epoch))
    }

    fn at(&self, ns: u64) -> Instant {
        self.epoch + Duration::from_nanos(ns)
    }

    fn count(&mut self, outcome: Outcome) {
        self.outcomes[outcome.index()] += 1;
    }

    fn reject(&mut self, outcome: Outcome, reason: DropReason) -> Rejection {
        self.count(outcome);
        Rejection { outcome, reason }
    }

    /// Asks for a place in the queue. On success the request waits until a poll returns a
    /// [`Decision`] for its ticket. A full band or full global cap refuses it with
    /// `RejectedCapacity` (`RejectedNoEndpoints` while the pool has no endpoints); with
    /// eviction on, queued sheddable requests of lower priority may be displaced instead
    /// (their decisions come out of the next poll).
    pub fn handle_enqueue(
        &mut self,
        req: &FlowRequest<'_>,
        now: Instant,
    ) -> Result<Ticket, Rejection> {
        if self.shut_down {
            return Err(self.reject(Outcome::RejectedOther, DropReason::ShuttingDown));
        }
        let full = |this: &mut Self| {
            if this.pool.has_endpoints {
                this.reject(Outcome::RejectedCapacity, DropReason::Saturated)
            } else {
                this.reject(Outcome::RejectedNoEndpoints, DropReason::NoEndpoints)
            }
        };
        if !self.bands.contains_key(&req.priority) {
            let cfg = self.cfg.band_config(req.priority).clone();
            self.bands.insert(req.priority, Band::new(cfg));
            self.priorities = self.bands.keys().rev().copied().collect();
        }
        if !self.bands[&req.priority].fits(req.bytes) {
            return Err(full(self));
        }
        let (need_requests, need_bytes) = self.global_deficit(req.bytes);
        if need_requests > 0 || need_bytes > 0 {
            return Err(full(self));
        }

        let seq = self.next_seq;
        self.next_seq += 1;
        let enqueued_ns = self.ns(now);
        let deadline_ns = req.deadline.map(|d| self.ns(d));
        let ordering = self.bands[&req.priority].cfg.ordering;
        let slo_ns = req
            .slo_ttft
            .map(|slo| self.ns(req.received).saturating_add(nanos(slo)));
        let primary = self.order_value(ordering, enqueued_ns, deadline_ns, slo_ns);
        let key = (primary, seq);
        let band = self.bands.get_mut(&req.priority).expect("band exists");
        let flow = band.push(req.fairness_id, key, req.bytes);
        self.nonempty.insert(req.priority);
        self.by_enqueue.insert((enqueued_ns, seq));
        if let Some(d) = deadline_ns {
            self.by_deadline.insert((d, seq));
        }
        self.total_len += 1;
        self.total_bytes += req.bytes;
        self.items.insert(
            seq,
            Item {
                band: req.priority,
                flow,
                bytes: req.bytes,
                enqueued: now,
                enqueued_ns,
                key,
                deadline_ns,
                slo_ns,
            },
        );
        Ok(Ticket(seq))
    }

    /// How many requests and bytes must leave before one more of `bytes` fits globally.
    fn global_deficit(&self, bytes: u64) -> (u64, u64) {
        let reqs = self
            .cfg
            .max_requests
            .map_or(0, |m| (self.total_len + 1).saturating_sub(m.get()));
        let bytes = self.cfg.max_bytes.map_or(0, |m| {
            self.total_bytes
                .saturating_add(bytes)
                .saturating_sub(m.get())
        });
        (reqs, bytes)
    }

    /// The client went away: frees the request's place at once and counts it as
    /// `EvictedContextCancelled`. Returns `None` when the ticket is no longer queued
    /// (already dispatched, expired or cancelled).
    pub fn handle_cancel(&mut self, ticket: Ticket, now: Instant) -> Option<Decision> {
        if !self.items.contains_key(&ticket.0) {
            return None;
        }
        Some(self.finish(
            ticket.0,
            Outcome::EvictedContextCancelled,
            Some(DropReason::ContextCancelled),
            now,
        ))
    }

    /// Records the pool's saturation and whether it has endpoints. A change of endpoint
    /// regime starts a fresh wait budget for every queued request (llm-d's
    /// `noEndpointRequestTTL` semantics); no request ever waits longer than the longer of
    /// the two budgets.
    pub fn handle_pool(&mut self, status: PoolStatus, now: Instant) {
        if status.has_endpoints != self.pool.has_endpoints {
            self.regime_since_ns = self.ns(now);
        }
        self.pool = status;
    }

    /// The next terminal decision at `now`, or `None` when nothing is due: first expiries,
    /// then one dispatch from the highest-priority band whose
    /// usage limit allows it at the last [`PoolStatus`]. Call it in a loop; a driver whose
    /// saturation rises with each dispatch updates it with `handle_pool` between calls.
    pub fn poll_decision(&mut self, now: Instant) -> Option<Decision> {
        self.programs.poll_sweep(self.ns(now));
        self.poll_expired(now).or_else(|| self.poll_dispatch(now))
    }

    /// Expiries due at `now` (never a dispatch).
    pub fn poll_expired(&mut self, now: Instant) -> Option<Decision> {
        let now_ns = self.ns(now);
        let outcome = if self.pool.has_endpoints {
            (Outcome::EvictedTtl, DropReason::TtlExpired)
        } else {
            (Outcome::EvictedNoEndpoints, DropReason::NoEndpoints)
        };
        if let Some(&(d, seq)) = self.by_deadline.first()
            && d <= now_ns
        {
            return Some(self.finish(seq, outcome.0, Some(outcome.1), now));
        }
        if let Some(&(enq, seq)) = self.by_enqueue.first()
            && self.ttl_expiry_ns(enq).is_some_and(|e| e <= now_ns)
        {
            return Some(self.finish(seq, outcome.0, Some(outcome.1), now));
        }
        None
    }

    /// One dispatch at `now` if the pool has endpoints and the highest band with queued
    /// requests may dispatch under the usage limit (strict priority between bands: a gated
    /// band stops the loop, as every lower band's ceiling is no higher, and a lower band's
    /// lifted ceiling is at most this band's own; the band's fairness policy across flows).
    pub fn poll_dispatch(&mut self, now: Instant) -> Option<Decision> {
        if !self.pool.has_endpoints {
            return None;
        }
        let priority = *self.nonempty.last()?;
        let rank = self.priorities.partition_point(|q| *q > priority);
        let tick = self.usage_tick;
        self.usage_tick = tick.wrapping_add(1);
        let saturation = self.pool.saturation;
        let mut under_share = None;
        if !self
            .cfg
            .usage_limit
            .allows(rank, &self.priorities, saturation, tick)
        {
            // Past the band's ceiling an under-served flow may still go, up to the next
            // higher band's ceiling (fair-share-holdback-policy); nothing else may. Only a
            // program-aware band knows who is under-served: `pick` finds nobody elsewhere.
            match self
                .cfg
                .usage_limit
                .lift(rank, &self.priorities, saturation)
            {
                Some((lifted, share)) if saturation < lifted => {
                    under_share = Some(share);
                }
                _ => {
                    if self.cfg.enable_eviction {
                        self.reclaim_for_blocked(now);
                    }
                    return None;
                }
            }
        }
        let Some(key) = self.pick(priority, self.ns(now), under_share) else {
            if self.cfg.enable_eviction && under_share.is_some() {
                self.reclaim_for_blocked(now);
            }
            return None;
        };
        if under_share.is_some() {
            self.lifted += 1;
        }
        Some(self.finish(key.1, Outcome::Dispatched, None, now))
    }

    /// The key band `priority`'s fairness policy serves next; with `under_share`, only
    /// among the flows whose attained service is below that share of the band's mean.
    fn pick(&mut self, priority: i32, now_ns: u64, under_share: Option<f64>) -> Option<OrderKey> {
        let band = self.bands.get_mut(&priority)?;
        match band.cfg.fairness {
            FairnessPolicy::ProgramAware(weights) => {
                let items = &self.items;
                let heads = band.heads().map(|(program, key)| Head {
                    program,
                    key,
                    enqueued_ns: items.get(&key.1).map_or(now_ns, |i| i.enqueued_ns),
                });
                self.programs.pick(&weights, now_ns, heads, under_share)
            }
            // Attained service is kept for program-aware bands only.
            _ if under_share.is_some() => None,
            _ => band.pick(),
        }
    }

    /// A request dispatched as `ticket` finished (however it ended) having used `input`
    /// prompt and `output` completion tokens (0 when unknown). For a request dispatched
    /// from a `program-aware-fairness` band this adds its weighted tokens to its program's
    /// attained service and counts it out of flight; anything else is ignored.
    pub fn handle_served(&mut self, ticket: Ticket, input: u64, output: u64, now: Instant) {
        let now_ns = self.ns(now);
        self.programs.on_served(ticket.0, input, output, now_ns);
        self.programs.poll_sweep(now_ns);
    }

    /// Whether a dispatched `ticket` awaits [`handle_served`](Self::handle_served) (it left
    /// a `program-aware-fairness` band); the driver reports only those.
    pub fn wants_usage(&self, ticket: Ticket) -> bool {
        self.programs.awaits(ticket.0)
    }

    /// Jain's fairness index over the mean queue wait of each program
    /// (`program_aware_jains_fairness_index`); `None` when no band uses
    /// `program-aware-fairness`.
    pub fn program_fairness_index(&self) -> Option<f64> {
        self.programs.active().then(|| self.programs.jains_index())
    }

    /// A program's attained service at `now` in weighted tokens (`None`: not tracked).
    pub fn attained_service(&self, program: &str, now: Instant) -> Option<f64> {
        self.programs.service(program, self.ns(now))
    }

    /// Programs tracked by `program-aware-fairness` (evicted ones are not).
    pub fn programs_tracked(&self) -> usize {
        self.programs.len()
    }

    /// Requests dispatched past their band's own ceiling because their flow was
    /// under-served (`fair-share-holdback-policy`), since the controller was made.
    pub fn lifted_dispatches(&self) -> u64 {
        self.lifted
    }

    /// Applies `pool`, then appends every due eviction and expiry and up to `max_dispatch`
    /// dispatches to `out` (the saturation is taken as fixed for the batch).
    pub fn dispatch(
        &mut self,
        now: Instant,
        pool: PoolStatus,
        max_dispatch: usize,
        out: &mut Vec<Decision>,
    ) {
        self.handle_pool(pool, now);
        while let Some(d) = self.poll_expired(now) {
            out.push(d);
        }
        for _ in 0..max_dispatch {
            match self.poll_dispatch(now) {
                Some(d) => out.push(d),
                None => break,
            }
        }
    }

    /// Shuts down: every queued request is evicted (`EvictedOther`, `rejected-shutting-down`)
    /// into `out`, and later enqueues are refused with `RejectedOther`.
    pub fn handle_shutdown(&mut self, now: Instant, out: &mut Vec<Decision>) {
        self.shut_down = true;
        while let Some(&(_, seq)) = self.by_enqueue.first() {
            out.push(self.finish(
                seq,
                Outcome::EvictedOther,
                Some(DropReason::ShuttingDown),
                now,
            ));
        }
    }

    /// When the next expiry falls due (`None`: nothing queued can expire; an instant in the
    /// past: poll now). Also wake the owner after an enqueue and on pool changes, since
    /// those can make dispatches due.
    pub fn next_deadline(&self) -> Option<Instant> {
        let own = self.by_deadline.first().map(|&(d, _)| d);
        let ttl = self
            .by_enqueue
            .first()
            .and_then(|&(enq, _)| self.ttl_expiry_ns(enq));
        let next = match (own, ttl) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // A reclamation decision waiting out its grace while demand is queued.
        let reclaim = (self.cfg.enable_eviction && !self.is_empty())
            .then(|| self.reclaim.next_decision_ns())
            .flatten();
        let next = match (next, reclaim) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        next.map(|ns| self.at(ns))
    }

    /// When a request enqueued at `enq` runs out of wait budget under the current regime.
    fn ttl_expiry_ns(&self, enq: u64) -> Option<u64> {
        let ttl = if self.pool.has_endpoints {
            self.cfg.default_request_ttl
        } else {
            self.cfg.no_endpoint_request_ttl
        }?;
        let fresh = enq.max(self.regime_since_ns).saturating_add(nanos(ttl));
        let bound = self
            .cfg
            .wait_bound()
            .map_or(u64::MAX, |b| enq.saturating_add(nanos(b)));
        Some(fresh.min(bound))
    }

    /// Removes a queued request and records its outcome.
    fn finish(
        &mut self,
        seq: u64,
        outcome: Outcome,
        reason: Option<DropReason>,
        now: Instant,
    ) -> Decision {
        let item = self
            .items
            .remove(&seq)
            .expect("finish is called on queued items");
        let band = self
            .bands
            .get_mut(&item.band)
            .expect("an item's band exists");
        let waited = now.saturating_duration_since(item.enqueued);
        if outcome == Outcome::Dispatched
            && matches!(band.cfg.fairness, FairnessPolicy::ProgramAware(_))
        {
            let now_ns = nanos(now.saturating_duration_since(self.epoch));
            self.programs
                .on_dispatch(seq, band.flow_id(item.flow), waited, now_ns);
        }
        band.remove(item.flow, item.key, item.bytes);
        if band.len == 0 {
            self.nonempty.remove(&item.band);
        }
        self.by_enqueue.remove(&(item.enqueued_ns, seq));
        if let Some(d) = item.deadline_ns {
            self.by_deadline.remove(&(d, seq));
        }
        self.total_len -= 1;
        self.total_bytes -= item.bytes;
        self.count(outcome);
        if outcome == Outcome::Dispatched && self.cfg.enable_eviction {
            let now_ns = self.ns(now);
            self.reclaim.track(seq, item.band, now_ns);
        }
        Decision {
            ticket: Ticket(seq),
            outcome,
            reason,
            priority: item.band,
            waited,
        }
    }

    /// With eviction on, revokes sheddable leases for the highest band with queued requests
    /// that the usage limit blocks and whose priority is above the next victim's (llm-d's
    /// trigger: blocked demand of strictly higher priority; a band whose ceiling is 0 can
    /// never be unblocked and is skipped).
    fn reclaim_for_blocked(&mut self, now: Instant) {
        let now_ns = self.ns(now);
        let Some(victim) = self.reclaim.next_victim_priority() else {
            return;
        };
        if !self.reclaim.may_decide(now_ns) {
            return;
        }
        let saturation = self.pool.saturation;
        let usage = self.cfg.usage_limit;
        let demand = self.nonempty.iter().rev().find_map(|&p| {
            if p <= victim {
                return None;
            }
            let rank = self.priorities.partition_point(|q| *q > p);
            let ceiling = usage.ceiling(rank, &self.priorities, saturation);
            (ceiling > 0.0 && saturation >= ceiling).then_some((p, ceiling))
        });
        let Some((priority, ceiling)) = demand else {
            return;
        };
        let n = revocations(saturation, ceiling, self.reclaim.len());
        for seq in self.reclaim.revoke(n, priority, now_ns) {
            self.revocations.push_back(Ticket(seq));
        }
    }

    /// The next dispatched request to revoke (in-flight eviction): the driver ends it with
    /// 429 and `x-llm-d-request-dropped-reason: evicted`, then reports
    /// [`handle_lease_end`](Self::handle_lease_end) once it is torn down.
    pub fn poll_revocation(&mut self) -> Option<Ticket> {
        self.revocations.pop_front()
    }

    /// A dispatched request ended (finished, failed, cancelled or revoked and torn down):
    /// its lease is released; for a revoked one this confirms the revocation.
    pub fn handle_lease_end(&mut self, ticket: Ticket, now: Instant) {
        let now_ns = self.ns(now);
        self.reclaim.end(ticket.0, now_ns);
    }

    /// Leases tracked for eviction, and revoked ones not yet ended
    /// (`flow_control_pending_reclaim` counts the latter).
    pub fn leases(&self) -> (usize, usize) {
        (self.reclaim.len(), self.reclaim.outstanding())
    }

    /// Leases revoked so far, and those confirmed by timeout instead of by their end.
    pub fn revocations_total(&self) -> (u64, u64) {
        (self.reclaim.revoked, self.reclaim.timed_out)
    }

    /// Queued requests (`flow_control_queue_size`).
    pub fn len(&self) -> u64 {
        self.total_len
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.total_len == 0
    }

    /// Queued bytes (`flow_control_queue_bytes`).
    pub fn bytes(&self) -> u64 {
        self.total_bytes
    }

    /// Whether `ticket` is still queued.
    pub fn contains(&self, ticket: Ticket) -> bool {
        self.items.contains_key(&ticket.0)
    }

    /// The last pool status given.
    pub fn pool(&self) -> PoolStatus {
        self.pool
    }

    /// How many requests ended with `outcome` (`flow_control_requests_total{outcome}`).
    pub fn outcome_total(&self, outcome: Outcome) -> u64 {
        self.outcomes[outcome.index()]
    }

    /// Per-band occupancy, lowest priority first.
    pub fn bands(&self) -> impl Iterator<Item = BandStats> + '_ {
        self.bands.iter().map(|(p, b)| BandStats {
            ceiling: self.cfg.usage_limit.ceiling(
                self.priorities.partition_point(|q| q > p),
                &self.priorities,
                self.pool.saturation,
            ),
            priority: *p,
            len: b.len,
            bytes: b.bytes,
            flows: b.flow_count(),
            max_requests: b.cfg.max_requests.get(),
            max_bytes: b.cfg.max_bytes.get(),
        })
    }

    /// Global (requests, bytes) utilization against the global caps; `None` where unlimited
    /// (`flow_control_global_capacity_utilization_{requests,bytes}`).
    pub fn global_utilization(&self) -> (Option<f64>, Option<f64>) {
        (
            self.cfg
                .max_requests
                .map(|m| self.total_len as f64 / m.get() as f64),
            self.cfg
                .max_bytes
                .map(|m| self.total_bytes as f64 / m.get() as f64),
        )
    }
}
