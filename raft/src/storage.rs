//! RocksDB storage: the Raft log and vote (`log_store`) and the object state machine
//! (`state_machine`) in column families of one database per node.
//!
//! An append is acknowledged to openraft only after the WAL holding it was synced. Appends
//! that arrive while a sync is running are synced together (group commit). The state machine
//! writes without syncing: its last-applied position is written in the same batch as its data,
//! so after a crash it resumes from what reached the disk and re-applies the rest from the log;
//! before a snapshot is built (after which the log may be purged) the WAL is synced.

use std::io;
use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, Options, DB};

mod log_store;
mod recent_objects;
pub(crate) mod state_machine;

pub use log_store::LogStore;
pub use state_machine::{KindVersion, SnapshotBody, StateMachine, StoreReader};

pub(crate) const CF_LOG: &str = "log";
pub(crate) const CF_RAFT_META: &str = "raft_meta";
pub(crate) const CF_OBJECTS: &str = "objects";
pub(crate) const CF_EVENTS: &str = "events";
pub(crate) const CF_SM_META: &str = "sm_meta";

const COLUMN_FAMILIES: [&str; 5] = [CF_LOG, CF_RAFT_META, CF_OBJECTS, CF_EVENTS, CF_SM_META];

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("open RocksDB at {path}")]
    Open {
        path: String,
        #[source]
        source: rocksdb::Error,
    },
}

/// Opens (creating if needed) the node's database with every column family.
pub fn open_db(path: &Path) -> Result<Arc<DB>, OpenError> {
    let mut options = Options::default();
    options.create_if_missing(true);
    options.create_missing_column_families(true);
    // Writes are made durable by explicit WAL syncs; no background fsync is needed.
    options.set_manual_wal_flush(false);
    // A node's store is small (objects, a bounded history, a log purged behind snapshots):
    // modest memtables and one small shared block cache keep an idle node's memory low.
    options.set_max_background_jobs(2);
    options.set_max_open_files(256);
    let cache = rocksdb::Cache::new_lru_cache(8 * 1024 * 1024);
    let column_family_options = || {
        let mut cf_options = Options::default();
        cf_options.set_write_buffer_size(8 * 1024 * 1024);
        cf_options.set_max_write_buffer_number(2);
        let mut table = rocksdb::BlockBasedOptions::default();
        table.set_block_cache(&cache);
        // Every create asks for a key that is not there yet: a bloom filter answers that
        // without reading a data block of each table.
        table.set_bloom_filter(10.0, false);
        cf_options.set_block_based_table_factory(&table);
        cf_options
    };
    let descriptors = COLUMN_FAMILIES
        .iter()
        .map(|name| ColumnFamilyDescriptor::new(*name, column_family_options()));
    DB::open_cf_descriptors(&options, path, descriptors)
        .map(Arc::new)
        .map_err(|source| OpenError::Open {
            path: path.display().to_string(),
            source,
        })
}

pub(crate) fn cf<'a>(db: &'a DB, name: &str) -> Result<&'a rocksdb::ColumnFamily, io::Error> {
    db.cf_handle(name)
        .ok_or_else(|| io::Error::other(format!("column family {name:?} is missing")))
}

pub(crate) fn rocks_error(error: rocksdb::Error) -> io::Error {
    io::Error::other(error)
}

pub(crate) fn decode_error(what: &str, error: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("decode {what}: {error}"),
    )
}

pub(crate) fn encode_error(what: &str, error: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("encode {what}: {error}"),
    )
}

pub(crate) fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

pub(crate) fn index_from_key(key: &[u8]) -> Result<u64, io::Error> {
    let bytes: [u8; 8] = key
        .get(..8)
        .and_then(|k| k.try_into().ok())
        .ok_or_else(|| decode_error("log key", "shorter than 8 bytes"))?;
    Ok(u64::from_be_bytes(bytes))
}

#[cfg(test)]
mod tests;
