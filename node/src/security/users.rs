//! Users: a name, a role bound cluster-wide or to one namespace, and the fingerprint of the one
//! certificate that speaks for them. Kept as ConfigMaps `kube-system/flotilla-user-<name>`;
//! issuing a user again replaces the fingerprint (the old certificate stops working), revoking
//! deletes the record.

use std::fmt;
use std::str::FromStr;

use serde_json::{json, Value};

use super::{RECORDS_NAMESPACE, RESERVED_PREFIX};

pub const USER_LABEL: &str = "flotilla.io/user";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Everything.
    Admin,
    /// Read everything; write workloads, configuration and services.
    Edit,
    /// Read everything but Secrets.
    View,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Admin => "admin",
            Role::Edit => "edit",
            Role::View => "view",
        })
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(text: &str) -> Result<Role, String> {
        match text {
            "admin" => Ok(Role::Admin),
            "edit" => Ok(Role::Edit),
            "view" => Ok(Role::View),
            other => Err(format!("unknown role {other:?} (admin, edit, view)")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRecord {
    pub name: String,
    pub role: Role,
    /// `None`: the role holds in every namespace and for cluster-scoped kinds.
    pub namespace: Option<String>,
    /// The hex SHA-256 of the user's current certificate.
    pub certificate: String,
}

pub fn record_name(user: &str) -> String {
    format!("{RESERVED_PREFIX}user-{user}")
}

/// Whether `name` can name a user: lower-case letters, digits, '-' and '.', 1 to 63 characters,
/// starting and ending with a letter or digit.
pub fn check_user_name(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .last()
            .is_some_and(|b| b.is_ascii_alphanumeric());
    if valid {
        Ok(())
    } else {
        Err(format!(
            "user name {name:?} must be 1 to 63 lower-case letters, digits, '-' or '.'"
        ))
    }
}

impl UserRecord {
    pub fn to_object(&self) -> Value {
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": record_name(&self.name),
                "namespace": RECORDS_NAMESPACE,
                "labels": {USER_LABEL: self.name},
            },
            "data": {
                "role": self.role.to_string(),
                "namespace": self.namespace.clone().unwrap_or_default(),
                "certificateSha256": self.certificate,
            }
        })
    }

    pub fn from_object(object: &Value) -> Option<UserRecord> {
        let name = object.pointer(&format!(
            "/metadata/labels/{}",
            USER_LABEL.replace('/', "~1")
        ))?;
        let data = object.get("data")?;
        let field = |key: &str| data.get(key).and_then(Value::as_str);
        Some(UserRecord {
            name: name.as_str()?.to_string(),
            role: field("role")?.parse().ok()?,
            namespace: field("namespace")
                .filter(|n| !n.is_empty())
                .map(str::to_string),
            certificate: field("certificateSha256")?.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_record_round_trips_through_its_config_map() {
        let record = UserRecord {
            name: "alice".into(),
            role: Role::Edit,
            namespace: Some("team-a".into()),
            certificate: "ab".repeat(32),
        };
        let object = record.to_object();
        assert_eq!(object["metadata"]["name"], "flotilla-user-alice");
        assert_eq!(UserRecord::from_object(&object), Some(record));
    }

    #[test]
    fn user_names_follow_kubernetes_names() {
        assert!(check_user_name("alice").is_ok());
        assert!(check_user_name("ci.bot-1").is_ok());
        for bad in ["", "Alice", "-a", "a-", "system:admin", &"a".repeat(64)] {
            assert!(check_user_name(bad).is_err(), "{bad:?}");
        }
    }
}
