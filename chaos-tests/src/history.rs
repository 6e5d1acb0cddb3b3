//! A history of operations on registers, recorded by many clients at once for the
//! linearizability checker ([`crate::linearizability`]).
//!
//! Each key (an object name) is a register. A client calls [`History::invoke`] just before it
//! sends a request and [`History::complete`] once it knows the outcome; both take their
//! timestamp from one monotonic clock started with the history, so intervals of different
//! clients can be compared. An operation that is never completed counts as
//! [`Outcome::Unknown`]: it may or may not have taken effect, at any time after its invocation.
//!
//! The history is written as JSON lines, one [`Entry`] per line, for the results folder, and can
//! be read back with [`read_jsonl`] to be checked again.

use std::collections::BTreeMap;
use std::fmt;
use std::io::{BufRead, Write};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// The identity of one recorded operation: its index in the history, in invocation order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OpId(pub u64);

impl fmt::Display for OpId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "#{}", self.0)
    }
}

/// An operation on one register. Values are unique strings per write, so a compare-and-set by
/// resourceVersion is a compare-and-set by value.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Operation {
    /// An unconditional put of `value`.
    Write {
        /// The value written.
        value: String,
    },
    /// An update conditioned on the register holding `expected` (the value the client read
    /// together with the resourceVersion it sends); `expected: None` means "create if absent".
    Cas {
        /// The value the register must hold for the update to apply; `None`: absent.
        expected: Option<String>,
        /// The value written when it applies.
        new: String,
    },
    /// A read of the register.
    Read,
}

impl fmt::Display for Operation {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Operation::Write { value } => write!(formatter, "write {value:?}"),
            Operation::Cas { expected, new } => {
                write!(
                    formatter,
                    "cas {} -> {new:?}",
                    DisplayValue(expected.as_deref())
                )
            }
            Operation::Read => write!(formatter, "read"),
        }
    }
}

/// What a client learnt of an operation.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Outcome {
    /// A write or a compare-and-set took effect.
    Ok,
    /// A read returned `value` (`None`: the object was absent).
    ReadOk {
        /// The value read.
        value: Option<String>,
    },
    /// A compare-and-set was refused (Conflict, or AlreadyExists for a create): the register
    /// did not hold the expected value when the operation took place. This is an observation
    /// that the checker must linearize, unlike [`Outcome::Fail`].
    CasConflict,
    /// The operation definitely did not take effect and observed nothing (e.g. refused by
    /// validation, or rejected before being proposed). The checker drops it.
    Fail,
    /// Timeout, lost connection, or never completed: the operation may or may not have taken
    /// effect, at any time after its invocation (its return time is taken as infinity).
    Unknown,
}

impl fmt::Display for Outcome {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Ok => write!(formatter, "ok"),
            Outcome::ReadOk { value } => write!(formatter, "{}", DisplayValue(value.as_deref())),
            Outcome::CasConflict => write!(formatter, "conflict"),
            Outcome::Fail => write!(formatter, "failed"),
            Outcome::Unknown => write!(formatter, "unknown"),
        }
    }
}

/// One operation of the history: one JSON line of the file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The operation's identity (its index in invocation order).
    pub id: OpId,
    /// The client (task) that issued it; a client has at most one operation in flight.
    pub client: u64,
    /// The register (object name).
    pub key: String,
    /// What was asked.
    pub operation: Operation,
    /// When it was invoked, in nanoseconds since the history started.
    pub invoked_ns: u64,
    /// When it completed, in nanoseconds since the history started; `None` if it never did.
    pub returned_ns: Option<u64>,
    /// What the client learnt; [`Outcome::Unknown`] while (or if forever) pending.
    pub outcome: Outcome,
}

impl fmt::Display for Entry {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "{} client {} {} -> {} [{}, ",
            self.id,
            self.client,
            self.operation,
            self.outcome,
            DisplayNanos(self.invoked_ns)
        )?;
        match self.returned_ns {
            Some(returned) => write!(formatter, "{}]", DisplayNanos(returned)),
            None => write!(formatter, "never returned]"),
        }
    }
}

/// How many operations ended each way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// All operations invoked.
    pub total: usize,
    /// Writes and compare-and-sets that took effect, and reads that returned.
    pub ok: usize,
    /// Compare-and-sets refused because the register held another value.
    pub conflicts: usize,
    /// Operations that definitely did not take effect.
    pub failed: usize,
    /// Operations whose outcome is unknown, including those never completed.
    pub unknown: usize,
}

struct Recorded {
    start: Instant,
    entries: Vec<Entry>,
}

/// A thread-safe recorder of operations. Cloning it is cheap and every clone records into the
/// same history, so each tokio task can own one.
#[derive(Clone)]
pub struct History {
    inner: Arc<Mutex<Recorded>>,
}

