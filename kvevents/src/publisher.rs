//! The publishing side, as vLLM's `ZmqEventPublisher`: a PUB socket, sequence numbers
//! from 0, a ring buffer of the last `buffer_steps` payloads and an optional ROUTER that
//! replays from it.
//!
//! [`Publisher::publish`] never blocks the caller (the engine loop): batches go over an
//! unbounded queue to one task that encodes, numbers, buffers and sends them. A payload
//! enters the replay buffer before it is sent, so a subscriber that sees seq N and asks
//! for a replay always finds N there.
//!
//! vLLM's `hwm` and `max_queue_size` have no counterpart here: zmq.rs 0.6 has no PUB
//! high-water-mark option, and the queue to the sending task is unbounded so the engine
//! never blocks on a slow network. A subscriber that stalls its TCP connection can hold
//! up the sending task (zmq.rs waits for a partly written message), which then queues
//! batches in memory; replay covers what a subscriber misses, not this.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::frame::{Message, parse_replay_request, replay_end, replay_reply};
use crate::wire::{Encoding, EventBatch, HashFormat, encode_with};

/// vLLM's default PUB endpoint (`KVEventsConfig.endpoint`).
pub const DEFAULT_ENDPOINT: &str = "tcp://*:5557";
/// vLLM's default replay buffer length in batches (`KVEventsConfig.buffer_steps`).
pub const DEFAULT_BUFFER_STEPS: usize = 10_000;

/// How to publish.
#[derive(Debug, Clone)]
pub struct PublisherConfig {
    /// PUB endpoint; bound when it holds `*`, `::`, `ipc://` or `inproc://`, else connected.
    pub endpoint: String,
    /// ROUTER endpoint answering replay requests (always bound); `None` disables replay.
    pub replay_endpoint: Option<String>,
    /// Batches kept for replay.
    pub buffer_steps: usize,
    /// Topic frame of every message (llm-d expects `kv@<pod-ip>:<port>@<model>`).
    pub topic: String,
    /// Event layout.
    pub encoding: Encoding,
    /// Block hash layout.
    pub hash_format: HashFormat,
    /// Rank written into batches that carry none (vLLM fills its DP rank, 0 without DP).
    pub data_parallel_rank: i64,
    /// Bind the PUB even where vLLM's rule would connect (e.g. `tcp://127.0.0.1:5557`, to
    /// listen on loopback only).
    pub force_bind: bool,
}

impl PublisherConfig {
    /// vLLM's defaults on `endpoint` with `topic`: no replay, 10 000 batches, array
    /// encoding, integer hashes, rank 0.
    pub fn new(endpoint: impl Into<String>, topic: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            replay_endpoint: None,
            buffer_steps: DEFAULT_BUFFER_STEPS,
            topic: topic.into(),
            encoding: Encoding::Array,
            hash_format: HashFormat::Int,
            data_parallel_rank: 0,
            force_bind: false,
        }
    }
}

/// Whether vLLM would bind (rather than connect) a PUB on `endpoint`.
pub fn binds(endpoint: &str) -> bool {
    endpoint.contains('*')
        || endpoint.contains("::")
        || endpoint.starts_with("ipc://")
        || endpoint.starts_with("inproc://")
}

/// The endpoint zmq.rs can bind: libzmq's `*` host is the IPv4 wildcard.
fn bindable(endpoint: &str) -> String {
    endpoint.replacen("tcp://*:", "tcp://0.0.0.0:", 1)
}

/// `endpoint` with its TCP port moved up by `offset` (vLLM's data-parallel rank offset);
/// `None` when it has no numeric port.
pub fn offset_port(endpoint: &str, offset: u16) -> Option<String> {
    let i = endpoint.rfind(':')?;
    let port: u16 = endpoint[i + 1..].parse().ok()?;
    Some(format!("{}:{}", &endpoint[..i], port.checked_add(offset)?))
}

