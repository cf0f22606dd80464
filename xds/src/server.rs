//! [`XdsServer`]: validates, translates and publishes inputs (debounced), hands out the
//! ADS and CSDS services, and answers sync-status queries.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use infermesh_proto::envoy::service::status::v3::client_status_discovery_service_server::ClientStatusDiscoveryServiceServer;
use infermesh_proto::envoy::service::status::v3::{ClientStatusRequest, ClientStatusResponse};

use crate::config::{InvalidXdsConfig, XdsConfig};
use crate::csds::{CsdsError, CsdsService};
use crate::error::PublishError;
use crate::input::XdsInput;
use crate::resource_type::ResourceType;
use crate::service::AdsService;
use crate::shared::Shared;
use crate::snapshot::Snapshot;
use crate::status::{StatusRegistry, SyncStatus};
use crate::translate::translate;

/// What a successful [`XdsServer::publish`] produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PublishReceipt {
    /// Version of each type in the new snapshot, in push order.
    pub versions: Vec<(ResourceType, String)>,
}

/// The xDS server of one infermesh node. Cheap to clone; all clones share one cache.
#[derive(Debug, Clone)]
pub struct XdsServer {
    shared: Arc<Shared>,
}

impl XdsServer {
    /// Creates the server and starts its debounce task on the current tokio runtime.
    /// Nothing is served until the first [`publish`](Self::publish).
    pub fn new(config: XdsConfig) -> Result<Self, InvalidXdsConfig> {
        config.validate()?;
        let (pending, pending_rx) = watch::channel(None);
        let (current, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            config,
            registry: StatusRegistry::default(),
            pending,
            current,
            closing: watch::channel(false).0,
        });
        tokio::spawn(debounce(
            Arc::downgrade(&shared),
            pending_rx,
            shared.config.debounce,
        ));
        Ok(Self { shared })
    }

    /// Validates `input`, translates it, checks the result for consistency and queues it
    /// for publishing after the debounce window. On error nothing changes.
    pub fn publish(&self, input: &XdsInput) -> Result<PublishReceipt, PublishError> {
        input.validate()?;
        let snapshot = Snapshot::build(&translate(input, &self.shared.config))?;
        let receipt = PublishReceipt {
            versions: ResourceType::ALL
                .into_iter()
                .zip(snapshot.versions())
                .collect(),
        };
        self.shared.pending.send_replace(Some(Arc::new(snapshot)));
        Ok(receipt)
    }

    /// The ADS service, to add to a tonic server.
    pub fn service(&self) -> AdsService {
        AdsService::new(Arc::clone(&self.shared))
    }

    /// The CSDS service (`envoy.service.status.v3.ClientStatusDiscoveryService`), to add
    /// to the same tonic server as [`service`](Self::service).
    pub fn csds_service(&self) -> ClientStatusDiscoveryServiceServer<CsdsService> {
        CsdsService::new(Arc::clone(&self.shared)).into_server()
    }

    /// What CSDS answers `req` now (for callers in the same process).
    pub fn client_status(
        &self,
        req: &ClientStatusRequest,
    ) -> Result<ClientStatusResponse, CsdsError> {
        CsdsService::new(Arc::clone(&self.shared)).answer(req)
    }

    /// The snapshot being served (after debouncing), if any.
    pub fn current(&self) -> Option<Arc<Snapshot>> {
        self.shared.current.borrow().clone()
    }

    /// A receiver that sees every snapshot as it starts being served.
    pub fn watch(&self) -> watch::Receiver<Option<Arc<Snapshot>>> {
        self.shared.subscribe()
    }

    /// Ends every open ADS stream (and refuses new ones) so clients reconnect to another
    /// node; call it when the node starts draining, before stopping its gRPC server.
    pub fn close_streams(&self) {
        self.shared.closing.send_replace(true);
    }

    /// Per-client sync status against the snapshot being served.
    pub fn sync_status(&self) -> SyncStatus {
        let current = self.current();
        self.shared.registry.status(current.as_deref())
    }

    /// Serves ADS alone on `listener` until `shutdown` completes (tests, benchmarks, and
    /// nodes that give xDS its own port).
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), tonic::transport::Error> {
        // Envoy's ADS cluster health-checks this name (see `bootstrap`).
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status(
                crate::bootstrap::ADS_HEALTH_SERVICE,
                tonic_health::ServingStatus::Serving,
            )
            .await;
        tonic::transport::Server::builder()
            // Notice Envoys that vanished without closing their connection.
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .add_service(health)
            .add_service(self.service())
            .add_service(self.csds_service())
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                shutdown,
            )
            .await
    }
}

