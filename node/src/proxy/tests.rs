//! The proxy's pieces together on loopback: listeners, direct splicing, QUIC tunnels with
//! mutual TLS, the Ingress listener.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use flotilla_pki::{Authority, Credentials, Subject, TlsState};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::table::{
    Backend, Frontend, FrontendKind, Protocol, Route, RoutingTable, ServicePort, Upstream, Via,
};
use super::tunnel::Tunnels;
use super::{accept_loop, ingress, tls, tunnel, write, Shared};

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
            ..RoutingTable::default()
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
        kind: FrontendKind::ClusterIp,
        upstream: Upstream {
            service: "default/web:80".into(),
            backends,
            affinity: None,
        },
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

fn new_ca() -> Authority {
    Authority::generate("test CA", SystemTime::now()).expect("a CA")
}

/// Node `name`'s TLS state: a certificate from `ca` valid from `not_before` to `not_after`
/// (`None`: no certificate at all), trusting `ca`.
fn node_tls(
    name: &str,
    ca: &Authority,
    validity: Option<(SystemTime, SystemTime)>,
) -> Arc<TlsState> {
    let credentials = validity.map(|(not_before, not_after)| {
        let issued = ca
            .issue_between(&Subject::Node(name.into()), not_before, not_after)
            .expect("a certificate");
        Credentials::from_pem(&issued.chain_pem, &issued.key_pem).expect("credentials")
    });
    TlsState::new(vec![ca.certificate_der().expect("CA")], credentials).expect("TLS state")
}

fn valid_now() -> Option<(SystemTime, SystemTime)> {
    let now = SystemTime::now();
    Some((
        now - Duration::from_secs(60),
        now + Duration::from_secs(3600),
    ))
}

/// A node's tunnel endpoint on loopback with a valid certificate from `ca`; it reaches peers
/// on `peer_port` (0: its own port).
fn tunnel_node(name: &str, ca: &Authority, peer_port: u16, token: &CancellationToken) -> Node {
    tunnel_node_with(node_tls(name, ca, valid_now()), name, peer_port, token)
}

fn tunnel_node_with(
    state: Arc<TlsState>,
    name: &str,
    peer_port: u16,
    token: &CancellationToken,
) -> Node {
    let (server, client) = tls::quic_configs(&state).expect("QUIC configs");
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
    let ca = new_ca();
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
    let ca = new_ca();
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
    let n2 = tunnel_node("n2", &new_ca(), 0, &token);
    let stranger = tunnel_node(
        "n1",
        &new_ca(),
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

#[tokio::test]
async fn a_peer_with_an_expired_certificate_or_none_gets_no_tunnel() {
    let pod = endpoint("pod").await;
    let token = CancellationToken::new();
    let ca = new_ca();
    let n2 = tunnel_node("n2", &ca, 0, &token);
    let port = n2.tunnels.local_port().expect("a port");
    let now = SystemTime::now();
    let expired = Some((
        now - Duration::from_secs(7200),
        now - Duration::from_secs(3600),
    ));
    for (what, state) in [
        ("an expired certificate", node_tls("n1", &ca, expired)),
        ("no certificate", node_tls("n1", &ca, None)),
    ] {
        let stranger = tunnel_node_with(state, "n1", port, &token);
        let outcome = tokio::time::timeout(
            Duration::from_secs(10),
            stranger.tunnels.open("n2", LOOPBACK, pod),
        )
        .await
        .expect("no hang");
        match outcome {
            Ok(_) => panic!("a peer with {what} was let in"),
            // Refused by the handshake, not by the accepting side's pod check.
            Err(error) => assert!(
                !format!("{error:#}").contains("Forbidden"),
                "{what}: {error:#}"
            ),
        }
    }
    let friend = tunnel_node("n1", &ca, port, &token);
    let outcome = tokio::time::timeout(
        Duration::from_secs(10),
        friend
            .tunnels
            .open("n2", LOOPBACK, "10.9.9.9:80".parse().expect("address")),
    )
    .await
    .expect("no hang");
    let error = outcome.err().map(|e| format!("{e:#}")).unwrap_or_default();
    assert!(
        error.contains("Forbidden"),
        "a valid peer is past the handshake: {error}"
    );
    token.cancel();
}

fn direct(address: SocketAddr) -> Backend {
    Backend {
        ip: address.ip(),
        port: address.port(),
        node: Some("n1".into()),
        via: Via::Direct,
    }
}

/// An Ingress listener on loopback for `ingresses`, with the Service ports `ports`
/// (`default/<name>:80`); returns its address.
async fn serve_ingress(
    ingresses: serde_json::Value,
    ports: Vec<(&str, Vec<Backend>)>,
    token: &CancellationToken,
) -> (SocketAddr, Arc<Shared>) {
    let shared = shared_with("n1", BTreeMap::new());
    let mut table = RoutingTable::default();
    for (name, backends) in ports {
        table.service_ports.insert(
            ("default".into(), name.into()),
            vec![ServicePort {
                name: String::new(),
                port: 80,
                protocol: Protocol::Tcp,
                upstream: Upstream {
                    service: format!("default/{name}:80"),
                    backends,
                    affinity: None,
                },
            }],
        );
    }
    write(&shared.table, Arc::new(table));
    let ingresses = ingresses.as_array().cloned().unwrap_or_default();
    write(&shared.ingress_router, Arc::new(ingress::build(&ingresses)));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(ingress::serve(listener, shared.clone(), token.clone()));
    (address, shared)
}

fn web_ingress() -> serde_json::Value {
    serde_json::json!([{
        "apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {"rules": [
            {"host": "a.example", "http": {"paths": [
                {"path": "/", "pathType": "Prefix",
                 "backend": {"service": {"name": "one", "port": {"number": 80}}}},
                {"path": "/empty", "pathType": "Prefix",
                 "backend": {"service": {"name": "empty", "port": {"number": 80}}}},
                {"path": "/missing", "pathType": "Prefix",
                 "backend": {"service": {"name": "missing", "port": {"number": 80}}}},
            ]}},
        ]},
    }])
}

