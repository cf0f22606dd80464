//! Phase one of the request path, and the dispatcher both phases share.
//! [`Dispatcher::prepare`] parses the body once, resolves the model rewrite, objective and
//! priority, builds the candidates, admits, and hashes the prefix chain once. The IO shell
//! then asks the anchor's owner ([`Dispatcher::lookup`]) and hands the answer to phase two
//! (`Dispatcher::decide`, in `decide.rs`).

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use infermesh_scheduler::plugins::burst::Replica;
use infermesh_scheduler::{
    ApiKind, Endpoint, InferenceRequest, PrefixChain, PrefixMatches, PrefixSource, ScheduleError,
    Scheduler, SchedulingResult, parse_openai, replace_model,
};
use rand::seq::IndexedRandom;

use super::RequestMeta;
use super::burst::{BurstGate, BurstWait};
use super::flow::{
    Dispatched, FlowArrival, Lease, SLO_TTFT_HEADER, SLO_TTFT_HEADER_ALIAS, UsageReport,
};
use super::flow_mesh::TierGate;
use super::owners::{PrefixAnswer, PrefixLookup, PrefixOwners};
use super::picks::Claims;
use super::rejection::{NoEndpoint, Rejection};
use crate::metrics::{NodeMetrics, RewriteLabels};
use crate::policy::{Policy, SharedPolicy};
use crate::pool::SharedPool;
use crate::telemetry::OTEL_TARGET;
use crate::tokens::{TokenizeInput, Tokenizers};
use tracing::{Instrument as _, Level};

/// A request's wait in flow control: `Ok` when dispatched (with its lease when in-flight
/// eviction is on), else why it was dropped. Dropping it frees the request's place in the
/// queue.
pub type FlowWait =
    Pin<Box<dyn Future<Output = Result<Dispatched, infermesh_scheduler::flow::DropReason>> + Send>>;

/// Limits of the request path.
#[derive(Debug, Clone, Copy)]
pub struct DispatchConfig {
    /// Largest request body accepted (413 above it).
    pub max_body_bytes: usize,
    /// Metrics older than this take an endpoint out of the candidate set.
    pub staleness: Duration,
    /// Report every scored endpoint's score with the pick (llm-d's
    /// `--emit-endpoint-scores`); off, the scores are never turned into addresses.
    pub emit_endpoint_scores: bool,
}

/// A policy's scheduler with its burst window. Weak, so a replaced policy's scheduler is
/// freed even if no later policy has the producer (a live `Weak` keeps the allocation, so
/// its address cannot be reused by a newer scheduler).
type BurstSlot = (Weak<Scheduler>, Arc<BurstGate>);

/// The request path's shared state.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    pub(super) pool: SharedPool,
    pub(super) policy: SharedPolicy,
    pub(super) metrics: Arc<NodeMetrics>,
    pub(super) cfg: DispatchConfig,
    pub(super) owners: Option<Arc<dyn PrefixOwners>>,
    pub(super) flow: Option<TierGate>,
    /// The burst window of the policy last seen with a `burst-prefix-cache-producer`,
    /// kept with that policy's scheduler so a policy swap starts a fresh window.
    pub(super) burst: Arc<parking_lot::Mutex<Option<BurstSlot>>>,
    /// The token producer's backends (precise prefix matching).
    pub(super) tokenizers: Option<Arc<Tokenizers>>,
}

/// A request after phase one: parsed, resolved, admitted, hashed; not yet scheduled.
#[derive(Debug)]
pub struct Prepared {
    pub(super) req: InferenceRequest,
    pub(super) objective: String,
    pub(super) policy: Arc<Policy>,
    pub(super) candidates: Vec<Endpoint>,
    pub(super) chain: Option<PrefixChain>,
    pub(super) rewrite: Option<Range<usize>>,
    pub(super) started: Instant,
    // For flow control: the body length, and what a fresh candidate set needs after a wait.
    pub(super) body_bytes: u64,
    pub(super) subset: Option<BTreeSet<SocketAddr>>,
    pub(super) exclude: Vec<SocketAddr>,
    /// Flow control's lease on the pool, held until the request ends (eviction on).
    pub(super) lease: Option<Lease>,
    /// Where the request's token usage goes when it left a program-aware band.
    pub(super) usage: Option<UsageReport>,
    /// The room it holds in this node's flow-control queue, given back when dropped.
    pub(super) grant: Option<super::flow::Grant>,
    /// Where the burst producer's batch placed this request (`None`: no placement, or no
    /// producer).
    pub(super) burst: Option<SocketAddr>,
    /// What the token producer needs, when the precise producer runs (the chain is then
    /// keyed in the lookup, after tokenization).
    pub(super) tokenize: Option<TokenizeInput>,
}

