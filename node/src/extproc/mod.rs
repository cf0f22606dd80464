//! The ext_proc gRPC server (Envoy's `ExternalProcessor`): one task per stream drives an
//! [`stream::ExtProcStream`] state machine.

pub mod stream;

use std::pin::Pin;

use futures::Stream;
use infermesh_proto::envoy::service::ext_proc::v3::external_processor_server::{
    ExternalProcessor, ExternalProcessorServer,
};
use infermesh_proto::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::dispatch::Dispatcher;
use stream::ExtProcStream;

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

type ResponseStream = Pin<Box<dyn Stream<Item = Result<ProcessingResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ExternalProcessor for ExtProcService {
    type ProcessStream = ResponseStream;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel::<Result<ProcessingResponse, Status>>(16);
        let mut state = ExtProcStream::new(self.dispatcher.clone());
        tokio::spawn(async move {
            while let Some(msg) = inbound.next().await {
                let msg = match msg {
                    Ok(m) => m,
                    Err(status) => {
                        tracing::debug!(request_id = %state.request_id(), %status, "ext_proc stream ended by Envoy");
                        break;
                    }
                };
                match state.handle(msg) {
                    Ok(replies) => {
                        for r in replies {
                            if tx.send(Ok(r)).await.is_err() {
                                return; // Envoy went away; dropping `state` settles the request
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(request_id = %state.request_id(), error = %e, "ext_proc protocol error");
                        let _ = tx.send(Err(Status::invalid_argument(e.to_string()))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
