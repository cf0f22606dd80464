//! What to run: the target, the load shape, the bounds and the SLO.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::BenchError;
use crate::workload::Workload;

/// Where requests go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Base URL of one OpenAI-compatible endpoint (a router), e.g. `http://127.0.0.1:8080`.
    Url(String),
    /// Client-side round robin over pod base URLs: the cache-blind baseline.
    RoundRobin(Vec<String>),
    /// A seeded uniform random pick per request over base URLs: an L4 spread over
    /// several router replicas.
    Random(Vec<String>),
    /// Round robin over router replicas' base URLs that stops sending to one for at least
    /// [`HOLD_DOWN`] after a connection to it failed, and until it accepts TCP
    /// connections again: the stand-in for an L4 balancer's health checks in front of a
    /// tier whose replicas can die.
    Balanced(Vec<String>),
}

/// Shortest time a [`Target::Balanced`] URL gets no requests after a connection to it
/// failed (an L4 balancer's unhealthy interval is of this order).
pub const HOLD_DOWN: Duration = Duration::from_secs(1);

/// How often a [`Target::Balanced`] run probes a held-down URL with a TCP connect (the
/// balancer's active health check).
pub const HEALTH_CHECK_INTERVAL: Duration = Duration::from_millis(250);

impl Target {
    /// The base URLs requests are spread over (one for a router).
    pub fn base_urls(&self) -> Vec<String> {
        match self {
            Target::Url(u) => vec![u.clone()],
            Target::RoundRobin(us) | Target::Random(us) | Target::Balanced(us) => us.clone(),
        }
    }
}

/// How requests are offered.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Load {
    /// Open loop: Poisson arrivals at this mean rate, whatever the server's speed.
    Poisson {
        /// Mean arrivals per second.
        qps: f64,
    },
    /// Closed loop: this many requests always in flight.
    Closed {
        /// Requests kept in flight.
        concurrency: usize,
    },
}

/// Which OpenAI API the requests use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Api {
    /// `POST /v1/completions` with the prompt as one string (default: block boundaries
    /// in the prompt are exactly where the workload put them).
    #[default]
    Completions,
    /// `POST /v1/chat/completions` with one message per prompt segment.
    Chat,
}

/// One benchmark run: bounded by `max_requests` and `max_duration`, it always stops.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// Where requests go.
    pub target: Target,
    /// The `model` field sent in every request.
    pub model: String,
    /// What the prompts look like.
    pub workload: Workload,
    /// How requests are offered.
    pub load: Load,
    /// At most this many requests are sent.
    pub max_requests: usize,
    /// No request is sent after this much time; in-flight ones get `drain_timeout` more.
    pub max_duration: Duration,
    /// Seeds prompt text, arrivals and popularity: the same seed gives the same requests.
    pub seed: u64,
    /// Pod base URLs whose `/metrics` prefix-cache counters give the fleet hit rate and
    /// per-pod request counts (empty: those report fields stay empty).
    pub pod_metrics: Vec<String>,
    /// A request counts toward goodput when it succeeds with TTFT at most this.
    pub ttft_slo: Duration,
    /// Draw a progress bar on stderr (only when stderr is a terminal).
    pub progress: bool,
    /// One request is abandoned (counted as an error) after this long.
    pub request_timeout: Duration,
    /// After `max_duration`, in-flight requests get this long before being abandoned.
    pub drain_timeout: Duration,
    /// Completions or chat API.
    pub api: Api,
    /// Name of the system under test, shown in tables and plots.
    pub label: String,
}

impl RunSpec {
    /// A spec with sane defaults: 4 QPS Poisson, 200 requests, 60 s, seed 1, 2 s TTFT SLO.
    pub fn new(target: Target, workload: Workload) -> Self {
        RunSpec {
            target,
            model: "meta-llama/Llama-3.1-8B-Instruct".to_string(),
            workload,
            load: Load::Poisson { qps: 4.0 },
            max_requests: 200,
            max_duration: Duration::from_secs(60),
            seed: 1,
            pod_metrics: Vec::new(),
            ttft_slo: Duration::from_secs(2),
            progress: false,
            request_timeout: Duration::from_secs(120),
            drain_timeout: Duration::from_secs(30),
            api: Api::Completions,
            label: "target".to_string(),
        }
    }

    /// Checks every field; the first problem found is returned, naming the field.
    pub fn validate(&self) -> Result<(), BenchError> {
        let bad =
            |field: &'static str, problem: String| Err(BenchError::InvalidSpec { field, problem });
        let urls = self.target.base_urls();
        if urls.is_empty() {
            return bad("target", "has no URLs".into());
        }
        for u in urls.iter().chain(self.pod_metrics.iter()) {
            if !(u.starts_with("http://")) {
                return bad("target", format!("URL {u:?} must start with http://"));
            }
        }
        if self.model.is_empty() {
            return bad("model", "is empty".into());
        }
        match self.load {
            Load::Poisson { qps } if !(qps.is_finite() && qps > 0.0) => {
                return bad("qps", format!("must be a positive number, got {qps}"));
            }
            Load::Closed { concurrency: 0 } => {
                return bad("concurrency", "must be at least 1".into());
            }
            _ => {}
        }
        if self.max_requests == 0 {
            return bad("max_requests", "must be at least 1".into());
        }
        if self.max_duration.is_zero() {
            return bad("max_duration", "must be positive".into());
        }
        if self.request_timeout.is_zero() {
            return bad("request_timeout", "must be positive".into());
        }
        if let Workload::SharedPrefix(s) = &self.workload
            && s.images_per_request > 0
            && self.api != Api::Chat
        {
            return bad(
                "api",
                "images_per_request needs the chat API (completions has no image parts)".into(),
            );
        }
        self.workload.validate()
    }
}
