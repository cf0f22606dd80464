//! Load board wiring: this node's in-flight counts go onto the mesh's board, and the
//! board's fleet view (scrapes by each pod's owner, every node's in-flight work) comes back
//! into the endpoint slots the scheduler reads.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use infermesh_gossip::wire::LoraMetrics;
use infermesh_gossip::{InFlightDelta, LoadView, Mesh, PodId, PodMetrics};
use infermesh_scheduler::{InFlight, LoraState, Metrics};
use tokio::sync::{Notify, watch};

use crate::pool::{PoolView, SharedPool};

/// The scheduler's metrics in the board's wire form.
pub fn to_pod_metrics(m: &Metrics) -> PodMetrics {
    PodMetrics {
        waiting_queue: m.waiting_queue,
        running: m.running,
        kv_cache_usage: m.kv_cache_usage as f32,
        lora: m.lora.as_ref().map(|l| LoraMetrics {
            running: l.running.clone(),
            waiting: l.waiting.clone(),
            max_lora: l.max_lora,
        }),
        cache_block_size: m.cache_block_size,
        cache_num_blocks: m.cache_num_blocks,
    }
}

/// Board metrics scraped at `scraped_at` (this node's clock) as the scheduler's metrics.
pub fn from_pod_metrics(m: &PodMetrics, scraped_at: Instant) -> Metrics {
    Metrics {
        scraped_at,
        waiting_queue: m.waiting_queue,
        running: m.running,
        kv_cache_usage: f64::from(m.kv_cache_usage),
        lora: m.lora.as_ref().map(|l| LoraState {
            running: l.running.clone(),
            waiting: l.waiting.clone(),
            max_lora: l.max_lora,
        }),
        cache_block_size: m.cache_block_size,
        cache_num_blocks: m.cache_num_blocks,
    }
}

/// Keeps the board and the slots in step: what this node last published per endpoint, and
/// which board scrape it last copied into each slot.
#[derive(Debug, Default)]
pub struct LoadSync {
    published: HashMap<SocketAddr, InFlight>,
    copied: HashMap<SocketAddr, Instant>,
}

impl LoadSync {
    /// Publishes changes of this node's in-flight counts as deltas to the board.
    pub fn publish_local(&mut self, mesh: &Mesh, pool: &PoolView) {
        for slot in &pool.slots {
            let addr = slot.address();
            let now = slot.in_flight();
            let last = self.published.get(&addr).copied().unwrap_or_default();
            if now == last {
                continue;
            }
            let delta = InFlightDelta {
                requests: i64::from(now.requests) - i64::from(last.requests),
                tokens: now.tokens as i64 - last.tokens as i64,
                prefilling: i64::from(now.prefilling) - i64::from(last.prefilling),
            };
            mesh.add_in_flight(&PodId::from(addr), delta);
            self.published.insert(addr, now);
        }
        // The board forgets pods that left the pool, and so do we.
        if self.published.len() > pool.slots.len() {
            self.published.retain(|a, _| pool.slot(*a).is_some());
        }
    }

    /// Copies the board into the slots: other nodes' in-flight work, and scrapes made by
    /// other nodes when newer than the slot's own — failed ones mark the slot down, as a
    /// failed scrape of this node's own does.
    ///
    /// A slot still holding the board's last copy follows the board whatever the times say.
    /// The board orders one sender's reports by sequence because it dates them on arrival
    /// (now minus their age): a report held up in transit comes out dated later than the one
    /// sent after it. Comparing those dates here once kept a pod's last good scrape over
    /// its owner's down mark, and the dead pod stayed a candidate on that node.
    pub fn apply_board(&mut self, me: &str, view: &LoadView, pool: &PoolView) {
        if self.copied.len() > pool.slots.len() {
            self.copied.retain(|a, _| pool.slot(*a).is_some());
        }
        for slot in &pool.slots {
            let addr = slot.address();
            let Some(load) = view.pod(&PodId::from(addr)) else {
                slot.set_remote_in_flight(InFlight::default());
                continue;
            };
            let mine = self.published.get(&addr).copied().unwrap_or_default();
            slot.set_remote_in_flight(InFlight {
                requests: load.in_flight.requests.saturating_sub(mine.requests),
                tokens: load.in_flight.tokens.saturating_sub(mine.tokens),
                prefilling: load.in_flight.prefilling.saturating_sub(mine.prefilling),
            });
            let (Some(at), Some(by)) = (load.scraped_at, &load.scraped_by) else {
                continue;
            };
            if by.as_str() == me {
                continue;
            }
            let held = slot.metrics().map(|cur| cur.scraped_at);
            let from_board = held.is_some() && held == self.copied.get(&addr).copied();
            match &load.metrics {
                Some(m) if held.is_none_or(|t| t < at) || (from_board && held != Some(at)) => {
                    slot.record_scrape(from_pod_metrics(m, at));
                    self.copied.insert(addr, at);
                }
                // The owner saw the pod fail after the last scrape this slot holds.
                None if load.is_down() && (from_board || held.is_none_or(|t| t <= at)) => {
                    slot.mark_down();
                }
                _ => {}
            }
        }
    }
}

