//! Reading and writing the metadata of JSON objects, and the key an object is stored under.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The identity of a stored object: its kind, namespace (empty for cluster-scoped kinds) and name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectKey {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(kind: &str, namespace: &str, name: &str) -> ObjectKey {
        ObjectKey {
            kind: kind.to_string(),
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    /// The key of `object`, from its `kind`, `metadata.namespace` and `metadata.name`.
    pub fn of(object: &Value) -> ObjectKey {
        ObjectKey::new(
            object
                .get("kind")
                .and_then(Value::as_str)
                .unwrap_or_default(),
            meta_str(object, "namespace").unwrap_or_default(),
            meta_str(object, "name").unwrap_or_default(),
        )
    }

    /// The RocksDB key: `kind/namespace/name`. Kinds, namespaces and names never contain `/`
    /// (validated before anything is proposed), so the encoding is unambiguous and objects of
    /// one kind, and of one namespace within it, are contiguous.
    pub fn storage_key(&self) -> String {
        format!("{}/{}/{}", self.kind, self.namespace, self.name)
    }

    /// The storage key prefix of every object of `kind` in `namespace` (all namespaces if `None`).
    pub fn storage_prefix(kind: &str, namespace: Option<&str>) -> String {
        match namespace {
            Some(namespace) => format!("{kind}/{namespace}/"),
            None => format!("{kind}/"),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{}/{}", self.kind, self.name)
        } else {
            write!(
                f,
                "{}/{} in namespace {}",
                self.kind, self.name, self.namespace
            )
        }
    }
}

/// `metadata.<field>` as a string, if present.
pub fn meta_str<'a>(object: &'a Value, field: &str) -> Option<&'a str> {
    object.get("metadata")?.get(field)?.as_str()
}

/// `metadata` as a mutable map, created if absent or not a map.
pub fn metadata_mut(object: &mut Value) -> &mut Map<String, Value> {
    if !object.is_object() {
        *object = Value::Object(Map::new());
    }
    let Value::Object(root) = object else {
        unreachable!("object was just made a map")
    };
    let metadata = root
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !metadata.is_object() {
        *metadata = Value::Object(Map::new());
    }
    match metadata {
        Value::Object(map) => map,
        _ => unreachable!("metadata was just made a map"),
    }
}

/// The object's labels as pairs; absent or malformed labels read as none.
pub fn labels(object: &Value) -> impl Iterator<Item = (&str, &str)> {
    object
        .get("metadata")
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_object)
        .into_iter()
        .flat_map(|map| map.iter())
        .filter_map(|(k, v)| v.as_str().map(|v| (k.as_str(), v)))
}

/// The object's `metadata.resourceVersion` as a number; `Ok(None)` when absent or empty.
pub fn resource_version(object: &Value) -> Result<Option<u64>, String> {
    match object
        .get("metadata")
        .and_then(|m| m.get("resourceVersion"))
    {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => s.parse().map(Some).map_err(|_| {
            format!("metadata.resourceVersion {s:?} is not a resource version this cluster issued")
        }),
        Some(other) => Err(format!(
            "metadata.resourceVersion must be a string, got {other}"
        )),
    }
}
