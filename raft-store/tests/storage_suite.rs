//! openraft's own storage conformance suite run against the redb log store and state
//! machine (log state, vote, append/truncate/purge, apply, snapshots).

use infermesh_raft_store::TypeConfig;
use infermesh_raft_store::disk::Disk;
use infermesh_raft_store::log_store::LogStore;
use infermesh_raft_store::state_machine::StateMachineStore;
use openraft::StorageError;
use openraft::StorageIOError;
use openraft::testing::{StoreBuilder, Suite};

struct RedbBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for RedbBuilder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), StorageError<u64>> {
        let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(&e))?;
        let disk = Disk::open(&dir.path().join("suite.redb")).map_err(StorageIOError::write)?;
        let sm = StateMachineStore::open(disk.clone()).map_err(StorageIOError::read)?;
        Ok((dir, LogStore::new(disk), sm))
    }
}

#[test]
fn redb_storage_passes_the_openraft_suite() -> anyhow::Result<()> {
    Suite::test_all(RedbBuilder)?;
    Ok(())
}
