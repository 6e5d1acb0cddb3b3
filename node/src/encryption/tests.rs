use base64::Engine;
use serde_json::{json, Value};

use super::*;

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

fn secret(name: &str, data: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": "prod", "resourceVersion": "7"},
        "type": "Opaque",
        "data": data,
    })
}

fn keys_of(keys: &[&DataKey]) -> DataKeys {
    keys.iter().map(|k| (*k).clone()).collect()
}

#[test]
fn a_root_key_seals_and_opens_and_refuses_another_context_or_key() {
    let key = RootKey::generate();
    let sealed = key.seal(b"hello", b"ctx");
    assert_eq!(sealed.len(), 12 + 5 + 16, "nonce, ciphertext, tag");
    assert_eq!(key.open(&sealed, b"ctx").expect("opens"), b"hello");
    assert!(matches!(
        key.open(&sealed, b"other"),
        Err(EncryptionError::Open)
    ));
    assert!(matches!(
        RootKey::generate().open(&sealed, b"ctx"),
        Err(EncryptionError::Open)
    ));
    assert!(matches!(
        key.open(&sealed[..10], b"ctx"),
        Err(EncryptionError::Malformed(_))
    ));
    assert_ne!(
        key.seal(b"hello", b"ctx"),
        sealed,
        "every seal has a fresh nonce"
    );
}

#[test]
fn a_root_key_is_exactly_32_bytes_and_never_printed() {
    assert!(RootKey::from_bytes(&[1; 31]).is_err());
    assert!(RootKey::from_bytes(&[1; 33]).is_err());
    let key = RootKey::from_bytes(&[7; 32]).expect("32 bytes");
    assert_eq!(key.as_bytes(), &[7; 32]);
    assert_eq!(format!("{key:?}"), "RootKey(<redacted>)");
}

