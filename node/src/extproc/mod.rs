//! The ext_proc gRPC server (Envoy's `ExternalProcessor`): each stream drives an
//! [`stream::ExtProcStream`] state machine.

pub mod stream;

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use infermesh_proto::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use infermesh_proto::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use tonic::{Request, Response, Status, Streaming};

use crate::dispatch::Dispatcher;
use crate::mesh::prefix::PrefixSharing;
use stream::{ExtProcStream, OwnerLookup};

/// The gRPC service: hands each stream to its own state machine.
#[derive(Debug, Clone)]
pub struct ExtProcService {
    dispatcher: Dispatcher,
    sharing: Option<PrefixSharing>,
}

impl ExtProcService {
    /// A service over the shared request path.
    pub fn new(dispatcher: Dispatcher) -> ExtProcService {
        ExtProcService {
            dispatcher,
            sharing: None,
        }
    }

    /// Shares prefixes over the mesh: each request's chain is matched at the anchor's
    /// owner before scheduling and its pick recorded at the owners.
    pub fn with_prefix_sharing(mut self, sharing: PrefixSharing) -> ExtProcService {
        self.sharing = Some(sharing);
        self
    }

    /// The tonic server wrapper for this service.
    pub fn into_server(self) -> ExternalProcessorServer<ExtProcService> {
        ExternalProcessorServer::new(self)
    }
}

/// The reply stream of one ext_proc call. Each message from Envoy is handled inline when
/// tonic polls for the next reply, so a request costs no task spawn and no channel hop.
struct ReplyStream {
    inbound: Streaming<ProcessingRequest>,
    state: ExtProcStream,
    pending: VecDeque<ProcessingResponse>,
    // An owner lookup in flight and the message that completed the body, handled after it.
    lookup: Option<(OwnerLookup, ProcessingRequest)>,
    done: bool,
}

impl ReplyStream {
    /// Handles one message; `Some` ends the stream with that status.
    fn handle(&mut self, msg: ProcessingRequest) -> Option<Status> {
        match self.state.handle(msg) {
            Ok(replies) => {
                self.pending.extend(replies);
                None
            }
            Err(e) => {
                tracing::warn!(request_id = %self.state.request_id(), error = %e, "ext_proc protocol error");
                self.done = true;
                Some(Status::invalid_argument(e.to_string()))
            }
        }
    }
}

impl Stream for ReplyStream {
    type Item = Result<ProcessingResponse, Status>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(r) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(r)));
            }
            if this.done {
                return Poll::Ready(None);
            }
            if let Some((fut, _)) = &mut this.lookup {
                let Poll::Ready((body, prefix)) = fut.as_mut().poll(cx) else {
                    return Poll::Pending;
                };
                let (_, msg) = this.lookup.take().expect("lookup in flight");
                this.state.resume(body, prefix);
                if let Some(status) = this.handle(msg) {
                    return Poll::Ready(Some(Err(status)));
                }
                continue;
            }
            match Pin::new(&mut this.inbound).poll_next(cx) {
                Poll::Ready(Some(Ok(mut msg))) => {
                    tracing::trace!(message = ?msg.request.as_ref().map(message_kind), "ext_proc message");
                    if let Some(fut) = this.state.owner_lookup(&mut msg) {
                        this.lookup = Some((fut, msg));
                        continue;
                    }
                    if let Some(status) = this.handle(msg) {
                        return Poll::Ready(Some(Err(status)));
                    }
                }
                Poll::Ready(Some(Err(status))) => {
                    // Dropping `state` with the stream settles an unfinished request.
                    tracing::debug!(request_id = %this.state.request_id(), %status, "ext_proc stream ended by Envoy");
                    this.done = true;
                }
                Poll::Ready(None) => this.done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

fn message_kind(
    r: &infermesh_proto::envoy::service::ext_proc::v3::processing_request::Request,
) -> &'static str {
    use infermesh_proto::envoy::service::ext_proc::v3::processing_request::Request;
    match r {
        Request::RequestHeaders(_) => "request_headers",
        Request::RequestBody(_) => "request_body",
        Request::RequestTrailers(_) => "request_trailers",
        Request::ResponseHeaders(_) => "response_headers",
        Request::ResponseBody(_) => "response_body",
        Request::ResponseTrailers(_) => "response_trailers",
    }
}

#[tonic::async_trait]
impl ExternalProcessor for ExtProcService {
    type ProcessStream = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        Ok(Response::new(Box::pin(ReplyStream {
            inbound: request.into_inner(),
            state: ExtProcStream::new(self.dispatcher.clone())
                .with_prefix_sharing(self.sharing.clone()),
            pending: VecDeque::new(),
            lookup: None,
            done: false,
        })))
    }
}
