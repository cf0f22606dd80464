//! `infermesh xds status --xds ADDR`: asks nodes over CSDS (Envoy's
//! `ClientStatusDiscoveryService`, on their ADS gRPC port) what each connected Envoy was
//! sent, accepted and rejected, and renders one table row per Envoy and type.

use std::fmt::Write as _;
use std::time::Duration;

use infermesh_proto::envoy::admin::v3::ClientResourceStatus;
use infermesh_proto::envoy::service::status::v3::client_status_discovery_service_client::ClientStatusDiscoveryServiceClient;
use infermesh_proto::envoy::service::status::v3::{
    ClientStatusRequest, ClientStatusResponse, ConfigStatus,
};
use infermesh_xds::ResourceType;
use serde::Serialize;

/// How long one node may take to connect and answer.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Why a node's CSDS could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CsdsFetchError {
    /// The address is not a usable gRPC endpoint.
    #[error("bad address {addr}: {source}")]
    Address {
        /// The address given.
        addr: String,
        /// Why it was refused.
        source: tonic::transport::Error,
    },
    /// The connection failed.
    #[error("cannot connect: {0}")]
    Connect(#[source] tonic::transport::Error),
    /// The node refused or failed the call.
    #[error("FetchClientStatus failed: {0}")]
    Call(#[source] tonic::Status),
    /// The node took longer than the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Calls `FetchClientStatus` (every client, contents excluded) on the node at `addr`
/// (`HOST:PORT` or `http://HOST:PORT`, plaintext gRPC).
pub async fn fetch(addr: &str) -> Result<ClientStatusResponse, CsdsFetchError> {
    let uri = if addr.contains("://") {
        addr.to_owned()
    } else {
        format!("http://{addr}")
    };
    let endpoint = tonic::transport::Endpoint::from_shared(uri)
        .map_err(|source| CsdsFetchError::Address {
            addr: addr.to_owned(),
            source,
        })?
        .connect_timeout(TIMEOUT)
        .timeout(TIMEOUT);
    let call = async {
        let channel = endpoint.connect().await.map_err(CsdsFetchError::Connect)?;
        let mut client = ClientStatusDiscoveryServiceClient::new(channel);
        let req = ClientStatusRequest {
            exclude_resource_contents: true,
            ..Default::default()
        };
        client
            .fetch_client_status(req)
            .await
            .map(tonic::Response::into_inner)
            .map_err(CsdsFetchError::Call)
    };
    tokio::time::timeout(TIMEOUT, call)
        .await
        .map_err(|_| CsdsFetchError::Timeout(TIMEOUT))?
}

/// One Envoy's state for one type on one node, summarised over its resources.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TypeRow {
    /// The node asked.
    pub server: String,
    /// The Envoy's node id.
    pub node_id: String,
    /// The Envoy's node cluster.
    pub cluster: String,
    /// `CDS`, `EDS`, `LDS` or `RDS` (or the type URL of anything else).
    #[serde(rename = "type")]
    pub ty: String,
    /// Resources of the type the Envoy was sent.
    pub resources: usize,
    /// The version most recently sent or accepted.
    pub version: String,
    /// The worst server-side status: `ERROR`, `STALE`, `NOT_SENT`, then `SYNCED`.
    pub config_status: String,
    /// The worst client status: `NACKED`, `REQUESTED`, then `ACKED`.
    pub client_status: String,
    /// The latest rejection: rejected version and the Envoy's reason.
    pub error: Option<String>,
}

fn severity(c: ConfigStatus) -> u8 {
    match c {
        ConfigStatus::Error => 4,
        ConfigStatus::Stale => 3,
        ConfigStatus::NotSent => 2,
        ConfigStatus::Unknown => 1,
        ConfigStatus::Synced => 0,
    }
}

fn client_severity(c: ClientResourceStatus) -> u8 {
    match c {
        ClientResourceStatus::Nacked | ClientResourceStatus::ReceivedError => 4,
        ClientResourceStatus::Timeout | ClientResourceStatus::DoesNotExist => 3,
        ClientResourceStatus::Requested => 2,
        ClientResourceStatus::Unknown => 1,
        ClientResourceStatus::Acked => 0,
    }
}

/// Summarises one node's answer into rows, in push order per Envoy.
pub fn rows(server: &str, resp: &ClientStatusResponse) -> Vec<TypeRow> {
    let mut out = Vec::new();
    for c in &resp.config {
        let (node_id, cluster) = c
            .node
            .as_ref()
            .map(|n| (n.id.clone(), n.cluster.clone()))
            .unwrap_or_default();
        let mut urls: Vec<&str> = Vec::new();
        for g in &c.generic_xds_configs {
            if !urls.contains(&g.type_url.as_str()) {
                urls.push(&g.type_url);
            }
        }
        urls.sort_by_key(|u| ResourceType::from_type_url(u).map_or(usize::MAX, |t| t.index()));
        for url in urls {
            let items: Vec<_> = c
                .generic_xds_configs
                .iter()
                .filter(|g| g.type_url == url)
                .collect();
            let latest = items
                .iter()
                .max_by_key(|g| g.last_updated.as_ref().map(|t| (t.seconds, t.nanos)));
            let config = items
                .iter()
                .map(|g| ConfigStatus::try_from(g.config_status).unwrap_or(ConfigStatus::Unknown))
                .max_by_key(|c| severity(*c))
                .unwrap_or(ConfigStatus::Unknown);
            let client = items
                .iter()
                .map(|g| {
                    ClientResourceStatus::try_from(g.client_status)
                        .unwrap_or(ClientResourceStatus::Unknown)
                })
                .max_by_key(|c| client_severity(*c))
                .unwrap_or(ClientResourceStatus::Unknown);
            let error = items
                .iter()
                .filter_map(|g| g.error_state.as_ref())
                .max_by_key(|e| e.last_update_attempt.as_ref().map(|t| (t.seconds, t.nanos)))
                .map(|e| format!("{}: {}", e.version_info, e.details));
            out.push(TypeRow {
                server: server.to_owned(),
                node_id: node_id.clone(),
                cluster: cluster.clone(),
                ty: ResourceType::from_type_url(url)
                    .map_or_else(|| url.to_owned(), |t| t.short_name().to_owned()),
                resources: items.len(),
                version: latest.map(|g| g.version_info.clone()).unwrap_or_default(),
                config_status: config.as_str_name().to_owned(),
                client_status: client
                    .as_str_name()
                    .trim_start_matches("CLIENT_")
                    .to_owned(),
                error,
            });
        }
    }
    out
}

/// Renders rows as a table; a node with no Envoy gets a line saying so.
pub fn render_table(servers: &[(String, Vec<TypeRow>)]) -> String {
    let mut table = vec![
        [
            "SERVER",
            "ENVOY",
            "CLUSTER",
            "TYPE",
            "RESOURCES",
            "VERSION",
            "STATUS",
            "CLIENT",
            "ERROR",
        ]
        .map(String::from),
    ];
    let mut out = String::new();
    for (server, rows) in servers {
        if rows.is_empty() {
            let _ = writeln!(out, "{server}: no Envoy or gRPC client is connected");
        }
        for r in rows {
            let error = r.error.as_deref().map_or_else(
                || "-".to_owned(),
                |e| e.chars().take(100).collect::<String>(),
            );
            let empty = |s: &str| {
                if s.is_empty() {
                    "-".to_owned()
                } else {
                    s.to_owned()
                }
            };
            table.push([
                r.server.clone(),
                r.node_id.clone(),
                empty(&r.cluster),
                r.ty.clone(),
                r.resources.to_string(),
                empty(&r.version),
                r.config_status.clone(),
                r.client_status.clone(),
                error,
            ]);
        }
    }
    if table.len() == 1 {
        return out;
    }
    super::status::write_aligned(&table, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use infermesh_proto::envoy::admin::v3::UpdateFailureState;
    use infermesh_proto::envoy::config::core::v3::Node;
    use infermesh_proto::envoy::service::status::v3::ClientConfig;
    use infermesh_proto::envoy::service::status::v3::client_config::GenericXdsConfig;

    use super::*;

    fn g(
        ty: ResourceType,
        name: &str,
        v: &str,
        c: ConfigStatus,
        s: ClientResourceStatus,
    ) -> GenericXdsConfig {
        GenericXdsConfig {
            type_url: ty.type_url().into(),
            name: name.into(),
            version_info: v.into(),
            config_status: c as i32,
            client_status: s as i32,
            ..Default::default()
        }
    }

    #[test]
    fn one_row_per_envoy_and_type_with_the_worst_status() {
        let mut nacked = g(
            ResourceType::Listener,
            "busy",
            "",
            ConfigStatus::Error,
            ClientResourceStatus::Nacked,
        );
        nacked.error_state = Some(UpdateFailureState {
            version_info: "l2".into(),
            details: "cannot bind 127.0.0.1:1".into(),
            ..Default::default()
        });
        let resp = ClientStatusResponse {
            config: vec![ClientConfig {
                node: Some(Node {
                    id: "envoy-1".into(),
                    cluster: "edge".into(),
                    ..Default::default()
                }),
                generic_xds_configs: vec![
                    nacked,
                    g(
                        ResourceType::Listener,
                        "p",
                        "l1",
                        ConfigStatus::Synced,
                        ClientResourceStatus::Acked,
                    ),
                    g(
                        ResourceType::Cluster,
                        "c",
                        "c1",
                        ConfigStatus::Synced,
                        ClientResourceStatus::Acked,
                    ),
                ],
                ..Default::default()
            }],
        };
        let rows = rows("127.0.0.1:9002", &resp);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].ty, "CDS", "push order");
        assert_eq!(rows[0].config_status, "SYNCED");
        assert_eq!(rows[0].client_status, "ACKED");
        let lds = &rows[1];
        assert_eq!((lds.ty.as_str(), lds.resources), ("LDS", 2));
        assert_eq!(lds.config_status, "ERROR");
        assert_eq!(lds.client_status, "NACKED");
        assert_eq!(lds.error.as_deref(), Some("l2: cannot bind 127.0.0.1:1"));
        let t = render_table(&[
            ("127.0.0.1:9002".into(), rows),
            ("127.0.0.1:9003".into(), vec![]),
        ]);
        let row = t.lines().find(|l| l.contains(" LDS ")).unwrap();
        for cell in [
            "127.0.0.1:9002",
            "envoy-1",
            "edge",
            "ERROR",
            "NACKED",
            "l2: cannot bind",
        ] {
            assert!(row.contains(cell), "{cell} missing in {row}");
        }
        assert!(t.contains("127.0.0.1:9003: no Envoy"), "{t}");
    }
}
