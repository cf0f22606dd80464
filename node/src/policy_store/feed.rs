//! The feed: one task that turns each applied policy snapshot into the node's routing
//! state. A changed EndpointPickerConfig builds a new scheduler that is swapped in whole;
//! pool endpoints and objective priorities go to the pool task, which publishes one new
//! pool view; model rewrites are swapped whole. Requests keep the snapshot they started
//! with, so none sees half a change of any one of these.

use std::sync::Arc;

use arc_swap::ArcSwap;
use infermesh_raft_store::PolicyState;
use infermesh_raft_store::policy::ObjectKey;
use tokio::sync::{mpsc, watch};

use crate::discovery::PoolSpec;
use crate::policy::{Policy, SharedPolicy};
use crate::policy_store::LocalBase;
use crate::policy_store::derive;
use crate::policy_store::rewrite::ModelRewrites;
use crate::pool_task::PoolInput;

/// The handles through which policy changes reach a running node: its scheduler swap and
/// its pool task's input.
#[derive(Debug, Clone)]
pub struct NodeControl {
    policy: SharedPolicy,
    pool_tx: mpsc::Sender<PoolInput>,
}

impl NodeControl {
    /// A control over the node's shared policy and pool task input.
    pub fn new(policy: SharedPolicy, pool_tx: mpsc::Sender<PoolInput>) -> NodeControl {
        NodeControl { policy, pool_tx }
    }

    /// Builds a scheduler for `cfg` and swaps it in; requests already scheduled keep theirs.
    pub fn set_scheduler_config(
        &self,
        cfg: &infermesh_scheduler::ResolvedConfig,
    ) -> Result<(), Box<infermesh_scheduler::ConfigError>> {
        self.policy.store(Arc::new(Policy::new(cfg)?));
        Ok(())
    }

    /// Hands a new pool description to the pool task.
    pub async fn set_pool(&self, spec: PoolSpec) {
        let _ = self.pool_tx.send(PoolInput::Spec(spec)).await;
    }
}

/// Which scheduler config is in force: the local one, or a stored object at a version.
type EppInForce = Option<(ObjectKey, u64)>;

/// State of the feed task.
#[derive(Debug)]
pub struct Feed {
    control: NodeControl,
    base: LocalBase,
    pool_flag: Option<String>,
    rewrites: Arc<ArcSwap<ModelRewrites>>,
    epp: EppInForce,
    file_pool: Option<PoolSpec>,
    last_pool: Option<PoolSpec>,
}

impl Feed {
    /// A feed applying to `control`; `base` is what the node had before policy.
    pub fn new(
        control: NodeControl,
        base: LocalBase,
        pool_flag: Option<String>,
        rewrites: Arc<ArcSwap<ModelRewrites>>,
    ) -> Feed {
        Feed {
            control,
            file_pool: base.initial_pool.clone(),
            base,
            pool_flag,
            rewrites,
            epp: None,
            last_pool: None,
        }
    }

    /// Applies every new policy snapshot (and endpoints-file change) until `shutdown`.
    pub async fn run(
        mut self,
        mut policy: watch::Receiver<Arc<PolicyState>>,
        mut file: Option<mpsc::Receiver<PoolInput>>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        loop {
            let state = policy.borrow_and_update().clone();
            self.apply(&state).await;
            tokio::select! {
                r = policy.changed() => if r.is_err() { break },
                Some(input) = async {
                    match file.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if let PoolInput::Spec(spec) = input {
                        self.file_pool = Some(spec);
                    }
                }
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
    }

    /// Brings the node in line with `state`; changes only what changed.
    pub async fn apply(&mut self, state: &PolicyState) {
        let choice = derive::epp_choice(state);
        let in_force = choice.as_ref().map(|c| (c.key.clone(), c.resource_version));
        if in_force != self.epp {
            let cfg = match &choice {
                Some(c) => infermesh_scheduler::load_config(&c.text).map_err(Box::new),
                None => Ok(self.base.scheduler.clone()),
            };
            match cfg.and_then(|cfg| self.control.set_scheduler_config(&cfg)) {
                Ok(()) => {
                    tracing::info!(
                        config = ?in_force.as_ref().map(|(k, v)| format!("{k}@{v}")),
                        index = state.applied_index(),
                        "scheduler config swapped"
                    );
                    self.epp = in_force;
                }
                // The store validated it with the same loader; this only happens if this
                // node runs another scheduler version. Keep routing on the previous one.
                Err(e) => {
                    tracing::error!(error = %e, "stored EndpointPickerConfig refused; keeping the previous scheduler")
                }
            }
        }

        let name = derive::pool_name(state, self.pool_flag.as_deref(), self.file_pool.as_ref());
        let (spec, skipped) = derive::pool_spec(state, name.as_deref(), self.file_pool.as_ref());
        for s in skipped {
            tracing::warn!("{s}; endpoint skipped");
        }
        if self.last_pool.as_ref() != Some(&spec) {
            tracing::info!(
                pool = %spec.name,
                endpoints = spec.endpoints.len(),
                objectives = spec.objectives.len(),
                index = state.applied_index(),
                "pool from policy"
            );
            self.control.set_pool(spec.clone()).await;
            self.last_pool = Some(spec);
        }

        let rewrites = derive::rewrites(state, name.as_deref());
        if **self.rewrites.load() != rewrites {
            self.rewrites.store(Arc::new(rewrites));
        }
    }
}
