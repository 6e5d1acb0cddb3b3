//! The shell on 127.0.0.1: forwarding to fake upstreams, and the UDP and TCP listeners.

use std::str::FromStr;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use serde_json::json;

use super::*;

fn query(name: &str, record_type: RecordType) -> Message {
    let mut message = Message::query();
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(
        Name::from_str(name).expect("a valid name"),
        record_type,
    ));
    message
}

fn bytes(message: &Message) -> Vec<u8> {
    message.to_vec().expect("the message encodes")
}

/// The reply an upstream gives to `request`: one A record per address of `addresses`.
fn upstream_reply(request: &Message, addresses: &[&str]) -> Message {
    let mut reply = Message::response(request.metadata.id, OpCode::Query);
    reply.metadata.recursion_available = true;
    reply.add_queries(request.queries.iter().cloned());
    for address in addresses {
        reply.add_answer(Record::from_rdata(
            request.queries[0].name().clone(),
            60,
            RData::A(A(address.parse().expect("an address"))),
        ));
    }
    reply
}

fn addresses(message: &Message) -> Vec<String> {
    message
        .answers
        .iter()
        .filter_map(|record| match &record.data {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

/// A fake upstream on 127.0.0.1 answering over UDP `requests` requests: first with a
/// datagram that is no reply (another id), then with `reply_to(request)`.
async fn fake_upstream(
    requests: usize,
    reply_to: fn(&Message) -> Message,
) -> (SocketAddr, JoinHandle<Vec<Message>>) {
    let socket = UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind the fake upstream");
    let address = socket.local_addr().expect("its address");
    let task = tokio::spawn(async move {
        let mut seen = Vec::new();
        let mut buffer = vec![0u8; 4096];
        for _ in 0..requests {
            let (length, client) = socket.recv_from(&mut buffer).await.expect("a request");
            let request = Message::from_vec(&buffer[..length]).expect("the request parses");
            let mut stray = reply_to(&request);
            stray.metadata.id = request.metadata.id.wrapping_add(1);
            socket
                .send_to(&bytes(&stray), client)
                .await
                .expect("send the stray datagram");
            socket
                .send_to(&bytes(&reply_to(&request)), client)
                .await
                .expect("send the reply");
            seen.push(request);
        }
        seen
    });
    (address, task)
}

fn shared_with(upstreams: Vec<SocketAddr>, timeout: Duration) -> Arc<Shared> {
    let shared = Shared::new(timeout);
    write(&shared.upstreams, Arc::new(upstreams));
    let services = [
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "echo", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.20", "ports": [{"port": 80}]}
        }),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "search", "namespace": "default"},
            "spec": {"type": "ExternalName", "externalName": "search.example.com"}
        }),
    ];
    write(&shared.table, Arc::new(records::build(&services, &[])));
    Arc::new(shared)
}

#[tokio::test]
async fn a_name_outside_the_cluster_is_forwarded_and_the_upstream_reply_relayed() {
    let (upstream, fake) =
        fake_upstream(1, |request| upstream_reply(request, &["192.0.2.1"])).await;
    let shared = shared_with(vec![upstream], Duration::from_secs(2));
    let request = query("www.example.com.", RecordType::A);
    let reply = respond(&shared, &bytes(&request), Transport::Udp)
        .await
        .expect("a reply");
    let reply = Message::from_vec(&reply).expect("the reply parses");
    assert_eq!(reply.metadata.id, request.metadata.id);
    assert_eq!(reply.metadata.response_code, ResponseCode::NoError);
    assert!(
        !reply.metadata.authoritative,
        "relayed as the upstream sent it"
    );
    assert_eq!(addresses(&reply), ["192.0.2.1"]);
    let seen = fake.await.expect("the fake upstream ends");
    assert_eq!(
        seen[0].queries, request.queries,
        "the request went upstream as it was"
    );
}

