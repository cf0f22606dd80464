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
use crate::request::FlowGate;

/// The handles through which policy changes reach a running node: its scheduler swap, its
/// flow owner and its pool task's input.
#[derive(Debug, Clone)]
pub struct NodeControl {
    policy: SharedPolicy,
    pool_tx: mpsc::Sender<PoolInput>,
    flow: Option<FlowGate>,
}

impl NodeControl {
    /// A control over the node's shared policy and pool task input.
    pub fn new(policy: SharedPolicy, pool_tx: mpsc::Sender<PoolInput>) -> NodeControl {
        NodeControl {
            policy,
            pool_tx,
            flow: None,
        }
    }

    /// Also tells the node's flow owner when a swap may have changed flow control, so a
    /// gate turned off releases the queue at once rather than at the owner's next wake-up.
    pub fn with_flow(mut self, gate: FlowGate) -> NodeControl {
        self.flow = Some(gate);
        self
    }

    /// Builds a scheduler for `cfg` and swaps it in (keeping the model rewrites), with the
    /// config's flow control; requests already scheduled keep theirs.
    pub fn set_scheduler_config(
        &self,
        cfg: &infermesh_scheduler::ResolvedConfig,
    ) -> Result<(), Box<infermesh_scheduler::ConfigError>> {
        let rewrites = self.policy.load().rewrites.clone();
        self.policy
            .store(Arc::new(Policy::new(cfg)?.with_rewrites(rewrites)));
        if let Some(gate) = &self.flow {
            gate.policy_changed();
        }
        Ok(())
    }

    /// Swaps in new model rewrites, keeping the scheduler.
    pub fn set_rewrites(&self, rewrites: Arc<ModelRewrites>) {
        self.policy
            .rcu(|p| Arc::new(p.with_rewrites(rewrites.clone())));
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
                Some(c) => infermesh_scheduler::load_config(&c.text)
                    .map_err(Box::new)
                    .and_then(|cfg| {
                        cfg.check_stability(self.base.allow_experimental_plugins)
                            .map_err(Box::new)?;
                        Ok(cfg)
                    }),
                None => Ok(self.base.scheduler.clone()),
            };
            if let Ok(cfg) = &cfg {
                for w in &cfg.warnings {
                    tracing::warn!("EndpointPickerConfig: {w}");
                }
            }
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
            let rewrites = Arc::new(rewrites);
            self.control.set_rewrites(rewrites.clone());
            self.rewrites.store(rewrites);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use infermesh_scheduler::ResolvedConfig;

    use crate::policy_store::derive::apply_yaml as apply;

    #[tokio::test]
    async fn objectives_reach_the_pool_and_only_a_new_config_rebuilds_the_scheduler() {
        let policy: SharedPolicy = Arc::new(ArcSwap::from_pointee(
            Policy::new(&ResolvedConfig::builtin_default()).unwrap(),
        ));
        let (tx, mut rx) = mpsc::channel(8);
        let base = LocalBase {
            endpoints_file: None,
            initial_pool: None,
            scheduler: ResolvedConfig::builtin_default(),
            allow_experimental_plugins: false,
        };
        let mut feed = Feed::new(
            NodeControl::new(policy.clone(), tx),
            base,
            Some("pool".into()),
            Arc::new(ArcSwap::from_pointee(ModelRewrites::default())),
        );
        let mut state = PolicyState::default();
        apply(
            &mut state,
            1,
            "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceObjective\n\
             metadata: {name: batch}\nspec: {priority: -1, poolRef: {name: pool}}\n",
        );
        let first = policy.load_full();
        feed.apply(&state).await;
        let Some(PoolInput::Spec(spec)) = rx.recv().await else {
            panic!("no pool sent")
        };
        assert_eq!(spec.objectives.get("batch"), Some(&-1));
        assert!(
            Arc::ptr_eq(&first, &policy.load_full()),
            "no config, no rebuild"
        );

        apply(
            &mut state,
            2,
            "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nmetadata: {name: default}\n\
             plugins: [{type: queue-scorer}, {type: max-score-picker}]\n\
             schedulingProfiles: [{name: default, plugins: [{pluginRef: queue-scorer}, {pluginRef: max-score-picker}]}]\n",
        );
        feed.apply(&state).await;
        let second = policy.load_full();
        assert!(
            !Arc::ptr_eq(&first, &second),
            "a new config swaps the scheduler"
        );
        assert!(rx.try_recv().is_err(), "the pool did not change");
        // Re-applying the same state changes nothing.
        feed.apply(&state).await;
        assert!(Arc::ptr_eq(&second, &policy.load_full()));

        // A model rewrite lands in the policy snapshot next to the unchanged scheduler.
        apply(
            &mut state,
            3,
            "apiVersion: inference.networking.x-k8s.io/v1alpha2\nkind: InferenceModelRewrite\n\
             metadata: {name: r}\nspec:\n  poolRef: {name: pool}\n  rules:\n  \
             - matches: [{model: {value: m}}]\n    targets: [{modelRewrite: m2}]\n",
        );
        feed.apply(&state).await;
        let third = policy.load_full();
        assert!(Arc::ptr_eq(&second.scheduler, &third.scheduler));
        let mut rng = rand::rng();
        assert_eq!(third.rewrites.target("m", &mut rng), Some("m2"));
        assert_eq!(third.rewrites.target("other", &mut rng), None);
    }

    #[tokio::test]
    async fn a_stored_config_with_an_alpha_plugin_needs_the_experimental_flag() {
        let alpha = "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nmetadata: {name: default}\n\
             plugins: [{type: utilization-filter, parameters: {conditions: [{metric: waiting-queue, maxValue: 3}]}}, {type: queue-scorer}]\n";
        for allow in [false, true] {
            let policy: SharedPolicy = Arc::new(ArcSwap::from_pointee(
                Policy::new(&ResolvedConfig::builtin_default()).unwrap(),
            ));
            let (tx, _rx) = mpsc::channel(8);
            let base = LocalBase {
                endpoints_file: None,
                initial_pool: None,
                scheduler: ResolvedConfig::builtin_default(),
                allow_experimental_plugins: allow,
            };
            let mut feed = Feed::new(
                NodeControl::new(policy.clone(), tx),
                base,
                Some("pool".into()),
                Arc::new(ArcSwap::from_pointee(ModelRewrites::default())),
            );
            let mut state = PolicyState::default();
            apply(&mut state, 1, alpha);
            let before = policy.load_full();
            feed.apply(&state).await;
            assert_eq!(
                !Arc::ptr_eq(&before, &policy.load_full()),
                allow,
                "swapped only with --allow-experimental-plugins (allow = {allow})"
            );
        }
    }
}
