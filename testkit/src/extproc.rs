//! The cheapest processor that still speaks the full-duplex EPP exchange: it answers the
//! messages infermesh answers, at the same points (request headers at once when there is
//! no body, else request headers and body together once the body ends; response headers;
//! response body echoed; trailers), but picks pods round-robin and parses nothing. Tests
//! use it as a stand-in picker; `bench/dataplane` as the protocol's cost baseline.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures::{Stream, StreamExt};
use infermesh_proto::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use infermesh_proto::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use infermesh_proto::envoy::service::ext_proc::v3::{
    BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HeadersResponse, ProcessingRequest,
    ProcessingResponse, StreamedBodyResponse, TrailersResponse, body_mutation,
    processing_request::Request as In, processing_response::Response as Out,
};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status, Streaming};

/// The header that carries the picked endpoint (the EPP contract).
const DESTINATION: &str = "x-gateway-destination-endpoint";
/// The gRPC metadata key naming the InferencePool a stream serves.
const POOL_METADATA: &str = "x-infermesh-pool";

/// A minimal full-duplex ext_proc processor (see the module docs).
#[derive(Clone)]
pub struct MinimalProcessor {
    pods: Arc<[String]>,
    next: Arc<AtomicUsize>,
    tag: Option<Arc<str>>,
}

/// What one ext_proc stream remembers between messages.
struct StreamState {
    body: Vec<u8>,
    picked_by: Option<String>,
}

impl MinimalProcessor {
    /// A processor picking from `pods` round-robin. Panics when `pods` is empty.
    pub fn new(pods: &[SocketAddr]) -> Self {
        assert!(!pods.is_empty(), "a processor needs at least one pod");
        Self {
            pods: pods.iter().map(ToString::to_string).collect(),
            next: Arc::new(AtomicUsize::new(0)),
            tag: None,
        }
    }

    /// Also sets `x-picked-by: <name>;pool=<pool>` on every picked request, `<pool>` being
    /// the stream's `x-infermesh-pool` gRPC metadata (`none` without it), so a test
    /// backend can tell which processor picked and for which pool.
    pub fn tagged(mut self, name: &str) -> Self {
        self.tag = Some(name.into());
        self
    }

    /// Serves this processor and gRPC health (reporting it serving) on `listener`, with
    /// TCP_NODELAY, until the listener fails.
    pub async fn serve(self, listener: TcpListener) -> Result<(), tonic::transport::Error> {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status(
                "envoy.service.ext_proc.v3.ExternalProcessor",
                tonic_health::ServingStatus::Serving,
            )
            .await;
        let incoming =
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(ExternalProcessorServer::new(self))
            .serve_with_incoming(incoming)
            .await
    }

    /// The request-headers reply that routes to the next pod.
    fn pick(&self, st: &StreamState, content_length: Option<usize>) -> ProcessingResponse {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.pods.len();
        let mut set_headers = vec![set_header(DESTINATION, &self.pods[i])];
        if let Some(len) = content_length {
            set_headers.push(set_header("content-length", &len.to_string()));
        }
        if let Some(tag) = &st.picked_by {
            set_headers.push(set_header("x-picked-by", tag));
        }
        reply(Out::RequestHeaders(HeadersResponse {
            response: Some(CommonResponse {
                header_mutation: Some(HeaderMutation {
                    set_headers,
                    remove_headers: Vec::new(),
                }),
                clear_route_cache: true,
                ..Default::default()
            }),
        }))
    }

    /// Replies to one message; a request body is buffered until it ends, like infermesh.
    fn handle(&self, st: &mut StreamState, msg: ProcessingRequest) -> Vec<ProcessingResponse> {
        match msg.request {
            Some(In::RequestHeaders(h)) if h.end_of_stream => vec![self.pick(st, None)],
            Some(In::RequestHeaders(_)) | None => Vec::new(),
            Some(In::RequestBody(b)) => {
                st.body.extend_from_slice(&b.body);
                if !b.end_of_stream {
                    return Vec::new();
                }
                let body = std::mem::take(&mut st.body);
                vec![
                    self.pick(st, Some(body.len())),
                    reply(Out::RequestBody(BodyResponse {
                        response: Some(streamed(body, true)),
                    })),
                ]
            }
            Some(In::ResponseHeaders(_)) => {
                vec![reply(Out::ResponseHeaders(HeadersResponse::default()))]
            }
            Some(In::ResponseBody(b)) => vec![reply(Out::ResponseBody(BodyResponse {
                response: Some(streamed(b.body, b.end_of_stream)),
            }))],
            Some(In::RequestTrailers(_)) => {
                vec![reply(Out::RequestTrailers(TrailersResponse::default()))]
            }
            Some(In::ResponseTrailers(_)) => {
                vec![reply(Out::ResponseTrailers(TrailersResponse::default()))]
            }
        }
    }
}

fn reply(r: Out) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(r),
        ..Default::default()
    }
}

/// A body mutation that streams `body` on unchanged (what FULL_DUPLEX_STREAMED requires).
fn streamed(body: Vec<u8>, end_of_stream: bool) -> CommonResponse {
    CommonResponse {
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
    }
}

fn set_header(key: &str, value: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: key.to_owned(),
            value: String::new(),
            raw_value: value.as_bytes().to_vec(),
        }),
        ..Default::default()
    }
}

type Replies = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for MinimalProcessor {
    type ProcessStream = Replies;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Replies>, Status> {
        let picked_by = self.tag.as_ref().map(|name| {
            let pool = request
                .metadata()
                .get(POOL_METADATA)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none");
            format!("{name};pool={pool}")
        });
        let mut st = StreamState {
            body: Vec::new(),
            picked_by,
        };
        let this = self.clone();
        let out = request.into_inner().flat_map(move |m| {
            let replies = match m {
                Ok(m) => this.handle(&mut st, m).into_iter().map(Ok).collect(),
                Err(_) => Vec::new(),
            };
            futures::stream::iter(replies)
        });
        Ok(Response::new(Box::pin(out)))
    }
}
