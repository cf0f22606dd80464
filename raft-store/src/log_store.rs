//! openraft `RaftLogStorage` on redb: entries, vote, committed id and purge point.
//!
//! Every append, truncate, purge and vote save is one fsync'd redb commit; the flush
//! callback fires only after the commit returns, so an acknowledged entry is on disk.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader, StorageIOError, Vote};
use redb::{ReadableTable, ReadableTableMetadata};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::disk::{Disk, DiskError, LOG, LOG_META};
use crate::types::{Entry, LogId, NodeId, StorageError, TypeConfig};

const KEY_VOTE: &str = "vote";
const KEY_COMMITTED: &str = "committed";
const KEY_PURGED: &str = "last_purged";

/// The Raft log of one node, on its redb file.
#[derive(Clone, Debug)]
pub struct LogStore {
    disk: Disk,
    committed: Arc<AtomicU64>,
}

impl LogStore {
    /// A log store on `disk`.
    pub fn new(disk: Disk) -> Self {
        LogStore {
            disk,
            committed: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The last committed index openraft reported (0 before any); openraft 0.9 does not
    /// expose it in metrics, so the store keeps it from `save_committed`.
    pub fn committed_index(&self) -> Arc<AtomicU64> {
        self.committed.clone()
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, DiskError> {
        self.disk.read(|txn| {
            let t = txn.open_table(LOG_META)?;
            match t.get(key)? {
                Some(v) => Ok(Some(postcard::from_bytes(v.value())?)),
                None => Ok(None),
            }
        })
    }

    fn put_meta<T: Serialize>(&self, key: &str, value: &T) -> Result<(), DiskError> {
        let bytes = postcard::to_stdvec(value)?;
        self.disk.write(|txn| {
            txn.open_table(LOG_META)?.insert(key, bytes.as_slice())?;
            Ok(())
        })
    }

    fn read_range(&self, start: u64, end: Bound<u64>) -> Result<Vec<Entry>, DiskError> {
        self.disk.read(|txn| {
            let t = txn.open_table(LOG)?;
            let mut out = Vec::new();
            let range = match end {
                Bound::Included(e) => t.range(start..=e)?,
                Bound::Excluded(e) => t.range(start..e)?,
                Bound::Unbounded => t.range(start..)?,
            };
            for item in range {
                let (_, v) = item?;
                out.push(postcard::from_bytes(v.value())?);
            }
            Ok(out)
        })
    }

    /// Number of entries currently held (after purges); for tests and status.
    pub fn entry_count(&self) -> Result<u64, DiskError> {
        self.disk.read(|txn| Ok(txn.open_table(LOG)?.len()?))
    }
}

fn start_of(range: &impl RangeBounds<u64>) -> u64 {
    match range.start_bound() {
        Bound::Included(s) => *s,
        Bound::Excluded(s) => s + 1,
        Bound::Unbounded => 0,
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        let end = range.end_bound().cloned();
        self.read_range(start_of(&range), end)
            .map_err(|e| StorageIOError::read_logs(e).into())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged: Option<LogId> = self
            .get_meta(KEY_PURGED)
            .map_err(StorageIOError::read_logs)?;
        let last = self
            .disk
            .read(|txn| {
                let t = txn.open_table(LOG)?;
                match t.last()? {
                    Some((_, v)) => Ok(Some(postcard::from_bytes::<Entry>(v.value())?.log_id)),
                    None => Ok(None),
                }
            })
            .map_err(StorageIOError::read_logs)?;
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last.or(last_purged),
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        self.put_meta(KEY_VOTE, vote)
            .map_err(|e| StorageIOError::write_vote(e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.get_meta(KEY_VOTE)
            .map_err(|e| StorageIOError::read_vote(e).into())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        if let Some(c) = committed {
            self.committed.fetch_max(c.index, Ordering::Relaxed);
        }
        // Not fsync'd: a committed id lost in a crash is only a hint; it is learnt again
        // from the leader, and the state machine keeps its own applied id durably.
        let bytes = postcard::to_stdvec(&committed)
            .map_err(|e| StorageIOError::write(DiskError::from(e)))?;
        self.disk
            .write_lazy(|txn| {
                txn.open_table(LOG_META)?
                    .insert(KEY_COMMITTED, bytes.as_slice())?;
                Ok(())
            })
            .map_err(|e| StorageIOError::write(e).into())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        let committed = self
            .get_meta::<Option<LogId>>(KEY_COMMITTED)
            .map_err(StorageIOError::read)?
            .flatten();
        if let Some(c) = committed {
            self.committed.fetch_max(c.index, Ordering::Relaxed);
        }
        Ok(committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let encoded: Vec<(u64, Vec<u8>)> = entries
            .into_iter()
            .map(|e| Ok((e.log_id.index, postcard::to_stdvec(&e)?)))
            .collect::<Result<_, DiskError>>()
            .map_err(StorageIOError::write_logs)?;
        let res = self.disk.write(|txn| {
            let mut t = txn.open_table(LOG)?;
            for (idx, bytes) in &encoded {
                t.insert(*idx, bytes.as_slice())?;
            }
            Ok(())
        });
        match res {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(StorageIOError::write_logs(e).into())
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.disk
            .write(|txn| {
                let mut t = txn.open_table(LOG)?;
                t.retain_in(log_id.index.., |_, _| false)?;
                Ok(())
            })
            .map_err(|e| StorageIOError::write_logs(e).into())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let bytes = postcard::to_stdvec(&log_id)
            .map_err(|e| StorageIOError::write_logs(DiskError::from(e)))?;
        self.disk
            .write(|txn| {
                txn.open_table(LOG_META)?
                    .insert(KEY_PURGED, bytes.as_slice())?;
                let mut t = txn.open_table(LOG)?;
                t.retain_in(..=log_id.index, |_, _| false)?;
                Ok(())
            })
            .map_err(|e| StorageIOError::write_logs(e).into())
    }
}
