//! The node's own Prometheus metrics (served on `/metrics`): `infermesh_*`, and llm-d's
//! catalog (`epp`).

pub mod cluster;
pub mod epp;

use std::sync::atomic::AtomicU64;
use std::time::{Duration, Instant};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets, linear_buckets};
use prometheus_client::registry::Registry;

use crate::pool::PoolView;

/// How a request ended, as counted in `infermesh_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
pub enum Outcome {
    /// The model server answered 2xx and the response was passed through whole.
    Success,
    /// The model server answered with an error status.
    UpstreamStatus,
    /// The response stream broke after it started.
    UpstreamError,
    /// No endpoint could be connected to (proxy only).
    UpstreamUnreachable,
    /// The model server did not answer in time (proxy only).
    Timeout,
    /// The client or Envoy went away before the response finished.
    Cancelled,
    /// 400: the body could not be parsed.
    BadRequest,
    /// 404: the pool does not serve the model.
    UnknownModel,
    /// 413: the body is over the limit.
    TooLarge,
    /// 429: sheddable and the pool is saturated.
    Shed,
    /// 412: `Prefer: if-available` and the decode endpoint holds none of the prompt.
    CacheMiss,
    /// 503: no endpoint to schedule on.
    NoEndpoint,
    /// 500: an internal error.
    Internal,
}

/// Labels of `infermesh_requests_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// Model as the client sent it ("" when the body was unreadable).
    pub model: String,
    /// InferenceObjective name ("" when none).
    pub objective: String,
    /// How it ended.
    pub outcome: Outcome,
}

/// Labels of `infermesh_model_rewrite_decisions_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RewriteLabels {
    /// Model as the client sent it.
    pub model: String,
    /// Model the request was sent as.
    pub target: String,
}

/// A label set holding one endpoint address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct EndpointLabels {
    /// `ip:port`
    pub endpoint: String,
}

/// Result of one scrape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
pub enum ScrapeOutcome {
    /// Page fetched and understood.
    Ok,
    /// Connect, HTTP or timeout failure.
    Unreachable,
    /// The page lacked a required metric or was malformed.
    Invalid,
}

/// Kind of token in `infermesh_tokens_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelValue)]
pub enum TokenKind {
    /// Prompt tokens.
    Input,
    /// Generated tokens.
    Output,
    /// Prompt tokens served from the model server's prefix cache.
    Cached,
}

/// Labels of `infermesh_tokens_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TokenLabels {
    /// Which tokens.
    pub kind: TokenKind,
}

/// Labels of `infermesh_scrapes_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ScrapeLabels {
    /// How the scrape ended.
    pub outcome: ScrapeOutcome,
}

/// Labels of `llm_d_epp_flow_control_requests_total` and the queue-duration histogram.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct FlowOutcomeLabels {
    /// llm-d's outcome name (`Dispatched`, `RejectedCapacity`, `EvictedTTL`, ...).
    pub outcome: &'static str,
}

/// Labels of `llm_d_epp_flow_control_pool_saturation`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StageLabels {
    /// `effective` (the node does not split prefill and decode saturation).
    pub stage: &'static str,
}

/// Labels of `llm_d_epp_disagg_decision_total` and `llm_d_epp_pd_decision_total`, as
/// llm-d's disagg plugins label them.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct DecisionLabels {
    /// The profile handler's plugin name.
    pub plugin_name: String,
    /// The profile handler's type.
    pub plugin_type: &'static str,
    /// The target model (`unknown` when empty, as llm-d does).
    pub model_name: String,
    /// `decode-only`, `prefill-decode`, `encode-decode` or `encode-prefill-decode`.
    pub decision_type: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn queue_duration_histogram() -> Histogram {
    // 1 ms .. ~65 s: a request waits at most its TTL (60 s by default).
    Histogram::new(exponential_buckets(1e-3, 2.0, 17))
}

