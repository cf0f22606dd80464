//! The one request-handling path shared by the ext_proc server and the standalone proxy:
//! parse → admit → schedule → pre_request, then (when the response ends)
//! response_complete. A scheduled request is a [`Ticket`]: it holds the endpoint's
//! in-flight count and is counted exactly once in `infermesh_requests_total`, however it
//! ends — finished, failed, or dropped because the client went away.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use infermesh_scheduler::model::DEFAULT_FAIRNESS_ID;
use infermesh_scheduler::{ApiKind, InferenceRequest, SchedulingResult, parse_openai};
use rand::seq::IndexedRandom;

use crate::metrics::{EndpointLabels, NodeMetrics, Outcome, RewriteLabels};
use crate::policy::{Policy, SharedPolicy};
use crate::pool::{EndpointSlot, SharedPool};
use crate::usage::Usage;

/// Header naming the InferenceObjective of a request.
pub const OBJECTIVE_HEADER: &str = "x-gateway-inference-objective";
/// Header carrying the flow-control fairness id.
pub const FAIRNESS_HEADER: &str = "x-gateway-inference-fairness-id";
/// Header carrying the request id.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Header (and `envoy.lb` metadata key) with the picked endpoints, primary first.
pub const DESTINATION_HEADER: &str = "x-gateway-destination-endpoint";

/// Limits of the request path.
#[derive(Debug, Clone, Copy)]
pub struct DispatchConfig {
    /// Largest request body accepted (413 above it).
    pub max_body_bytes: usize,
    /// Metrics older than this take an endpoint out of the candidate set.
    pub staleness: Duration,
}

/// Request facts known before the body: id, headers, objective, fairness id, subset hint.
#[derive(Debug, Clone, Default)]
pub struct RequestMeta {
    /// `x-request-id`, or a generated UUID.
    pub request_id: String,
    /// All request headers with lower-case names (pseudo-headers excluded).
    pub headers: BTreeMap<String, String>,
    /// `x-gateway-inference-objective` ("" when absent).
    pub objective: String,
    /// `x-gateway-inference-fairness-id` (default `default-flow`).
    pub fairness_id: String,
    /// Endpoints the gateway allows (`envoy.lb.subset_hint`); `None` = no restriction.
    pub subset: Option<BTreeSet<SocketAddr>>,
}

impl RequestMeta {
    /// Builds the metadata from request headers (names in any case).
    pub fn from_headers<'a>(headers: impl IntoIterator<Item = (&'a str, &'a str)>) -> RequestMeta {
        let mut map = BTreeMap::new();
        for (k, v) in headers {
            if k.starts_with(':') {
                continue;
            }
            map.insert(k.to_ascii_lowercase(), v.to_owned());
        }
        let request_id = match map.get(REQUEST_ID_HEADER) {
            Some(id) if !id.is_empty() => id.clone(),
            _ => {
                let id = uuid::Uuid::new_v4().to_string();
                map.insert(REQUEST_ID_HEADER.to_owned(), id.clone());
                id
            }
        };
        let objective = map.get(OBJECTIVE_HEADER).cloned().unwrap_or_default();
        let fairness_id = map
            .get(FAIRNESS_HEADER)
            .filter(|f| !f.is_empty())
            .cloned()
            .unwrap_or_else(|| DEFAULT_FAIRNESS_ID.to_owned());
        RequestMeta {
            request_id,
            headers: map,
            objective,
            fairness_id,
            subset: None,
        }
    }
}

/// Why a request was answered by the node itself instead of a model server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// HTTP status.
    pub status: u16,
    /// The counted outcome.
    pub outcome: Outcome,
    /// A message naming the problem.
    pub message: String,
}

impl Rejection {
    fn new(status: u16, outcome: Outcome, message: impl Into<String>) -> Rejection {
        Rejection {
            status,
            outcome,
            message: message.into(),
        }
    }

    /// 413 for a body over `limit` bytes.
    pub fn too_large(limit: usize) -> Rejection {
        Rejection::new(
            413,
            Outcome::TooLarge,
            format!("request body is larger than the limit of {limit} bytes"),
        )
    }

