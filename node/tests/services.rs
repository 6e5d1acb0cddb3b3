//! Services on a `flotilla local` cluster of three node containers: a pod on one node reaches
//! a Service whose only endpoint runs on another node, by cluster IP and by DNS name, through
//! the QUIC tunnel between the two nodes' proxies; the node port answers on every node's
//! address; a Service without endpoints refuses at once. And an exposed LoadBalancer answers
//! round-robin from its endpoints on every node, skipping the endpoint of a lost node.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;

mod local_cluster;

use local_cluster::{body, echo_deployment, http_get, text, wait_for, Cluster};

/// Applied together with `echo_deployment("echo", "NODE2")`.
const MANIFEST: &str = "\
apiVersion: v1
kind: Service
metadata: {name: echo}
spec:
  type: NodePort
  selector: {app: echo}
  ports: [{port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: nobody}
spec:
  type: NodePort
  selector: {app: nobody}
  ports: [{port: 81, targetPort: 8080}]
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
fn a_pod_reaches_a_service_on_another_node_through_the_tunnel_and_node_ports_answer_everywhere() {
    let cluster = Cluster::up(&format!("sv{}", std::process::id()), 3);
    cluster.apply(&format!(
        "{}---\n{MANIFEST}",
        echo_deployment("echo", "NODE2")
    ));

    // The echo pod is ready on n2, and the Endpoints list it.
    let echo_pod = wait_for(Duration::from_secs(90), || {
        let endpoints = cluster.json(&["get", "endpoints", "echo"])?;
        let address = endpoints.pointer("/subsets/0/addresses/0")?;
        (address.get("nodeName")?.as_str()? == cluster.node(2)).then(|| {
            address
                .pointer("/targetRef/name")?
                .as_str()
                .map(str::to_owned)
        })?
    })
    .expect("the echo pod is an endpoint on n2 within 90 s");
    let service = cluster
        .json(&["get", "service", "echo"])
        .expect("the echo Service");
    let cluster_ip = service
        .pointer("/spec/clusterIP")
        .and_then(Value::as_str)
        .expect("a cluster IP")
        .to_owned();
    let node_port = service
        .pointer("/spec/ports/0/nodePort")
        .and_then(Value::as_u64)
        .expect("a node port") as u16;
    wait_for(Duration::from_secs(60), || {
        let pod = cluster.json(&["get", "pod", "client"])?;
        (pod.pointer("/status/phase")?.as_str()? == "Running").then_some(())
    })
    .expect("the client pod runs within 60 s");

    // From the pod on n1, by cluster IP: the only endpoint is on n2.
    let command = format!("echo -e 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {cluster_ip} 80");
    let mut last = String::new();
    let reply = wait_for(Duration::from_secs(60), || {
        let exec = cluster.cli(&["exec", "client", "--", "sh", "-c", &command]);
        last = text(&exec);
        last.contains(&echo_pod).then_some(())
    });
    assert!(
        reply.is_some(),
        "the client pod on n1 did not get {echo_pod} from {cluster_ip}:80; last reply: {last}\n\
         n1 proxy: {}",
        cluster.proxy_stats(1)
    );

    // …through the QUIC tunnel from n1's proxy to n2's.
    let opened_to_n2 = wait_for(Duration::from_secs(5), || {
        let stats = cluster.proxy_stats(1);
        let opened = stats.pointer(&format!("/streamsOpened/{}", cluster.node(2)))?;
        opened.as_u64().filter(|n| *n >= 1)
    });
    assert!(
        opened_to_n2.is_some(),
        "n1's proxy shows no stream opened to n2: {}",
        cluster.proxy_stats(1)
    );
    let accepted_from_n1 = wait_for(Duration::from_secs(5), || {
        let stats = cluster.proxy_stats(2);
        let accepted = stats.pointer(&format!("/streamsAccepted/{}", cluster.node(1)))?;
        accepted.as_u64().filter(|n| *n >= 1)
    });
    assert!(
        accepted_from_n1.is_some(),
        "n2's proxy shows no stream accepted from n1: {}",
        cluster.proxy_stats(2)
    );
    let cluster_ips = cluster.proxy_stats(1)["clusterIps"].clone();
    assert!(
        cluster_ips.to_string().contains(&cluster_ip),
        "n1 does not hold {cluster_ip}: {cluster_ips}"
    );

    // By DNS name too (n1's resolver), again through a new stream of the tunnel.
    let opened_before = cluster.proxy_stats(1)["streamsOpened"][cluster.node(2)]
        .as_u64()
        .unwrap_or(0);
    for name in ["echo", "echo.default.svc.cluster.local"] {
        let command = format!("echo -e 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {name} 80");
        let reply = wait_for(Duration::from_secs(30), || {
            let exec = cluster.cli(&["exec", "client", "--", "sh", "-c", &command]);
            last = text(&exec);
            last.contains(&echo_pod).then_some(())
        });
        assert!(
            reply.is_some(),
            "the client pod on n1 did not get {echo_pod} from {name}:80; last reply: {last}"
        );
    }
    let opened_by_name = wait_for(Duration::from_secs(5), || {
        let stats = cluster.proxy_stats(1);
        let opened = stats.pointer(&format!("/streamsOpened/{}", cluster.node(2)))?;
        opened.as_u64().filter(|n| *n >= opened_before + 2)
    });
    assert!(
        opened_by_name.is_some(),
        "n1's proxy opened no new streams to n2 for the requests by name: {}",
        cluster.proxy_stats(1)
    );

    // The node port, from this host, on every node's address.
    for (node, _, address) in &cluster.nodes {
        let target = SocketAddr::new(address.ip(), node_port);
        let mut last = String::new();
        let answered = wait_for(Duration::from_secs(20), || {
            match http_get(target, None, "/") {
                Ok(reply) if body(&reply) == echo_pod => Some(()),
                Ok(reply) => {
                    last = reply;
                    None
                }
                Err(error) => {
                    last = error.to_string();
                    None
                }
            }
        });
        assert!(
            answered.is_some(),
            "node port {target} of {node} did not answer {echo_pod}: {last}"
        );
    }

    // A Service without endpoints: refused at once, not a hang.
    let nobody_port = cluster
        .json(&["get", "service", "nobody"])
        .and_then(|s| s.pointer("/spec/ports/0/nodePort").and_then(Value::as_u64))
        .expect("the nobody Service's node port") as u16;
    let target = SocketAddr::new(cluster.nodes[0].2.ip(), nobody_port);
    // Not listened on while it has no endpoint: the connection is refused at once.
    let refused = wait_for(Duration::from_secs(20), || {
        let started = Instant::now();
        match http_get(target, None, "/") {
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
                Some(started.elapsed())
            }
            _ => None,
        }
    });
    let elapsed = refused.expect("the endpoint-less node port refuses connections");
    assert!(
        elapsed < Duration::from_secs(1),
        "refusing took {elapsed:?}"
    );
    let frontends = cluster.proxy_stats(1)["frontends"].clone();
    assert!(
        !frontends.to_string().contains(&format!(":{nobody_port}\"")),
        "n1 listens on the endpoint-less node port: {frontends}"
    );
}

