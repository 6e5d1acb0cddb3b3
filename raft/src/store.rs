//! The object store's semantics as pure functions: given a command, the stored object it
//! touches and the log index it commits at, decide the new object and the watch event.
//! No IO here; the RocksDB state machine (`storage`) looks objects up and writes the decisions.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::kinds::{self, KindInfo};
use crate::object::{meta_str, metadata_mut, resource_version, ObjectKey};
use crate::types::{Outcome, SharedObject, UpdatePart};

/// The largest object the store accepts, as encoded JSON (Kubernetes allows about 1.5 MiB).
pub const MAX_OBJECT_BYTES: usize = 1536 * 1024;

/// The deepest nesting of lists and mappings an object may have (`{}` is one level). Real
/// objects stay under 20. serde_json refuses more than 128 levels when it decodes, and a log
/// entry, a Raft message or a watch event wraps the object in a few levels of its own: an
/// object much deeper than this could be committed and then not be read back.
pub const MAX_OBJECT_DEPTH: usize = 64;

/// Errors a client can get from the store. They cross the network, hence `Serialize`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum StoreError {
    #[error("{key} already exists")]
    AlreadyExists { key: ObjectKey },
    #[error("{key} not found")]
    NotFound { key: ObjectKey },
    #[error("namespace {namespace:?} not found")]
    NamespaceNotFound { namespace: String },
    #[error("conflict on {key}: the object has been modified (resourceVersion {actual}, the request expected {expected}); get it again and retry")]
    Conflict {
        key: ObjectKey,
        expected: u64,
        actual: u64,
    },
    #[error("invalid object: {reason}")]
    Invalid { reason: String },
    #[error("too old resource version {requested} (oldest available is {oldest}); list again and watch from the list's resourceVersion")]
    Expired { requested: u64, oldest: u64 },
    #[error("a node named {name:?} is already a member of the cluster")]
    NodeNameTaken { name: String },
    #[error("no node named {name:?} is a member of the cluster")]
    NodeNotFound { name: String },
    #[error("{what} is forbidden: {reason}")]
    Forbidden { what: String, reason: String },
}

/// Kind of a watch event, spelled as Kubernetes spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventType {
    #[serde(rename = "ADDED")]
    Added,
    #[serde(rename = "MODIFIED")]
    Modified,
    #[serde(rename = "DELETED")]
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change the state machine writes: `object: None` deletes.
#[derive(Debug, Clone, PartialEq)]
pub struct Mutation {
    pub key: ObjectKey,
    pub object: Option<SharedObject>,
    pub event: EventType,
    /// The object as the watch event carries it (for deletes, the last state).
    pub event_object: SharedObject,
}

/// The decision for one object command.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub outcome: Outcome,
    /// The object after the command; shared with the mutation's copies, not copied.
    pub object: Option<SharedObject>,
    pub mutation: Option<Mutation>,
}

fn invalid(reason: impl Into<String>) -> StoreError {
    StoreError::Invalid {
        reason: reason.into(),
    }
}

/// Whether `name` is a DNS subdomain as Kubernetes requires of object names.
pub fn is_dns_subdomain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// Whether `name` is a DNS label (namespaces).
pub fn is_dns_label(name: &str) -> bool {
    name.len() <= 63 && !name.contains('.') && is_dns_subdomain(name)
}

/// Whether `value` nests lists and mappings more than `limit` levels deep (a scalar is none,
/// `{}` and `[]` are one). Iterative: no nesting can exhaust the stack.
pub fn nested_deeper_than(value: &Value, limit: usize) -> bool {
    let mut pending = vec![(value, 1_usize)];
    while let Some((value, depth)) = pending.pop() {
        match value {
            Value::Array(items) => {
                if depth > limit {
                    return true;
                }
                pending.extend(items.iter().map(|item| (item, depth + 1)));
            }
            Value::Object(map) => {
                if depth > limit {
                    return true;
                }
                pending.extend(map.values().map(|item| (item, depth + 1)));
            }
            _ => {}
        }
    }
    false
}

