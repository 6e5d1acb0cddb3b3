use std::str::FromStr;

use hickory_proto::rr::RData;
use serde_json::{json, Value};

use super::*;

fn table() -> NameTable {
    let services = vec![
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "echo", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.20", "ports": [{"name": "http", "port": 80}]}
        }),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "search", "namespace": "default"},
            "spec": {"type": "ExternalName", "externalName": "search.example.com"}
        }),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "many", "namespace": "default"},
            "spec": {"clusterIP": "None"}
        }),
    ];
    // A headless Service with 60 ready endpoints: its A answer is longer than 512 bytes.
    let addresses: Vec<Value> = (1..=60)
        .map(|host| json!({"ip": format!("10.244.0.{host}")}))
        .collect();
    let endpoints = vec![json!({
        "apiVersion": "v1", "kind": "Endpoints",
        "metadata": {"name": "many", "namespace": "default"},
        "subsets": [{"addresses": addresses}]
    })];
    records::build(&services, &endpoints)
}

fn query(name: &str, record_type: RecordType) -> Message {
    let mut message = Message::query();
    message.metadata.id = 4242;
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(
        Name::from_str(name).expect("name"),
        record_type,
    ));
    message
}

fn bytes(message: &Message) -> Vec<u8> {
    message.to_vec().expect("the message encodes")
}

