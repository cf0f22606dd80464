//! openraft `RaftStateMachine` on redb, wrapping the sans-IO [`PolicyState`].
//!
//! Each `apply` batch is one atomic redb commit holding the changed objects and the
//! last-applied id, then the new state is published as one immutable `Arc` swap.
//!
//! Apply commits are not fsync'd: every entry they hold is already in the fsync'd log, and
//! redb makes them durable with the next fsync'd commit in the same file (the next log
//! append, vote or snapshot). After a crash the state machine is therefore at some earlier
//! applied id, and openraft re-applies the committed entries after it from the log; the
//! log behind the state machine is never purged before a snapshot (an fsync'd commit)
//! covers it. This saves one fsync per write on every node.
//!
//! Snapshots are the whole state as JSON, kept in the same file (fsync'd) so a restarted
//! node can still serve the snapshot it had; installing one is fsync'd too.

use std::io::Cursor;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    EntryPayload, OptionalSend, RaftSnapshotBuilder, SnapshotMeta, StorageIOError, StoredMembership,
};
use redb::ReadableTable;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::disk::{Disk, DiskError, SM_META, SM_OBJECTS, SNAPSHOT};
use crate::policy::{ObjectKey, PolicyResponse, PolicyState, StoredObject, TokenHash, Touched};
use crate::types::{Entry, LogId, Node, NodeId, StorageError, TypeConfig};

const KEY_APPLIED: &str = "last_applied";
const KEY_MEMBERSHIP: &str = "membership";
const KEY_TOKENS: &str = "tokens";
/// Read-only-token hashes (absent in files written before read tokens existed).
const KEY_READ_TOKENS: &str = "read_tokens";
/// The last revision handed out (absent in files written before revisions existed).
const KEY_REVISION: &str = "revision";
const KEY_SNAP_META: &str = "meta";
const KEY_SNAP_DATA: &str = "data";

/// Publishes applied policy: lock-free loads through `ArcSwap`, change notification
/// through a `watch` channel. Both carry the same immutable `Arc<PolicyState>`.
#[derive(Clone)]
pub struct PolicyPublisher {
    current: Arc<ArcSwap<PolicyState>>,
    tx: Arc<watch::Sender<Arc<PolicyState>>>,
}

impl PolicyPublisher {
    fn new(initial: Arc<PolicyState>) -> Self {
        let (tx, _) = watch::channel(initial.clone());
        PolicyPublisher {
            current: Arc::new(ArcSwap::new(initial)),
            tx: Arc::new(tx),
        }
    }

    fn publish(&self, state: Arc<PolicyState>) {
        self.current.store(state.clone());
        self.tx.send_replace(state);
    }

    /// The applied policy now (lock-free).
    pub fn load(&self) -> Arc<PolicyState> {
        self.current.load_full()
    }

    /// A receiver told of every newly applied policy.
    pub fn subscribe(&self) -> watch::Receiver<Arc<PolicyState>> {
        self.tx.subscribe()
    }
}

impl std::fmt::Debug for PolicyPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyPublisher")
            .field("applied_index", &self.current.load().applied_index())
            .finish()
    }
}

/// What a snapshot's data holds.
#[derive(Serialize, Deserialize)]
struct SnapshotPayload {
    objects: Vec<StoredObject>,
    tokens: Vec<TokenHash>,
    /// Absent in snapshots taken before read tokens existed.
    #[serde(default)]
    read_tokens: Vec<TokenHash>,
    /// Absent in snapshots taken before revisions existed.
    #[serde(default)]
    revision: Option<u64>,
}

fn object_key_text(k: &ObjectKey) -> String {
    format!("{}/{}/{}", k.kind, k.namespace, k.name)
}

/// The policy state machine of one node, on its redb file.
pub struct StateMachineStore {
    disk: Disk,
    state: PolicyState,
    last_applied: Option<LogId>,
    membership: StoredMembership<NodeId, Node>,
    publisher: PolicyPublisher,
    snapshot_seq: Arc<AtomicU64>,
}

impl std::fmt::Debug for StateMachineStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateMachineStore")
            .field("last_applied", &self.last_applied)
            .finish()
    }
}

