//! The protobuf edge of the ext_proc stream, both ways: each `ProcessingRequest` becomes an
//! [`Inbound`] message in the machine's own terms (headers as text, the gateway's subset
//! hint, the served endpoint, the response status), or an [`InvalidMessage`] naming what is
//! wrong with it; each [`Reply`] of the machine becomes a `ProcessingResponse`. The state
//! machine never reads or writes protobuf.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use infermesh_proto::envoy::config::core::v3::{
    HeaderValue, HeaderValueOption, Metadata, header_value_option::HeaderAppendAction,
};
use infermesh_proto::envoy::extensions::filters::http::ext_proc::v3::processing_mode::BodySendMode;
use infermesh_proto::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, HttpBody,
    HttpHeaders, ImmediateResponse, ProcessingRequest, ProcessingResponse, StreamedBodyResponse,
    TrailersResponse, body_mutation, processing_request, processing_response,
};
use infermesh_proto::envoy::r#type::v3::HttpStatus;
use infermesh_proto::google::protobuf::{Struct, Value, value::Kind};

use super::message::{
    BodyChunk, BodyMode, Inbound, Message, Modes, Reply, RequestHead, ResponseHead, ServedMetadata,
    Step,
};
use crate::request::DESTINATION_HEADER;

/// Filter-metadata namespace of the destination (and served-endpoint) keys.
pub const LB_NAMESPACE: &str = "envoy.lb";
/// Key in `envoy.lb` of the per-endpoint scores (`--emit-endpoint-scores`).
pub const SCORES_KEY: &str = "x-gateway-destination-endpoint-scores";
/// Filter-metadata namespace of the gateway's subset hint.
pub const SUBSET_NAMESPACE: &str = "envoy.lb.subset_hint";
/// Key of the subset hint list.
pub const SUBSET_KEY: &str = "x-gateway-destination-endpoint-subset";
/// Key of the endpoint that actually served the request.
pub const SERVED_KEY: &str = "x-gateway-destination-endpoint-served";
/// A `ProcessingRequest` the machine cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidMessage {
    /// No request oneof set.
    #[error("ProcessingRequest without a request")]
    Empty,
    /// `protocol_config` names a body mode this Envoy API does not define.
    #[error("protocol_config.{field} = {value} is not a body send mode")]
    BodyMode {
        /// `request_body_mode` or `response_body_mode`.
        field: &'static str,
        /// The value sent.
        value: i32,
    },
    /// The response headers carry a `:status` that is not an HTTP status code.
    #[error("response :status {0:?} is not an HTTP status code")]
    Status(String),
}

impl TryFrom<ProcessingRequest> for Inbound {
    type Error = InvalidMessage;

    fn try_from(msg: ProcessingRequest) -> Result<Inbound, InvalidMessage> {
        let modes = match &msg.protocol_config {
            Some(pc) => Some(Modes {
                request: body_mode("request_body_mode", pc.request_body_mode)?,
                response: body_mode("response_body_mode", pc.response_body_mode)?,
            }),
            None => None,
        };
        let mut metadata = msg.metadata_context;
        use processing_request::Request;
        let message = match msg.request.ok_or(InvalidMessage::Empty)? {
            Request::RequestHeaders(h) => {
                Message::RequestHeaders(request_head(h, metadata.as_ref()))
            }
            Request::RequestBody(b) => Message::RequestBody(chunk(b)),
            Request::RequestTrailers(_) => Message::RequestTrailers,
            Request::ResponseHeaders(h) => {
                Message::ResponseHeaders(response_head(h, metadata.as_mut())?)
            }
            Request::ResponseBody(b) => Message::ResponseBody(chunk(b)),
            Request::ResponseTrailers(_) => Message::ResponseTrailers,
        };
        Ok(Inbound { modes, message })
    }
}

fn body_mode(field: &'static str, value: i32) -> Result<BodyMode, InvalidMessage> {
    let mode =
        BodySendMode::try_from(value).map_err(|_| InvalidMessage::BodyMode { field, value })?;
    Ok(match mode {
        BodySendMode::None => BodyMode::None,
        BodySendMode::Streamed => BodyMode::Streamed,
        BodySendMode::Buffered => BodyMode::Buffered,
        BodySendMode::BufferedPartial => BodyMode::BufferedPartial,
        BodySendMode::FullDuplexStreamed => BodyMode::FullDuplexStreamed,
        BodySendMode::Grpc => BodyMode::Grpc,
    })
}

fn chunk(b: HttpBody) -> BodyChunk {
    BodyChunk {
        body: b.body,
        end_of_stream: b.end_of_stream,
    }
}