/// Runs the sync until `shutdown`: publishes local in-flight counts each time a slot wakes
/// `in_flight_changed` (the board pushes them at once, at most one batch per millisecond),
/// and applies every board change. A wake rather than a poll: a 2 ms poll made the counts
/// other nodes pick by about a millisecond older on average, and at 3 nodes two picks made
/// that far apart on different nodes could both take the one pod free of prefill.
pub async fn run(
    mesh: Arc<Mesh>,
    pool: SharedPool,
    in_flight_changed: Arc<Notify>,
    mut shutdown: watch::Receiver<bool>,
) {
    let me = mesh.node_id().to_string();
    let mut sync = LoadSync::default();
    let mut changes = mesh.load_changes();
    loop {
        tokio::select! {
            () = in_flight_changed.notified() => sync.publish_local(&mesh, &pool.load()),
            r = changes.changed() => {
                if r.is_err() {
                    return;
                }
                sync.apply_board(&me, &mesh.load_view(), &pool.load());
            }
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

/// Forwards the mesh's owned-pod set to the pool task until `shutdown`.
pub async fn forward_owned(
    mesh: Arc<Mesh>,
    pool_tx: tokio::sync::mpsc::Sender<crate::pool_model::PoolInput>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut owned = mesh.owned_pods();
    loop {
        let set = owned.borrow_and_update().clone();
        if pool_tx
            .send(crate::pool_model::PoolInput::Owned(set))
            .await
            .is_err()
        {
            return;
        }
        tokio::select! {
            r = owned.changed() => if r.is_err() { return },
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn metrics_survive_the_wire_form() {
        let now = Instant::now();
        let m = Metrics {
            waiting_queue: 3,
            running: 7,
            kv_cache_usage: 0.5,
            lora: Some(LoraState {
                running: vec!["a".into()],
                waiting: vec![],
                max_lora: 2,
            }),
            cache_block_size: Some(16),
            cache_num_blocks: Some(1000),
            ..Metrics::idle(now)
        };
        assert_eq!(from_pod_metrics(&to_pod_metrics(&m), now), m);
    }

    #[test]
    fn a_remote_down_mark_takes_the_slot_out_until_a_newer_scrape() {
        use crate::discovery::EndpointSpec;
        use crate::pool::EndpointSlot;
        use crate::scrape::engine::Engine;
        use infermesh_gossip::{NodeId, PodLoad};

        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let addr: SocketAddr = "10.0.0.7:8000".parse().unwrap();
        let slot = Arc::new(EndpointSlot::new(EndpointSpec {
            address: addr,
            pod: "p".into(),
            labels: Default::default(),
            engine: Engine::Vllm,
        }));
        let pool = PoolView::new(
            "pool".into(),
            vec![slot.clone()],
            Default::default(),
            Default::default(),
        );
        let view = |metrics: Option<u32>, at: Instant, by: &str| LoadView {
            version: 1,
            pods: [(
                addr.to_string(),
                PodLoad {
                    metrics: metrics.map(|w| PodMetrics {
                        waiting_queue: w,
                        ..PodMetrics::default()
                    }),
                    scraped_at: Some(at),
                    scraped_by: Some(NodeId::new(by)),
                    in_flight: Default::default(),
                },
            )]
            .into(),
            owned: vec![],
        };
        let mut sync = LoadSync::default();
        let long = Duration::from_secs(60);
        sync.apply_board("me", &view(Some(1), t0, "owner"), &pool);
        assert!(slot.is_fresh(t0, long));
        sync.apply_board("me", &view(None, t0 + ms(10), "owner"), &pool);
        assert!(
            !slot.is_fresh(t0 + ms(10), long),
            "remote down mark applies"
        );
        sync.apply_board("me", &view(Some(2), t0 + ms(20), "owner"), &pool);
        assert!(slot.is_fresh(t0 + ms(20), long), "a newer scrape clears it");
        assert_eq!(slot.metrics().unwrap().waiting_queue, 2);
        // The board's next word is followed even when dated before the scrape it replaces:
        // the board put it after that one (dates are taken on arrival, so a delayed report
        // comes out late).
        sync.apply_board("me", &view(None, t0 + ms(15), "owner"), &pool);
        assert!(
            !slot.is_fresh(t0 + ms(20), long),
            "the owner's later down mark applies though dated earlier"
        );
        sync.apply_board("me", &view(Some(3), t0 + ms(18), "owner"), &pool);
        assert!(slot.is_fresh(t0 + ms(20), long));
        assert_eq!(slot.metrics().unwrap().waiting_queue, 3);
        // A scrape of this node's own is compared by time: an older down mark is ignored,
        // and so is this node's own entry (its scraper already marked the slot).
        slot.record_scrape(Metrics::idle(t0 + ms(40)));
        sync.apply_board("me", &view(None, t0 + ms(35), "owner"), &pool);
        assert!(slot.is_fresh(t0 + ms(40), long), "own newer scrape kept");
        sync.apply_board("me", &view(None, t0 + ms(50), "me"), &pool);
        assert!(slot.is_fresh(t0 + ms(50), long));
        sync.apply_board("me", &view(None, t0 + ms(45), "owner"), &pool);
        assert!(
            !slot.is_fresh(t0 + ms(50), long),
            "a newer down mark applies"
        );
    }
}
