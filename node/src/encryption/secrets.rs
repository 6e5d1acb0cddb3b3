//! Secrets sealed and opened (pure). A sealed Secret has no `data` and no `stringData`; its
//! `sealedData` holds the id of the data key and the ciphertext of the JSON of its `data` map,
//! authenticated with `<namespace>/<name>` so a ciphertext cannot be moved to another Secret.
//! Other objects pass through untouched.

use base64::Engine;
use serde_json::{json, Map, Value};

use super::{DataKey, DataKeys, EncryptionError};

/// The top-level field of a sealed Secret.
pub const SEALED_DATA_FIELD: &str = "sealedData";
/// An annotation that carries a whole applied manifest (kubectl's): never kept on a Secret.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

fn is_secret(object: &Value) -> bool {
    object.get("kind").and_then(Value::as_str) == Some("Secret")
}

fn meta<'a>(object: &'a Value, field: &str) -> &'a str {
    object
        .get("metadata")
        .and_then(|m| m.get(field))
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// What a Secret's ciphertext is bound to.
fn context_of(object: &Value) -> Vec<u8> {
    let namespace = match meta(object, "namespace") {
        "" => "default",
        namespace => namespace,
    };
    format!("{namespace}/{}", meta(object, "name")).into_bytes()
}

fn b64() -> &'static base64::engine::GeneralPurpose {
    &base64::engine::general_purpose::STANDARD
}

/// Folds `stringData` into `data` as Kubernetes does: each value base64-encoded, a key of
/// `stringData` winning over the same key of `data`. Non-Secrets are untouched.
pub fn fold_string_data(object: &mut Value) {
    if !is_secret(object) {
        return;
    }
    let Some(root) = object.as_object_mut() else {
        return;
    };
    let Some(string_data) = root.remove("stringData") else {
        return;
    };
    let mut data = match root.remove("data") {
        Some(Value::Object(data)) => data,
        _ => Map::new(),
    };
    for (key, value) in string_data.as_object().into_iter().flatten() {
        let text = value.as_str().unwrap_or_default();
        data.insert(key.clone(), Value::String(b64().encode(text)));
    }
    root.insert("data".into(), Value::Object(data));
}

/// The data key id a sealed Secret names.
pub fn sealed_key_id(object: &Value) -> Option<&str> {
    object.get(SEALED_DATA_FIELD)?.get("keyId")?.as_str()
}

/// Seals a Secret's `data` (after folding `stringData` in) with `key`. A `sealedData` sent by
/// a client is replaced, and kubectl's last-applied annotation (the plaintext manifest) is
/// dropped. Non-Secrets are returned as they are.
pub fn seal_secret(mut object: Value, key: &DataKey) -> Result<Value, EncryptionError> {
    if !is_secret(&object) {
        return Ok(object);
    }
    fold_string_data(&mut object);
    let context = context_of(&object);
    let Some(root) = object.as_object_mut() else {
        return Ok(object);
    };
    root.remove(SEALED_DATA_FIELD);
    let data = match root.remove("data") {
        Some(Value::Object(data)) => data,
        Some(Value::Null) | None => Map::new(),
        Some(_) => return Err(EncryptionError::Malformed("Secret data is not a map")),
    };
    let plaintext =
        serde_json::to_vec(&data).map_err(|_| EncryptionError::Malformed("Secret data"))?;
    let ciphertext = key.seal(&plaintext, &context);
    root.insert(
        SEALED_DATA_FIELD.into(),
        json!({"keyId": key.id(), "ciphertext": b64().encode(ciphertext)}),
    );
    if let Some(annotations) = root
        .get_mut("metadata")
        .and_then(|m| m.get_mut("annotations"))
        .and_then(Value::as_object_mut)
    {
        annotations.remove(LAST_APPLIED);
    }
    Ok(object)
}

/// Opens a sealed Secret: `sealedData` becomes `data` again. Non-Secrets and Secrets that
/// were never sealed are returned as they are.
pub fn open_secret(mut object: Value, keys: &DataKeys) -> Result<Value, EncryptionError> {
    if !is_secret(&object) || object.get(SEALED_DATA_FIELD).is_none() {
        return Ok(object);
    }
    let context = context_of(&object);
    let Some(root) = object.as_object_mut() else {
        return Ok(object);
    };
    let sealed = root.remove(SEALED_DATA_FIELD).unwrap_or_default();
    let id = sealed
        .get("keyId")
        .and_then(Value::as_str)
        .ok_or(EncryptionError::Malformed("sealedData has no keyId"))?;
    let key = keys
        .get(id)
        .ok_or_else(|| EncryptionError::UnknownKey { id: id.to_string() })?;
    let ciphertext = sealed
        .get("ciphertext")
        .and_then(Value::as_str)
        .and_then(|text| b64().decode(text).ok())
        .ok_or(EncryptionError::Malformed(
            "sealedData has no base64 ciphertext",
        ))?;
    let plaintext = key.open(&ciphertext, &context)?;
    let data: Map<String, Value> = serde_json::from_slice(&plaintext)
        .map_err(|_| EncryptionError::Malformed("sealed Secret data is not a JSON map"))?;
    root.remove("data");
    if !data.is_empty() {
        root.insert("data".into(), Value::Object(data));
    }
    Ok(object)
}

fn data_of(object: &Value) -> Map<String, Value> {
    object
        .get("data")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default()
}

/// Seals `object` as [`seal_secret`], except that when `existing` (the stored version of the
/// same Secret) holds the same data sealed with `key`, its ciphertext is kept: sealing uses a
/// fresh nonce each time, and an apply that changes nothing must stay "unchanged".
pub fn seal_secret_reusing(
    mut object: Value,
    key: &DataKey,
    existing: Option<&Value>,
    keys: &DataKeys,
) -> Result<Value, EncryptionError> {
    if !is_secret(&object) {
        return Ok(object);
    }
    fold_string_data(&mut object);
    let reusable = existing
        .filter(|existing| {
            is_secret(existing)
                && sealed_key_id(existing) == Some(key.id())
                && context_of(existing) == context_of(&object)
        })
        .and_then(|existing| {
            let opened = open_secret(existing.clone(), keys).ok()?;
            (data_of(&opened) == data_of(&object)).then(|| existing.get(SEALED_DATA_FIELD))?
        })
        .cloned();
    let mut sealed = seal_secret(object, key)?;
    if let (Some(previous), Some(root)) = (reusable, sealed.as_object_mut()) {
        root.insert(SEALED_DATA_FIELD.into(), previous);
    }
    Ok(sealed)
}

/// Whether a stored Secret is not sealed with the key `current` (so rotation must re-seal it).
pub fn needs_reencryption(object: &Value, current: &str) -> bool {
    is_secret(object) && sealed_key_id(object) != Some(current)
}

/// A stored Secret opened with `keys` and sealed again with `key`; its metadata (with its
/// resourceVersion, the precondition of the rewrite) is kept.
pub fn reseal_secret(
    object: Value,
    keys: &DataKeys,
    key: &DataKey,
) -> Result<Value, EncryptionError> {
    seal_secret(open_secret(object, keys)?, key)
}