    /// The OpenAI-style JSON error body a client can read.
    pub fn json_body(&self) -> Vec<u8> {
        let kind = match self.status {
            400 => "BadRequestError",
            404 => "NotFoundError",
            413 => "RequestTooLargeError",
            429 => "RateLimitError",
            503 => "ServiceUnavailableError",
            _ => "InternalServerError",
        };
        serde_json::to_vec(&serde_json::json!({
            "error": {"message": self.message, "type": kind, "code": self.status}
        }))
        .expect("a JSON value always serializes")
    }
}

/// The request path's shared state.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    pool: SharedPool,
    policy: SharedPolicy,
    metrics: Arc<NodeMetrics>,
    cfg: DispatchConfig,
}

impl Dispatcher {
    /// Creates the dispatcher over the shared pool and policy.
    pub fn new(
        pool: SharedPool,
        policy: SharedPolicy,
        metrics: Arc<NodeMetrics>,
        cfg: DispatchConfig,
    ) -> Dispatcher {
        Dispatcher {
            pool,
            policy,
            metrics,
            cfg,
        }
    }

    /// The limits in force.
    pub fn config(&self) -> DispatchConfig {
        self.cfg
    }

    /// The node metrics.
    pub fn metrics(&self) -> &Arc<NodeMetrics> {
        &self.metrics
    }

    /// The shared pool view.
    pub fn pool(&self) -> &SharedPool {
        &self.pool
    }

    /// Counts a request rejected before it reached [`Self::dispatch`] (e.g. 413 while buffering).
    pub fn count_rejection(&self, meta: &RequestMeta, rejection: &Rejection) {
        tracing::info!(request_id = %meta.request_id, status = rejection.status, reason = %rejection.message, "request rejected");
        self.metrics
            .count_request("", &meta.objective, rejection.outcome);
    }

    /// Parses, admits and schedules a request whose whole body is `body`; `exclude` lists
    /// endpoints that must not be picked (they already failed for this request).
    pub fn dispatch(
        &self,
        kind: ApiKind,
        body: &[u8],
        mut meta: RequestMeta,
        exclude: &[SocketAddr],
    ) -> Result<Ticket, Rejection> {
        let started = Instant::now();
        let result = self.dispatch_inner(kind, body, &mut meta, exclude, started);
        match result {
            Ok((req, policy, result)) => {
                self.metrics.observe_scheduling(started.elapsed());
                let body =
                    (req.target_model != req.model).then(|| rewrite_model(body, &req.target_model));
                let mut ticket = self.issue(req, policy, result, meta, started);
                ticket.rewritten_body = body;
                Ok(ticket)
            }
            Err((model, rejection)) => {
                tracing::info!(request_id = %meta.request_id, model = %model, status = rejection.status, reason = %rejection.message, "request rejected");
                self.metrics
                    .count_request(&model, &meta.objective, rejection.outcome);
                Err(rejection)
            }
        }
    }

