//! The ext_proc gRPC server (Envoy's `ExternalProcessor`): a thin driver per stream. One
//! direction: Envoy's message → [`edge`] (protobuf to [`message::Inbound`]) → the
//! [`stream::ExtProcStream`] state machine → actions → this driver, which sends each reply
//! (converted back by [`edge`]) or awaits a flow-control wait or an owner lookup.

pub mod edge;
pub mod message;
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

use crate::request::{BurstWait, Dispatcher, FlowWait, PrefixLookup};
use message::Inbound;
use stream::{Action, ExtProcStream, ProtocolError};

/// The gRPC service: hands each stream to its own state machine.
#[derive(Debug, Clone)]
pub struct ExtProcService {
    dispatcher: Dispatcher,
}

impl ExtProcService {
    /// A service over the shared request path.
    pub fn new(dispatcher: Dispatcher) -> ExtProcService {
        ExtProcService { dispatcher }
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
    // An owner lookup in flight; no message is read until it is answered.
    lookup: Option<PrefixLookup>,
    // A flow-control wait in flight; dropping the stream (Envoy reset) drops it, which
    // frees the request's place in the queue.
    flow: Option<FlowWait>,
    // A burst-window wait in flight; dropping the stream drops it, which frees the
    // request's place in the batch.
    burst: Option<BurstWait>,
    // The scheduled request's revocation (in-flight eviction), watched beside Envoy's
    // messages.
    revoked: Option<Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>>,
    done: bool,
}

impl ReplyStream {
    fn carry_out(&mut self, actions: Vec<Action>) {
        for a in actions {
            match a {
                Action::Reply(r) => self.pending.push_back(r.into()),
                Action::NeedLookup(l) => self.lookup = Some(l),
                Action::NeedFlow(w) => self.flow = Some(w),
                Action::NeedBurst(w) => self.burst = Some(w),
            }
        }
        if self.revoked.is_none()
            && let Some(fut) = self.state.revocation()
        {
            self.revoked = Some(Box::pin(fut));
        }
    }

    /// Handles one message; `Some` ends the stream with that status.
    fn handle(&mut self, msg: ProcessingRequest) -> Option<Status> {
        let actions = Inbound::try_from(msg)
            .map_err(ProtocolError::from)
            .and_then(|m| self.state.on_message(m));
        match actions {
            Ok(actions) => {
                self.carry_out(actions);
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
            if let Some(fut) = &mut this.flow {
                let Poll::Ready(answer) = fut.as_mut().poll(cx) else {
                    return Poll::Pending;
                };
                this.flow = None;
                let actions = this.state.on_flow(answer);
                this.carry_out(actions);
                continue;
            }
            if let Some(fut) = &mut this.burst {
                let Poll::Ready(placed) = fut.as_mut().poll(cx) else {
                    return Poll::Pending;
                };
                this.burst = None;
                let actions = this.state.on_burst(placed);
                this.carry_out(actions);
                continue;
            }
            if let Some(fut) = &mut this.lookup {
                let Poll::Ready(answer) = fut.as_mut().poll(cx) else {
                    return Poll::Pending;
                };
                this.lookup = None;
                let actions = this.state.on_lookup(answer);
                this.carry_out(actions);
                continue;
            }
            if let Some(fut) = &mut this.revoked
                && fut.as_mut().poll(cx).is_ready()
            {
                this.revoked = None;
                let actions = this.state.on_revoked();
                this.carry_out(actions);
                this.done = true;
                continue;
            }
            match Pin::new(&mut this.inbound).poll_next(cx) {
                Poll::Ready(Some(Ok(msg))) => {
                    tracing::trace!(message = ?msg.request.as_ref().map(message_kind), "ext_proc message");
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
            state: ExtProcStream::new(self.dispatcher.clone()),
            pending: VecDeque::new(),
            lookup: None,
            flow: None,
            burst: None,
            revoked: None,
            done: false,
        })))
    }
}
