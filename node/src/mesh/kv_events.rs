//! KV events (precise mode): this node follows the event streams of the pods it owns
//! (scrape ownership) and applies them at the anchors' owners through the mesh.
//!
//! Per owned pod, one [`Subscriber`] on `tcp://<pod-ip>:<port>` feeds a [`PodApplier`]
//! (the scheduler's [`PodEventState`] per model, the model taken from the topic
//! `kv@<pod>@<model>`), whose ops go out as mesh records, removals and endpoint clears.
//!
//! Taking over a pod: the engine-key → request-key map lives only at the node that built
//! it, so a new owner cannot resume mid-stream (every later `BlockStored` would be an
//! orphan, every `BlockRemoved` unresolvable). It subscribes from sequence 0 and, at the
//! first update the stream yields, clears the pod tier-wide and applies the stream from
//! there: with the pod's replay socket and a buffer that still holds the start, the map is
//! rebuilt exactly; otherwise the subscriber reports the loss and the index holds what
//! arrives from then on (it under-reports the pod, it never over-reports it). The clear
//! waits for that first update because the subscriber only replays once the pod publishes
//! again: until then the pod's cache has not changed, so the entries the previous follower
//! left are still right, and clearing them early would only lose hits on an idle pod.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use infermesh_gossip::{Mesh, PodId};
use infermesh_kvevents::{KvEvent, Subscriber, SubscriberConfig, Topic, Update};
use infermesh_scheduler::prefix::{BlockEvent, EventCounters, IndexOp, PodEventState, model_seed};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// vLLM's and llm-d's default KV-event port (`tcp://*:5557`).
pub const DEFAULT_PORT: u16 = 5557;

/// Where one pod publishes, when it differs from the defaults (the sim fleet's pods).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodEventPorts {
    /// PUB socket port.
    pub publish: u16,
    /// Replay ROUTER port, if the pod has one.
    pub replay: Option<u16>,
}

/// How this node follows KV events: set on the node's config, or derived from the
/// policy's `precise-prefix-cache-producer` (see [`effective_options`]).
#[derive(Debug, Clone, PartialEq)]
pub struct KvEventsOptions {
    /// PUB port on every pod (llm-d's `socketPort`, 5557).
    pub port: u16,
    /// Replay port on every pod; `None` (vLLM's default) means no replay.
    pub replay_port: Option<u16>,
    /// Per-pod ports, keyed by pod id (`ip:port`), overriding the two above.
    pub pod_ports: HashMap<String, PodEventPorts>,
    /// Model to key blocks under when a stream's topic does not name one (vLLM's default
    /// topic is empty); `None` skips such batches.
    pub default_model: Option<String>,
    /// Engine keys mapped per pod and model before the oldest are dropped.
    pub max_blocks_per_pod: usize,
    /// Wait between connection attempts to a pod's publisher.
    pub reconnect_interval: Duration,
    /// ZMQ topic prefix subscribed to (llm-d's `topicFilter`, `kv@`).
    pub topic_filter: String,
}

impl Default for KvEventsOptions {
    fn default() -> Self {
        KvEventsOptions {
            port: DEFAULT_PORT,
            replay_port: None,
            pod_ports: HashMap::new(),
            default_model: None,
            max_blocks_per_pod: PodEventState::DEFAULT_MAX_BLOCKS,
            reconnect_interval: Duration::from_secs(5),
            topic_filter: infermesh_kvevents::TOPIC_PREFIX.to_owned(),
        }
    }
}

impl KvEventsOptions {
    /// The subscriber settings for `pod` (`ip:port`), or `None` when its host is unknown.
    pub fn subscriber_config(&self, pod: &str) -> Option<SubscriberConfig> {
        let (host, _) = pod.rsplit_once(':')?;
        let ports = self.pod_ports.get(pod).copied().unwrap_or(PodEventPorts {
            publish: self.port,
            replay: self.replay_port,
        });
        let mut cfg = SubscriberConfig::new(format!("tcp://{host}:{}", ports.publish));
        cfg.replay_endpoint = ports.replay.map(|p| format!("tcp://{host}:{p}"));
        // See the module doc: a new follower rebuilds the map from the start of the stream.
        cfg.start_seq = Some(0);
        cfg.reconnect_interval = self.reconnect_interval;
        cfg.topic_filter = self.topic_filter.clone();
        Some(cfg)
    }
}

