//! llm-d's EPP metric catalog (`llm_d_epp_*`, llm-d v0.10 `docs/metrics.md`): request,
//! latency, pool, scheduler, prefix-index and in-flight families with llm-d's names, labels
//! and buckets, and the GIE names a dashboard written for the Gateway API Inference
//! Extension reads (`inference_objective_*`, `inference_pool_*`, `inference_extension_*`)
//! emitted as twins of the same series.
//!
//! Model names and fairness ids are each capped at [`LABEL_CAP`] distinct values; later
//! ones are reported as `other`, as llm-d does, so a client inventing names cannot grow the
//! exposition without bound. Names an InferenceModelRewrite configures are never folded.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::RwLock;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::Outcome;
use crate::pool::PoolView;
use crate::usage::ResponseReport;

/// Distinct model names (and, separately, fairness ids) before new ones read `other`.
pub const LABEL_CAP: usize = 1000;

/// The label value standing for every name past the cap.
pub const OTHER: &str = "other";

/// Labels of the request families: `{model_name, target_model_name, fairness_id, priority}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RequestLabels {
    /// The model the client asked for.
    pub model_name: String,
    /// The model after any rewrite.
    pub target_model_name: String,
    /// The flow-control fairness id.
    pub fairness_id: String,
    /// The InferenceObjective's priority.
    pub priority: String,
}

/// [`RequestLabels`] with llm-d's `error_code`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The model the client asked for.
    pub model_name: String,
    /// The model after any rewrite.
    pub target_model_name: String,
    /// The flow-control fairness id.
    pub fairness_id: String,
    /// The InferenceObjective's priority.
    pub priority: String,
    /// llm-d's error code.
    pub error_code: &'static str,
}

/// [`RequestLabels`] with `streaming` (TTFT).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct StreamingLabels {
    /// The model the client asked for.
    pub model_name: String,
    /// The model after any rewrite.
    pub target_model_name: String,
    /// The flow-control fairness id.
    pub fairness_id: String,
    /// The InferenceObjective's priority.
    pub priority: String,
    /// `true` for SSE responses.
    pub streaming: &'static str,
}

/// `{name}` of the pool families.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PoolLabels {
    /// The InferencePool.
    pub name: String,
}

/// `{name, model_server_endpoint}` of `per_endpoint_queue_size`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct EndpointQueueLabels {
    /// The InferencePool.
    pub name: String,
    /// The endpoint, `ip:port`.
    pub model_server_endpoint: String,
}

/// The GIE twin's `{name, model_server_pod}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PodQueueLabels {
    /// The InferencePool.
    pub name: String,
    /// The endpoint, `ip:port`.
    pub model_server_pod: String,
}

/// `{endpoint_name, namespace, producer_name, fairness_id, priority}` of the in-flight
/// families (this node's own counts; fairness and priority are not split per endpoint).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct InflightLabels {
    /// The endpoint, `ip:port`.
    pub endpoint_name: String,
    /// Kubernetes namespace (empty outside Kubernetes).
    pub namespace: String,
    /// The producer counting them.
    pub producer_name: &'static str,
    /// Not split per endpoint: empty.
    pub fairness_id: &'static str,
    /// Not split per endpoint: empty.
    pub priority: &'static str,
}

/// `{status, target_model_name}` of `scheduler_attempts_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct AttemptLabels {
    /// `success` or `failure`.
    pub status: &'static str,
    /// The model after any rewrite.
    pub target_model_name: String,
}

/// `{extension_point, plugin_type, plugin_name}` of `plugin_duration_seconds`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PluginLabels {
    /// `Filter`, `Scorer` or `Picker`.
    pub extension_point: &'static str,
    /// The llm-d type name.
    pub plugin_type: &'static str,
    /// The configured name.
    pub plugin_name: String,
}

/// `{commit, build_ref}` of `info`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct InfoLabels {
    /// The build's commit (the crate version when unknown).
    pub commit: String,
    /// The build's version.
    pub build_ref: String,
}

