use hickory_proto::rr::RData;
use serde_json::json;

use super::*;

fn services() -> Vec<Value> {
    vec![
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                "selector": {"app": "web"},
                "ports": [
                    {"name": "http", "port": 80, "targetPort": 8080},
                    {"name": "dns", "port": 53, "protocol": "UDP"}
                ]
            }
        }),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "db", "namespace": "prod"},
            "spec": {
                "clusterIP": "None", "selector": {"app": "db"},
                "ports": [{"name": "sql", "port": 5432}]
            }
        }),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "empty", "namespace": "prod"},
            "spec": {"clusterIP": "None", "selector": {"app": "none"}}
        }),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "search", "namespace": "default"},
            "spec": {"type": "ExternalName", "externalName": "Search.Example.COM."}
        }),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "alias", "namespace": "default"},
            "spec": {"type": "ExternalName", "externalName": "web.default.svc.cluster.local"}
        }),
        json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "broken"}, "spec": "not a spec"
        }),
    ]
}

fn endpoints() -> Vec<Value> {
    vec![json!({
        "apiVersion": "v1", "kind": "Endpoints",
        "metadata": {"name": "db", "namespace": "prod"},
        "subsets": [{
            "addresses": [
                {"ip": "10.244.1.5", "hostname": "db-0"},
                {"ip": "10.244.2.7"}
            ],
            "notReadyAddresses": [{"ip": "10.244.3.9"}],
            "ports": [{"name": "sql", "port": 15432, "protocol": "TCP"}]
        }]
    })]
}

fn table() -> NameTable {
    build(&services(), &endpoints())
}

fn name(text: &str) -> Name {
    Name::from_ascii(text).expect("a valid name")
}

/// The answer's records as readable text, e.g. `web.default.svc.cluster.local. A 10.96.0.10`.
fn lines(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .map(|record| {
            let data = match &record.data {
                RData::A(a) => format!("A {}", a.0),
                RData::AAAA(aaaa) => format!("AAAA {}", aaaa.0),
                RData::CNAME(cname) => format!("CNAME {}", cname.0),
                RData::SRV(srv) => format!(
                    "SRV {} {} {} {}",
                    srv.priority, srv.weight, srv.port, srv.target
                ),
                RData::SOA(soa) => format!("SOA {} {}", soa.mname, soa.minimum),
                other => format!("{other:?}"),
            };
            assert_eq!(
                record.ttl, TTL_SECONDS,
                "every record lives the table's TTL"
            );
            format!("{} {data}", record.name)
        })
        .collect()
}

/// (answers, additionals, alias outside) of a question that finds records.
fn records_of(
    table: &NameTable,
    question: &str,
    record_type: RecordType,
) -> (Vec<String>, Vec<String>, Option<Name>) {
    match table.answer(&name(question), record_type) {
        Answer::Records {
            answers,
            additionals,
            alias_outside,
        } => (lines(&answers), lines(&additionals), alias_outside),
        other => panic!("{question} {record_type}: expected records, got {other:?}"),
    }
}

#[test]
fn a_service_name_answers_its_cluster_ip() {
    let (answers, additionals, alias) =
        records_of(&table(), "web.default.svc.cluster.local.", RecordType::A);
    assert_eq!(answers, ["web.default.svc.cluster.local. A 10.96.0.10"]);
    assert!(additionals.is_empty());
    assert_eq!(alias, None);
}

#[test]
fn names_are_matched_without_regard_to_case_and_answered_in_the_askers_case() {
    let (answers, _, _) = records_of(&table(), "WEB.Default.SVC.cluster.local.", RecordType::A);
    assert_eq!(answers, ["WEB.Default.SVC.cluster.local. A 10.96.0.10"]);
}

#[test]
fn an_existing_name_without_records_of_the_type_answers_empty() {
    let (answers, _, _) = records_of(&table(), "web.default.svc.cluster.local.", RecordType::AAAA);
    assert!(answers.is_empty(), "{answers:?}");
    let (answers, _, _) = records_of(&table(), "web.default.svc.cluster.local.", RecordType::MX);
    assert!(answers.is_empty(), "{answers:?}");
}

