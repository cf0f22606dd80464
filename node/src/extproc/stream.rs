//! One ext_proc stream as a state machine, free of IO: feed each `ProcessingRequest` to
//! [`ExtProcStream::handle`] and send back the `ProcessingResponse`s it returns, in order.
//! It speaks the Gateway API Inference Extension EPP contract (reference §4).

use std::collections::BTreeSet;
use std::net::SocketAddr;

use infermesh_proto::envoy::config::core::v3::{
    HeaderValue, HeaderValueOption, header_value_option::HeaderAppendAction,
};
use infermesh_proto::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use infermesh_proto::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, HttpBody,
    HttpHeaders, ImmediateResponse, ProcessingRequest, ProcessingResponse, StreamedBodyResponse,
    TrailersResponse, body_mutation, processing_request, processing_response,
};
use infermesh_proto::envoy::r#type::v3::HttpStatus;
use infermesh_proto::google::protobuf::{Struct, Value, value::Kind};
use infermesh_scheduler::ApiKind;

use crate::dispatch::{DESTINATION_HEADER, Dispatcher, Rejection, RequestMeta, Ticket};
use crate::metrics::Outcome;
use crate::usage::UsageScanner;

/// Filter-metadata namespace of the destination (and served-endpoint) keys.
pub const LB_NAMESPACE: &str = "envoy.lb";
/// Filter-metadata namespace of the gateway's subset hint.
pub const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
/// Key of the subset hint list.
pub const SUBSET_KEY: &str = "x-gateway-destination-endpoint-subset";
/// Key of the endpoint that actually served the request.
pub const SERVED_KEY: &str = "x-gateway-destination-endpoint-served";
/// GIE's chunk size for body replies in full-duplex mode.
pub const BODY_CHUNK: usize = 62_000;

/// A protocol violation by the peer; the stream is ended with this gRPC status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProtocolError(pub &'static str);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitHeaders,
    Buffering,
    Responding,
    Done,
}

/// The state of one ext_proc stream (one HTTP request through Envoy).
#[derive(Debug)]
pub struct ExtProcStream {
    dispatcher: Dispatcher,
    request_mode: BodySendMode,
    response_mode: BodySendMode,
    phase: Phase,
    kind: ApiKind,
    meta: RequestMeta,
    body: Vec<u8>,
    ticket: Option<Ticket>,
    response_status: u16,
    served: Option<SocketAddr>,
    usage: Option<UsageScanner>,
}

impl ExtProcStream {
    /// A new stream; body modes come from the first message's `protocol_config` and
    /// default to FULL_DUPLEX_STREAMED (the only mode GIE supports).
    pub fn new(dispatcher: Dispatcher) -> ExtProcStream {
        ExtProcStream {
            dispatcher,
            request_mode: BodySendMode::FullDuplexStreamed,
            response_mode: BodySendMode::FullDuplexStreamed,
            phase: Phase::AwaitHeaders,
            kind: ApiKind::Completions,
            meta: RequestMeta::default(),
            body: Vec::new(),
            ticket: None,
            response_status: 0,
            served: None,
            usage: None,
        }
    }

    /// The request id (after the request headers arrived).
    pub fn request_id(&self) -> &str {
        &self.meta.request_id
    }

    /// Handles one message from Envoy and returns the replies to send, in order.
    pub fn handle(
        &mut self,
        msg: ProcessingRequest,
    ) -> Result<Vec<ProcessingResponse>, ProtocolError> {
        if let Some(pc) = &msg.protocol_config {
            self.request_mode =
                BodySendMode::try_from(pc.request_body_mode).unwrap_or(BodySendMode::None);
            self.response_mode =
                BodySendMode::try_from(pc.response_body_mode).unwrap_or(BodySendMode::None);
        }
        let metadata = msg.metadata_context.as_ref();
        use processing_request::Request;
        match msg.request {
            Some(Request::RequestHeaders(h)) => self.on_request_headers(h, metadata),
            Some(Request::RequestBody(b)) => Ok(self.on_request_body(b)),
            Some(Request::RequestTrailers(_)) => Ok(self.on_request_trailers()),
            Some(Request::ResponseHeaders(h)) => Ok(self.on_response_headers(h, metadata)),
            Some(Request::ResponseBody(b)) => Ok(self.on_response_body(b)),
            Some(Request::ResponseTrailers(_)) => {
                self.finish();
                Ok(vec![response(
                    processing_response::Response::ResponseTrailers(TrailersResponse::default()),
                )])
            }
            None => Err(ProtocolError("ProcessingRequest without a request")),
        }
    }