    #[allow(clippy::type_complexity)]
    fn dispatch_inner(
        &self,
        kind: ApiKind,
        body: &[u8],
        meta: &mut RequestMeta,
        exclude: &[SocketAddr],
        now: Instant,
    ) -> Result<(InferenceRequest, Arc<Policy>, SchedulingResult), (String, Rejection)> {
        if body.len() > self.cfg.max_body_bytes {
            return Err((String::new(), Rejection::too_large(self.cfg.max_body_bytes)));
        }
        let parsed = parse_openai(kind, body).map_err(|e| {
            (
                String::new(),
                Rejection::new(400, Outcome::BadRequest, e.to_string()),
            )
        })?;
        let pool = self.pool.load();
        let policy = self.policy.load_full();
        let mut rng = rand::rng();
        let model = parsed.model;
        let target = policy.rewrites.target(&model, &mut rng).map(str::to_owned);
        let target_model = target.as_deref().unwrap_or(&model);
        if !pool.serves(target_model) {
            let mut served: Vec<&str> = pool.models.iter().map(String::as_str).collect();
            served.sort_unstable();
            let msg = match &target {
                Some(t) => format!(
                    "model {model:?} is rewritten to {t:?}, which is not served by this pool \
                     (served: {})",
                    served.join(", ")
                ),
                None => format!(
                    "model {model:?} is not served by this pool (served: {})",
                    served.join(", ")
                ),
            };
            return Err((model, Rejection::new(404, Outcome::UnknownModel, msg)));
        }
        if let Some(t) = &target {
            self.metrics
                .model_rewrite_decisions
                .get_or_create(&RewriteLabels {
                    model: model.clone(),
                    target: t.clone(),
                })
                .inc();
        }
        let priority = pool.objectives.get(&meta.objective).copied().unwrap_or(0);
        let req = InferenceRequest {
            id: meta.request_id.clone(),
            target_model: target.unwrap_or_else(|| model.clone()),
            model,
            prompt_bytes: parsed.prompt_bytes,
            stream: parsed.stream,
            max_tokens: parsed.max_tokens,
            headers: std::mem::take(&mut meta.headers),
            priority,
            fairness_id: meta.fairness_id.clone(),
            cache_salt: parsed.cache_salt,
        };
        let candidates = pool.candidates(now, self.cfg.staleness, meta.subset.as_ref(), exclude);
        if candidates.is_empty() {
            let msg = if meta.subset.is_some() {
                "no ready endpoint in the gateway's subset hint"
            } else {
                "no ready endpoint in the pool"
            };
            return Err((req.model, Rejection::new(503, Outcome::NoEndpoint, msg)));
        }
        if let Err(e) = policy.scheduler.admit(&req, &candidates, now) {
            let msg = format!("system saturated, sheddable request dropped ({e})");
            return Err((req.model, Rejection::new(429, Outcome::Shed, msg)));
        }
        let result = policy
            .scheduler
            .schedule(&req, &candidates, now, &mut rng)
            .map_err(|e| {
                (
                    req.model.clone(),
                    Rejection::new(503, Outcome::NoEndpoint, e.to_string()),
                )
            })?;
        if result.destinations().is_empty() {
            return Err((
                req.model,
                Rejection::new(503, Outcome::NoEndpoint, "the scheduler picked no endpoint"),
            ));
        }
        policy.scheduler.pre_request(&req, &result, now);
        Ok((req, policy, result))
    }

    fn issue(
        &self,
        req: InferenceRequest,
        policy: Arc<Policy>,
        result: SchedulingResult,
        meta: RequestMeta,
        started: Instant,
    ) -> Ticket {
        let destinations: Vec<SocketAddr> = result.destinations().to_vec();
        let tokens = (req.prompt_bytes.len() / 4) as u64;
        let pool = self.pool.load();
        let slot = pool.slot(destinations[0]).cloned();
        if let Some(s) = &slot {
            s.acquire(tokens);
        }
        self.metrics
            .picks
            .get_or_create(&EndpointLabels {
                endpoint: destinations[0].to_string(),
            })
            .inc();
        if let Some(ratio) = prefix_ratio(&result) {
            self.metrics.prefix_match_ratio.observe(ratio);
        }
        tracing::debug!(request_id = %req.id, model = %req.model, endpoint = %destinations[0], "scheduled");
        Ticket {
            dispatcher: self.clone(),
            header_value: result.header_value(),
            extra_headers: result.extra_headers(),
            destinations,
            req,
            policy,
            objective: meta.objective,
            slot,
            tokens,
            started,
            finished: false,
            rewritten_body: None,
        }
    }

    /// Picks a random ready endpoint for a request without a body to schedule by
    /// (llm-d's "skip" parser result): e.g. `GET /v1/models` through Envoy.
    pub fn pick_any(&self, meta: &RequestMeta) -> Result<SocketAddr, Rejection> {
        let pool = self.pool.load();
        let now = Instant::now();
        let ready: Vec<SocketAddr> = pool
            .slots
            .iter()
            .filter(|s| {
                meta.subset
                    .as_ref()
                    .is_none_or(|set| set.contains(&s.address()))
            })
            .filter(|s| s.is_fresh(now, self.cfg.staleness))
            .map(|s| s.address())
            .collect();
        ready.choose(&mut rand::rng()).copied().ok_or_else(|| {
            let r = Rejection::new(503, Outcome::NoEndpoint, "no ready endpoint in the pool");
            self.count_rejection(meta, &r);
            r
        })
    }
}

