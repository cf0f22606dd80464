//! Phase two of the request path: [`Dispatcher::decide`] schedules with the owner's answer,
//! records the pick and issues a [`Ticket`] — a scheduled request that holds the endpoint's
//! in-flight count and is counted exactly once in `infermesh_requests_total`, however it
//! ends (finished, failed, or dropped because the client went away).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use infermesh_scheduler::{ApiKind, Endpoint, InferenceRequest, SchedulingResult, replace_model};

use super::RequestMeta;
use super::owners::PrefixAnswer;
use super::prepare::{Dispatcher, Prepared};
use super::rejection::{NoEndpoint, Rejection};
use crate::metrics::Outcome;
use crate::pool::EndpointSlot;
use crate::usage::ResponseReport;

impl Dispatcher {
    /// The scores to report for `result` (scheduled over `candidates`); nothing is built
    /// unless `emit_endpoint_scores` is on.
    fn scores_of(
        &self,
        result: &SchedulingResult,
        candidates: &[Endpoint],
    ) -> Vec<(SocketAddr, f64)> {
        if !self.cfg.emit_endpoint_scores {
            return Vec::new();
        }
        result.primary_scores.by_address(candidates).collect()
    }

    /// Phase two: schedules with `answer`, records the pick (locally or at the owners) and
    /// issues the ticket. A rejection is counted here.
    pub fn decide(&self, mut p: Prepared, answer: PrefixAnswer) -> Result<Ticket, Rejection> {
        let now = Instant::now();
        let span = tracing::span!(
            target: crate::telemetry::OTEL_TARGET,
            tracing::Level::TRACE,
            "schedule",
            gen_ai.request.model = %p.req.target_model,
            endpoint = tracing::field::Empty,
        );
        let _schedule = span.enter();
        // The precise lookup brings the chain it keyed: from here on it is a remote answer.
        let answer = match answer {
            PrefixAnswer::Precise {
                chain,
                tokens,
                matches,
            } => {
                p.req.prompt_tokens = Some(tokens);
                p.chain = Some(chain);
                matches.map_or(PrefixAnswer::Unavailable, PrefixAnswer::Matched)
            }
            other => other,
        };
        match self.schedule(&p, &answer, now) {
            Ok(result) => {
                span.record(
                    "endpoint",
                    tracing::field::display(result.destinations()[0]),
                );
                for t in &result.plugin_timings {
                    if let Some(label) = p.policy.scheduler.plugin_label(t.plugin) {
                        self.metrics.epp.plugin_call(label, t.nanos);
                    }
                }
                let took = p.started.elapsed();
                self.metrics.observe_scheduling(took);
                self.metrics
                    .epp
                    .scheduled(&p.req.target_model, now.elapsed().as_secs_f64(), true);
                Ok(Ticket::issue(self.clone(), p, answer, result))
            }
            Err(r) => {
                self.metrics
                    .epp
                    .scheduled(&p.req.target_model, now.elapsed().as_secs_f64(), false);
                self.metrics
                    .epp
                    .rejected(&crate::metrics::epp::RequestKey::of(&p.req), r.outcome());
                self.metrics
                    .count_request(&p.req.model, &p.objective, r.outcome());
                tracing::info!(request_id = %p.req.id, model = %p.req.model, status = r.status(), reason = %r, "request rejected");
                Err(r)
            }
        }
    }

    fn schedule(
        &self,
        p: &Prepared,
        answer: &PrefixAnswer,
        now: Instant,
    ) -> Result<SchedulingResult, Rejection> {
        let result = self.cycle(p, &p.candidates, answer, now)?;
        // Once per request, before the if-available check, as llm-d's handler counts when
        // its stages finish; a retry's reschedule is not a new decision.
        if let (Some(counter), Some(decision)) =
            (p.policy.scheduler.decision_counter(), result.decision)
        {
            self.metrics
                .count_decision(counter, &p.req.target_model, decision);
        }
        self.commit(p, &result, now)?;
        let primary = result.destinations()[0];
        self.metrics.count_pick(primary);
        if let Some(m) = &result.prefix_match
            && m.total_blocks() > 0
        {
            self.metrics
                .prefix_match_ratio
                .observe(f64::from(m.matched_blocks) / m.total_blocks() as f64);
            self.metrics.epp.prefix_hit(
                f64::from(m.matched_blocks)
                    * m.block_size_tokens as f64
                    * infermesh_scheduler::prefix::AVERAGE_CHARACTERS_PER_TOKEN as f64,
            );
        }
        tracing::debug!(request_id = %p.req.id, model = %p.req.model, endpoint = %primary, "scheduled");
        Ok(result)
    }

    /// Both phases without waiting on an owner: for callers that cannot await (tests,
    /// tools). With shared prefix state the request is scored without prefix data; flow
    /// control is not consulted.
    pub fn dispatch(
        &self,
        kind: ApiKind,
        body: &[u8],
        meta: RequestMeta,
        exclude: &[SocketAddr],
    ) -> Result<Ticket, Rejection> {
        let p = self.prepare(kind, body, meta, exclude)?;
        let answer = self.no_lookup_answer();
        self.decide(p, answer)
    }

