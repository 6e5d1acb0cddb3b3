//! The Raft log and vote in RocksDB, with a group-commit WAL syncer.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

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

/// Entries kept parsed in memory after they were appended, at most.
const RECENT_ENTRIES_KEPT: usize = 1024;
/// ... and at most about this many bytes of them (their JSON in the log).
const RECENT_BYTES_KEPT: usize = 64 * 1024 * 1024;

/// The log store. Clones share the database, the syncer and the recent entries.
#[derive(Clone)]
pub struct LogStore {
    db: Arc<DB>,
    syncer: mpsc::SyncSender<IOFlushed<TypeConfig>>,
    recent: Arc<Mutex<RecentEntries>>,
}

/// The last entries appended, parsed, with consecutive indexes: the leader replicates what it
/// has just appended, and parsing it back from RocksDB for every follower was a large part of
/// its work. Reads outside it go to RocksDB.
#[derive(Default)]
struct RecentEntries {
    /// Each entry with the size of its JSON.
    entries: VecDeque<(EntryOf<TypeConfig>, usize)>,
    bytes: usize,
}

impl RecentEntries {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(entry, _)| entry.index())
    }

    fn last_index(&self) -> Option<u64> {
        self.entries.back().map(|(entry, _)| entry.index())
    }

    fn drop_first(&mut self) {
        if let Some((_, size)) = self.entries.pop_front() {
            self.bytes -= size;
        }
    }

    /// Drops every entry with an index at or above `from`.
    fn truncate_from(&mut self, from: u64) {
        while self.last_index().is_some_and(|last| last >= from) {
            if let Some((_, size)) = self.entries.pop_back() {
                self.bytes -= size;
            }
        }
    }

    /// Drops every entry with an index at or below `upto`.
    fn purge_upto(&mut self, upto: u64) {
        while self.first_index().is_some_and(|first| first <= upto) {
            self.drop_first();
        }
    }

    fn push(&mut self, entry: EntryOf<TypeConfig>, size: usize) {
        let index = entry.index();
        self.truncate_from(index);
        if self.last_index().is_some_and(|last| last + 1 != index) {
            self.entries.clear();
            self.bytes = 0;
        }
        self.entries.push_back((entry, size));
        self.bytes += size;
        while self.entries.len() > RECENT_ENTRIES_KEPT
            || (self.bytes > RECENT_BYTES_KEPT && self.entries.len() > 1)
        {
            self.drop_first();
        }
    }

    /// The entries `start..end`, when all of them are here.
    fn get(&self, start: u64, end: u64) -> Option<Vec<EntryOf<TypeConfig>>> {
        let first = self.first_index()?;
        let last = self.last_index()?;
        if start < first || end > last + 1 || start >= end {
            return None;
        }
        let offset = usize::try_from(start - first).ok()?;
        let count = usize::try_from(end - start).ok()?;
        Some(
            self.entries
                .iter()
                .skip(offset)
                .take(count)
                .map(|(entry, _)| entry.clone())
                .collect(),
        )
    }
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
        Ok(LogStore {
            db,
            syncer,
            recent: Arc::default(),
        })
    }

    fn recent(&self) -> MutexGuard<'_, RecentEntries> {
        // Plain data: a panic elsewhere cannot leave it half-updated in a way reads rely on.
        self.recent
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
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
        let end = match range.end_bound() {
            Bound::Included(x) => Some(x.saturating_add(1)),
            Bound::Excluded(x) => Some(*x),
            Bound::Unbounded => None,
        };
        if let Some(end) = end {
            if let Some(entries) = self.recent().get(start, end) {
                return Ok(entries);
            }
        }
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
        let mut appended = Vec::new();
        for entry in entries {
            let value = serde_json::to_vec(&entry).map_err(|e| encode_error("log entry", e))?;
            batch.put_cf(cf_log, index_key(entry.index()), &value);
            appended.push((entry, value.len()));
        }
        // Written (readable) now, acknowledged once the syncer has synced the WAL.
        let mut recent = self.recent();
        self.db.write(batch).map_err(rocks_error)?;
        for (entry, size) in appended {
            recent.push(entry, size);
        }
        drop(recent);
        self.syncer
            .send(callback)
            .map_err(|_| io::Error::other("the WAL syncer has stopped"))
    }

    async fn truncate_after(
        &mut self,
        last_log_id: Option<LogIdOf<TypeConfig>>,
    ) -> Result<(), io::Error> {
        let from = last_log_id.map(|id| id.index() + 1).unwrap_or(0);
        self.recent().truncate_from(from);
        self.db
            .delete_range_cf(cf(&self.db, CF_LOG)?, index_key(from), index_key(u64::MAX))
            .map_err(rocks_error)?;
        // Conflicting entries must not come back after a crash.
        self.sync_wal()
    }

    async fn purge(&mut self, log_id: LogIdOf<TypeConfig>) -> Result<(), io::Error> {
        // Record the purge point first: entries up to it are ignored even if the delete is lost.
        self.put_meta(KEY_LAST_PURGED, &log_id)?;
        self.recent().purge_upto(log_id.index());
        self.db
            .delete_range_cf(
                cf(&self.db, CF_LOG)?,
                index_key(0),
                index_key(log_id.index() + 1),
            )
            .map_err(rocks_error)
    }
}

#[cfg(test)]
mod tests {
    use openraft::entry::RaftEntry;
    use openraft::impls::leader_id_adv::LeaderId;
    use openraft::LogId;

    use super::*;

    fn entry(index: u64, term: u64) -> EntryOf<TypeConfig> {
        EntryOf::<TypeConfig>::new_blank(LogId::new(LeaderId { term, node_id: 1 }, index))
    }

    fn indexes(entries: &[EntryOf<TypeConfig>]) -> Vec<(u64, u64)> {
        entries
            .iter()
            .map(|e| (e.index(), e.log_id().leader_id.term))
            .collect()
    }

    #[test]
    fn recent_entries_serve_only_ranges_they_hold_whole() {
        let mut recent = RecentEntries::default();
        for index in 5..10 {
            recent.push(entry(index, 1), 10);
        }
        assert_eq!(
            indexes(&recent.get(6, 8).unwrap_or_default()),
            [(6, 1), (7, 1)]
        );
        assert!(recent.get(4, 8).is_none(), "starts before the first");
        assert!(recent.get(8, 11).is_none(), "ends after the last");
    }

    #[test]
    fn an_entry_appended_over_a_conflict_replaces_the_tail() {
        let mut recent = RecentEntries::default();
        for index in 1..6 {
            recent.push(entry(index, 1), 10);
        }
        recent.push(entry(3, 2), 10);
        assert_eq!(
            indexes(&recent.get(1, 4).unwrap_or_default()),
            [(1, 1), (2, 1), (3, 2)]
        );
        assert!(recent.get(4, 5).is_none());
        assert_eq!(recent.bytes, 30);
    }

    #[test]
    fn truncation_purge_and_the_limits_drop_entries() {
        let mut recent = RecentEntries::default();
        for index in 1..=(RECENT_ENTRIES_KEPT as u64 + 10) {
            recent.push(entry(index, 1), 1);
        }
        assert_eq!(recent.first_index(), Some(11));
        recent.truncate_from(100);
        recent.purge_upto(20);
        assert_eq!(
            (recent.first_index(), recent.last_index()),
            (Some(21), Some(99))
        );
        recent.push(entry(200, 1), 1);
        assert_eq!(
            (recent.first_index(), recent.last_index()),
            (Some(200), Some(200))
        );
    }
}
