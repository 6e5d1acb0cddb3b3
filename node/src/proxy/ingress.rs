//! Ingress (`networking.k8s.io/v1`) on every node: an HTTP listener (`--ingress-port`, 80)
//! that routes each request by its Host header and path to a Service port, whose ready
//! endpoint the proxy then reaches as it does for any frontend (directly, or through the QUIC
//! tunnel to the pod's node).
//!
//! This module is the router, a pure function of the cluster's Ingresses ([`build`]), asked
//! one question per request ([`Router::route`]). `ingress/head.rs` reads and rewrites request
//! heads (pure); `ingress/listener.rs` is the IO shell: accept, read the head, route, connect,
//! splice, or answer 400/404/503 itself.
//!
//! Which Ingresses: those of class `flotilla` (`spec.ingressClassName`, else the old
//! `kubernetes.io/ingress.class` annotation) and those without a class — this is the
//! cluster's only Ingress controller, and there is no IngressClass kind to mark a default
//! with. Ingresses naming another class are left to whoever serves that class.
//!
//! Matching, as the Ingress API specifies where it does:
//! - Host first. An exact host (compared without the port, case-insensitively, a trailing dot
//!   ignored) beats a wildcard `*.example.com`, which matches exactly one more label
//!   (`a.example.com`, not `example.com` nor `a.b.example.com`); rules without a host take the
//!   requests no host rule took. The rules of every Ingress for the same host are merged.
//!   Only the paths of the chosen host are tried: a request for a known host whose path
//!   matches none of that host's paths is not handed to the host-less rules (as ingress-nginx
//!   and Envoy-based controllers do, and as the API's "matched against the host before the
//!   IngressRuleValue" reads).
//! - Then the path (without the query): `Exact` compares the whole path; `Prefix` (and
//!   `ImplementationSpecific`, treated as `Prefix`) compares element by element, split on `/`,
//!   empty elements and a trailing slash ignored — `/foo` matches `/foo`, `/foo/` and
//!   `/foo/bar`, not `/foobar`. The longest matching path wins; for the same length `Exact`
//!   beats `Prefix`.
//! - Nothing matched: the `spec.defaultBackend` of the first Ingress (by namespace/name) that
//!   has one, else 404.
//! - The same host, path and type in two Ingresses: the first by namespace/name keeps it (the
//!   other is reported in [`Router::ignored`]).
//!
//! A backend is a Service port (`service.port.number` or `service.port.name`) in the
//! Ingress's namespace; `resource` backends are not supported and left out.

mod head;
mod listener;

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{Ingress, IngressBackend};
use serde_json::Value;

pub(crate) use listener::serve;

use super::table::PortRef;

/// The IngressClass name this controller serves.
pub(crate) const CLASS_NAME: &str = "flotilla";
/// The class annotation of Ingresses from before `spec.ingressClassName`.
const CLASS_ANNOTATION: &str = "kubernetes.io/ingress.class";

/// Where a request goes: a Service port in the namespace of the Ingress that named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServiceBackend {
    pub(crate) namespace: String,
    pub(crate) service: String,
    pub(crate) port: PortRef,
    /// `namespace/name` of the Ingress, for logs.
    pub(crate) ingress: String,
}

/// The paths of one host, merged over every Ingress.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Paths {
    /// By the whole path.
    exact: BTreeMap<String, ServiceBackend>,
    /// By the prefix's elements (`/foo/bar/` → `["foo", "bar"]`; `/` → `[]`).
    prefix: BTreeMap<Vec<String>, ServiceBackend>,
}

/// The elements of a path: split on `/`, empty ones left out.
fn elements(path: &str) -> Vec<&str> {
    path.split('/')
        .filter(|element| !element.is_empty())
        .collect()
}

/// The length a matching prefix counts as: its path without the trailing slash.
fn prefix_length(prefix: &[String]) -> usize {
    prefix.iter().map(|element| element.len() + 1).sum()
}