    fn on_request_headers(
        &mut self,
        h: HttpHeaders,
        metadata: Option<&infermesh_proto::envoy::config::core::v3::Metadata>,
    ) -> Result<Vec<ProcessingResponse>, ProtocolError> {
        if self.phase != Phase::AwaitHeaders {
            return Err(ProtocolError("request headers received twice"));
        }
        let headers: Vec<(String, String)> = h
            .headers
            .iter()
            .flat_map(|m| m.headers.iter())
            .map(|hv| (hv.key.clone(), header_text(hv)))
            .collect();
        let path = headers
            .iter()
            .find(|(k, _)| k == ":path")
            .map(|(_, v)| v.as_str())
            .unwrap_or("/");
        self.kind = ApiKind::from_path(path);
        self.meta =
            RequestMeta::from_headers(headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        self.meta.subset = metadata.and_then(subset_hint);
        let span = tracing::debug_span!("ext_proc", request_id = %self.meta.request_id);
        let _g = span.enter();
        if h.end_of_stream || self.request_mode == BodySendMode::None {
            // Nothing to schedule by (e.g. GET /v1/models): any ready endpoint will do.
            self.phase = Phase::Responding;
            return Ok(vec![match self.dispatcher.pick_any(&self.meta) {
                Ok(addr) => {
                    let value = addr.to_string();
                    ProcessingResponse {
                        dynamic_metadata: Some(destination_metadata(&value)),
                        ..response(processing_response::Response::RequestHeaders(
                            HeadersResponse {
                                response: Some(CommonResponse {
                                    header_mutation: Some(set_headers([(
                                        DESTINATION_HEADER,
                                        value.as_str(),
                                    )])),
                                    clear_route_cache: true,
                                    ..Default::default()
                                }),
                            },
                        ))
                    }
                }
                Err(r) => self.immediate(&r),
            }]);
        }
        self.phase = Phase::Buffering;
        match self.request_mode {
            // Envoy waits for this reply before it sends the body.
            BodySendMode::Buffered | BodySendMode::BufferedPartial | BodySendMode::Streamed => {
                Ok(vec![response(
                    processing_response::Response::RequestHeaders(HeadersResponse::default()),
                )])
            }
            _ => Ok(Vec::new()),
        }
    }

    fn on_request_body(&mut self, b: HttpBody) -> Vec<ProcessingResponse> {
        if self.phase != Phase::Buffering {
            return Vec::new();
        }
        let limit = self.dispatcher.config().max_body_bytes;
        if self.body.len() + b.body.len() > limit {
            let r = Rejection::too_large(limit);
            self.dispatcher.count_rejection(&self.meta, &r);
            self.phase = Phase::Done;
            return vec![self.immediate(&r)];
        }
        self.body.extend_from_slice(&b.body);
        if !b.end_of_stream {
            return match self.request_mode {
                BodySendMode::Streamed => vec![body_continue(true)],
                _ => Vec::new(),
            };
        }
        self.schedule(true)
    }

    fn on_request_trailers(&mut self) -> Vec<ProcessingResponse> {
        let mut out = if self.phase == Phase::Buffering {
            self.schedule(false)
        } else {
            Vec::new()
        };
        if self.phase != Phase::Done {
            out.push(response(processing_response::Response::RequestTrailers(
                TrailersResponse::default(),
            )));
        }
        out
    }

    /// The body is complete: schedule and reply with the destination and the body.
    fn schedule(&mut self, body_ends_stream: bool) -> Vec<ProcessingResponse> {
        let span = tracing::debug_span!("ext_proc", request_id = %self.meta.request_id);
        let _g = span.enter();
        let body = std::mem::take(&mut self.body);
        let ticket = match self
            .dispatcher
            .dispatch(self.kind, &body, self.meta.clone(), &[])
        {
            Ok(t) => t,
            Err(r) => {
                self.phase = Phase::Done;
                return vec![self.immediate(&r)];
            }
        };
        let content_length = body.len().to_string();
        let mut set: Vec<(&str, &str)> = vec![
            (DESTINATION_HEADER, ticket.header_value()),
            ("content-length", &content_length),
        ];
        for (k, v) in ticket.extra_headers() {
            set.push((k, v));
        }
        let common = CommonResponse {
            header_mutation: Some(set_headers(set)),
            clear_route_cache: true,
            ..Default::default()
        };
        let metadata = Some(destination_metadata(ticket.header_value()));
        let out = match self.request_mode {
            BodySendMode::FullDuplexStreamed => {
                let mut out = vec![ProcessingResponse {
                    dynamic_metadata: metadata,
                    ..response(processing_response::Response::RequestHeaders(
                        HeadersResponse {
                            response: Some(common),
                        },
                    ))
                }];
                out.extend(streamed_chunks(&body, body_ends_stream, true));
                out
            }
            _ => vec![ProcessingResponse {
                dynamic_metadata: metadata,
                ..response(processing_response::Response::RequestBody(BodyResponse {
                    response: Some(common),
                }))
            }],
        };
        self.ticket = Some(ticket);
        self.phase = Phase::Responding;
        out
    }

    fn on_response_headers(
        &mut self,
        h: HttpHeaders,
        metadata: Option<&infermesh_proto::envoy::config::core::v3::Metadata>,
    ) -> Vec<ProcessingResponse> {
        let mut content_type = None;
        for hv in h.headers.iter().flat_map(|m| m.headers.iter()) {
            match hv.key.as_str() {
                ":status" => self.response_status = header_text(hv).parse().unwrap_or(0),
                "content-type" => content_type = Some(header_text(hv)),
                _ => {}
            }
        }
        self.served = metadata.and_then(served_endpoint);
        self.usage = Some(UsageScanner::new(content_type.as_deref()));
        let out = vec![response(processing_response::Response::ResponseHeaders(
            HeadersResponse::default(),
        ))];
        if h.end_of_stream {
            self.finish();
        }
        out
    }

    fn on_response_body(&mut self, b: HttpBody) -> Vec<ProcessingResponse> {
        if let Some(u) = &mut self.usage {
            u.feed(&b.body);
        }
        let end = b.end_of_stream;
        let out = match self.response_mode {
            BodySendMode::FullDuplexStreamed => streamed_chunks(&b.body, end, false),
            _ => vec![body_continue(false)],
        };
        if end {
            self.finish();
        }
        out
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
        let usage = self.usage.take().and_then(UsageScanner::finish);
        ticket.finish(self.served, outcome, usage);
        self.phase = Phase::Done;
    }

    fn immediate(&self, r: &Rejection) -> ProcessingResponse {
        response(processing_response::Response::ImmediateResponse(
            ImmediateResponse {
                status: Some(HttpStatus {
                    code: i32::from(r.status),
                }),
                headers: Some(set_headers([
                    ("content-type", "application/json"),
                    ("x-request-id", self.meta.request_id.as_str()),
                ])),
                body: r.json_body(),
                grpc_status: None,
                details: r.message.clone(),
            },
        ))
    }
}

fn response(r: processing_response::Response) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(r),
        ..Default::default()
    }
}

