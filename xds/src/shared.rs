//! The state one ADS server shares with its streams: the snapshot they serve, the
//! debounce queue, the per-Envoy status registry and the drain signal. Its own module so
//! the server (which publishes) and the service (which serves) both depend on it and not
//! on each other.

use std::sync::Arc;

use tokio::sync::watch;

use crate::config::XdsConfig;
use crate::snapshot::Snapshot;
use crate::status::StatusRegistry;

/// State shared by the server handle, the debounce task and every stream.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: XdsConfig,
    pub(crate) registry: StatusRegistry,
    /// Validated snapshots waiting out the debounce window (latest wins).
    pub(crate) pending: watch::Sender<Option<Arc<Snapshot>>>,
    /// The snapshot streams serve.
    pub(crate) current: watch::Sender<Option<Arc<Snapshot>>>,
    /// Set when the node drains: every stream ends so its client reconnects elsewhere.
    pub(crate) closing: watch::Sender<bool>,
}

impl Shared {
    pub(crate) fn registry(&self) -> &StatusRegistry {
        &self.registry
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<Option<Arc<Snapshot>>> {
        self.current.subscribe()
    }

    pub(crate) fn closing(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }
}
