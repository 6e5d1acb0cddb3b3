//! Which pods a pass syncs (pure). Syncing a pod costs the engine a list and an inspect of its
//! containers; doing it for every pod on every pass loads the engine in proportion to the pods
//! a node runs, and slows the containers it is creating. A pass therefore lists the node's
//! containers once (states only, as the kubelet's PLEG relists) and syncs a pod only when
//! something it depends on may have changed since its last sync: the pod in the store, its
//! containers' states, its probe results, or the time it was waiting for (a pod that was not
//! settled is synced every pass); and every pod at least every `RESYNC_INTERVAL_MS` anyway.

use std::collections::BTreeMap;

use serde_json::Value;

use super::plan::ProbeResult;

/// The longest a pod goes without a sync, whatever else happens.
pub(super) const RESYNC_INTERVAL_MS: i64 = 10_000;

/// A pod's containers as (id, engine state word), sorted by id.
pub(super) type ContainerStates = Vec<(String, String)>;

/// What a pod's last sync saw and concluded.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct LastSync {
    /// The pod as the sync left it (with the status it wrote), without its resourceVersion.
    pub(super) object: Value,
    pub(super) containers: ContainerStates,
    pub(super) probes: BTreeMap<String, ProbeResult>,
    /// Nothing was left to do and nothing waits for time to pass (no back-off running).
    pub(super) settled: bool,
    pub(super) at_ms: i64,
}

/// Sorts a pod's (id, state) pairs so two looks at the same containers compare equal.
pub(super) fn container_states(mut states: ContainerStates) -> ContainerStates {
    states.sort();
    states
}

/// `object` without `metadata.resourceVersion`.
pub(super) fn without_version(object: &Value) -> Value {
    let mut object = object.clone();
    if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        metadata.remove("resourceVersion");
    }
    object
}

/// Whether a watch event shows the pod exactly as its last sync left it: the echo of the
/// status that sync wrote, which needs no sync of its own.
pub(super) fn is_echo(last: Option<&LastSync>, object: &Value) -> bool {
    last.is_some_and(|last| last.object == without_version(object))
}

/// Whether a pass syncs a pod now.
pub(super) fn needs_sync(
    last: Option<&LastSync>,
    changed_in_store: bool,
    containers: &ContainerStates,
    probes: &BTreeMap<String, ProbeResult>,
    now_ms: i64,
) -> bool {
    let Some(last) = last else {
        return true;
    };
    changed_in_store
        || !last.settled
        || &last.containers != containers
        || &last.probes != probes
        || now_ms.saturating_sub(last.at_ms) >= RESYNC_INTERVAL_MS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn states(pairs: &[(&str, &str)]) -> ContainerStates {
        container_states(
            pairs
                .iter()
                .map(|(id, state)| ((*id).to_owned(), (*state).to_owned()))
                .collect(),
        )
    }

    fn settled_at(at_ms: i64, containers: ContainerStates) -> LastSync {
        LastSync {
            object: Value::Null,
            containers,
            probes: BTreeMap::new(),
            settled: true,
            at_ms,
        }
    }

    #[test]
    fn a_settled_pod_whose_containers_probes_and_object_did_not_change_is_left_alone() {
        let running = states(&[("b", "running"), ("a", "exited")]);
        let last = settled_at(1_000, running.clone());
        assert!(!needs_sync(
            Some(&last),
            false,
            &running,
            &BTreeMap::new(),
            2_000
        ));
    }

    #[test]
    fn a_new_pod_a_changed_object_or_an_unsettled_pod_is_synced() {
        let running = states(&[("a", "running")]);
        assert!(needs_sync(None, false, &running, &BTreeMap::new(), 0));
        let last = settled_at(1_000, running.clone());
        assert!(needs_sync(
            Some(&last),
            true,
            &running,
            &BTreeMap::new(),
            1_000
        ));
        let waiting = LastSync {
            settled: false,
            ..last
        };
        assert!(needs_sync(
            Some(&waiting),
            false,
            &running,
            &BTreeMap::new(),
            1_000
        ));
    }

    #[test]
    fn a_container_that_exited_appeared_or_went_makes_its_pod_synced() {
        let last = settled_at(1_000, states(&[("a", "running")]));
        for now in [
            states(&[("a", "exited")]),
            states(&[("a", "running"), ("b", "created")]),
            states(&[]),
        ] {
            assert!(
                needs_sync(Some(&last), false, &now, &BTreeMap::new(), 1_000),
                "{now:?}"
            );
        }
    }

    #[test]
    fn a_changed_probe_result_makes_its_pod_synced() {
        let running = states(&[("a", "running")]);
        let last = settled_at(1_000, running.clone());
        let probes = BTreeMap::from([(
            "web".to_owned(),
            ProbeResult {
                ready: true,
                liveness_failed: false,
                started: true,
            },
        )]);
        assert!(needs_sync(Some(&last), false, &running, &probes, 1_000));
    }

    #[test]
    fn every_pod_is_synced_again_after_the_resync_interval() {
        let running = states(&[("a", "running")]);
        let last = settled_at(1_000, running.clone());
        let due = 1_000 + RESYNC_INTERVAL_MS;
        assert!(!needs_sync(
            Some(&last),
            false,
            &running,
            &BTreeMap::new(),
            due - 1
        ));
        assert!(needs_sync(
            Some(&last),
            false,
            &running,
            &BTreeMap::new(),
            due
        ));
    }

    #[test]
    fn the_echo_of_the_status_a_sync_wrote_is_told_from_a_real_change() {
        let written = serde_json::json!({
            "metadata": {"name": "p", "uid": "u"},
            "spec": {"containers": [{"name": "a"}]},
            "status": {"phase": "Running"}
        });
        let last = LastSync {
            object: written.clone(),
            ..settled_at(0, Vec::new())
        };
        let mut echo = written.clone();
        echo["metadata"]["resourceVersion"] = "42".into();
        assert!(is_echo(Some(&last), &echo));
        let mut deleting = echo.clone();
        deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z".into();
        assert!(!is_echo(Some(&last), &deleting));
        assert!(!is_echo(None, &echo), "a pod never synced is never an echo");
    }
}