/// `{source_type}` of `datalayer_poll_errors_total`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SourceLabels {
    /// The data source's type (`metrics-data-source`).
    pub source_type: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency() -> Histogram {
    // llm-d's generalLatencyBuckets.
    Histogram::new([
        0.005, 0.025, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0,
        10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 120.0, 180.0, 240.0, 300.0, 360.0, 480.0, 600.0, 900.0,
        1200.0, 1800.0, 2700.0, 3600.0,
    ])
}

fn token_latency() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
    ])
}

fn request_bytes() -> Histogram {
    Histogram::new((6..=30).map(|p| f64::from(1u32 << p)))
}

fn response_bytes() -> Histogram {
    Histogram::new((0..=16).map(|p| f64::from(1u32 << p)))
}

fn tokens() -> Histogram {
    Histogram::new([
        1.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0,
        32768.0, 65536.0, 131072.0, 262144.0, 524288.0, 1048576.0,
    ])
}

fn scheduler_latency() -> Histogram {
    Histogram::new([
        0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1,
    ])
}

/// A request's label values, taken once from the scheduled request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestKey {
    model: String,
    target: String,
    fairness_id: String,
    priority: i32,
}

impl RequestKey {
    /// The labels of `req`.
    pub fn of(req: &infermesh_scheduler::InferenceRequest) -> RequestKey {
        RequestKey {
            model: req.model.clone(),
            target: req.target_model.clone(),
            fairness_id: req.fairness_id.clone(),
            priority: req.priority,
        }
    }

    /// The labels of a request rejected before it was scheduled.
    pub fn rejected(model: &str, fairness_id: &str, priority: i32) -> RequestKey {
        RequestKey {
            model: model.to_owned(),
            target: model.to_owned(),
            fairness_id: fairness_id.to_owned(),
            priority,
        }
    }
}

/// A request's timeline, for the duration families.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// When the node received it.
    pub started: Instant,
    /// When it ended.
    pub ended: Instant,
    /// Request body bytes.
    pub request_bytes: u64,
    /// The client asked for SSE.
    pub streaming: bool,
}

/// llm-d's error code for an outcome (`None`: not an error).
pub fn error_code(outcome: Outcome) -> Option<&'static str> {
    match outcome {
        Outcome::Success | Outcome::Cancelled => None,
        Outcome::BadRequest | Outcome::TooLarge | Outcome::CacheMiss => Some("BadRequest"),
        Outcome::UnknownModel => Some("BadConfiguration"),
        Outcome::Shed => Some("InferencePoolResourceExhausted"),
        Outcome::NoEndpoint => Some("ServiceUnavailable"),
        Outcome::UpstreamStatus
        | Outcome::UpstreamError
        | Outcome::UpstreamUnreachable
        | Outcome::Timeout => Some("ModelServerError"),
        Outcome::Internal => Some("Internal"),
    }
}

/// A set of label values capped at [`LABEL_CAP`].
#[derive(Debug, Default)]
struct Capped {
    seen: RwLock<HashSet<String>>,
    /// Never folded (rewrite-configured model names).
    pinned: RwLock<HashSet<String>>,
}

impl Capped {
    fn label(&self, v: &str) -> String {
        if self.seen.read().contains(v) || self.pinned.read().contains(v) {
            return v.to_owned();
        }
        let mut seen = self.seen.write();
        if seen.len() < LABEL_CAP {
            seen.insert(v.to_owned());
            return v.to_owned();
        }
        OTHER.to_owned()
    }
}

