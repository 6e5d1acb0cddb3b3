//! Services on a `flotilla local` cluster of three node containers: a pod on one node reaches
//! a Service whose only endpoint runs on another node, by cluster IP, through the QUIC tunnel
//! between the two nodes' proxies; the node port answers on every node's address; a Service
//! without endpoints refuses at once.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

mod local_cluster;

use local_cluster::{flotilla, text, Down};

struct Cluster {
    name: String,
    servers: String,
    /// (node name, container, address) as `local up` printed them.
    nodes: Vec<(String, String, SocketAddr)>,
}

impl Cluster {
    fn cli(&self, args: &[&str]) -> Output {
        let mut all = vec!["--server", &self.servers];
        all.extend_from_slice(args);
        flotilla(&all)
    }

    fn json(&self, args: &[&str]) -> Option<Value> {
        let mut all = args.to_vec();
        all.extend_from_slice(&["-o", "json"]);
        let output = self.cli(&all);
        if !output.status.success() {
            return None;
        }
        serde_json::from_slice(&output.stdout).ok()
    }

    fn node(&self, index: usize) -> String {
        format!("{}-n{index}", self.name)
    }

    fn container(&self, index: usize) -> &str {
        &self.nodes[index - 1].1
    }

    fn proxy_stats(&self, index: usize) -> Value {
        let output = Command::new("docker")
            .args([
                "exec",
                self.container(index),
                "cat",
                "/data/proxy-stats.json",
            ])
            .output()
            .expect("run docker exec");
        serde_json::from_slice(&output.stdout).unwrap_or(Value::Null)
    }
}

/// Polls `probe` every half second until it gives a value or `limit` passes.
fn wait_for<T>(limit: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// An HTTP/1.0 GET over a plain TCP connection; the reply, or the error.
fn http_get(address: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(reply)
}

const MANIFEST: &str = "\
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo}
spec:
  replicas: 1
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      nodeSelector: {kubernetes.io/hostname: NODE2}
      containers:
      - name: echo
        image: flotilla/echo:latest
        imagePullPolicy: Never
        ports: [{containerPort: 8080, name: http}]
---
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
    let name = format!("sv{}", std::process::id());
    let _down = Down(name.clone());
    let up = flotilla(&["local", "up", "--nodes", "3", "--name", &name]);
    assert!(up.status.success(), "local up failed: {}", text(&up));
    let printed = text(&up);
    let servers = printed
        .lines()
        .find_map(|line| line.trim().strip_prefix("export FLOTILLA_SERVER="))
        .expect("local up prints how to point the CLI at the cluster")
        .to_owned();
    let nodes: Vec<(String, String, SocketAddr)> = printed
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split('\t').collect();
            match fields.as_slice() {
                [node, container, address] => Some((
                    node.to_string(),
                    container.to_string(),
                    address.parse().ok()?,
                )),
                _ => None,
            }
        })
        .collect();
    assert_eq!(nodes.len(), 3, "three nodes printed: {printed}");
    let cluster = Cluster {
        name: name.clone(),
        servers,
        nodes,
    };

    let manifest = std::env::temp_dir().join(format!("{name}-services.yaml"));
    std::fs::write(
        &manifest,
        MANIFEST
            .replace("NODE1", &cluster.node(1))
            .replace("NODE2", &cluster.node(2)),
    )
    .expect("write the manifest");
    let apply = cluster.cli(&["apply", "-f", &manifest.to_string_lossy()]);
    let _ = std::fs::remove_file(&manifest);
    assert!(apply.status.success(), "apply: {}", text(&apply));

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

    // The node port, from this host, on every node's address.
    for (node, _, address) in &cluster.nodes {
        let target = SocketAddr::new(address.ip(), node_port);
        let mut last = String::new();
        let answered = wait_for(Duration::from_secs(20), || match http_get(target) {
            Ok(reply) if reply.contains(&echo_pod) => Some(()),
            Ok(reply) => {
                last = reply;
                None
            }
            Err(error) => {
                last = error.to_string();
                None
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
    // It is listened on (so what follows is the proxy's reset, not a closed port).
    let listening = format!("0.0.0.0:{nobody_port}");
    wait_for(Duration::from_secs(10), || {
        cluster.proxy_stats(1)["frontends"]
            .as_array()?
            .iter()
            .any(|f| f.as_str() == Some(listening.as_str()))
            .then_some(())
    })
    .expect("n1 listens on the endpoint-less node port");
    let refused = wait_for(Duration::from_secs(20), || {
        let started = Instant::now();
        match http_get(target) {
            Err(error)
                if error.kind() != std::io::ErrorKind::WouldBlock
                    && error.kind() != std::io::ErrorKind::TimedOut =>
            {
                Some((error.kind(), started.elapsed()))
            }
            Ok(reply) if reply.is_empty() => {
                Some((std::io::ErrorKind::UnexpectedEof, started.elapsed()))
            }
            _ => None,
        }
    });
    let (kind, elapsed) = refused.expect("the endpoint-less node port refuses");
    assert!(
        elapsed < Duration::from_secs(2),
        "refusing took {elapsed:?} ({kind:?})"
    );
}