impl Prepared {
    /// The request as the scheduler sees it.
    pub fn request(&self) -> &InferenceRequest {
        &self.req
    }

    /// The prefix chain hashed in phase one (shared-prefix mode with a prefix producer).
    pub fn chain(&self) -> Option<&PrefixChain> {
        self.chain.as_ref()
    }
}

impl Dispatcher {
    /// Creates the dispatcher over the shared pool and policy (prefix state local).
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
            owners: None,
            flow: None,
            burst: Arc::default(),
            tokenizers: None,
        }
    }

    /// Tokenizes prompts with `tokenizers` when the policy runs the precise producer.
    pub fn with_tokenizers(mut self, tokenizers: Arc<Tokenizers>) -> Dispatcher {
        self.tokenizers = Some(tokenizers);
        self
    }

    /// Gives requests a flow owner to wait in after phase one while the policy's
    /// `flowControl` gate is on; admission then no longer sheds sheddable requests at once.
    pub fn with_flow(mut self, gate: impl Into<TierGate>) -> Dispatcher {
        self.flow = Some(gate.into());
        self
    }

    /// Whether flow control is on now (a flow owner, and the gate on in the policy).
    pub fn flow_enabled(&self) -> bool {
        self.flow_gate(&self.policy.load()).is_some()
    }

    /// The flow owner a request that read `policy` waits in; `None` while the gate is off.
    pub(super) fn flow_gate(&self, policy: &Policy) -> Option<&TierGate> {
        self.flow.as_ref().filter(|_| policy.flow.is_some())
    }

    /// Keeps prefix state at the anchors' owners instead of this scheduler's own index.
    pub fn with_prefix_owners(mut self, owners: Arc<dyn PrefixOwners>) -> Dispatcher {
        self.owners = Some(owners);
        self
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

    /// The policy in force.
    pub fn policy(&self) -> &SharedPolicy {
        &self.policy
    }

    /// How a request on `path` is read: the configured parser that takes the path, or
    /// the 400 for a path none takes (not counted here: the caller has the request meta).
    pub fn parser_for(&self, path: &str) -> Result<ApiKind, Rejection> {
        Ok(self.policy.load().scheduler.parsers().api_kind(path)?)
    }

    /// Logs and counts a request the node answered itself.
    pub fn count_rejection(&self, meta: &RequestMeta, model: &str, rejection: &Rejection) {
        tracing::info!(request_id = %meta.request_id, model, status = rejection.status(), reason = %rejection, "request rejected");
        let priority = self
            .pool
            .load()
            .objectives
            .get(&meta.objective)
            .copied()
            .unwrap_or(0);
        self.metrics.epp.rejected(
            &crate::metrics::epp::RequestKey::rejected(model, &meta.fairness_id, priority),
            rejection.outcome(),
        );
        self.metrics
            .count_request(model, &meta.objective, rejection.outcome());
    }

    /// Phase one. `exclude` lists endpoints that must not be picked (they already failed
    /// for this request). A rejection is counted here.
    pub fn prepare(
        &self,
        kind: ApiKind,
        body: &[u8],
        mut meta: RequestMeta,
        exclude: &[SocketAddr],
    ) -> Result<Prepared, Rejection> {
        let started = Instant::now();
        let _parse = tracing::span!(target: OTEL_TARGET, Level::TRACE, "parse").entered();
        match self.prepare_inner(kind, body, &mut meta, exclude, started) {
            Ok(p) => Ok(p),
            Err((model, r)) => {
                self.count_rejection(&meta, &model, &r);
                Err(r)
            }
        }
    }

    fn prepare_inner(
        &self,
        kind: ApiKind,
        body: &[u8],
        meta: &mut RequestMeta,
        exclude: &[SocketAddr],
        now: Instant,
    ) -> Result<Prepared, (String, Rejection)> {
        if body.len() > self.cfg.max_body_bytes {
            let limit = self.cfg.max_body_bytes;
            return Err((String::new(), Rejection::TooLarge { limit }));
        }
        let parsed = parse_openai(kind, body).map_err(|e| (String::new(), e.into()))?;
        let pool = self.pool.load();
        let policy = self.policy.load_full();
        let model = parsed.model;
        let mut target = None;
        // A generate request without `model` goes to any pod, as a passthrough does.
        if kind.requires_model() || !model.is_empty() {
            target = policy
                .rewrites
                .target(&model, &mut rand::rng())
                .map(str::to_owned);
            let target_model = target.as_deref().unwrap_or(&model);
            if !pool.serves(target_model) {
                let mut served: Vec<&str> = pool.models.iter().map(String::as_str).collect();
                served.sort_unstable();
                let served = served.join(", ");
                let r = match target {
                    Some(target) => Rejection::RewriteTargetNotServed {
                        model: model.clone(),
                        target,
                        served,
                    },
                    None => Rejection::UnknownModel {
                        model: model.clone(),
                        served,
                    },
                };
                return Err((model, r));
            }
        }
        if let Some(t) = &target {
            // Rewrite names are never folded into `other` (llm-d PR #2119).
            self.metrics.epp.pin_models([model.as_str(), t.as_str()]);
            self.metrics
                .model_rewrite_decisions
                .get_or_create(&RewriteLabels {
                    model: model.clone(),
                    target: t.clone(),
                })
                .inc();
        }
        let priority = pool.objectives.get(&meta.objective).copied().unwrap_or(0);
        let rewrite = target.is_some().then_some(parsed.model_span);
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
            multimodal: parsed.multimodal,
            prompt_tokens: None,
        };
        let candidates = pool.candidates(now, self.cfg.staleness, meta.subset.as_ref(), exclude);
        if candidates.is_empty() {
            let why = if meta.subset.is_some() {
                NoEndpoint::Subset
            } else {
                NoEndpoint::Pool
            };
            return Err((req.model, Rejection::NoEndpoint(why)));
        }
        // With flow control a sheddable request waits under its TTL instead (llm-d).
        let flow_on = self.flow_gate(&policy).is_some();
        if !flow_on && let Err(e) = policy.scheduler.admit(&req, &candidates, now) {
            return Err((req.model, Rejection::Shed(e)));
        }
        // The precise producer keys token ids, so its chain is built in the lookup, after
        // tokenization; the body goes along (rewritten) for render endpoints.
        let tokenize = match (&self.owners, &self.tokenizers) {
            (Some(_), Some(_)) if policy.scheduler.precise_prefix().is_some() => {
                let body = match &rewrite {
                    Some(span) => Bytes::from(replace_model(body, span.clone(), &req.target_model)),
                    None => Bytes::copy_from_slice(body),
                };
                let pod = candidates
                    .get(rand::random_range(0..candidates.len()))
                    .map(|e| e.address);
                Some(TokenizeInput {
                    kind,
                    model: req.target_model.clone(),
                    body,
                    prompt_bytes: req.prompt_bytes.as_slice().into(),
                    pod,
                })
            }
            _ => None,
        };
        // Hash once, here, only when the chain goes to an owner; a local match hashes
        // inside the scheduler's own producer.
        let chain = self
            .owners
            .as_ref()
            .filter(|_| tokenize.is_none())
            .and_then(|_| policy.scheduler.prefix_chain(&req, &candidates));
        Ok(Prepared {
            req,
            objective: std::mem::take(&mut meta.objective),
            policy,
            candidates,
            chain,
            rewrite,
            started: now,
            body_bytes: body.len() as u64,
            subset: if flow_on { meta.subset.take() } else { None },
            lease: None,
            usage: None,
            grant: None,
            burst: None,
            tokenize,
            exclude: if flow_on {
                exclude.to_vec()
            } else {
                Vec::new()
            },
        })
    }

    /// The flow-control wait to await between phase one and the owner lookup; `None` when
    /// the gate is off in the policy the request read.
    pub fn flow_wait(&self, p: &Prepared) -> Option<FlowWait> {
        let gate = self.flow_gate(&p.policy)?.clone();
        let headers = &p.req.headers;
        let slo_ttft = [SLO_TTFT_HEADER, SLO_TTFT_HEADER_ALIAS]
            .iter()
            .find_map(|h| headers.get(*h)?.trim().parse::<u64>().ok())
            .map(Duration::from_millis);
        let arrival = FlowArrival {
            priority: p.req.priority,
            fairness_id: p.req.fairness_id.clone(),
            bytes: p.body_bytes,
            received: p.started,
            slo_ttft,
        };
        let span = tracing::span!(target: OTEL_TARGET, Level::TRACE, "flow_control.wait");
        Some(Box::pin(
            async move { gate.wait(arrival).await }.instrument(span),
        ))
    }

    /// Applies the flow-control answer: a dropped request is counted and rejected; a
    /// dispatched one gets candidates as the pool is now (it may have waited a while).
    pub fn after_flow(
        &self,
        p: &mut Prepared,
        answer: Result<Dispatched, infermesh_scheduler::flow::DropReason>,
    ) -> Result<(), Rejection> {
        let r = match answer {
            Ok(Dispatched {
                waited,
                lease,
                usage,
                grant,
                claims,
            }) => {
                p.lease = lease;
                p.usage = usage;
                p.grant = grant;
                if !waited.is_zero() {
                    p.candidates = self.pool.load().candidates(
                        Instant::now(),
                        self.cfg.staleness,
                        p.subset.as_ref(),
                        &p.exclude,
                    );
                }
                if waited.is_zero() || !p.candidates.is_empty() {
                    apply_claims(&mut p.candidates, &claims);
                    return Ok(());
                }
                Rejection::NoEndpoint(if p.subset.is_some() {
                    NoEndpoint::Subset
                } else {
                    NoEndpoint::Pool
                })
            }
            Err(reason) => Rejection::Flow(reason),
        };
        self.metrics
            .epp
            .rejected(&crate::metrics::epp::RequestKey::of(&p.req), r.outcome());
        self.metrics
            .count_request(&p.req.model, &p.objective, r.outcome());
        tracing::info!(request_id = %p.req.id, model = %p.req.model, status = r.status(), reason = %r, "request rejected");
        Err(r)
    }

    /// The burst window to wait in after flow control and before the owner lookup; `None`
    /// when the policy has no `burst-prefix-cache-producer` (then there is no added step).
    /// Must run on a tokio runtime. Dropping the wait frees the request's place.
    pub fn burst_wait(&self, p: &Prepared) -> Option<BurstWait> {
        let scheduler = &p.policy.scheduler;
        let params = scheduler.burst()?;
        let gate = {
            let mut cached = self.burst.lock();
            match &*cached {
                Some((s, gate)) if std::ptr::eq(s.as_ptr(), Arc::as_ptr(scheduler)) => gate.clone(),
                _ => {
                    let gate = Arc::new(BurstGate::new(params.clone()));
                    *cached = Some((Arc::downgrade(scheduler), gate.clone()));
                    gate
                }
            }
        };
        let replicas = p
            .candidates
            .iter()
            .map(|e| Replica {
                addr: e.address,
                running: e.metrics.as_ref().map_or(0, |m| u64::from(m.running)),
            })
            .collect();
        let span = tracing::span!(target: OTEL_TARGET, Level::TRACE, "burst.wait");
        Some(Box::pin(
            gate.hold(scheduler.burst_hashes(&p.req), replicas)
                .instrument(span),
        ))
    }

    /// Applies the burst window's answer: the endpoint the batch placed the request on.
    pub fn after_burst(&self, p: &mut Prepared, placed: Option<SocketAddr>) {
        p.burst = placed;
    }

    /// The owner lookup to await before [`Self::decide`]; `None` when there is nothing to
    /// ask (prefix state is local, or the prompt has no blocks).
    pub fn lookup(&self, p: &Prepared) -> Option<PrefixLookup> {
        let owners = self.owners.as_ref()?;
        if let (Some(input), Some(tokenizers)) = (&p.tokenize, &self.tokenizers) {
            let span =
                tracing::span!(target: OTEL_TARGET, Level::TRACE, "prefix.lookup", precise = true);
            return Some(Box::pin(
                precise_lookup(
                    tokenizers.clone(),
                    owners.clone(),
                    p.policy.clone(),
                    self.metrics.clone(),
                    input.clone(),
                )
                .instrument(span),
            ));
        }
        let chain = p.chain.as_ref()?;
        let span =
            tracing::span!(target: OTEL_TARGET, Level::TRACE, "prefix.lookup", precise = false);
        Some(Box::pin(
            owners
                .lookup(chain.anchor()?, &chain.hashes)
                .instrument(span),
        ))
    }

    /// The answer to use when [`Self::lookup`] returned `None`.
    pub fn no_lookup_answer(&self) -> PrefixAnswer {
        if self.owners.is_some() {
            PrefixAnswer::Unavailable
        } else {
            PrefixAnswer::Local
        }
    }

    /// Runs a scheduling cycle for `p` over `candidates`; nothing is recorded yet.
    pub(super) fn cycle(
        &self,
        p: &Prepared,
        candidates: &[Endpoint],
        answer: &PrefixAnswer,
        now: Instant,
    ) -> Result<SchedulingResult, Rejection> {
        let source = match (answer, &p.chain) {
            (PrefixAnswer::Matched(matches), Some(chain)) => {
                PrefixSource::Remote { chain, matches }
            }
            (PrefixAnswer::Local, _) => PrefixSource::Local,
            _ => PrefixSource::Unavailable,
        };
        let result = p
            .policy
            .scheduler
            .schedule_with_burst(&p.req, candidates, now, &mut rand::rng(), source, p.burst)
            .map_err(|ScheduleError::NoEndpoints| Rejection::NoEndpoint(NoEndpoint::Filtered))?;
        if result.destinations().is_empty() {
            return Err(Rejection::NoEndpoint(NoEndpoint::Filtered));
        }
        Ok(result)
    }

    /// Accepts a cycle's pick and records it (prefix blocks at every caching target,
    /// locally or at the owners; pre-request hooks), unless the client asked for
    /// `Prefer: if-available` and the decode endpoint holds none of the prompt: then 412
    /// and nothing is recorded, as llm-d returns before its PreRequest plugins run.
    pub(super) fn commit(
        &self,
        p: &Prepared,
        result: &SchedulingResult,
        now: Instant,
    ) -> Result<(), Rejection> {
        if p.req.prefers_if_available() && !result.primary_has_cached_prefix() {
            return Err(Rejection::DecodeCacheMiss);
        }
        p.policy.scheduler.pre_request(&p.req, result, now);
        if let (Some(owners), Some(m)) = (&self.owners, &result.prefix_match)
            && let Some(anchor) = m.anchor
        {
            let targets: Vec<SocketAddr> = result.cache_targets.iter().map(|(a, _)| *a).collect();
            // The precise index learns from the engines' events only; a pick is at most a
            // local, short-lived guess (`speculativeIndexing`).
            match p.policy.scheduler.precise_prefix() {
                None => owners.record(anchor, &m.hashes, &targets),
                Some(precise) if precise.params().speculative_indexing => {
                    owners.speculate(
                        anchor,
                        &m.hashes,
                        &targets,
                        precise.params().speculative_ttl,
                    );
                }
                Some(_) => {}
            }
        }
        Ok(())
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
            let r = Rejection::NoEndpoint(NoEndpoint::Pool);
            self.count_rejection(meta, "", &r);
            r
        })
    }
}

