//! The task that owns the [`LoadBoard`]: applies inputs, pushes batches, publishes views.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::load::board::{InFlightDelta, LoadBoard, LoadView};
use crate::membership::MemberSet;
use crate::pod::PodId;
use crate::ring::NodeId;
use crate::rpc::Transport;
use crate::stats::Stats;
use crate::wire::{self, LoadBatch, OneWay, PodMetrics};

/// Least time between two published snapshots.
const MIN_PUBLISH_GAP: Duration = Duration::from_millis(1);
/// Least time between two pushes that in-flight changes trigger. In-flight counts go out at
/// once rather than on the flush tick: every node picks pods from them, and two nodes that
/// pick within one stale window put their requests on the same idle pod (in
/// `overload-priority` at 3 nodes: critical requests delayed past one prefill). Scrapes keep
/// to the tick; they are periodic.
const IN_FLIGHT_PUSH_GAP: Duration = Duration::from_millis(1);

/// Inputs to the load task.
#[derive(Debug)]
pub(crate) enum Input {
    /// The pool's pods changed.
    SetPods(Vec<String>),
    /// This node scraped a pod.
    Scrape {
        pod: String,
        metrics: PodMetrics,
        at: std::time::Instant,
    },
    /// This node's scrape of a pod failed.
    Down { pod: String, at: std::time::Instant },
    /// This node's in-flight work on a pod changed by this much.
    InFlight { pod: String, delta: InFlightDelta },
    /// A peer's batch arrived.
    Remote {
        from: NodeId,
        batch: LoadBatch,
        at: std::time::Instant,
    },
}

/// Where the task publishes.
pub(crate) struct Published {
    pub view: Arc<ArcSwap<LoadView>>,
    pub owned: watch::Sender<Arc<Vec<PodId>>>,
    pub version: watch::Sender<u64>,
}

pub(crate) async fn run(
    mut board: LoadBoard,
    mut inputs: mpsc::UnboundedReceiver<Input>,
    mut members: watch::Receiver<Arc<MemberSet>>,
    transport: Arc<Transport>,
    flush_interval: Duration,
    out: Published,
    stats: Arc<Stats>,
) {
    let mut tick = tokio::time::interval(flush_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut published = u64::MAX;
    let mut last_publish = Instant::now();
    let mut last_push = Instant::now();
    let mut peers: Vec<NodeId> = {
        let set = members.borrow_and_update().clone();
        board.handle_ring(set.ring.clone());
        set.peers().map(|m| m.id.node.clone()).collect()
    };
    loop {
        tokio::select! {
            input = inputs.recv() => {
                let Some(input) = input else { return };
                apply(&mut board, input);
                // Drain what is already queued so one snapshot covers it all.
                for _ in 0..1024 {
                    match inputs.try_recv() {
                        Ok(i) => apply(&mut board, i),
                        Err(_) => break,
                    }
                }
            }
            changed = members.changed() => {
                if changed.is_err() { return; }
                let set = members.borrow_and_update().clone();
                board.handle_ring(set.ring.clone());
                peers = set.peers().map(|m| m.id.node.clone()).collect();
            }
            _ = tick.tick() => flush(&mut board, &transport, &peers, &stats, &mut last_push),
            () = tokio::time::sleep_until(last_push + IN_FLIGHT_PUSH_GAP), if board.has_in_flight_changes() => {
                flush(&mut board, &transport, &peers, &stats, &mut last_push);
            }
            () = tokio::time::sleep_until(last_publish + MIN_PUBLISH_GAP), if board.version() != published => {}
        }
        // Snapshots cost O(pods): coalesce bursts of inputs into at most one per gap.
        if board.version() != published && last_publish.elapsed() >= MIN_PUBLISH_GAP {
            last_publish = Instant::now();
            published = board.version();
            let view = board.view();
            let changed = {
                let owned = out.owned.borrow();
                owned.len() != view.owned.len()
                    || owned.iter().zip(&view.owned).any(|(a, b)| a.as_str() != b)
            };
            if changed {
                let pods = view.owned.iter().map(|p| PodId::new(p.as_str())).collect();
                let _ = out.owned.send(Arc::new(pods));
            }
            out.view.store(Arc::new(view));
            let _ = out.version.send(published);
        }
    }
}

/// Pushes whatever changed (or the full table when due) and notes when.
fn flush(
    board: &mut LoadBoard,
    transport: &Arc<Transport>,
    peers: &[NodeId],
    stats: &Arc<Stats>,
    last_push: &mut Instant,
) {
    let now = Instant::now();
    if let Some(batch) = board.poll_outbound(now.into_std()) {
        push(transport, peers, batch, stats);
        *last_push = now;
    }
}

fn apply(board: &mut LoadBoard, input: Input) {
    match input {
        Input::SetPods(pods) => board.handle_set_pods(pods),
        Input::Scrape { pod, metrics, at } => board.handle_scrape(&pod, metrics, at),
        Input::Down { pod, at } => board.handle_down(&pod, at),
        Input::InFlight { pod, delta } => board.handle_in_flight(&pod, delta),
        Input::Remote { from, batch, at } => board.handle_remote(&from, batch, at),
    }
}

fn push(transport: &Arc<Transport>, peers: &[NodeId], batch: LoadBatch, stats: &Arc<Stats>) {
    if peers.is_empty() {
        return;
    }
    // Encode once, send the same bytes to every peer.
    let bytes: Arc<[u8]> = wire::encode(transport.me(), &OneWay::Load(batch)).into();
    Stats::add(&stats.load_batches_out, peers.len() as u64);
    Stats::add(&stats.load_bytes_out, (bytes.len() * peers.len()) as u64);
    for peer in peers {
        let transport = transport.clone();
        let bytes = bytes.clone();
        let peer = peer.clone();
        tokio::spawn(async move {
            if let Err(e) = transport.send_encoded(&peer, &bytes).await {
                tracing::debug!(%peer, error = %e, "load batch not delivered");
            }
        });
    }
}