/// Flow-control metrics under llm-d's names (prefix `llm_d_epp_`).
#[derive(Debug)]
pub struct FlowMetrics {
    /// Terminal outcomes.
    pub requests: Family<FlowOutcomeLabels, Counter>,
    /// Time in the queue, by outcome.
    pub queue_duration: HistogramFamily<FlowOutcomeLabels>,
    /// Requests waiting now.
    pub queue_size: Gauge,
    /// Bytes waiting now.
    pub queue_bytes: Gauge,
    /// Pool saturation as the flow controller last measured it.
    pub pool_saturation: Family<StageLabels, Gauge<f64, AtomicU64>>,
    /// Revoked in-flight requests not yet torn down (in-flight eviction).
    pub pending_reclaim: Gauge,
    /// Time of one dispatch pass of the flow owner.
    pub dispatch_cycle: Histogram,
    /// Time to enqueue one request, by outcome (`enqueued`, `rejected`).
    pub enqueue_duration: HistogramFamily<EnqueueLabels>,
    /// Endpoints whose metrics are missing or older than the staleness threshold.
    pub stale_endpoints: Gauge,
    /// Jain's fairness index over programs' mean queue waits (`program-aware-fairness`).
    pub program_aware_jains_fairness_index: Gauge<f64, AtomicU64>,
    /// Whether flow control is on now; the flow owner sets it as it follows the policy,
    /// so it is the owner's view, the same one the queue gauges come from. Not exported
    /// (llm-d has no such family); the status page reads it.
    enabled: std::sync::atomic::AtomicBool,
}

/// Labels of `llm_d_epp_flow_control_request_enqueue_duration_seconds`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct EnqueueLabels {
    /// `enqueued` or `rejected`.
    pub outcome: &'static str,
}

fn fast_histogram() -> Histogram {
    // llm-d's buckets for the flow owner's own work: 0.1 ms .. 100 ms.
    Histogram::new([
        0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1,
    ])
}

impl FlowMetrics {
    fn register(r: &mut Registry) -> FlowMetrics {
        let m = FlowMetrics {
            requests: Family::default(),
            queue_duration: Family::new_with_constructor(queue_duration_histogram),
            queue_size: Gauge::default(),
            queue_bytes: Gauge::default(),
            pool_saturation: Family::default(),
            pending_reclaim: Gauge::default(),
            dispatch_cycle: fast_histogram(),
            enqueue_duration: Family::new_with_constructor(fast_histogram),
            stale_endpoints: Gauge::default(),
            program_aware_jains_fairness_index: Gauge::default(),
            enabled: std::sync::atomic::AtomicBool::new(false),
        };
        r.register(
            "program_aware_jains_fairness_index",
            "Jain's fairness index over the mean flow-control queue wait per program (program-aware-fairness; 1.0 is perfectly equal)",
            m.program_aware_jains_fairness_index.clone(),
        );
        r.register(
            "flow_control_dispatch_cycle_duration_seconds",
            "Time of one dispatch pass of the flow controller",
            m.dispatch_cycle.clone(),
        );
        r.register(
            "flow_control_request_enqueue_duration_seconds",
            "Time to enqueue a request into flow control, by outcome",
            m.enqueue_duration.clone(),
        );
        r.register(
            "flow_control_stale_endpoints",
            "Endpoints whose metrics are missing or stale",
            m.stale_endpoints.clone(),
        );
        r.register(
            "flow_control_requests",
            "Requests that left flow control, by outcome",
            m.requests.clone(),
        );
        r.register(
            "flow_control_request_queue_duration_seconds",
            "Time requests spent in the flow-control queue, by outcome",
            m.queue_duration.clone(),
        );
        r.register(
            "flow_control_queue_size",
            "Requests waiting in flow control",
            m.queue_size.clone(),
        );
        r.register(
            "flow_control_queue_bytes",
            "Request bytes waiting in flow control",
            m.queue_bytes.clone(),
        );
        r.register(
            "flow_control_pool_saturation",
            "Pool saturation seen by flow control (1.0 is the gating set point)",
            m.pool_saturation.clone(),
        );
        r.register(
            "flow_control_pending_reclaim",
            "In-flight requests revoked by eviction and not yet torn down",
            m.pending_reclaim.clone(),
        );
        m
    }
}

/// Labels of `infermesh_tokenizations_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenizeLabels {
    /// estimate, local, render or request.
    pub backend: &'static str,
    /// ok, cached or error.
    pub result: &'static str,
}

/// Labels of `infermesh_flow_mesh_waits_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MeshWaitLabels {
    /// remote, rerouted or fallback.
    pub result: &'static str,
}

