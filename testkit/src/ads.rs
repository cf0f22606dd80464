//! ADS from the client side: open a stream the way Envoy does, and read what an xDS
//! server reports about one Envoy.

use std::net::SocketAddr;

use infermesh_proto::envoy::config::core::v3::Node;
use infermesh_proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use infermesh_proto::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use infermesh_xds::{EnvoySyncStatus, ResourceType, XdsServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

/// A tonic ADS client.
pub type AdsClient = AggregatedDiscoveryServiceClient<Channel>;

/// Connects an ADS client to `addr`.
pub async fn connect(addr: SocketAddr) -> anyhow::Result<AdsClient> {
    Ok(AggregatedDiscoveryServiceClient::connect(format!("http://{addr}")).await?)
}

/// Opens a SotW ADS stream as `node_id` whose first request subscribes to `ty`; returns
/// the sender for later requests (the stream ends when it is dropped) and the responses.
pub async fn subscribe(
    client: &mut AdsClient,
    node_id: &str,
    ty: ResourceType,
) -> anyhow::Result<(mpsc::Sender<DiscoveryRequest>, Streaming<DiscoveryResponse>)> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(DiscoveryRequest {
        node: Some(Node {
            id: node_id.into(),
            ..Default::default()
        }),
        type_url: ty.type_url().into(),
        ..Default::default()
    })
    .await?;
    let inbound = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, inbound))
}

/// What `server` reports about the Envoy named `node_id`, if it has seen it.
pub fn status_of(server: &XdsServer, node_id: &str) -> Option<EnvoySyncStatus> {
    server
        .sync_status()
        .envoys
        .into_iter()
        .find(|e| e.node_id == node_id)
}

/// The Envoy `node_id` has a stream to `server`, subscribes to all four types and holds
/// everything `server` serves.
pub fn in_sync(server: &XdsServer, node_id: &str) -> bool {
    status_of(server, node_id).is_some_and(|s| {
        s.connected_streams > 0
            && s.types.iter().filter(|t| t.subscribed).count() == 4
            && s.types.iter().all(|t| t.in_sync)
    })
}
