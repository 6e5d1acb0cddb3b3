//! Cluster DNS on a `flotilla local` cluster of two node containers: a busybox pod on node 1
//! resolves a Service by its short, namespaced and full names to the cluster IP, a headless
//! Service to its pod's IP, a missing name to NXDOMAIN, reaches the echo pod on node 2 by
//! name, and has the Service variables of a Service created before it.

use std::time::{Duration, Instant};

mod local_cluster;

use local_cluster::{echo_deployment, text, wait_for, Cluster};

/// The busybox pod named `client` of the test.
trait ClientPod {
    /// What `sh -c command` in the client pod printed (stdout and stderr).
    fn in_client(&self, command: &str) -> String;

    /// Runs `command` in the client pod until its output satisfies `accept`, for up to
    /// `limit`; the last output either way.
    fn in_client_until(
        &self,
        command: &str,
        limit: Duration,
        accept: impl Fn(&str) -> bool,
    ) -> (bool, String);
}

impl ClientPod for Cluster {
    fn in_client(&self, command: &str) -> String {
        text(&self.cli(&["exec", "client", "--", "sh", "-c", command]))
    }

    fn in_client_until(
        &self,
        command: &str,
        limit: Duration,
        accept: impl Fn(&str) -> bool,
    ) -> (bool, String) {
        let mut last = String::new();
        let accepted = wait_for(limit, || {
            last = self.in_client(command);
            accept(&last).then_some(())
        });
        (accepted.is_some(), last)
    }
}

/// Applied together with `echo_deployment("echo", "NODE2")`.
const MANIFEST: &str = "\
apiVersion: v1
kind: Service
metadata: {name: echo}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-pods}
spec:
  clusterIP: None
  selector: {app: echo}
  ports: [{name: http, port: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: client}
spec:
  nodeSelector: {kubernetes.io/hostname: NODE1}
  containers:
  - name: client
    image: flotilla/busybox:latest
    imagePullPolicy: Never
    command: [sleep, '3600']
";

#[test]
fn a_pod_resolves_services_by_name_through_its_nodes_dns_and_gets_their_variables() {
    let cluster = Cluster::up(&format!("dn{}", std::process::id()), 2);
    cluster.apply(&format!(
        "{MANIFEST}---\n{}",
        echo_deployment("echo", "NODE2")
    ));

    // The echo pod is ready on n2: (its name, its IP).
    let (echo_pod, echo_ip) = wait_for(Duration::from_secs(90), || {
        let endpoints = cluster.json(&["get", "endpoints", "echo"])?;
        let address = endpoints.pointer("/subsets/0/addresses/0")?;
        (address.get("nodeName")?.as_str()? == cluster.node(2)).then_some(())?;
        Some((
            address.pointer("/targetRef/name")?.as_str()?.to_owned(),
            address.get("ip")?.as_str()?.to_owned(),
        ))
    })
    .expect("the echo pod is an endpoint on n2 within 90 s");
    let cluster_ip = cluster
        .json(&["get", "service", "echo"])
        .and_then(|s| s.pointer("/spec/clusterIP")?.as_str().map(str::to_owned))
        .expect("the echo Service has a cluster IP");
    wait_for(Duration::from_secs(60), || {
        let pod = cluster.json(&["get", "pod", "client"])?;
        (pod.pointer("/status/phase")?.as_str()? == "Running").then_some(())
    })
    .expect("the client pod runs within 60 s");

    // The pod's resolver: the cluster searches and ndots:5 (Docker's embedded resolver in
    // front, forwarding to the node's DNS server).
    let resolv_conf = cluster.in_client("cat /etc/resolv.conf");
    assert!(
        resolv_conf.contains("search default.svc.cluster.local svc.cluster.local cluster.local")
            && resolv_conf.contains("ndots:5"),
        "the client pod's resolv.conf: {resolv_conf}"
    );

    // The full name, once n1's DNS server answers (it binds when the gateway is there).
    let (answered, last) = cluster.in_client_until(
        "nslookup echo.default.svc.cluster.local",
        Duration::from_secs(30),
        |output| output.contains(&cluster_ip),
    );
    assert!(
        answered,
        "echo.default.svc.cluster.local is not {cluster_ip}: {last}"
    );

    // The short name, through the search list (busybox nslookup applies it to dotless names).
    let output = cluster.in_client("nslookup echo");
    assert!(output.contains(&cluster_ip), "nslookup echo: {output}");

    // `echo.default` has a dot, which busybox nslookup sends as it is; the C library applies
    // the search list (ndots:5) as applications see it, here through ping's lookup.
    let output = cluster.in_client("ping -c 1 -W 1 echo.default");
    assert!(
        output.contains(&format!("({cluster_ip})")),
        "ping echo.default did not resolve to {cluster_ip}: {output}"
    );

    // The headless Service: the pod's own IP, once its Endpoints reached n1's name table
    // (a DNS pass after the endpoints controller saw the pod ready).
    let (answered, output) = cluster.in_client_until(
        "nslookup echo-pods.default.svc.cluster.local",
        Duration::from_secs(30),
        |output| output.contains(&echo_ip),
    );
    assert!(
        answered && !output.contains(&cluster_ip),
        "the headless echo-pods is not {echo_ip}: {output}"
    );

    // A missing cluster name: NXDOMAIN, answered by the node (not a timeout).
    let started = Instant::now();
    let output = cluster.in_client("nslookup nope.default.svc.cluster.local");
    assert!(output.contains("NXDOMAIN"), "nope: {output}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "NXDOMAIN took {:?}",
        started.elapsed()
    );

    // HTTP by name: the echo pod on n2 answers its hostname (the pod name).
    let (reached, last) = cluster.in_client_until(
        "echo -e 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 echo 80",
        Duration::from_secs(30),
        |output| output.contains(&echo_pod),
    );
    assert!(reached, "echo:80 by name did not reach {echo_pod}: {last}");

    // The Service variables of a Service created before the pod.
    let env = cluster.in_client("env");
    for expected in [
        format!("ECHO_SERVICE_HOST={cluster_ip}"),
        "ECHO_SERVICE_PORT=80".to_owned(),
        "ECHO_SERVICE_PORT_HTTP=80".to_owned(),
        format!("ECHO_PORT=tcp://{cluster_ip}:80"),
        format!("ECHO_PORT_80_TCP_ADDR={cluster_ip}"),
    ] {
        assert!(
            env.lines().any(|line| line == expected),
            "no {expected} in the client's environment: {env}"
        );
    }
    assert!(
        !env.contains("ECHO_PODS_SERVICE_HOST"),
        "a headless Service has no variables: {env}"
    );
}
