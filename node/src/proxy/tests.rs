//! The proxy's pieces together on loopback: listeners, direct splicing, QUIC tunnels with
//! mutual TLS.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::table::{Backend, Frontend, FrontendKind, Protocol, Route, RoutingTable, Via};
use super::tunnel::Tunnels;
use super::{accept_loop, tls, tunnel, write, Shared};

const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A pod stand-in: answers every connection with `NAME:` and what it read, then closes.
async fn endpoint(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut request = Vec::new();
                if stream.read_to_end(&mut request).await.is_ok() {
                    let mut reply = format!("{name}:").into_bytes();
                    reply.extend(request);
                    let _ = stream.write_all(&reply).await;
                }
            });
        }
    });
    address
}

async fn ask(address: SocketAddr, question: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(address).await?;
    stream.write_all(question).await?;
    stream.shutdown().await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    Ok(answer)
}

fn shared_with(node: &str, routes: BTreeMap<Frontend, Route>) -> Arc<Shared> {
    let shared = Arc::new(Shared::new(node.to_owned()));
    write(
        &shared.table,
        Arc::new(RoutingTable {
            routes,
            conflicts: Vec::new(),
        }),
    );
    write(&shared.pod_cidr, Some((Ipv4Addr::new(127, 0, 0, 0), 8)));
    shared
}

fn frontend(port: u16) -> Frontend {
    Frontend {
        ip: LOOPBACK,
        port,
        protocol: Protocol::Tcp,
    }
}

fn route(backends: Vec<Backend>) -> Route {
    Route {
        service: "default/web:80".into(),
        kind: FrontendKind::ClusterIp,
        backends,
        affinity: None,
    }
}

/// A listener for `route`, as the proxy runs one; returns its address.
async fn serve_frontend(
    shared: Arc<Shared>,
    make_route: impl FnOnce(Frontend) -> Route,
    token: &CancellationToken,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let frontend = frontend(address.port());
    let mut routes = (*shared.table()).clone();
    routes.routes.insert(frontend, make_route(frontend));
    write(&shared.table, Arc::new(routes));
    tokio::spawn(accept_loop(frontend, listener, shared, token.clone()));
    address
}

