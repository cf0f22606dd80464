//! The driver of `burst-prefix-cache-producer`: one owner task holds the sans-IO
//! [`BurstWindow`] and request tasks wait on it after flow control and before the owner
//! lookup and scheduling, as llm-d's producer holds each request in `PrepareRequestData`.
//!
//! ```text
//!  request task ── Offer{id, hashes, replicas, reply} ──▶ owner task ── BurstWindow::offer
//!       │  (drop: Withdraw(id)) ─────────────────────────▶     │        BurstWindow::withdraw
//!       │                                                       │ at the window's deadline:
//!       │                                                       │   due → assign (jointly)
//!       ◀── Some(placed endpoint) | None (no affinity) ─────────┘
//! ```
//!
//! The gate belongs to one policy snapshot and starts its task on first use, so a policy
//! without the producer costs nothing and a policy built outside a runtime (tools, tests)
//! still works. When the snapshot is replaced and the last request holding it is done,
//! the channel closes and the task places what it still holds at once and ends.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use infermesh_scheduler::config::params::BurstPrefixParams;
use infermesh_scheduler::plugins::burst::{BurstWindow, Held, Replica, assign};
use infermesh_scheduler::prefix::BlockHash;
use tokio::sync::{mpsc, oneshot};

/// A request's wait for its batch window: the endpoint its batch placed it on, or `None`
/// when it got no placement. Dropping it frees the request's place in the batch.
pub type BurstWait = Pin<Box<dyn Future<Output = Option<SocketAddr>> + Send>>;

enum Input {
    Offer {
        id: u64,
        hashes: Vec<BlockHash>,
        replicas: Vec<Replica>,
        reply: oneshot::Sender<Option<SocketAddr>>,
    },
    Withdraw(u64),
}

/// The handle request tasks wait on (one per policy snapshot with the producer).
#[derive(Debug)]
pub struct BurstGate {
    params: BurstPrefixParams,
    tx: OnceLock<mpsc::UnboundedSender<Input>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Input::Offer { id, .. } => write!(f, "Offer({id})"),
            Input::Withdraw(id) => write!(f, "Withdraw({id})"),
        }
    }
}

/// Withdraws a request that stops waiting before its batch is placed (client gone).
struct WithdrawOnDrop {
    tx: mpsc::UnboundedSender<Input>,
    id: u64,
    answered: bool,
}

impl WithdrawOnDrop {
    /// The request was answered: nothing to withdraw.
    fn disarm(&mut self) {
        self.answered = true;
    }
}

impl Drop for WithdrawOnDrop {
    fn drop(&mut self) {
        if !self.answered {
            let _ = self.tx.send(Input::Withdraw(self.id));
        }
    }
}

impl BurstGate {
    /// A gate for these (validated) parameters; its task starts on the first wait.
    pub fn new(params: BurstPrefixParams) -> BurstGate {
        BurstGate {
            params,
            tx: OnceLock::new(),
            next_id: AtomicU64::new(0),
        }
    }

    /// The producer's parameters.
    pub fn params(&self) -> &BurstPrefixParams {
        &self.params
    }

    fn sender(&self) -> &mpsc::UnboundedSender<Input> {
        self.tx.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let owner = Owner {
                params: self.params.clone(),
                window: BurstWindow::new(&self.params),
                waiting: HashMap::new(),
            };
            tokio::spawn(owner.run(rx));
            tx
        })
    }

    /// Holds a request with prefix blocks `hashes`, schedulable on `replicas`, until its
    /// window closes; then where its batch placed it. A request the window cannot take
    /// (`maxBatchSize` reached) goes on at once without placement, as llm-d's producer
    /// errors and the request is scheduled without its data. Must run on a tokio runtime.
    pub fn hold(&self, hashes: Vec<BlockHash>, replicas: Vec<Replica>) -> BurstWait {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let tx = self.sender().clone();
        let (reply, rx) = oneshot::channel();
        let sent = tx
            .send(Input::Offer {
                id,
                hashes,
                replicas,
                reply,
            })
            .is_ok();
        // Made before the first poll, so a wait dropped unpolled still frees its place.
        let mut guard = WithdrawOnDrop {
            tx,
            id,
            answered: !sent,
        };
        Box::pin(async move {
            if guard.answered {
                return None;
            }
            let placed = rx.await.ok().flatten();
            guard.disarm();
            placed
        })
    }
}