/// Why a publisher could not start; nothing is left running.
#[derive(Debug, thiserror::Error)]
pub enum PublisherError {
    /// Binding the PUB or ROUTER socket failed (port taken, bad address).
    #[error("cannot bind {endpoint}: {source}")]
    Bind {
        /// The endpoint.
        endpoint: String,
        /// The transport's error.
        #[source]
        source: zeromq::ZmqError,
    },
    /// The configuration cannot work.
    #[error("invalid publisher config: {0}")]
    Invalid(&'static str),
}

/// The publisher has shut down; the batch was not published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("KV-event publisher is closed")]
pub struct PublisherClosed;

/// Counters of one publisher.
#[derive(Debug, Default)]
pub struct PublisherStats {
    /// Batches sent on the PUB socket.
    pub published: AtomicU64,
    /// Sends the transport refused (the batch stays in the replay buffer).
    pub send_errors: AtomicU64,
    /// Replay requests answered.
    pub replays_served: AtomicU64,
    /// Replay requests with a bad layout, ignored.
    pub bad_replay_requests: AtomicU64,
}

type Buffer = Arc<Mutex<VecDeque<(u64, Bytes)>>>;

/// A running publisher; dropping it stops its tasks after the queued batches are sent.
#[derive(Debug)]
pub struct Publisher {
    tx: mpsc::UnboundedSender<EventBatch>,
    port: Option<u16>,
    replay_port: Option<u16>,
    stats: Arc<PublisherStats>,
    task: Option<JoinHandle<()>>,
    replay_task: Option<JoinHandle<()>>,
    /// Tells the replay task to close its socket and end.
    stop_replay: Option<oneshot::Sender<()>>,
}

fn tcp_port(ep: &zeromq::Endpoint) -> Option<u16> {
    match ep {
        zeromq::Endpoint::Tcp(_, port) => Some(*port),
        _ => None,
    }
}

impl Publisher {
    /// Opens the sockets (binding now, so a taken port is an error here) and starts the
    /// sending task; a connecting PUB connects in the background and queues until then.
    pub async fn start(cfg: PublisherConfig) -> Result<Publisher, PublisherError> {
        if cfg.buffer_steps == 0 && cfg.replay_endpoint.is_some() {
            return Err(PublisherError::Invalid("replay needs buffer_steps > 0"));
        }
        let mut pub_socket = PubSocket::new();
        let mut port = None;
        let connect_to = if cfg.force_bind || binds(&cfg.endpoint) {
            let ep = pub_socket
                .bind(&bindable(&cfg.endpoint))
                .await
                .map_err(|source| PublisherError::Bind {
                    endpoint: cfg.endpoint.clone(),
                    source,
                })?;
            port = tcp_port(&ep);
            None
        } else {
            Some(cfg.endpoint.clone())
        };
        let buffer: Buffer = Arc::new(Mutex::new(VecDeque::new()));
        let stats = Arc::new(PublisherStats::default());
        let mut replay_port = None;
        let (stop_replay, stop_rx) = oneshot::channel();
        let replay_task =
            match &cfg.replay_endpoint {
                Some(ep) => {
                    let mut router = RouterSocket::new();
                    let bound = router.bind(&bindable(ep)).await.map_err(|source| {
                        PublisherError::Bind {
                            endpoint: ep.clone(),
                            source,
                        }
                    })?;
                    replay_port = tcp_port(&bound);
                    Some(tokio::spawn(serve_replay(
                        router,
                        buffer.clone(),
                        stats.clone(),
                        stop_rx,
                    )))
                }
                None => None,
            };
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(pub_socket, connect_to, rx, cfg, buffer, stats.clone()));
        Ok(Publisher {
            tx,
            port,
            replay_port,
            stats,
            task: Some(task),
            replay_task,
            stop_replay: Some(stop_replay),
        })
    }

    /// Queues `batch` for sending; returns at once.
    pub fn publish(&self, batch: EventBatch) -> Result<(), PublisherClosed> {
        self.tx.send(batch).map_err(|_| PublisherClosed)
    }

    /// TCP port the PUB socket is bound to (the real one when the endpoint said port 0).
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// TCP port the replay ROUTER is bound to.
    pub fn replay_port(&self) -> Option<u16> {
        self.replay_port
    }

