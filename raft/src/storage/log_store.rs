//! The Raft log and vote in RocksDB, with a group-commit WAL syncer.

use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::mpsc;
use std::sync::Arc;

use openraft::alias::{EntryOf, LogIdOf, VoteOf};
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::OptionalSend;
use rocksdb::{Direction, IteratorMode, WriteBatch, DB};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{
    cf, decode_error, encode_error, index_from_key, index_key, rocks_error, CF_LOG, CF_RAFT_META,
};
use crate::types::TypeConfig;

/// How many appends may wait for a WAL sync; when full, `append` waits (back-pressure).
const PENDING_SYNC_LIMIT: usize = 4096;

const KEY_VOTE: &[u8] = b"vote";
const KEY_LAST_PURGED: &[u8] = b"last_purged";
const KEY_COMMITTED: &[u8] = b"committed";

/// The log store. Clones share the database and the syncer.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    syncer: mpsc::SyncSender<IOFlushed<TypeConfig>>,
}

impl Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").finish_non_exhaustive()
    }
}

/// Syncs the WAL for every batch of waiting appends, then completes them all: one fsync
/// acknowledges as many appends as arrived during the previous one.
fn run_syncer(db: std::sync::Weak<DB>, pending: mpsc::Receiver<IOFlushed<TypeConfig>>) {
    while let Ok(first) = pending.recv() {
        let mut batch = vec![first];
        while let Ok(next) = pending.try_recv() {
            batch.push(next);
        }
        // A weak handle: the syncer must not keep the database open after the store is gone.
        let result = match db.upgrade() {
            Some(db) => db.flush_wal(true).map_err(|e| e.to_string()),
            None => Err("the database was closed".to_string()),
        };
        for callback in batch {
            callback.io_completed(result.clone().map_err(io::Error::other));
        }
    }
}

impl LogStore {
    pub fn new(db: Arc<DB>) -> Result<LogStore, io::Error> {
        cf(&db, CF_LOG)?;
        cf(&db, CF_RAFT_META)?;
        let (syncer, pending) = mpsc::sync_channel(PENDING_SYNC_LIMIT);
        let syncer_db = Arc::downgrade(&db);
        std::thread::Builder::new()
            .name("flotilla-wal-sync".into())
            .spawn(move || run_syncer(syncer_db, pending))?;
        Ok(LogStore { db, syncer })
    }

    fn get_meta<T: DeserializeOwned>(&self, key: &[u8]) -> Result<Option<T>, io::Error> {
        let Some(bytes) = self
            .db
            .get_cf(cf(&self.db, CF_RAFT_META)?, key)
            .map_err(rocks_error)?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| decode_error("raft metadata", e))
    }

    fn put_meta<T: Serialize>(&self, key: &[u8], value: &T) -> Result<(), io::Error> {
        let bytes = serde_json::to_vec(value).map_err(|e| encode_error("raft metadata", e))?;
        self.db
            .put_cf(cf(&self.db, CF_RAFT_META)?, key, bytes)
            .map_err(rocks_error)
    }

    fn sync_wal(&self) -> Result<(), io::Error> {
        self.db.flush_wal(true).map_err(rocks_error)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<EntryOf<TypeConfig>>, io::Error> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let start_key = index_key(start);
        let mut entries = Vec::new();
        let iter = self.db.iterator_cf(
            cf(&self.db, CF_LOG)?,
            IteratorMode::From(&start_key, Direction::Forward),
        );
        for item in iter {
            let (key, value) = item.map_err(rocks_error)?;
            let index = index_from_key(&key)?;
            if !range.contains(&index) {
                break;
            }
            let entry: EntryOf<TypeConfig> =
                serde_json::from_slice(&value).map_err(|e| decode_error("log entry", e))?;
            entries.push(entry);
        }
        Ok(entries)
    }

    async fn read_vote(&mut self) -> Result<Option<VoteOf<TypeConfig>>, io::Error> {
        self.get_meta(KEY_VOTE)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged_log_id: Option<LogIdOf<TypeConfig>> = self.get_meta(KEY_LAST_PURGED)?;
        let last = self
            .db
            .iterator_cf(cf(&self.db, CF_LOG)?, IteratorMode::End)
            .next();
        let last_log_id = match last {
            None => last_purged_log_id,
            Some(item) => {
                let (_, value) = item.map_err(rocks_error)?;
                let entry: EntryOf<TypeConfig> =
                    serde_json::from_slice(&value).map_err(|e| decode_error("log entry", e))?;
                Some(entry.log_id())
            }
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &VoteOf<TypeConfig>) -> Result<(), io::Error> {
        self.put_meta(KEY_VOTE, vote)?;
        // A vote must be durable before it is acted on.
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.sync_wal())
            .await
            .map_err(io::Error::other)?
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogIdOf<TypeConfig>>,
    ) -> Result<(), io::Error> {
        // Not synced: losing it only means re-learning the commit index from the leader.
        self.put_meta(KEY_COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogIdOf<TypeConfig>>, io::Error> {
        Ok(self
            .get_meta::<Option<LogIdOf<TypeConfig>>>(KEY_COMMITTED)?
            .flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = EntryOf<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let cf_log = cf(&self.db, CF_LOG)?;
        let mut batch = WriteBatch::default();
        for entry in entries {
            let value = serde_json::to_vec(&entry).map_err(|e| encode_error("log entry", e))?;
            batch.put_cf(cf_log, index_key(entry.index()), value);
        }
        // Written (readable) now, acknowledged once the syncer has synced the WAL.
        self.db.write(batch).map_err(rocks_error)?;
        self.syncer
            .send(callback)
            .map_err(|_| io::Error::other("the WAL syncer has stopped"))
    }

    async fn truncate_after(
        &mut self,
        last_log_id: Option<LogIdOf<TypeConfig>>,
    ) -> Result<(), io::Error> {
        let from = last_log_id.map(|id| id.index() + 1).unwrap_or(0);
        self.db
            .delete_range_cf(cf(&self.db, CF_LOG)?, index_key(from), index_key(u64::MAX))
            .map_err(rocks_error)?;
        // Conflicting entries must not come back after a crash.
        self.sync_wal()
    }

    async fn purge(&mut self, log_id: LogIdOf<TypeConfig>) -> Result<(), io::Error> {
        // Record the purge point first: entries up to it are ignored even if the delete is lost.
        self.put_meta(KEY_LAST_PURGED, &log_id)?;
        self.db
            .delete_range_cf(
                cf(&self.db, CF_LOG)?,
                index_key(0),
                index_key(log_id.index() + 1),
            )
            .map_err(rocks_error)
    }
}