/// Coalesces publishes: after the first change, waits `window`, then serves the latest
/// snapshot if its versions differ from what is served.
async fn debounce(
    shared: std::sync::Weak<Shared>,
    mut pending: watch::Receiver<Option<Arc<Snapshot>>>,
    window: Duration,
) {
    while pending.changed().await.is_ok() {
        if !window.is_zero() {
            tokio::time::sleep(window).await;
        }
        let Some(next) = pending.borrow_and_update().clone() else {
            continue;
        };
        let Some(shared) = shared.upgrade() else {
            return;
        };
        shared.current.send_if_modified(|cur| {
            if cur.as_ref().is_some_and(|c| c.same_versions(&next)) {
                return false;
            }
            *cur = Some(next);
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::InvalidInput;
    use crate::input::InferencePoolSpec;

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

    fn server(debounce: Duration) -> XdsServer {
        XdsServer::new(XdsConfig {
            debounce,
            ..Default::default()
        })
        .unwrap()
    }

    async fn wait_served(s: &XdsServer, versions: &[(ResourceType, String)]) {
        let mut rx = s.watch();
        loop {
            if let Some(cur) = rx.borrow_and_update().clone()
                && versions.iter().all(|(t, v)| &cur.get(*t).version == v)
            {
                return;
            }
            rx.changed().await.unwrap();
        }
    }

    #[tokio::test]
    async fn publishes_within_a_window_are_coalesced() {
        let s = server(Duration::from_millis(300));
        let mut rx = s.watch();
        assert!(
            s.current().is_none(),
            "nothing is served before the first publish"
        );
        s.publish(&input(10000)).unwrap();
        let last = s.publish(&input(10001)).unwrap();
        rx.changed().await.unwrap();
        let served = rx.borrow_and_update().clone().unwrap();
        assert_eq!(
            served.get(ResourceType::Listener).version,
            last.versions[ResourceType::Listener.index()].1,
            "only the latest publish of the window is served"
        );
        let next = s.publish(&input(10002)).unwrap();
        wait_served(&s, &next.versions).await;
    }

    #[tokio::test]
    async fn a_refused_input_changes_nothing() {
        let s = server(Duration::ZERO);
        let ok = s.publish(&input(10000)).unwrap();
        wait_served(&s, &ok.versions).await;
        let mut bad = input(10000);
        bad.pools[0].target_ports.clear();
        assert!(matches!(
            s.publish(&bad),
            Err(PublishError::Invalid(InvalidInput::TargetPorts { .. }))
        ));
        let cur = s.current().unwrap();
        for (t, v) in &ok.versions {
            assert_eq!(&cur.get(*t).version, v);
        }
        let status = s.sync_status();
        assert!(status.envoys.is_empty());
        assert_eq!(status.versions.unwrap(), ok.versions);
    }

    #[test]
    fn bad_config_is_refused_before_anything_starts() {
        let cfg = XdsConfig {
            ext_proc_cluster: "a/b".into(),
            ..Default::default()
        };
        assert!(matches!(
            XdsServer::new(cfg),
            Err(InvalidXdsConfig::ClusterName(_))
        ));
    }
}
