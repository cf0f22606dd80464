//! The routing policy request handlers read: the scheduler built from the
//! EndpointPickerConfig. Held in an [`ArcSwap`] so a later policy source (Raft) can
//! replace it without a restart; each request keeps the snapshot it started with.

use std::sync::Arc;

use arc_swap::ArcSwap;
use infermesh_scheduler::{ConfigError, ResolvedConfig, Scheduler};

/// One immutable policy snapshot.
#[derive(Debug)]
pub struct Policy {
    /// The scheduler for the current EndpointPickerConfig.
    pub scheduler: Arc<Scheduler>,
}

impl Policy {
    /// Builds the scheduler for a resolved config.
    pub fn new(cfg: &ResolvedConfig) -> Result<Policy, Box<ConfigError>> {
        Ok(Policy {
            scheduler: Arc::new(Scheduler::new(cfg).map_err(Box::new)?),
        })
    }
}

/// The shared handle to the current policy.
pub type SharedPolicy = Arc<ArcSwap<Policy>>;
