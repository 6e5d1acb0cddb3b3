//! The leader's proposer: object commands proposed at the same moment (by clients of this node
//! and by followers forwarding theirs) go into the log together, as one `Command::Batch` entry,
//! instead of one entry each.
//!
//! This is group commit: while up to `ENTRIES_IN_FLIGHT` entries are on their way through the
//! log, new commands wait in the queue, and the next entry takes every command waiting then (up
//! to `MAX_COMMANDS_PER_ENTRY` and about `MAX_ENTRY_BYTES`). A lone command goes as an entry of
//! its own, so an idle cluster adds no latency. Each command of a batch succeeds or fails on its
//! own, exactly as it would alone; commands of one batch share the entry's resourceVersion, as
//! the scheduler's bindings already do.

use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::types::{Command, CommandResponse, TypeConfig};
use crate::Raft;

/// Batch entries on their way through the log at once.
const ENTRIES_IN_FLIGHT: usize = 8;
/// Commands in one entry at most.
pub(crate) const MAX_COMMANDS_PER_ENTRY: usize = 128;
/// An entry stops taking commands once their objects add up to about this many bytes (one
/// larger object still goes, alone).
pub(crate) const MAX_ENTRY_BYTES: usize = 1024 * 1024;
/// Commands waiting for an entry at most; further proposers wait for room.
const QUEUE_LENGTH: usize = 4096;

/// Why a proposal did not commit. Travels back to a follower that forwarded the command.
#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize)]
pub enum ProposeError {
    /// This node is not the leader (any more): nothing was written; ask the leader.
    #[error("not the leader: {0}")]
    NotLeader(String),
    /// The entry may or may not have committed (the leader failed meanwhile).
    #[error("outcome unknown: {0}")]
    Unknown(String),
}

struct Proposal {
    command: Command,
    reply: oneshot::Sender<Result<CommandResponse, ProposeError>>,
}

/// A handle on the proposer task. Cheap to clone.
#[derive(Clone)]
pub struct Proposer {
    raft: Raft,
    queue: mpsc::Sender<Proposal>,
}

impl Proposer {
    /// Starts the proposer task of `raft`; it ends when every handle is dropped.
    pub fn start(raft: Raft) -> Proposer {
        let (queue, proposals) = mpsc::channel(QUEUE_LENGTH);
        tokio::spawn(run(raft.clone(), proposals));
        Proposer { raft, queue }
    }

    /// Proposes `command` on this node (which must lead) and waits until it is applied.
    /// Object commands are batched with others; the rest go straight to Raft.
    pub async fn propose(&self, command: Command) -> Result<CommandResponse, ProposeError> {
        if !is_batchable(&command) {
            return write(&self.raft, command).await;
        }
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Proposal { command, reply })
            .await
            .map_err(|_| ProposeError::NotLeader("the proposer has stopped".into()))?;
        answer
            .await
            .map_err(|_| ProposeError::Unknown("the proposer dropped the command".into()))?
    }
}

/// Whether `command` may share a log entry with others: the object commands.
fn is_batchable(command: &Command) -> bool {
    matches!(
        command,
        Command::Create { .. }
            | Command::Apply { .. }
            | Command::Update { .. }
            | Command::Delete { .. }
            | Command::Bind { .. }
    )
}

/// About how many bytes `command`'s object takes in the log (strings and numbers; no
/// allocation).
pub(crate) fn approximate_bytes(command: &Command) -> usize {
    fn of(value: &Value) -> usize {
        match value {
            Value::Null | Value::Bool(_) => 5,
            Value::Number(_) => 12,
            Value::String(text) => text.len() + 3,
            Value::Array(items) => 2 + items.iter().map(of).sum::<usize>(),
            Value::Object(fields) => {
                2 + fields
                    .iter()
                    .map(|(key, value)| key.len() + 4 + of(value))
                    .sum::<usize>()
            }
        }
    }
    match command {
        Command::Create { object } | Command::Apply { object } | Command::Update { object, .. } => {
            of(object)
        }
        _ => 64,
    }
}

/// Splits queued proposals into entries: in order, each at most `max_commands` commands and,
/// unless it holds a single command, at most `max_bytes` of objects. Pure.
fn next_entry_len(sizes: &[usize], max_commands: usize, max_bytes: usize) -> usize {
    let mut bytes = 0;
    let mut taken = 0;
    for &size in sizes.iter().take(max_commands) {
        if taken > 0 && bytes + size > max_bytes {
            break;
        }
        bytes += size;
        taken += 1;
    }
    taken.max(usize::from(!sizes.is_empty()))
}

async fn run(raft: Raft, proposals: mpsc::Receiver<Proposal>) {
    run_groups(
        proposals,
        ENTRIES_IN_FLIGHT,
        MAX_COMMANDS_PER_ENTRY,
        MAX_ENTRY_BYTES,
        |proposal| approximate_bytes(&proposal.command),
        move |entry| {
            let raft = raft.clone();
            async move { commit(&raft, entry).await }
        },
    )
    .await;
}