struct Owner {
    params: BurstPrefixParams,
    window: BurstWindow<u64>,
    /// Each held request's replicas and reply.
    waiting: HashMap<u64, (Vec<Replica>, oneshot::Sender<Option<SocketAddr>>)>,
}

impl Owner {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Input>) {
        loop {
            let deadline = self.window.deadline();
            let sleep = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                msg = rx.recv() => {
                    let Some(msg) = msg else { break };
                    self.handle(msg);
                }
                () = sleep => {
                    if let Some(batch) = self.window.due(Instant::now()) {
                        self.place(batch);
                    }
                }
            }
        }
        // The gate is gone: place what is held now rather than strand it.
        if let Some(d) = self.window.deadline()
            && let Some(batch) = self.window.due(d)
        {
            self.place(batch);
        }
    }

    fn handle(&mut self, msg: Input) {
        match msg {
            Input::Offer {
                id,
                hashes,
                replicas,
                reply,
            } => match self.window.offer(id, hashes, Instant::now()) {
                Ok(()) => {
                    self.waiting.insert(id, (replicas, reply));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "request not batched");
                    let _ = reply.send(None);
                }
            },
            Input::Withdraw(id) => {
                self.window.withdraw(&id);
                self.waiting.remove(&id);
            }
        }
    }

    /// Places a sealed batch jointly and answers every request in it. Like llm-d, the
    /// batch is placed over the first request's endpoints; a request whose own candidates
    /// lack its endpoint simply finds no match there.
    fn place(&mut self, batch: Vec<Held<u64>>) {
        let Some(replicas) = batch
            .first()
            .and_then(|h| self.waiting.get(&h.ticket))
            .map(|(r, _)| r.clone())
        else {
            return;
        };
        let placed = assign(&batch, &replicas, &self.params);
        for (h, at) in batch.iter().zip(placed) {
            if let Some((_, reply)) = self.waiting.remove(&h.ticket) {
                let _ = reply.send(at.map(|i| replicas[i].addr));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn replicas() -> Vec<Replica> {
        (1..=3)
            .map(|i| Replica {
                addr: SocketAddr::from(([10, 0, 0, i], 8000)),
                running: 0,
            })
            .collect()
    }

    fn window(ms: i64, max_batch_size: i64) -> BurstPrefixParams {
        BurstPrefixParams {
            window_duration_ms: ms,
            max_batch_size,
            ..BurstPrefixParams::default()
        }
    }

    #[tokio::test]
    async fn requests_in_one_window_are_placed_together_at_its_end() {
        let gate = BurstGate::new(window(100, 1000));
        let start = Instant::now();
        let a = tokio::spawn(gate.hold(vec![1, 2, 3], replicas()));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let b = tokio::spawn(gate.hold(vec![1, 2, 3], replicas()));
        let lone = tokio::spawn(gate.hold(vec![9], replicas()));
        let (a, b, lone) = (a.await.unwrap(), b.await.unwrap(), lone.await.unwrap());
        // Released together when the first arrival's 100 ms window closed.
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(100), "{waited:?}");
        assert!(a.is_some() && a == b, "{a:?} {b:?}");
        assert_eq!(lone, None, "a lone prompt gets no placement");
    }

    #[tokio::test]
    async fn a_dropped_wait_frees_its_place() {
        let gate = BurstGate::new(window(100, 1));
        let first = gate.hold(vec![1], replicas());
        // The client goes away before its window closes (the wait was never polled).
        drop(first);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let start = Instant::now();
        let second = gate.hold(vec![1], replicas()).await;
        // The second was taken into the window (it waited), not refused as over the cap.
        assert!(start.elapsed() >= Duration::from_millis(50));
        assert_eq!(second, None);
    }

    #[tokio::test]
    async fn past_max_batch_size_a_request_goes_on_at_once() {
        let gate = BurstGate::new(window(1000, 1));
        let first = tokio::spawn(gate.hold(vec![1], replicas()));
        let start = Instant::now();
        assert_eq!(gate.hold(vec![1], replicas()).await, None);
        assert!(start.elapsed() < Duration::from_millis(500));
        assert_eq!(first.await.unwrap(), None);
    }
}