/// The llm-d EPP catalog families, registered once.
#[derive(Debug)]
pub struct EppMetrics {
    requests: Family<RequestLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    duration: HistogramFamily<RequestLabels>,
    request_size: HistogramFamily<RequestLabels>,
    response_size: HistogramFamily<RequestLabels>,
    input_tokens: HistogramFamily<RequestLabels>,
    output_tokens: HistogramFamily<RequestLabels>,
    cached_tokens: HistogramFamily<RequestLabels>,
    running: Family<RequestLabels, Gauge>,
    ntpot: HistogramFamily<RequestLabels>,
    ttft: HistogramFamily<StreamingLabels>,
    tpot: HistogramFamily<RequestLabels>,
    itl: HistogramFamily<RequestLabels>,
    ready: Family<PoolLabels, Gauge>,
    avg_kv: Family<PoolLabels, Gauge<f64, AtomicU64>>,
    avg_queue: Family<PoolLabels, Gauge<f64, AtomicU64>>,
    avg_running: Family<PoolLabels, Gauge<f64, AtomicU64>>,
    sd_kv: Family<PoolLabels, Gauge<f64, AtomicU64>>,
    sd_queue: Family<PoolLabels, Gauge<f64, AtomicU64>>,
    sd_running: Family<PoolLabels, Gauge<f64, AtomicU64>>,
    per_endpoint_queue: Family<EndpointQueueLabels, Gauge>,
    per_pod_queue: Family<PodQueueLabels, Gauge>,
    scheduler_e2e: Histogram,
    attempts: Family<AttemptLabels, Counter>,
    plugin_duration: HistogramFamily<PluginLabels>,
    prefix_size: Gauge,
    prefix_hit_bytes: Histogram,
    inflight_requests: Family<InflightLabels, Gauge>,
    inflight_tokens: Family<InflightLabels, Gauge>,
    poll_errors: Family<SourceLabels, Counter>,
    models: Capped,
    fairness: Capped,
    /// Plain totals for the status page's rates (ended requests; TTFT sum in µs; count).
    totals: Totals,
}

/// Running totals the status page turns into rates.
#[derive(Debug, Default)]
struct Totals {
    ended: std::sync::atomic::AtomicU64,
    ttft_us: std::sync::atomic::AtomicU64,
    ttft_count: std::sync::atomic::AtomicU64,
}

/// A snapshot of [`EppMetrics`] totals for the status page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TotalsSnapshot {
    /// Requests that ended (any outcome), since the node started.
    pub requests: u64,
    /// Sum of recorded TTFTs, microseconds.
    pub ttft_us: u64,
    /// TTFT samples.
    pub ttft_count: u64,
}

