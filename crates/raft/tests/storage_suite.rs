//! openraft's own storage test suite against the sled log store and state machine.
#![allow(clippy::result_large_err)]

use openraft::testing::{StoreBuilder, Suite};
use raftyard_raft::log_store::LogStore;
use raftyard_raft::state::StateMachine;
use raftyard_raft::{StorageError, StorageWatch, TypeConfig};

struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, tempfile::TempDir> for SledBuilder {
    async fn build(&self) -> Result<(tempfile::TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::Config::new().path(dir.path()).open().expect("sled");
        let log = LogStore::open(&db, StorageWatch::offline()).expect("log store");
        let sm = StateMachine::open(&db, dir.path(), StorageWatch::offline()).expect("state machine");
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite() -> Result<(), StorageError> {
    Suite::test_all(SledBuilder)
}