#[test]
fn a_root_key_survives_store_and_load_with_owner_only_permissions() {
    let dir = tempfile::tempdir().expect("temp dir");
    assert!(RootKey::load(dir.path())
        .expect("no file is fine")
        .is_none());
    let key = RootKey::generate();
    key.store(dir.path()).expect("store");
    let loaded = RootKey::load(dir.path()).expect("load").expect("a key");
    assert_eq!(loaded.as_bytes(), key.as_bytes());
    let mode = std::fs::metadata(dir.path().join("keys/root.key"))
        .expect("the key file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    std::fs::write(dir.path().join("keys/root.key"), "not base64!").expect("write");
    assert!(matches!(
        RootKey::load(dir.path()),
        Err(EncryptionError::RootKeyFile { .. })
    ));
}

#[test]
fn a_secret_survives_a_round_trip_and_its_plaintext_is_gone_while_sealed() {
    let key = DataKey::generate();
    let plain = secret("creds", json!({"password": b64("s3cr3t")}));
    let sealed = seal_secret(plain.clone(), &key).expect("seals");
    assert!(sealed.get("data").is_none());
    assert_eq!(sealed_key_id(&sealed), Some(key.id()));
    let text = sealed.to_string();
    assert!(!text.contains(&b64("s3cr3t")) && !text.contains("s3cr3t"));
    assert_eq!(
        sealed["metadata"], plain["metadata"],
        "metadata is untouched"
    );
    assert_eq!(sealed["type"], "Opaque");
    let opened = open_secret(sealed, &keys_of(&[&key])).expect("opens");
    assert_eq!(opened, plain);
}

#[test]
fn string_data_is_folded_into_data_and_wins() {
    let key = DataKey::generate();
    let mut plain = secret("creds", json!({"a": b64("old"), "b": b64("kept")}));
    plain["stringData"] = json!({"a": "new", "c": "plain text"});
    let opened =
        open_secret(seal_secret(plain, &key).expect("seals"), &keys_of(&[&key])).expect("opens");
    assert_eq!(
        opened["data"],
        json!({"a": b64("new"), "b": b64("kept"), "c": b64("plain text")})
    );
    assert!(opened.get("stringData").is_none());
}

#[test]
fn a_secret_sealed_with_another_key_is_refused() {
    let key = DataKey::generate();
    let sealed = seal_secret(secret("creds", json!({"p": b64("x")})), &key).expect("seals");
    assert!(matches!(
        open_secret(sealed.clone(), &DataKeys::default()),
        Err(EncryptionError::UnknownKey { .. })
    ));
    // Another key under the same id.
    let impostor = DataKey {
        id: key.id().to_string(),
        key: AeadKey::generate(),
    };
    assert!(matches!(
        open_secret(sealed, &keys_of(&[&impostor])),
        Err(EncryptionError::Open)
    ));
}

#[test]
fn a_tampered_ciphertext_is_refused() {
    let key = DataKey::generate();
    let mut sealed = seal_secret(secret("creds", json!({"p": b64("x")})), &key).expect("seals");
    let engine = base64::engine::general_purpose::STANDARD;
    let mut bytes = engine
        .decode(sealed["sealedData"]["ciphertext"].as_str().expect("text"))
        .expect("base64");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    sealed["sealedData"]["ciphertext"] = json!(engine.encode(bytes));
    assert!(matches!(
        open_secret(sealed, &keys_of(&[&key])),
        Err(EncryptionError::Open)
    ));
}

#[test]
fn a_ciphertext_swapped_between_two_secrets_is_refused() {
    let key = DataKey::generate();
    let keys = keys_of(&[&key]);
    let first = seal_secret(secret("first", json!({"p": b64("one")})), &key).expect("seals");
    let mut second = seal_secret(secret("second", json!({"p": b64("two")})), &key).expect("seals");
    second["sealedData"] = first["sealedData"].clone();
    assert!(matches!(
        open_secret(second, &keys),
        Err(EncryptionError::Open)
    ));
    let mut other_namespace = first.clone();
    other_namespace["metadata"]["namespace"] = json!("dev");
    assert!(open_secret(other_namespace, &keys).is_err());
    assert!(open_secret(first, &keys).is_ok());
}

#[test]
fn objects_other_than_secrets_are_untouched() {
    let key = DataKey::generate();
    let config_map = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"a": "b"}, "stringData": {"x": "y"}});
    assert_eq!(
        seal_secret(config_map.clone(), &key).expect("ok"),
        config_map
    );
    assert_eq!(
        open_secret(config_map.clone(), &DataKeys::default()).expect("ok"),
        config_map
    );
    let mut folded = config_map.clone();
    fold_string_data(&mut folded);
    assert_eq!(folded, config_map);
    assert!(!needs_reencryption(&config_map, key.id()));
}

#[test]
fn a_secret_that_was_never_sealed_opens_as_it_is() {
    let plain = secret("legacy", json!({"p": b64("x")}));
    assert_eq!(
        open_secret(plain.clone(), &DataKeys::default()).expect("ok"),
        plain
    );
    assert!(needs_reencryption(&plain, "dk-any"));
}

#[test]
fn a_client_cannot_smuggle_its_own_sealed_data_or_a_last_applied_manifest() {
    let key = DataKey::generate();
    let mut plain = secret("creds", json!({"p": b64("x")}));
    plain["sealedData"] = json!({"keyId": "forged", "ciphertext": "AAAA"});
    plain["metadata"]["annotations"] = json!({
        "kubectl.kubernetes.io/last-applied-configuration": "{\"data\":{\"p\":\"eA==\"}}",
        "team": "a",
    });
    let sealed = seal_secret(plain, &key).expect("seals");
    assert_eq!(sealed_key_id(&sealed), Some(key.id()));
    assert_eq!(sealed["metadata"]["annotations"], json!({"team": "a"}));
    let opened = open_secret(sealed, &keys_of(&[&key])).expect("opens");
    assert_eq!(opened["data"], json!({"p": b64("x")}));
}