/// Checks an object from a client: known kind and apiVersion, a valid name and namespace,
/// nesting depth, typed fields, size. Fills in the namespace (`default`) of a namespaced kind and clears it for
/// a cluster-scoped one. Returns the kind and the object's key.
pub fn validate(object: &mut Value) -> Result<(&'static KindInfo, ObjectKey), StoreError> {
    if !object.is_object() {
        return Err(invalid(
            "expected a JSON/YAML mapping with apiVersion, kind and metadata",
        ));
    }
    let kind_name = object
        .get("kind")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("missing field \"kind\""))?
        .to_string();
    let kind_name = kind_name.as_str();
    let info = kinds::by_kind(kind_name).ok_or_else(|| {
        invalid(format!(
            "unknown kind {kind_name:?} (known: {})",
            kinds::KINDS
                .iter()
                .map(|k| k.kind)
                .collect::<Vec<_>>()
                .join(", ")
        ))
    })?;
    let api_version = object
        .get("apiVersion")
        .and_then(Value::as_str)
        .ok_or_else(|| invalid(format!("{kind_name}: missing field \"apiVersion\"")))?;
    if api_version != info.api_version {
        return Err(invalid(format!(
            "{kind_name}: apiVersion {api_version:?} is not served; use {:?}",
            info.api_version
        )));
    }
    let name = meta_str(object, "name").unwrap_or_default().to_string();
    if name.is_empty() {
        return Err(invalid(format!("{kind_name}: missing metadata.name")));
    }
    if !is_dns_subdomain(&name) {
        return Err(invalid(format!(
            "{kind_name} {name:?}: metadata.name must be lower-case letters, digits, '-' and '.', at most 253 characters"
        )));
    }
    let namespace = if info.namespaced {
        let namespace = meta_str(object, "namespace").unwrap_or_default();
        let namespace = if namespace.is_empty() {
            "default"
        } else {
            namespace
        }
        .to_string();
        if !is_dns_label(&namespace) {
            return Err(invalid(format!("{kind_name} {name:?}: metadata.namespace {namespace:?} is not a valid namespace name")));
        }
        metadata_mut(object).insert("namespace".into(), Value::String(namespace.clone()));
        namespace
    } else {
        metadata_mut(object).remove("namespace");
        String::new()
    };
    // Before the typed parse, which recurses.
    if nested_deeper_than(object, MAX_OBJECT_DEPTH) {
        return Err(invalid(format!(
            "{kind_name} {name:?} is nested more than {MAX_OBJECT_DEPTH} levels deep"
        )));
    }
    resource_version(object)
        .map_err(|reason| invalid(format!("{kind_name} {name:?}: {reason}")))?;
    info.check_types(object)
        .map_err(|reason| invalid(format!("{kind_name} {name:?}: {reason}")))?;
    let size = encoded_len(object);
    if size > MAX_OBJECT_BYTES {
        return Err(invalid(format!(
            "{kind_name} {name:?} is {size} bytes, more than the limit of {MAX_OBJECT_BYTES} bytes"
        )));
    }
    Ok((info, ObjectKey::new(info.kind, &namespace, &name)))
}