async fn ask_in_time(address: SocketAddr, question: &[u8]) -> String {
    let answer = tokio::time::timeout(Duration::from_secs(10), ask(address, question))
        .await
        .expect("an answer in time")
        .expect("an answer");
    String::from_utf8(answer).expect("UTF-8")
}

fn load(counter: &std::sync::atomic::AtomicU64) -> u64 {
    counter.load(std::sync::atomic::Ordering::Relaxed)
}

#[tokio::test]
async fn an_ingress_request_reaches_its_service_with_a_rewritten_head_and_its_body() {
    let one = endpoint("one").await;
    let token = CancellationToken::new();
    let (address, shared) =
        serve_ingress(web_ingress(), vec![("one", vec![direct(one)])], &token).await;
    let answer = ask_in_time(
        address,
        b"POST /things?x=1 HTTP/1.1\r\nHost: A.Example:80\r\nConnection: keep-alive\r\n\
          Content-Length: 4\r\n\r\nbody",
    )
    .await;
    assert_eq!(
        answer,
        "one:POST /things?x=1 HTTP/1.1\r\nHost: A.Example:80\r\nContent-Length: 4\r\n\
         X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Host: A.Example:80\r\n\
         X-Forwarded-Proto: http\r\nConnection: close\r\n\r\nbody"
    );
    assert_eq!(load(&shared.stats.ingress_requests), 1);
    assert_eq!(load(&shared.stats.direct), 1);
    token.cancel();
}

#[tokio::test]
async fn an_ingress_request_matching_no_rule_gets_404() {
    let one = endpoint("one").await;
    let token = CancellationToken::new();
    let (address, shared) =
        serve_ingress(web_ingress(), vec![("one", vec![direct(one)])], &token).await;
    let answer = ask_in_time(address, b"GET / HTTP/1.1\r\nHost: b.example\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 404 Not Found\r\n"), "{answer}");
    assert!(answer.contains("Connection: close\r\n"), "{answer}");
    assert_eq!(load(&shared.stats.ingress_not_found), 1);
    assert_eq!(load(&shared.stats.direct), 0);
    token.cancel();
}

#[tokio::test]
async fn an_ingress_request_for_a_service_without_endpoints_gets_503() {
    // A port nothing listens on: an endpoint that cannot be reached.
    let dead = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind")
        .local_addr()
        .expect("address");
    let token = CancellationToken::new();
    let (address, shared) = serve_ingress(
        web_ingress(),
        vec![("one", vec![direct(dead)]), ("empty", Vec::new())],
        &token,
    )
    .await;
    for path in ["/", "/empty", "/missing"] {
        let request = format!("GET {path} HTTP/1.1\r\nHost: a.example\r\n\r\n");
        let answer = ask_in_time(address, request.as_bytes()).await;
        assert!(
            answer.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{path}: {answer}"
        );
    }
    assert_eq!(load(&shared.stats.ingress_unavailable), 3);
    assert_eq!(load(&shared.stats.ingress_requests), 3);
    token.cancel();
}

#[tokio::test]
async fn a_malformed_ingress_request_gets_400() {
    let token = CancellationToken::new();
    let (address, shared) = serve_ingress(web_ingress(), Vec::new(), &token).await;
    for request in [
        &b"\x16\x03\x01 not http\r\n\r\n"[..],
        b"GET / HTTP/1.1\r\n\r\n",
    ] {
        let answer = ask_in_time(address, request).await;
        assert!(
            answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
            "{answer}"
        );
    }
    assert_eq!(load(&shared.stats.ingress_bad_requests), 2);
    assert_eq!(load(&shared.stats.ingress_requests), 0);
    token.cancel();
}

#[tokio::test]
async fn an_ingress_connection_closed_before_a_request_gets_no_answer() {
    let token = CancellationToken::new();
    let (address, shared) = serve_ingress(web_ingress(), Vec::new(), &token).await;
    let answer = ask_in_time(address, b"").await;
    assert_eq!(answer, "");
    assert_eq!(load(&shared.stats.ingress_bad_requests), 0);
    let answer = ask_in_time(address, b"GET / HT").await;
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    token.cancel();
}

#[tokio::test]
async fn an_ingress_request_head_too_large_gets_431() {
    let token = CancellationToken::new();
    let (address, shared) = serve_ingress(web_ingress(), Vec::new(), &token).await;
    let mut request = b"GET / HTTP/1.1\r\nHost: a.example\r\nX-Padding: ".to_vec();
    request.resize(40 * 1024, b'x');
    let answer = ask_in_time(address, &request).await;
    assert!(
        answer.starts_with("HTTP/1.1 431 Request Header Fields Too Large\r\n"),
        "{answer}"
    );
    assert_eq!(load(&shared.stats.ingress_bad_requests), 1);
    token.cancel();
}
