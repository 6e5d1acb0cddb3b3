//! Garbage collection: an object whose controlling owner is gone is deleted (background
//! cascading deletion), and so is everything in a namespace that no longer exists. Dependents
//! to keep (`--cascade=orphan`) have had their ownerReferences removed before the owner went.

use std::collections::HashSet;

use serde_json::Value;

use super::Action;

/// One object as the collector sees it.
#[derive(Debug, Clone)]
pub struct Tracked {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub resource_version: String,
    /// (kind, uid) of each owner.
    pub owners: Vec<(String, String)>,
}

impl Tracked {
    pub fn of(object: &Value) -> Tracked {
        let text = |pointer: &str| {
            object
                .pointer(pointer)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        let owners = object
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .map(|refs| {
                refs.iter()
                    .map(|r| {
                        (
                            r.get("kind")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_string(),
                            r.get("uid")
                                .and_then(Value::as_str)
                                .unwrap_or("")
                                .to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        Tracked {
            kind: text("/kind"),
            namespace: text("/metadata/namespace"),
            name: text("/metadata/name"),
            uid: text("/metadata/uid"),
            resource_version: text("/metadata/resourceVersion"),
            owners,
        }
    }
}

/// Deletes of objects whose every owner is gone, or whose namespace is gone.
pub fn collect(objects: &[Tracked], namespaces: &HashSet<String>) -> Vec<Action> {
    let alive: HashSet<(&str, &str)> = objects
        .iter()
        .map(|o| (o.kind.as_str(), o.uid.as_str()))
        .collect();
    objects
        .iter()
        .filter(|object| {
            let namespace_gone =
                !object.namespace.is_empty() && !namespaces.contains(&object.namespace);
            let orphaned = !object.owners.is_empty()
                && object
                    .owners
                    .iter()
                    .all(|(kind, uid)| !alive.contains(&(kind.as_str(), uid.as_str())));
            namespace_gone || orphaned
        })
        .map(|object| Action::Delete {
            kind: object.kind.clone(),
            namespace: object.namespace.clone(),
            name: object.name.clone(),
            resource_version: Some(object.resource_version.clone()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn object(
        kind: &str,
        name: &str,
        uid: &str,
        owner: Option<(&str, &str)>,
        namespace: &str,
    ) -> Tracked {
        let owners = owner
            .map(|(k, u)| json!([{"kind": k, "uid": u, "name": "x", "apiVersion": "apps/v1"}]))
            .unwrap_or(json!([]));
        Tracked::of(
            &json!({"kind": kind, "metadata": {"name": name, "namespace": namespace, "uid": uid, "resourceVersion": "3", "ownerReferences": owners}}),
        )
    }

    #[test]
    fn dependents_of_a_deleted_owner_are_collected_and_others_kept() {
        let namespaces = HashSet::from(["default".to_string()]);
        let objects = vec![
            object("Deployment", "web", "d1", None, "default"),
            object(
                "ReplicaSet",
                "web-1",
                "r1",
                Some(("Deployment", "d1")),
                "default",
            ),
            object(
                "ReplicaSet",
                "gone-1",
                "r2",
                Some(("Deployment", "d-gone")),
                "default",
            ),
            object(
                "Pod",
                "gone-1-a",
                "p1",
                Some(("ReplicaSet", "r2")),
                "default",
            ),
            object("Pod", "bare", "p2", None, "default"),
        ];
        let deleted: Vec<String> = collect(&objects, &namespaces)
            .into_iter()
            .filter_map(|a| match a {
                Action::Delete { name, .. } => Some(name),
                _ => None,
            })
            .collect();
        // The pod of the orphaned ReplicaSet goes in a later pass, once the ReplicaSet is gone.
        assert_eq!(deleted, vec!["gone-1".to_string()]);
    }

    #[test]
    fn everything_in_a_deleted_namespace_is_collected() {
        let namespaces = HashSet::from(["default".to_string()]);
        let objects = vec![
            object("ConfigMap", "a", "c1", None, "team"),
            object("ConfigMap", "b", "c2", None, "default"),
        ];
        let actions = collect(&objects, &namespaces);
        assert_eq!(actions.len(), 1);
        assert!(matches!(&actions[0], Action::Delete { name, .. } if name == "a"));
    }
}
