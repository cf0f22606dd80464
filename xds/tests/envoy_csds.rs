//! CSDS against a real Envoy 1.40 (SotW and Delta): once Envoy holds everything, every
//! resource it was sent is SYNCED/ACKED; a listener it cannot bind is ERROR/NACKED with
//! Envoy's reason while the rest stays SYNCED; fixing the input clears the error.
//!
//! Needs Envoy: `$ENVOY_BIN` or `<workspace>/.venv-test` (scripts/setup-test-deps.sh).

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use infermesh_proto::envoy::admin::v3::ClientResourceStatus;
use infermesh_proto::envoy::service::status::v3::client_status_discovery_service_client::ClientStatusDiscoveryServiceClient;
use infermesh_proto::envoy::service::status::v3::{
    ClientConfig, ClientStatusRequest, ConfigStatus,
};
use infermesh_testkit::ads::in_sync;
use infermesh_testkit::envoy::Envoy;
use infermesh_testkit::{block_on, free_port, wait_for};
use infermesh_xds::{InferencePoolSpec, ResourceType, XdsInput};
use support::{PickerNode, XdsNode, start_backend};

const WAIT: Duration = Duration::from_secs(30);

fn pool(name: &str, port: u16, backend: SocketAddr) -> InferencePoolSpec {
    let mut p = InferencePoolSpec::new(name, ([127, 0, 0, 1], port).into(), vec![backend.port()]);
    p.name = name.into();
    p
}

/// What the node's CSDS says about `node_id`.
async fn client_config(addr: SocketAddr, node_id: &str) -> Option<ClientConfig> {
    let mut csds = ClientStatusDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .ok()?;
    let resp = csds
        .fetch_client_status(ClientStatusRequest::default())
        .await
        .ok()?
        .into_inner();
    resp.config
        .into_iter()
        .find(|c| c.node.as_ref().is_some_and(|n| n.id == node_id))
}

fn all_synced(c: &ClientConfig) -> bool {
    let types: std::collections::BTreeSet<&str> = c
        .generic_xds_configs
        .iter()
        .map(|g| g.type_url.as_str())
        .collect();
    types.len() == 4
        && c.generic_xds_configs.iter().all(|g| {
            g.config_status == ConfigStatus::Synced as i32
                && g.client_status == ClientResourceStatus::Acked as i32
                && g.error_state.is_none()
        })
}

async fn scenario(api_type: &str) {
    let node_id = format!("csds-{}", api_type.to_ascii_lowercase());
    let backend = start_backend("backend").await;
    let picker = PickerNode::start("picker", backend).await;
    let node = XdsNode::start().await;
    let good = XdsInput {
        pools: vec![pool("llama", free_port(), backend)],
        ext_proc_endpoints: vec![picker.addr],
        grpc_services: vec![],
    };
    node.server.publish(&good).unwrap();
    let envoy = Envoy::start(&node_id, api_type, &[node.addr])
        .await
        .expect("envoy");
    wait_for("Envoy in sync", WAIT, || async {
        in_sync(&node.server, &node_id).then_some(())
    })
    .await;
    let c = wait_for("CSDS: every resource SYNCED", WAIT, || async {
        client_config(node.addr, &node_id).await.filter(all_synced)
    })
    .await;
    let node_proto = c.node.as_ref().unwrap();
    assert!(
        node_proto.user_agent_name.contains("envoy"),
        "the Node as Envoy sent it: {node_proto:?}"
    );
    let served = node.server.current().unwrap();
    for g in &c.generic_xds_configs {
        let ty = ResourceType::from_type_url(&g.type_url).unwrap();
        assert_eq!(g.version_info, served.get(ty).version, "{}", g.name);
        assert!(served.get(ty).resources.contains_key(&g.name), "{}", g.name);
        assert_eq!(
            g.xds_config.as_ref().map(|a| a.type_url.as_str()),
            Some(g.type_url.as_str())
        );
    }

    // A listener on a port already taken: Envoy NACKs it.
    let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut bad = good.clone();
    bad.pools
        .push(pool("busy", taken.local_addr().unwrap().port(), backend));
    node.server.publish(&bad).unwrap();
    let c = wait_for("CSDS: the busy listener in ERROR", WAIT, || async {
        let c = client_config(node.addr, &node_id).await?;
        c.generic_xds_configs
            .iter()
            .any(|g| {
                g.type_url == ResourceType::Listener.type_url()
                    && g.name.contains("busy")
                    && g.config_status == ConfigStatus::Error as i32
            })
            .then_some(c)
    })
    .await;
    let lds: Vec<_> = c
        .generic_xds_configs
        .iter()
        .filter(|g| g.type_url == ResourceType::Listener.type_url())
        .collect();
    let busy = lds.iter().find(|g| g.name.contains("busy")).unwrap();
    assert_eq!(busy.client_status, ClientResourceStatus::Nacked as i32);
    let err = busy.error_state.as_ref().expect("error_state");
    assert!(!err.details.is_empty(), "Envoy's reason");
    assert_eq!(
        err.version_info,
        node.server
            .current()
            .unwrap()
            .get(ResourceType::Listener)
            .version
    );
    let llama = lds.iter().find(|g| g.name.contains("llama")).unwrap();
    assert_eq!(
        (llama.config_status, llama.client_status),
        (
            ConfigStatus::Synced as i32,
            ClientResourceStatus::Acked as i32
        ),
        "the listener Envoy accepted stays in sync: {llama:?}"
    );

    // The fix: everything SYNCED again, no error left.
    drop(taken);
    node.server.publish(&good).unwrap();
    wait_for(
        "CSDS: every resource SYNCED after the fix",
        WAIT,
        || async {
            client_config(node.addr, &node_id).await.filter(|c| {
                all_synced(c)
                    && !c
                        .generic_xds_configs
                        .iter()
                        .any(|g| g.name.contains("busy"))
            })
        },
    )
    .await;
    drop(envoy);
}

#[test]
fn envoy_sotw_csds() {
    block_on(scenario("GRPC"));
}

#[test]
fn envoy_delta_csds() {
    block_on(scenario("DELTA_GRPC"));
}