/// Counters of the KV-event follower, shared by every pod task.
#[derive(Debug, Default)]
pub struct KvEventStats {
    /// Batches applied.
    pub batches: AtomicU64,
    /// Batches skipped because no model was known for their topic.
    pub batches_without_model: AtomicU64,
    /// `BlockStored` events skipped because they carry `extra_keys` (multimodal or salted
    /// blocks the token-only request keys cannot tell apart).
    pub extra_keys_skipped: AtomicU64,
    /// Pod clears sent (events, restarts, losses, takeovers).
    pub clears: AtomicU64,
    /// Ops sent to the mesh.
    pub ops: AtomicU64,
    /// `BlockStored` events skipped because their parent was unknown.
    pub orphans: AtomicU64,
    /// `BlockStored` events skipped as CPU offload (no tokens, or not on GPU).
    pub offload_skipped: AtomicU64,
    /// `BlockStored` events whose tokens and hashes disagreed in length.
    pub malformed: AtomicU64,
    /// `BlockRemoved` hashes that named no mapped block.
    pub unknown_removed: AtomicU64,
    /// Block mappings dropped to stay under the per-pod cap.
    pub evicted: AtomicU64,
}

impl KvEventStats {
    /// Adds what `after` counted beyond `before` (one pod state, around one event).
    fn add_delta(&self, before: EventCounters, after: EventCounters) {
        let pairs = [
            (&self.orphans, after.orphans - before.orphans),
            (
                &self.offload_skipped,
                after.offload_skipped - before.offload_skipped,
            ),
            (&self.malformed, after.malformed - before.malformed),
            (
                &self.unknown_removed,
                after.unknown_removed - before.unknown_removed,
            ),
            (&self.evicted, after.evicted - before.evicted),
        ];
        for (counter, n) in pairs {
            if n > 0 {
                counter.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// Appends the counters as a Prometheus text exposition (`infermesh_kv_events_*`).
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let counters: [(&str, &str, &AtomicU64); 10] = [
            ("batches", "Event batches applied", &self.batches),
            (
                "batches_without_model",
                "Event batches skipped: no model in the topic or the config",
                &self.batches_without_model,
            ),
            (
                "extra_keys_skipped",
                "BlockStored events skipped for extra_keys (multimodal or salted blocks)",
                &self.extra_keys_skipped,
            ),
            (
                "clears",
                "Pod clears sent (events, restarts, losses, takeovers)",
                &self.clears,
            ),
            ("ops", "Index ops sent to the mesh", &self.ops),
            (
                "orphans",
                "BlockStored events with an unknown parent",
                &self.orphans,
            ),
            (
                "offload_skipped",
                "BlockStored events skipped as CPU offload",
                &self.offload_skipped,
            ),
            (
                "malformed",
                "BlockStored events whose tokens and hashes disagree",
                &self.malformed,
            ),
            (
                "unknown_removed",
                "BlockRemoved hashes naming no mapped block",
                &self.unknown_removed,
            ),
            (
                "evicted",
                "Block mappings dropped at the per-pod cap",
                &self.evicted,
            ),
        ];
        for (name, help, v) in counters {
            let _ = writeln!(
                out,
                "# HELP infermesh_kv_events_{name} {help}.\n# TYPE infermesh_kv_events_{name} counter\ninfermesh_kv_events_{name}_total {}",
                v.load(Ordering::Relaxed)
            );
        }
    }
}

/// One pod's event state across the models it serves; sans IO.
#[derive(Debug)]
pub struct PodApplier {
    endpoint: Arc<str>,
    default_model: Option<String>,
    max_blocks: usize,
    states: HashMap<String, PodEventState>,
}

impl PodApplier {
    /// Empty state for `endpoint`.
    pub fn new(endpoint: &str, default_model: Option<String>, max_blocks: usize) -> PodApplier {
        PodApplier {
            endpoint: endpoint.into(),
            default_model,
            max_blocks,
            states: HashMap::new(),
        }
    }

    /// The state of `model`, if any event named it.
    pub fn state(&self, model: &str) -> Option<&PodEventState> {
        self.states.get(model)
    }

    /// Applies one subscriber update, appending index ops to `out`.
    pub fn handle_update(&mut self, update: &Update, stats: &KvEventStats, out: &mut Vec<IndexOp>) {
        match update {
            Update::Batch { topic, batch, .. } => {
                let model = Topic::parse(topic)
                    .ok()
                    .map(|t| t.model)
                    .filter(|m| !m.is_empty())
                    .or_else(|| self.default_model.clone());
                let Some(model) = model else {
                    stats.batches_without_model.fetch_add(1, Ordering::Relaxed);
                    return;
                };
                stats.batches.fetch_add(1, Ordering::Relaxed);
                for event in &batch.events {
                    if matches!(event, KvEvent::AllBlocksCleared) {
                        // The pod's whole cache went, whatever model keyed it.
                        self.clear(stats, out);
                        continue;
                    }
                    let Some(e) = block_event(event) else {
                        stats.extra_keys_skipped.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    let state = self.states.entry(model.clone()).or_insert_with(|| {
                        PodEventState::with_capacity(
                            self.endpoint.clone(),
                            model_seed(&model),
                            self.max_blocks,
                        )
                    });
                    let before = state.counters();
                    state.handle_event(e, out);
                    stats.add_delta(before, state.counters());
                }
            }
            // State derived from before the loss or restart may be stale: start over.
            Update::Lost { .. } | Update::Restarted { .. } => self.clear(stats, out),
        }
    }

    /// Forgets everything about the pod and emits one clear.
    pub fn clear(&mut self, stats: &KvEventStats, out: &mut Vec<IndexOp>) {
        self.states.clear();
        stats.clears.fetch_add(1, Ordering::Relaxed);
        out.push(IndexOp::Clear {
            endpoint: self.endpoint.clone(),
        });
    }
}

/// The applier's view of a vLLM event; `None` for a store it must not index.
fn block_event(e: &KvEvent) -> Option<BlockEvent<'_>> {
    Some(match e {
        KvEvent::BlockStored {
            block_hashes,
            parent_block_hash,
            token_ids,
            block_size,
            medium,
            lora_name,
            extra_keys,
            ..
        } => {
            if extra_keys.as_ref().is_some_and(|v| !v.is_nil()) {
                return None;
            }
            BlockEvent::Stored {
                engine_keys: block_hashes,
                parent: *parent_block_hash,
                tokens: token_ids,
                block_size: *block_size as usize,
                lora: lora_name.as_deref(),
                medium: medium.as_deref(),
            }
        }
        KvEvent::BlockRemoved {
            block_hashes,
            medium,
            ..
        } => BlockEvent::Removed {
            engine_keys: block_hashes,
            medium: medium.as_deref(),
        },
        KvEvent::AllBlocksCleared => BlockEvent::Cleared,
    })
}

/// Sends ops to the anchors' owners (records and removals) or every node (clears).
pub fn apply_ops(mesh: &Mesh, ops: Vec<IndexOp>, stats: &KvEventStats) {
    stats.ops.fetch_add(ops.len() as u64, Ordering::Relaxed);
    for op in ops {
        match op {
            IndexOp::Record {
                anchor,
                keys,
                endpoint,
                ..
            } => {
                mesh.prefix_record(anchor, keys, PodId::new(&*endpoint));
            }
            IndexOp::Remove {
                anchor,
                keys,
                endpoint,
            } => {
                mesh.prefix_remove(anchor, keys, PodId::new(&*endpoint));
            }
            IndexOp::Clear { endpoint } => mesh.prefix_forget_endpoint(PodId::new(&*endpoint)),
        }
    }
}

/// Follows one pod until aborted.
async fn follow_pod(
    mesh: Arc<Mesh>,
    pod: PodId,
    cfg: SubscriberConfig,
    opts: Arc<KvEventsOptions>,
    stats: Arc<KvEventStats>,
) {
    let mut applier = PodApplier::new(
        pod.as_str(),
        opts.default_model.clone(),
        opts.max_blocks_per_pod,
    );
    let mut ops = Vec::new();
    let (_subscriber, mut updates) = Subscriber::spawn(cfg);
    let mut first = true;
    while let Some(update) = updates.recv().await {
        if std::mem::take(&mut first) {
            // Entries another follower derived for this pod are not in our map (module doc).
            applier.clear(&stats, &mut ops);
        }
        applier.handle_update(&update, &stats, &mut ops);
        apply_ops(&mesh, std::mem::take(&mut ops), &stats);
    }
}

/// Follows the KV events of every pod this node owns, until `shutdown` turns true.
/// The options in force: the policy's `precise-prefix-cache-producer` turns following on
/// (its `socketPort` and `topicFilter` win over `base`, which still gives per-pod ports,
/// the replay port and the default model); without one, `base` alone (the node's config).
pub fn effective_options(
    base: Option<&KvEventsOptions>,
    policy: &crate::policy::Policy,
) -> Option<KvEventsOptions> {
    match policy.scheduler.precise_prefix() {
        Some(p) => {
            let e = &p.params().kv_events_config;
            let mut o = base.cloned().unwrap_or_default();
            o.port = u16::try_from(e.pod_discovery_config.socket_port).unwrap_or(DEFAULT_PORT);
            o.topic_filter = e.topic_filter.clone();
            Some(o)
        }
        None => base.cloned(),
    }
}

/// How often the follower re-reads the policy for a change of its options.
const POLICY_POLL: Duration = Duration::from_millis(500);

/// Follows the KV events of every pod this node owns while [`effective_options`] says so,
/// until shutdown. A change of options restarts every follower.
pub async fn run(
    mesh: Arc<Mesh>,
    base: Option<KvEventsOptions>,
    policy: crate::policy::SharedPolicy,
    stats: Arc<KvEventStats>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut owned = mesh.owned_pods();
    let mut poll = tokio::time::interval(POLICY_POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut current: Option<Arc<KvEventsOptions>> = None;
    // Aborted on drop: when this task is aborted (the app stops or crashes), no follower
    // may outlive it holding the mesh.
    let mut following: HashMap<PodId, Follower> = HashMap::new();
    loop {
        let wanted = effective_options(base.as_ref(), &policy.load());
        if wanted.as_ref() != current.as_deref() {
            if current.is_some() || wanted.is_some() {
                tracing::info!(
                    on = wanted.is_some(),
                    "KV events: following options changed"
                );
            }
            following.clear();
            current = wanted.map(Arc::new);
        }
        let now: HashSet<PodId> = owned.borrow_and_update().iter().cloned().collect();
        // Lost ownership: stop (dropping the follower aborts it; the new owner rebuilds).
        following.retain(|pod, task| now.contains(pod) && !task.0.is_finished());
        if let Some(opts) = &current {
            for pod in now {
                if following.contains_key(&pod) {
                    continue;
                }
                let Some(cfg) = opts.subscriber_config(pod.as_str()) else {
                    tracing::warn!(%pod, "KV events: pod id has no host; not followed");
                    continue;
                };
                let task = tokio::spawn(follow_pod(
                    mesh.clone(),
                    pod.clone(),
                    cfg,
                    opts.clone(),
                    stats.clone(),
                ));
                following.insert(pod, Follower(task));
            }
        }
        tokio::select! {
            r = owned.changed() => if r.is_err() { break },
            _ = poll.tick() => {}
            _ = shutdown.wait_for(|s| *s) => break,
        }
    }
}

/// A pod follower's task, aborted when dropped.
struct Follower(JoinHandle<()>);

impl Drop for Follower {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests;