impl StateMachineStore {
    /// Loads the state machine from `disk` and publishes what it holds.
    pub fn open(disk: Disk) -> Result<StateMachineStore, DiskError> {
        let (state, last_applied, membership) = disk.read(|txn| {
            let meta = txn.open_table(SM_META)?;
            let last_applied: Option<LogId> = match meta.get(KEY_APPLIED)? {
                Some(v) => postcard::from_bytes(v.value())?,
                None => None,
            };
            let membership: StoredMembership<NodeId, Node> = match meta.get(KEY_MEMBERSHIP)? {
                Some(v) => postcard::from_bytes(v.value())?,
                None => StoredMembership::default(),
            };
            let tokens: Vec<TokenHash> = match meta.get(KEY_TOKENS)? {
                Some(v) => postcard::from_bytes(v.value())?,
                None => Vec::new(),
            };
            let read_tokens: Vec<TokenHash> = match meta.get(KEY_READ_TOKENS)? {
                Some(v) => postcard::from_bytes(v.value())?,
                None => Vec::new(),
            };
            let revision: Option<u64> = match meta.get(KEY_REVISION)? {
                Some(v) => Some(postcard::from_bytes(v.value())?),
                None => None,
            };
            let objects_table = txn.open_table(SM_OBJECTS)?;
            let mut objects = Vec::new();
            for item in objects_table.iter()? {
                let (_, v) = item?;
                objects.push(serde_json::from_slice::<StoredObject>(v.value())?);
            }
            let index = last_applied.map_or(0, |l| l.index);
            Ok((
                PolicyState::from_parts(index, objects, tokens)
                    .with_read_tokens(read_tokens)
                    .with_revision(revision.unwrap_or(index)),
                last_applied,
                membership,
            ))
        })?;
        let publisher = PolicyPublisher::new(Arc::new(state.clone()));
        Ok(StateMachineStore {
            disk,
            state,
            last_applied,
            membership,
            publisher,
            snapshot_seq: Arc::new(AtomicU64::new(0)),
        })
    }

    /// The publisher readers subscribe to.
    pub fn publisher(&self) -> PolicyPublisher {
        self.publisher.clone()
    }

    fn persist_applied(
        &self,
        touched: &Touched,
        membership_changed: bool,
    ) -> Result<(), DiskError> {
        let applied = postcard::to_stdvec(&self.last_applied)?;
        let revision = postcard::to_stdvec(&self.state.revision())?;
        let membership = if membership_changed {
            Some(postcard::to_stdvec(&self.membership)?)
        } else {
            None
        };
        let tokens = if touched.tokens {
            Some((
                postcard::to_stdvec(&self.state.token_hashes().copied().collect::<Vec<_>>())?,
                postcard::to_stdvec(&self.state.read_token_hashes().copied().collect::<Vec<_>>())?,
            ))
        } else {
            None
        };
        let mut objects = Vec::with_capacity(touched.keys.len());
        for k in &touched.keys {
            let v = match self.state.get(k) {
                Some(o) => Some(serde_json::to_vec(o.as_ref())?),
                None => None,
            };
            objects.push((object_key_text(k), v));
        }
        self.disk.write_lazy(|txn| {
            let mut meta = txn.open_table(SM_META)?;
            meta.insert(KEY_APPLIED, applied.as_slice())?;
            meta.insert(KEY_REVISION, revision.as_slice())?;
            if let Some(m) = &membership {
                meta.insert(KEY_MEMBERSHIP, m.as_slice())?;
            }
            if let Some((write, read)) = &tokens {
                meta.insert(KEY_TOKENS, write.as_slice())?;
                meta.insert(KEY_READ_TOKENS, read.as_slice())?;
            }
            let mut table = txn.open_table(SM_OBJECTS)?;
            for (k, v) in &objects {
                match v {
                    Some(bytes) => {
                        table.insert(k.as_str(), bytes.as_slice())?;
                    }
                    None => {
                        table.remove(k.as_str())?;
                    }
                }
            }
            Ok(())
        })
    }
}

/// A stored snapshot: its meta and its data.
type StoredSnapshot = (SnapshotMeta<NodeId, Node>, Vec<u8>);

fn read_snapshot(disk: &Disk) -> Result<Option<StoredSnapshot>, DiskError> {
    disk.read(|txn| {
        let t = txn.open_table(SNAPSHOT)?;
        let meta = match t.get(KEY_SNAP_META)? {
            Some(v) => postcard::from_bytes::<SnapshotMeta<NodeId, Node>>(v.value())?,
            None => return Ok(None),
        };
        let data = t
            .get(KEY_SNAP_DATA)?
            .map(|v| v.value().to_vec())
            .unwrap_or_default();
        Ok(Some((meta, data)))
    })
}

