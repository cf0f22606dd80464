//! CSDS (`envoy.service.status.v3.ClientStatusDiscoveryService`): what each connected
//! client was sent, accepted and rejected, per resource, in Envoy's own status schema, so
//! the tools operators already point at a control plane work against every node.
//!
//! [`client_status`] is the IO-free conversion from the registry's per-client state to a
//! `ClientStatusResponse`; [`CsdsService`] is the tonic edge.
//!
//! Per resource, as a management server reports it (Istio's rules, with Envoy's
//! `ClientResourceStatus` for the client's side):
//! - sent and not answered yet: `STALE` / `REQUESTED`;
//! - accepted, and the version published now: `SYNCED` / `ACKED`;
//! - accepted, and a newer version published but not sent yet: `NOT_SENT` / `ACKED`;
//! - a version rejected that is still the one published: `ERROR` / `NACKED`, with the
//!   rejected version and the client's reason in `error_state`, and the version the client
//!   still runs (if any) as the resource.

use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use infermesh_proto::envoy::admin::v3::{ClientResourceStatus, UpdateFailureState};
use infermesh_proto::envoy::config::core::v3::Node;
use infermesh_proto::envoy::service::status::v3::client_config::GenericXdsConfig;
use infermesh_proto::envoy::service::status::v3::client_status_discovery_service_server::{
    ClientStatusDiscoveryService, ClientStatusDiscoveryServiceServer,
};
use infermesh_proto::envoy::service::status::v3::{
    ClientConfig, ClientStatusRequest, ClientStatusResponse, ConfigStatus,
};
use infermesh_proto::envoy::r#type::matcher::v3::NodeMatcher;
use infermesh_proto::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use infermesh_proto::google::protobuf::Timestamp;
use tonic::{Request, Response, Status, Streaming};

use crate::resource_type::ResourceType;
use crate::shared::Shared;
use crate::snapshot::{Snapshot, TypeSnapshot};
use crate::status::{ClientView, Held, ResourceView};

/// Why a CSDS request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsdsError {
    /// A node matcher asks for a match this server does not do.
    #[error(
        "{field} is not supported: node matchers match node_id with exact, prefix, suffix or contains"
    )]
    UnsupportedMatcher {
        /// The request field, e.g. `node_matchers[0].node_metadatas`.
        field: String,
    },
}

impl From<CsdsError> for Status {
    fn from(e: CsdsError) -> Self {
        Status::invalid_argument(e.to_string())
    }
}

/// One `NodeMatcher`, checked: `None` matches every node id.
#[derive(Debug)]
struct IdMatcher {
    pattern: Option<MatchPattern>,
    ignore_case: bool,
}

impl IdMatcher {
    fn matches(&self, id: &str) -> bool {
        let Some(pattern) = &self.pattern else {
            return true;
        };
        let fold = |s: &str| {
            if self.ignore_case {
                s.to_lowercase()
            } else {
                s.to_owned()
            }
        };
        let id = fold(id);
        match pattern {
            MatchPattern::Exact(s) => id == fold(s),
            MatchPattern::Prefix(s) => id.starts_with(&fold(s)),
            MatchPattern::Suffix(s) => id.ends_with(&fold(s)),
            MatchPattern::Contains(s) => id.contains(&fold(s)),
            // Refused by `compile`.
            MatchPattern::SafeRegex(_) | MatchPattern::Custom(_) => false,
        }
    }
}

/// Checks `matchers`, refusing what this server cannot match on.
fn compile(matchers: &[NodeMatcher]) -> Result<Vec<IdMatcher>, CsdsError> {
    matchers
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let unsupported = |what: &str| CsdsError::UnsupportedMatcher {
                field: format!("node_matchers[{i}].{what}"),
            };
            if !m.node_metadatas.is_empty() {
                return Err(unsupported("node_metadatas"));
            }
            let Some(id) = &m.node_id else {
                return Ok(IdMatcher {
                    pattern: None,
                    ignore_case: false,
                });
            };
            match &id.match_pattern {
                Some(MatchPattern::SafeRegex(_)) => Err(unsupported("node_id.safe_regex")),
                Some(MatchPattern::Custom(_)) => Err(unsupported("node_id.custom")),
                None => Err(unsupported("node_id.match_pattern")),
                Some(p) => Ok(IdMatcher {
                    pattern: Some(p.clone()),
                    ignore_case: id.ignore_case,
                }),
            }
        })
        .collect()
}