#[tokio::test]
async fn an_upstream_that_does_not_answer_in_time_gives_servfail() {
    let silent = UdpSocket::bind("127.0.0.1:0").await.expect("bind");
    let shared = shared_with(
        vec![silent.local_addr().expect("address")],
        Duration::from_millis(300),
    );
    let request = query("www.example.com.", RecordType::A);
    let started = std::time::Instant::now();
    let reply = respond(&shared, &bytes(&request), Transport::Udp)
        .await
        .expect("a reply");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let reply = Message::from_vec(&reply).expect("the reply parses");
    assert_eq!(reply.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(reply.metadata.id, request.metadata.id);
}

#[tokio::test]
async fn without_upstreams_an_outside_name_gives_servfail_and_cluster_names_still_answer() {
    let shared = shared_with(Vec::new(), Duration::from_secs(2));
    let outside = respond(
        &shared,
        &bytes(&query("www.example.com.", RecordType::A)),
        Transport::Udp,
    )
    .await
    .expect("a reply");
    assert_eq!(
        Message::from_vec(&outside)
            .expect("parses")
            .metadata
            .response_code,
        ResponseCode::ServFail
    );
    let inside = respond(
        &shared,
        &bytes(&query("echo.default.svc.cluster.local.", RecordType::A)),
        Transport::Udp,
    )
    .await
    .expect("a reply");
    assert_eq!(
        addresses(&Message::from_vec(&inside).expect("parses")),
        ["10.96.0.20"]
    );
}

#[tokio::test]
async fn an_external_name_gets_its_cname_and_the_targets_addresses_from_upstream() {
    let (upstream, fake) =
        fake_upstream(1, |request| upstream_reply(request, &["192.0.2.80"])).await;
    let shared = shared_with(vec![upstream], Duration::from_secs(2));
    let request = query("search.default.svc.cluster.local.", RecordType::A);
    let reply = respond(&shared, &bytes(&request), Transport::Udp)
        .await
        .expect("a reply");
    let reply = Message::from_vec(&reply).expect("the reply parses");
    assert_eq!(reply.metadata.id, request.metadata.id);
    assert!(reply.metadata.authoritative);
    assert_eq!(reply.answers[0].record_type(), RecordType::CNAME);
    assert_eq!(addresses(&reply), ["192.0.2.80"]);
    let seen = fake.await.expect("the fake upstream ends");
    assert_eq!(
        seen[0].queries[0].name(),
        &Name::from_str("search.example.com.").expect("name")
    );
}

#[tokio::test]
async fn a_truncated_upstream_reply_is_asked_again_over_tcp_for_a_tcp_client() {
    // The fake upstream's UDP reply is truncated; over TCP (same port) it is whole.
    let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind UDP");
    let address = udp.local_addr().expect("address");
    let tcp = TcpListener::bind(address)
        .await
        .expect("bind TCP on the same port");
    let fake = tokio::spawn(async move {
        let mut buffer = vec![0u8; 4096];
        let (length, client) = udp.recv_from(&mut buffer).await.expect("a UDP request");
        let request = Message::from_vec(&buffer[..length]).expect("parses");
        let mut truncated = upstream_reply(&request, &[]);
        truncated.metadata.truncation = true;
        udp.send_to(&bytes(&truncated), client).await.expect("send");
        let (mut stream, _) = tcp.accept().await.expect("a TCP connection");
        let length = stream.read_u16().await.expect("a length");
        let mut request = vec![0u8; usize::from(length)];
        stream.read_exact(&mut request).await.expect("a request");
        let request = Message::from_vec(&request).expect("parses");
        let whole = bytes(&upstream_reply(&request, &["192.0.2.7", "192.0.2.8"]));
        let length = u16::try_from(whole.len()).expect("fits");
        stream.write_all(&length.to_be_bytes()).await.expect("send");
        stream.write_all(&whole).await.expect("send");
    });
    let shared = shared_with(vec![address], Duration::from_secs(2));
    let request = query("big.example.com.", RecordType::A);
    let reply = respond(&shared, &bytes(&request), Transport::Tcp)
        .await
        .expect("a reply");
    let reply = Message::from_vec(&reply).expect("the reply parses");
    assert!(!reply.metadata.truncation);
    assert_eq!(addresses(&reply), ["192.0.2.7", "192.0.2.8"]);
    fake.await.expect("the fake upstream ends");
}

#[tokio::test]
async fn the_listeners_answer_over_udp_and_over_tcp_until_stopped() {
    let shared = shared_with(Vec::new(), Duration::from_secs(2));
    let stop = CancellationToken::new();
    let udp = UdpSocket::bind("127.0.0.1:0").await.expect("bind UDP");
    let udp_address = udp.local_addr().expect("address");
    let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind TCP");
    let tcp_address = tcp.local_addr().expect("address");
    let udp_task = tokio::spawn(serve_udp(Arc::new(udp), shared.clone(), stop.clone()));
    let tcp_task = tokio::spawn(serve_tcp(tcp, shared.clone(), stop.clone()));

    let client = UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("bind the client");
    let request = query("echo.default.svc.cluster.local.", RecordType::A);
    client
        .send_to(&bytes(&request), udp_address)
        .await
        .expect("send over UDP");
    let mut buffer = vec![0u8; 4096];
    let length = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buffer))
        .await
        .expect("a UDP reply within 5 s")
        .expect("receive");
    let reply = Message::from_vec(&buffer[..length]).expect("parses");
    assert_eq!(reply.metadata.message_type, MessageType::Response);
    assert_eq!(addresses(&reply), ["10.96.0.20"]);

    // Two requests on one TCP connection.
    let mut stream = TcpStream::connect(tcp_address).await.expect("connect");
    for name in [
        "echo.default.svc.cluster.local.",
        "nope.default.svc.cluster.local.",
    ] {
        let request = bytes(&query(name, RecordType::A));
        let length = u16::try_from(request.len()).expect("fits");
        stream.write_all(&length.to_be_bytes()).await.expect("send");
        stream.write_all(&request).await.expect("send");
    }
    let mut codes = Vec::new();
    for _ in 0..2 {
        let length = tokio::time::timeout(Duration::from_secs(5), stream.read_u16())
            .await
            .expect("a TCP reply within 5 s")
            .expect("a length");
        let mut reply = vec![0u8; usize::from(length)];
        stream.read_exact(&mut reply).await.expect("the reply");
        codes.push(
            Message::from_vec(&reply)
                .expect("parses")
                .metadata
                .response_code,
        );
    }
    assert_eq!(codes, [ResponseCode::NoError, ResponseCode::NXDomain]);

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(5), async {
        udp_task.await.expect("the UDP task ends");
        tcp_task.await.expect("the TCP task ends");
    })
    .await
    .expect("the listeners stop within 5 s");
}
