//! The subscribing side: SUB with a topic filter, sequence tracking per topic, replay on a
//! gap, reconnection, and counters.
//!
//! One task owns the sockets and a [`SequenceTracker`] per topic, and hands what to apply
//! to the caller over a bounded channel of [`Update`]s, in order. A full channel slows the
//! task down; the PUB side then drops messages for this slow subscriber, which shows up as
//! a gap and is replayed, so backpressure costs latency, not events.
//!
//! A resume point ([`SubscriberConfig::start_seq`]) makes the first message of each topic
//! a gap from that point, replayed before anything is applied: a new owner of the pod's
//! stream picks up exactly where the previous one stopped, as far as the publisher's
//! buffer reaches. What the buffer no longer holds is reported as [`Update::Lost`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use zeromq::{DealerSocket, Socket, SocketOptions, SocketRecv, SocketSend, SubSocket, ZmqMessage};

use crate::frame::{FrameError, Message, ReplayItem, parse_replay_reply, replay_request};
use crate::seq::{SequenceTracker, Verdict};
use crate::topic::TOPIC_PREFIX;
use crate::wire::{EventBatch, decode};

/// How to subscribe.
#[derive(Debug, Clone)]
pub struct SubscriberConfig {
    /// The publisher's PUB endpoint to connect to.
    pub endpoint: String,
    /// The publisher's replay ROUTER; `None` turns gaps into [`Update::Lost`] at once.
    pub replay_endpoint: Option<String>,
    /// Topic prefix to subscribe to (llm-d's default `kv@`).
    pub topic_filter: String,
    /// Resume point: the first sequence number not yet applied; `None` starts with
    /// whatever arrives first.
    pub start_seq: Option<u64>,
    /// Wait between connection attempts (llm-d retries every 5 s).
    pub reconnect_interval: Duration,
    /// Longest wait for the next replay reply before the replay counts as failed.
    pub replay_timeout: Duration,
    /// Updates buffered for the caller.
    pub channel_capacity: usize,
}

impl SubscriberConfig {
    /// Defaults: filter `kv@`, no replay, no resume point, 5 s reconnect, 2 s replay
    /// timeout, 1024 buffered updates.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            replay_endpoint: None,
            topic_filter: TOPIC_PREFIX.to_owned(),
            start_seq: None,
            reconnect_interval: Duration::from_secs(5),
            replay_timeout: Duration::from_secs(2),
            channel_capacity: 1024,
        }
    }
}

/// What the subscriber hands the caller, in the order to apply it.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// A batch to apply.
    Batch {
        /// Its topic.
        topic: String,
        /// Its sequence number.
        seq: u64,
        /// The decoded events (unknown event types left out and counted).
        batch: EventBatch,
        /// Whether it came from the replay socket.
        replayed: bool,
    },
    /// Batches `from..to` of `topic` are gone for good (not in the publisher's buffer, or
    /// no replay socket): state derived from this stream may be stale.
    Lost {
        /// The topic.
        topic: String,
        /// First lost sequence number.
        from: u64,
        /// First sequence number after the loss.
        to: u64,
    },
    /// The publisher of `topic` restarted (its numbering went back to the start): its
    /// cache is new, so state learned from the earlier run is stale.
    Restarted {
        /// The topic.
        topic: String,
    },
}