impl Paths {
    /// The backend of the longest path matching `path`; for equal lengths, an `Exact` one.
    fn find(&self, path: &str) -> Option<&ServiceBackend> {
        let exact = self
            .exact
            .get(path)
            .map(|backend| ((path.trim_end_matches('/').len(), 1), backend));
        let requested = elements(path);
        let prefix = self
            .prefix
            .iter()
            .filter(|(prefix, _)| {
                prefix.len() <= requested.len()
                    && prefix.iter().zip(&requested).all(|(a, b)| a == b)
            })
            .map(|(prefix, backend)| ((prefix_length(prefix), 0), backend))
            .max_by_key(|(length, _)| *length);
        [exact, prefix]
            .into_iter()
            .flatten()
            .max_by_key(|(length, _)| *length)
            .map(|(_, backend)| backend)
    }
}

/// Every Ingress rule this node serves, ready to route requests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Router {
    /// By lower-case host.
    exact_hosts: BTreeMap<String, Paths>,
    /// By what follows `*.` (lower case).
    wildcard_hosts: BTreeMap<String, Paths>,
    /// The rules without a host.
    any_host: Paths,
    default_backend: Option<ServiceBackend>,
    /// What was left out of the Ingresses served, and why: for logs.
    pub(crate) ignored: Vec<String>,
}

/// The class an Ingress asks for, if any.
fn class_of(ingress: &Ingress) -> Option<&str> {
    ingress
        .spec
        .as_ref()
        .and_then(|spec| spec.ingress_class_name.as_deref())
        .or_else(|| {
            ingress
                .metadata
                .annotations
                .as_ref()?
                .get(CLASS_ANNOTATION)
                .map(String::as_str)
        })
}

/// Whether this controller serves `ingress`: of class `flotilla`, or of no class.
pub(crate) fn is_served(ingress: &Ingress) -> bool {
    class_of(ingress).is_none_or(|class| class == CLASS_NAME)
}

/// The host a request names as the rules are keyed: lower case, without port or trailing
/// dot; `None` when empty.
pub(crate) fn normalize_host(host: &str) -> Option<String> {
    let host = host.trim();
    let without_port = if host.starts_with('[') {
        // An IPv6 literal, `[::1]:80`.
        host.find(']').map_or(host, |end| &host[..=end])
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        }
    };
    let name = without_port.strip_suffix('.').unwrap_or(without_port);
    (!name.is_empty()).then(|| name.to_ascii_lowercase())
}

/// The Service port a backend names, or why it cannot be used.
fn service_backend(
    backend: &IngressBackend,
    namespace: &str,
    ingress: &str,
) -> Result<ServiceBackend, String> {
    let Some(service) = backend.service.as_ref() else {
        return Err("a resource backend (only Service backends are served)".to_owned());
    };
    let port = service.port.as_ref();
    let port = match (
        port.and_then(|p| p.number),
        port.and_then(|p| p.name.as_deref()),
    ) {
        (Some(number), _) => PortRef::Number(
            u16::try_from(number)
                .ok()
                .filter(|n| *n != 0)
                .ok_or_else(|| format!("Service {} port {number}", service.name))?,
        ),
        (None, Some(name)) if !name.is_empty() => PortRef::Name(name.to_owned()),
        _ => return Err(format!("Service {} without a port", service.name)),
    };
    Ok(ServiceBackend {
        namespace: namespace.to_owned(),
        service: service.name.clone(),
        port,
        ingress: ingress.to_owned(),
    })
}