impl Default for History {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for History {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("History")
            .field("operations", &self.len())
            .finish()
    }
}

impl History {
    /// An empty history whose clock starts now.
    pub fn new() -> Self {
        Self::from_entries(Vec::new())
    }

    /// A history holding `entries` (read back from a file, or built by hand). Operations
    /// recorded afterwards get the next ids and timestamps from a clock that starts now, so
    /// do not mix both.
    pub fn from_entries(entries: Vec<Entry>) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Recorded {
                start: Instant::now(),
                entries,
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Recorded> {
        // A panic while holding the lock cannot leave an entry half-written; keep recording.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records that `client` is about to send `operation` on `key`; call it just before
    /// sending. Returns the id to pass to [`History::complete`].
    pub fn invoke(&self, client: u64, key: impl Into<String>, operation: Operation) -> OpId {
        let key = key.into();
        let mut recorded = self.lock();
        let invoked_ns = nanos_since(recorded.start);
        let id = OpId(recorded.entries.len() as u64);
        recorded.entries.push(Entry {
            id,
            client,
            key,
            operation,
            invoked_ns,
            returned_ns: None,
            outcome: Outcome::Unknown,
        });
        id
    }

    /// Records the outcome of operation `id`; call it as soon as the outcome is known.
    /// Returns false (and records nothing) if `id` is not in the history or already completed.
    pub fn complete(&self, id: OpId, outcome: Outcome) -> bool {
        let mut recorded = self.lock();
        let returned_ns = nanos_since(recorded.start);
        let Some(entry) = usize::try_from(id.0)
            .ok()
            .and_then(|index| recorded.entries.get_mut(index))
        else {
            return false;
        };
        if entry.returned_ns.is_some() {
            return false;
        }
        entry.returned_ns = Some(returned_ns.max(entry.invoked_ns));
        entry.outcome = outcome;
        true
    }

    /// The history's clock now, in nanoseconds since it started: to mark when a fault began
    /// and ended on the same scale as the operations.
    pub fn now_ns(&self) -> u64 {
        nanos_since(self.lock().start)
    }

    /// How many operations were invoked.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether no operation was invoked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of every entry, in invocation order.
    pub fn entries(&self) -> Vec<Entry> {
        self.lock().entries.clone()
    }

    /// A copy of every entry, grouped by key, each group in invocation order.
    pub fn entries_by_key(&self) -> BTreeMap<String, Vec<Entry>> {
        group_by_key(&self.lock().entries)
    }

    /// How many operations ended each way; operations never completed count as unknown.
    pub fn counts(&self) -> Counts {
        let recorded = self.lock();
        let mut counts = Counts {
            total: recorded.entries.len(),
            ..Counts::default()
        };
        for entry in &recorded.entries {
            match entry.outcome {
                Outcome::Ok | Outcome::ReadOk { .. } => counts.ok += 1,
                Outcome::CasConflict => counts.conflicts += 1,
                Outcome::Fail => counts.failed += 1,
                Outcome::Unknown => counts.unknown += 1,
            }
        }
        counts
    }

    /// The (key, value) of every write and compare-and-set that was acknowledged (outcome
    /// [`Outcome::Ok`]), in invocation order: the input of
    /// [`crate::linearizability::lost_writes`] for write-once keys.
    pub fn acknowledged_writes(&self) -> Vec<(String, String)> {
        self.lock()
            .entries
            .iter()
            .filter(|entry| entry.outcome == Outcome::Ok)
            .filter_map(|entry| match &entry.operation {
                Operation::Write { value } => Some((entry.key.clone(), value.clone())),
                Operation::Cas { new, .. } => Some((entry.key.clone(), new.clone())),
                Operation::Read => None,
            })
            .collect()
    }

    /// Writes the history as JSON lines, one [`Entry`] per line, in invocation order.
    pub fn write_jsonl<W: Write>(&self, mut writer: W) -> std::io::Result<()> {
        let entries = self.entries();
        for entry in &entries {
            serde_json::to_writer(&mut writer, entry)?;
            writer.write_all(b"\n")?;
        }
        writer.flush()
    }
}

/// Reads a history written by [`History::write_jsonl`]; blank lines are skipped.
pub fn read_jsonl<R: BufRead>(reader: R) -> std::io::Result<Vec<Entry>> {
    let mut entries = Vec::new();
    for line in reader.lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        entries.push(serde_json::from_str(&line)?);
    }
    Ok(entries)
}

/// Groups `entries` by key, keeping their order within each key.
pub fn group_by_key(entries: &[Entry]) -> BTreeMap<String, Vec<Entry>> {
    let mut by_key: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
    for entry in entries {
        by_key
            .entry(entry.key.clone())
            .or_default()
            .push(entry.clone());
    }
    by_key
}

fn nanos_since(start: Instant) -> u64 {
    u64::try_from(start.elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Displays a register value: the quoted string, or `absent`.
pub(crate) struct DisplayValue<'a>(pub(crate) Option<&'a str>);

impl fmt::Display for DisplayValue<'_> {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(value) => write!(formatter, "{value:?}"),
            None => write!(formatter, "absent"),
        }
    }
}