fn timestamp(unix_ms: u64) -> Timestamp {
    Timestamp {
        seconds: (unix_ms / 1000) as i64,
        nanos: ((unix_ms % 1000) * 1_000_000) as i32,
    }
}

/// The CSDS entry of one resource of `ty`; `None` when the client holds nothing of it
/// and nothing about it is pending (a rejection of a version no longer published).
fn generic_config(
    ty: ResourceType,
    view: &ResourceView,
    published: Option<&TypeSnapshot>,
    exclude_contents: bool,
) -> Option<GenericXdsConfig> {
    let served = published.and_then(|p| p.resources.get(&view.name));
    // A rejection matters while the rejected version is what is published; once the
    // server moves on (or back), the client is judged by what it holds.
    let rejected = view
        .rejected
        .as_ref()
        .filter(|(h, _)| served.is_some_and(|s| s.version == h.resource.version));
    let contents = |h: &Held| {
        if exclude_contents {
            None
        } else {
            h.resource.any()
        }
    };
    let error_state = rejected.map(|(h, nack)| UpdateFailureState {
        failed_configuration: contents(h),
        last_update_attempt: Some(timestamp(nack.unix_ms)),
        details: nack.detail.message.clone(),
        version_info: nack.detail.version.clone(),
    });
    let (shown, config_status, client_status) = if let Some(f) = &view.in_flight {
        (f, ConfigStatus::Stale, ClientResourceStatus::Requested)
    } else if rejected.is_some() {
        let Some(a) = &view.accepted else {
            // Nothing accepted: only the failure has contents.
            return Some(GenericXdsConfig {
                type_url: ty.type_url().to_owned(),
                name: view.name.clone(),
                config_status: ConfigStatus::Error as i32,
                client_status: ClientResourceStatus::Nacked as i32,
                last_updated: rejected.map(|(_, n)| timestamp(n.unix_ms)),
                error_state,
                ..Default::default()
            });
        };
        (a, ConfigStatus::Error, ClientResourceStatus::Nacked)
    } else if let Some(a) = &view.accepted {
        let status = if served.is_some_and(|s| s.version == a.resource.version) {
            ConfigStatus::Synced
        } else {
            ConfigStatus::NotSent
        };
        (a, status, ClientResourceStatus::Acked)
    } else {
        return None;
    };
    Some(GenericXdsConfig {
        type_url: ty.type_url().to_owned(),
        name: view.name.clone(),
        version_info: shown.version_info.clone(),
        xds_config: contents(shown),
        last_updated: Some(timestamp(shown.unix_ms)),
        config_status: config_status as i32,
        client_status: client_status as i32,
        error_state,
        is_static_resource: false,
    })
}

/// Answers `req` from the per-client state `clients` against the `published` snapshot:
/// one `ClientConfig` per client the node matchers select (every client when there are
/// none; several matchers are ORed), with one `GenericXdsConfig` per resource sent.
pub(crate) fn client_status(
    req: &ClientStatusRequest,
    clients: &[ClientView],
    published: Option<&Snapshot>,
) -> Result<ClientStatusResponse, CsdsError> {
    let matchers = compile(&req.node_matchers)?;
    let config = clients
        .iter()
        .filter(|c| matchers.is_empty() || matchers.iter().any(|m| m.matches(&c.node_id)))
        .map(|c| {
            let mut node = c.node.clone().unwrap_or_else(|| Node {
                cluster: c.cluster.clone(),
                ..Default::default()
            });
            // An anonymous client is named the way the server tracks it.
            node.id.clone_from(&c.node_id);
            let generic_xds_configs = ResourceType::ALL
                .into_iter()
                .flat_map(|ty| {
                    let published = published.map(|s| &**s.get(ty));
                    c.types[ty.index()].iter().filter_map(move |v| {
                        generic_config(ty, v, published, req.exclude_resource_contents)
                    })
                })
                .collect();
            ClientConfig {
                node: Some(node),
                generic_xds_configs,
                ..Default::default()
            }
        })
        .collect();
    Ok(ClientStatusResponse { config })
}

/// The CSDS gRPC service of one xDS server; mount it with
/// [`XdsServer::csds_service`](crate::XdsServer::csds_service).
#[derive(Debug, Clone)]
pub struct CsdsService {
    shared: Arc<Shared>,
}