/// Every metric the node exports, registered once.
#[derive(Debug)]
pub struct NodeMetrics {
    registry: Registry,
    /// Requests by model, objective and outcome.
    pub requests: Family<RequestLabels, Counter>,
    /// Time spent in admission + scheduling per request.
    pub scheduling_duration: Histogram,
    /// Requests sent to each endpoint (primary pick).
    pub picks: Family<EndpointLabels, Counter>,
    /// Fraction of the prompt's prefix blocks found on the picked endpoint.
    pub prefix_match_ratio: Histogram,
    /// Proxy attempts moved to another endpoint after a connect failure.
    pub retries: Counter,
    /// Running sheddable requests revoked by flow control's in-flight eviction.
    pub flow_revocations: Counter,
    /// Dispatches past their band's own ceiling (`fair-share-holdback-policy`).
    pub flow_lifted: Counter,
    /// Waits that went through the mesh's flow-control queue, by how.
    pub flow_mesh_waits: Family<MeshWaitLabels, Counter>,
    /// Tokens reported in responses' `usage`.
    pub tokens: Family<TokenLabels, Counter>,
    /// Scrapes by outcome.
    pub scrapes: Family<ScrapeLabels, Counter>,
    /// InferenceModelRewrite decisions by client model and chosen target.
    pub model_rewrite_decisions: Family<RewriteLabels, Counter>,
    /// Prompt tokenizations of the token producer by backend and result.
    pub tokenizations: Family<TokenizeLabels, Counter>,
    /// Flow control (llm-d's names).
    pub flow: FlowMetrics,
    /// llm-d's EPP catalog, with the GIE twins.
    pub epp: epp::EppMetrics,
    /// Disaggregation decisions of disagg-profile-handler (llm-d's name).
    pub disagg_decisions: Family<DecisionLabels, Counter>,
    /// Disaggregation decisions of the deprecated pd-profile-handler (llm-d's name).
    pub pd_decisions: Family<DecisionLabels, Counter>,
    endpoint_staleness: Family<EndpointLabels, Gauge<f64, AtomicU64>>,
    endpoint_up: Family<EndpointLabels, Gauge>,
    endpoint_in_flight: Family<EndpointLabels, Gauge>,
    // The `picks` counter of each endpoint by address: the request path counts a pick
    // without formatting the address or hashing a label set.
    pick_counters: parking_lot::RwLock<std::collections::HashMap<std::net::SocketAddr, Counter>>,
    // The three `tokens` counters (input, output, cached), taken once: every response adds
    // to them and a label lookup each time cost a hash and a lock.
    token_counters: [Counter; 3],
}