#[test]
fn an_unchanged_secret_keeps_its_ciphertext_and_a_changed_one_gets_a_new_one() {
    let key = DataKey::generate();
    let keys = keys_of(&[&key]);
    let stored = seal_secret(secret("creds", json!({"p": b64("x")})), &key).expect("seals");
    let mut again = secret("creds", json!({}));
    again["stringData"] = json!({"p": "x"});
    let resealed = seal_secret_reusing(again, &key, Some(&stored), &keys).expect("seals");
    assert_eq!(resealed["sealedData"], stored["sealedData"]);
    let changed = seal_secret_reusing(
        secret("creds", json!({"p": b64("y")})),
        &key,
        Some(&stored),
        &keys,
    )
    .expect("seals");
    assert_ne!(changed["sealedData"], stored["sealedData"]);
    assert_eq!(
        open_secret(changed, &keys).expect("opens")["data"],
        json!({"p": b64("y")})
    );
    let newer = DataKey::generate();
    let under_new_key = seal_secret_reusing(
        secret("creds", json!({"p": b64("x")})),
        &newer,
        Some(&stored),
        &keys_of(&[&key, &newer]),
    )
    .expect("seals");
    assert_eq!(sealed_key_id(&under_new_key), Some(newer.id()));
}

#[test]
fn a_rotation_reseals_with_the_new_key_and_keeps_the_data_and_version() {
    let old = DataKey::generate();
    let new = DataKey::generate();
    let stored = seal_secret(secret("creds", json!({"p": b64("x")})), &old).expect("seals");
    assert!(needs_reencryption(&stored, new.id()));
    assert!(!needs_reencryption(&stored, old.id()));
    let resealed = reseal_secret(stored.clone(), &keys_of(&[&old]), &new).expect("reseals");
    assert_eq!(sealed_key_id(&resealed), Some(new.id()));
    assert_eq!(resealed["metadata"]["resourceVersion"], "7");
    assert!(!needs_reencryption(&resealed, new.id()));
    assert_eq!(
        open_secret(resealed, &keys_of(&[&new])).expect("opens")["data"],
        json!({"p": b64("x")})
    );
    assert!(reseal_secret(stored, &DataKeys::default(), &new).is_err());
}

#[test]
fn data_keys_round_trip_through_the_keys_config_map_and_need_the_root_key() {
    let root = RootKey::generate();
    let first = DataKey::generate();
    let second = DataKey::generate();
    let set = KeySet::new(&first, &root).with_current(&second, &root);
    assert_eq!(set.current, second.id());
    let config_map = set.to_config_map();
    assert_eq!(config_map["metadata"]["name"], KEYS_CONFIG_MAP);
    let read = KeySet::from_config_map(&config_map).expect("parses");
    assert_eq!(read, set);
    let keys = read.unwrap_all(&root).expect("unwraps");
    assert_eq!(keys.len(), 2);
    let sealed = seal_secret(secret("s", json!({"p": b64("x")})), &first).expect("seals");
    assert!(open_secret(sealed, &keys.into_iter().collect()).is_ok());
    assert!(matches!(
        read.unwrap_all(&RootKey::generate()),
        Err(EncryptionError::WrongRootKey { .. })
    ));
    let only = read.clone().only_current();
    assert_eq!(only.wrapped.len(), 1);
    assert!(only.wrapped.contains_key(second.id()));
    // A wrapped key cannot be passed off under another id.
    let mut swapped = read.clone();
    let first_wrapped = swapped.wrapped[first.id()].clone();
    swapped
        .wrapped
        .insert(second.id().to_string(), first_wrapped);
    assert!(swapped.unwrap_all(&root).is_err());
}

#[test]
fn a_malformed_keys_config_map_is_refused() {
    for data in [
        json!(null),
        json!({"dk-1": "AAAA"}),
        json!({"current": "dk-2", "dk-1": "AAAA"}),
        json!({"current": "dk-1", "dk-1": "not base64!"}),
    ] {
        let config_map = json!({"kind": "ConfigMap", "data": data});
        assert!(
            matches!(
                KeySet::from_config_map(&config_map),
                Err(EncryptionError::KeysConfigMap(_))
            ),
            "{config_map}"
        );
    }
    assert!(is_keys_config_map(
        "ConfigMap",
        "kube-system",
        "flotilla-encryption-keys"
    ));
    assert!(!is_keys_config_map(
        "ConfigMap",
        "default",
        "flotilla-encryption-keys"
    ));
}
