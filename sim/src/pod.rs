//! The thin async driver of one pod's engine: one task owns the [`Engine`], takes
//! [`Input`]s over a channel and sleeps until the engine's next step ends.

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use infermesh_kvevents::{EventBatch, KvEvent, MEDIUM_GPU, Publisher};

use crate::engine::{
    CacheEvent, Completion, Engine, EngineRequest, Output, RequestId, SubmitError,
};
use crate::metrics::{MetricsLabels, render};

/// Maps real time to simulated time (`time_scale` simulated seconds per real second).
#[derive(Debug, Clone, Copy)]
pub struct SimClock {
    start: Instant,
    scale: f64,
}

impl SimClock {
    /// A clock starting now.
    pub fn new(scale: f64) -> Self {
        Self {
            start: Instant::now(),
            scale,
        }
    }

    /// Simulated time since start.
    pub fn now(&self) -> Duration {
        self.start.elapsed().mul_f64(self.scale)
    }

    /// The real instant at which simulated time `t` is reached.
    pub fn instant_of(&self, t: Duration) -> Instant {
        self.start + t.div_f64(self.scale)
    }
}

/// A message to the engine task.
#[derive(Debug)]
pub enum Input {
    /// A new request; its events go to `events`.
    Submit {
        /// The tokenized request.
        req: EngineRequest,
        /// Where tokens and the end go.
        events: mpsc::UnboundedSender<Event>,
    },
    /// An encode-only request for images `hashes` (an encode-role pod's work).
    SubmitEncode {
        /// Unique id within the engine.
        id: RequestId,
        /// Content hashes of the images.
        hashes: Vec<u64>,
        /// Where the end goes.
        events: mpsc::UnboundedSender<Event>,
    },
    /// The client went away.
    Abort(RequestId),
    /// Render `/metrics`.
    Metrics(oneshot::Sender<String>),
    /// Multiply step durations by this factor; the reply says whether it was accepted.
    Slowdown(f64, oneshot::Sender<bool>),
    /// Drop every cached prefix; the reply says whether it was done (refused while
    /// requests hold blocks).
    ResetPrefixCache(oneshot::Sender<bool>),
    /// The hashes the prefix cache holds now (for checks against a KV-event consumer).
    CachedHashes(oneshot::Sender<Vec<u64>>),
}

/// Where a pod's KV events go: the publisher and what a vLLM event carries beyond the
/// engine's own log.
#[derive(Debug)]
pub struct KvEventSink {
    /// The pod's ZMQ publisher.
    pub publisher: Publisher,
    /// LoRA adapter names, indexed by the engine's adapter index.
    pub lora_adapters: Vec<String>,
    /// Tokens per block.
    pub block_size: u32,
}

impl KvEventSink {
    fn event(&self, e: CacheEvent) -> KvEvent {
        match e {
            CacheEvent::Stored {
                block_hashes,
                parent,
                token_ids,
                lora,
            } => KvEvent::BlockStored {
                block_hashes,
                parent_block_hash: parent,
                token_ids,
                block_size: self.block_size,
                // vLLM's lora_int_id is 1-based; the engine's index is 0-based.
                lora_id: lora.map(|l| i64::from(l) + 1),
                medium: Some(MEDIUM_GPU.to_owned()),
                lora_name: lora.and_then(|l| self.lora_adapters.get(l as usize).cloned()),
                extra_keys: None,
                group_idx: None,
                kv_cache_spec_kind: None,
                kv_cache_spec_sliding_window: None,
            },
            CacheEvent::Removed { block_hashes } => KvEvent::BlockRemoved {
                block_hashes,
                medium: Some(MEDIUM_GPU.to_owned()),
                group_idx: None,
            },
            CacheEvent::Cleared => KvEvent::AllBlocksCleared,
        }
    }