fn pairs(h: &HttpHeaders) -> impl Iterator<Item = (&str, String)> {
    h.headers
        .iter()
        .flat_map(|m| m.headers.iter())
        .map(|hv| (hv.key.as_str(), header_text(hv)))
}

fn request_head(h: HttpHeaders, metadata: Option<&Metadata>) -> RequestHead {
    let headers: Vec<(String, String)> = pairs(&h).map(|(k, v)| (k.to_owned(), v)).collect();
    let path = headers
        .iter()
        .find(|(k, _)| k == ":path")
        .map_or_else(|| "/".to_owned(), |(_, v)| v.clone());
    RequestHead {
        headers,
        path,
        subset: metadata.and_then(subset_hint),
        end_of_stream: h.end_of_stream,
    }
}

fn response_head(
    h: HttpHeaders,
    metadata: Option<&mut Metadata>,
) -> Result<ResponseHead, InvalidMessage> {
    let mut status = 0;
    let mut content_type = None;
    for (k, v) in pairs(&h) {
        match k {
            ":status" => status = v.parse().map_err(|_| InvalidMessage::Status(v.clone()))?,
            "content-type" => content_type = Some(v),
            _ => {}
        }
    }
    let served_metadata = metadata.map_or(ServedMetadata::NoLbMetadata, served_metadata);
    let served = match &served_metadata {
        ServedMetadata::Value(s) => s.split(',').next().and_then(|a| a.trim().parse().ok()),
        _ => None,
    };
    Ok(ResponseHead {
        status,
        content_type,
        served,
        served_metadata,
        end_of_stream: h.end_of_stream,
    })
}

fn header_text(hv: &HeaderValue) -> String {
    if hv.raw_value.is_empty() {
        hv.value.clone()
    } else {
        String::from_utf8_lossy(&hv.raw_value).into_owned()
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

/// The served endpoint, moved out of the message (no copy on the response path).
fn served_metadata(md: &mut Metadata) -> ServedMetadata {
    let Some(ns) = md.filter_metadata.get_mut(LB_NAMESPACE) else {
        return ServedMetadata::NoLbMetadata;
    };
    match ns.fields.get_mut(SERVED_KEY).and_then(|v| v.kind.as_mut()) {
        Some(Kind::StringValue(s)) => ServedMetadata::Value(std::mem::take(s)),
        _ => ServedMetadata::NoServedKey,
    }
}

impl From<Reply> for ProcessingResponse {
    fn from(r: Reply) -> ProcessingResponse {
        use processing_response::Response as R;
        match r {
            Reply::Continue(step) => response(match step {
                Step::RequestHeaders => R::RequestHeaders(HeadersResponse::default()),
                Step::RequestBody => R::RequestBody(BodyResponse::default()),
                Step::RequestTrailers => R::RequestTrailers(TrailersResponse::default()),
                Step::ResponseHeaders => R::ResponseHeaders(HeadersResponse::default()),
                Step::ResponseBody => R::ResponseBody(BodyResponse::default()),
                Step::ResponseTrailers => R::ResponseTrailers(TrailersResponse::default()),
            }),
            Reply::Route {
                step,
                set,
                remove,
                destination,
                scores,
                body,
            } => {
                let common = CommonResponse {
                    header_mutation: Some(mutation(set, remove)),
                    clear_route_cache: true,
                    body_mutation: body.map(|b| BodyMutation {
                        mutation: Some(body_mutation::Mutation::Body(b)),
                    }),
                    ..Default::default()
                };
                let reply = match step {
                    Step::RequestBody => R::RequestBody(BodyResponse {
                        response: Some(common),
                    }),
                    _ => R::RequestHeaders(HeadersResponse {
                        response: Some(common),
                    }),
                };
                ProcessingResponse {
                    dynamic_metadata: Some(destination_metadata(destination, scores)),
                    ..response(reply)
                }
            }
            Reply::Mutate { set, remove } => {
                let changed = !set.is_empty() || !remove.is_empty();
                response(R::ResponseHeaders(HeadersResponse {
                    response: changed.then(|| CommonResponse {
                        header_mutation: Some(mutation(set, remove)),
                        ..Default::default()
                    }),
                }))
            }
            Reply::Chunk {
                request,
                body,
                end_of_stream,
            } => {
                let b = BodyResponse {
                    response: Some(CommonResponse {
                        body_mutation: Some(BodyMutation {
                            mutation: Some(body_mutation::Mutation::StreamedResponse(
                                StreamedBodyResponse {
                                    body,
                                    end_of_stream,
                                    ..Default::default()
                                },
                            )),
                        }),
                        ..Default::default()
                    }),
                };
                response(if request {
                    R::RequestBody(b)
                } else {
                    R::ResponseBody(b)
                })
            }
            Reply::Immediate {
                status,
                headers,
                body,
                details,
            } => response(R::ImmediateResponse(ImmediateResponse {
                status: Some(HttpStatus {
                    code: i32::from(status),
                }),
                headers: Some(mutation(headers, Vec::new())),
                body,
                grpc_status: None,
                details,
            })),
        }
    }
}

fn response(r: processing_response::Response) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(r),
        ..Default::default()
    }
}

