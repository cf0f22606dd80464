//! The tonic edge: `envoy.service.discovery.v3.AggregatedDiscoveryService`, a small loop
//! per stream that feeds requests and snapshots to a state machine and sends what it
//! returns.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::Stream;
use infermesh_proto::envoy::config::core::v3::Node;
use infermesh_proto::envoy::config::core::v3::node::UserAgentVersionType;
use infermesh_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
use tokio::sync::watch;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::{NamedService, StreamingService};
use tonic::{Request, Response, Status, Streaming};

use crate::codec::AdsCodec;
use crate::delta::DeltaStream;
use crate::resource_type::ResourceType;
use crate::shared::Shared;
use crate::snapshot::{EncodedResponse, Snapshot};
use crate::sotw::SotwStream;
use crate::status::{NodeEntry, Protocol, StatusRegistry, SubscriptionView};
use crate::stream::{NodeMemory, StreamEvent, TypeMemory};
use crate::stream_core::SentResources;

const SOTW_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA_PATH: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// The ADS gRPC service; add it to a tonic server (`Server::builder().add_service(..)`).
#[derive(Debug, Clone)]
pub struct AdsService {
    shared: Arc<Shared>,
}

impl AdsService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

impl NamedService for AdsService {
    const NAME: &'static str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
}

/// What the stream loop needs from a SotW or Delta state machine.
trait AdsMachine: Send + 'static {
    type Req: prost::Message + Default + Send + 'static;
    const PROTOCOL: Protocol;
    fn create(snapshot: Option<Arc<Snapshot>>, memory: NodeMemory) -> Self;
    fn node(req: &Self::Req) -> Option<&Node>;
    fn handle_request(&mut self, req: &Self::Req);
    fn handle_snapshot(&mut self, snapshot: Arc<Snapshot>);
    fn poll_response(&mut self) -> Option<(ResourceType, EncodedResponse)>;
    fn poll_event(&mut self) -> Option<StreamEvent>;
    fn memory(&self, ty: ResourceType) -> &TypeMemory;
    fn view(&self, ty: ResourceType) -> SubscriptionView;
    fn take_sent(&mut self, ty: ResourceType) -> SentResources;
    fn take_dropped(&mut self, ty: ResourceType) -> Vec<String>;
}

macro_rules! impl_machine {
    ($machine:ty, $req:ty, $protocol:expr) => {
        impl AdsMachine for $machine {
            type Req = $req;
            const PROTOCOL: Protocol = $protocol;
            fn create(snapshot: Option<Arc<Snapshot>>, memory: NodeMemory) -> Self {
                <$machine>::new(snapshot, memory)
            }
            fn node(req: &$req) -> Option<&Node> {
                req.node.as_ref()
            }
            fn handle_request(&mut self, req: &$req) {
                <$machine>::handle_request(self, req)
            }
            fn handle_snapshot(&mut self, snapshot: Arc<Snapshot>) {
                <$machine>::handle_snapshot(self, snapshot)
            }
            fn poll_response(&mut self) -> Option<(ResourceType, EncodedResponse)> {
                <$machine>::poll_response(self)
            }
            fn poll_event(&mut self) -> Option<StreamEvent> {
                <$machine>::poll_event(self)
            }
            fn memory(&self, ty: ResourceType) -> &TypeMemory {
                <$machine>::memory(self, ty)
            }
            fn take_sent(&mut self, ty: ResourceType) -> SentResources {
                <$machine>::take_sent(self, ty)
            }
            fn take_dropped(&mut self, ty: ResourceType) -> Vec<String> {
                <$machine>::take_dropped(self, ty)
            }
            fn view(&self, ty: ResourceType) -> SubscriptionView {
                let (wildcard, names) = self.subscription(ty);
                SubscriptionView {
                    subscribed: self.is_subscribed(ty),
                    wildcard,
                    names: names.len(),
                    synced_version: self.synced_version(ty),
                }
            }
        }
    };
}

impl_machine!(SotwStream, DiscoveryRequest, Protocol::Sotw);
impl_machine!(DeltaStream, DeltaDiscoveryRequest, Protocol::Delta);

/// Unregisters the stream from the sync status however the stream ends (tonic drops the
/// response stream when the client goes away).
struct Registration {
    registry: Arc<Shared>,
    entry: Arc<NodeEntry>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.registry().close(&self.entry);
    }
}

/// One stream's loop state.
struct Driver<M: AdsMachine> {
    shared: Arc<Shared>,
    inbound: Streaming<M::Req>,
    snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    closing: watch::Receiver<bool>,
    peer: String,
    machine: Option<M>,
    registration: Option<Registration>,
}

fn user_agent(node: &Node) -> String {
    match &node.user_agent_version_type {
        Some(UserAgentVersionType::UserAgentVersion(v)) => format!("{} {v}", node.user_agent_name),
        Some(UserAgentVersionType::UserAgentBuildVersion(b)) => match &b.version {
            Some(v) => format!(
                "{} {}.{}.{}",
                node.user_agent_name, v.major_number, v.minor_number, v.patch
            ),
            None => node.user_agent_name.clone(),
        },
        _ => node.user_agent_name.clone(),
    }
}