/// `body` with its top-level `model` set to `target`. The body already parsed as a JSON
/// object in `parse_openai`, so re-reading it cannot fail.
fn rewrite_model(body: &[u8], target: &str) -> Vec<u8> {
    let mut obj: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(body).expect("the request body parsed as a JSON object");
    obj.insert("model".to_owned(), serde_json::Value::from(target));
    serde_json::to_vec(&obj).expect("a JSON object always serializes")
}

fn prefix_ratio(result: &SchedulingResult) -> Option<f64> {
    let m = result.prefix_match.as_ref()?;
    let total = m.total_blocks();
    if total == 0 {
        return None;
    }
    Some(f64::from(m.matched_blocks) / total as f64)
}

/// A scheduled request. Dropping it without [`Ticket::finish`] counts it as cancelled and
/// still runs the completion hooks, so no request is lost from the books.
#[derive(Debug)]
pub struct Ticket {
    dispatcher: Dispatcher,
    req: InferenceRequest,
    policy: Arc<Policy>,
    destinations: Vec<SocketAddr>,
    header_value: String,
    extra_headers: Vec<(String, String)>,
    objective: String,
    slot: Option<Arc<EndpointSlot>>,
    tokens: u64,
    started: Instant,
    finished: bool,
    rewritten_body: Option<Vec<u8>>,
}

impl Ticket {
    /// The scheduled request.
    pub fn request(&self) -> &InferenceRequest {
        &self.req
    }

    /// The request body to forward when an InferenceModelRewrite replaced its `model`
    /// (`None`: forward the client's body unchanged). Taken once.
    pub fn take_rewritten_body(&mut self) -> Option<Vec<u8>> {
        self.rewritten_body.take()
    }

    /// Picked endpoints, primary first, then fallbacks.
    pub fn destinations(&self) -> &[SocketAddr] {
        &self.destinations
    }

    /// The `x-gateway-destination-endpoint` value (`ip:port,ip:port…`).
    pub fn header_value(&self) -> &str {
        &self.header_value
    }

    /// Extra headers for the model server (e.g. `x-prefiller-host-port`).
    pub fn extra_headers(&self) -> &[(String, String)] {
        &self.extra_headers
    }

    /// Moves the in-flight count to `addr` (the proxy fell back to another endpoint).
    pub fn retarget(&mut self, addr: SocketAddr) {
        if self.slot.as_ref().is_some_and(|s| s.address() == addr) {
            return;
        }
        if let Some(s) = self.slot.take() {
            s.release(self.tokens);
        }
        let slot = self.dispatcher.pool.load().slot(addr).cloned();
        if let Some(s) = &slot {
            s.acquire(self.tokens);
        }
        self.slot = slot;
    }

    /// Replaces the pick with a new scheduling result that avoids `exclude`.
    pub fn reschedule(&mut self, exclude: &[SocketAddr]) -> Result<(), Rejection> {
        let meta = RequestMeta {
            request_id: self.req.id.clone(),
            headers: self.req.headers.clone(),
            objective: self.objective.clone(),
            fairness_id: self.req.fairness_id.clone(),
            subset: None,
        };
        let pool = self.dispatcher.pool.load();
        let now = Instant::now();
        let candidates = pool.candidates(
            now,
            self.dispatcher.cfg.staleness,
            meta.subset.as_ref(),
            exclude,
        );
        if candidates.is_empty() {
            return Err(Rejection::new(
                503,
                Outcome::NoEndpoint,
                "no other ready endpoint to retry on",
            ));
        }
        let result = self
            .policy
            .scheduler
            .schedule(&self.req, &candidates, now, &mut rand::rng())
            .map_err(|e| Rejection::new(503, Outcome::NoEndpoint, e.to_string()))?;
        let Some(&primary) = result.destinations().first() else {
            return Err(Rejection::new(
                503,
                Outcome::NoEndpoint,
                "the scheduler picked no endpoint",
            ));
        };
        self.policy.scheduler.pre_request(&self.req, &result, now);
        self.destinations = result.destinations().to_vec();
        self.header_value = result.header_value();
        self.extra_headers = result.extra_headers();
        self.retarget(primary);
        Ok(())
    }

    /// Ends the request: completion hooks, in-flight −1, one count with `outcome`.
    pub fn finish(mut self, served: Option<SocketAddr>, outcome: Outcome, usage: Option<Usage>) {
        self.complete(served, outcome, usage);
    }