impl EppMetrics {
    /// Registers the catalog under `llm_d_epp_` and the GIE twins under their old prefixes
    /// in `root`; `prefix_hit_ratio` is the node's own match-ratio histogram, exported under
    /// llm-d's name too.
    /// `processing` is the node's admission-plus-scheduling histogram (llm-d's request
    /// processing time: from the parsed body to the pick).
    pub fn register(
        root: &mut Registry,
        prefix_hit_ratio: &Histogram,
        processing: &Histogram,
    ) -> Self {
        let m = EppMetrics {
            requests: Family::default(),
            errors: Family::default(),
            duration: Family::new_with_constructor(latency),
            request_size: Family::new_with_constructor(request_bytes),
            response_size: Family::new_with_constructor(response_bytes),
            input_tokens: Family::new_with_constructor(tokens),
            output_tokens: Family::new_with_constructor(tokens),
            cached_tokens: Family::new_with_constructor(tokens),
            running: Family::default(),
            ntpot: Family::new_with_constructor(token_latency),
            ttft: Family::new_with_constructor(latency),
            tpot: Family::new_with_constructor(token_latency),
            itl: Family::new_with_constructor(token_latency),
            ready: Family::default(),
            avg_kv: Family::default(),
            avg_queue: Family::default(),
            avg_running: Family::default(),
            sd_kv: Family::default(),
            sd_queue: Family::default(),
            sd_running: Family::default(),
            per_endpoint_queue: Family::default(),
            per_pod_queue: Family::default(),
            scheduler_e2e: scheduler_latency(),
            attempts: Family::default(),
            plugin_duration: Family::new_with_constructor(scheduler_latency),
            prefix_size: Gauge::default(),
            prefix_hit_bytes: Histogram::new((6..=24).map(|p| f64::from(1u32 << p))),
            inflight_requests: Family::default(),
            inflight_tokens: Family::default(),
            poll_errors: Family::default(),
            models: Capped::default(),
            fairness: Capped::default(),
            totals: Totals::default(),
        };
        // The node always polls this source: its error count exists from the start at 0.
        m.poll_errors
            .get_or_create(&SourceLabels {
                source_type: "metrics-data-source",
            })
            .inc_by(0);
        let info = Family::<InfoLabels, Gauge>::default();
        info.get_or_create(&InfoLabels {
            commit: option_env!("INFERMESH_COMMIT")
                .unwrap_or(env!("CARGO_PKG_VERSION"))
                .to_owned(),
            build_ref: env!("CARGO_PKG_VERSION").to_owned(),
        })
        .set(1);
        {
            let r = root.sub_registry_with_prefix("llm_d_epp");
            r.register(
                "request",
                "Requests by model, target model, fairness id and priority",
                m.requests.clone(),
            );
            r.register(
                "request_error",
                "Failed requests by error code",
                m.errors.clone(),
            );
            r.register(
                "request_duration_seconds",
                "Request latency from receipt to the end of the response",
                m.duration.clone(),
            );
            r.register(
                "request_size_bytes",
                "Request body sizes",
                m.request_size.clone(),
            );
            r.register(
                "response_size_bytes",
                "Response body sizes",
                m.response_size.clone(),
            );
            r.register(
                "request_input_tokens",
                "Prompt tokens the model server reported",
                m.input_tokens.clone(),
            );
            r.register(
                "request_output_tokens",
                "Output tokens the model server reported",
                m.output_tokens.clone(),
            );
            r.register(
                "request_cached_tokens",
                "Cached prompt tokens the model server reported",
                m.cached_tokens.clone(),
            );
            r.register(
                "request_running",
                "Requests in flight through this node",
                m.running.clone(),
            );
            r.register(
                "request_ntpot_seconds",
                "Request latency divided by output tokens",
                m.ntpot.clone(),
            );
            r.register(
                "request_ttft_seconds",
                "Time from receipt to the first response body chunk",
                m.ttft.clone(),
            );
            r.register(
                "request_streaming_tpot_seconds",
                "Time per output token after the first, streaming requests",
                m.tpot.clone(),
            );
            r.register(
                "request_streaming_itl_seconds",
                "Time between response body chunks, streaming requests",
                m.itl.clone(),
            );
            r.register(
                "ready_endpoints",
                "Ready endpoints in the pool",
                m.ready.clone(),
            );
            r.register(
                "average_kv_cache_utilization",
                "Mean KV-cache utilization over the pool's ready endpoints",
                m.avg_kv.clone(),
            );
            r.register(
                "average_queue_size",
                "Mean waiting requests over the pool's ready endpoints",
                m.avg_queue.clone(),
            );
            r.register(
                "average_running_requests",
                "Mean running requests over the pool's ready endpoints",
                m.avg_running.clone(),
            );
            r.register(
                "std_dev_kv_cache_utilization",
                "Standard deviation of KV-cache utilization over ready endpoints",
                m.sd_kv.clone(),
            );
            r.register(
                "std_dev_queue_size",
                "Standard deviation of waiting requests over ready endpoints",
                m.sd_queue.clone(),
            );
            r.register(
                "std_dev_running_requests",
                "Standard deviation of running requests over ready endpoints",
                m.sd_running.clone(),
            );
            r.register(
                "per_endpoint_queue_size",
                "Waiting requests per endpoint",
                m.per_endpoint_queue.clone(),
            );
            r.register(
                "scheduler_e2e_duration_seconds",
                "Scheduling cycle latency",
                m.scheduler_e2e.clone(),
            );
            r.register(
                "scheduler_attempts",
                "Scheduling attempts by status",
                m.attempts.clone(),
            );
            r.register(
                "plugin_duration_seconds",
                "Plugin call latency by extension point, plugin type and name",
                m.plugin_duration.clone(),
            );
            r.register(
                "request_processing_duration_seconds",
                "Time from the parsed request body to the pick (admission and scheduling)",
                processing.clone(),
            );
            r.register("info", "Build information", info.clone());
            r.register(
                "prefix_indexer_size",
                "Entries in the approximate prefix index held by this node",
                m.prefix_size.clone(),
            );
            r.register(
                "prefix_indexer_hit_ratio",
                "Matched prefix blocks / prompt blocks on the picked endpoint",
                prefix_hit_ratio.clone(),
            );
            r.register(
                "prefix_indexer_hit_bytes",
                "Prompt bytes matched on the picked endpoint",
                m.prefix_hit_bytes.clone(),
            );
            r.register(
                "inflight_requests",
                "Requests this node has in flight on each endpoint",
                m.inflight_requests.clone(),
            );
            r.register(
                "inflight_tokens",
                "Tokens this node has in flight on each endpoint",
                m.inflight_tokens.clone(),
            );
            r.register(
                "datalayer_poll_errors",
                "Data-source poll failures by source type",
                m.poll_errors.clone(),
            );
        }
        {
            let r = root.sub_registry_with_prefix("inference_objective");
            r.register(
                "request",
                "Deprecated GIE name of llm_d_epp_request_total",
                m.requests.clone(),
            );
            r.register(
                "request_error",
                "Deprecated GIE name of llm_d_epp_request_error_total",
                m.errors.clone(),
            );
            r.register(
                "request_duration_seconds",
                "Deprecated GIE name of llm_d_epp_request_duration_seconds",
                m.duration.clone(),
            );
            r.register(
                "request_sizes",
                "Deprecated GIE name of llm_d_epp_request_size_bytes",
                m.request_size.clone(),
            );
            r.register(
                "response_sizes",
                "Deprecated GIE name of llm_d_epp_response_size_bytes",
                m.response_size.clone(),
            );
            r.register(
                "input_tokens",
                "Deprecated GIE name of llm_d_epp_request_input_tokens",
                m.input_tokens.clone(),
            );
            r.register(
                "output_tokens",
                "Deprecated GIE name of llm_d_epp_request_output_tokens",
                m.output_tokens.clone(),
            );
            r.register(
                "prompt_cached_tokens",
                "Deprecated GIE name of llm_d_epp_request_cached_tokens",
                m.cached_tokens.clone(),
            );
            r.register(
                "running_requests",
                "Deprecated GIE name of llm_d_epp_request_running",
                m.running.clone(),
            );
            r.register(
                "normalized_time_per_output_token_seconds",
                "Deprecated GIE name of llm_d_epp_request_ntpot_seconds",
                m.ntpot.clone(),
            );
        }
        {
            let r = root.sub_registry_with_prefix("inference_pool");
            r.register(
                "ready_pods",
                "Deprecated GIE name of llm_d_epp_ready_endpoints",
                m.ready.clone(),
            );
            r.register(
                "average_kv_cache_utilization",
                "Deprecated GIE name of llm_d_epp_average_kv_cache_utilization",
                m.avg_kv.clone(),
            );
            r.register(
                "average_queue_size",
                "Deprecated GIE name of llm_d_epp_average_queue_size",
                m.avg_queue.clone(),
            );
            r.register(
                "average_running_requests",
                "Deprecated GIE name of llm_d_epp_average_running_requests",
                m.avg_running.clone(),
            );
            r.register(
                "per_pod_queue_size",
                "Deprecated GIE name of llm_d_epp_per_endpoint_queue_size",
                m.per_pod_queue.clone(),
            );
        }
        {
            let r = root.sub_registry_with_prefix("inference_extension");
            r.register(
                "scheduler_e2e_duration_seconds",
                "Deprecated GIE name of llm_d_epp_scheduler_e2e_duration_seconds",
                m.scheduler_e2e.clone(),
            );
            r.register(
                "plugin_duration_seconds",
                "Deprecated GIE name of llm_d_epp_plugin_duration_seconds",
                m.plugin_duration.clone(),
            );
            r.register("info", "Deprecated GIE name of llm_d_epp_info", info);
            r.register(
                "prefix_indexer_size",
                "Deprecated GIE name of llm_d_epp_prefix_indexer_size",
                m.prefix_size.clone(),
            );
            r.register(
                "prefix_indexer_hit_ratio",
                "Deprecated GIE name of llm_d_epp_prefix_indexer_hit_ratio",
                prefix_hit_ratio.clone(),
            );
            r.register(
                "prefix_indexer_hit_bytes",
                "Deprecated GIE name of llm_d_epp_prefix_indexer_hit_bytes",
                m.prefix_hit_bytes.clone(),
            );
        }
        m
    }