impl<M: AdsMachine> Driver<M> {
    fn on_request(&mut self, req: M::Req) {
        if self.machine.is_none() {
            let node = M::node(&req);
            let id = match node {
                Some(node) if !node.id.is_empty() => node.id.clone(),
                _ => format!("anonymous@{}", self.peer),
            };
            let agent = node.map(user_agent).unwrap_or_default();
            let registry: &StatusRegistry = self.shared.registry();
            let entry = registry.open(&id, node, agent, M::PROTOCOL);
            let snapshot = self.snapshots.borrow_and_update().clone();
            self.machine = Some(M::create(snapshot, entry.memory()));
            tracing::debug!(node = %id, protocol = ?M::PROTOCOL, "xDS stream opened");
            self.registration = Some(Registration {
                registry: Arc::clone(&self.shared),
                entry,
            });
        }
        if let Some(m) = self.machine.as_mut() {
            m.handle_request(&req);
        }
    }

    fn record(&mut self) {
        let (Some(m), Some(reg)) = (self.machine.as_mut(), self.registration.as_ref()) else {
            return;
        };
        let mut events = Vec::new();
        let mut sent: [SentResources; 4] = Default::default();
        while let Some(ev) = m.poll_event() {
            match &ev {
                StreamEvent::Sent { ty, .. } => sent[ty.index()] = m.take_sent(*ty),
                StreamEvent::Nacked { ty, detail } => {
                    tracing::warn!(ty = %ty, version = %detail.version, reason = %detail.message, "xDS response rejected")
                }
                StreamEvent::UnknownType { type_url } => {
                    tracing::debug!(%type_url, "xDS request for a type not served")
                }
                _ => {}
            }
            events.push(ev);
        }
        let dropped = ResourceType::ALL.map(|ty| m.take_dropped(ty));
        let m = &*m;
        reg.entry.record(
            events.into_iter(),
            &mut sent,
            &dropped,
            |ty| m.memory(ty).clone(),
            |ty| m.view(ty),
        );
    }

    async fn next(mut self) -> Option<(Result<EncodedResponse, Status>, Self)> {
        loop {
            if *self.closing.borrow() {
                return None;
            }
            if let Some((_, response)) = self.machine.as_mut().and_then(|m| m.poll_response()) {
                self.record();
                return Some((Ok(response), self));
            }
            tokio::select! {
                msg = self.inbound.message() => match msg {
                    Ok(Some(req)) => self.on_request(req),
                    Ok(None) => return None,
                    Err(status) => {
                        tracing::debug!(%status, "xDS stream ended by the client");
                        return None;
                    }
                },
                _ = self.closing.changed() => {}
                changed = self.snapshots.changed() => {
                    if changed.is_err() {
                        return None;
                    }
                    let snapshot = self.snapshots.borrow_and_update().clone();
                    if let (Some(m), Some(s)) = (self.machine.as_mut(), snapshot) {
                        m.handle_snapshot(s);
                    }
                }
            }
            self.record();
        }
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<EncodedResponse, Status>> + Send>>;

struct Method<M>(Arc<Shared>, std::marker::PhantomData<fn() -> M>);

impl<M: AdsMachine> StreamingService<M::Req> for Method<M> {
    type Response = EncodedResponse;
    type ResponseStream = ResponseStream;
    type Future = BoxFuture<Response<ResponseStream>, Status>;

    fn call(&mut self, request: Request<Streaming<M::Req>>) -> Self::Future {
        let shared = Arc::clone(&self.0);
        Box::pin(async move {
            let peer = request
                .remote_addr()
                .map_or_else(|| "unknown".to_string(), |a| a.to_string());
            let snapshots = shared.subscribe();
            let closing = shared.closing();
            if *closing.borrow() {
                return Err(Status::unavailable("this infermesh node is draining"));
            }
            let driver = Driver::<M> {
                shared,
                inbound: request.into_inner(),
                snapshots,
                closing,
                peer,
                machine: None,
                registration: None,
            };
            let stream: ResponseStream = Box::pin(futures::stream::unfold(driver, Driver::next));
            Ok(Response::new(stream))
        })
    }
}

async fn serve<M: AdsMachine, B>(
    shared: Arc<Shared>,
    req: http::Request<B>,
) -> http::Response<tonic::body::Body>
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    let mut grpc = tonic::server::Grpc::new(AdsCodec::<M::Req>::default());
    grpc.streaming(Method::<M>(shared, std::marker::PhantomData), req)
        .await
}

impl<B> Service<http::Request<B>> for AdsService
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let shared = Arc::clone(&self.shared);
        match req.uri().path() {
            SOTW_PATH => Box::pin(async move { Ok(serve::<SotwStream, B>(shared, req).await) }),
            DELTA_PATH => Box::pin(async move { Ok(serve::<DeltaStream, B>(shared, req).await) }),
            _ => {
                Box::pin(async move { Ok(Status::unimplemented("no such xDS method").into_http()) })
            }
        }
    }
}
