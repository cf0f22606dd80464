//! The redb file shared by the log store and the state machine, and its table layout.
//!
//! One file per node. redb commits with `Durability::Immediate` (fsync) are the only
//! writes, so anything acknowledged is on disk.

use std::path::Path;
use std::sync::Arc;

use redb::{Database, Durability, ReadTransaction, TableDefinition, WriteTransaction};

/// Log entries by index (postcard-encoded `Entry`).
pub(crate) const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_log");
/// Log metadata: `vote`, `committed`, `last_purged` (postcard).
pub(crate) const LOG_META: TableDefinition<&str, &[u8]> = TableDefinition::new("raft_log_meta");
/// Policy objects by `Kind/namespace/name` (JSON `StoredObject`).
pub(crate) const SM_OBJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("sm_objects");
/// State-machine metadata: `last_applied`, `membership`, `tokens` (postcard).
pub(crate) const SM_META: TableDefinition<&str, &[u8]> = TableDefinition::new("sm_meta");
/// The current snapshot: `meta` (postcard `SnapshotMeta`) and `data` (bytes).
pub(crate) const SNAPSHOT: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshot");

/// An error of the on-disk store.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// redb failed (IO, corruption, or the file is open elsewhere).
    #[error("redb: {0}")]
    Redb(#[from] redb::Error),
    /// A record could not be encoded or decoded (binary codec).
    #[error("record codec: {0}")]
    Codec(#[from] postcard::Error),
    /// A record could not be encoded or decoded (JSON codec).
    #[error("record codec: {0}")]
    Json(#[from] serde_json::Error),
}

macro_rules! redb_from {
    ($($t:ty),*) => {$(
        impl From<$t> for DiskError {
            fn from(e: $t) -> Self {
                DiskError::Redb(e.into())
            }
        }
    )*};
}
redb_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

impl From<DiskError> for openraft::AnyError {
    fn from(e: DiskError) -> Self {
        openraft::AnyError::new(&e)
    }
}

/// A node's redb database.
#[derive(Clone, Debug)]
pub struct Disk {
    db: Arc<Database>,
}

impl Disk {
    /// Opens (or creates) the node's redb file and its tables.
    pub fn open(path: &Path) -> Result<Disk, DiskError> {
        let db = Database::create(path)?;
        let disk = Disk { db: Arc::new(db) };
        disk.write(|txn| {
            txn.open_table(LOG)?;
            txn.open_table(LOG_META)?;
            txn.open_table(SM_OBJECTS)?;
            txn.open_table(SM_META)?;
            txn.open_table(SNAPSHOT)?;
            Ok(())
        })?;
        Ok(disk)
    }

    /// Runs `f` in one write transaction and commits it durably (fsync).
    pub(crate) fn write<R>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<R, DiskError>,
    ) -> Result<R, DiskError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate)?;
        let r = f(&txn)?;
        txn.commit()?;
        Ok(r)
    }

    /// Runs `f` in one write transaction committed without fsync: for hints that may be lost
    /// in a crash (redb keeps them atomic and makes them durable with the next fsync'd commit).
    pub(crate) fn write_lazy<R>(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<R, DiskError>,
    ) -> Result<R, DiskError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::None)?;
        let r = f(&txn)?;
        txn.commit()?;
        Ok(r)
    }

    /// Runs `f` in one read transaction.
    pub(crate) fn read<R>(
        &self,
        f: impl FnOnce(&ReadTransaction) -> Result<R, DiskError>,
    ) -> Result<R, DiskError> {
        use redb::ReadableDatabase;
        let txn = self.db.begin_read()?;
        f(&txn)
    }
}
