//! Group commit of policy writes: while earlier log entries are being appended and applied,
//! arriving writes queue up, and the next entry carries all of them (bounded in count and
//! bytes) as one [`PolicyOp::Batch`]. Each request keeps its own all-or-none semantics and
//! its own answer; the state machine applies them in batch order.
//!
//! [`WriteBatcher`] is the sans-IO core: it is fed writes and completions and hands out
//! batches; the store's writer task ([`run_writer`]) owns it, submits its batches to Raft and
//! routes the answers back to each caller.

use std::collections::VecDeque;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use openraft::error::ClientWriteError;
use tokio::sync::{mpsc, oneshot};

use crate::error::WriteError;
use crate::policy::{PolicyOp, PolicyRequest, PolicyResponse};
use crate::types::{Node, NodeId, Raft};

use super::Applied;

/// Bounds of the leader's write batching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Most client requests in one log entry.
    pub max_requests: NonZeroUsize,
    /// Most encoded request bytes in one log entry (a single larger request still goes,
    /// alone).
    pub max_bytes: NonZeroUsize,
    /// Log entries submitted to Raft and not yet answered; more writes wait and batch up.
    pub max_in_flight: NonZeroUsize,
}

/// A batch handed out by [`WriteBatcher::poll_batch`]: the log entry to submit and the
/// waiters of its requests, in order.
#[derive(Debug)]
pub struct Batch<W> {
    /// The entry: the request itself when alone (the pre-batching format), otherwise one
    /// [`PolicyOp::Batch`] of all of them.
    pub entry: PolicyRequest,
    /// One waiter per request, in the order the state machine answers them.
    pub waiters: Vec<W>,
}

/// The answer to a batch entry did not have one response per request; nothing can be said
/// about which of them applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a log entry of {requests} requests was answered with {answers} responses")]
pub struct AnswerMismatch {
    /// Requests in the entry.
    pub requests: usize,
    /// Responses received.
    pub answers: usize,
}

impl<W> Batch<W> {
    /// Pairs each waiter with its own response out of the state machine's answer to the
    /// entry.
    pub fn split_answer(
        waiters: Vec<W>,
        answer: PolicyResponse,
    ) -> Vec<(W, Result<PolicyResponse, AnswerMismatch>)> {
        let requests = waiters.len();
        if requests == 1 && !matches!(answer, PolicyResponse::Batch(_)) {
            return waiters.into_iter().zip([Ok(answer)]).collect();
        }
        match answer {
            PolicyResponse::Batch(answers) if answers.len() == requests && requests > 1 => waiters
                .into_iter()
                .zip(answers.into_iter().map(Ok))
                .collect(),
            PolicyResponse::Batch(answers) => {
                let mismatch = AnswerMismatch {
                    requests,
                    answers: answers.len(),
                };
                waiters
                    .into_iter()
                    .map(|w| (w, Err(mismatch.clone())))
                    .collect()
            }
            _ => {
                let mismatch = AnswerMismatch {
                    requests,
                    answers: 1,
                };
                waiters
                    .into_iter()
                    .map(|w| (w, Err(mismatch.clone())))
                    .collect()
            }
        }
    }
}

struct Queued<W> {
    request: PolicyRequest,
    bytes: usize,
    waiter: W,
}

/// The sans-IO write batcher: queued writes in arrival order, and how many entries are in
/// flight. `W` is whatever the driver needs to answer a caller.
pub struct WriteBatcher<W> {
    limits: BatchLimits,
    queue: VecDeque<Queued<W>>,
    in_flight: usize,
}

impl<W> std::fmt::Debug for WriteBatcher<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteBatcher")
            .field("queued", &self.queue.len())
            .field("in_flight", &self.in_flight)
            .finish()
    }
}

impl<W> WriteBatcher<W> {
    /// An empty batcher.
    pub fn new(limits: BatchLimits) -> Self {
        WriteBatcher {
            limits,
            queue: VecDeque::new(),
            in_flight: 0,
        }
    }