fn body_continue(request: bool) -> ProcessingResponse {
    let b = BodyResponse::default();
    response(if request {
        processing_response::Response::RequestBody(b)
    } else {
        processing_response::Response::ResponseBody(b)
    })
}

/// Body replies carrying `body` as `streamed_response` chunks of at most [`BODY_CHUNK`].
fn streamed_chunks(body: &[u8], end_of_stream: bool, request: bool) -> Vec<ProcessingResponse> {
    let chunks: Vec<&[u8]> = if body.is_empty() {
        vec![&[][..]]
    } else {
        body.chunks(BODY_CHUNK).collect()
    };
    let n = chunks.len();
    chunks
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let b = BodyResponse {
                response: Some(CommonResponse {
                    body_mutation: Some(BodyMutation {
                        mutation: Some(body_mutation::Mutation::StreamedResponse(
                            StreamedBodyResponse {
                                body: c.to_vec(),
                                end_of_stream: end_of_stream && i + 1 == n,
                                ..Default::default()
                            },
                        )),
                    }),
                    ..Default::default()
                }),
            };
            response(if request {
                processing_response::Response::RequestBody(b)
            } else {
                processing_response::Response::ResponseBody(b)
            })
        })
        .collect()
}

fn set_headers<'a>(headers: impl IntoIterator<Item = (&'a str, &'a str)>) -> HeaderMutation {
    HeaderMutation {
        set_headers: headers
            .into_iter()
            .map(|(k, v)| HeaderValueOption {
                header: Some(HeaderValue {
                    key: k.to_owned(),
                    value: String::new(),
                    raw_value: v.as_bytes().to_vec(),
                }),
                append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                ..Default::default()
            })
            .collect(),
        remove_headers: Vec::new(),
    }
}

