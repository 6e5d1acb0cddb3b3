//! Membership: which nodes vote. The plan is a pure function of the members' state; the
//! leader's manager loop executes it. Joining nodes enter as learners and are promoted while
//! voters are below the target; beyond it they stay learners that replicate everything.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use flotilla_raft::{ClusterNode, Replica};
use openraft::async_runtime::WatchReceiver;
use openraft::ChangeMembers;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// A learner is promoted only when its log is within this many entries of the leader's.
pub const PROMOTION_LAG_ENTRIES: u64 = 1_000;

/// One member as the leader sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemberView {
    pub id: u64,
    pub name: String,
    pub address: String,
    pub voter: bool,
    /// The leader's view: replication reached this index and heartbeats are answered.
    pub healthy: bool,
    pub matched_index: Option<u64>,
    pub last_contact_ms: Option<u64>,
}

/// What the manager should change next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MembershipAction {
    Promote(u64),
}

/// Promotes the healthy learner with the smallest id while voters are fewer than
/// `target_voters`. One change at a time: each waits for the previous to commit.
pub fn plan(members: &[MemberView], target_voters: usize) -> Vec<MembershipAction> {
    let voters = members.iter().filter(|m| m.voter).count();
    if voters >= target_voters {
        return Vec::new();
    }
    members
        .iter()
        .filter(|m| !m.voter && m.healthy)
        .min_by_key(|m| m.id)
        .map(|m| vec![MembershipAction::Promote(m.id)])
        .unwrap_or_default()
}

/// The members and their health as this node sees them (health is only known on the leader).
pub fn member_views(replica: &Replica, election_timeout_max_ms: u64) -> Vec<MemberView> {
    let metrics = replica.raft().metrics().borrow_watched().clone();
    let membership = metrics.membership_config.membership();
    let voters: BTreeSet<u64> = membership.voter_ids().collect();
    let last_log_index = metrics.last_log_index.unwrap_or(0);
    let is_leader = metrics.current_leader == Some(metrics.id);
    let replication = metrics.replication.clone().unwrap_or_default();
    let heartbeat = metrics.heartbeat.clone().unwrap_or_default();
    membership
        .nodes()
        .map(|(id, node)| {
            let matched_index = if *id == metrics.id {
                metrics.last_log_index
            } else {
                replication
                    .get(id)
                    .cloned()
                    .flatten()
                    .map(|log_id| log_id.index)
            };
            let last_contact_ms = if *id == metrics.id {
                Some(0)
            } else {
                heartbeat
                    .get(id)
                    .cloned()
                    .flatten()
                    .map(|at| openraft::Instant::elapsed(&*at).as_millis() as u64)
            };
            let caught_up =
                matched_index.is_some_and(|m| m + PROMOTION_LAG_ENTRIES >= last_log_index);
            let recently_heard =
                last_contact_ms.is_some_and(|ms| ms <= 3 * election_timeout_max_ms);
            MemberView {
                id: *id,
                name: node.name.clone(),
                address: node.address.clone(),
                voter: voters.contains(id),
                healthy: is_leader && caught_up && recently_heard,
                matched_index,
                last_contact_ms,
            }
        })
        .collect()
}

/// Runs on every node; acts only while this node is the leader.
pub async fn run_manager(
    replica: Replica,
    target_voters: usize,
    election_timeout_max_ms: u64,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !replica.raft().is_leader() {
            continue;
        }
        let members = member_views(&replica, election_timeout_max_ms);
        for action in plan(&members, target_voters) {
            match action {
                MembershipAction::Promote(id) => {
                    tracing::info!(node_id = id, "promoting learner to voter");
                    let change = ChangeMembers::AddVoterIds(BTreeSet::from([id]));
                    if let Err(error) = replica.raft().change_membership(change, true).await {
                        tracing::warn!(node_id = id, %error, "promote learner");
                    }
                }
            }
        }
    }
}

/// Removes the node `id` from the membership entirely (voter or learner).
pub async fn remove_member(replica: &Replica, id: u64) -> Result<(), String> {
    let metrics = replica.raft().metrics().borrow_watched().clone();
    let membership = metrics.membership_config.membership();
    let is_voter = membership.voter_ids().any(|v| v == id);
    let change = if is_voter {
        ChangeMembers::RemoveVoters(BTreeSet::from([id]))
    } else {
        ChangeMembers::RemoveNodes(BTreeSet::from([id]))
    };
    replica
        .raft()
        .change_membership(change, false)
        .await
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The node map of the current membership, for lookups by name.
pub fn nodes_by_name(replica: &Replica) -> BTreeMap<String, (u64, ClusterNode)> {
    let metrics = replica.raft().metrics().borrow_watched().clone();
    metrics
        .membership_config
        .membership()
        .nodes()
        .map(|(id, node)| (node.name.clone(), (*id, node.clone())))
        .collect()
}

#[cfg(test)]
mod tests;