fn mutation(set: Vec<(String, String)>, remove: Vec<String>) -> HeaderMutation {
    HeaderMutation {
        set_headers: set
            .into_iter()
            .map(|(key, v)| HeaderValueOption {
                header: Some(HeaderValue {
                    key,
                    value: String::new(),
                    raw_value: v.into_bytes(),
                }),
                append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                ..Default::default()
            })
            .collect(),
        remove_headers: remove,
    }
}

/// `envoy.lb` → `x-gateway-destination-endpoint: value`, as dynamic metadata, and, when
/// there are scores, `x-gateway-destination-endpoint-scores: {"ip:port": score, …}` (a
/// struct of numbers, as llm-d writes it).
fn destination_metadata(value: String, scores: Vec<(SocketAddr, f64)>) -> Struct {
    let mut inner = Struct {
        fields: [(
            DESTINATION_HEADER.to_owned(),
            Value {
                kind: Some(Kind::StringValue(value)),
            },
        )]
        .into(),
    };
    if !scores.is_empty() {
        let by_endpoint = Struct {
            fields: scores
                .into_iter()
                .map(|(addr, score)| {
                    let v = Value {
                        kind: Some(Kind::NumberValue(score)),
                    };
                    (addr.to_string(), v)
                })
                .collect(),
        };
        inner.fields.insert(
            SCORES_KEY.to_owned(),
            Value {
                kind: Some(Kind::StructValue(by_endpoint)),
            },
        );
    }
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

#[cfg(test)]
pub(super) mod tests {
    use infermesh_proto::envoy::config::core::v3::HeaderMap;
    use infermesh_proto::envoy::service::ext_proc::v3::ProtocolConfiguration;

    use super::*;

    /// Headers as Envoy sends them (raw values), for this module's and the stream's tests.
    pub(crate) fn headers(pairs: &[(&str, &str)], end_of_stream: bool) -> HttpHeaders {
        HttpHeaders {
            headers: Some(HeaderMap {
                headers: pairs
                    .iter()
                    .map(|(k, v)| HeaderValue {
                        key: (*k).into(),
                        value: String::new(),
                        raw_value: v.as_bytes().to_vec(),
                    })
                    .collect(),
            }),
            end_of_stream,
            ..Default::default()
        }
    }

    #[test]
    fn malformed_messages_are_named() {
        let empty = ProcessingRequest::default();
        assert_eq!(Inbound::try_from(empty), Err(InvalidMessage::Empty));
        let bad_mode = ProcessingRequest {
            protocol_config: Some(ProtocolConfiguration {
                request_body_mode: 42,
                ..Default::default()
            }),
            request: Some(processing_request::Request::RequestTrailers(
                Default::default(),
            )),
            ..Default::default()
        };
        assert_eq!(
            Inbound::try_from(bad_mode),
            Err(InvalidMessage::BodyMode {
                field: "request_body_mode",
                value: 42
            })
        );
        let bad_status = ProcessingRequest {
            request: Some(processing_request::Request::ResponseHeaders(headers(
                &[(":status", "2xx")],
                true,
            ))),
            ..Default::default()
        };
        let e = Inbound::try_from(bad_status).unwrap_err();
        assert_eq!(
            e.to_string(),
            "response :status \"2xx\" is not an HTTP status code"
        );
    }

    #[test]
    fn request_headers_become_text_pairs_and_a_path() {
        let msg = ProcessingRequest {
            request: Some(processing_request::Request::RequestHeaders(headers(
                &[(":path", "/v1/chat/completions"), ("x-request-id", "r1")],
                false,
            ))),
            ..Default::default()
        };
        let Inbound { modes, message } = Inbound::try_from(msg).unwrap();
        assert_eq!(modes, None);
        let Message::RequestHeaders(h) = message else {
            panic!("{message:?}");
        };
        assert_eq!(h.path, "/v1/chat/completions");
        assert_eq!(h.headers[1], ("x-request-id".to_owned(), "r1".to_owned()));
        assert_eq!(h.subset, None);
    }
}