    /// Counters.
    pub fn stats(&self) -> &Arc<PublisherStats> {
        &self.stats
    }

    /// Sends what is queued, then closes the sockets; when it returns, the ports are free
    /// to bind again (a restarted pod reuses them).
    pub async fn shutdown(mut self) {
        let (closed, _) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.tx, closed));
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        if let Some(stop) = self.stop_replay.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.replay_task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        // The sending task ends by itself once the queue is drained (the sender is gone);
        // the ROUTER would wait for requests forever unless told to stop.
        if let Some(stop) = self.stop_replay.take() {
            let _ = stop.send(());
        }
    }
}

async fn run(
    mut socket: PubSocket,
    connect_to: Option<String>,
    mut rx: mpsc::UnboundedReceiver<EventBatch>,
    cfg: PublisherConfig,
    buffer: Buffer,
    stats: Arc<PublisherStats>,
) {
    if let Some(ep) = connect_to {
        // vLLM's "connect" mode: the peer binds; keep trying as libzmq would.
        while let Err(e) = socket.connect(&ep).await {
            tracing::warn!(endpoint = %ep, error = %e, "KV-event PUB connect failed; retrying");
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }
    let topic = Bytes::from(cfg.topic.clone().into_bytes());
    let mut seq: u64 = 0;
    while let Some(mut batch) = rx.recv().await {
        if batch.data_parallel_rank.is_none() {
            batch.data_parallel_rank = Some(cfg.data_parallel_rank);
        }
        let payload = Bytes::from(encode_with(&batch, cfg.encoding, cfg.hash_format));
        if cfg.buffer_steps > 0 {
            let mut b = buffer.lock().expect("replay buffer lock");
            if b.len() == cfg.buffer_steps {
                b.pop_front();
            }
            b.push_back((seq, payload.clone()));
        }
        let msg = Message {
            topic: topic.clone(),
            seq,
            payload,
        };
        seq += 1;
        let frames = ZmqMessage::try_from(msg.to_frames()).expect("3 frames");
        match socket.send(frames).await {
            Ok(()) => stats.published.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                tracing::debug!(error = %e, "KV-event PUB send failed");
                stats.send_errors.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
    let _ = socket.close().await;
}

async fn serve_replay(
    mut router: RouterSocket,
    buffer: Buffer,
    stats: Arc<PublisherStats>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        let msg = tokio::select! {
            m = router.recv() => m,
            _ = &mut stop => break,
        };
        let msg = match msg {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "KV-event replay socket failed");
                break;
            }
        };
        let frames = msg.into_vec();
        let Ok((identity, start)) = parse_replay_request(&frames) else {
            stats.bad_replay_requests.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        // Copy out under the lock (cheap: Bytes are shared), send without it.
        let items: Vec<(u64, Bytes)> = buffer
            .lock()
            .expect("replay buffer lock")
            .iter()
            .filter(|(s, _)| *s >= start)
            .cloned()
            .collect();
        let mut ok = true;
        for (s, p) in &items {
            let m = ZmqMessage::try_from(replay_reply(&identity, *s, p)).expect("4 frames");
            if router.send(m).await.is_err() {
                ok = false;
                break;
            }
        }
        if ok {
            let m = ZmqMessage::try_from(replay_end(&identity)).expect("4 frames");
            let _ = router.send(m).await;
            stats.replays_served.fetch_add(1, Ordering::Relaxed);
        }
    }
    let _ = router.close().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_or_connect_like_vllm() {
        assert!(binds("tcp://*:5557"));
        assert!(binds("tcp://[::]:5557"));
        assert!(binds("ipc:///tmp/kv"));
        assert!(binds("inproc://kv"));
        assert!(!binds("tcp://10.0.0.1:5557"));
        assert_eq!(bindable("tcp://*:5557"), "tcp://0.0.0.0:5557");
        assert_eq!(
            offset_port("tcp://*:5557", 3).as_deref(),
            Some("tcp://*:5560")
        );
        assert_eq!(offset_port("tcp://*:65535", 1), None);
        assert_eq!(offset_port("inproc://kv", 1), None);
    }
}
