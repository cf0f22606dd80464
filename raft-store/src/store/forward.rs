//! Batched forwarding of writes from a follower to the leader: writes that arrive while
//! earlier forwards are in flight queue up and travel together in one `WriteBatch`
//! message (bounded like the leader's entries, by [`WriteBatcher`]); the leader hands each
//! to its own writer, so they join its group commit, and answers each on its own.
//!
//! Where a queued batch goes is decided when it is sent, from the Raft metrics then: to the
//! leader, or to this node's own writer if it has become the leader meanwhile. Nothing has
//! been appended for these writes before that point, so none is ever appended twice.

use std::sync::Arc;

use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use tokio::sync::{mpsc, oneshot};

use crate::error::WriteError;
use crate::network::{self, ForwardRefused, RaftReply, RaftRpc, RaftTransport};
use crate::policy::{PolicyRequest, PolicyResponse};
use crate::types::{NodeId, Raft};

use super::batch::{
    AnswerMismatch, Batch, BatchLimits, EntryFailed, Reply, Submitted, WriteBatcher,
};
use super::{Applied, RemoteReason, WriterStopped};

/// What the forwarder needs of its store.
pub(super) struct ForwardContext {
    pub(super) id: NodeId,
    pub(super) raft: Raft,
    pub(super) transport: Arc<dyn RaftTransport>,
    /// This node's own writer, for batches that find this node leading.
    pub(super) writes: mpsc::Sender<Submitted>,
}

/// A forwarded write's answer as it travels back on the wire.
pub(super) fn to_wire(r: Result<Applied, WriteError>) -> Result<PolicyResponse, ForwardRefused> {
    match r {
        Ok(a) => Ok(PolicyResponse::Applied {
            index: a.index,
            changes: a.changes,
        }),
        Err(WriteError::Rejected(r)) => Ok(PolicyResponse::Rejected(r)),
        Err(WriteError::NotLeader {
            leader,
            leader_node,
        }) => Err(ForwardRefused::NotLeader {
            leader,
            leader_node,
        }),
        Err(e) => Err(ForwardRefused::Unavailable {
            reason: e.to_string(),
        }),
    }
}

/// A forwarded write's answer as the caller gets it.
pub(super) fn from_wire(r: Result<PolicyResponse, ForwardRefused>) -> Result<Applied, WriteError> {
    match r {
        Ok(PolicyResponse::Applied { index, changes }) => Ok(Applied { index, changes }),
        Ok(PolicyResponse::Rejected(r)) => Err(WriteError::Rejected(r)),
        Ok(PolicyResponse::Noop | PolicyResponse::Batch(_)) => {
            Err(WriteError::Unavailable(Box::new(AnswerMismatch {
                requests: 1,
                answers: 0,
            })))
        }
        Err(ForwardRefused::NotLeader {
            leader,
            leader_node,
        }) => Err(WriteError::NotLeader {
            leader,
            leader_node,
        }),
        Err(ForwardRefused::Unavailable { reason }) => {
            Err(WriteError::Unavailable(Box::new(RemoteReason(reason))))
        }
    }
}

/// Hands `requests` to `writes` in order and waits for every answer.
pub(super) async fn submit_all(
    writes: &mpsc::Sender<Submitted>,
    requests: Vec<PolicyRequest>,
) -> Vec<Result<Applied, WriteError>> {
    let mut answers = Vec::with_capacity(requests.len());
    for request in requests {
        let bytes = postcard::experimental::serialized_size(&request).unwrap_or(0);
        let (reply, answer) = oneshot::channel();
        let sent = writes
            .send(Submitted {
                request,
                bytes,
                reply,
            })
            .await;
        answers.push(sent.map(|()| answer));
    }
    let mut out = Vec::with_capacity(answers.len());
    for a in answers {
        out.push(match a {
            Ok(answer) => answer
                .await
                .unwrap_or_else(|_| Err(WriteError::Unavailable(Box::new(WriterStopped)))),
            Err(_) => Err(WriteError::Unavailable(Box::new(WriterStopped))),
        });
    }
    out
}