    /// Queues one client request of `bytes` encoded bytes, answered through `waiter`.
    pub fn handle_write(&mut self, request: PolicyRequest, bytes: usize, waiter: W) {
        self.queue.push_back(Queued {
            request,
            bytes,
            waiter,
        });
    }

    /// An entry handed out by `poll_batch` was answered (or failed).
    pub fn handle_done(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// Whether the driver should pull more writes in: the queue holds less than a full
    /// batch (the rest wait in the driver's bounded channel, which pushes back on callers).
    pub fn wants_more(&self) -> bool {
        self.queue.len() < self.limits.max_requests.get()
    }

    /// Requests queued and not yet handed out.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Entries handed out and not yet done.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The next entry to submit, if a slot is free and anything is queued: the oldest
    /// requests, up to the count and byte bounds (at least one).
    pub fn poll_batch(&mut self) -> Option<Batch<W>> {
        if self.in_flight >= self.limits.max_in_flight.get() || self.queue.is_empty() {
            return None;
        }
        let mut bytes = 0;
        let mut take = 0;
        for q in &self.queue {
            if take == self.limits.max_requests.get()
                || (take > 0 && bytes + q.bytes > self.limits.max_bytes.get())
            {
                break;
            }
            bytes += q.bytes;
            take += 1;
        }
        self.in_flight += 1;
        let mut requests = Vec::with_capacity(take);
        let mut waiters = Vec::with_capacity(take);
        for q in self.queue.drain(..take) {
            requests.push(q.request);
            waiters.push(q.waiter);
        }
        let entry = if requests.len() == 1 {
            requests.pop().expect("one request")
        } else {
            PolicyRequest {
                ops: vec![PolicyOp::Batch(requests)],
            }
        };
        Some(Batch { entry, waiters })
    }
}

/// One caller's answer channel.
pub(super) type Reply = oneshot::Sender<Result<Applied, WriteError>>;

/// A write handed to the writer task.
pub(super) struct Submitted {
    pub(super) request: PolicyRequest,
    pub(super) bytes: usize,
    pub(super) reply: Reply,
}

/// Raft stopped before answering a submitted entry.
#[derive(Debug, thiserror::Error)]
#[error("raft stopped before answering the write")]
struct Dropped;

/// A submitted entry was neither applied nor refused in time (a leader that lost its
/// quorum keeps its uncommitted entries pending); it may still commit later.
#[derive(Debug, thiserror::Error)]
#[error("no answer from raft within {waited_ms} ms; the write may still commit")]
struct NoAnswer {
    waited_ms: u64,
}

/// Queues `first` and everything already waiting on `rx`, up to one full batch.
pub(super) fn take_queued(
    first: Submitted,
    rx: &mut mpsc::Receiver<Submitted>,
    batcher: &mut WriteBatcher<Reply>,
) {
    batcher.handle_write(first.request, first.bytes, first.reply);
    while batcher.wants_more() {
        match rx.try_recv() {
            Ok(s) => batcher.handle_write(s.request, s.bytes, s.reply),
            Err(_) => break,
        }
    }
}

/// One failure shared by every request of an entry.
#[derive(Debug, Clone, thiserror::Error)]
#[error(transparent)]
pub(super) struct Shared(Arc<dyn std::error::Error + Send + Sync>);

/// Why a whole entry failed; every request of it gets the same answer.
#[derive(Debug, Clone)]
pub(super) enum EntryFailed {
    NotLeader {
        leader: Option<NodeId>,
        leader_node: Option<Node>,
    },
    Unavailable(Shared),
}

impl EntryFailed {
    pub(super) fn unavailable(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        EntryFailed::Unavailable(Shared(Arc::new(e)))
    }
}

impl From<EntryFailed> for WriteError {
    fn from(e: EntryFailed) -> Self {
        match e {
            EntryFailed::NotLeader {
                leader,
                leader_node,
            } => WriteError::NotLeader {
                leader,
                leader_node,
            },
            EntryFailed::Unavailable(s) => WriteError::Unavailable(Box::new(s)),
        }
    }
}

fn to_result(resp: PolicyResponse) -> Result<Applied, WriteError> {
    match resp {
        PolicyResponse::Applied { index, changes } => Ok(Applied { index, changes }),
        PolicyResponse::Rejected(r) => Err(WriteError::Rejected(r)),
        PolicyResponse::Noop | PolicyResponse::Batch(_) => {
            Err(WriteError::Unavailable(Box::new(AnswerMismatch {
                requests: 1,
                answers: 0,
            })))
        }
    }
}

fn answer(waiters: Vec<Reply>, outcome: Result<PolicyResponse, EntryFailed>) {
    match outcome {
        Ok(resp) => {
            for (w, r) in Batch::split_answer(waiters, resp) {
                let r = r
                    .map_err(|e| WriteError::Unavailable(Box::new(e)))
                    .and_then(to_result);
                // A caller that gave up no longer listens.
                let _ = w.send(r);
            }
        }
        Err(e) => {
            for w in waiters {
                let _ = w.send(Err(e.clone().into()));
            }
        }
    }
}

/// The writer task: owns the batcher, pulls writes from `rx`, keeps up to `max_in_flight`
/// entries in Raft, answers every caller. An entry not answered within `answer_timeout`
/// gives up its slot (its callers get `Unavailable`), so entries stuck on a leader that lost
/// its quorum never hold up the writes after them. Ends when every sender is gone and
/// nothing is in flight.
pub(super) async fn run_writer(
    raft: Raft,
    limits: BatchLimits,
    answer_timeout: Duration,
    mut rx: mpsc::Receiver<Submitted>,
) {
    let mut batcher: WriteBatcher<Reply> = WriteBatcher::new(limits);
    let mut in_flight = FuturesUnordered::new();
    let mut open = true;
    loop {
        // Hand out whatever may go now. Each entry is enqueued in Raft here, so entries
        // reach the log in hand-out order; only the wait for the answer runs concurrently.
        while let Some(Batch { entry, waiters }) = batcher.poll_batch() {
            match raft.client_write_ff(entry).await {
                Ok(rx) => in_flight.push(async move {
                    let outcome = match tokio::time::timeout(answer_timeout, rx).await {
                        Err(_) => Err(EntryFailed::unavailable(NoAnswer {
                            waited_ms: answer_timeout.as_millis() as u64,
                        })),
                        Ok(Ok(Ok(resp))) => Ok(resp.data),
                        Ok(Ok(Err(ClientWriteError::ForwardToLeader(f)))) => {
                            Err(EntryFailed::NotLeader {
                                leader: f.leader_id,
                                leader_node: f.leader_node,
                            })
                        }
                        Ok(Ok(Err(e))) => Err(EntryFailed::unavailable(e)),
                        Ok(Err(_)) => Err(EntryFailed::unavailable(Dropped)),
                    };
                    (waiters, outcome)
                }),
                Err(fatal) => {
                    batcher.handle_done();
                    answer(waiters, Err(EntryFailed::unavailable(fatal)));
                }
            }
        }
        if !open && in_flight.is_empty() && batcher.queued() == 0 {
            return;
        }
        tokio::select! {
            Some((waiters, outcome)) = in_flight.next(), if !in_flight.is_empty() => {
                batcher.handle_done();
                answer(waiters, outcome);
            }
            got = rx.recv(), if open && batcher.wants_more() => match got {
                Some(s) => take_queued(s, &mut rx, &mut batcher),
                None => open = false,
            },
            // Unreachable by the checks above (something queued always has a free slot or
            // an answer to wait for); ending drops the waiters, whose callers see Unavailable.
            else => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Kind, ObjectChange, ObjectKey, Rejection, TokenHash};

    fn limits(requests: usize, bytes: usize, in_flight: usize) -> BatchLimits {
        BatchLimits {
            max_requests: NonZeroUsize::new(requests).unwrap(),
            max_bytes: NonZeroUsize::new(bytes).unwrap(),
            max_in_flight: NonZeroUsize::new(in_flight).unwrap(),
        }
    }

    fn req(n: u8) -> PolicyRequest {
        PolicyRequest {
            ops: vec![PolicyOp::AddTokens(vec![TokenHash([n; 32])])],
        }
    }

    #[test]
    fn a_lone_write_goes_as_itself_and_later_ones_wait_for_a_free_slot() {
        let mut b = WriteBatcher::new(limits(256, 1 << 20, 1));
        assert!(b.poll_batch().is_none());
        b.handle_write(req(1), 40, 1);
        let first = b.poll_batch().unwrap();
        assert_eq!(first.entry, req(1), "alone: the pre-batching entry format");
        assert_eq!(first.waiters, vec![1]);
        for n in 2..=4 {
            b.handle_write(req(n), 40, u32::from(n));
        }
        assert!(b.poll_batch().is_none(), "the only slot is in flight");
        b.handle_done();
        let second = b.poll_batch().unwrap();
        assert_eq!(second.waiters, vec![2, 3, 4]);
        assert_eq!(second.entry.batch().unwrap(), &[req(2), req(3), req(4)]);
    }

    #[test]
    fn batches_respect_count_and_bytes_but_always_take_one() {
        let mut b = WriteBatcher::new(limits(3, 100, 8));
        for n in 0..5 {
            b.handle_write(req(n), 30, n);
        }
        b.handle_write(req(9), 500, 9);
        b.handle_write(req(10), 30, 10);
        assert_eq!(b.poll_batch().unwrap().waiters, vec![0, 1, 2]);
        // Count bound 3, byte bound 100: 3+4 (60) then the 500-byte one would overflow.
        assert_eq!(b.poll_batch().unwrap().waiters, vec![3, 4]);
        assert_eq!(
            b.poll_batch().unwrap().waiters,
            vec![9],
            "too big, but goes alone"
        );
        assert_eq!(b.poll_batch().unwrap().waiters, vec![10]);
        assert!(b.poll_batch().is_none());
        assert_eq!(b.in_flight(), 4);
        assert!(b.wants_more());
    }

    #[test]
    fn the_queue_stops_pulling_at_one_full_batch() {
        let mut b = WriteBatcher::new(limits(2, 1000, 1));
        b.handle_write(req(0), 1, 0);
        assert!(b.wants_more());
        b.handle_write(req(1), 1, 1);
        assert!(!b.wants_more());
    }

    #[test]
    fn answers_are_split_per_request_and_mismatches_are_errors() {
        let key = ObjectKey::new(Kind::InferenceObjective, "default", "a");
        let applied = PolicyResponse::Applied {
            index: 7,
            changes: vec![ObjectChange {
                key: key.clone(),
                action: crate::policy::ChangeAction::Created,
                resource_version: Some(7),
            }],
        };
        let rejected = PolicyResponse::Rejected(Rejection::NotFound { key });
        let split = Batch::split_answer(
            vec!['a', 'b'],
            PolicyResponse::Batch(vec![applied.clone(), rejected.clone()]),
        );
        assert_eq!(split, vec![('a', Ok(applied.clone())), ('b', Ok(rejected))]);
        assert_eq!(
            Batch::split_answer(vec!['a'], applied.clone()),
            vec![('a', Ok(applied.clone()))]
        );
        let short = Batch::split_answer(vec!['a', 'b'], PolicyResponse::Batch(vec![applied]));
        assert!(short.iter().all(|(_, r)| r.is_err()));
    }
}
