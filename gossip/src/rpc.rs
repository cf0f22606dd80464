//! Mesh RPC over QUIC: one reusable connection per peer, one stream per message.
//!
//! Requests use a bidirectional stream (frame out, `finish`, frame back); one-way messages
//! a unidirectional stream. Every exchange is bounded by a timeout. The acceptor admits a
//! connection only when the client's certificate belongs to a live member (self-signed
//! mode) or chains to the cluster CA, and in both modes is the certificate a live member
//! advertised through authenticated gossip.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

use crate::config::RpcConfig;
use crate::membership::MemberSet;
use crate::ring::NodeId;
use crate::stats::Stats;
use crate::tls::{Fingerprint, TlsError, TlsIdentity, peer_fingerprint};
use crate::wire::{
    self, Frame, FrameError, MAX_FRAME_BYTES, OneWay, RemoteError, Request, Response,
};

/// A mesh RPC failed; the peer's state is unknown (a one-way message may or may not have landed).
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    /// The node is not a live member.
    #[error("{0} is not a live member")]
    UnknownPeer(NodeId),
    /// No answer within the bound.
    #[error("timed out")]
    Timeout,
    /// Could not connect.
    #[error("connect failed: {0}")]
    Connect(String),
    /// The connection or stream broke.
    #[error("transport error: {0}")]
    Transport(String),
    /// The peer's answer could not be decoded.
    #[error("bad answer from peer: {0}")]
    Frame(#[from] FrameError),
    /// The peer refused the request.
    #[error("peer refused: {0}")]
    Remote(#[from] RemoteError),
    /// The answer was of an unexpected kind.
    #[error("unexpected answer kind")]
    UnexpectedResponse,
    /// TLS setup failed.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Server-side handling of admitted messages.
pub(crate) trait Dispatch: Send + Sync + 'static {
    /// Answers a request from `from`.
    fn request(&self, from: NodeId, req: Request) -> impl Future<Output = Response> + Send;
    /// Takes a one-way message from `from`.
    fn one_way(&self, from: NodeId, msg: OneWay);
}

#[derive(Clone)]
struct PeerSlot {
    rpc: SocketAddr,
    fingerprint: Fingerprint,
    conn: Arc<tokio::sync::Mutex<Option<quinn::Connection>>>,
}

/// Client side: connections to peers, reused across calls.
pub(crate) struct Transport {
    me: NodeId,
    endpoint: quinn::Endpoint,
    tls: TlsIdentity,
    config: RpcConfig,
    members: watch::Receiver<Arc<MemberSet>>,
    peers: Mutex<HashMap<NodeId, PeerSlot>>,
    stats: Arc<Stats>,
}

impl Transport {
    pub(crate) fn new(
        me: NodeId,
        endpoint: quinn::Endpoint,
        tls: TlsIdentity,
        config: RpcConfig,
        members: watch::Receiver<Arc<MemberSet>>,
        stats: Arc<Stats>,
    ) -> Transport {
        Transport {
            me,
            endpoint,
            tls,
            config,
            members,
            peers: Mutex::new(HashMap::new()),
            stats,
        }
    }

    pub(crate) fn me(&self) -> &NodeId {
        &self.me
    }

    fn slot(&self, peer: &NodeId) -> Result<PeerSlot, RpcError> {
        let (rpc, fingerprint) = {
            let set = self.members.borrow();
            let info = set
                .get(peer)
                .filter(|_| *peer != self.me)
                .ok_or_else(|| RpcError::UnknownPeer(peer.clone()))?;
            (info.id.rpc, info.id.fingerprint)
        };
        let mut peers = self.peers.lock();
        let slot = peers.entry(peer.clone()).or_insert_with(|| PeerSlot {
            rpc,
            fingerprint,
            conn: Arc::default(),
        });
        if slot.rpc != rpc || slot.fingerprint != fingerprint {
            // The peer restarted with a new address or certificate: drop the old connection.
            *slot = PeerSlot {
                rpc,
                fingerprint,
                conn: Arc::default(),
            };
        }
        Ok(slot.clone())
    }

    /// Forgets connections to nodes that are no longer members.
    pub(crate) fn retain_peers(&self, set: &MemberSet) {
        self.peers.lock().retain(|n, _| set.get(n).is_some());
    }

    /// The open connection to `peer`, connecting if needed (bounded by `connect_timeout`).
    pub(crate) async fn connection(&self, peer: &NodeId) -> Result<quinn::Connection, RpcError> {
        let slot = self.slot(peer)?;
        let mut guard = slot.conn.lock().await;
        if let Some(c) = guard.as_ref()
            && c.close_reason().is_none()
        {
            return Ok(c.clone());
        }
        let (client, name) = self.tls.client_config(slot.fingerprint)?;
        let connecting = self
            .endpoint
            .connect_with(client, slot.rpc, &name)
            .map_err(|e| RpcError::Connect(e.to_string()))?;
        let conn = tokio::time::timeout(self.config.connect_timeout, connecting)
            .await
            .map_err(|_| RpcError::Timeout)?
            .map_err(|e| RpcError::Connect(e.to_string()))?;
        *guard = Some(conn.clone());
        Ok(conn)
    }

    /// Sends `req` to `peer` and waits for the answer, all within `timeout`.
    pub(crate) async fn request(
        &self,
        peer: &NodeId,
        req: &Request,
        timeout: Duration,
    ) -> Result<Response, RpcError> {
        let bytes = wire::encode(&self.me, req);
        self.request_encoded(peer, &bytes, timeout).await
    }

    /// Like [`Transport::request`] for a frame already encoded with [`wire::encode`].
    pub(crate) async fn request_encoded(
        &self,
        peer: &NodeId,
        bytes: &[u8],
        timeout: Duration,
    ) -> Result<Response, RpcError> {
        let res = tokio::time::timeout(timeout, self.request_bytes(peer, bytes)).await;
        let res = res.unwrap_or(Err(RpcError::Timeout));
        if res.is_err() {
            Stats::add(&self.stats.rpc_errors, 1);
        }
        match res? {
            Response::Error(e) => Err(RpcError::Remote(e)),
            r => Ok(r),
        }
    }

    async fn request_bytes(&self, peer: &NodeId, bytes: &[u8]) -> Result<Response, RpcError> {
        let conn = self.connection(peer).await?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(transport)?;
        send.write_all(bytes).await.map_err(transport)?;
        send.finish().map_err(transport)?;
        let answer = recv.read_to_end(MAX_FRAME_BYTES).await.map_err(transport)?;
        let frame: Frame<Response> = wire::decode(&answer)?;
        Ok(frame.body)
    }

    /// Sends an already encoded one-way frame to `peer` within `request_timeout`.
    pub(crate) async fn send_encoded(&self, peer: &NodeId, bytes: &[u8]) -> Result<(), RpcError> {
        let fut = async {
            let conn = self.connection(peer).await?;
            let mut send = conn.open_uni().await.map_err(transport)?;
            send.write_all(bytes).await.map_err(transport)?;
            send.finish().map_err(transport)?;
            Ok(())
        };
        let res = tokio::time::timeout(self.config.request_timeout, fut)
            .await
            .unwrap_or(Err(RpcError::Timeout));
        if res.is_err() {
            Stats::add(&self.stats.rpc_errors, 1);
        }
        res
    }

    /// Encodes and sends a one-way message to `peer`.
    pub(crate) async fn send(&self, peer: &NodeId, msg: &OneWay) -> Result<(), RpcError> {
        let bytes = wire::encode(&self.me, msg);
        self.send_encoded(peer, &bytes).await
    }
}

fn transport(e: impl std::fmt::Display) -> RpcError {
    RpcError::Transport(e.to_string())
}

/// Accepts connections until the endpoint closes.
pub(crate) async fn serve<D: Dispatch>(
    me: NodeId,
    endpoint: quinn::Endpoint,
    dispatch: Arc<D>,
    members: watch::Receiver<Arc<MemberSet>>,
    admission_timeout: Duration,
    stats: Arc<Stats>,
) {
    while let Some(incoming) = endpoint.accept().await {
        let dispatch = dispatch.clone();
        let members = members.clone();
        let stats = stats.clone();
        let me = me.clone();
        tokio::spawn(async move {
            let Ok(conn) = incoming.await else { return };
            // With a cluster CA the chain is already verified; either way the certificate
            // must also be the one a live member advertised through authenticated gossip.
            let Some(peer) = admit(&conn, members, admission_timeout).await else {
                Stats::add(&stats.rpc_rejected_peers, 1);
                conn.close(quinn::VarInt::from_u32(1), b"not a member");
                return;
            };
            serve_connection(me, peer, conn, dispatch, stats).await;
        });
    }
}

/// Waits (bounded) until the client's certificate fingerprint belongs to a live member,
/// and returns that member's node id.
async fn admit(
    conn: &quinn::Connection,
    mut members: watch::Receiver<Arc<MemberSet>>,
    timeout: Duration,
) -> Option<NodeId> {
    let fp = peer_fingerprint(conn)?;
    // A node that just joined may dial us before its gossip reached us: wait for it.
    let known = members.wait_for(|set| set.by_fingerprint(&fp).is_some());
    let set = tokio::time::timeout(timeout, known).await.ok()?.ok()?;
    set.by_fingerprint(&fp).map(|m| m.id.node.clone())
}

/// Serves streams of one admitted connection. `peer` is the member the certificate belongs
/// to; frames cannot claim another node's id.
async fn serve_connection<D: Dispatch>(
    me: NodeId,
    peer: NodeId,
    conn: quinn::Connection,
    dispatch: Arc<D>,
    stats: Arc<Stats>,
) {
    loop {
        tokio::select! {
            bi = conn.accept_bi() => {
                let Ok((mut send, mut recv)) = bi else { return };
                let dispatch = dispatch.clone();
                let stats = stats.clone();
                let me = me.clone();
                let peer = peer.clone();
                tokio::spawn(async move {
                    let Ok(bytes) = recv.read_to_end(MAX_FRAME_BYTES).await else { return };
                    let answer = match wire::decode::<Request>(&bytes) {
                        Ok(f) => dispatch.request(peer, f.body).await,
                        Err(e) => {
                            Stats::add(&stats.rpc_rejected_frames, 1);
                            let err = match e {
                                // Named from the caller's side: "theirs" is ours here.
                                FrameError::Version(sent) => RemoteError::VersionMismatch {
                                    theirs: wire::PROTOCOL_VERSION,
                                    ours: sent,
                                },
                                FrameError::Malformed => RemoteError::Malformed,
                            };
                            Response::Error(err)
                        }
                    };
                    let out = wire::encode(&me, &answer);
                    Stats::add(&stats.rpc_answer_bytes_out, out.len() as u64);
                    if send.write_all(&out).await.is_ok() {
                        let _ = send.finish();
                    }
                });
            }
            uni = conn.accept_uni() => {
                let Ok(mut recv) = uni else { return };
                let dispatch = dispatch.clone();
                let stats = stats.clone();
                let peer = peer.clone();
                tokio::spawn(async move {
                    let Ok(bytes) = recv.read_to_end(MAX_FRAME_BYTES).await else { return };
                    match wire::decode::<OneWay>(&bytes) {
                        Ok(f) => dispatch.one_way(peer, f.body),
                        Err(_) => Stats::add(&stats.rpc_rejected_frames, 1),
                    }
                });
            }
        }
    }
}
