//! A follower's forwarded writes: the client writes this node takes while another node leads
//! go to the leader several at once, in one `Propose` call, instead of one call each.
//!
//! Group commit again (see [`crate::proposer::run_groups`]): while `CALLS_IN_FLIGHT` calls are
//! on their way, new writes wait, and the next call takes every write waiting then. The leader
//! hands each command of a call to its proposer on its own and answers with each one's
//! outcome, in order, so a write forwarded with others succeeds or fails exactly as it would
//! alone. A lone write goes at once.

use std::collections::HashMap;
use std::sync::Arc;

use flotilla_proto::RaftMessage;
use futures::future::BoxFuture;
use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};

use crate::network::{decode, encode, PeerChannels};
use crate::proposer::{
    approximate_bytes, run_groups, ProposeError, MAX_COMMANDS_PER_ENTRY, MAX_ENTRY_BYTES,
};
use crate::server::NOT_LEADER_PREFIX;
use crate::types::{ClusterNode, Command, CommandResponse};

/// `Propose` calls on their way to the leader at once: one, so that under load each call takes
/// everything that arrived during the previous one (bench-scheduler: fewer, larger calls cost
/// the followers and the leader less CPU per write than 2 or 4 in flight). A call stops waiting
/// when this node learns of a new leader, so a leader cut off does not hold up the next call.
const CALLS_IN_FLIGHT: usize = 1;
/// Writes waiting for a call at most; further writers wait for room.
const QUEUE_LENGTH: usize = 4096;

/// One attempt to reach the leader, and whether trying again is safe.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Attempt {
    /// The write was certainly not taken.
    Retry(String),
    /// The write may or may not have committed.
    Ambiguous(String),
}

/// Resolves once this node's view of the leader is no longer the given node id.
pub(crate) type LeaderChanged = Arc<dyn Fn(u64) -> BoxFuture<'static, ()> + Send + Sync>;

struct Forwarded {
    command: Command,
    leader_id: u64,
    leader: ClusterNode,
    reply: oneshot::Sender<Result<CommandResponse, Attempt>>,
}

/// A handle on the forwarding task. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Forwarder {
    queue: mpsc::Sender<Forwarded>,
}

impl Forwarder {
    /// Starts the forwarding task; it ends when every handle is dropped.
    pub(crate) fn start(channels: PeerChannels, leader_changed: LeaderChanged) -> Forwarder {
        let (queue, writes) = mpsc::channel(QUEUE_LENGTH);
        tokio::spawn(run_groups(
            writes,
            CALLS_IN_FLIGHT,
            MAX_COMMANDS_PER_ENTRY,
            MAX_ENTRY_BYTES,
            |write: &Forwarded| approximate_bytes(&write.command),
            move |group| forward(channels.clone(), leader_changed.clone(), group),
        ));
        Forwarder { queue }
    }

    /// Sends `command` to `leader` and waits for its outcome, or until another node leads (the
    /// command may still commit: ambiguous).
    pub(crate) async fn forward(
        &self,
        command: Command,
        leader_id: u64,
        leader: ClusterNode,
    ) -> Result<CommandResponse, Attempt> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(Forwarded {
                command,
                leader_id,
                leader,
                reply,
            })
            .await
            .map_err(|_| Attempt::Retry("the forwarder has stopped".into()))?;
        answer
            .await
            .map_err(|_| Attempt::Ambiguous("the forwarder dropped the write".into()))?
    }
}

/// Sends a group of writes, one call per leader they name (one, but for a group taken while
/// the leader changed), and answers each writer.
async fn forward(channels: PeerChannels, leader_changed: LeaderChanged, group: Vec<Forwarded>) {
    let mut by_leader: HashMap<u64, (ClusterNode, Vec<Forwarded>)> = HashMap::new();
    for write in group {
        by_leader
            .entry(write.leader_id)
            .or_insert_with(|| (write.leader.clone(), Vec::new()))
            .1
            .push(write);
    }
    let calls = by_leader.into_iter().map(|(leader_id, (leader, writes))| {
        call(&channels, leader_changed(leader_id), leader, writes)
    });
    futures::future::join_all(calls).await;
}

async fn call(
    channels: &PeerChannels,
    mut leader_changed: BoxFuture<'static, ()>,
    leader: ClusterNode,
    writes: Vec<Forwarded>,
) {
    let (commands, replies): (Vec<Command>, Vec<_>) = writes
        .into_iter()
        .map(|write| (write.command, write.reply))
        .unzip();
    // Another node leads since these writes were queued: nothing was sent, ask again.
    if (&mut leader_changed).now_or_never().is_some() {
        let attempt = Attempt::Retry(format!(
            "forward to leader {}: another node leads now; not sent",
            leader.name
        ));
        for reply in replies {
            let _ = reply.send(Err(attempt.clone()));
        }
        return;
    }
    // A leader cut off silently never answers: stop waiting once this node learns of an
    // election, so writers hear within an election timeout instead of their own deadlines.
    let outcomes = tokio::select! {
        outcomes = propose(channels, &leader, &commands) => outcomes,
        () = leader_changed => Err(Attempt::Ambiguous(format!(
            "forward to leader {}: a new election started before it answered",
            leader.name
        ))),
    };
    match outcomes {
        Ok(outcomes) => {
            for (outcome, reply) in outcomes.into_iter().zip(replies) {
                let _ = reply.send(outcome.map_err(|error| match error {
                    ProposeError::NotLeader(message) => Attempt::Retry(format!(
                        "forward to leader {}: {NOT_LEADER_PREFIX}; {message}",
                        leader.name
                    )),
                    ProposeError::Unknown(message) => Attempt::Ambiguous(format!(
                        "forward to leader {}: write failed, outcome unknown: {message}",
                        leader.name
                    )),
                }));
            }
        }
        Err(attempt) => {
            for reply in replies {
                let _ = reply.send(Err(attempt.clone()));
            }
        }
    }
}