impl Default for NodeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl NodeMetrics {
    /// Creates and registers every metric.
    pub fn new() -> NodeMetrics {
        // Two prefixes: the node's own `infermesh_*` and llm-d's `llm_d_epp_*`.
        let mut root = Registry::default();
        let epp = root.sub_registry_with_prefix("llm_d_epp");
        let flow = FlowMetrics::register(epp);
        let disagg_decisions = Family::<DecisionLabels, Counter>::default();
        epp.register(
            "disagg_decision",
            "Total number of disaggregation routing decisions made",
            disagg_decisions.clone(),
        );
        let pd_decisions = Family::<DecisionLabels, Counter>::default();
        epp.register(
            "pd_decision",
            "Total number of P/D disaggregation decisions made",
            pd_decisions.clone(),
        );
        let prefix_match_ratio = Histogram::new(linear_buckets(0.1, 0.1, 10));
        // 10 µs .. ~20 ms: scheduling is expected in the tens of microseconds.
        let scheduling_duration = Histogram::new(exponential_buckets(1e-5, 2.0, 12));
        let epp = epp::EppMetrics::register(&mut root, &prefix_match_ratio, &scheduling_duration);
        let registry = root.sub_registry_with_prefix("infermesh");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by model, objective and outcome",
            requests.clone(),
        );
        registry.register(
            "scheduling_duration_seconds",
            "Admission plus scheduling time per request",
            scheduling_duration.clone(),
        );
        let picks = Family::<EndpointLabels, Counter>::default();
        registry.register(
            "endpoint_picks",
            "Requests scheduled to each endpoint",
            picks.clone(),
        );
        registry.register(
            "prefix_match_ratio",
            "Matched prefix blocks / prompt blocks on the picked endpoint",
            prefix_match_ratio.clone(),
        );
        let retries = Counter::default();
        registry.register(
            "proxy_retries",
            "Proxy attempts retried on another endpoint",
            retries.clone(),
        );
        let flow_revocations = Counter::default();
        registry.register(
            "flow_control_revocations",
            "Running sheddable requests revoked by in-flight eviction (enableEviction)",
            flow_revocations.clone(),
        );
        let flow_lifted = Counter::default();
        registry.register(
            "flow_control_lifted_dispatches",
            "Requests dispatched past their band's own ceiling because their flow had less than its share of the band's attained service (fair-share-holdback-policy)",
            flow_lifted.clone(),
        );
        let flow_mesh_waits = Family::<MeshWaitLabels, Counter>::default();
        registry.register(
            "flow_mesh_waits",
            "Flow-control waits sent to the mesh queue's owner: answered there (remote), moved to a new owner (rerouted), or held in this node's queue because the owner was unreachable (fallback)",
            flow_mesh_waits.clone(),
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        let token_counters = [TokenKind::Input, TokenKind::Output, TokenKind::Cached]
            .map(|kind| tokens.get_or_create(&TokenLabels { kind }).clone());
        registry.register(
            "tokens",
            "Tokens reported in responses' usage",
            tokens.clone(),
        );
        let scrapes = Family::<ScrapeLabels, Counter>::default();
        registry.register(
            "scrapes",
            "Model-server /metrics scrapes by outcome",
            scrapes.clone(),
        );
        let model_rewrite_decisions = Family::<RewriteLabels, Counter>::default();
        registry.register(
            "model_rewrite_decisions",
            "Requests whose model an InferenceModelRewrite replaced, by model and target",
            model_rewrite_decisions.clone(),
        );
        let tokenizations = Family::<TokenizeLabels, Counter>::default();
        registry.register(
            "tokenizations",
            "Prompt tokenizations for precise prefix matching, by backend and result (ok, cached, error)",
            tokenizations.clone(),
        );
        let endpoint_staleness = Family::<EndpointLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "endpoint_metrics_age_seconds",
            "Age of each endpoint's last successful scrape",
            endpoint_staleness.clone(),
        );
        let endpoint_up = Family::<EndpointLabels, Gauge>::default();
        registry.register(
            "endpoint_up",
            "1 when the endpoint's last scrape succeeded",
            endpoint_up.clone(),
        );
        let endpoint_in_flight = Family::<EndpointLabels, Gauge>::default();
        registry.register(
            "endpoint_in_flight_requests",
            "Requests this node has in flight on each endpoint",
            endpoint_in_flight.clone(),
        );
        NodeMetrics {
            registry: root,
            flow,
            epp,
            disagg_decisions,
            pd_decisions,
            requests,
            scheduling_duration,
            picks,
            prefix_match_ratio,
            retries,
            flow_revocations,
            flow_lifted,
            flow_mesh_waits,
            tokens,
            scrapes,
            model_rewrite_decisions,
            tokenizations,
            endpoint_staleness,
            endpoint_up,
            endpoint_in_flight,
            pick_counters: Default::default(),
            token_counters,
        }
    }

    /// Counts one tokenization by `backend` with `result` (ok, cached, error).
    pub fn count_tokenization(&self, backend: &'static str, result: &'static str) {
        self.tokenizations
            .get_or_create(&TokenizeLabels { backend, result })
            .inc();
    }

    /// Counts one primary pick of `endpoint` in `infermesh_picks_total`.
    pub fn count_pick(&self, endpoint: std::net::SocketAddr) {
        if let Some(c) = self.pick_counters.read().get(&endpoint) {
            c.inc();
            return;
        }
        let c = self
            .picks
            .get_or_create(&EndpointLabels {
                endpoint: endpoint.to_string(),
            })
            .clone();
        c.inc();
        self.pick_counters.write().insert(endpoint, c);
    }

    /// Counts one request's disaggregation decision in the family `counter` names.
    pub fn count_decision(
        &self,
        counter: &infermesh_scheduler::DecisionCounter,
        model: &str,
        decision: infermesh_scheduler::DisaggDecision,
    ) {
        let family = match counter.family {
            infermesh_scheduler::DecisionFamily::Disagg => &self.disagg_decisions,
            infermesh_scheduler::DecisionFamily::Pd => &self.pd_decisions,
        };
        family
            .get_or_create(&DecisionLabels {
                plugin_name: counter.plugin_name.clone(),
                plugin_type: counter.plugin_type,
                model_name: if model.is_empty() { "unknown" } else { model }.to_owned(),
                decision_type: decision.as_str(),
            })
            .inc();
    }

    /// Counts one finished request.
    pub fn count_request(&self, model: &str, objective: &str, outcome: Outcome) {
        self.requests
            .get_or_create(&RequestLabels {
                model: model.to_owned(),
                objective: objective.to_owned(),
                outcome,
            })
            .inc();
    }

    /// Adds one response's reported usage.
    pub fn count_tokens(&self, usage: crate::usage::Usage) {
        let [input, output, cached] = &self.token_counters;
        input.inc_by(usage.prompt_tokens);
        output.inc_by(usage.completion_tokens);
        cached.inc_by(usage.cached_tokens);
    }

    /// Counts one flow-control outcome; `waited` is set for requests that were queued.
    pub fn count_flow_outcome(
        &self,
        outcome: infermesh_scheduler::flow::Outcome,
        waited: Option<Duration>,
    ) {
        let labels = FlowOutcomeLabels {
            outcome: outcome.as_str(),
        };
        self.flow.requests.get_or_create(&labels).inc();
        if let Some(w) = waited {
            self.flow
                .queue_duration
                .get_or_create(&labels)
                .observe(w.as_secs_f64());
        }
    }

    /// Counts one wait that went through the mesh's queue, by how (`remote`, `rerouted`,
    /// `fallback`).
    pub fn count_flow_mesh_wait(&self, result: &'static str) {
        self.flow_mesh_waits
            .get_or_create(&MeshWaitLabels { result })
            .inc();
    }

    /// Counts one in-flight eviction.
    pub fn count_flow_revocation(&self) {
        self.flow_revocations.inc();
    }

    /// Counts `n` dispatches past their band's own ceiling.
    pub fn count_flow_lifted(&self, n: u64) {
        self.flow_lifted.inc_by(n);
    }

    /// Sets the count of revoked requests not yet torn down.
    pub fn set_flow_pending_reclaim(&self, revoked: usize) {
        self.flow
            .pending_reclaim
            .set(i64::try_from(revoked).unwrap_or(i64::MAX));
    }

    /// Sets `program_aware_jains_fairness_index`.
    pub fn set_program_fairness_index(&self, index: f64) {
        self.flow.program_aware_jains_fairness_index.set(index);
    }

    /// Records whether flow control is on (the flow owner calls it on every switch).
    pub fn set_flow_enabled(&self, on: bool) {
        self.flow
            .enabled
            .store(on, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether flow control is on now.
    pub fn flow_enabled(&self) -> bool {
        self.flow.enabled.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets the flow-control queue gauges.
    pub fn set_flow_queue(&self, requests: u64, bytes: u64) {
        self.flow
            .queue_size
            .set(i64::try_from(requests).unwrap_or(i64::MAX));
        self.flow
            .queue_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Sets the pool saturation flow control measured.
    pub fn set_flow_saturation(&self, saturation: f64) {
        self.flow
            .pool_saturation
            .get_or_create(&StageLabels { stage: "effective" })
            .set(saturation);
    }

    /// Counts one scrape.
    pub fn count_scrape(&self, outcome: ScrapeOutcome) {
        self.scrapes.get_or_create(&ScrapeLabels { outcome }).inc();
        if outcome != ScrapeOutcome::Ok {
            self.epp.poll_error();
        }
    }

    /// Renders the text exposition, refreshing the per-endpoint and pool gauges from
    /// `pool` first.
    pub fn render(&self, pool: &PoolView, now: Instant) -> String {
        self.render_with(pool, now, 0)
    }

    /// [`Self::render`] with the prefix index entries this node holds.
    pub fn render_with(&self, pool: &PoolView, now: Instant, prefix_entries: usize) -> String {
        self.epp.refresh(pool, prefix_entries);
        self.endpoint_staleness.clear();
        self.endpoint_up.clear();
        self.endpoint_in_flight.clear();
        for slot in &pool.slots {
            let labels = EndpointLabels {
                endpoint: slot.address().to_string(),
            };
            let age = slot.metrics().map_or(f64::INFINITY, |m| {
                now.saturating_duration_since(m.scraped_at).as_secs_f64()
            });
            self.endpoint_staleness.get_or_create(&labels).set(age);
            self.endpoint_up
                .get_or_create(&labels)
                .set(i64::from(slot.is_up()));
            self.endpoint_in_flight
                .get_or_create(&labels)
                .set(i64::from(slot.in_flight().requests));
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    /// Records the scheduling time of one request.
    pub fn observe_scheduling(&self, took: Duration) {
        self.scheduling_duration.observe(took.as_secs_f64());
    }
}
