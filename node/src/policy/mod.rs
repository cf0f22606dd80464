//! The routing policy request handlers read: the scheduler built from the
//! EndpointPickerConfig. Held in an [`ArcSwap`] so a later policy source (Raft) can
//! replace it without a restart; each request keeps the snapshot it started with.

use std::sync::Arc;

use arc_swap::ArcSwap;
use infermesh_scheduler::{ConfigError, ResolvedConfig, Scheduler};

pub mod derive;
pub mod rewrite;

use rewrite::ModelRewrites;

/// One immutable policy snapshot.
#[derive(Debug)]
pub struct Policy {
    /// The scheduler for the current EndpointPickerConfig.
    pub scheduler: Arc<Scheduler>,
    /// Model rewrites (InferenceModelRewrite) in force: `rewrites.target(model, rng)` gives
    /// the model a request is sent as. Swapped together with the scheduler.
    pub rewrites: Arc<ModelRewrites>,
}

impl Policy {
    /// Builds the scheduler for a resolved config (no model rewrites).
    pub fn new(cfg: &ResolvedConfig) -> Result<Policy, Box<ConfigError>> {
        Ok(Policy {
            scheduler: Arc::new(Scheduler::new(cfg).map_err(Box::new)?),
            rewrites: Arc::new(ModelRewrites::default()),
        })
    }

    /// The same scheduler with other model rewrites.
    pub fn with_rewrites(&self, rewrites: Arc<ModelRewrites>) -> Policy {
        Policy {
            scheduler: self.scheduler.clone(),
            rewrites,
        }
    }
}

/// The shared handle to the current policy.
pub type SharedPolicy = Arc<ArcSwap<Policy>>;