/// The length of `value`'s compact JSON encoding, counted as it is written, not built.
fn encoded_len(value: &Value) -> usize {
    struct Counter(usize);
    impl std::io::Write for Counter {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut counter = Counter(0);
    match serde_json::to_writer(&mut counter, value) {
        Ok(()) => counter.0,
        Err(_) => usize::MAX,
    }
}

/// The top-level fields that are not "what the user asked for": a change elsewhere bumps
/// `metadata.generation`.
const NOT_DESIRED_CONTENT: [&str; 4] = ["metadata", "status", "apiVersion", "kind"];

/// Whether two objects have the same top-level fields, leaving out `skipped` (compared in
/// place: copying both objects to compare them was a large part of applying an update).
fn same_fields_except(a: &Value, b: &Value, skipped: &[&str]) -> bool {
    let empty = Map::new();
    let a = a.as_object().unwrap_or(&empty);
    let b = b.as_object().unwrap_or(&empty);
    let kept = |(name, _): &(&String, &Value)| !skipped.contains(&name.as_str());
    a.iter().filter(kept).eq(b.iter().filter(kept))
}

/// Whether two versions of one object are the same but for `metadata.resourceVersion`.
fn same_but_resource_version(a: &Value, b: &Value) -> bool {
    same_fields_except(a, b, &["metadata"])
        && same_fields_except(
            a.get("metadata").unwrap_or(&Value::Null),
            b.get("metadata").unwrap_or(&Value::Null),
            &["resourceVersion"],
        )
}

fn stamp(object: &mut Value, rv: u64) {
    metadata_mut(object).insert("resourceVersion".into(), Value::String(rv.to_string()));
}

fn generation(object: &Value) -> i64 {
    object
        .get("metadata")
        .and_then(|m| m.get("generation"))
        .and_then(Value::as_i64)
        .unwrap_or(1)
}

fn check_precondition(
    key: &ObjectKey,
    expected: Option<u64>,
    existing: &Value,
) -> Result<(), StoreError> {
    let actual = resource_version(existing).ok().flatten().unwrap_or(0);
    match expected {
        Some(expected) if expected != actual => Err(StoreError::Conflict {
            key: key.clone(),
            expected,
            actual,
        }),
        _ => Ok(()),
    }
}

/// The decision to store `object` (stamped) under `key`: the reply, the stored copy and the
/// watch event all share it.
fn stored(key: &ObjectKey, outcome: Outcome, event: EventType, object: Value) -> Decision {
    let object = SharedObject::from(object);
    Decision {
        outcome,
        object: Some(object.clone()),
        mutation: Some(Mutation {
            key: key.clone(),
            event,
            event_object: object.clone(),
            object: Some(object),
        }),
    }
}

/// Decides a create of `object` (already validated) at log index `rv`.
pub fn decide_create(
    key: &ObjectKey,
    mut object: Value,
    existing: Option<&Value>,
    namespace_exists: bool,
    rv: u64,
) -> Result<Decision, StoreError> {
    if existing.is_some() {
        return Err(StoreError::AlreadyExists { key: key.clone() });
    }
    if !key.namespace.is_empty() && !namespace_exists {
        return Err(StoreError::NamespaceNotFound {
            namespace: key.namespace.clone(),
        });
    }
    let metadata = metadata_mut(&mut object);
    metadata.insert("generation".into(), Value::from(1));
    stamp(&mut object, rv);
    Ok(stored(key, Outcome::Created, EventType::Added, object))
}

/// Decides an update of `part` of `existing` to `object` at log index `rv`. With
/// `check_version`, a `metadata.resourceVersion` in `object` must equal the stored one.
pub fn decide_update(
    key: &ObjectKey,
    object: Value,
    part: UpdatePart,
    existing: Option<&Value>,
    check_version: bool,
    rv: u64,
) -> Result<Decision, StoreError> {
    let info =
        kinds::by_kind(&key.kind).ok_or_else(|| invalid(format!("unknown kind {:?}", key.kind)))?;
    let existing = existing.ok_or_else(|| StoreError::NotFound { key: key.clone() })?;
    if check_version {
        let expected = resource_version(&object).map_err(invalid)?;
        check_precondition(key, expected, existing)?;
    }
    let mut updated = match part {
        UpdatePart::Main => {
            let mut updated = object;
            if info.has_status {
                match existing.get("status") {
                    Some(status) => {
                        updated
                            .as_object_mut()
                            .map(|o| o.insert("status".into(), status.clone()));
                    }
                    None => {
                        updated.as_object_mut().map(|o| o.remove("status"));
                    }
                }
            }
            updated
        }
        UpdatePart::Status => {
            if !info.has_status {
                return Err(invalid(format!("{} has no status subresource", info.kind)));
            }
            let mut updated = existing.clone();
            let status = object.get("status").cloned().unwrap_or(Value::Null);
            updated
                .as_object_mut()
                .map(|o| o.insert("status".into(), status));
            updated
        }
    };
    // Server-set fields come from the stored object, whatever the request said.
    let existing_meta = existing.get("metadata");
    let metadata = metadata_mut(&mut updated);
    for field in ["uid", "creationTimestamp"] {
        match existing_meta.and_then(|meta| meta.get(field)) {
            Some(value) => metadata.insert(field.into(), value.clone()),
            None => metadata.remove(field),
        };
    }
    let mut next_generation = generation(existing);
    if !same_fields_except(&updated, existing, &NOT_DESIRED_CONTENT) {
        next_generation += 1;
    }
    metadata_mut(&mut updated).insert("generation".into(), Value::from(next_generation));

    if same_but_resource_version(&updated, existing) {
        return Ok(Decision {
            outcome: Outcome::Unchanged,
            object: Some(existing.clone().into()),
            mutation: None,
        });
    }
    stamp(&mut updated, rv);
    Ok(stored(
        key,
        Outcome::Configured,
        EventType::Modified,
        updated,
    ))
}

/// Decides the binding of pod `key` to `node` at log index `rv` (Kubernetes' Binding
/// subresource): `spec.nodeName` is set on the stored pod, whose resourceVersion must still be
/// `expected`. A binding names only the pod and the node, so it travels through the log in a
/// few bytes rather than as the whole pod.
pub fn decide_bind(
    key: &ObjectKey,
    expected: u64,
    node: &str,
    existing: Option<&Value>,
    rv: u64,
) -> Result<Decision, StoreError> {
    if key.kind != "Pod" {
        return Err(invalid(format!(
            "only a Pod can be bound to a node, not {key}"
        )));
    }
    let existing = existing.ok_or_else(|| StoreError::NotFound { key: key.clone() })?;
    check_precondition(key, Some(expected), existing)?;
    let assigned = existing
        .pointer("/spec/nodeName")
        .and_then(Value::as_str)
        .unwrap_or("");
    if !assigned.is_empty() {
        return Err(invalid(format!(
            "{key} is already assigned to node {assigned:?}"
        )));
    }
    if !is_dns_subdomain(node) {
        return Err(invalid(format!("{node:?} is not a valid node name")));
    }
    let mut bound = existing.clone();
    match bound.get_mut("spec").and_then(Value::as_object_mut) {
        Some(spec) => {
            spec.insert("nodeName".into(), Value::String(node.to_string()));
        }
        None => return Err(invalid(format!("{key} has no spec"))),
    }
    // The spec changed, as an update setting `spec.nodeName` would bump it.
    let next_generation = generation(existing) + 1;
    metadata_mut(&mut bound).insert("generation".into(), Value::from(next_generation));
    stamp(&mut bound, rv);
    Ok(stored(key, Outcome::Configured, EventType::Modified, bound))
}

/// Decides an apply: a create when absent, else an unconditional update of metadata and spec.
pub fn decide_apply(
    key: &ObjectKey,
    object: Value,
    existing: Option<&Value>,
    namespace_exists: bool,
    rv: u64,
) -> Result<Decision, StoreError> {
    match existing {
        None => decide_create(key, object, None, namespace_exists, rv),
        Some(existing) => decide_update(key, object, UpdatePart::Main, Some(existing), false, rv),
    }
}

/// Decides a delete at log index `rv`.
pub fn decide_delete(
    key: &ObjectKey,
    expected: Option<u64>,
    existing: Option<&Value>,
    rv: u64,
) -> Result<Decision, StoreError> {
    if key.kind == "Namespace" && matches!(key.name.as_str(), "default" | "kube-system") {
        return Err(StoreError::Forbidden {
            what: format!("namespace {:?}", key.name),
            reason: "this namespace may not be deleted".into(),
        });
    }
    let existing = existing.ok_or_else(|| StoreError::NotFound { key: key.clone() })?;
    check_precondition(key, expected, existing)?;
    let mut last = existing.clone();
    stamp(&mut last, rv);
    let last = SharedObject::from(last);
    Ok(Decision {
        outcome: Outcome::Deleted,
        object: Some(last.clone()),
        mutation: Some(Mutation {
            key: key.clone(),
            object: None,
            event: EventType::Deleted,
            event_object: last,
        }),
    })
}

/// The default cluster CIDR node pod subnets are carved from, a /24 per node.
pub const DEFAULT_CLUSTER_CIDR: &str = "10.244.0.0/16";

/// The first two octets of a `/16` cluster CIDR (`10.244.0.0/16` → `10.244`), or `None`
/// when `cidr` is not an IPv4 `/16` of the form `A.B.0.0/16`.
pub fn cluster_cidr_prefix(cidr: &str) -> Option<String> {
    let (address, bits) = cidr.split_once('/')?;
    if bits != "16" {
        return None;
    }
    let octets: Vec<u8> = address
        .split('.')
        .map(|o| o.parse().ok())
        .collect::<Option<_>>()?;
    match octets.as_slice() {
        [a, b, 0, 0] => Some(format!("{a}.{b}")),
        _ => None,
    }
}

/// The first /24 of the cluster CIDR (`prefix` as from `cluster_cidr_prefix`) no node uses.
pub fn pick_pod_cidr<'a>(prefix: &str, used: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let used: std::collections::BTreeSet<&str> = used.into_iter().collect();
    (0..=255u32)
        .map(|third| format!("{prefix}.{third}.0/24"))
        .find(|cidr| !used.contains(cidr.as_str()))
}

/// `spec.podCIDR` of a Node object.
pub fn pod_cidr(node: &Value) -> Option<&str> {
    node.get("spec")?.get("podCIDR")?.as_str()
}

/// Sets `spec.podCIDR` (and `spec.podCIDRs`) of a Node object.
pub fn set_pod_cidr(node: &mut Value, cidr: &str) {
    if let Some(root) = node.as_object_mut() {
        let spec = root
            .entry("spec")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Some(spec) = spec.as_object_mut() {
            spec.insert("podCIDR".into(), Value::String(cidr.to_string()));
            spec.insert(
                "podCIDRs".into(),
                Value::Array(vec![Value::String(cidr.to_string())]),
            );
        }
    }
}

pub mod services;

#[cfg(test)]
mod tests;