    /// Both phases, awaiting flow control (when on), the burst window (with the producer)
    /// and the owner lookup in between (the proxy's path).
    pub async fn route(
        &self,
        kind: ApiKind,
        body: &[u8],
        meta: RequestMeta,
        exclude: &[SocketAddr],
    ) -> Result<Ticket, Rejection> {
        let mut p = self.prepare(kind, body, meta, exclude)?;
        if let Some(wait) = self.flow_wait(&p) {
            let answer = wait.await;
            self.after_flow(&mut p, answer)?;
        }
        if let Some(wait) = self.burst_wait(&p) {
            let placed = wait.await;
            self.after_burst(&mut p, placed);
        }
        let answer = match self.lookup(&p) {
            Some(fut) => fut.await,
            None => self.no_lookup_answer(),
        };
        self.decide(p, answer)
    }
}

/// A scheduled request. Dropping it without [`Ticket::finish`] counts it as cancelled and
/// still runs the completion hooks, so no request is lost from the books.
#[derive(Debug)]
pub struct Ticket {
    dispatcher: Dispatcher,
    prepared: Prepared,
    answer: PrefixAnswer,
    destinations: Vec<SocketAddr>,
    endpoint_scores: Vec<(SocketAddr, f64)>,
    extra_headers: Vec<(String, String)>,
    response_headers: Vec<(String, String)>,
    slot: Option<Arc<EndpointSlot>>,
    tokens: u64,
    /// The slot counts this request as prefilling (no response byte yet).
    prefilling: bool,
    finished: bool,
}

impl Ticket {
    fn issue(
        dispatcher: Dispatcher,
        mut prepared: Prepared,
        answer: PrefixAnswer,
        result: SchedulingResult,
    ) -> Ticket {
        let endpoint_scores = dispatcher.scores_of(&result, &prepared.candidates);
        // The candidate snapshot is not needed past the pick; a retry takes a fresh one.
        prepared.candidates = Vec::new();
        // The prompt, plus the output estimate under inflight-load-producer's
        // addEstimatedOutputTokens: what the token-load scorer and detector read.
        let tokens = prepared.policy.scheduler.in_flight_tokens(&prepared.req);
        dispatcher
            .metrics
            .epp
            .request_started(&crate::metrics::epp::RequestKey::of(&prepared.req));
        let mut t = Ticket {
            dispatcher,
            prepared,
            answer,
            destinations: Vec::new(),
            endpoint_scores,
            extra_headers: Vec::new(),
            response_headers: Vec::new(),
            slot: None,
            tokens,
            prefilling: false,
            finished: false,
        };
        t.adopt(result);
        // The queue that let it through may let the next one go, which then sees this pick.
        let pod = t.destinations[0];
        super::flow::picked(&mut t.prepared.grant, &mut t.prepared.lease, pod);
        t
    }

    fn adopt(&mut self, result: SchedulingResult) {
        self.destinations = result.destinations().to_vec();
        self.extra_headers = result.request_headers;
        self.response_headers = result.response_headers;
        self.retarget(self.destinations[0]);
    }

    /// The scheduled request.
    pub fn request(&self) -> &InferenceRequest {
        &self.prepared.req
    }

    /// The body to forward when an InferenceModelRewrite replaced the `model` of `body`
    /// (the body this ticket was prepared from); `None`: forward `body` unchanged.
    pub fn rewrite_body(&self, body: &[u8]) -> Option<Vec<u8>> {
        let span = self.prepared.rewrite.clone()?;
        Some(replace_model(body, span, &self.prepared.req.target_model))
    }

    /// `(served model, client-facing model)` when the model was rewritten: responses name
    /// the served model and get the client's name back.
    pub fn model_restore(&self) -> Option<(&str, &str)> {
        self.prepared.rewrite.as_ref()?;
        let r = &self.prepared.req;
        Some((r.target_model.as_str(), r.model.as_str()))
    }

    /// Picked endpoints, primary first, then fallbacks.
    pub fn destinations(&self) -> &[SocketAddr] {
        &self.destinations
    }