/// The router of every Ingress this controller serves (stored JSON; objects that do not parse
/// as Ingresses are left out).
pub(crate) fn build(ingresses: &[Value]) -> Router {
    let mut parsed: Vec<(String, String, Ingress)> = ingresses
        .iter()
        .filter_map(|object| serde_json::from_value::<Ingress>(object.clone()).ok())
        .filter(is_served)
        .map(|ingress| {
            (
                ingress
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".to_owned()),
                ingress.metadata.name.clone().unwrap_or_default(),
                ingress,
            )
        })
        .collect();
    parsed.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));

    let mut router = Router::default();
    for (namespace, name, ingress) in &parsed {
        let label = format!("{namespace}/{name}");
        let Some(spec) = ingress.spec.as_ref() else {
            continue;
        };
        if let Some(backend) = spec.default_backend.as_ref() {
            match service_backend(backend, namespace, &label) {
                Ok(backend) => match &router.default_backend {
                    None => router.default_backend = Some(backend),
                    Some(first) => router.ignored.push(format!(
                        "Ingress {label}: default backend (Ingress {} has one)",
                        first.ingress
                    )),
                },
                Err(why) => router
                    .ignored
                    .push(format!("Ingress {label}: default backend: {why}")),
            }
        }
        for rule in spec.rules.as_deref().unwrap_or_default() {
            let host = rule
                .host
                .as_deref()
                .map(str::trim)
                .filter(|h| !h.is_empty());
            let paths = match host {
                None => &mut router.any_host,
                Some(host) => match host.strip_prefix("*.") {
                    Some(suffix) => router
                        .wildcard_hosts
                        .entry(suffix.to_ascii_lowercase())
                        .or_default(),
                    None => router
                        .exact_hosts
                        .entry(host.to_ascii_lowercase())
                        .or_default(),
                },
            };
            let host = host.unwrap_or("*");
            for path in rule.http.iter().flat_map(|http| &http.paths) {
                let text = path.path.as_deref().unwrap_or("/");
                let at = format!("Ingress {label}: host {host} path {text}");
                if !text.starts_with('/') {
                    router
                        .ignored
                        .push(format!("{at}: a path must start with '/'"));
                    continue;
                }
                let backend = match service_backend(&path.backend, namespace, &label) {
                    Ok(backend) => backend,
                    Err(why) => {
                        router.ignored.push(format!("{at}: {why}"));
                        continue;
                    }
                };
                let taken_by = match path.path_type.as_str() {
                    "Exact" => match paths.exact.get(text) {
                        Some(first) => Some(first.ingress.clone()),
                        None => {
                            paths.exact.insert(text.to_owned(), backend);
                            None
                        }
                    },
                    "Prefix" | "ImplementationSpecific" => {
                        let key: Vec<String> =
                            elements(text).into_iter().map(String::from).collect();
                        match paths.prefix.get(&key) {
                            Some(first) => Some(first.ingress.clone()),
                            None => {
                                paths.prefix.insert(key, backend);
                                None
                            }
                        }
                    }
                    other => {
                        router
                            .ignored
                            .push(format!("{at}: unknown pathType {other:?}"));
                        continue;
                    }
                };
                if let Some(first) = taken_by {
                    router
                        .ignored
                        .push(format!("{at}: taken by Ingress {first}"));
                }
            }
        }
    }
    router
}

impl Router {
    /// Where a request for `host` (as [`normalize_host`] gives it; `None` without a Host)
    /// and `path` (without the query) goes; `None`: 404.
    pub(crate) fn route(&self, host: Option<&str>, path: &str) -> Option<&ServiceBackend> {
        let by_host = host.and_then(|host| {
            self.exact_hosts.get(host).or_else(|| {
                let (first, rest) = host.split_once('.')?;
                (!first.is_empty())
                    .then(|| self.wildcard_hosts.get(rest))
                    .flatten()
            })
        });
        by_host
            .unwrap_or(&self.any_host)
            .find(path)
            .or(self.default_backend.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ingress(namespace: &str, name: &str, spec: Value) -> Value {
        json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        })
    }

    fn path(path: &str, path_type: &str, service: &str) -> Value {
        json!({"path": path, "pathType": path_type,
               "backend": {"service": {"name": service, "port": {"number": 80}}}})
    }

    fn rule(host: Option<&str>, paths: Vec<Value>) -> Value {
        let mut rule = json!({"http": {"paths": paths}});
        if let Some(host) = host {
            rule["host"] = json!(host);
        }
        rule
    }

    fn service_of(router: &Router, host: Option<&str>, path: &str) -> Option<String> {
        router
            .route(host, path)
            .map(|backend| format!("{}/{}", backend.namespace, backend.service))
    }

    #[test]
    fn an_exact_host_routes_only_its_own_requests() {
        let router = build(&[ingress(
            "default",
            "web",
            json!({"rules": [rule(Some("a.example"), vec![path("/", "Prefix", "one")])]}),
        )]);
        assert_eq!(
            service_of(&router, Some("a.example"), "/").as_deref(),
            Some("default/one")
        );
        assert_eq!(service_of(&router, Some("b.example"), "/"), None);
        assert_eq!(service_of(&router, None, "/"), None);
    }

