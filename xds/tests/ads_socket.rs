//! The ADS service over a real socket with a tonic client: responses decode as
//! `DiscoveryResponse`, status tracks the stream, and draining ends every stream.

use std::time::Duration;

use infermesh_proto::envoy::service::discovery::v3::DiscoveryRequest;
use infermesh_testkit::ads;
use infermesh_xds::{InferencePoolSpec, ResourceType, XdsConfig, XdsInput, XdsServer};
use tokio_stream::wrappers::ReceiverStream;

#[tokio::test]
async fn drain_ends_streams_and_refuses_new_ones() {
    let server = XdsServer::new(XdsConfig::default()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let s = server.clone();
    tokio::spawn(async move { s.serve(listener, std::future::pending()).await });
    server
        .publish(&XdsInput {
            pools: vec![InferencePoolSpec::new(
                "p",
                "127.0.0.1:10000".parse().unwrap(),
                vec![8000],
            )],
            ext_proc_endpoints: vec!["127.0.0.1:9002".parse().unwrap()],
            grpc_services: vec![],
        })
        .unwrap();

    let mut client = ads::connect(addr).await.unwrap();
    let (tx, mut inbound) = ads::subscribe(&mut client, "socket-test", ResourceType::Listener)
        .await
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), inbound.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(resp.resources.len(), 1);
    assert_eq!(
        resp.version_info,
        server
            .current()
            .unwrap()
            .get(ResourceType::Listener)
            .version
    );
    let status = server.sync_status();
    assert_eq!(status.envoys[0].connected_streams, 1);

    server.close_streams();
    let end = tokio::time::timeout(Duration::from_secs(10), inbound.message())
        .await
        .expect("the stream ends when the node drains");
    assert!(matches!(end, Ok(None)), "{end:?}");
    let (_tx2, rx2) = tokio::sync::mpsc::channel::<DiscoveryRequest>(1);
    let refused = client
        .stream_aggregated_resources(ReceiverStream::new(rx2))
        .await;
    assert_eq!(refused.unwrap_err().code(), tonic::Code::Unavailable);
    drop(tx);
    // The registration goes when the stream does.
    for _ in 0..200 {
        if server.sync_status().envoys[0].connected_streams == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("stream still registered after draining");
}