/// Displays nanoseconds as milliseconds with three decimals.
struct DisplayNanos(u64);

impl fmt::Display for DisplayNanos {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{:.3} ms", self.0 as f64 / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(value: &str) -> Operation {
        Operation::Write {
            value: value.to_string(),
        }
    }

    #[test]
    fn operations_get_increasing_ids_and_ordered_timestamps() {
        let history = History::new();
        let first = history.invoke(1, "a", write("v1"));
        let second = history.invoke(2, "b", Operation::Read);
        assert!(history.complete(first, Outcome::Ok));
        assert!(history.complete(
            second,
            Outcome::ReadOk {
                value: Some("v1".to_string())
            }
        ));
        assert_eq!((first, second), (OpId(0), OpId(1)));
        let entries = history.entries();
        assert!(entries[0].invoked_ns <= entries[1].invoked_ns);
        assert!(entries[1].invoked_ns <= entries[0].returned_ns.unwrap());
        assert!(entries[0].returned_ns.unwrap() <= entries[1].returned_ns.unwrap());
    }

    #[test]
    fn an_operation_completes_only_once_and_unknown_ids_are_refused() {
        let history = History::new();
        let id = history.invoke(1, "a", write("v1"));
        assert!(history.complete(id, Outcome::Fail));
        assert!(!history.complete(id, Outcome::Ok));
        assert!(!history.complete(OpId(7), Outcome::Ok));
        assert_eq!(history.entries()[0].outcome, Outcome::Fail);
    }

    #[test]
    fn operations_never_completed_count_as_unknown() {
        let history = History::new();
        let ok = history.invoke(1, "a", write("v1"));
        history.complete(ok, Outcome::Ok);
        let failed = history.invoke(2, "a", write("v2"));
        history.complete(failed, Outcome::Fail);
        let conflict = history.invoke(
            3,
            "a",
            Operation::Cas {
                expected: None,
                new: "v3".to_string(),
            },
        );
        history.complete(conflict, Outcome::CasConflict);
        let timed_out = history.invoke(4, "b", write("v4"));
        history.complete(timed_out, Outcome::Unknown);
        history.invoke(5, "b", Operation::Read);
        assert_eq!(
            history.counts(),
            Counts {
                total: 5,
                ok: 1,
                conflicts: 1,
                failed: 1,
                unknown: 2
            }
        );
        assert_eq!(
            history.acknowledged_writes(),
            vec![("a".to_string(), "v1".to_string())]
        );
        let by_key = history.entries_by_key();
        assert_eq!(by_key["a"].len(), 3);
        assert_eq!(by_key["b"].len(), 2);
        assert_eq!(by_key["b"][1].returned_ns, None);
    }

    #[test]
    fn the_history_survives_a_round_trip_through_json_lines() {
        let history = History::new();
        let id = history.invoke(
            1,
            "a",
            Operation::Cas {
                expected: Some("v0".to_string()),
                new: "v1".to_string(),
            },
        );
        history.complete(id, Outcome::Ok);
        let read = history.invoke(2, "a", Operation::Read);
        history.complete(read, Outcome::ReadOk { value: None });
        history.invoke(3, "a", Operation::Read);
        let mut bytes = Vec::new();
        history.write_jsonl(&mut bytes).unwrap();
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(text.contains(r#""type":"cas""#), "{text}");
        let entries = read_jsonl(bytes.as_slice()).unwrap();
        assert_eq!(entries, history.entries());
    }

    #[tokio::test]
    async fn many_tasks_record_into_one_history() {
        let history = History::new();
        let mut tasks = tokio::task::JoinSet::new();
        for client in 0..16u64 {
            let history = history.clone();
            tasks.spawn(async move {
                for index in 0..50 {
                    let id = history.invoke(client, "k", write(&format!("{client}-{index}")));
                    tokio::task::yield_now().await;
                    history.complete(id, Outcome::Ok);
                }
            });
        }
        while let Some(result) = tasks.join_next().await {
            result.unwrap();
        }
        let counts = history.counts();
        assert_eq!((counts.total, counts.ok), (800, 800));
        let entries = history.entries();
        assert!(entries
            .iter()
            .enumerate()
            .all(|(index, entry)| entry.id == OpId(index as u64)));
    }
}