    #[test]
    fn hosts_are_matched_without_port_case_or_trailing_dot() {
        let router = build(&[ingress(
            "default",
            "web",
            json!({"rules": [rule(Some("A.Example"), vec![path("/", "Prefix", "one")])]}),
        )]);
        for header in [
            "a.example",
            "A.EXAMPLE:8080",
            "a.example.",
            " a.example:80 ",
        ] {
            let host = normalize_host(header);
            assert_eq!(
                service_of(&router, host.as_deref(), "/").as_deref(),
                Some("default/one"),
                "{header:?}"
            );
        }
        assert_eq!(normalize_host("[::1]:80").as_deref(), Some("[::1]"));
        assert_eq!(normalize_host(":80"), None);
        assert_eq!(normalize_host(""), None);
    }

    #[test]
    fn a_wildcard_host_matches_exactly_one_more_label() {
        let router = build(&[ingress(
            "default",
            "web",
            json!({"rules": [rule(Some("*.example.com"), vec![path("/", "Prefix", "wild")])]}),
        )]);
        assert_eq!(
            service_of(&router, Some("foo.example.com"), "/").as_deref(),
            Some("default/wild")
        );
        for host in ["example.com", "foo.bar.example.com", ".example.com"] {
            assert_eq!(service_of(&router, Some(host), "/"), None, "{host}");
        }
    }

    #[test]
    fn an_exact_host_beats_a_wildcard_and_a_wildcard_beats_no_host() {
        let router = build(&[ingress(
            "default",
            "web",
            json!({"rules": [
                rule(None, vec![path("/", "Prefix", "any")]),
                rule(Some("*.example.com"), vec![path("/", "Prefix", "wild")]),
                rule(Some("foo.example.com"), vec![path("/", "Prefix", "exact")]),
            ]}),
        )]);
        assert_eq!(
            service_of(&router, Some("foo.example.com"), "/x").as_deref(),
            Some("default/exact")
        );
        assert_eq!(
            service_of(&router, Some("bar.example.com"), "/x").as_deref(),
            Some("default/wild")
        );
        assert_eq!(
            service_of(&router, Some("other.test"), "/x").as_deref(),
            Some("default/any")
        );
        assert_eq!(
            service_of(&router, None, "/x").as_deref(),
            Some("default/any")
        );
    }

    #[test]
    fn a_host_whose_paths_do_not_match_is_not_handed_to_the_host_less_rules() {
        let router = build(&[ingress(
            "default",
            "web",
            json!({"rules": [
                rule(None, vec![path("/", "Prefix", "any")]),
                rule(Some("a.example"), vec![path("/api", "Prefix", "api")]),
            ]}),
        )]);
        assert_eq!(
            service_of(&router, Some("a.example"), "/api/v1").as_deref(),
            Some("default/api")
        );
        assert_eq!(service_of(&router, Some("a.example"), "/"), None);
    }

    #[test]
    fn a_prefix_matches_whole_path_elements_with_the_trailing_slash_ignored() {
        let router = build(&[ingress(
            "default",
            "web",
            json!({"rules": [rule(None, vec![
                path("/foo", "Prefix", "foo"),
                path("/bar/", "Prefix", "bar"),
            ])]}),
        )]);
        for request in ["/foo", "/foo/", "/foo/bar", "/foo//bar"] {
            assert_eq!(
                service_of(&router, None, request).as_deref(),
                Some("default/foo"),
                "{request}"
            );
        }
        for request in ["/bar", "/bar/", "/bar/baz"] {
            assert_eq!(
                service_of(&router, None, request).as_deref(),
                Some("default/bar"),
                "{request}"
            );
        }
        for request in ["/foobar", "/fo", "/", "/baz/foo"] {
            assert_eq!(service_of(&router, None, request), None, "{request}");
        }
    }

