//! Node heartbeats, kept in the leader's memory rather than in the log.
//!
//! A heartbeat says only "this node is alive". Writing one through Raft per node per second
//! would make the heartbeats of a thousand nodes the cluster's main write load, so, as Swarm's
//! dispatcher and Nomad's heartbeat timers do, the leader keeps the last time it heard from
//! each node in memory; followers forward heartbeats to it. The time is the leader's own clock
//! at arrival, so node clocks never enter the judgement. A new leader starts with an empty
//! table and gives every node a full grace period from the moment it began leading (the node
//! lifecycle controller does that). Node status (conditions, capacity) still goes through the
//! log, when it changes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// The last heartbeat of each node as the leader received it, in milliseconds since the Unix
/// epoch. Cheap to clone; clones share the table.
#[derive(Debug, Clone, Default)]
pub struct NodeHeartbeats {
    last_heard_ms: Arc<Mutex<HashMap<String, i64>>>,
}

impl NodeHeartbeats {
    fn table(&self) -> MutexGuard<'_, HashMap<String, i64>> {
        // The table holds plain timestamps: a panic elsewhere cannot leave it inconsistent.
        self.last_heard_ms
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a heartbeat of `node_name` received at `now_ms`; an older time never replaces a
    /// newer one.
    pub fn record(&self, node_name: &str, now_ms: i64) {
        let mut table = self.table();
        match table.get_mut(node_name) {
            Some(last) => *last = (*last).max(now_ms),
            None => {
                table.insert(node_name.to_string(), now_ms);
            }
        }
    }

    /// When each node was last heard from.
    pub fn last_heard_ms(&self) -> HashMap<String, i64> {
        self.table().clone()
    }

    /// Forgets every node that is not in `known` (removed Node objects).
    pub fn retain(&self, known: &dyn Fn(&str) -> bool) {
        self.table().retain(|name, _| known(name));
    }
}

/// Milliseconds since the Unix epoch, by this machine's clock.
pub fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_heartbeat_of_a_node_wins() {
        let heartbeats = NodeHeartbeats::default();
        heartbeats.record("n1", 2_000);
        heartbeats.record("n1", 1_000);
        heartbeats.record("n2", 1_500);
        let table = heartbeats.last_heard_ms();
        assert_eq!(table.get("n1"), Some(&2_000));
        assert_eq!(table.get("n2"), Some(&1_500));
    }

    #[test]
    fn removed_nodes_are_forgotten() {
        let heartbeats = NodeHeartbeats::default();
        heartbeats.record("n1", 1_000);
        heartbeats.record("gone", 1_000);
        heartbeats.retain(&|name| name == "n1");
        assert_eq!(heartbeats.last_heard_ms().len(), 1);
    }
}