    /// Never folds these model names into `other` (an InferenceModelRewrite's names).
    pub fn pin_models<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        for n in names {
            if !self.models.pinned.read().contains(n) {
                self.models.pinned.write().insert(n.to_owned());
            }
        }
    }

    fn labels(&self, k: &RequestKey) -> RequestLabels {
        RequestLabels {
            model_name: self.models.label(&k.model),
            target_model_name: self.models.label(&k.target),
            fairness_id: self.fairness.label(&k.fairness_id),
            priority: k.priority.to_string(),
        }
    }

    /// A request was scheduled and is now running through this node.
    pub fn request_started(&self, k: &RequestKey) {
        self.running.get_or_create(&self.labels(k)).inc();
    }

    /// A scheduled request ended with `outcome`; `report` is what its body showed.
    pub fn request_done(
        &self,
        k: &RequestKey,
        outcome: Outcome,
        t: Timing,
        report: Option<&ResponseReport>,
    ) {
        let l = self.labels(k);
        self.running.get_or_create(&l).dec();
        self.requests.get_or_create(&l).inc();
        self.totals.ended.fetch_add(1, Ordering::Relaxed);
        self.request_size
            .get_or_create(&l)
            .observe(t.request_bytes as f64);
        if let Some(code) = error_code(outcome) {
            self.count_error(&l, code);
            return;
        }
        if outcome != Outcome::Success {
            return;
        }
        let total = t.ended.saturating_duration_since(t.started).as_secs_f64();
        self.duration.get_or_create(&l).observe(total);
        let Some(r) = report else {
            return;
        };
        self.response_size.get_or_create(&l).observe(r.bytes as f64);
        if let Some(first) = r.first_chunk {
            let ttft = first.saturating_duration_since(t.started);
            self.totals.ttft_us.fetch_add(
                u64::try_from(ttft.as_micros()).unwrap_or(u64::MAX),
                Ordering::Relaxed,
            );
            self.totals.ttft_count.fetch_add(1, Ordering::Relaxed);
            self.ttft
                .get_or_create(&StreamingLabels {
                    model_name: l.model_name.clone(),
                    target_model_name: l.target_model_name.clone(),
                    fairness_id: l.fairness_id.clone(),
                    priority: l.priority.clone(),
                    streaming: if t.streaming { "true" } else { "false" },
                })
                .observe(first.saturating_duration_since(t.started).as_secs_f64());
        }
        if t.streaming {
            let itl = self.itl.get_or_create(&l);
            for g in &r.gaps {
                itl.observe(f64::from(*g));
            }
        }
        let Some(u) = r.usage else {
            return;
        };
        self.input_tokens
            .get_or_create(&l)
            .observe(u.prompt_tokens as f64);
        self.output_tokens
            .get_or_create(&l)
            .observe(u.completion_tokens as f64);
        self.cached_tokens
            .get_or_create(&l)
            .observe(u.cached_tokens as f64);
        if u.completion_tokens > 0 {
            self.ntpot
                .get_or_create(&l)
                .observe(total / u.completion_tokens as f64);
        }
        if t.streaming
            && u.completion_tokens > 1
            && let (Some(first), Some(last)) = (r.first_chunk, r.last_chunk)
        {
            self.tpot.get_or_create(&l).observe(
                last.saturating_duration_since(first).as_secs_f64()
                    / (u.completion_tokens - 1) as f64,
            );
        }
    }

    /// The running totals (for the status page).
    pub fn totals(&self) -> TotalsSnapshot {
        TotalsSnapshot {
            requests: self.totals.ended.load(Ordering::Relaxed),
            ttft_us: self.totals.ttft_us.load(Ordering::Relaxed),
            ttft_count: self.totals.ttft_count.load(Ordering::Relaxed),
        }
    }

    /// A request rejected before it was scheduled.
    pub fn rejected(&self, k: &RequestKey, outcome: Outcome) {
        let l = self.labels(k);
        self.requests.get_or_create(&l).inc();
        self.totals.ended.fetch_add(1, Ordering::Relaxed);
        if let Some(code) = error_code(outcome) {
            self.count_error(&l, code);
        }
    }

    fn count_error(&self, l: &RequestLabels, code: &'static str) {
        self.errors
            .get_or_create(&ErrorLabels {
                model_name: l.model_name.clone(),
                target_model_name: l.target_model_name.clone(),
                fairness_id: l.fairness_id.clone(),
                priority: l.priority.clone(),
                error_code: code,
            })
            .inc();
    }

    /// One scheduling cycle took `secs`, and found an endpoint or not.
    pub fn scheduled(&self, target_model: &str, secs: f64, success: bool) {
        self.scheduler_e2e.observe(secs);
        self.attempts
            .get_or_create(&AttemptLabels {
                status: if success { "success" } else { "failure" },
                target_model_name: self.models.label(target_model),
            })
            .inc();
    }

    /// One plugin call took `nanos`.
    pub fn plugin_call(&self, label: &infermesh_scheduler::scheduler::PluginLabel, nanos: u32) {
        self.plugin_duration
            .get_or_create(&PluginLabels {
                extension_point: label.extension_point,
                plugin_type: label.plugin_type,
                plugin_name: label.plugin_name.clone(),
            })
            .observe(f64::from(nanos) * 1e-9);
    }

    /// Prompt bytes matched on the picked endpoint.
    pub fn prefix_hit(&self, bytes: f64) {
        self.prefix_hit_bytes.observe(bytes);
    }

    /// A metrics scrape of a pod failed.
    pub fn poll_error(&self) {
        self.poll_errors
            .get_or_create(&SourceLabels {
                source_type: "metrics-data-source",
            })
            .inc();
    }

    /// Refreshes the pool gauges from `pool` (ready = up with scraped metrics) and the
    /// prefix index size.
    pub fn refresh(&self, pool: &PoolView, prefix_entries: usize) {
        let name = PoolLabels {
            name: pool.name.clone(),
        };
        self.per_endpoint_queue.clear();
        self.per_pod_queue.clear();
        self.inflight_requests.clear();
        self.inflight_tokens.clear();
        let (mut kv, mut queue, mut running) = (Vec::new(), Vec::new(), Vec::new());
        for slot in &pool.slots {
            let endpoint = slot.address().to_string();
            let f = slot.in_flight();
            let il = InflightLabels {
                endpoint_name: endpoint.clone(),
                namespace: String::new(),
                producer_name: "inflight-load-producer",
                fairness_id: "",
                priority: "",
            };
            self.inflight_requests
                .get_or_create(&il)
                .set(i64::from(f.requests));
            self.inflight_tokens
                .get_or_create(&il)
                .set(i64::try_from(f.tokens).unwrap_or(i64::MAX));
            let Some(m) = slot.metrics().filter(|_| slot.is_up()) else {
                continue;
            };
            kv.push(m.kv_cache_usage);
            queue.push(f64::from(m.waiting_queue));
            running.push(f64::from(m.running));
            self.per_endpoint_queue
                .get_or_create(&EndpointQueueLabels {
                    name: pool.name.clone(),
                    model_server_endpoint: endpoint.clone(),
                })
                .set(i64::from(m.waiting_queue));
            self.per_pod_queue
                .get_or_create(&PodQueueLabels {
                    name: pool.name.clone(),
                    model_server_pod: endpoint,
                })
                .set(i64::from(m.waiting_queue));
        }
        self.ready
            .get_or_create(&name)
            .set(i64::try_from(kv.len()).unwrap_or(i64::MAX));
        for (avg, sd, xs) in [
            (&self.avg_kv, &self.sd_kv, &kv),
            (&self.avg_queue, &self.sd_queue, &queue),
            (&self.avg_running, &self.sd_running, &running),
        ] {
            let (mean, dev) = mean_sd(xs);
            avg.get_or_create(&name).set(mean);
            sd.get_or_create(&name).set(dev);
        }
        self.prefix_size
            .set(i64::try_from(prefix_entries).unwrap_or(i64::MAX));
    }
}

