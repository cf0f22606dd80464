//! One ext_proc stream as a state machine, free of IO and of protobuf: feed each
//! [`Inbound`] message (converted by [`super::edge`]) to [`ExtProcStream::on_message`] and
//! carry out the [`Action`]s it returns, in order — send each [`Reply`] (the edge turns it
//! into protobuf); for a [`Action::NeedFlow`], await the flow-control wait and hand its
//! answer to [`ExtProcStream::on_flow`]; for a [`Action::NeedLookup`], await the owner
//! lookup and hand its answer to [`ExtProcStream::on_lookup`]; read no message meanwhile.
//! It speaks the Gateway API Inference Extension EPP contract (reference §4).

use std::net::SocketAddr;

use infermesh_scheduler::ApiKind;

use super::edge::InvalidMessage;
use super::message::{
    BodyChunk, BodyMode, Inbound, Message, Reply, RequestHead, ResponseHead, Step,
};
use crate::metrics::Outcome;
use crate::request::{
    BurstWait, DESTINATION_HEADER, Dispatcher, FlowWait, PrefixAnswer, PrefixLookup, Prepared,
    Rejection, RequestMeta, Ticket,
};
use crate::restore::ModelRestorer;
use crate::usage::UsageScanner;

/// Response header carrying the endpoint that served the request, for the GIE conformance
/// suite (set when a `destination-endpoint-served-verifier` is configured).
pub const CONFORMANCE_SERVED_HEADER: &str = "x-conformance-test-served-endpoint";

/// GIE's chunk size for body replies in full-duplex mode.
pub const BODY_CHUNK: usize = 62_000;

/// A protocol violation by the peer; the stream is ended with this gRPC status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The message itself is malformed.
    #[error(transparent)]
    Invalid(#[from] InvalidMessage),
    /// A well-formed message that cannot come at this point of the exchange.
    #[error("{0}")]
    OutOfOrder(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitHeaders,
    Buffering,
    /// The body is complete and prepared; the request waits in flow control.
    AwaitFlow,
    /// The body is complete and prepared; the request waits for its burst window.
    AwaitBurst,
    /// The body is complete and prepared; the owner lookup is in flight.
    AwaitOwner,
    Responding,
    Done,
}

/// What the driver does next for a stream.
pub enum Action {
    /// Send this reply to Envoy.
    Reply(Reply),
    /// Await this owner lookup, then call [`ExtProcStream::on_lookup`] with its answer
    /// before handling the next message.
    NeedLookup(PrefixLookup),
    /// Await this flow-control wait, then call [`ExtProcStream::on_flow`] with its answer
    /// before handling the next message. Dropping it (the stream ended) frees the place.
    NeedFlow(FlowWait),
    /// Await this burst-window wait, then call [`ExtProcStream::on_burst`] with its answer
    /// before handling the next message. Dropping it (the stream ended) frees the place.
    NeedBurst(BurstWait),
}

impl std::fmt::Debug for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Action::Reply(r) => f.debug_tuple("Reply").field(r).finish(),
            Action::NeedLookup(_) => f.write_str("NeedLookup"),
            Action::NeedFlow(_) => f.write_str("NeedFlow"),
            Action::NeedBurst(_) => f.write_str("NeedBurst"),
        }
    }
}

fn replies(r: Vec<Reply>) -> Vec<Action> {
    r.into_iter().map(Action::Reply).collect()
}

/// A prepared request waiting for its owner lookup.
#[derive(Debug)]
struct AwaitingOwner {
    prepared: Prepared,
    body_ends_stream: bool,
    then_trailers: bool,
}

/// The state of one ext_proc stream (one HTTP request through Envoy).
#[derive(Debug)]
pub struct ExtProcStream {
    dispatcher: Dispatcher,
    request_mode: BodyMode,
    response_mode: BodyMode,
    phase: Phase,
    /// How the body is read, or the 400 for a path no configured parser takes (answered
    /// once the body is in, as llm-d does).
    kind: Result<ApiKind, Rejection>,
    meta: RequestMeta,
    body: Vec<u8>,
    ticket: Option<Ticket>,
    response_status: u16,
    served: Option<SocketAddr>,
    usage: Option<UsageScanner>,
    awaiting: Option<AwaitingOwner>,
    restore: Option<ModelRestorer>,
    /// Whether the driver has taken the ticket's revocation future.
    revocation_taken: bool,
    /// The request can still be evicted (its revocation was handed out).
    revocable: bool,
    /// The response-headers reply of a request that can be evicted, held until the first
    /// body chunk: eviction while the pod prefills then answers 429 `evicted` rather than
    /// a 200 whose stream Envoy must reset before any token.
    held_headers: Option<Reply>,
    /// The request's trace span (disabled unless `--tracing`), entered around every
    /// request-path call so their spans are its children.
    otel: tracing::Span,
}

impl ExtProcStream {
    /// A new stream; body modes come from the first message's `protocol_config` and
    /// default to FULL_DUPLEX_STREAMED (the only mode GIE supports).
    pub fn new(dispatcher: Dispatcher) -> ExtProcStream {
        ExtProcStream {
            dispatcher,
            request_mode: BodyMode::FullDuplexStreamed,
            response_mode: BodyMode::FullDuplexStreamed,
            phase: Phase::AwaitHeaders,
            kind: Ok(ApiKind::Completions),
            meta: RequestMeta::default(),
            body: Vec::new(),
            ticket: None,
            response_status: 0,
            served: None,
            usage: None,
            awaiting: None,
            restore: None,
            revocation_taken: false,
            revocable: false,
            held_headers: None,
            otel: tracing::Span::none(),
        }
    }

    /// The request id (after the request headers arrived).
    pub fn request_id(&self) -> &str {
        &self.meta.request_id
    }

    /// Handles one converted message and returns what to do, in order.
    pub fn on_message(&mut self, inbound: Inbound) -> Result<Vec<Action>, ProtocolError> {
        if self.phase == Phase::AwaitOwner {
            return Err(ProtocolError::OutOfOrder(
                "message received while the owner lookup is pending",
            ));
        }
        if self.phase == Phase::AwaitFlow {
            return Err(ProtocolError::OutOfOrder(
                "message received while the request waits in flow control",
            ));
        }
        if self.phase == Phase::AwaitBurst {
            return Err(ProtocolError::OutOfOrder(
                "message received while the request waits for its burst window",
            ));
        }
        if let Some(m) = inbound.modes {
            self.request_mode = m.request;
            self.response_mode = m.response;
        }
        let otel = self.otel.clone();
        let _otel = otel.enter();
        match inbound.message {
            Message::RequestHeaders(h) => self.on_request_headers(h).map(replies),
            Message::RequestBody(b) => Ok(self.on_request_body(b)),
            Message::RequestTrailers => Ok(self.on_request_trailers()),
            Message::ResponseHeaders(h) => Ok(replies(self.on_response_headers(h))),
            Message::ResponseBody(b) => Ok(replies(self.on_response_body(b))),
            Message::ResponseTrailers => {
                self.finish();
                let mut out: Vec<Reply> = self.held_headers.take().into_iter().collect();
                if let Some(held) = self.restore.as_mut().map(ModelRestorer::finish)
                    && !held.is_empty()
                {
                    out.extend(streamed_chunks(held, false, false));
                }
                out.push(Reply::Continue(Step::ResponseTrailers));
                Ok(replies(out))
            }
        }
    }