/// Corrects each candidate's prefill count by what the queue knows (`claims`, from the
/// picks and prefill ends reported to it). Prefills that ended there a moment ago come off
/// first: the board may count them still. Then the larger count wins: the board may still
/// lack a pick made on another node a moment ago, and the claims lack requests that did
/// not pass this queue. Neither correction goes below the queue's own count.
fn apply_claims(candidates: &mut [Endpoint], claims: &Claims) {
    if claims.is_empty() {
        return;
    }
    for e in candidates.iter_mut() {
        let known = claims.prefilling_on(e.address);
        let seen = e.in_flight.prefilling;
        let count = seen.saturating_sub(claims.freed_on(e.address)).max(known);
        e.in_flight.requests = e
            .in_flight
            .requests
            .saturating_add(count)
            .saturating_sub(seen);
        e.in_flight.prefilling = count;
    }
}

/// The precise producer's lookup: tokenize, key the tokens, then ask the anchor's owner.
/// A failed tokenization scores the request without prefix data, as llm-d does.
fn precise_lookup(
    tokenizers: Arc<Tokenizers>,
    owners: Arc<dyn PrefixOwners>,
    policy: Arc<Policy>,
    metrics: Arc<NodeMetrics>,
    input: TokenizeInput,
) -> PrefixLookup {
    Box::pin(async move {
        let (Some(params), Some(precise)) = (
            policy.scheduler.token_producer(),
            policy.scheduler.precise_prefix(),
        ) else {
            return PrefixAnswer::Unavailable;
        };
        let tokenize = tracing::span!(target: OTEL_TARGET, Level::TRACE, "tokenize");
        let tokens = match tokenizers
            .tokenize(params, &input)
            .instrument(tokenize)
            .await
        {
            Ok((tokens, source, cached)) => {
                metrics.count_tokenization(source.as_str(), if cached { "cached" } else { "ok" });
                tokens
            }
            Err(e) => {
                metrics.count_tokenization(params.backend().as_str(), "error");
                tracing::warn!(model = %input.model, error = %e, "tokenization failed; scored without prefix data");
                return PrefixAnswer::Unavailable;
            }
        };
        let mut hashes = Vec::new();
        precise.keys_into(&input.model, &tokens, &mut hashes);
        let chain = PrefixChain {
            hashes,
            block_size_tokens: precise.params().block_size(),
        };
        let matches = match chain.anchor() {
            None => Some(PrefixMatches::default()),
            Some(anchor) => match owners.lookup(anchor, &chain.hashes).await {
                PrefixAnswer::Matched(m) => Some(m),
                _ => None,
            },
        };
        PrefixAnswer::Precise {
            chain,
            tokens,
            matches,
        }
    })
}
