//! CSDS over a real socket: an ADS client (the testkit's, speaking SotW as Envoy does)
//! ACKs and NACKs, and `FetchClientStatus` / `StreamClientStatus` on the same port report
//! it per resource.

use std::time::Duration;

use infermesh_proto::envoy::admin::v3::ClientResourceStatus;
use infermesh_proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use infermesh_proto::envoy::service::status::v3::client_config::GenericXdsConfig;
use infermesh_proto::envoy::service::status::v3::client_status_discovery_service_client::ClientStatusDiscoveryServiceClient;
use infermesh_proto::envoy::service::status::v3::{ClientStatusRequest, ConfigStatus};
use infermesh_proto::envoy::r#type::matcher::v3::string_matcher::MatchPattern;
use infermesh_proto::envoy::r#type::matcher::v3::{NodeMatcher, RegexMatcher, StringMatcher};
use infermesh_proto::google::rpc::Status as RpcStatus;
use infermesh_testkit::ads;
use infermesh_xds::{InferencePoolSpec, ResourceType, XdsConfig, XdsInput, XdsServer};
use tonic::Streaming;
use tonic::transport::Channel;

const WAIT: Duration = Duration::from_secs(10);
const LDS: ResourceType = ResourceType::Listener;

fn input(port: u16) -> XdsInput {
    XdsInput {
        pools: vec![InferencePoolSpec::new(
            "p",
            ([127, 0, 0, 1], port).into(),
            vec![8000],
        )],
        ext_proc_endpoints: vec!["127.0.0.1:9002".parse().unwrap()],
        grpc_services: vec![],
    }
}

async fn next(inbound: &mut Streaming<DiscoveryResponse>) -> DiscoveryResponse {
    tokio::time::timeout(WAIT, inbound.message())
        .await
        .expect("a response in time")
        .unwrap()
        .unwrap()
}

fn answer(resp: &DiscoveryResponse, version: &str, error: Option<&str>) -> DiscoveryRequest {
    DiscoveryRequest {
        type_url: LDS.type_url().into(),
        version_info: version.into(),
        response_nonce: resp.nonce.clone(),
        error_detail: error.map(|m| RpcStatus {
            code: 13,
            message: m.into(),
            details: vec![],
        }),
        ..Default::default()
    }
}

/// Polls CSDS until `node_id`'s listener entry satisfies `ok`.
async fn wait_listener(
    csds: &mut ClientStatusDiscoveryServiceClient<Channel>,
    node_id: &str,
    ok: impl Fn(&GenericXdsConfig) -> bool,
) -> GenericXdsConfig {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let resp = csds
            .fetch_client_status(ClientStatusRequest::default())
            .await
            .unwrap()
            .into_inner();
        let found = resp
            .config
            .iter()
            .filter(|c| c.node.as_ref().is_some_and(|n| n.id == node_id))
            .flat_map(|c| &c.generic_xds_configs)
            .find(|g| g.type_url == LDS.type_url() && ok(g))
            .cloned();
        if let Some(g) = found {
            return g;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "listener of {node_id} never matched; last answer {resp:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn is(c: ConfigStatus, s: ClientResourceStatus) -> impl Fn(&GenericXdsConfig) -> bool {
    move |g| g.config_status == c as i32 && g.client_status == s as i32
}

fn exact(id: &str) -> NodeMatcher {
    NodeMatcher {
        node_id: Some(StringMatcher {
            match_pattern: Some(MatchPattern::Exact(id.into())),
            ignore_case: false,
        }),
        node_metadatas: vec![],
    }
}

#[tokio::test]
async fn csds_reports_acks_and_nacks_over_grpc() {
    let server = XdsServer::new(XdsConfig {
        debounce: Duration::ZERO,
        ..Default::default()
    })
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let s = server.clone();
    tokio::spawn(async move { s.serve(listener, std::future::pending()).await });
    server.publish(&input(10000)).unwrap();

    let mut client = ads::connect(addr).await.unwrap();
    let (tx, mut inbound) = ads::subscribe(&mut client, "csds-envoy", LDS)
        .await
        .unwrap();
    let first = next(&mut inbound).await;
    let mut csds = ClientStatusDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    // ACK: synced, with the listener as sent.
    tx.send(answer(&first, &first.version_info, None))
        .await
        .unwrap();
    let g = wait_listener(
        &mut csds,
        "csds-envoy",
        is(ConfigStatus::Synced, ClientResourceStatus::Acked),
    )
    .await;
    assert_eq!(g.version_info, first.version_info);
    assert_eq!(g.xds_config.as_ref(), first.resources.first());

    // Node matchers select by node id.
    let only = |id: &str| ClientStatusRequest {
        node_matchers: vec![exact(id)],
        ..Default::default()
    };
    let mine = csds.fetch_client_status(only("csds-envoy")).await.unwrap();
    assert_eq!(mine.into_inner().config.len(), 1);
    let other = csds
        .fetch_client_status(only("someone-else"))
        .await
        .unwrap();
    assert!(other.into_inner().config.is_empty());
    let regex = NodeMatcher {
        node_id: Some(StringMatcher {
            match_pattern: Some(MatchPattern::SafeRegex(RegexMatcher {
                regex: ".*".into(),
                ..Default::default()
            })),
            ignore_case: false,
        }),
        node_metadatas: vec![],
    };
    let refused = csds
        .fetch_client_status(ClientStatusRequest {
            node_matchers: vec![regex],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(
        refused
            .message()
            .contains("node_matchers[0].node_id.safe_regex"),
        "{refused:?}"
    );

    // A new listener the client rejects: ERROR, with the rejected version and reason, and
    // the accepted version still reported as what the client runs.
    server.publish(&input(10001)).unwrap();
    let second = next(&mut inbound).await;
    assert_ne!(second.version_info, first.version_info);
    tx.send(answer(&second, &first.version_info, Some("cannot bind")))
        .await
        .unwrap();
    let g = wait_listener(
        &mut csds,
        "csds-envoy",
        is(ConfigStatus::Error, ClientResourceStatus::Nacked),
    )
    .await;
    let err = g.error_state.as_ref().expect("error_state");
    assert_eq!(err.version_info, second.version_info);
    assert_eq!(err.details, "cannot bind");
    assert_eq!(g.version_info, first.version_info);

    // The streaming call answers each request.
    let (req_tx, req_rx) = tokio::sync::mpsc::channel(2);
    let mut answers = csds
        .stream_client_status(tokio_stream::wrappers::ReceiverStream::new(req_rx))
        .await
        .unwrap()
        .into_inner();
    for id in ["csds-envoy", "someone-else"] {
        req_tx.send(only(id)).await.unwrap();
        let resp = tokio::time::timeout(WAIT, answers.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(resp.config.len(), usize::from(id == "csds-envoy"), "{id}");
    }

    // A client that goes away is no longer reported.
    drop(tx);
    drop(inbound);
    let deadline = tokio::time::Instant::now() + WAIT;
    while !csds
        .fetch_client_status(ClientStatusRequest::default())
        .await
        .unwrap()
        .into_inner()
        .config
        .is_empty()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "client still listed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
