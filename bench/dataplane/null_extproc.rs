//! The cheapest processor that still speaks the full-duplex EPP exchange, as a baseline for
//! `bench/dataplane`: it answers exactly the messages infermesh answers (request headers
//! and body in one go once the body ends, response headers, response body echoed) but picks
//! pods round-robin and parses nothing. Envoy + this processor minus Envoy's static route is
//! what the protocol itself costs on this machine; infermesh's own share is the rest.
//!
//!   extproc-null --listen 127.0.0.1:9002 --pods 127.0.0.1:8000,127.0.0.1:8001

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use clap::Parser;
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
use tonic::{Request, Response, Status, Streaming};

#[derive(Debug, Parser)]
struct Args {
    /// gRPC listen address.
    #[arg(long)]
    listen: SocketAddr,
    /// Pods to pick from, round-robin (comma-separated ip:port).
    #[arg(long, value_delimiter = ',', required = true)]
    pods: Vec<SocketAddr>,
}

#[derive(Clone)]
struct Null {
    pods: Arc<Vec<String>>,
    next: Arc<AtomicUsize>,
}

fn reply(r: Out) -> ProcessingResponse {
    ProcessingResponse {
        response: Some(r),
        ..Default::default()
    }
}

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

impl Null {
    /// Replies to one message; the request body is buffered until it ends, like infermesh.
    fn handle(&self, body: &mut Vec<u8>, msg: ProcessingRequest) -> Vec<ProcessingResponse> {
        match msg.request {
            Some(In::RequestBody(b)) => {
                body.extend_from_slice(&b.body);
                if !b.end_of_stream {
                    return Vec::new();
                }
                let i = self.next.fetch_add(1, Ordering::Relaxed) % self.pods.len();
                let body = std::mem::take(body);
                let headers = HeaderMutation {
                    set_headers: vec![
                        set_header("x-gateway-destination-endpoint", &self.pods[i]),
                        set_header("content-length", &body.len().to_string()),
                    ],
                    remove_headers: Vec::new(),
                };
                vec![
                    reply(Out::RequestHeaders(HeadersResponse {
                        response: Some(CommonResponse {
                            header_mutation: Some(headers),
                            clear_route_cache: true,
                            ..Default::default()
                        }),
                    })),
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
            Some(In::RequestHeaders(_)) | None => Vec::new(),
        }
    }
}

type Replies = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for Null {
    type ProcessStream = Replies;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Replies>, Status> {
        let this = self.clone();
        let mut body = Vec::new();
        let out = request.into_inner().flat_map(move |m| {
            let replies = match m {
                Ok(m) => this.handle(&mut body, m).into_iter().map(Ok).collect(),
                Err(_) => Vec::new(),
            };
            futures::stream::iter(replies)
        });
        Ok(Response::new(Box::pin(out)))
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let null = Null {
        pods: Arc::new(args.pods.iter().map(ToString::to_string).collect()),
        next: Arc::new(AtomicUsize::new(0)),
    };
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = tokio::net::TcpListener::bind(args.listen).await?;
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            tonic::transport::Server::builder()
                .add_service(ExternalProcessorServer::new(null))
                .serve_with_incoming(incoming)
                .await?;
            Ok(())
        })
}