/// The response the table gives at once to `request` over `transport`.
fn respond(request: &Message, transport: Transport) -> Message {
    match decide(&table(), &bytes(request), transport) {
        Decision::Respond(bytes) => Message::from_vec(&bytes).expect("the response parses"),
        other => panic!("expected a response, got {other:?}"),
    }
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

#[test]
fn a_service_question_gets_an_authoritative_answer_with_the_cluster_ip() {
    let request = query("echo.default.svc.cluster.local.", RecordType::A);
    let response = respond(&request, Transport::Udp);
    assert_eq!(response.metadata.id, 4242);
    assert_eq!(response.metadata.message_type, MessageType::Response);
    assert_eq!(response.metadata.response_code, ResponseCode::NoError);
    assert!(response.metadata.authoritative);
    assert!(response.metadata.recursion_desired, "RD is copied");
    assert!(response.metadata.recursion_available);
    assert_eq!(response.queries, request.queries);
    assert_eq!(addresses(&response), ["10.96.0.20"]);
    assert_eq!(response.answers[0].ttl, records::TTL_SECONDS);
    assert!(response.authorities.is_empty());
    assert!(response.edns.is_none(), "no EDNS asked, none given");
}

#[test]
fn a_missing_cluster_name_gets_nxdomain_with_the_zone_soa() {
    let response = respond(
        &query("nope.default.svc.cluster.local.", RecordType::A),
        Transport::Udp,
    );
    assert_eq!(response.metadata.response_code, ResponseCode::NXDomain);
    assert!(response.metadata.authoritative);
    assert!(response.answers.is_empty());
    assert_eq!(response.authorities.len(), 1);
    assert_eq!(response.authorities[0].record_type(), RecordType::SOA);
}

#[test]
fn a_type_the_name_lacks_gets_noerror_without_answers_and_the_soa() {
    let response = respond(
        &query("echo.default.svc.cluster.local.", RecordType::AAAA),
        Transport::Udp,
    );
    assert_eq!(response.metadata.response_code, ResponseCode::NoError);
    assert!(response.answers.is_empty());
    assert_eq!(response.authorities.len(), 1);
    assert_eq!(response.authorities[0].record_type(), RecordType::SOA);
}

#[test]
fn an_srv_question_gets_the_target_address_as_additional() {
    let response = respond(
        &query(
            "_http._tcp.echo.default.svc.cluster.local.",
            RecordType::SRV,
        ),
        Transport::Udp,
    );
    assert_eq!(response.answers.len(), 1);
    match &response.answers[0].data {
        RData::SRV(srv) => {
            assert_eq!(srv.port, 80);
            assert_eq!(
                srv.target,
                Name::from_str("echo.default.svc.cluster.local.").expect("name")
            );
        }
        other => panic!("expected SRV, got {other:?}"),
    }
    assert_eq!(response.additionals.len(), 1);
}

#[test]
fn edns_in_the_request_gets_edns_in_the_response() {
    let mut request = query("echo.default.svc.cluster.local.", RecordType::A);
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    request.set_edns(edns);
    let response = respond(&request, Transport::Udp);
    assert_eq!(
        response.edns.as_ref().map(Edns::max_payload),
        Some(OFFERED_UDP_PAYLOAD_BYTES)
    );
}

#[test]
fn an_answer_too_long_for_udp_is_truncated_and_whole_over_tcp_or_with_a_larger_edns_payload() {
    let request = query("many.default.svc.cluster.local.", RecordType::A);
    let over_udp = respond(&request, Transport::Udp);
    assert!(over_udp.metadata.truncation);
    assert!(over_udp.answers.is_empty());
    let over_tcp = respond(&request, Transport::Tcp);
    assert!(!over_tcp.metadata.truncation);
    assert_eq!(addresses(&over_tcp).len(), 60);
    let mut large = request.clone();
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    large.set_edns(edns);
    let with_edns = respond(&large, Transport::Udp);
    assert!(!with_edns.metadata.truncation);
    assert_eq!(addresses(&with_edns).len(), 60);
}

#[test]
fn a_name_outside_the_cluster_is_forwarded_with_servfail_ready() {
    let request = query("example.com.", RecordType::A);
    match decide(&table(), &bytes(&request), Transport::Udp) {
        Decision::Forward {
            request: parsed,
            failure,
        } => {
            assert_eq!(parsed.queries, request.queries);
            let failure = Message::from_vec(&failure).expect("the failure parses");
            assert_eq!(failure.metadata.response_code, ResponseCode::ServFail);
            assert_eq!(failure.metadata.id, 4242);
            assert!(!failure.metadata.authoritative);
        }
        other => panic!("expected forwarding, got {other:?}"),
    }
}

#[test]
fn an_external_name_is_answered_with_its_cname_and_the_target_chased_upstream() {
    let request = query("search.default.svc.cluster.local.", RecordType::A);
    let Decision::Chase {
        response,
        target,
        record_type,
        ..
    } = decide(&table(), &bytes(&request), Transport::Udp)
    else {
        panic!("expected a chase");
    };
    assert_eq!(target, Name::from_str("search.example.com.").expect("name"));
    assert_eq!(record_type, RecordType::A);
    let chase = chase_query(&target, record_type);
    assert!(chase.metadata.recursion_desired);
    assert_eq!(chase.queries[0].name(), &target);

    let mut upstream_reply = Message::response(chase.metadata.id, OpCode::Query);
    upstream_reply.add_query(chase.queries[0].clone());
    upstream_reply.add_answer(Record::from_rdata(
        target.clone(),
        300,
        RData::A(hickory_proto::rr::rdata::A(
            "192.0.2.80".parse().expect("ip"),
        )),
    ));
    let finished = finish_chase(*response.clone(), Some(&bytes(&upstream_reply)));
    assert_eq!(finished.answers.len(), 2);
    assert_eq!(finished.answers[0].record_type(), RecordType::CNAME);
    assert_eq!(addresses(&finished), ["192.0.2.80"]);

    let unanswered = finish_chase(*response, None);
    assert_eq!(
        unanswered.answers.len(),
        1,
        "without upstream, the CNAME alone"
    );
}

#[test]
fn malformed_requests_get_formerr_and_non_queries_are_ignored() {
    let mut garbage = bytes(&query("echo.default.svc.cluster.local.", RecordType::A));
    garbage.truncate(garbage.len() - 3);
    match decide(&table(), &garbage, Transport::Udp) {
        Decision::Respond(bytes) => {
            let response = Message::from_vec(&bytes).expect("parses");
            assert_eq!(response.metadata.response_code, ResponseCode::FormErr);
            assert_eq!(response.metadata.id, 4242);
        }
        other => panic!("expected FORMERR, got {other:?}"),
    }
    assert!(matches!(
        decide(&table(), &[1, 2, 3], Transport::Udp),
        Decision::Ignore
    ));

    let mut reply = query("echo.default.svc.cluster.local.", RecordType::A);
    reply.metadata.message_type = MessageType::Response;
    assert!(matches!(
        decide(&table(), &bytes(&reply), Transport::Udp),
        Decision::Ignore
    ));

    let mut two = query("echo.default.svc.cluster.local.", RecordType::A);
    two.add_query(Query::query(
        Name::from_str("example.com.").expect("name"),
        RecordType::A,
    ));
    assert_eq!(
        respond(&two, Transport::Udp).metadata.response_code,
        ResponseCode::FormErr
    );

    let mut notify = query("echo.default.svc.cluster.local.", RecordType::SOA);
    notify.metadata.op_code = OpCode::Notify;
    assert_eq!(
        respond(&notify, Transport::Udp).metadata.response_code,
        ResponseCode::NotImp
    );
}

#[test]
fn a_cluster_name_in_another_class_is_refused() {
    let mut request = query("echo.default.svc.cluster.local.", RecordType::A);
    request.queries[0].set_query_class(DNSClass::CH);
    let response = respond(&request, Transport::Udp);
    assert_eq!(response.metadata.response_code, ResponseCode::Refused);
    assert!(response.answers.is_empty());
}