    #[test]
    fn a_prefix_of_slash_matches_every_path() {
        let router = build(&[ingress(
            "default",
            "web",
            json!({"rules": [rule(None, vec![path("/", "Prefix", "root")])]}),
        )]);
        for request in ["/", "/a", "/a/b/c"] {
            assert_eq!(
                service_of(&router, None, request).as_deref(),
                Some("default/root"),
                "{request}"
            );
        }
    }

    #[test]
    fn an_exact_path_matches_only_itself() {
        let router = build(&[ingress(
            "default",
            "web",
            json!({"rules": [rule(None, vec![path("/foo", "Exact", "foo")])]}),
        )]);
        assert_eq!(
            service_of(&router, None, "/foo").as_deref(),
            Some("default/foo")
        );
        for request in ["/foo/", "/foo/bar", "/fo", "/Foo"] {
            assert_eq!(service_of(&router, None, request), None, "{request}");
        }
    }

    #[test]
    fn implementation_specific_paths_are_prefixes() {
        let router = build(&[ingress(
            "default",
            "web",
            json!({"rules": [rule(None, vec![path("/foo", "ImplementationSpecific", "foo")])]}),
        )]);
        assert_eq!(
            service_of(&router, None, "/foo/bar").as_deref(),
            Some("default/foo")
        );
        assert_eq!(service_of(&router, None, "/foobar"), None);
    }

    #[test]
    fn the_longest_match_wins_and_exact_beats_prefix_of_the_same_length() {
        let router = build(&[ingress(
            "default",
            "web",
            json!({"rules": [rule(None, vec![
                path("/", "Prefix", "root"),
                path("/foo", "Prefix", "foo-prefix"),
                path("/foo", "Exact", "foo-exact"),
                path("/foo/bar", "Prefix", "foo-bar"),
                path("/foo/bar/baz", "Exact", "baz-exact"),
            ])]}),
        )]);
        for (request, expected) in [
            ("/", "root"),
            ("/x", "root"),
            ("/foo", "foo-exact"),
            ("/foo/", "foo-prefix"),
            ("/foo/x", "foo-prefix"),
            ("/foo/bar", "foo-bar"),
            ("/foo/bar/baz", "baz-exact"),
            ("/foo/bar/baz/", "foo-bar"),
        ] {
            assert_eq!(
                service_of(&router, None, request).as_deref(),
                Some(format!("default/{expected}").as_str()),
                "{request}"
            );
        }
    }

    #[test]
    fn the_default_backend_takes_what_no_rule_matches() {
        let router = build(&[
            ingress(
                "default",
                "b",
                json!({"defaultBackend": {"service": {"name": "second", "port": {"number": 80}}}}),
            ),
            ingress(
                "default",
                "a",
                json!({
                    "defaultBackend": {"service": {"name": "first", "port": {"name": "http"}}},
                    "rules": [rule(Some("a.example"), vec![path("/x", "Exact", "x")])],
                }),
            ),
        ]);
        assert_eq!(
            service_of(&router, Some("a.example"), "/x").as_deref(),
            Some("default/x")
        );
        for (host, request) in [(Some("a.example"), "/y"), (Some("other"), "/"), (None, "/")] {
            let backend = router.route(host, request).expect("the default backend");
            assert_eq!(backend.service, "first", "{host:?} {request}");
            assert_eq!(backend.port, PortRef::Name("http".into()));
            assert_eq!(backend.ingress, "default/a");
        }
        assert_eq!(
            router.ignored,
            ["Ingress default/b: default backend (Ingress default/a has one)"]
        );
    }

    #[test]
    fn without_a_match_or_default_backend_nothing_is_routed() {
        let router = build(&[ingress(
            "default",
            "web",
            json!({"rules": [rule(Some("a.example"), vec![path("/x", "Exact", "x")])]}),
        )]);
        assert_eq!(router.route(Some("a.example"), "/y"), None);
        assert_eq!(router.route(Some("b.example"), "/x"), None);
        assert!(build(&[]).route(Some("a.example"), "/").is_none());
        assert!(build(&[]).route(None, "/").is_none());
    }