    /// The flow-control wait asked for by [`Action::NeedFlow`] finished with `answer`.
    pub fn on_flow(
        &mut self,
        answer: Result<crate::request::flow::Dispatched, infermesh_scheduler::flow::DropReason>,
    ) -> Vec<Action> {
        let otel = self.otel.clone();
        let _otel = otel.enter();
        let Some(mut w) = self.awaiting.take() else {
            return Vec::new();
        };
        if let Err(r) = self.dispatcher.after_flow(&mut w.prepared, answer) {
            self.phase = Phase::Done;
            return replies(vec![self.immediate(&r)]);
        }
        self.burst_or_lookup(w)
    }

    /// The burst-window wait asked for by [`Action::NeedBurst`] finished with `placed`.
    pub fn on_burst(&mut self, placed: Option<SocketAddr>) -> Vec<Action> {
        let otel = self.otel.clone();
        let _otel = otel.enter();
        let Some(mut w) = self.awaiting.take() else {
            return Vec::new();
        };
        self.dispatcher.after_burst(&mut w.prepared, placed);
        self.lookup_or_decide(w)
    }

    /// The owner lookup asked for by [`Action::NeedLookup`] finished with `answer`.
    pub fn on_lookup(&mut self, answer: PrefixAnswer) -> Vec<Action> {
        let otel = self.otel.clone();
        let _otel = otel.enter();
        let Some(w) = self.awaiting.take() else {
            return Vec::new();
        };
        let mut out = replies(self.decide(w.prepared, answer, w.body_ends_stream));
        if w.then_trailers && self.phase != Phase::Done {
            out.push(Action::Reply(Reply::Continue(Step::RequestTrailers)));
        }
        out
    }