#[test]
fn a_headless_service_answers_the_ready_addresses_of_its_endpoints() {
    let (answers, _, _) = records_of(&table(), "db.prod.svc.cluster.local.", RecordType::A);
    assert_eq!(
        answers,
        [
            "db.prod.svc.cluster.local. A 10.244.1.5",
            "db.prod.svc.cluster.local. A 10.244.2.7",
        ],
        "not-ready addresses are left out"
    );
}

#[test]
fn each_endpoint_of_a_headless_service_has_a_name_by_hostname_or_dashed_ip() {
    let table = table();
    let (by_hostname, _, _) = records_of(&table, "db-0.db.prod.svc.cluster.local.", RecordType::A);
    assert_eq!(
        by_hostname,
        ["db-0.db.prod.svc.cluster.local. A 10.244.1.5"]
    );
    let (by_ip, _, _) = records_of(
        &table,
        "10-244-2-7.db.prod.svc.cluster.local.",
        RecordType::A,
    );
    assert_eq!(
        by_ip,
        ["10-244-2-7.db.prod.svc.cluster.local. A 10.244.2.7"]
    );
    assert_eq!(
        table.answer(
            &name("10-244-3-9.db.prod.svc.cluster.local."),
            RecordType::A
        ),
        Answer::NoSuchName,
        "a not-ready endpoint has no name"
    );
}

#[test]
fn a_headless_service_without_ready_endpoints_exists_without_addresses() {
    let (answers, _, _) = records_of(&table(), "empty.prod.svc.cluster.local.", RecordType::A);
    assert!(answers.is_empty(), "{answers:?}");
}

#[test]
fn a_named_port_has_an_srv_record_to_the_service_name_with_its_address_added() {
    let table = table();
    let (answers, additionals, _) = records_of(
        &table,
        "_http._tcp.web.default.svc.cluster.local.",
        RecordType::SRV,
    );
    assert_eq!(
        answers,
        ["_http._tcp.web.default.svc.cluster.local. SRV 0 100 80 web.default.svc.cluster.local."]
    );
    assert_eq!(additionals, ["web.default.svc.cluster.local. A 10.96.0.10"]);
    let (udp, _, _) = records_of(
        &table,
        "_dns._udp.web.default.svc.cluster.local.",
        RecordType::SRV,
    );
    assert_eq!(
        udp,
        ["_dns._udp.web.default.svc.cluster.local. SRV 0 100 53 web.default.svc.cluster.local."]
    );
    assert_eq!(
        table.answer(
            &name("_dns._tcp.web.default.svc.cluster.local."),
            RecordType::SRV
        ),
        Answer::NoSuchName,
        "the protocol is part of the name"
    );
}

#[test]
fn an_srv_question_for_the_service_name_lists_every_port() {
    let (answers, _, _) = records_of(&table(), "web.default.svc.cluster.local.", RecordType::SRV);
    assert_eq!(
        answers,
        [
            "web.default.svc.cluster.local. SRV 0 50 53 web.default.svc.cluster.local.",
            "web.default.svc.cluster.local. SRV 0 50 80 web.default.svc.cluster.local.",
        ]
    );
}

#[test]
fn a_headless_named_port_has_one_srv_record_per_ready_endpoint_with_the_endpoint_port() {
    let (answers, additionals, _) = records_of(
        &table(),
        "_sql._tcp.db.prod.svc.cluster.local.",
        RecordType::SRV,
    );
    assert_eq!(
        answers,
        [
            "_sql._tcp.db.prod.svc.cluster.local. \
             SRV 0 50 15432 10-244-2-7.db.prod.svc.cluster.local.",
            "_sql._tcp.db.prod.svc.cluster.local. \
             SRV 0 50 15432 db-0.db.prod.svc.cluster.local.",
        ]
    );
    assert_eq!(
        additionals,
        [
            "10-244-2-7.db.prod.svc.cluster.local. A 10.244.2.7",
            "db-0.db.prod.svc.cluster.local. A 10.244.1.5",
        ]
    );
}