/// Builds a snapshot from a point-in-time copy of the state machine.
pub struct SnapshotBuilder {
    disk: Disk,
    state: PolicyState,
    last_applied: Option<LogId>,
    membership: StoredMembership<NodeId, Node>,
    seq: u64,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let payload = SnapshotPayload {
            objects: self.state.iter().map(|o| o.as_ref().clone()).collect(),
            tokens: self.state.token_hashes().copied().collect(),
            read_tokens: self.state.read_token_hashes().copied().collect(),
            revision: Some(self.state.revision()),
        };
        let data = serde_json::to_vec(&payload)
            .map_err(|e| StorageIOError::read_state_machine(DiskError::from(e)))?;
        let snapshot_id = match self.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, self.seq),
            None => format!("0-0-{}", self.seq),
        };
        let meta = SnapshotMeta {
            last_log_id: self.last_applied,
            last_membership: self.membership.clone(),
            snapshot_id,
        };
        let meta_bytes = postcard::to_stdvec(&meta)
            .map_err(|e| StorageIOError::write_snapshot(None, DiskError::from(e)))?;
        let last = self.last_applied;
        self.disk
            .write(|txn| {
                let mut t = txn.open_table(SNAPSHOT)?;
                // An installed snapshot may be newer than this one; never go back.
                let existing = match t.get(KEY_SNAP_META)? {
                    Some(v) => {
                        postcard::from_bytes::<SnapshotMeta<NodeId, Node>>(v.value())?.last_log_id
                    }
                    None => None,
                };
                if existing <= last {
                    t.insert(KEY_SNAP_META, meta_bytes.as_slice())?;
                    t.insert(KEY_SNAP_DATA, data.as_slice())?;
                }
                Ok(())
            })
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), e))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId>, StoredMembership<NodeId, Node>), StorageError> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<PolicyResponse>, StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut touched = Touched::default();
        let mut membership_changed = false;
        let mut responses = Vec::new();
        for entry in entries {
            self.last_applied = Some(entry.log_id);
            let index = entry.log_id.index;
            let resp = match &entry.payload {
                EntryPayload::Blank => {
                    self.state.handle_noop(index);
                    PolicyResponse::Noop
                }
                EntryPayload::Normal(req) => self.state.handle_request(index, req, &mut touched),
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                    membership_changed = true;
                    self.state.handle_noop(index);
                    PolicyResponse::Noop
                }
            };
            responses.push(resp);
        }
        if responses.is_empty() {
            return Ok(responses);
        }
        let last = self.last_applied;
        self.persist_applied(&touched, membership_changed)
            .map_err(|e| match last {
                Some(l) => StorageIOError::apply(l, e),
                None => StorageIOError::write_state_machine(e),
            })?;
        self.publisher.publish(Arc::new(self.state.clone()));
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            disk: self.disk.clone(),
            state: self.state.clone(),
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            seq: self.snapshot_seq.fetch_add(1, Ordering::Relaxed),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let sig = meta.signature();
        let data = snapshot.into_inner();
        let payload: SnapshotPayload = serde_json::from_slice(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(sig.clone()), DiskError::from(e)))?;
        let index = meta.last_log_id.map_or(0, |l| l.index);
        let state = PolicyState::from_parts(index, payload.objects, payload.tokens)
            .with_read_tokens(payload.read_tokens)
            .with_revision(payload.revision.unwrap_or(index));
        let encode = || -> Result<_, DiskError> {
            let mut objects = Vec::with_capacity(state.len());
            for o in state.iter() {
                objects.push((
                    object_key_text(&o.object.key()),
                    serde_json::to_vec(o.as_ref())?,
                ));
            }
            Ok((
                objects,
                postcard::to_stdvec(&meta.last_log_id)?,
                postcard::to_stdvec(&meta.last_membership)?,
                postcard::to_stdvec(&state.token_hashes().copied().collect::<Vec<_>>())?,
                postcard::to_stdvec(&state.read_token_hashes().copied().collect::<Vec<_>>())?,
                postcard::to_stdvec(meta)?,
                postcard::to_stdvec(&state.revision())?,
            ))
        };
        let (objects, applied, membership, tokens, read_tokens, meta_bytes, revision) =
            encode().map_err(|e| StorageIOError::write_snapshot(Some(sig.clone()), e))?;
        self.disk
            .write(|txn| {
                let mut table = txn.open_table(SM_OBJECTS)?;
                table.retain(|_, _| false)?;
                for (k, v) in &objects {
                    table.insert(k.as_str(), v.as_slice())?;
                }
                let mut m = txn.open_table(SM_META)?;
                m.insert(KEY_APPLIED, applied.as_slice())?;
                m.insert(KEY_MEMBERSHIP, membership.as_slice())?;
                m.insert(KEY_TOKENS, tokens.as_slice())?;
                m.insert(KEY_READ_TOKENS, read_tokens.as_slice())?;
                m.insert(KEY_REVISION, revision.as_slice())?;
                let mut s = txn.open_table(SNAPSHOT)?;
                s.insert(KEY_SNAP_META, meta_bytes.as_slice())?;
                s.insert(KEY_SNAP_DATA, data.as_slice())?;
                Ok(())
            })
            .map_err(|e| StorageIOError::write_snapshot(Some(sig), e))?;
        self.state = state;
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        self.publisher.publish(Arc::new(self.state.clone()));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let snap = read_snapshot(&self.disk).map_err(|e| StorageIOError::read_snapshot(None, e))?;
        Ok(snap.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}