impl CsdsService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    /// Answers one request against the server's current state.
    pub fn answer(&self, req: &ClientStatusRequest) -> Result<ClientStatusResponse, CsdsError> {
        let clients = self.shared.registry().client_views();
        let published = self.shared.current.borrow().clone();
        client_status(req, &clients, published.as_deref())
    }

    /// The service wrapped for a tonic server.
    pub fn into_server(self) -> ClientStatusDiscoveryServiceServer<Self> {
        ClientStatusDiscoveryServiceServer::new(self)
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<ClientStatusResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ClientStatusDiscoveryService for CsdsService {
    type StreamClientStatusStream = ResponseStream;

    async fn stream_client_status(
        &self,
        request: Request<Streaming<ClientStatusRequest>>,
    ) -> Result<Response<Self::StreamClientStatusStream>, Status> {
        let this = self.clone();
        // One response per request; a refused request ends the stream with its status.
        let stream = request.into_inner().map(move |req| {
            let req = req?;
            this.answer(&req).map_err(Status::from)
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn fetch_client_status(
        &self,
        request: Request<ClientStatusRequest>,
    ) -> Result<Response<ClientStatusResponse>, Status> {
        Ok(Response::new(self.answer(request.get_ref())?))
    }
}

#[cfg(test)]
mod tests {
    use infermesh_proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
    use infermesh_proto::envoy::r#type::matcher::v3::StringMatcher;
    use infermesh_proto::envoy::r#type::matcher::v3::{RegexMatcher, StructMatcher};
    use infermesh_proto::google::rpc::Status as RpcStatus;

    use super::*;
    use crate::config::XdsConfig;
    use crate::delta::DeltaStream;
    use crate::input::{InferencePoolSpec, XdsInput};
    use crate::sotw::SotwStream;
    use crate::status::{NodeEntry, Protocol, StatusRegistry, SubscriptionView};
    use crate::stream::StreamEvent;
    use crate::stream_core::SentResources;
    use crate::translate::translate;

    const LDS: ResourceType = ResourceType::Listener;

    fn snapshot(port: u16) -> Arc<Snapshot> {
        let input = XdsInput {
            pools: vec![InferencePoolSpec::new(
                "p",
                ([127, 0, 0, 1], port).into(),
                vec![8000],
            )],
            ext_proc_endpoints: vec!["127.0.0.1:9002".parse().unwrap()],
            grpc_services: vec![],
        };
        Arc::new(Snapshot::build(&translate(&input, &XdsConfig::default())).unwrap())
    }

    fn node(id: &str) -> Node {
        Node {
            id: id.into(),
            cluster: "edge".into(),
            user_agent_name: "envoy".into(),
            ..Default::default()
        }
    }

    /// Feeds what a stream did to the registry, as the service does; returns the nonces
    /// of the responses sent.
    macro_rules! record {
        ($entry:expr, $stream:expr) => {{
            let mut events = Vec::new();
            let mut sent: [SentResources; 4] = Default::default();
            while let Some(ev) = $stream.poll_event() {
                if let StreamEvent::Sent { ty, .. } = &ev {
                    sent[ty.index()] = $stream.take_sent(*ty);
                }
                events.push(ev);
            }
            let nonces: Vec<String> = events
                .iter()
                .filter_map(|e| match e {
                    StreamEvent::Sent { nonce, .. } => Some(nonce.clone()),
                    _ => None,
                })
                .collect();
            let dropped = ResourceType::ALL.map(|ty| $stream.take_dropped(ty));
            let s = &$stream;
            $entry.record(
                events.into_iter(),
                &mut sent,
                &dropped,
                |ty| s.memory(ty).clone(),
                |ty| SubscriptionView {
                    subscribed: s.is_subscribed(ty),
                    wildcard: s.subscription(ty).0,
                    names: s.subscription(ty).1.len(),
                    synced_version: s.synced_version(ty),
                },
            );
            nonces
        }};
    }

    struct Sotw {
        registry: StatusRegistry,
        entry: Arc<NodeEntry>,
        stream: SotwStream,
        published: Arc<Snapshot>,
    }

    impl Sotw {
        /// A client `id` subscribed to every listener, sent the first response.
        fn start(id: &str) -> (Self, String) {
            let registry = StatusRegistry::default();
            let n = node(id);
            let entry = registry.open(id, Some(&n), "envoy".into(), Protocol::Sotw);
            let published = snapshot(10000);
            let mut stream = SotwStream::new(Some(Arc::clone(&published)), Default::default());
            stream.handle_request(&DiscoveryRequest {
                node: Some(n),
                type_url: LDS.type_url().into(),
                ..Default::default()
            });
            assert!(stream.poll_response().is_some());
            let nonce = record!(entry, stream).pop().unwrap();
            (
                Self {
                    registry,
                    entry,
                    stream,
                    published,
                },
                nonce,
            )
        }

        fn answer(&mut self, version: &str, nonce: &str, error: Option<&str>) {
            self.stream.handle_request(&DiscoveryRequest {
                type_url: LDS.type_url().into(),
                version_info: version.into(),
                response_nonce: nonce.into(),
                error_detail: error.map(|m| RpcStatus {
                    code: 13,
                    message: m.into(),
                    details: vec![],
                }),
                ..Default::default()
            });
            record!(self.entry, self.stream);
        }

        /// Publishes a new snapshot to the stream without sending anything yet.
        fn publish(&mut self, port: u16) {
            self.published = snapshot(port);
            self.stream.handle_snapshot(Arc::clone(&self.published));
            record!(self.entry, self.stream);
        }

        /// Sends what is pending; returns the nonce.
        fn send(&mut self) -> String {
            assert!(self.stream.poll_response().is_some());
            record!(self.entry, self.stream).pop().unwrap()
        }

        fn csds(&self, req: &ClientStatusRequest) -> Result<ClientStatusResponse, CsdsError> {
            client_status(req, &self.registry.client_views(), Some(&self.published))
        }

        fn version(&self) -> String {
            self.published.get(LDS).version.clone()
        }
    }

    /// The only listener entry of the only client.
    fn listener(resp: &ClientStatusResponse) -> &GenericXdsConfig {
        assert_eq!(resp.config.len(), 1, "{resp:?}");
        let lds: Vec<_> = resp.config[0]
            .generic_xds_configs
            .iter()
            .filter(|g| g.type_url == LDS.type_url())
            .collect();
        assert_eq!(lds.len(), 1, "{resp:?}");
        lds[0]
    }

    fn status(g: &GenericXdsConfig) -> (ConfigStatus, ClientResourceStatus) {
        (
            ConfigStatus::try_from(g.config_status).unwrap(),
            ClientResourceStatus::try_from(g.client_status).unwrap(),
        )
    }

    fn all() -> ClientStatusRequest {
        ClientStatusRequest::default()
    }

    #[test]
    fn sent_and_unanswered_is_stale_then_acked_is_synced() {
        let (mut h, nonce) = Sotw::start("envoy-a");
        let v1 = h.version();
        let resp = h.csds(&all()).unwrap();
        let g = listener(&resp);
        assert_eq!(
            status(g),
            (ConfigStatus::Stale, ClientResourceStatus::Requested)
        );
        assert_eq!(g.version_info, v1);
        let c = &resp.config[0];
        let n = c.node.as_ref().unwrap();
        assert_eq!((n.id.as_str(), n.cluster.as_str()), ("envoy-a", "edge"));
        assert_eq!(n.user_agent_name, "envoy", "the Node as the client sent it");

        h.answer(&v1, &nonce, None);
        let resp = h.csds(&all()).unwrap();
        let g = listener(&resp);
        assert_eq!(
            status(g),
            (ConfigStatus::Synced, ClientResourceStatus::Acked)
        );
        assert_eq!(g.version_info, v1);
        assert!(g.error_state.is_none());
        assert!(g.last_updated.is_some());
        let any = g.xds_config.as_ref().expect("contents by default");
        assert_eq!(any.type_url, LDS.type_url());
        assert_eq!(
            g.name,
            *h.published.get(LDS).resources.keys().next().unwrap()
        );
        assert!(
            !resp.config[0]
                .generic_xds_configs
                .iter()
                .any(|g| g.type_url != LDS.type_url()),
            "only what was sent is listed"
        );
    }

    #[test]
    fn exclude_resource_contents_drops_only_the_contents() {
        let (mut h, nonce) = Sotw::start("envoy-a");
        let v1 = h.version();
        h.answer(&v1, &nonce, None);
        let resp = h
            .csds(&ClientStatusRequest {
                exclude_resource_contents: true,
                ..Default::default()
            })
            .unwrap();
        let g = listener(&resp);
        assert!(g.xds_config.is_none());
        assert_eq!(g.version_info, v1);
        assert_eq!(
            status(g),
            (ConfigStatus::Synced, ClientResourceStatus::Acked)
        );
    }

    #[test]
    fn a_newer_version_not_sent_yet_is_not_sent_then_stale() {
        let (mut h, nonce) = Sotw::start("envoy-a");
        let v1 = h.version();
        h.answer(&v1, &nonce, None);
        h.publish(10001);
        assert_ne!(h.version(), v1);
        let g = listener(&h.csds(&all()).unwrap()).clone();
        assert_eq!(
            status(&g),
            (ConfigStatus::NotSent, ClientResourceStatus::Acked)
        );
        assert_eq!(g.version_info, v1, "the client still runs the old one");
        h.send();
        let g = listener(&h.csds(&all()).unwrap()).clone();
        assert_eq!(
            status(&g),
            (ConfigStatus::Stale, ClientResourceStatus::Requested)
        );
        assert_eq!(g.version_info, h.version());
    }

    #[test]
    fn a_nack_is_an_error_with_the_rejected_version_and_reason() {
        let (mut h, nonce) = Sotw::start("envoy-a");
        let v1 = h.version();
        h.answer(&v1, &nonce, None);
        h.publish(10001);
        let v2 = h.version();
        let nonce2 = h.send();
        h.answer(&v1, &nonce2, Some("cannot bind 127.0.0.1:10001"));
        let resp = h.csds(&all()).unwrap();
        let g = listener(&resp);
        assert_eq!(
            status(g),
            (ConfigStatus::Error, ClientResourceStatus::Nacked)
        );
        assert_eq!(g.version_info, v1, "the version the client keeps running");
        let err = g.error_state.as_ref().expect("error_state");
        assert_eq!(err.version_info, v2);
        assert_eq!(err.details, "cannot bind 127.0.0.1:10001");
        assert!(err.failed_configuration.is_some());
        assert!(err.last_update_attempt.is_some());

        // Publishing the accepted version again makes the rejection history.
        h.publish(10000);
        let g = listener(&h.csds(&all()).unwrap()).clone();
        assert_eq!(
            status(&g),
            (ConfigStatus::Synced, ClientResourceStatus::Acked)
        );
        assert!(g.error_state.is_none());
    }

    fn id_matcher(p: MatchPattern) -> NodeMatcher {
        NodeMatcher {
            node_id: Some(StringMatcher {
                match_pattern: Some(p),
                ignore_case: false,
            }),
            node_metadatas: vec![],
        }
    }

    fn matching(m: Vec<NodeMatcher>) -> ClientStatusRequest {
        ClientStatusRequest {
            node_matchers: m,
            ..Default::default()
        }
    }

    #[test]
    fn node_matchers_filter_by_node_id() {
        let (h, _) = Sotw::start("envoy-a");
        let ids = |req: ClientStatusRequest| -> Vec<String> {
            h.csds(&req)
                .unwrap()
                .config
                .iter()
                .map(|c| c.node.as_ref().unwrap().id.clone())
                .collect()
        };
        let exact = |s: &str| id_matcher(MatchPattern::Exact(s.into()));
        assert_eq!(ids(matching(vec![exact("envoy-a")])), ["envoy-a"]);
        assert!(ids(matching(vec![exact("envoy-b")])).is_empty());
        assert!(ids(matching(vec![exact("envoy")])).is_empty());
        assert_eq!(
            ids(matching(vec![id_matcher(MatchPattern::Prefix(
                "envoy-".into()
            ))])),
            ["envoy-a"]
        );
        assert_eq!(
            ids(matching(vec![exact("envoy-b"), exact("envoy-a")])),
            ["envoy-a"],
            "matchers are ORed"
        );
        let mut folded = exact("ENVOY-A");
        folded.node_id.as_mut().unwrap().ignore_case = true;
        assert_eq!(ids(matching(vec![folded])), ["envoy-a"]);
        assert_eq!(ids(all()), ["envoy-a"]);
    }

    #[test]
    fn unsupported_matchers_are_refused_naming_the_field() {
        let (h, _) = Sotw::start("envoy-a");
        let regex = id_matcher(MatchPattern::SafeRegex(RegexMatcher {
            regex: "envoy-.*".into(),
            ..Default::default()
        }));
        let err = h
            .csds(&matching(vec![
                id_matcher(MatchPattern::Exact("x".into())),
                regex,
            ]))
            .unwrap_err();
        assert_eq!(
            err,
            CsdsError::UnsupportedMatcher {
                field: "node_matchers[1].node_id.safe_regex".into()
            }
        );
        let metadata = NodeMatcher {
            node_id: None,
            node_metadatas: vec![StructMatcher::default()],
        };
        let err = h.csds(&matching(vec![metadata])).unwrap_err();
        let status = Status::from(err);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(
            status.message().contains("node_matchers[0].node_metadatas"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn disconnected_clients_are_not_listed() {
        let (h, _) = Sotw::start("envoy-a");
        h.registry.close(&h.entry);
        assert!(h.csds(&all()).unwrap().config.is_empty());
    }

    #[test]
    fn delta_ack_and_nack_per_resource() {
        let registry = StatusRegistry::default();
        let entry = registry.open(
            "envoy-d",
            Some(&node("envoy-d")),
            "envoy".into(),
            Protocol::Delta,
        );
        let published = snapshot(10000);
        let mut stream = DeltaStream::new(Some(Arc::clone(&published)), Default::default());
        stream.handle_request(&DeltaDiscoveryRequest {
            node: Some(node("envoy-d")),
            type_url: LDS.type_url().into(),
            ..Default::default()
        });
        assert!(stream.poll_response().is_some());
        let nonce = record!(entry, stream).pop().unwrap();
        stream.handle_request(&DeltaDiscoveryRequest {
            type_url: LDS.type_url().into(),
            response_nonce: nonce,
            ..Default::default()
        });
        record!(entry, stream);
        let resp = client_status(&all(), &registry.client_views(), Some(&published)).unwrap();
        assert_eq!(
            status(listener(&resp)),
            (ConfigStatus::Synced, ClientResourceStatus::Acked)
        );

        let next = snapshot(10001);
        stream.handle_snapshot(Arc::clone(&next));
        assert!(stream.poll_response().is_some());
        let nonce = record!(entry, stream).pop().unwrap();
        stream.handle_request(&DeltaDiscoveryRequest {
            type_url: LDS.type_url().into(),
            response_nonce: nonce,
            error_detail: Some(RpcStatus {
                code: 13,
                message: "rejected".into(),
                details: vec![],
            }),
            ..Default::default()
        });
        record!(entry, stream);
        let resp = client_status(&all(), &registry.client_views(), Some(&next)).unwrap();
        let g = listener(&resp);
        assert_eq!(
            status(g),
            (ConfigStatus::Error, ClientResourceStatus::Nacked)
        );
        let err = g.error_state.as_ref().unwrap();
        assert_eq!(err.version_info, next.get(LDS).version);
        assert_eq!(err.details, "rejected");
        assert_eq!(g.version_info, published.get(LDS).version);
    }

    #[test]
    fn a_delta_unsubscribe_drops_the_resource() {
        const RDS: ResourceType = ResourceType::Route;
        let registry = StatusRegistry::default();
        let entry = registry.open(
            "envoy-d",
            Some(&node("envoy-d")),
            "envoy".into(),
            Protocol::Delta,
        );
        let published = snapshot(10000);
        let route = published.get(RDS).resources.keys().next().unwrap().clone();
        let mut stream = DeltaStream::new(Some(Arc::clone(&published)), Default::default());
        stream.handle_request(&DeltaDiscoveryRequest {
            node: Some(node("envoy-d")),
            type_url: RDS.type_url().into(),
            resource_names_subscribe: vec![route.clone()],
            ..Default::default()
        });
        assert!(stream.poll_response().is_some());
        let nonce = record!(entry, stream).pop().unwrap();
        stream.handle_request(&DeltaDiscoveryRequest {
            type_url: RDS.type_url().into(),
            response_nonce: nonce,
            ..Default::default()
        });
        record!(entry, stream);
        let routes = || -> Vec<(String, i32)> {
            client_status(&all(), &registry.client_views(), Some(&published))
                .unwrap()
                .config[0]
                .generic_xds_configs
                .iter()
                .filter(|g| g.type_url == RDS.type_url())
                .map(|g| (g.name.clone(), g.config_status))
                .collect()
        };
        assert_eq!(routes(), [(route.clone(), ConfigStatus::Synced as i32)]);
        stream.handle_request(&DeltaDiscoveryRequest {
            type_url: RDS.type_url().into(),
            resource_names_unsubscribe: vec![route],
            ..Default::default()
        });
        record!(entry, stream);
        assert!(routes().is_empty(), "the client no longer holds it");
    }
}