/// Mean and population standard deviation (0, 0 for none).
fn mean_sd(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (0.0, 0.0);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    (mean, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(model: &str) -> RequestKey {
        RequestKey {
            model: model.into(),
            target: model.into(),
            fairness_id: "tenant".into(),
            priority: 0,
        }
    }

    fn render(root: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, root).unwrap();
        out
    }

    #[test]
    fn a_streamed_request_fills_the_latency_families_and_their_twins() {
        let mut root = Registry::default();
        let m = EppMetrics::register(&mut root, &Histogram::new([0.5]), &Histogram::new([0.5]));
        let k = key("m");
        m.request_started(&k);
        let t0 = Instant::now();
        let ms = |n| t0 + std::time::Duration::from_millis(n);
        let report = ResponseReport {
            usage: Some(crate::usage::Usage {
                prompt_tokens: 100,
                completion_tokens: 5,
                cached_tokens: 64,
            }),
            bytes: 900,
            first_chunk: Some(ms(200)),
            last_chunk: Some(ms(600)),
            gaps: vec![0.1; 4],
        };
        let t = Timing {
            started: t0,
            ended: ms(650),
            request_bytes: 300,
            streaming: true,
        };
        m.request_done(&k, Outcome::Success, t, Some(&report));
        let out = render(&root);
        let labels = r#"model_name="m",target_model_name="m",fairness_id="tenant",priority="0""#;
        for line in [
            format!("llm_d_epp_request_total{{{labels}}} 1"),
            format!("inference_objective_request_total{{{labels}}} 1"),
            format!("llm_d_epp_request_running{{{labels}}} 0"),
            format!("llm_d_epp_request_ttft_seconds_count{{{labels},streaming=\"true\"}} 1"),
            format!("llm_d_epp_request_ttft_seconds_sum{{{labels},streaming=\"true\"}} 0.2"),
            // (600 − 200) ms over 4 tokens after the first.
            format!("llm_d_epp_request_streaming_tpot_seconds_sum{{{labels}}} 0.1"),
            format!("llm_d_epp_request_streaming_itl_seconds_count{{{labels}}} 4"),
            format!("llm_d_epp_request_ntpot_seconds_sum{{{labels}}} 0.13"),
            format!("llm_d_epp_request_cached_tokens_sum{{{labels}}} 64.0"),
            format!("inference_objective_prompt_cached_tokens_sum{{{labels}}} 64.0"),
        ] {
            assert!(out.contains(&line), "missing {line}\n{out}");
        }
        assert!(out.contains("llm_d_epp_info{"), "{out}");
        assert!(out.contains("inference_extension_info{"), "{out}");
    }

    #[test]
    fn failures_carry_llm_d_error_codes() {
        let mut root = Registry::default();
        let m = EppMetrics::register(&mut root, &Histogram::new([0.5]), &Histogram::new([0.5]));
        m.rejected(&RequestKey::rejected("m", "", -1), Outcome::Shed);
        let k = key("m");
        m.request_started(&k);
        let now = Instant::now();
        m.request_done(
            &k,
            Outcome::UpstreamStatus,
            Timing {
                started: now,
                ended: now,
                request_bytes: 1,
                streaming: false,
            },
            None,
        );
        let out = render(&root);
        assert!(
            out.contains(r#"error_code="InferencePoolResourceExhausted"} 1"#),
            "{out}"
        );
        assert!(out.contains(r#"error_code="ModelServerError"} 1"#), "{out}");
        // A failed request is not a latency sample.
        assert!(
            !out.contains("llm_d_epp_request_duration_seconds_count{"),
            "{out}"
        );
    }

    #[test]
    fn model_names_past_the_cap_read_other_unless_pinned() {
        let mut root = Registry::default();
        let m = EppMetrics::register(&mut root, &Histogram::new([0.5]), &Histogram::new([0.5]));
        m.pin_models(["rewritten"]);
        for i in 0..LABEL_CAP {
            m.rejected(
                &RequestKey::rejected(&format!("m{i}"), "", 0),
                Outcome::UnknownModel,
            );
        }
        m.rejected(
            &RequestKey::rejected("one-too-many", "", 0),
            Outcome::UnknownModel,
        );
        m.rejected(
            &RequestKey::rejected("rewritten", "", 0),
            Outcome::UnknownModel,
        );
        let out = render(&root);
        assert!(
            out.contains(r#"llm_d_epp_request_total{model_name="other""#),
            "folded"
        );
        assert!(!out.contains("one-too-many"));
        assert!(
            out.contains(r#"model_name="rewritten""#),
            "pinned names are kept"
        );
        assert!(out.contains(r#"model_name="m999""#));
    }

    #[test]
    fn mean_and_deviation() {
        assert_eq!(mean_sd(&[]), (0.0, 0.0));
        assert_eq!(mean_sd(&[2.0, 4.0]), (3.0, 1.0));
    }
}