    fn on_request_headers(&mut self, h: RequestHead) -> Result<Vec<Reply>, ProtocolError> {
        if self.phase != Phase::AwaitHeaders {
            return Err(ProtocolError::OutOfOrder("request headers received twice"));
        }
        self.kind = self.dispatcher.parser_for(&h.path);
        self.meta =
            RequestMeta::from_headers(h.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        self.meta.subset = h.subset;
        self.otel = tracing::span!(
            target: crate::telemetry::OTEL_TARGET,
            tracing::Level::TRACE,
            "infermesh.request",
            otel.kind = "server",
            url.path = %h.path,
            request_id = %self.meta.request_id,
        );
        crate::telemetry::adopt_parent_from(
            &self.otel,
            h.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        );
        let span = tracing::debug_span!("ext_proc", request_id = %self.meta.request_id);
        let _g = span.enter();
        if h.end_of_stream || self.request_mode == BodyMode::None {
            // Nothing to schedule by (e.g. GET /v1/models): any ready endpoint will do.
            self.phase = Phase::Responding;
            return Ok(vec![match self.dispatcher.pick_any(&self.meta) {
                Ok(addr) => {
                    let value = addr.to_string();
                    Reply::Route {
                        step: Step::RequestHeaders,
                        set: vec![(DESTINATION_HEADER.to_owned(), value.clone())],
                        remove: Vec::new(),
                        destination: value,
                        scores: Vec::new(),
                        body: None,
                    }
                }
                Err(r) => self.immediate(&r),
            }]);
        }
        self.phase = Phase::Buffering;
        match self.request_mode {
            // Envoy waits for this reply before it sends the body.
            BodyMode::Buffered | BodyMode::BufferedPartial | BodyMode::Streamed => {
                Ok(vec![Reply::Continue(Step::RequestHeaders)])
            }
            _ => Ok(Vec::new()),
        }
    }

    fn on_request_body(&mut self, b: BodyChunk) -> Vec<Action> {
        if self.phase != Phase::Buffering {
            return Vec::new();
        }
        let limit = self.dispatcher.config().max_body_bytes;
        if self.body.len() + b.body.len() > limit {
            let r = Rejection::TooLarge { limit };
            self.dispatcher.count_rejection(&self.meta, "", &r);
            self.phase = Phase::Done;
            return replies(vec![self.immediate(&r)]);
        }
        if self.body.is_empty() {
            self.body = b.body; // a body in one chunk is kept without a copy
        } else {
            self.body.extend_from_slice(&b.body);
        }
        if !b.end_of_stream {
            return match self.request_mode {
                BodyMode::Streamed => replies(vec![Reply::Continue(Step::RequestBody)]),
                _ => Vec::new(),
            };
        }
        self.prepare(true, false)
    }

    fn on_request_trailers(&mut self) -> Vec<Action> {
        if self.phase == Phase::Buffering {
            return self.prepare(false, true);
        }
        if self.phase == Phase::Done {
            return Vec::new();
        }
        replies(vec![Reply::Continue(Step::RequestTrailers)])
    }

    /// The body is complete: phase one, then the owner lookup or straight to the pick.
    fn prepare(&mut self, body_ends_stream: bool, then_trailers: bool) -> Vec<Action> {
        let kind = match &self.kind {
            Ok(kind) => *kind,
            Err(r) => {
                self.dispatcher.count_rejection(&self.meta, "", r);
                self.phase = Phase::Done;
                return replies(vec![self.immediate(r)]);
            }
        };
        let prepared = match self
            .dispatcher
            .prepare(kind, &self.body, self.meta.clone(), &[])
        {
            Ok(p) => p,
            Err(r) => {
                self.phase = Phase::Done;
                return replies(vec![self.immediate(&r)]);
            }
        };
        let w = AwaitingOwner {
            prepared,
            body_ends_stream,
            then_trailers,
        };
        if let Some(wait) = self.dispatcher.flow_wait(&w.prepared) {
            self.phase = Phase::AwaitFlow;
            self.awaiting = Some(w);
            return vec![Action::NeedFlow(wait)];
        }
        self.burst_or_lookup(w)
    }

    /// After flow control: the burst window (with the producer), else on to the lookup.
    fn burst_or_lookup(&mut self, w: AwaitingOwner) -> Vec<Action> {
        if let Some(wait) = self.dispatcher.burst_wait(&w.prepared) {
            self.phase = Phase::AwaitBurst;
            self.awaiting = Some(w);
            return vec![Action::NeedBurst(wait)];
        }
        self.lookup_or_decide(w)
    }

    /// After phase one (and flow control): the owner lookup, or straight to the pick.
    fn lookup_or_decide(&mut self, w: AwaitingOwner) -> Vec<Action> {
        if let Some(lookup) = self.dispatcher.lookup(&w.prepared) {
            self.phase = Phase::AwaitOwner;
            self.awaiting = Some(w);
            return vec![Action::NeedLookup(lookup)];
        }
        self.awaiting = Some(w);
        let answer = self.dispatcher.no_lookup_answer();
        self.on_lookup(answer)
    }

    /// Phase two: pick, then reply with the destination and the body.
    fn decide(
        &mut self,
        prepared: Prepared,
        answer: PrefixAnswer,
        body_ends_stream: bool,
    ) -> Vec<Reply> {
        let span = tracing::debug_span!("ext_proc", request_id = %self.meta.request_id);
        let _g = span.enter();
        let body = std::mem::take(&mut self.body);
        let ticket = match self.dispatcher.decide(prepared, answer) {
            Ok(t) => t,
            Err(r) => {
                self.phase = Phase::Done;
                return vec![self.immediate(&r)];
            }
        };
        // An InferenceModelRewrite replaced the model: Envoy forwards the new body.
        let rewritten = ticket.rewrite_body(&body);
        let body_changed = rewritten.is_some();
        let body = rewritten.unwrap_or(body);
        let destination = ticket.header_value();
        let mut set = Vec::with_capacity(2 + ticket.extra_headers().len());
        set.push((DESTINATION_HEADER.to_owned(), destination.clone()));
        set.push(("content-length".to_owned(), body.len().to_string()));
        set.extend(ticket.extra_headers().iter().cloned());
        // The pod continues the trace from the request's span.
        if let Some(tp) = crate::telemetry::traceparent(&self.otel) {
            set.push(("traceparent".to_owned(), tp));
        }
        // Router-only headers the client sent and the pick did not set: Envoy drops them,
        // so no pod (or sidecar) sees a client-chosen prefiller or destination.
        let remove = self
            .meta
            .stripped
            .iter()
            .filter(|h| !set.iter().any(|(k, _)| k == *h))
            .map(|h| (*h).to_owned())
            .collect();
        let out = match self.request_mode {
            BodyMode::FullDuplexStreamed => {
                let mut out = vec![Reply::Route {
                    step: Step::RequestHeaders,
                    set,
                    remove,
                    destination,
                    scores: ticket.endpoint_scores().to_vec(),
                    body: None,
                }];
                out.extend(streamed_chunks(body, body_ends_stream, true));
                out
            }
            _ => vec![Reply::Route {
                step: Step::RequestBody,
                set,
                remove,
                destination,
                scores: ticket.endpoint_scores().to_vec(),
                body: body_changed.then_some(body),
            }],
        };
        self.ticket = Some(ticket);
        self.phase = Phase::Responding;
        out
    }

    fn on_response_headers(&mut self, h: ResponseHead) -> Vec<Reply> {
        self.response_status = h.status;
        self.served = h.served;
        self.usage = Some(UsageScanner::new(h.content_type.as_deref()));
        // Headers the client gets from the pick (the session-affinity token).
        let mut set = self
            .ticket
            .as_ref()
            .map(|t| t.response_headers().to_vec())
            .unwrap_or_default();
        // llm-d's destination-endpoint-served-verifier (GIE conformance): the client learns
        // which endpoint the gateway says served it.
        if self
            .dispatcher
            .policy()
            .load()
            .scheduler
            .echoes_served_endpoint()
        {
            set.push((
                CONFORMANCE_SERVED_HEADER.to_owned(),
                h.served_metadata.conformance_header_value().to_owned(),
            ));
        }
        let mut remove = Vec::new();
        // After a rewrite the client gets its own model name back, which may change the
        // body's length (full-duplex mode only: the body passes through this stream).
        if self.response_mode == BodyMode::FullDuplexStreamed
            && let Some((served, client)) = self.ticket.as_ref().and_then(Ticket::model_restore)
        {
            self.restore = Some(ModelRestorer::new(served, client));
            remove.push("content-length".to_owned());
        }
        let reply = Reply::Mutate { set, remove };
        if h.end_of_stream {
            self.finish();
            return vec![reply];
        }
        // Full-duplex mode only: there Envoy sends the body without waiting for this reply.
        if self.revocable && self.response_mode == BodyMode::FullDuplexStreamed {
            self.held_headers = Some(reply);
            return Vec::new();
        }
        vec![reply]
    }

    fn on_response_body(&mut self, b: BodyChunk) -> Vec<Reply> {
        if let Some(u) = &mut self.usage {
            u.feed(&b.body);
        }
        if !b.body.is_empty()
            && let Some(t) = self.ticket.as_mut()
        {
            t.first_byte();
        }
        let end = b.end_of_stream;
        let body = match self.restore.as_mut() {
            Some(r) => {
                let mut out = r.feed(&b.body);
                if end {
                    out.extend(r.finish());
                }
                out
            }
            None => b.body,
        };
        let mut out: Vec<Reply> = self.held_headers.take().into_iter().collect();
        match self.response_mode {
            BodyMode::FullDuplexStreamed => out.extend(streamed_chunks(body, end, false)),
            _ => out.push(Reply::Continue(Step::ResponseBody)),
        }
        if end {
            self.finish();
        }
        out
    }

    /// The scheduled request's revocation (in-flight eviction), handed out once: the
    /// driver awaits it beside Envoy's messages and calls [`Self::on_revoked`].
    pub fn revocation(&mut self) -> Option<tokio_util::sync::WaitForCancellationFutureOwned> {
        if self.revocation_taken {
            return None;
        }
        let fut = self.ticket.as_ref()?.revoked();
        self.revocation_taken = true;
        self.revocable = fut.is_some();
        fut
    }

    /// Flow control revoked the request: Envoy gets 429 `evicted` (a local reply while the
    /// response headers are held or not yet in, a reset once the client has them) and the
    /// stream is over.
    pub fn on_revoked(&mut self) -> Vec<Action> {
        let Some(ticket) = self.ticket.take() else {
            return Vec::new();
        };
        self.held_headers = None;
        let r = Rejection::Flow(infermesh_scheduler::flow::DropReason::Evicted);
        let usage = self.usage.take().map(UsageScanner::report);
        ticket.finish(self.served, r.outcome(), usage);
        self.phase = Phase::Done;
        replies(vec![self.immediate(&r)])
    }

    /// Completes the request's accounting (idempotent).
    fn finish(&mut self) {
        let Some(ticket) = self.ticket.take() else {
            return;
        };
        let outcome = if (200..300).contains(&self.response_status) {
            Outcome::Success
        } else {
            Outcome::UpstreamStatus
        };
        let usage = self.usage.take().map(UsageScanner::report);
        ticket.finish(self.served, outcome, usage);
        self.phase = Phase::Done;
    }

    fn immediate(&self, r: &Rejection) -> Reply {
        let mut headers = vec![
            ("content-type".to_owned(), "application/json".to_owned()),
            ("x-request-id".to_owned(), self.meta.request_id.clone()),
        ];
        if let Some((k, v)) = r.dropped_reason() {
            headers.push((k.to_owned(), v.to_owned()));
        }
        Reply::Immediate {
            status: r.status(),
            headers,
            body: r.json_body(),
            details: r.to_string(),
        }
    }
}

/// Body pieces carrying `body` in chunks of at most [`BODY_CHUNK`].
fn streamed_chunks(body: Vec<u8>, end_of_stream: bool, request: bool) -> Vec<Reply> {
    // The common case (one chunk) moves the buffer instead of copying it.
    if body.len() <= BODY_CHUNK {
        return vec![Reply::Chunk {
            request,
            body,
            end_of_stream,
        }];
    }
    let n = body.len().div_ceil(BODY_CHUNK);
    body.chunks(BODY_CHUNK)
        .enumerate()
        .map(|(i, c)| Reply::Chunk {
            request,
            body: c.to_vec(),
            end_of_stream: end_of_stream && i + 1 == n,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use arc_swap::ArcSwap;
    use infermesh_proto::envoy::config::core::v3::Metadata;
    use infermesh_proto::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
    use infermesh_proto::envoy::service::ext_proc::v3::{
        HeaderMutation, HttpBody, ImmediateResponse, ProcessingRequest, ProcessingResponse,
        ProtocolConfiguration, StreamedBodyResponse, body_mutation, processing_request,
        processing_response,
    };
    use infermesh_proto::google::protobuf::{ListValue, Struct, Value, value::Kind};
    use infermesh_scheduler::{Metrics, ResolvedConfig};

    use super::*;
    use crate::discovery::EndpointSpec;
    use crate::extproc::edge::{
        LB_NAMESPACE, SCORES_KEY, SERVED_KEY, SUBSET_KEY, SUBSET_NAMESPACE,
    };
    use crate::metrics::NodeMetrics;
    use crate::policy::Policy;
    use crate::pool::{EndpointSlot, PoolView};
    use crate::request::DispatchConfig;
    use crate::scrape::engine::Engine;
    use infermesh_scheduler::plugins::filters::TEST_ENDPOINT_SELECTION_HEADER;

    const MODEL: &str = "m";

    impl ExtProcStream {
        /// What the driver does with a message from Envoy: the edge converts it, the
        /// machine handles it (these tests drive both, protobuf in and out).
        fn handle(&mut self, msg: ProcessingRequest) -> Result<Vec<Action>, ProtocolError> {
            let inbound = Inbound::try_from(msg)?;
            self.on_message(inbound)
        }

        /// `handle` for a stream without shared prefix state: every action is a reply.
        fn handle_replies(
            &mut self,
            msg: ProcessingRequest,
        ) -> Result<Vec<ProcessingResponse>, ProtocolError> {
            Ok(self
                .handle(msg)?
                .into_iter()
                .map(|a| match a {
                    Action::Reply(r) => r.into(),
                    Action::NeedLookup(_) => panic!("no owner lookup without shared state"),
                    Action::NeedFlow(_) => panic!("no flow control without the gate"),
                    Action::NeedBurst(_) => panic!("no burst window without the producer"),
                })
                .collect())
        }
    }

    fn pods() -> Vec<SocketAddr> {
        (0..3)
            .map(|i| SocketAddr::from(([10, 0, 0, 1 + i], 8000)))
            .collect()
    }

    fn dispatcher() -> (Dispatcher, Arc<PoolView>) {
        let now = Instant::now();
        let slots: Vec<Arc<EndpointSlot>> = pods()
            .into_iter()
            .enumerate()
            .map(|(i, address)| {
                let s = Arc::new(EndpointSlot::new(EndpointSpec {
                    address,
                    pod: format!("p{i}"),
                    labels: Default::default(),
                    engine: Engine::Vllm,
                }));
                s.record_scrape(Metrics::idle(now));
                s
            })
            .collect();
        let view = Arc::new(PoolView::new(
            "t".into(),
            slots,
            HashSet::from([MODEL.to_owned()]),
            HashMap::new(),
        ));
        let pool = Arc::new(ArcSwap::new(view.clone()));
        let policy = Arc::new(ArcSwap::from_pointee(
            Policy::new(&ResolvedConfig::builtin_default()).unwrap(),
        ));
        let d = Dispatcher::new(
            pool,
            policy,
            Arc::new(NodeMetrics::new()),
            DispatchConfig {
                max_body_bytes: 200_000,
                staleness: Duration::from_secs(60),
                emit_endpoint_scores: false,
            },
        );
        (d, view)
    }

    fn mode(req: BodySendMode, resp: BodySendMode) -> Option<ProtocolConfiguration> {
        Some(ProtocolConfiguration {
            request_body_mode: req as i32,
            response_body_mode: resp as i32,
            ..Default::default()
        })
    }

    use super::super::edge::tests::headers;

    fn req_headers(
        pc: Option<ProtocolConfiguration>,
        extra: &[(&str, &str)],
        md: Option<Metadata>,
    ) -> ProcessingRequest {
        let mut h = vec![(":method", "POST"), (":path", "/v1/completions")];
        h.extend_from_slice(extra);
        ProcessingRequest {
            protocol_config: pc,
            metadata_context: md,
            request: Some(processing_request::Request::RequestHeaders(headers(
                &h, false,
            ))),
            ..Default::default()
        }
    }

    fn body(bytes: &[u8], end_of_stream: bool, request: bool) -> ProcessingRequest {
        let b = HttpBody {
            body: bytes.to_vec(),
            end_of_stream,
            ..Default::default()
        };
        ProcessingRequest {
            request: Some(if request {
                processing_request::Request::RequestBody(b)
            } else {
                processing_request::Request::ResponseBody(b)
            }),
            ..Default::default()
        }
    }

    fn completion(prompt_len: usize) -> Vec<u8> {
        serde_json::to_vec(
            &serde_json::json!({"model": MODEL, "prompt": "p".repeat(prompt_len), "max_tokens": 3}),
        )
        .unwrap()
    }

    fn set_header(m: &HeaderMutation, key: &str) -> Option<String> {
        m.set_headers
            .iter()
            .filter_map(|o| o.header.as_ref())
            .find(|h| h.key == key)
            .map(|h| String::from_utf8(h.raw_value.clone()).unwrap())
    }

    fn metadata_destination(r: &ProcessingResponse) -> String {
        let lb = &r.dynamic_metadata.as_ref().unwrap().fields[LB_NAMESPACE];
        let Some(Kind::StructValue(s)) = &lb.kind else {
            panic!("envoy.lb is not a struct")
        };
        match &s.fields[DESTINATION_HEADER].kind {
            Some(Kind::StringValue(v)) => v.clone(),
            other => panic!("bad destination {other:?}"),
        }
    }

    /// The streamed body piece a request- or response-body reply carries.
    fn streamed(r: &ProcessingResponse) -> &StreamedBodyResponse {
        let common = match &r.response {
            Some(
                processing_response::Response::RequestBody(b)
                | processing_response::Response::ResponseBody(b),
            ) => b.response.as_ref(),
            other => panic!("expected a body reply, got {other:?}"),
        };
        match common
            .and_then(|c| c.body_mutation.as_ref())
            .and_then(|m| m.mutation.as_ref())
        {
            Some(body_mutation::Mutation::StreamedResponse(sr)) => sr,
            other => panic!("expected a streamed body piece, got {other:?}"),
        }
    }

    fn immediate(r: &ProcessingResponse) -> &ImmediateResponse {
        match &r.response {
            Some(processing_response::Response::ImmediateResponse(i)) => i,
            other => panic!("expected an immediate response, got {other:?}"),
        }
    }

    /// A stream over a saturated pool with flow control on.
    fn gated_stream() -> (ExtProcStream, Dispatcher, tokio::sync::watch::Sender<bool>) {
        let (d, view) = dispatcher();
        for slot in &view.slots {
            slot.record_scrape(Metrics {
                waiting_queue: 50,
                ..Metrics::idle(Instant::now())
            });
        }
        let (d, sd) =
            crate::request::gated_for_tests(d, infermesh_scheduler::flow::FlowConfig::default());
        let mut s = ExtProcStream::new(d.clone());
        let fd = BodySendMode::FullDuplexStreamed;
        s.handle(req_headers(mode(fd, fd), &[], None)).unwrap();
        (s, d, sd)
    }

    fn flow_wait(actions: Vec<Action>) -> FlowWait {
        match <[Action; 1]>::try_from(actions) {
            Ok([Action::NeedFlow(w)]) => w,
            other => panic!("expected one NeedFlow, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_reset_stream_waiting_in_flow_control_frees_its_place() {
        let (mut s, d, _sd) = gated_stream();
        let mut wait = flow_wait(s.handle(body(&completion(10), true, true)).unwrap());
        assert!(
            s.handle(body(b"x", true, true)).is_err(),
            "no message is read while the request waits"
        );
        assert!(
            futures::poll!(&mut wait).is_pending(),
            "saturated: it waits"
        );
        let queued = || d.metrics().flow.queue_size.get();
        for _ in 0..2000 {
            if queued() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(queued(), 1);
        // Envoy reset the stream: the driver drops the wait with the stream.
        drop(wait);
        drop(s);
        for _ in 0..2000 {
            if queued() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(queued(), 0);
    }

    /// `out` is one 429 immediate response dropped for `reason`.
    fn assert_429_dropped(out: &[Action], reason: &str) {
        let [Action::Reply(r)] = out else {
            panic!("{out:?}")
        };
        let r = ProcessingResponse::from(r.clone());
        let i = immediate(&r);
        assert_eq!(i.status.unwrap().code, 429);
        assert_eq!(
            set_header(
                i.headers.as_ref().unwrap(),
                "x-llm-d-request-dropped-reason"
            )
            .as_deref(),
            Some(reason)
        );
    }

    #[tokio::test]
    async fn a_flow_control_drop_is_an_immediate_response_with_the_reason() {
        let (mut s, _d, _sd) = gated_stream();
        let _wait = flow_wait(s.handle(body(&completion(10), true, true)).unwrap());
        let out = s.on_flow(Err(infermesh_scheduler::flow::DropReason::TtlExpired));
        assert_429_dropped(&out, "rejected-ttl-expired");
        // Dispatched: the stream goes on to the pick.
        let (mut s, _d, _sd) = gated_stream();
        let _wait = flow_wait(s.handle(body(&completion(10), true, true)).unwrap());
        let out = s.on_flow(Ok(crate::request::flow::Dispatched {
            waited: Duration::from_millis(5),
            lease: None,
            usage: None,
            grant: None,
            claims: Default::default(),
        }));
        assert!(
            out.iter()
                .any(|a| matches!(a, Action::Reply(Reply::Route { .. }))),
            "{out:?}"
        );
    }

    /// A lease the tier's queue on another node could revoke, revoked by cancelling it.
    #[derive(Debug)]
    struct RevocableHold(tokio_util::sync::CancellationToken);

    impl crate::request::flow::RemoteHold for RevocableHold {
        fn revoked(&self) -> Option<tokio_util::sync::WaitForCancellationFutureOwned> {
            Some(self.0.clone().cancelled_owned())
        }
        fn record_usage(&mut self, _input: u64, _output: u64) {}
        fn prefilled(&mut self) {}
        fn picked(&mut self, _pod: std::net::SocketAddr) {}
    }

    /// A gated stream dispatched with a revocable lease, its response headers in.
    fn evictable_responding() -> (ExtProcStream, Vec<Action>) {
        let (mut s, _d, _sd) = gated_stream();
        let _wait = flow_wait(s.handle(body(&completion(10), true, true)).unwrap());
        let lease = RevocableHold(tokio_util::sync::CancellationToken::new());
        let out = s.on_flow(Ok(crate::request::flow::Dispatched::remote(
            Duration::from_millis(5),
            Box::new(lease),
            Default::default(),
        )));
        assert!(
            out.iter()
                .any(|a| matches!(a, Action::Reply(Reply::Route { .. }))),
            "{out:?}"
        );
        assert!(s.revocation().is_some(), "the lease can be revoked");
        let out = s
            .handle(ProcessingRequest {
                request: Some(processing_request::Request::ResponseHeaders(headers(
                    &[(":status", "200"), ("content-type", "text/event-stream")],
                    false,
                ))),
                ..Default::default()
            })
            .unwrap();
        (s, out)
    }

    #[tokio::test]
    async fn an_evictable_request_holds_response_headers_until_the_first_body_chunk() {
        let (mut s, out) = evictable_responding();
        assert!(out.is_empty(), "headers held: {out:?}");
        let out = s
            .handle_replies(body(b"data: {}\n\n", false, false))
            .unwrap();
        assert!(
            matches!(
                out[0].response,
                Some(processing_response::Response::ResponseHeaders(_))
            ),
            "{out:?}"
        );
        assert!(
            matches!(
                out[1].response,
                Some(processing_response::Response::ResponseBody(_))
            ),
            "{out:?}"
        );
        assert_eq!(streamed(&out[1]).body, b"data: {}\n\n");
        // Later chunks pass on alone.
        let out = s
            .handle_replies(body(b"data: [DONE]\n\n", true, false))
            .unwrap();
        assert_eq!(out.len(), 1, "{out:?}");
    }

    #[tokio::test]
    async fn eviction_while_the_response_headers_are_held_is_a_429() {
        let (mut s, out) = evictable_responding();
        assert!(out.is_empty(), "headers held: {out:?}");
        assert_429_dropped(&s.on_revoked(), "evicted");
    }

    #[test]
    fn client_sent_router_only_headers_are_removed_not_forwarded() {
        let (d, _view) = dispatcher();
        let mut s = ExtProcStream::new(d);
        let fd = BodySendMode::FullDuplexStreamed;
        let sent = [
            ("x-prefiller-host-port", "169.254.169.254:80"),
            (DESTINATION_HEADER, "10.9.9.9:1"),
        ];
        assert!(
            s.handle_replies(req_headers(mode(fd, fd), &sent, None))
                .unwrap()
                .is_empty()
        );
        let out = s
            .handle_replies(body(&completion(100), true, true))
            .unwrap();
        let Some(processing_response::Response::RequestHeaders(h)) = &out[0].response else {
            panic!("first reply must answer the request headers")
        };
        let m = h
            .response
            .as_ref()
            .unwrap()
            .header_mutation
            .as_ref()
            .unwrap();
        // The prefiller header is dropped; the destination is the router's own pick.
        assert_eq!(m.remove_headers, vec!["x-prefiller-host-port".to_owned()]);
        let dest = set_header(m, DESTINATION_HEADER).unwrap();
        assert!(pods().iter().any(|p| p.to_string() == dest), "{dest}");
    }

    #[test]
    fn full_duplex_holds_headers_until_the_body_ends_then_streams_it_back() {
        let (d, view) = dispatcher();
        let mut s = ExtProcStream::new(d);
        let fd = BodySendMode::FullDuplexStreamed;
        assert!(
            s.handle_replies(req_headers(mode(fd, fd), &[("x-request-id", "r1")], None))
                .unwrap()
                .is_empty()
        );
        let payload = completion(100_000);
        let (a, b) = payload.split_at(40_000);
        assert!(s.handle_replies(body(a, false, true)).unwrap().is_empty());
        let out = s.handle_replies(body(b, true, true)).unwrap();
        // Headers reply, then the body in 62,000-byte chunks.
        assert_eq!(out.len(), 1 + payload.len().div_ceil(BODY_CHUNK));
        let Some(processing_response::Response::RequestHeaders(h)) = &out[0].response else {
            panic!("first reply must answer the request headers")
        };
        let common = h.response.as_ref().unwrap();
        assert!(common.clear_route_cache);
        let m = common.header_mutation.as_ref().unwrap();
        let dest = set_header(m, DESTINATION_HEADER).unwrap();
        assert!(pods().iter().any(|p| p.to_string() == dest), "{dest}");
        assert_eq!(metadata_destination(&out[0]), dest);
        assert_eq!(
            set_header(m, "content-length").unwrap(),
            payload.len().to_string()
        );
        let mut echoed = Vec::new();
        for (i, r) in out[1..].iter().enumerate() {
            assert!(
                matches!(
                    r.response,
                    Some(processing_response::Response::RequestBody(_))
                ),
                "request body reply expected"
            );
            let sr = streamed(r);
            assert!(sr.body.len() <= BODY_CHUNK);
            assert_eq!(sr.end_of_stream, i == out.len() - 2);
            echoed.extend_from_slice(&sr.body);
        }
        assert_eq!(echoed, payload, "the body must come back unchanged");
        let addr: SocketAddr = dest.parse().unwrap();
        assert_eq!(view.slot(addr).unwrap().in_flight().requests, 1);

        // Response: headers CONTINUE, body echoed as streamed_response, then settled.
        let resp_headers = ProcessingRequest {
            request: Some(processing_request::Request::ResponseHeaders(headers(
                &[(":status", "200"), ("content-type", "application/json")],
                false,
            ))),
            ..Default::default()
        };
        let out = s.handle_replies(resp_headers).unwrap();
        assert!(matches!(
            out[0].response,
            Some(processing_response::Response::ResponseHeaders(_))
        ));
        let usage = br#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":3}}"#;
        let out = s.handle_replies(body(usage, true, false)).unwrap();
        assert!(
            matches!(
                out[0].response,
                Some(processing_response::Response::ResponseBody(_))
            ),
            "response body reply expected"
        );
        let sr = streamed(&out[0]);
        assert_eq!(sr.body, usage);
        assert!(sr.end_of_stream);
        assert_eq!(view.slot(addr).unwrap().in_flight().requests, 0);
    }

    #[test]
    fn buffered_mode_continues_headers_and_routes_in_the_body_reply() {
        let (d, _) = dispatcher();
        let mut s = ExtProcStream::new(d);
        let out = s
            .handle_replies(req_headers(
                mode(BodySendMode::Buffered, BodySendMode::None),
                &[],
                None,
            ))
            .unwrap();
        assert_eq!(out.len(), 1);
        assert!(matches!(
            out[0].response,
            Some(processing_response::Response::RequestHeaders(_))
        ));
        // No x-request-id: one was generated (a UUID).
        assert_eq!(uuid::Uuid::parse_str(s.request_id()).map(|_| ()), Ok(()));
        let out = s.handle_replies(body(&completion(10), true, true)).unwrap();
        assert_eq!(out.len(), 1);
        let Some(processing_response::Response::RequestBody(b)) = &out[0].response else {
            panic!("body reply expected")
        };
        let common = b.response.as_ref().unwrap();
        assert!(common.clear_route_cache);
        assert!(
            common.body_mutation.is_none(),
            "buffered body passes unchanged"
        );
        let dest =
            set_header(common.header_mutation.as_ref().unwrap(), DESTINATION_HEADER).unwrap();
        assert_eq!(metadata_destination(&out[0]), dest);
    }

    #[test]
    fn prefer_if_available_without_a_cached_prefix_is_an_immediate_412() {
        let fd = BodySendMode::FullDuplexStreamed;
        let (d, _) = dispatcher();
        let send = |prefer: Option<&str>| {
            let mut s = ExtProcStream::new(d.clone());
            let mut extra = vec![("x-request-id", "abc")];
            extra.extend(prefer.map(|p| ("prefer", p)));
            s.handle_replies(req_headers(mode(fd, fd), &extra, None))
                .unwrap();
            s.handle_replies(body(&completion(2000), true, true))
                .unwrap()
        };
        let out = send(Some("if-available"));
        let i = immediate(&out[0]);
        assert_eq!(i.status.unwrap().code, 412);
        let json: serde_json::Value = serde_json::from_slice(&i.body).unwrap();
        assert_eq!(
            json["error"]["message"],
            "no decode worker has the requested KV cache"
        );
        // Without the header the cold prompt is routed (and its pod now caches it)...
        let out = send(None);
        assert!(metadata_destination(&out[0]).starts_with("10.0.0."));
        // ...so the same prompt with the header is routed too.
        let out = send(Some("if-available"));
        assert!(metadata_destination(&out[0]).starts_with("10.0.0."));
    }

    #[test]
    fn bad_bodies_get_immediate_json_errors() {
        let fd = BodySendMode::FullDuplexStreamed;
        for (payload, status) in [
            (b"{nope".to_vec(), 400),
            (br#"{"prompt":"x"}"#.to_vec(), 400),
            (br#"{"model":"m"}"#.to_vec(), 400),
            (br#"{"model":"other","prompt":"x"}"#.to_vec(), 404),
        ] {
            let (d, _) = dispatcher();
            let mut s = ExtProcStream::new(d);
            s.handle_replies(req_headers(mode(fd, fd), &[("x-request-id", "abc")], None))
                .unwrap();
            let out = s.handle_replies(body(&payload, true, true)).unwrap();
            let i = immediate(&out[0]);
            assert_eq!(i.status.unwrap().code, status);
            let json: serde_json::Value = serde_json::from_slice(&i.body).unwrap();
            assert_eq!(json["error"]["code"], status);
            assert_eq!(
                set_header(i.headers.as_ref().unwrap(), "x-request-id").unwrap(),
                "abc"
            );
        }
    }

    #[test]
    fn oversized_body_is_refused_before_it_ends() {
        let (d, _) = dispatcher();
        let mut s = ExtProcStream::new(d);
        let fd = BodySendMode::FullDuplexStreamed;
        s.handle_replies(req_headers(mode(fd, fd), &[], None))
            .unwrap();
        assert!(
            s.handle_replies(body(&[b'x'; 150_000], false, true))
                .unwrap()
                .is_empty()
        );
        let out = s
            .handle_replies(body(&[b'x'; 150_000], false, true))
            .unwrap();
        assert_eq!(immediate(&out[0]).status.unwrap().code, 413);
    }

    fn subset(addrs: &[&str]) -> Metadata {
        let list = ListValue {
            values: addrs
                .iter()
                .map(|a| Value {
                    kind: Some(Kind::StringValue((*a).into())),
                })
                .collect(),
        };
        Metadata {
            filter_metadata: [(
                SUBSET_NAMESPACE.to_owned(),
                Struct {
                    fields: [(
                        SUBSET_KEY.to_owned(),
                        Value {
                            kind: Some(Kind::ListValue(list)),
                        },
                    )]
                    .into(),
                },
            )]
            .into(),
            ..Default::default()
        }
    }

    #[test]
    fn subset_hint_restricts_the_pick_and_an_empty_one_is_503() {
        let fd = BodySendMode::FullDuplexStreamed;
        let only = pods()[2].to_string();
        for _ in 0..10 {
            let (d, _) = dispatcher();
            let mut s = ExtProcStream::new(d);
            s.handle_replies(req_headers(mode(fd, fd), &[], Some(subset(&[&only]))))
                .unwrap();
            let out = s.handle_replies(body(&completion(10), true, true)).unwrap();
            assert_eq!(metadata_destination(&out[0]), only);
        }
        let (d, _) = dispatcher();
        let mut s = ExtProcStream::new(d);
        s.handle_replies(req_headers(mode(fd, fd), &[], Some(subset(&[]))))
            .unwrap();
        let out = s.handle_replies(body(&completion(10), true, true)).unwrap();
        assert_eq!(immediate(&out[0]).status.unwrap().code, 503);
    }

    #[test]
    fn a_stream_dropped_mid_request_releases_its_endpoint() {
        let (d, view) = dispatcher();
        let metrics = d.metrics().clone();
        let mut s = ExtProcStream::new(d);
        let fd = BodySendMode::FullDuplexStreamed;
        s.handle_replies(req_headers(mode(fd, fd), &[], None))
            .unwrap();
        let out = s.handle_replies(body(&completion(10), true, true)).unwrap();
        let addr: SocketAddr = metadata_destination(&out[0]).parse().unwrap();
        assert_eq!(view.slot(addr).unwrap().in_flight().requests, 1);
        drop(s);
        assert_eq!(view.slot(addr).unwrap().in_flight().requests, 0);
        let text = metrics.render(&view, Instant::now());
        assert!(text.contains("outcome=\"Cancelled\"} 1"), "{text}");
    }

    /// A request on `path` with `body`, through a stream whose policy lists `parsers`
    /// under `requestHandler.parsers`; returns the replies to the body.
    fn through_parsers(parsers: &[&str], path: &str, body_bytes: &[u8]) -> Vec<ProcessingResponse> {
        let (d, _) = dispatcher();
        let mut yaml = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nrequestHandler:\n  parsers:\n".to_owned();
        for p in parsers {
            yaml.push_str(&format!("  - pluginRef: {p}\n"));
        }
        let cfg = infermesh_scheduler::load_config(&yaml).unwrap();
        d.policy().store(Arc::new(Policy::new(&cfg).unwrap()));
        let mut s = ExtProcStream::new(d);
        let fd = BodySendMode::FullDuplexStreamed;
        let msg = ProcessingRequest {
            protocol_config: mode(fd, fd),
            request: Some(processing_request::Request::RequestHeaders(headers(
                &[
                    (":method", "POST"),
                    (":path", path),
                    ("x-request-id", "np-1"),
                ],
                false,
            ))),
            ..Default::default()
        };
        assert!(s.handle_replies(msg).unwrap().is_empty());
        s.handle_replies(body(body_bytes, true, true)).unwrap()
    }

    #[test]
    fn a_path_no_configured_parser_takes_is_refused_with_400_naming_it() {
        let out = through_parsers(&["openai-parser"], "/tokenize?x=1", b"{}");
        let i = immediate(&out[0]);
        assert_eq!(i.status.unwrap().code, 400);
        let msg: serde_json::Value = serde_json::from_slice(&i.body).unwrap();
        let msg = msg["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("/tokenize") && msg.contains("openai-parser"),
            "{msg}"
        );
        // An Anthropic body is refused too when only the openai parser is listed.
        let out = through_parsers(&["openai-parser"], "/v1/messages", &completion(5));
        assert_eq!(immediate(&out[0]).status.unwrap().code, 400);
        // The listed parser still serves its paths.
        let out = through_parsers(&["openai-parser"], "/v1/completions", &completion(5));
        assert!(
            pods()
                .iter()
                .any(|p| p.to_string() == metadata_destination(&out[0]))
        );
    }

    #[test]
    fn a_configured_passthrough_routes_unclaimed_paths_unread() {
        let out = through_parsers(
            &["openai-parser", "passthrough-parser"],
            "/tokenize",
            b"\x00 not json",
        );
        let dest = metadata_destination(&out[0]);
        assert!(pods().iter().any(|p| p.to_string() == dest), "{dest}");
        // Listed before the fallback, the anthropic parser still reads its path.
        let out = through_parsers(
            &["anthropic-parser", "passthrough-parser"],
            "/v1/messages",
            br#"{"model":"m","messages":[]}"#,
        );
        let i = immediate(&out[0]);
        assert_eq!(i.status.unwrap().code, 400, "the anthropic parser read it");
    }

    /// The scores under `envoy.lb` → `x-gateway-destination-endpoint-scores`, when present.
    fn metadata_scores(r: &ProcessingResponse) -> Option<Vec<(String, f64)>> {
        let lb = &r.dynamic_metadata.as_ref().unwrap().fields[LB_NAMESPACE];
        let Some(Kind::StructValue(s)) = &lb.kind else {
            panic!("envoy.lb is not a struct")
        };
        let Some(Kind::StructValue(scores)) = &s.fields.get(SCORES_KEY)?.kind else {
            panic!("the scores are not a struct")
        };
        let mut out: Vec<(String, f64)> = scores
            .fields
            .iter()
            .map(|(k, v)| match v.kind {
                Some(Kind::NumberValue(n)) => (k.clone(), n),
                ref other => panic!("score of {k} is not a number: {other:?}"),
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Some(out)
    }

    #[test]
    fn endpoint_scores_go_in_the_lb_metadata_only_when_asked() {
        let fd = BodySendMode::FullDuplexStreamed;
        let (d, view) = dispatcher();
        // One busy pod: the queue scorer tells it apart.
        view.slots[2].record_scrape(Metrics {
            waiting_queue: 10,
            ..Metrics::idle(Instant::now())
        });
        let mut s = ExtProcStream::new(d.clone());
        s.handle_replies(req_headers(mode(fd, fd), &[], None))
            .unwrap();
        let out = s.handle_replies(body(&completion(10), true, true)).unwrap();
        assert_eq!(
            metadata_scores(&out[0]),
            None,
            "off by default, as in llm-d"
        );

        let mut cfg = d.config();
        cfg.emit_endpoint_scores = true;
        let d = Dispatcher::new(
            d.pool().clone(),
            d.policy().clone(),
            d.metrics().clone(),
            cfg,
        );
        let mut s = ExtProcStream::new(d);
        s.handle_replies(req_headers(mode(fd, fd), &[], None))
            .unwrap();
        let out = s.handle_replies(body(&completion(10), true, true)).unwrap();
        let scores = metadata_scores(&out[0]).expect("scores emitted");
        let mut want: Vec<String> = pods().iter().map(ToString::to_string).collect();
        want.sort();
        assert_eq!(
            scores.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
            want
        );
        // Default profile: queue 2 + kv-cache 2 (idle pods at 0 usage) + prefix 3 × 0.
        let of = |a: SocketAddr| scores.iter().find(|(k, _)| *k == a.to_string()).unwrap().1;
        assert_eq!(of(pods()[0]), 4.0);
        assert_eq!(of(pods()[2]), 2.0);
        let dest: SocketAddr = metadata_destination(&out[0]).parse().unwrap();
        assert_eq!(of(dest), 4.0, "the pick has the top score");
        // Buffered mode carries them in the body reply's metadata the same way.
        let b = BodySendMode::Buffered;
        let mut s = ExtProcStream::new(s.dispatcher.clone());
        s.handle_replies(req_headers(mode(b, b), &[], None))
            .unwrap();
        let out = s.handle_replies(body(&completion(10), true, true)).unwrap();
        assert_eq!(metadata_scores(&out[0]).map(|v| v.len()), Some(3));
    }

    /// A stream under a policy with GIE's two conformance plugins configured.
    fn conformance_stream() -> (ExtProcStream, Dispatcher) {
        let (d, _) = dispatcher();
        let cfg = infermesh_scheduler::load_config(
            "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n\
             - type: header-based-testing-filter\n- type: queue-scorer\n\
             - type: destination-endpoint-served-verifier\n",
        )
        .unwrap();
        d.policy().store(Arc::new(Policy::new(&cfg).unwrap()));
        (ExtProcStream::new(d.clone()), d)
    }

    fn served_metadata(value: Option<&str>) -> Metadata {
        let fields = value
            .map(|v| {
                (
                    SERVED_KEY.to_owned(),
                    Value {
                        kind: Some(Kind::StringValue(v.into())),
                    },
                )
            })
            .into_iter()
            .collect();
        Metadata {
            filter_metadata: [(LB_NAMESPACE.to_owned(), Struct { fields })].into(),
            ..Default::default()
        }
    }

    fn response_header(out: &[ProcessingResponse], key: &str) -> Option<String> {
        let Some(processing_response::Response::ResponseHeaders(h)) = &out[0].response else {
            panic!("response headers reply expected")
        };
        set_header(h.response.as_ref()?.header_mutation.as_ref()?, key)
    }

    #[test]
    fn the_conformance_selection_header_steers_and_the_served_endpoint_is_echoed() {
        let fd = BodySendMode::FullDuplexStreamed;
        for target in [pods()[1], pods()[2]] {
            for _ in 0..5 {
                let (mut s, _) = conformance_stream();
                let ip = target.ip().to_string();
                s.handle_replies(req_headers(
                    mode(fd, fd),
                    &[(TEST_ENDPOINT_SELECTION_HEADER, ip.as_str())],
                    None,
                ))
                .unwrap();
                let out = s.handle_replies(body(&completion(10), true, true)).unwrap();
                assert_eq!(metadata_destination(&out[0]), target.to_string());
                // The gateway reports where it sent the request; the client gets it back.
                let served = format!("{target}");
                let out = s
                    .handle_replies(ProcessingRequest {
                        metadata_context: Some(served_metadata(Some(&served))),
                        request: Some(processing_request::Request::ResponseHeaders(headers(
                            &[(":status", "200")],
                            false,
                        ))),
                        ..Default::default()
                    })
                    .unwrap();
                assert_eq!(
                    response_header(&out, CONFORMANCE_SERVED_HEADER),
                    Some(served)
                );
            }
        }
        // An address no endpoint has leaves no candidate: 503, as llm-d's filter does.
        let (mut s, _) = conformance_stream();
        s.handle_replies(req_headers(
            mode(fd, fd),
            &[(TEST_ENDPOINT_SELECTION_HEADER, "256.256.256.256")],
            None,
        ))
        .unwrap();
        let out = s.handle_replies(body(&completion(10), true, true)).unwrap();
        assert_eq!(immediate(&out[0]).status.unwrap().code, 503);
        // Missing metadata is reported as llm-d's verifier words it.
        for (md, want) in [
            (None, "fail: missing envoy lb metadata"),
            (
                Some(served_metadata(None)),
                "fail: missing destination endpoint served metadata",
            ),
        ] {
            let (mut s, _) = conformance_stream();
            let one = pods()[0].to_string();
            s.handle_replies(req_headers(
                mode(fd, fd),
                &[(TEST_ENDPOINT_SELECTION_HEADER, one.as_str())],
                None,
            ))
            .unwrap();
            s.handle_replies(body(&completion(10), true, true)).unwrap();
            let out = s
                .handle_replies(ProcessingRequest {
                    metadata_context: md,
                    request: Some(processing_request::Request::ResponseHeaders(headers(
                        &[(":status", "200")],
                        false,
                    ))),
                    ..Default::default()
                })
                .unwrap();
            assert_eq!(
                response_header(&out, CONFORMANCE_SERVED_HEADER).as_deref(),
                Some(want)
            );
        }
        // Without the verifier nothing is added.
        let (d, _) = dispatcher();
        let mut s = ExtProcStream::new(d);
        s.handle_replies(req_headers(mode(fd, fd), &[], None))
            .unwrap();
        s.handle_replies(body(&completion(10), true, true)).unwrap();
        let out = s
            .handle_replies(ProcessingRequest {
                metadata_context: Some(served_metadata(Some("10.0.0.1:8000"))),
                request: Some(processing_request::Request::ResponseHeaders(headers(
                    &[(":status", "200")],
                    false,
                ))),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(response_header(&out, CONFORMANCE_SERVED_HEADER), None);
    }

    #[test]
    fn bodyless_request_goes_to_any_ready_endpoint() {
        let (d, _) = dispatcher();
        let mut s = ExtProcStream::new(d);
        let msg = ProcessingRequest {
            request: Some(processing_request::Request::RequestHeaders(headers(
                &[(":method", "GET"), (":path", "/v1/models")],
                true,
            ))),
            ..Default::default()
        };
        let out = s.handle_replies(msg).unwrap();
        let dest = metadata_destination(&out[0]);
        assert!(pods().iter().any(|p| p.to_string() == dest));
    }
}