fn header_text(hv: &HeaderValue) -> String {
    if hv.raw_value.is_empty() {
        hv.value.clone()
    } else {
        String::from_utf8_lossy(&hv.raw_value).into_owned()
    }
}

/// `envoy.lb` → `x-gateway-destination-endpoint: value`, as dynamic metadata.
fn destination_metadata(value: &str) -> Struct {
    let inner = Struct {
        fields: [(
            DESTINATION_HEADER.to_owned(),
            Value {
                kind: Some(Kind::StringValue(value.to_owned())),
            },
        )]
        .into(),
    };
    Struct {
        fields: [(
            LB_NAMESPACE.to_owned(),
            Value {
                kind: Some(Kind::StructValue(inner)),
            },
        )]
        .into(),
    }
}

/// The gateway's subset hint: `Some(empty)` when present but empty or unreadable.
fn subset_hint(
    md: &infermesh_proto::envoy::config::core::v3::Metadata,
) -> Option<BTreeSet<SocketAddr>> {
    let ns = md.filter_metadata.get(SUBSET_NAMESPACE)?;
    let value = ns.fields.get(SUBSET_KEY)?;
    let mut set = BTreeSet::new();
    let mut add = |s: &str| {
        for part in s.split(',') {
            match part.trim().parse::<SocketAddr>() {
                Ok(a) => {
                    set.insert(a);
                }
                Err(_) => tracing::warn!(value = part, "ignoring an unparsable subset hint entry"),
            }
        }
    };
    match &value.kind {
        Some(Kind::ListValue(l)) => {
            for v in &l.values {
                if let Some(Kind::StringValue(s)) = &v.kind {
                    add(s);
                }
            }
        }
        Some(Kind::StringValue(s)) => add(s),
        _ => {}
    }
    Some(set)
}

fn served_endpoint(md: &infermesh_proto::envoy::config::core::v3::Metadata) -> Option<SocketAddr> {
    let ns = md.filter_metadata.get(LB_NAMESPACE)?;
    match &ns.fields.get(SERVED_KEY)?.kind {
        Some(Kind::StringValue(s)) => s.split(',').next()?.trim().parse().ok(),
        _ => None,
    }
}
