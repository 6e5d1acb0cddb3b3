//! Authorization (pure): a caller, a verb, a kind and a namespace → allowed or a denial that
//! names all four. Roles as Kubernetes' default ClusterRoles: `admin` everything, `edit` reads
//! everything and writes workloads, configuration and services, `view` reads everything but
//! Secrets. A role bound to a namespace holds only there (no cluster-scoped kinds, no lists
//! across namespaces). Nodes may do anything. Nobody writes the records Flotilla keeps for
//! itself (`kube-system/flotilla-*`) through the API.

use std::fmt;

use super::users::{Role, UserRecord};
use super::{RECORDS_NAMESPACE, RESERVED_PREFIX};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Get,
    List,
    Watch,
    Create,
    Update,
    Delete,
}

impl Verb {
    pub fn is_write(self) -> bool {
        matches!(self, Verb::Create | Verb::Update | Verb::Delete)
    }
}

impl fmt::Display for Verb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Watch => "watch",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Delete => "delete",
        })
    }
}

/// Who is calling, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Node(String),
    User(UserRecord),
}

impl Caller {
    pub fn name(&self) -> String {
        match self {
            Caller::Node(name) => format!("system:node:{name}"),
            Caller::User(user) => user.name.clone(),
        }
    }

    pub fn is_cluster_admin(&self) -> bool {
        match self {
            Caller::Node(_) => true,
            Caller::User(user) => user.role == Role::Admin && user.namespace.is_none(),
        }
    }
}

/// What a call wants to do. `namespace` is empty for a cluster-scoped kind or a request
/// across all namespaces (`namespaced` tells which).
#[derive(Debug, Clone, Copy)]
pub struct Action<'a> {
    pub verb: Verb,
    /// The plural resource name, as Kubernetes' (`pods`, `configmaps`).
    pub resource: &'a str,
    pub namespaced: bool,
    pub namespace: &'a str,
    /// Empty for lists, watches and creates of unnamed objects.
    pub name: &'a str,
}

/// The resources the `edit` role writes (namespaced only).
const EDIT_WRITES: &[&str] = &[
    "pods",
    "pods/exec",
    "deployments",
    "replicasets",
    "statefulsets",
    "daemonsets",
    "jobs",
    "cronjobs",
    "services",
    "endpoints",
    "configmaps",
    "secrets",
    "ingresses",
    "persistentvolumeclaims",
    "events",
];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Denied(pub String);

fn scope(action: &Action<'_>) -> String {
    match (action.namespaced, action.namespace.is_empty()) {
        (true, false) => format!("in namespace {:?}", action.namespace),
        (true, true) => "in all namespaces".into(),
        (false, _) => "(cluster-scoped)".into(),
    }
}

fn deny(caller: &Caller, action: &Action<'_>, why: &str) -> Denied {
    let who = match caller {
        Caller::Node(name) => format!("node {name:?}"),
        Caller::User(user) => match &user.namespace {
            Some(namespace) => format!(
                "user {:?} (role {} in namespace {namespace:?})",
                user.name, user.role
            ),
            None => format!("user {:?} (role {})", user.name, user.role),
        },
    };
    Denied(format!(
        "forbidden: {who} cannot {} {} {}{why}",
        action.verb,
        action.resource,
        scope(action)
    ))
}

pub fn authorize(caller: &Caller, action: &Action<'_>) -> Result<(), Denied> {
    let user = match caller {
        Caller::Node(_) => return Ok(()),
        Caller::User(user) => user,
    };
    if action.verb.is_write()
        && action.namespace == RECORDS_NAMESPACE
        && action.name.starts_with(RESERVED_PREFIX)
        && matches!(action.resource, "configmaps" | "secrets")
    {
        return Err(deny(
            caller,
            action,
            &format!(
                ": {}/{} is kept by Flotilla itself (use `flotilla auth` and `flotilla cluster`)",
                action.namespace, action.name
            ),
        ));
    }
    if let Some(bound) = &user.namespace {
        if !action.namespaced || action.namespace != bound {
            return Err(deny(caller, action, ""));
        }
    }
    let allowed = match user.role {
        Role::Admin => true,
        Role::Edit => {
            !action.verb.is_write() || (action.namespaced && EDIT_WRITES.contains(&action.resource))
        }
        Role::View => !action.verb.is_write() && action.resource != "secrets",
    };
    if allowed {
        Ok(())
    } else {
        Err(deny(caller, action, ""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(role: Role, namespace: Option<&str>) -> Caller {
        Caller::User(UserRecord {
            name: "u".into(),
            role,
            namespace: namespace.map(str::to_string),
            certificate: String::new(),
        })
    }

    fn action<'a>(verb: Verb, resource: &'a str, namespace: &'a str) -> Action<'a> {
        Action {
            verb,
            resource,
            namespaced: resource != "nodes" && resource != "namespaces",
            namespace,
            name: "x",
        }
    }

    #[test]
    fn a_viewer_reads_but_never_writes_and_never_reads_secrets() {
        let viewer = user(Role::View, None);
        for verb in [Verb::Get, Verb::List, Verb::Watch] {
            assert!(authorize(&viewer, &action(verb, "pods", "default")).is_ok());
            assert!(authorize(&viewer, &action(verb, "nodes", "")).is_ok());
        }
        for verb in [Verb::Create, Verb::Update, Verb::Delete] {
            let denied = authorize(&viewer, &action(verb, "configmaps", "default"))
                .expect_err("a viewer cannot write");
            assert!(denied.0.contains(&format!(
                "cannot {verb} configmaps in namespace \"default\""
            )));
        }
        assert!(authorize(&viewer, &action(Verb::Get, "secrets", "default")).is_err());
    }

    #[test]
    fn an_editor_of_one_namespace_cannot_touch_another() {
        let editor = user(Role::Edit, Some("a"));
        assert!(authorize(&editor, &action(Verb::Create, "deployments", "a")).is_ok());
        assert!(authorize(&editor, &action(Verb::Get, "secrets", "a")).is_ok());
        let denied = authorize(&editor, &action(Verb::Create, "deployments", "b"))
            .expect_err("namespace b is not editor's");
        assert!(
            denied.0.contains("role edit in namespace \"a\""),
            "{}",
            denied.0
        );
        assert!(authorize(&editor, &action(Verb::Get, "pods", "b")).is_err());
        assert!(authorize(&editor, &action(Verb::List, "pods", "")).is_err());
        assert!(authorize(&editor, &action(Verb::Get, "nodes", "")).is_err());
    }

    #[test]
    fn an_editor_cannot_write_nodes_or_namespaces_but_an_admin_can() {
        let editor = user(Role::Edit, None);
        assert!(authorize(&editor, &action(Verb::Update, "nodes", "")).is_err());
        assert!(authorize(&editor, &action(Verb::Create, "namespaces", "")).is_err());
        let admin = user(Role::Admin, None);
        assert!(authorize(&admin, &action(Verb::Update, "nodes", "")).is_ok());
        assert!(authorize(
            &Caller::Node("n1".into()),
            &action(Verb::Delete, "pods", "a")
        )
        .is_ok());
    }

    #[test]
    fn nobody_writes_flotillas_own_records_through_the_api() {
        let admin = user(Role::Admin, None);
        let write = Action {
            verb: Verb::Delete,
            resource: "configmaps",
            namespaced: true,
            namespace: "kube-system",
            name: "flotilla-ca",
        };
        assert!(authorize(&admin, &write).is_err());
        let read = Action {
            verb: Verb::Get,
            ..write
        };
        assert!(authorize(&admin, &read).is_ok());
    }
}