#[tokio::test]
async fn a_connection_to_a_frontend_is_spliced_to_a_local_endpoint_in_turn() {
    let a = endpoint("a").await;
    let b = endpoint("b").await;
    let shared = shared_with("n1", BTreeMap::new());
    let token = CancellationToken::new();
    let backend = |address: SocketAddr| Backend {
        ip: address.ip(),
        port: address.port(),
        node: Some("n1".into()),
        via: Via::Direct,
    };
    let address = serve_frontend(
        shared.clone(),
        |_| route(vec![backend(a), backend(b)]),
        &token,
    )
    .await;
    let first = ask(address, b"hello").await.expect("an answer");
    let second = ask(address, b"hello").await.expect("an answer");
    let mut answers = vec![first, second];
    answers.sort();
    assert_eq!(answers, [b"a:hello".to_vec(), b"b:hello".to_vec()]);
    assert_eq!(
        shared
            .stats
            .direct
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
    token.cancel();
}

#[tokio::test]
async fn a_frontend_without_endpoints_resets_at_once() {
    let shared = shared_with("n1", BTreeMap::new());
    let token = CancellationToken::new();
    let address = serve_frontend(shared.clone(), |_| route(Vec::new()), &token).await;
    let outcome = tokio::time::timeout(Duration::from_secs(2), ask(address, b"hello"))
        .await
        .expect("no hang");
    assert!(outcome.is_err(), "a reset, not an answer: {outcome:?}");
    token.cancel();
}

#[tokio::test]
async fn an_unreachable_endpoint_is_skipped_for_a_ready_one() {
    let live = endpoint("live").await;
    // A port nothing listens on.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("address");
    let shared = shared_with("n1", BTreeMap::new());
    let token = CancellationToken::new();
    let backends = [dead, live]
        .iter()
        .map(|address| Backend {
            ip: address.ip(),
            port: address.port(),
            node: None,
            via: Via::Direct,
        })
        .collect();
    let address = serve_frontend(shared, |_| route(backends), &token).await;
    for _ in 0..3 {
        assert_eq!(ask(address, b"x").await.expect("an answer"), b"live:x");
    }
    token.cancel();
}

struct Node {
    shared: Arc<Shared>,
    tunnels: Arc<Tunnels>,
}

/// A node's tunnel endpoint on loopback; it reaches peers on `peer_port` (0: its own port).
fn tunnel_node(name: &str, ca: &tls::ClusterCa, peer_port: u16, token: &CancellationToken) -> Node {
    let identity = tls::issue(ca, name, Some(LOOPBACK)).expect("a certificate");
    let (server, client) = tls::quic_configs(&identity).expect("QUIC configs");
    let shared = shared_with(name, BTreeMap::new());
    let tunnels = Tunnels::bind(
        server,
        client,
        SocketAddr::new(LOOPBACK, 0),
        peer_port,
        shared.stats.clone(),
    )
    .expect("bind");
    let tunnels = Arc::new(tunnels);
    let _ = shared.tunnels.set(tunnels.clone());
    tokio::spawn(tunnel::serve(
        tunnels.clone(),
        shared.clone(),
        token.clone(),
    ));
    Node { shared, tunnels }
}

#[tokio::test]
async fn a_remote_endpoint_is_reached_through_one_quic_connection_to_its_nodes_proxy() {
    let pod = endpoint("pod-on-n2").await;
    let ca = tls::new_ca().expect("a CA");
    let token = CancellationToken::new();
    let n2 = tunnel_node("n2", &ca, 0, &token);
    let n2_port = n2.tunnels.local_port().expect("a port");
    let n1 = tunnel_node("n1", &ca, n2_port, &token);
    let backend = Backend {
        ip: pod.ip(),
        port: pod.port(),
        node: Some("n2".into()),
        via: Via::Tunnel {
            node: "n2".into(),
            address: LOOPBACK,
        },
    };
    let address = serve_frontend(n1.shared.clone(), |_| route(vec![backend]), &token).await;
    for question in [&b"one"[..], b"two", b"three"] {
        let answer = tokio::time::timeout(Duration::from_secs(10), ask(address, question))
            .await
            .expect("an answer in time")
            .expect("an answer");
        assert_eq!(answer, [&b"pod-on-n2:"[..], question].concat());
    }
    let opened = n1.shared.stats.streams_opened.lock().expect("lock").clone();
    assert_eq!(opened, BTreeMap::from([("n2".to_string(), 3)]));
    let accepted: u64 = n2
        .shared
        .stats
        .streams_accepted
        .lock()
        .expect("lock")
        .values()
        .sum();
    assert_eq!(accepted, 3);
    assert_eq!(
        n1.shared
            .stats
            .tunnels_connected
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "one connection carries every stream"
    );
    token.cancel();
}

#[tokio::test]
async fn a_tunnel_refuses_addresses_that_are_no_pods_of_its_node() {
    let ca = tls::new_ca().expect("a CA");
    let token = CancellationToken::new();
    let n2 = tunnel_node("n2", &ca, 0, &token);
    let n1 = tunnel_node("n1", &ca, n2.tunnels.local_port().expect("a port"), &token);
    let outcome = n1
        .tunnels
        .open("n2", LOOPBACK, "10.9.9.9:80".parse().expect("address"))
        .await;
    let error = match outcome {
        Ok(_) => panic!("a tunnel to a foreign address was opened"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("Forbidden"), "{error}");
    token.cancel();
}

#[tokio::test]
async fn a_peer_with_a_certificate_of_another_cluster_gets_no_tunnel() {
    let pod = endpoint("pod").await;
    let token = CancellationToken::new();
    let n2 = tunnel_node("n2", &tls::new_ca().expect("a CA"), 0, &token);
    let stranger = tunnel_node(
        "n1",
        &tls::new_ca().expect("another CA"),
        n2.tunnels.local_port().expect("a port"),
        &token,
    );
    let outcome = tokio::time::timeout(
        Duration::from_secs(10),
        stranger.tunnels.open("n2", LOOPBACK, pod),
    )
    .await
    .expect("no hang");
    assert!(outcome.is_err(), "a stranger was let in");
    token.cancel();
}