/// Group commit over `queue`: while `groups_in_flight` groups are being committed, new items
/// wait; the next group takes every item waiting then, in order, up to `max_items` and about
/// `max_bytes` by `size_of` (see [`next_entry_len`]). A lone item goes as a group of its own,
/// so an idle queue adds no latency. Ends when every sender of `queue` is dropped. The
/// proposer's log entries and a follower's forwarded writes are both grouped this way.
pub(crate) async fn run_groups<T, Commit, Committed>(
    mut queue: mpsc::Receiver<T>,
    groups_in_flight: usize,
    max_items: usize,
    max_bytes: usize,
    size_of: impl Fn(&T) -> usize,
    commit: Commit,
) where
    T: Send + 'static,
    Commit: Fn(Vec<T>) -> Committed,
    Committed: std::future::Future<Output = ()> + Send + 'static,
{
    let in_flight = Arc::new(Semaphore::new(groups_in_flight));
    let mut waiting: Vec<T> = Vec::new();
    loop {
        if waiting.is_empty() {
            match queue.recv().await {
                Some(item) => waiting.push(item),
                None => return,
            }
        }
        // Wait for room in the pipeline first: meanwhile, more items arrive to share the
        // next group.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        while waiting.len() < max_items {
            match queue.try_recv() {
                Ok(item) => waiting.push(item),
                Err(_) => break,
            }
        }
        let sizes: Vec<usize> = waiting.iter().map(&size_of).collect();
        let taken = next_entry_len(&sizes, max_items, max_bytes);
        let group = commit(waiting.drain(..taken).collect());
        tokio::spawn(async move {
            group.await;
            drop(permit);
        });
    }
}

/// Commits `entry` as one log entry and answers each of its proposers.
async fn commit(raft: &Raft, mut entry: Vec<Proposal>) {
    if entry.len() == 1 {
        let Some(Proposal { command, reply }) = entry.pop() else {
            return;
        };
        let _ = reply.send(write(raft, command).await);
        return;
    }
    let (commands, replies): (Vec<Command>, Vec<_>) = entry
        .into_iter()
        .map(|proposal| (proposal.command, proposal.reply))
        .unzip();
    match write(raft, Command::Batch(commands)).await {
        Ok(response) if response.batch.len() == replies.len() => {
            for (result, reply) in response.batch.into_iter().zip(replies) {
                let _ = reply.send(Ok(CommandResponse {
                    result: Some(result),
                    batch: Vec::new(),
                }));
            }
        }
        Ok(response) => {
            let error = ProposeError::Unknown(format!(
                "a batch of {} commands was answered with {} results",
                replies.len(),
                response.batch.len()
            ));
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
        Err(error) => {
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}

/// One `client_write`, its failure classified.
async fn write(raft: &Raft, command: Command) -> Result<CommandResponse, ProposeError> {
    raft.client_write(command)
        .await
        .map(|response| response.data)
        .map_err(classify)
}

fn classify(error: RaftError<TypeConfig, ClientWriteError<TypeConfig>>) -> ProposeError {
    match error.api_error() {
        Some(ClientWriteError::ForwardToLeader(_)) => ProposeError::NotLeader(error.to_string()),
        _ => ProposeError::Unknown(error.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_takes_waiting_commands_up_to_the_count_limit() {
        assert_eq!(next_entry_len(&[10; 300], 128, 1 << 20), 128);
        assert_eq!(next_entry_len(&[10; 5], 128, 1 << 20), 5);
        assert_eq!(next_entry_len(&[], 128, 1 << 20), 0);
    }

    #[test]
    fn an_entry_stops_before_the_byte_limit_but_a_large_object_goes_alone() {
        assert_eq!(next_entry_len(&[400, 400, 400], 128, 1000), 2);
        assert_eq!(next_entry_len(&[5000, 10], 128, 1000), 1);
    }

    #[tokio::test]
    async fn items_queued_while_a_group_is_in_flight_go_together_in_the_next_group() {
        let (queue, items) = mpsc::channel(16);
        let (release_first, first_released) = oneshot::channel::<()>();
        let first_released = Arc::new(std::sync::Mutex::new(Some(first_released)));
        let (groups_tx, mut groups) = mpsc::unbounded_channel::<Vec<u32>>();
        let runner = tokio::spawn(run_groups(
            items,
            1,
            128,
            1 << 20,
            |_: &u32| 1,
            move |group: Vec<u32>| {
                let groups_tx = groups_tx.clone();
                let gate = first_released.lock().ok().and_then(|mut gate| gate.take());
                async move {
                    let _ = groups_tx.send(group);
                    // The first group stays in flight until the test releases it.
                    if let Some(gate) = gate {
                        let _ = gate.await;
                    }
                }
            },
        ));
        let _ = queue.send(1).await;
        assert_eq!(
            groups.recv().await,
            Some(vec![1]),
            "a lone item goes at once"
        );
        for item in 2..=5 {
            let _ = queue.send(item).await;
        }
        let _ = release_first.send(());
        assert_eq!(groups.recv().await, Some(vec![2, 3, 4, 5]));
        drop(queue);
        let ended = tokio::time::timeout(std::time::Duration::from_secs(5), runner).await;
        assert!(ended.is_ok(), "the loop ends once its queue is closed");
    }

    #[test]
    fn only_object_commands_share_an_entry() {
        let create = Command::Create {
            object: serde_json::json!({"kind": "ConfigMap"}).into(),
        };
        assert!(is_batchable(&create));
        assert!(!is_batchable(&Command::Batch(vec![create])));
        assert!(!is_batchable(&Command::ForgetNode { name: "n".into() }));
    }

    #[test]
    fn the_size_of_an_object_is_about_its_json_length() {
        let object =
            serde_json::json!({"metadata": {"name": "a-name"}, "data": {"k": "x".repeat(1000)}});
        let json_length = serde_json::to_vec(&object)
            .map(|json| json.len())
            .unwrap_or(0);
        let estimate = approximate_bytes(&Command::Create {
            object: object.into(),
        });
        assert!(
            estimate >= json_length && estimate < json_length * 2,
            "{estimate} vs {json_length}"
        );
    }
}