    /// Publishes each finished step's cache changes as one batch, as vLLM does per step.
    fn flush(&self, engine: &mut Engine) {
        for step in engine.take_kv_events() {
            let batch = EventBatch {
                ts: unix_now(),
                events: step.events.into_iter().map(|e| self.event(e)).collect(),
                data_parallel_rank: None,
            };
            if self.publisher.publish(batch).is_err() {
                tracing::warn!("KV-event publisher closed; events dropped");
            }
        }
    }
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// What a request handler hears from the engine.
#[derive(Debug)]
pub enum Event {
    /// Token `index` (0-based) is out.
    Token {
        /// Position in the completion.
        index: usize,
    },
    /// The request is complete.
    Done(Completion),
    /// The encode-only request is complete.
    Encoded {
        /// Images in it.
        images: usize,
        /// Of those, encoder-cache hits.
        hits: usize,
    },
    /// The engine refused the request.
    Rejected(SubmitError),
}

/// Runs the engine until every sender of `rx` is gone.
pub async fn run_engine(
    mut engine: Engine,
    mut rx: mpsc::UnboundedReceiver<Input>,
    clock: SimClock,
    labels: MetricsLabels,
    kv_events: Option<KvEventSink>,
) {
    let mut subs: HashMap<RequestId, mpsc::UnboundedSender<Event>> = HashMap::new();
    if kv_events.is_some() {
        engine.enable_kv_events();
    }
    loop {
        engine.advance(clock.now());
        dispatch(&mut engine, &mut subs);
        // Every way back to the top of the loop passes here, so each step's events leave
        // once the step is done.
        if let Some(k) = &kv_events {
            k.flush(&mut engine);
        }
        let wake = engine.next_wakeup();
        let sleep = async {
            match wake {
                Some(t) => tokio::time::sleep_until(clock.instant_of(t)).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = rx.recv() => {
                let Some(msg) = msg else { break };
                handle(&mut engine, &mut subs, &clock, &labels, msg);
                while let Ok(msg) = rx.try_recv() {
                    handle(&mut engine, &mut subs, &clock, &labels, msg);
                }
            }
            () = sleep => {
                // Float rounding may leave `now` a hair before the step's end.
                if let Some(t) = wake {
                    engine.advance(t.max(clock.now()));
                }
            }
        }
    }
    // Close the event sockets before the task ends, so a restarted pod can bind them again.
    if let Some(k) = kv_events {
        k.flush(&mut engine);
        k.publisher.shutdown().await;
    }
}

fn handle(
    engine: &mut Engine,
    subs: &mut HashMap<RequestId, mpsc::UnboundedSender<Event>>,
    clock: &SimClock,
    labels: &MetricsLabels,
    msg: Input,
) {
    match msg {
        Input::Submit { req, events } => {
            let now = clock.now();
            engine.advance(now);
            dispatch(engine, subs);
            let id = req.id;
            match engine.submit(now, req) {
                Ok(()) => {
                    subs.insert(id, events);
                }
                Err(e) => {
                    let _ = events.send(Event::Rejected(e));
                }
            }
        }
        Input::SubmitEncode { id, hashes, events } => {
            engine.advance(clock.now());
            dispatch(engine, subs);
            match engine.submit_encode(id, hashes) {
                Ok(()) => {
                    subs.insert(id, events);
                }
                Err(e) => {
                    let _ = events.send(Event::Rejected(e));
                }
            }
        }
        Input::Abort(id) => {
            if subs.remove(&id).is_some() {
                engine.abort(id);
            }
        }
        Input::Slowdown(factor, reply) => {
            engine.advance(clock.now());
            dispatch(engine, subs);
            let _ = reply.send(engine.set_slowdown(factor));
        }
        Input::ResetPrefixCache(reply) => {
            engine.advance(clock.now());
            dispatch(engine, subs);
            let _ = reply.send(engine.reset_prefix_cache());
        }
        Input::CachedHashes(reply) => {
            let _ = reply.send(engine.pool().cached_hashes().collect());
        }
        Input::Metrics(reply) => {
            engine.advance(clock.now());
            dispatch(engine, subs);
            let _ = reply.send(render(engine, labels, unix_now()));
        }
    }
}

fn dispatch(engine: &mut Engine, subs: &mut HashMap<RequestId, mpsc::UnboundedSender<Event>>) {
    let mut gone: Vec<RequestId> = Vec::new();
    for out in engine.drain_outputs() {
        match out {
            Output::Token { id, index, .. } => {
                if let Some(tx) = subs.get(&id)
                    && tx.send(Event::Token { index }).is_err()
                {
                    gone.push(id);
                }
            }
            Output::Finished { id, completion } => {
                if let Some(tx) = subs.remove(&id) {
                    let _ = tx.send(Event::Done(completion));
                }
            }
            Output::Encoded {
                id, images, hits, ..
            } => {
                if let Some(tx) = subs.remove(&id) {
                    let _ = tx.send(Event::Encoded { images, hits });
                }
            }
        }
    }
    for id in gone {
        if subs.remove(&id).is_some() {
            engine.abort(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_scale_maps_simulated_to_real_time() {
        let c = SimClock::new(10.0);
        let real = c.instant_of(Duration::from_secs(5)) - c.start;
        assert_eq!(real, Duration::from_millis(500));
        let c = SimClock::new(0.5);
        assert_eq!(
            c.instant_of(Duration::from_secs(1)) - c.start,
            Duration::from_secs(2)
        );
    }
}