/// Sends one batch where the metrics say the leader is, and returns one answer per write.
async fn send(
    ctx: &ForwardContext,
    requests: Vec<PolicyRequest>,
) -> Result<Vec<Result<Applied, WriteError>>, EntryFailed> {
    let (leader, node) = {
        let m = ctx.raft.metrics();
        let m = m.borrow();
        let leader = m.current_leader;
        let node = leader.and_then(|l| m.membership_config.membership().get_node(&l).cloned());
        (leader, node)
    };
    let (leader, node) = match (leader, node) {
        (Some(l), _) if l == ctx.id => return Ok(submit_all(&ctx.writes, requests).await),
        (Some(l), Some(n)) => (l, n),
        (leader, leader_node) => {
            return Err(EntryFailed::NotLeader {
                leader,
                leader_node,
            });
        }
    };
    let count = requests.len();
    // A lone write goes as the single-write message, as before batching.
    let rpc = if count == 1 {
        RaftRpc::Write(requests.into_iter().next().expect("one request"))
    } else {
        RaftRpc::WriteBatch(requests)
    };
    let reply = network::call(ctx.transport.as_ref(), leader, &node, rpc)
        .await
        .map_err(EntryFailed::unavailable)?;
    match reply {
        RaftReply::Write(answer) if count == 1 => Ok(vec![from_wire(answer)]),
        RaftReply::WriteBatch(answers) if answers.len() == count => {
            Ok(answers.into_iter().map(from_wire).collect())
        }
        RaftReply::WriteBatch(answers) => Err(EntryFailed::unavailable(AnswerMismatch {
            requests: count,
            answers: answers.len(),
        })),
        other => Err(EntryFailed::unavailable(RemoteReason(format!(
            "unexpected reply to forwarded writes: {other:?}"
        )))),
    }
}

type InFlight = BoxFuture<
    'static,
    (
        Vec<Reply>,
        Result<Vec<Result<Applied, WriteError>>, EntryFailed>,
    ),
>;

/// The forwarder task: owns a batcher of forwarded writes, keeps up to `max_in_flight`
/// batches on the way, answers every caller. Ends when every sender is gone and nothing
/// is in flight.
pub(super) async fn run_forwarder(
    ctx: ForwardContext,
    limits: BatchLimits,
    mut rx: mpsc::Receiver<Submitted>,
) {
    let ctx = Arc::new(ctx);
    let mut batcher: WriteBatcher<Reply> = WriteBatcher::new(limits);
    let mut in_flight: FuturesUnordered<InFlight> = FuturesUnordered::new();
    let mut open = true;
    loop {
        while let Some(Batch { entry, waiters }) = batcher.poll_batch() {
            let ctx = ctx.clone();
            in_flight.push(Box::pin(async move {
                let answers = send(&ctx, entry.into_requests()).await;
                (waiters, answers)
            }));
        }
        if !open && in_flight.is_empty() && batcher.queued() == 0 {
            return;
        }
        tokio::select! {
            Some((waiters, answers)) = in_flight.next(), if !in_flight.is_empty() => {
                batcher.handle_done();
                match answers {
                    Ok(answers) => {
                        for (w, a) in waiters.into_iter().zip(answers) {
                            // A caller that gave up no longer listens.
                            let _ = w.send(a);
                        }
                    }
                    Err(e) => {
                        for w in waiters {
                            let _ = w.send(Err(e.clone().into()));
                        }
                    }
                }
            }
            got = rx.recv(), if open && batcher.wants_more() => match got {
                Some(s) => super::batch::take_queued(s, &mut rx, &mut batcher),
                None => open = false,
            },
            // Unreachable by the checks above; ending drops the waiters (Unavailable).
            else => return,
        }
    }
}