const SPREAD_MANIFEST: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, labels: {app: web}}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      affinity:
        podAntiAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
          - labelSelector: {matchLabels: {app: web}}
            topologyKey: kubernetes.io/hostname
      containers:
      - name: echo
        image: flotilla/echo:latest
        imagePullPolicy: Never
        ports: [{containerPort: 8080}]
";

/// Which pod answered each of `count` requests to `target`; `None` for a failed request.
fn answers(target: SocketAddr, count: usize) -> Vec<Option<String>> {
    (0..count)
        .map(|_| {
            http_get(target, None, "/")
                .ok()
                .map(|reply| body(&reply).to_owned())
                .filter(|answer| !answer.is_empty())
        })
        .collect()
}

#[test]
fn exposed_endpoints_on_every_node_answer_in_turn_and_a_lost_nodes_endpoint_is_skipped() {
    let cluster = Cluster::up(&format!("sx{}", std::process::id()), 3);
    cluster.apply(SPREAD_MANIFEST);
    let pods = cluster.running_pods("web-", 3, Duration::from_secs(120));

    let exposed = cluster.cli(&[
        "expose",
        "deploy/web",
        "--port",
        "8000",
        "--target-port",
        "8080",
        "--type",
        "LoadBalancer",
    ]);
    assert!(exposed.status.success(), "expose: {}", text(&exposed));
    assert!(
        text(&exposed).contains("service/web exposed"),
        "{}",
        text(&exposed)
    );
    wait_for(Duration::from_secs(30), || {
        let endpoints = cluster.json(&["get", "endpoints", "web"])?;
        let addresses = endpoints.pointer("/subsets/0/addresses")?.as_array()?;
        (addresses.len() == 3).then_some(())
    })
    .expect("the three pods are endpoints of web within 30 s");

    // The LoadBalancer's addresses are the nodes'.
    let mut node_addresses: Vec<String> = (1..=3).map(|i| cluster.address(i).to_string()).collect();
    node_addresses.sort();
    let service = wait_for(Duration::from_secs(20), || {
        let service = cluster.json(&["get", "service", "web"])?;
        let mut listed: Vec<String> = service
            .pointer("/status/loadBalancer/ingress")?
            .as_array()?
            .iter()
            .filter_map(|entry| entry.get("ip")?.as_str().map(str::to_owned))
            .collect();
        listed.sort();
        (listed == node_addresses).then_some(service)
    })
    .expect("status.loadBalancer.ingress lists the three node addresses");
    let node_port = service
        .pointer("/spec/ports/0/nodePort")
        .and_then(Value::as_u64)
        .expect("a LoadBalancer has a node port") as u16;
    let table = text(&cluster.cli(&["get", "svc", "web"]));
    assert!(
        table.contains("LoadBalancer") && table.contains(&format!("8000:{node_port}/TCP")),
        "get svc shows the type and ports: {table}"
    );

    // Each node's node port, and its LoadBalancer port, answers from all three pods in turn.
    for index in 1..=3 {
        for port in [node_port, 8000] {
            let target = SocketAddr::new(cluster.address(index), port);
            let served = wait_for(Duration::from_secs(20), || {
                let served = answers(target, 6);
                served.iter().all(Option::is_some).then_some(served)
            })
            .unwrap_or_else(|| panic!("{target} does not answer six requests in a row"));
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for answer in served.into_iter().flatten() {
                *counts.entry(answer).or_default() += 1;
            }
            let expected: BTreeMap<String, usize> = pods.iter().map(|p| (p.clone(), 2)).collect();
            assert_eq!(
                counts, expected,
                "six requests to {target} are not spread round-robin over the three pods"
            );
        }
    }

    // Node 3 is lost with its pod: new connections go to the two remaining endpoints.
    let lost_pod = cluster
        .json(&["get", "pods"])
        .and_then(|pods| {
            pods["items"].as_array()?.iter().find_map(|pod| {
                (pod.pointer("/spec/nodeName")?.as_str()? == cluster.node(3))
                    .then(|| pod.pointer("/metadata/name")?.as_str().map(str::to_owned))?
            })
        })
        .expect("a web pod on node 3");
    let kill = local_cluster::flotilla(&[
        "local",
        "kill",
        &cluster.node(3),
        "--name",
        &cluster.name,
        "--with-pods",
    ]);
    assert!(kill.status.success(), "local kill: {}", text(&kill));
    let killed_at = Instant::now();
    let target = SocketAddr::new(cluster.address(1), node_port);
    let mut slowest = Duration::ZERO;
    let settled = wait_for(Duration::from_secs(30), || {
        let started = Instant::now();
        let served = answers(target, 6);
        slowest = slowest.max(started.elapsed() / 6);
        let survivors: Vec<&String> = served.iter().flatten().collect();
        (survivors.len() == 6 && survivors.iter().all(|pod| **pod != lost_pod))
            .then_some(survivors.len())
    });
    assert!(
        settled.is_some(),
        "after node 3 was lost, {target} still fails or answers from {lost_pod} after 30 s"
    );
    eprintln!(
        "connections avoid the lost endpoint {:?} after the kill (slowest request {slowest:?})",
        killed_at.elapsed()
    );
}