/// Counters of one subscriber; plain atomics so any metrics layer can read them.
#[derive(Debug, Default)]
pub struct SubscriberStats {
    /// Multipart messages received on the SUB socket.
    pub messages: AtomicU64,
    /// Batches handed to the caller (live and replayed).
    pub batches: AtomicU64,
    /// Payloads that were not valid batches (dropped, sequence still consumed).
    pub decode_errors: AtomicU64,
    /// Messages without exactly 3 frames or with a bad sequence frame (dropped).
    pub bad_frames: AtomicU64,
    /// Events of unknown type skipped inside otherwise good batches.
    pub unknown_events: AtomicU64,
    /// Sequence gaps detected.
    pub gaps: AtomicU64,
    /// Replays completed (end marker received).
    pub replays: AtomicU64,
    /// Replays that failed (connect, timeout, bad frames).
    pub replay_failures: AtomicU64,
    /// Batches received through replay and applied.
    pub replayed: AtomicU64,
    /// Batches dropped because they were already applied.
    pub duplicates: AtomicU64,
    /// Sequence numbers lost for good.
    pub lost: AtomicU64,
    /// Publisher restarts detected.
    pub restarts: AtomicU64,
    /// Connection attempts that failed or connections that dropped.
    pub reconnects: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A running subscriber; dropping it stops the task.
#[derive(Debug)]
pub struct Subscriber {
    stats: Arc<SubscriberStats>,
    task: JoinHandle<()>,
}

impl Subscriber {
    /// Starts subscribing; updates arrive on the returned receiver. The task ends when the
    /// receiver is dropped or the subscriber is.
    pub fn spawn(cfg: SubscriberConfig) -> (Subscriber, mpsc::Receiver<Update>) {
        let (tx, rx) = mpsc::channel(cfg.channel_capacity.max(1));
        let stats = Arc::new(SubscriberStats::default());
        let task = tokio::spawn(
            Runner {
                cfg,
                tx,
                stats: stats.clone(),
                trackers: HashMap::new(),
            }
            .run(),
        );
        (Subscriber { stats, task }, rx)
    }