#[test]
fn an_external_name_service_answers_a_cname_and_leaves_the_target_to_upstream() {
    let table = table();
    let (answers, _, alias) =
        records_of(&table, "search.default.svc.cluster.local.", RecordType::A);
    assert_eq!(
        answers,
        ["search.default.svc.cluster.local. CNAME search.example.com."]
    );
    assert_eq!(alias, Some(name("search.example.com.")));
    let (cname, _, alias) = records_of(
        &table,
        "search.default.svc.cluster.local.",
        RecordType::CNAME,
    );
    assert_eq!(
        cname,
        ["search.default.svc.cluster.local. CNAME search.example.com."]
    );
    assert_eq!(alias, None, "a CNAME question needs nothing more");
}

#[test]
fn an_external_name_to_a_cluster_name_is_followed_inside_the_table() {
    let (answers, _, alias) =
        records_of(&table(), "alias.default.svc.cluster.local.", RecordType::A);
    assert_eq!(
        answers,
        [
            "alias.default.svc.cluster.local. CNAME web.default.svc.cluster.local.",
            "web.default.svc.cluster.local. A 10.96.0.10",
        ]
    );
    assert_eq!(alias, None);
}

#[test]
fn a_cluster_name_that_does_not_exist_is_no_such_name() {
    let table = table();
    for missing in [
        "nope.default.svc.cluster.local.",
        "web.other.svc.cluster.local.",
        "x.web.default.svc.cluster.local.",
        "web.default.cluster.local.",
        "nothing.cluster.local.",
    ] {
        assert_eq!(
            table.answer(&name(missing), RecordType::A),
            Answer::NoSuchName,
            "{missing}"
        );
    }
}

#[test]
fn parents_of_names_exist_without_records_and_the_apex_has_the_soa() {
    let table = table();
    for parent in [
        "default.svc.cluster.local.",
        "svc.cluster.local.",
        "_tcp.web.default.svc.cluster.local.",
        "prod.svc.cluster.local.",
    ] {
        let (answers, _, _) = records_of(&table, parent, RecordType::A);
        assert!(answers.is_empty(), "{parent}: {answers:?}");
    }
    let (apex, _, _) = records_of(&table, "cluster.local.", RecordType::SOA);
    assert_eq!(apex, ["cluster.local. SOA ns.dns.cluster.local. 5"]);
}

#[test]
fn a_dashed_pod_name_answers_its_address() {
    let table = table();
    let (answers, _, _) = records_of(&table, "10-244-1-5.prod.pod.cluster.local.", RecordType::A);
    assert_eq!(answers, ["10-244-1-5.prod.pod.cluster.local. A 10.244.1.5"]);
    let (parent, _, _) = records_of(&table, "prod.pod.cluster.local.", RecordType::A);
    assert!(parent.is_empty());
    assert_eq!(
        table.answer(&name("10-244-1-300.prod.pod.cluster.local."), RecordType::A),
        Answer::NoSuchName
    );
}

#[test]
fn names_outside_the_cluster_domain_are_not_the_tables() {
    let table = table();
    for outside in ["example.com.", "cluster.local.example.com.", "local.", "."] {
        assert_eq!(
            table.answer(&name(outside), RecordType::A),
            Answer::Outside,
            "{outside}"
        );
    }
}

#[test]
fn the_table_follows_the_services_it_is_built_from() {
    assert_eq!(build(&[], &[]), NameTable::default());
    let mut changed = services();
    changed[0]["spec"]["clusterIP"] = json!("10.96.0.11");
    changed[0]["spec"]["clusterIPs"] = json!(["10.96.0.11"]);
    let table = build(&changed, &endpoints());
    assert_ne!(table, self::table());
    let (answers, _, _) = records_of(&table, "web.default.svc.cluster.local.", RecordType::A);
    assert_eq!(answers, ["web.default.svc.cluster.local. A 10.96.0.11"]);
}