    fn complete(&mut self, served: Option<SocketAddr>, outcome: Outcome, usage: Option<Usage>) {
        if self.finished {
            return;
        }
        self.finished = true;
        let served = served
            .or_else(|| self.slot.as_ref().map(|s| s.address()))
            .unwrap_or(self.destinations[0]);
        self.policy
            .scheduler
            .response_complete(&self.req, served, Instant::now());
        if let Some(s) = self.slot.take() {
            s.release(self.tokens);
        }
        let m = &self.dispatcher.metrics;
        m.count_request(&self.req.model, &self.objective, outcome);
        if let Some(u) = usage {
            m.count_tokens(u);
        }
        tracing::debug!(
            request_id = %self.req.id,
            endpoint = %served,
            ?outcome,
            elapsed_ms = self.started.elapsed().as_secs_f64() * 1e3,
            "request finished"
        );
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.finished {
            self.complete(None, Outcome::Cancelled, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use arc_swap::ArcSwap;
    use infermesh_scheduler::{Metrics, ResolvedConfig};

    use super::*;
    use crate::discovery::EndpointSpec;
    use crate::pool::PoolView;
    use crate::scrape::engine::Engine;

    fn dispatcher(waiting: u32, kv: f64) -> Dispatcher {
        let now = Instant::now();
        let slots = (0..4u8)
            .map(|i| {
                let s = Arc::new(EndpointSlot::new(EndpointSpec {
                    address: SocketAddr::from(([10, 0, 0, i], 8000)),
                    pod: format!("p{i}"),
                    labels: Default::default(),
                    engine: Engine::Vllm,
                }));
                s.record_scrape(Metrics {
                    waiting_queue: waiting,
                    kv_cache_usage: kv,
                    ..Metrics::idle(now)
                });
                s
            })
            .collect();
        let view = PoolView::new(
            "t".into(),
            slots,
            HashSet::from(["m".to_owned()]),
            HashMap::from([("batch".to_owned(), -1), ("chat".to_owned(), 5)]),
        );
        Dispatcher::new(
            Arc::new(ArcSwap::from_pointee(view)),
            Arc::new(ArcSwap::from_pointee(
                Policy::new(&ResolvedConfig::builtin_default()).unwrap(),
            )),
            Arc::new(NodeMetrics::new()),
            DispatchConfig {
                max_body_bytes: 1 << 20,
                staleness: Duration::from_secs(60),
            },
        )
    }

    fn meta(objective: &str) -> RequestMeta {
        RequestMeta::from_headers([(OBJECTIVE_HEADER, objective), ("X-Request-Id", "id-1")])
    }

    const BODY: &[u8] = br#"{"model":"m","prompt":"hello there"}"#;

    #[test]
    fn sheddable_requests_get_429_only_when_saturated() {
        let saturated = dispatcher(50, 0.95);
        let err = saturated
            .dispatch(ApiKind::Completions, BODY, meta("batch"), &[])
            .unwrap_err();
        assert_eq!((err.status, err.outcome), (429, Outcome::Shed));
        // Non-sheddable requests are never shed.
        assert!(
            saturated
                .dispatch(ApiKind::Completions, BODY, meta("chat"), &[])
                .is_ok()
        );
        assert!(
            saturated
                .dispatch(ApiKind::Completions, BODY, meta(""), &[])
                .is_ok()
        );
        // Sheddable but the pool is idle.
        let idle = dispatcher(0, 0.1);
        assert!(
            idle.dispatch(ApiKind::Completions, BODY, meta("batch"), &[])
                .is_ok()
        );
    }

    fn with_rewrites(d: Dispatcher, yaml: &str) -> Dispatcher {
        use infermesh_raft_store::policy::{PolicyObject, accept_any_epp_config, parse_documents};
        let docs: Vec<_> = parse_documents(yaml, &accept_any_epp_config())
            .unwrap()
            .into_iter()
            .map(|o| match o {
                PolicyObject::InferenceModelRewrite(d) => d,
                other => panic!("{other:?}"),
            })
            .collect();
        let rewrites =
            crate::policy_store::rewrite::ModelRewrites::from_policy(docs.iter().map(|d| (1, d)));
        let p = d.policy.load().with_rewrites(Arc::new(rewrites));
        d.policy.store(Arc::new(p));
        d
    }

    const REWRITE: &str = "apiVersion: inference.networking.x-k8s.io/v1alpha2\n\
        kind: InferenceModelRewrite\nmetadata: {name: r}\nspec:\n  poolRef: {name: p}\n  \
        rules:\n  - matches: [{model: {value: alias}}]\n    targets: [{modelRewrite: m}]\n  \
        - matches: [{model: {value: gone}}]\n    targets: [{modelRewrite: not-served}]\n";

    #[test]
    fn a_rewritten_model_is_scheduled_and_forwarded_as_its_target() {
        let d = with_rewrites(dispatcher(0, 0.1), REWRITE);
        let body = br#"{"model":"alias","prompt":"hello there","max_tokens":3}"#;
        let mut t = d
            .dispatch(ApiKind::Completions, body, meta(""), &[])
            .expect("alias is rewritten to the served model m");
        assert_eq!(t.request().model, "alias");
        assert_eq!(t.request().target_model, "m");
        let fwd: serde_json::Value =
            serde_json::from_slice(&t.take_rewritten_body().expect("body rewritten")).unwrap();
        assert_eq!(
            fwd,
            serde_json::json!({"model": "m", "prompt": "hello there", "max_tokens": 3})
        );
        let decisions = d
            .metrics()
            .model_rewrite_decisions
            .get_or_create(&RewriteLabels {
                model: "alias".into(),
                target: "m".into(),
            })
            .get();
        assert_eq!(decisions, 1);
        // A model without a rule goes through unchanged.
        let mut t = d
            .dispatch(ApiKind::Completions, BODY, meta(""), &[])
            .unwrap();
        assert_eq!(t.request().target_model, "m");
        assert!(t.take_rewritten_body().is_none());
        // A rule whose target the pool does not serve is a 404 naming both models.
        let err = d
            .dispatch(
                ApiKind::Completions,
                br#"{"model":"gone","prompt":"x"}"#,
                meta(""),
                &[],
            )
            .unwrap_err();
        assert_eq!((err.status, err.outcome), (404, Outcome::UnknownModel));
        assert!(
            err.message.contains("\"gone\"") && err.message.contains("\"not-served\""),
            "{}",
            err.message
        );
        let err = d
            .dispatch(
                ApiKind::Completions,
                br#"{"model":"alias2","prompt":"x"}"#,
                meta(""),
                &[],
            )
            .unwrap_err();
        assert_eq!(err.status, 404);
    }

    #[test]
    fn request_meta_reads_headers_case_insensitively() {
        let m = meta("chat");
        assert_eq!(m.request_id, "id-1");
        assert_eq!(m.objective, "chat");
        assert_eq!(m.fairness_id, "default-flow");
        let m = RequestMeta::from_headers([(FAIRNESS_HEADER, "tenant-a"), (":path", "/x")]);
        assert_eq!(m.fairness_id, "tenant-a");
        assert!(!m.headers.contains_key(":path"));
        assert_eq!(
            m.headers[REQUEST_ID_HEADER], m.request_id,
            "the generated id is forwarded"
        );
    }

    #[test]
    fn excluded_endpoints_are_never_picked_and_in_flight_follows_the_ticket() {
        let d = dispatcher(0, 0.1);
        let exclude: Vec<SocketAddr> = (0..3u8)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 8000)))
            .collect();
        let t = d
            .dispatch(ApiKind::Completions, BODY, meta(""), &exclude)
            .unwrap();
        let only = SocketAddr::from(([10, 0, 0, 3], 8000));
        assert_eq!(t.destinations(), [only]);
        let pool = d.pool().load();
        assert_eq!(pool.slot(only).unwrap().in_flight().requests, 1);
        t.finish(None, Outcome::Success, None);
        assert_eq!(pool.slot(only).unwrap().in_flight().requests, 0);
        let all: Vec<SocketAddr> = (0..4u8)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 8000)))
            .collect();
        let err = d
            .dispatch(ApiKind::Completions, BODY, meta(""), &all)
            .unwrap_err();
        assert_eq!(err.status, 503);
    }
}