    /// Counters.
    pub fn stats(&self) -> &Arc<SubscriberStats> {
        &self.stats
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Why a replay failed.
#[derive(Debug, thiserror::Error)]
enum ReplayError {
    #[error("transport: {0}")]
    Zmq(#[from] zeromq::ZmqError),
    #[error("no reply within the replay timeout")]
    Timeout,
    #[error("{0}")]
    Frames(#[from] FrameError),
}

/// The caller went away: stop.
struct Closed;

struct Runner {
    cfg: SubscriberConfig,
    tx: mpsc::Sender<Update>,
    stats: Arc<SubscriberStats>,
    trackers: HashMap<String, SequenceTracker>,
}

impl Runner {
    async fn run(mut self) {
        loop {
            let mut opts = SocketOptions::default();
            opts.connect_timeout(self.cfg.reconnect_interval);
            let mut sub = SubSocket::with_options(opts);
            let connected = match sub.connect(&self.cfg.endpoint).await {
                Ok(()) => sub.subscribe(&self.cfg.topic_filter).await,
                Err(e) => Err(e),
            };
            if let Err(e) = connected {
                tracing::debug!(endpoint = %self.cfg.endpoint, error = %e, "KV-event SUB connect failed");
                bump(&self.stats.reconnects, 1);
                if self.tx.is_closed() {
                    return;
                }
                tokio::time::sleep(self.cfg.reconnect_interval).await;
                continue;
            }
            loop {
                let msg = tokio::select! {
                    m = sub.recv() => m,
                    () = self.tx.closed() => return,
                };
                match msg {
                    Ok(m) => {
                        if self.on_message(m.into_vec()).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "KV-event SUB receive failed; reconnecting");
                        break;
                    }
                }
            }
            bump(&self.stats.reconnects, 1);
            tokio::time::sleep(self.cfg.reconnect_interval).await;
        }
    }

    async fn on_message(&mut self, frames: Vec<Bytes>) -> Result<(), Closed> {
        bump(&self.stats.messages, 1);
        let m = match Message::from_frames(frames) {
            Ok(m) => m,
            Err(_) => {
                bump(&self.stats.bad_frames, 1);
                return Ok(());
            }
        };
        let topic = String::from_utf8_lossy(&m.topic).into_owned();
        let start = self.cfg.start_seq;
        let verdict = self
            .trackers
            .entry(topic.clone())
            .or_insert_with(|| {
                start.map_or_else(SequenceTracker::new, SequenceTracker::resume_from)
            })
            .on_live(m.seq);
        match verdict {
            Verdict::Apply => self.emit(&topic, m.seq, &m.payload, false).await,
            Verdict::Duplicate => {
                bump(&self.stats.duplicates, 1);
                Ok(())
            }
            Verdict::Restarted => {
                bump(&self.stats.restarts, 1);
                self.send(Update::Restarted {
                    topic: topic.clone(),
                })
                .await?;
                // The new run counts from 0: fetch what the subscription missed of it.
                if m.seq > 0 {
                    bump(&self.stats.gaps, 1);
                    self.fill_gap(&topic, 0, m.seq).await?;
                }
                self.offer(&topic, m.seq, &m.payload, false).await
            }
            Verdict::Gap { from, to } => {
                bump(&self.stats.gaps, 1);
                self.fill_gap(&topic, from, to).await?;
                // The live batch itself, unless the replay already delivered it.
                self.offer(&topic, m.seq, &m.payload, false).await
            }
        }
    }

    /// Replays `from..` and applies what continues the stream.
    async fn fill_gap(&mut self, topic: &str, from: u64, to: u64) -> Result<(), Closed> {
        let Some(ep) = self.cfg.replay_endpoint.clone() else {
            return Ok(()); // `offer` reports the loss
        };
        match self.replay(&ep, from).await {
            Ok(items) => {
                bump(&self.stats.replays, 1);
                tracing::debug!(topic, from, to, items = items.len(), "KV-event replay");
                for (seq, payload) in items {
                    self.offer(topic, seq, &payload, true).await?;
                }
            }
            Err(e) => {
                bump(&self.stats.replay_failures, 1);
                tracing::warn!(topic, from, to, error = %e, "KV-event replay failed");
            }
        }
        Ok(())
    }

    /// Applies a batch if it is next, drops it if already applied, and accepts a loss
    /// first if something before it can no longer be had.
    async fn offer(
        &mut self,
        topic: &str,
        seq: u64,
        payload: &Bytes,
        replayed: bool,
    ) -> Result<(), Closed> {
        let tracker = self
            .trackers
            .get_mut(topic)
            .expect("tracker exists for a topic seen live");
        match tracker.on_replayed(seq) {
            Verdict::Apply => self.emit(topic, seq, payload, replayed).await,
            Verdict::Duplicate => {
                bump(&self.stats.duplicates, 1);
                Ok(())
            }
            Verdict::Gap { from, to } => {
                tracker.skip_to(to);
                let applied = tracker.on_replayed(seq);
                debug_assert_eq!(applied, Verdict::Apply);
                bump(&self.stats.lost, to - from);
                self.send(Update::Lost {
                    topic: topic.to_owned(),
                    from,
                    to,
                })
                .await?;
                self.emit(topic, seq, payload, replayed).await
            }
            Verdict::Restarted => unreachable!("on_replayed never reports a restart"),
        }
    }

    async fn emit(
        &mut self,
        topic: &str,
        seq: u64,
        payload: &Bytes,
        replayed: bool,
    ) -> Result<(), Closed> {
        match decode(payload) {
            Ok(d) => {
                bump(&self.stats.unknown_events, d.skipped.len() as u64);
                bump(&self.stats.batches, 1);
                if replayed {
                    bump(&self.stats.replayed, 1);
                }
                self.send(Update::Batch {
                    topic: topic.to_owned(),
                    seq,
                    batch: d.batch,
                    replayed,
                })
                .await
            }
            Err(e) => {
                tracing::debug!(topic, seq, error = %e, "undecodable KV-event batch");
                bump(&self.stats.decode_errors, 1);
                Ok(())
            }
        }
    }

    async fn send(&self, u: Update) -> Result<(), Closed> {
        self.tx.send(u).await.map_err(|_| Closed)
    }

    /// Asks the replay socket for everything from `from` on; returns it up to the end
    /// marker.
    async fn replay(&self, ep: &str, from: u64) -> Result<Vec<(u64, Bytes)>, ReplayError> {
        let mut opts = SocketOptions::default();
        opts.connect_timeout(self.cfg.replay_timeout);
        let mut dealer = DealerSocket::with_options(opts);
        dealer.connect(ep).await?;
        let req = ZmqMessage::try_from(replay_request(from)).expect("2 frames");
        dealer.send(req).await?;
        let mut items = Vec::new();
        loop {
            let msg = tokio::time::timeout(self.cfg.replay_timeout, dealer.recv())
                .await
                .map_err(|_| ReplayError::Timeout)??;
            match parse_replay_reply(&msg.into_vec())? {
                ReplayItem::End => return Ok(items),
                ReplayItem::Batch { seq, payload } => items.push((seq, payload)),
            }
        }
    }
}
