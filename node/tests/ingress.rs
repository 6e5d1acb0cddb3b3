//! Ingress on a `flotilla local` cluster of two node containers: every node's Ingress
//! listener (port 80 in the node container) routes by host and path to the pod of the right
//! Deployment, whichever node the pod runs on (the other one is reached through the QUIC
//! tunnel); an unknown host or path gets 404 and a Service without endpoints 503; a default
//! backend added later takes what no rule matches; an Ingress of another class is left alone.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::Value;

mod local_cluster;

use local_cluster::{echo_deployment, wait_for, Cluster};

const INGRESS_PORT: u16 = 80;

/// An HTTP/1.1 GET of `path` with `host` as the Host header: the status code and body.
fn get(ip: IpAddr, host: &str, path: &str) -> std::io::Result<(u16, String)> {
    let address = SocketAddr::new(ip, INGRESS_PORT);
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut reply = Vec::new();
    stream.take(1024 * 1024).read_to_end(&mut reply)?;
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let invalid = || std::io::Error::new(std::io::ErrorKind::InvalidData, reply.clone());
    let (head, body) = reply.split_once("\r\n\r\n").ok_or_else(invalid)?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(invalid)?;
    Ok((code, body.to_owned()))
}

/// Waits (bounded) until `host` + `path` on the node at `ip` answers `code` with a body
/// starting with `body_prefix`; panics with the last answer otherwise.
fn expect(ip: IpAddr, host: &str, path: &str, code: u16, body_prefix: &str) {
    let mut last = String::new();
    let matched = wait_for(Duration::from_secs(30), || match get(ip, host, path) {
        Ok((got, body)) if got == code && body.starts_with(body_prefix) => Some(()),
        Ok((got, body)) => {
            last = format!("{got} {body:?}");
            None
        }
        Err(error) => {
            last = error.to_string();
            None
        }
    });
    assert!(
        matched.is_some(),
        "{host}{path} on {ip}: wanted {code} {body_prefix:?}..., last got {last}"
    );
}

/// Applied together with the echo Deployments `one` (node 1) and `two` (node 2).
const WORKLOADS: &str = "\
apiVersion: v1
kind: Service
metadata: {name: one}
spec:
  selector: {app: one}
  ports: [{name: web, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: two}
spec:
  selector: {app: two}
  ports: [{port: 8080, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: nobody}
spec:
  selector: {app: nobody}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: web}
spec:
  rules:
  - host: a.example
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: one, port: {name: web}}}}
  - host: b.example
    http:
      paths:
      - {path: /x, pathType: Prefix, backend: {service: {name: two, port: {number: 8080}}}}
      - {path: /y, pathType: Exact, backend: {service: {name: one, port: {number: 80}}}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: more}
spec:
  ingressClassName: flotilla
  rules:
  - host: '*.wild.example'
    http:
      paths:
      - {path: /, pathType: ImplementationSpecific, backend: {service: {name: two, port: {number: 8080}}}}
  - host: nobody.example
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: nobody, port: {number: 80}}}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: foreign}
spec:
  ingressClassName: nginx
  rules:
  - host: c.example
    http:
      paths:
      - {path: /, pathType: Prefix, backend: {service: {name: one, port: {number: 80}}}}
";

const FALLBACK: &str = "\
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: fallback}
spec:
  defaultBackend: {service: {name: two, port: {number: 8080}}}
";

#[test]
fn every_nodes_ingress_routes_by_host_and_path_to_the_right_pod_and_answers_404_and_503() {
    let cluster = Cluster::up(&format!("ig{}", std::process::id()), 2);
    cluster.apply(&format!(
        "{}---\n{}---\n{WORKLOADS}",
        echo_deployment("one", "NODE1"),
        echo_deployment("two", "NODE2")
    ));

    // Ingresses are stored, got and listed like any kind.
    let web = cluster
        .json(&["get", "ingress", "web"])
        .expect("get ingress web");
    assert_eq!(
        web.pointer("/spec/rules/1/http/paths/1/pathType"),
        Some(&Value::from("Exact")),
        "{web}"
    );
    let listed = cluster
        .json(&["get", "ingresses"])
        .expect("list the ingresses");
    let mut names: Vec<&str> = listed["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|item| item.pointer("/metadata/name").and_then(Value::as_str))
        .collect();
    names.sort();
    assert_eq!(names, ["foreign", "more", "web"], "{listed}");

    // Both pods are endpoints, each on its own node.
    for (service, node) in [("one", cluster.node(1)), ("two", cluster.node(2))] {
        wait_for(Duration::from_secs(90), || {
            let endpoints = cluster.json(&["get", "endpoints", service])?;
            let address = endpoints.pointer("/subsets/0/addresses/0")?;
            (address.get("nodeName")?.as_str()? == node).then_some(())
        })
        .unwrap_or_else(|| panic!("the {service} pod is an endpoint on {node} within 90 s"));
    }

    for (node, _, address) in &cluster.nodes {
        let ip = address.ip();
        eprintln!("asking {node}'s Ingress listener at {ip}:{INGRESS_PORT}");
        expect(ip, "a.example", "/", 200, "one-");
        expect(ip, "A.Example:80", "/anything/at/all", 200, "one-");
        expect(ip, "b.example", "/x", 200, "two-");
        expect(ip, "b.example", "/x/deeper", 200, "two-");
        expect(ip, "b.example", "/y", 200, "one-");
        expect(ip, "any.wild.example", "/", 200, "two-");
        // Unknown paths and hosts, an Exact path with more, a prefix that is no element, a
        // wildcard two labels deep, and the host of an Ingress of another class.
        for (host, path) in [
            ("b.example", "/"),
            ("b.example", "/y/"),
            ("b.example", "/xy"),
            ("unknown.example", "/"),
            ("a.b.wild.example", "/"),
            ("c.example", "/"),
        ] {
            expect(ip, host, path, 404, "");
        }
        expect(ip, "nobody.example", "/", 503, "");
    }

    // Node 1's listener reached the pod of `two` on node 2 through the tunnel, and counted
    // (the stats file is written every second).
    let mut stats = Value::Null;
    let counted = wait_for(Duration::from_secs(10), || {
        stats = cluster.proxy_stats(1);
        let at_least = |pointer: &str, count: u64| {
            stats
                .pointer(pointer)
                .and_then(Value::as_u64)
                .is_some_and(|n| n >= count)
        };
        (at_least(&format!("/streamsOpened/{}", cluster.node(2)), 1)
            && at_least("/ingressRequests", 13)
            && at_least("/ingress404", 6)
            && at_least("/ingress503", 1))
        .then_some(())
    });
    assert!(
        counted.is_some(),
        "n1's proxy stats lack the tunnel stream or the Ingress counts: {stats}"
    );
    assert_eq!(
        stats["ingressAddress"],
        Value::from(format!("0.0.0.0:{INGRESS_PORT}")),
        "{stats}"
    );

    // A default backend takes what no rule matches, on every node; other rules still win.
    cluster.apply(FALLBACK);
    for (_, _, address) in &cluster.nodes {
        let ip = address.ip();
        expect(ip, "unknown.example", "/", 200, "two-");
        expect(ip, "b.example", "/z", 200, "two-");
        expect(ip, "a.example", "/", 200, "one-");
    }
}