    #[test]
    fn backends_are_service_ports_in_the_namespace_of_their_ingress() {
        let router = build(&[ingress(
            "shop",
            "web",
            json!({"rules": [rule(None, vec![json!(
                {"path": "/", "pathType": "Prefix",
                 "backend": {"service": {"name": "cart", "port": {"name": "http"}}}}
            )])]}),
        )]);
        assert_eq!(
            router.route(None, "/"),
            Some(&ServiceBackend {
                namespace: "shop".into(),
                service: "cart".into(),
                port: PortRef::Name("http".into()),
                ingress: "shop/web".into(),
            })
        );
    }

    #[test]
    fn ingresses_of_another_class_are_ignored_and_class_less_ones_served() {
        let mut other = ingress(
            "default",
            "other",
            json!({"ingressClassName": "nginx",
                   "rules": [rule(Some("other.example"), vec![path("/", "Prefix", "other")])]}),
        );
        let mut annotated = ingress(
            "default",
            "annotated",
            json!({"rules": [rule(Some("old.example"), vec![path("/", "Prefix", "old")])]}),
        );
        annotated["metadata"]["annotations"] = json!({"kubernetes.io/ingress.class": "nginx"});
        let ours = ingress(
            "default",
            "ours",
            json!({"ingressClassName": "flotilla",
                   "rules": [rule(Some("ours.example"), vec![path("/", "Prefix", "ours")])]}),
        );
        let class_less = ingress(
            "default",
            "plain",
            json!({"rules": [rule(Some("plain.example"), vec![path("/", "Prefix", "plain")])]}),
        );
        let router = build(&[other.clone(), annotated.clone(), ours, class_less]);
        assert_eq!(service_of(&router, Some("other.example"), "/"), None);
        assert_eq!(service_of(&router, Some("old.example"), "/"), None);
        assert_eq!(
            service_of(&router, Some("ours.example"), "/").as_deref(),
            Some("default/ours")
        );
        assert_eq!(
            service_of(&router, Some("plain.example"), "/").as_deref(),
            Some("default/plain")
        );
        other["spec"]["ingressClassName"] = json!("flotilla");
        annotated["metadata"]["annotations"] = json!({"kubernetes.io/ingress.class": "flotilla"});
        let router = build(&[other, annotated]);
        assert!(router.route(Some("other.example"), "/").is_some());
        assert!(router.route(Some("old.example"), "/").is_some());
    }

    #[test]
    fn the_same_host_and_path_in_two_ingresses_goes_to_the_first_by_namespace_and_name() {
        let router = build(&[
            ingress(
                "team-b",
                "web",
                json!({"rules": [rule(Some("a.example"), vec![path("/", "Prefix", "b")])]}),
            ),
            ingress(
                "team-a",
                "web",
                json!({"rules": [rule(Some("a.example"), vec![
                    path("/", "Prefix", "a"),
                    path("/only-a", "Exact", "only-a"),
                ])]}),
            ),
        ]);
        assert_eq!(
            service_of(&router, Some("a.example"), "/").as_deref(),
            Some("team-a/a")
        );
        assert_eq!(
            service_of(&router, Some("a.example"), "/only-a").as_deref(),
            Some("team-a/only-a")
        );
        assert_eq!(
            router.ignored,
            ["Ingress team-b/web: host a.example path /: taken by Ingress team-a/web"]
        );
    }

    #[test]
    fn unusable_paths_and_backends_are_left_out_and_reported() {
        let router = build(&[ingress(
            "default",
            "web",
            json!({"rules": [rule(None, vec![
                path("relative", "Prefix", "bad"),
                path("/odd", "Regex", "bad"),
                json!({"path": "/resource", "pathType": "Prefix",
                       "backend": {"resource": {"kind": "Bucket", "name": "b"}}}),
                json!({"path": "/portless", "pathType": "Prefix",
                       "backend": {"service": {"name": "svc"}}}),
                path("/good", "Prefix", "good"),
            ])]}),
        )]);
        assert_eq!(router.ignored.len(), 4, "{:?}", router.ignored);
        assert_eq!(
            service_of(&router, None, "/good").as_deref(),
            Some("default/good")
        );
        for request in ["/odd", "/resource", "/portless", "/relative"] {
            assert_eq!(service_of(&router, None, request), None, "{request}");
        }
    }
}