    /// The `x-gateway-destination-endpoint` value (`ip:port,ip:port…`), built on demand
    /// (the proxy forwards by address and never needs it).
    pub fn header_value(&self) -> String {
        let mut s = String::with_capacity(22 * self.destinations.len());
        for (i, a) in self.destinations.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            let _ = write!(s, "{a}");
        }
        s
    }

    /// Every endpoint the primary profile scored, with its weighted score; empty unless
    /// `emit_endpoint_scores` is on.
    pub fn endpoint_scores(&self) -> &[(SocketAddr, f64)] {
        &self.endpoint_scores
    }

    /// Extra headers for the model server (e.g. `x-prefiller-host-port`).
    pub fn extra_headers(&self) -> &[(String, String)] {
        &self.extra_headers
    }

    /// Whether the policy this request was scheduled under echoes the served endpoint to
    /// the client (`destination-endpoint-served-verifier`).
    pub fn echoes_served_endpoint(&self) -> bool {
        self.prepared.policy.scheduler.echoes_served_endpoint()
    }

    /// Headers for the client (e.g. `x-session-token` under session affinity).
    pub fn response_headers(&self) -> &[(String, String)] {
        &self.response_headers
    }

    /// Moves the in-flight count to `addr` (the proxy fell back to another endpoint).
    pub fn retarget(&mut self, addr: SocketAddr) {
        if self.slot.as_ref().is_some_and(|s| s.address() == addr) {
            return;
        }
        if let Some(s) = self.slot.take() {
            s.release(self.tokens, self.prefilling);
        }
        let slot = self.dispatcher.pool.load().slot(addr).cloned();
        if let Some(s) = &slot {
            s.acquire(self.tokens);
        }
        self.prefilling = slot.is_some();
        self.slot = slot;
    }

    /// The response's first body bytes arrived (for a streamed completion, its first
    /// token): the endpoint has prefilled this request (`prefill-load-scorer`).
    pub fn first_byte(&mut self) {
        if self.prefilling
            && let Some(s) = &self.slot
        {
            s.first_byte();
            self.prefilling = false;
            // The queue that dispatched it gets the prefill room back now.
            super::flow::prefilled(&mut self.prepared.grant, &mut self.prepared.lease);
        }
    }

    /// Replaces the pick with a new one that avoids `exclude`, with the same prefix data.
    pub fn reschedule(&mut self, exclude: &[SocketAddr]) -> Result<(), Rejection> {
        let d = self.dispatcher.clone();
        let now = Instant::now();
        let candidates = d
            .pool
            .load()
            .candidates(now, d.cfg.staleness, None, exclude);
        if candidates.is_empty() {
            return Err(Rejection::NoEndpoint(NoEndpoint::Retry));
        }
        let result = d.cycle(&self.prepared, &candidates, &self.answer, now)?;
        d.commit(&self.prepared, &result, now)?;
        self.endpoint_scores = d.scores_of(&result, &candidates);
        self.adopt(result);
        Ok(())
    }

    /// Ends the request: completion hooks, in-flight −1, one count with `outcome`.
    pub fn finish(
        mut self,
        served: Option<SocketAddr>,
        outcome: Outcome,
        report: Option<ResponseReport>,
    ) {
        self.complete(served, outcome, report);
    }

    fn complete(
        &mut self,
        served: Option<SocketAddr>,
        outcome: Outcome,
        report: Option<ResponseReport>,
    ) {
        if self.finished {
            return;
        }
        self.finished = true;
        // Ends flow control's lease: the request is over. A lease of the mesh's queue on
        // another node carries the usage there and frees the room there.
        let usage = report.as_ref().and_then(|r| r.usage);
        if let Some(mut lease) = self.prepared.lease.take()
            && let Some(u) = usage
        {
            lease.record_usage(u.prompt_tokens, u.completion_tokens);
        }
        // The room held in this node's queue, given back once the slot is released below.
        let grant = self.prepared.grant.take();
        // program-aware-fairness: the request's tokens go to its program's service.
        if let Some(mut r) = self.prepared.usage.take() {
            if let Some(u) = usage {
                r.record(u.prompt_tokens, u.completion_tokens);
            }
            drop(r);
        }
        let served = served
            .or_else(|| self.slot.as_ref().map(|s| s.address()))
            .unwrap_or(self.destinations[0]);
        let p = &self.prepared;
        p.policy
            .scheduler
            .response_complete(&p.req, served, Instant::now());
        if let Some(s) = self.slot.take() {
            s.release(self.tokens, self.prefilling);
        }
        // Flow control may give the freed room to a waiting request now.
        drop(grant);
        let m = &self.dispatcher.metrics;
        m.count_request(&p.req.model, &p.objective, outcome);
        if let Some(u) = report.as_ref().and_then(|r| r.usage) {
            m.count_tokens(u);
        }
        m.epp.request_done(
            &crate::metrics::epp::RequestKey::of(&p.req),
            outcome,
            crate::metrics::epp::Timing {
                started: p.started,
                ended: Instant::now(),
                request_bytes: p.body_bytes,
                streaming: p.req.stream,
            },
            report.as_ref(),
        );
        tracing::debug!(
            request_id = %p.req.id,
            endpoint = %served,
            ?outcome,
            elapsed_ms = p.started.elapsed().as_secs_f64() * 1e3,
            "request finished"
        );
    }
}

impl Ticket {
    /// Resolves when flow control revokes the request (in-flight eviction of a sheddable
    /// request): the caller ends it with 429 `evicted`. `None` when it cannot be revoked.
    pub fn revoked(&self) -> Option<tokio_util::sync::WaitForCancellationFutureOwned> {
        self.prepared.lease.as_ref()?.revoked()
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if !self.finished {
            self.complete(None, Outcome::Cancelled, None);
        }
    }
}