/// One `Propose` call: each command's outcome, in order.
async fn propose(
    channels: &PeerChannels,
    leader: &ClusterNode,
    commands: &[Command],
) -> Result<Vec<Result<CommandResponse, ProposeError>>, Attempt> {
    let mut client = channels
        .raft_client(&leader.address)
        .map_err(|e| Attempt::Retry(e.to_string()))?;
    let payload_json = encode(&commands).map_err(Attempt::Retry)?;
    let reply = client
        .propose(RaftMessage { payload_json })
        .await
        .map_err(|status| classify_forward_failure(leader, status))?;
    let outcomes: Vec<Result<CommandResponse, ProposeError>> =
        decode(&reply.into_inner().payload_json)
            .map_err(|e| Attempt::Ambiguous(format!("forward to leader {}: {e}", leader.name)))?;
    if outcomes.len() != commands.len() {
        return Err(Attempt::Ambiguous(format!(
            "forward to leader {}: {} writes were answered with {} outcomes",
            leader.name,
            commands.len(),
            outcomes.len()
        )));
    }
    Ok(outcomes)
}

/// A forwarded call that failed: safe to retry only when it cannot have been taken.
fn classify_forward_failure(leader: &ClusterNode, status: tonic::Status) -> Attempt {
    let message = format!("forward to leader {}: {}", leader.name, status.message());
    let never_sent = status.code() == tonic::Code::Unavailable
        && (status.message().starts_with(NOT_LEADER_PREFIX)
            || status.message().contains("tcp connect error")
            || status.message().contains("Connection refused")
            || status.message().contains("connection error"));
    if never_sent {
        Attempt::Retry(message)
    } else {
        Attempt::Ambiguous(message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client_tls() -> rustls::ClientConfig {
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions();
        let Ok(builder) = builder else {
            panic!("ring offers the default protocol versions");
        };
        builder
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth()
    }

    fn delete(name: &str) -> Command {
        Command::Delete {
            key: crate::ObjectKey::new("ConfigMap", "default", name),
            resource_version: None,
        }
    }

    fn leader() -> ClusterNode {
        ClusterNode {
            name: "n1".into(),
            address: "127.0.0.1:1".into(),
        }
    }

    #[test]
    fn a_call_refused_before_the_leader_took_it_is_retried() {
        for message in [
            format!("{NOT_LEADER_PREFIX}; ask n2"),
            "tcp connect error: Connection refused".to_string(),
        ] {
            let attempt = classify_forward_failure(&leader(), tonic::Status::unavailable(message));
            assert!(matches!(attempt, Attempt::Retry(_)), "{attempt:?}");
        }
    }

    #[test]
    fn a_call_that_failed_after_the_leader_took_it_is_ambiguous() {
        for status in [
            tonic::Status::internal("write failed, outcome unknown"),
            tonic::Status::deadline_exceeded("timeout"),
            tonic::Status::unavailable("the stream was reset"),
        ] {
            let attempt = classify_forward_failure(&leader(), status);
            assert!(matches!(attempt, Attempt::Ambiguous(_)), "{attempt:?}");
        }
    }

    #[tokio::test]
    async fn writes_queued_for_a_leader_that_was_replaced_meanwhile_are_not_sent_and_retried() {
        let already: LeaderChanged = Arc::new(|_| Box::pin(futures::future::ready(())));
        let forwarder = Forwarder::start(PeerChannels::new(Arc::new(client_tls())), already);
        let outcome = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            forwarder.forward(delete("c0"), 1, leader()),
        )
        .await;
        let Ok(outcome) = outcome else {
            panic!("the forwarded write was not answered within 10 s");
        };
        match outcome {
            Err(Attempt::Retry(message)) => assert!(message.contains("not sent"), "{message}"),
            other => panic!("expected a retry, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_write_to_an_unreachable_leader_is_answered_and_not_lost() {
        // Nothing listens on port 1: the call fails before the leader could take it.
        let never: LeaderChanged = Arc::new(|_| Box::pin(futures::future::pending()));
        let forwarder = Forwarder::start(PeerChannels::new(Arc::new(client_tls())), never);
        let writes =
            (0..3).map(|index| forwarder.forward(delete(&format!("c{index}")), 1, leader()));
        let outcomes = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            futures::future::join_all(writes),
        )
        .await;
        let Ok(outcomes) = outcomes else {
            panic!("the forwarded writes were not answered within 10 s");
        };
        for outcome in outcomes {
            assert!(matches!(outcome, Err(Attempt::Retry(_))), "{outcome:?}");
        }
    }
}
