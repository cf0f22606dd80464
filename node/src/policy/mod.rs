//! The routing policy request handlers read: the scheduler built from the
//! EndpointPickerConfig. Held in an [`ArcSwap`] so a later policy source (Raft) can
//! replace it without a restart; each request keeps the snapshot it started with.

use std::sync::Arc;

use arc_swap::ArcSwap;
use infermesh_scheduler::flow::FlowConfig;
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
    /// The `flowControl` section when the config's `flowControl` gate is on (`None`: off).
    /// The flow owner task follows it; requests wait in flow control only while it is set.
    pub flow: Option<Arc<FlowConfig>>,
}

impl Policy {
    /// Builds the scheduler for a resolved config (no model rewrites), with its flow control.
    pub fn new(cfg: &ResolvedConfig) -> Result<Policy, Box<ConfigError>> {
        Ok(Policy {
            scheduler: Arc::new(Scheduler::new(cfg).map_err(Box::new)?),
            rewrites: Arc::new(ModelRewrites::default()),
            flow: cfg.flow_control.clone().map(Arc::new),
        })
    }

    /// The same scheduler and flow control with other model rewrites.
    pub fn with_rewrites(&self, rewrites: Arc<ModelRewrites>) -> Policy {
        Policy {
            scheduler: self.scheduler.clone(),
            rewrites,
            flow: self.flow.clone(),
        }
    }

    /// The same scheduler and rewrites with other flow control (`None`: the gate off).
    pub fn with_flow(&self, flow: Option<Arc<FlowConfig>>) -> Policy {
        Policy {
            scheduler: self.scheduler.clone(),
            rewrites: self.rewrites.clone(),
            flow,
        }
    }
}

/// The shared handle to the current policy.
pub type SharedPolicy = Arc<ArcSwap<Policy>>;
