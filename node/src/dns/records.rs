//! The cluster's names (what CoreDNS's `kubernetes` plugin serves), a pure function of the
//! Services and Endpoints this node sees:
//!
//! - `<svc>.<ns>.svc.cluster.local`: A → the Service's cluster IP; for a headless Service
//!   (`clusterIP: None`) the ready addresses of its Endpoints, several A records; for an
//!   ExternalName Service a CNAME to `spec.externalName` (followed when it is a cluster name).
//! - `<endpoint>.<svc>.<ns>.svc.cluster.local`, headless Services only: A → one ready address;
//!   `<endpoint>` is the address's `hostname` or else its IP with `-` for `.`.
//! - `_<port>._<proto>.<svc>.<ns>.svc.cluster.local`, for every named port: SRV → the Service
//!   name and port (headless: one record per ready endpoint, its name and endpoint port);
//!   an SRV question for the Service name itself lists every port.
//! - `<a-b-c-d>.<ns>.pod.cluster.local`: A → a.b.c.d (CoreDNS's `pods insecure`).
//!
//! A name under `cluster.local` that is none of these and no parent of one does not exist
//! (NXDOMAIN); a name that exists without records of the asked type answers empty (NODATA),
//! AAAA for a cluster IP for example. Other names are not the table's ([`Answer::Outside`]).
//! Every record lives [`TTL_SECONDS`]; negative answers carry the zone's SOA ([`soa`]).

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use hickory_proto::rr::rdata::{A, AAAA, CNAME, SOA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use k8s_openapi::api::core::v1::{Endpoints, Service};
use serde_json::Value;

/// The cluster domain every name of the table ends with.
pub(crate) const CLUSTER_DOMAIN: &str = "cluster.local";
/// How long clients may keep the table's answers, negative ones included.
pub(crate) const TTL_SECONDS: u32 = 5;
/// CNAMEs followed inside the table for one answer.
const MAX_ALIAS_HOPS: usize = 8;

/// One SRV record of a name: the port and the name of the host serving it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct ServiceTarget {
    port: u16,
    target: String,
}

/// The records of one name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct NameRecords {
    addresses: BTreeSet<IpAddr>,
    /// The canonical name (ExternalName), lower case, without the final dot.
    alias: Option<String>,
    services: BTreeSet<ServiceTarget>,
}

/// Every cluster name with its records; names are lower case, without the final dot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct NameTable {
    names: BTreeMap<String, NameRecords>,
    /// Parents of names (`default.svc.cluster.local`, `_tcp.web.default.svc.cluster.local`):
    /// they exist, with no records.
    parents: BTreeSet<String>,
}

/// What the table says about a question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    /// Not a cluster name: the upstream resolvers answer it.
    Outside,
    /// A cluster name that does not exist (NXDOMAIN).
    NoSuchName,
    /// The name exists; `answers` empty means it has no records of the asked type (NODATA).
    Records {
        answers: Vec<Record>,
        /// The addresses of SRV targets.
        additionals: Vec<Record>,
        /// The answer ends in a CNAME to a name outside the cluster, whose records of the asked
        /// type the caller may add from upstream.
        alias_outside: Option<Name>,
    },
}

/// Where a name is, as the table sees it.
enum Place<'a> {
    Outside,
    Missing,
    /// The apex or a parent of names: it exists, without records.
    Empty,
    Found(Cow<'a, NameRecords>),
}

/// `name` as a table key: lower case, without the final dot.
fn key_of(name: &Name) -> String {
    name.to_lowercase()
        .to_ascii()
        .trim_end_matches('.')
        .to_owned()
}

fn is_cluster_name(key: &str) -> bool {
    key == CLUSTER_DOMAIN || key.ends_with(&format!(".{CLUSTER_DOMAIN}"))
}

/// A key as a fully qualified name; `None` when it is no valid name.
fn fqdn(key: &str) -> Option<Name> {
    Name::from_ascii(format!("{key}.")).ok()
}

/// The address an `a-b-c-d` label spells.
fn dashed_address(label: &str) -> Option<Ipv4Addr> {
    let octets: Vec<u8> = label
        .split('-')
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let [a, b, c, d] = octets.as_slice() else {
        return None;
    };
    Some(Ipv4Addr::new(*a, *b, *c, *d))
}

/// The label of an endpoint address: its hostname, else its IP with `-` for `.` and `:`.
fn endpoint_label(hostname: Option<&str>, ip: IpAddr) -> String {
    match hostname.filter(|h| !h.is_empty()) {
        Some(hostname) => hostname.to_ascii_lowercase(),
        None => ip.to_string().replace(['.', ':'], "-"),
    }
}

/// The protocol label of an SRV name: `tcp`, `udp` or `sctp`.
fn protocol_label(protocol: Option<&str>) -> String {
    protocol
        .filter(|p| !p.is_empty())
        .unwrap_or("TCP")
        .to_ascii_lowercase()
}

fn namespace_and_name(
    metadata: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
) -> Option<(String, String)> {
    Some((
        metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        metadata.name.clone()?,
    ))
}

/// The zone's SOA record (owner `cluster.local.`), for negative answers and SOA questions.
pub(crate) fn soa() -> Option<Record> {
    let apex = fqdn(CLUSTER_DOMAIN)?;
    let primary = fqdn(&format!("ns.dns.{CLUSTER_DOMAIN}"))?;
    let mailbox = fqdn(&format!("hostmaster.{CLUSTER_DOMAIN}"))?;
    Some(Record::from_rdata(
        apex,
        TTL_SECONDS,
        RData::SOA(SOA::new(
            primary,
            mailbox,
            1,
            7200,
            1800,
            86400,
            TTL_SECONDS,
        )),
    ))
}

/// The name table of the cluster's Services and Endpoints (stored JSON; objects that do not
/// parse are left out).
pub(crate) fn build(services: &[Value], endpoints: &[Value]) -> NameTable {
    let endpoints: HashMap<(String, String), Endpoints> = endpoints
        .iter()
        .filter_map(|object| serde_json::from_value::<Endpoints>(object.clone()).ok())
        .filter_map(|endpoints| Some((namespace_and_name(&endpoints.metadata)?, endpoints)))
        .collect();
    let mut table = NameTable::default();
    for object in services {
        let Ok(service) = serde_json::from_value::<Service>(object.clone()) else {
            continue;
        };
        let (Some(key), Some(spec)) = (namespace_and_name(&service.metadata), &service.spec) else {
            continue;
        };
        let base = format!("{}.{}.svc.{CLUSTER_DOMAIN}", key.1, key.0).to_ascii_lowercase();
        table.names.entry(base.clone()).or_default();
        if spec.type_.as_deref() == Some("ExternalName") {
            if let Some(target) = spec
                .external_name
                .as_deref()
                .map(|name| name.trim_end_matches('.').to_ascii_lowercase())
                .filter(|name| !name.is_empty())
            {
                table.entry(&base).alias = Some(target);
            }
            continue;
        }
        let ports = spec.ports.as_deref().unwrap_or_default();
        if spec.cluster_ip.as_deref() == Some("None") {
            table.add_headless(&base, endpoints.get(&key));
            continue;
        }
        let cluster_ips: Vec<IpAddr> = match &spec.cluster_ips {
            Some(ips) if !ips.is_empty() => ips.iter().filter_map(|ip| ip.parse().ok()).collect(),
            _ => spec
                .cluster_ip
                .as_deref()
                .and_then(|ip| ip.parse().ok())
                .into_iter()
                .collect(),
        };
        table.entry(&base).addresses.extend(cluster_ips);
        for port in ports {
            let Ok(number) = u16::try_from(port.port) else {
                continue;
            };
            table.add_service(
                &base,
                port.name.as_deref(),
                port.protocol.as_deref(),
                number,
                &base,
            );
        }
    }
    let names: Vec<String> = table.names.keys().cloned().collect();
    for name in names {
        let mut rest = name.as_str();
        while let Some((_, parent)) = rest.split_once('.') {
            if parent == CLUSTER_DOMAIN {
                break;
            }
            table.parents.insert(parent.to_owned());
            rest = parent;
        }
    }
    table
}

impl NameTable {
    fn entry(&mut self, name: &str) -> &mut NameRecords {
        self.names.entry(name.to_owned()).or_default()
    }

    /// SRV records of a port: on `base` always, on `_<name>._<proto>.<base>` when it is named.
    fn add_service(
        &mut self,
        base: &str,
        port_name: Option<&str>,
        protocol: Option<&str>,
        port: u16,
        target: &str,
    ) {
        let record = ServiceTarget {
            port,
            target: target.to_owned(),
        };
        self.entry(base).services.insert(record.clone());
        if let Some(port_name) = port_name.filter(|name| !name.is_empty()) {
            let name = format!(
                "_{}._{}.{base}",
                port_name.to_ascii_lowercase(),
                protocol_label(protocol)
            );
            self.entry(&name).services.insert(record);
        }
    }

    /// A headless Service's names: its ready endpoint addresses, one name per endpoint, and
    /// SRV records to those names.
    fn add_headless(&mut self, base: &str, endpoints: Option<&Endpoints>) {
        for subset in endpoints
            .and_then(|endpoints| endpoints.subsets.as_ref())
            .into_iter()
            .flatten()
        {
            for address in subset.addresses.iter().flatten() {
                let Ok(ip) = address.ip.parse::<IpAddr>() else {
                    continue;
                };
                let endpoint =
                    format!("{}.{base}", endpoint_label(address.hostname.as_deref(), ip));
                self.entry(base).addresses.insert(ip);
                self.entry(&endpoint).addresses.insert(ip);
                for port in subset.ports.iter().flatten() {
                    let Ok(number) = u16::try_from(port.port) else {
                        continue;
                    };
                    self.add_service(
                        base,
                        port.name.as_deref(),
                        port.protocol.as_deref(),
                        number,
                        &endpoint,
                    );
                }
            }
        }
    }

    fn place(&self, key: &str) -> Place<'_> {
        if !is_cluster_name(key) {
            return Place::Outside;
        }
        if key == CLUSTER_DOMAIN {
            return Place::Empty;
        }
        if let Some(records) = self.names.get(key) {
            return Place::Found(Cow::Borrowed(records));
        }
        if self.parents.contains(key) {
            return Place::Empty;
        }
        // `<a-b-c-d>.<ns>.pod.cluster.local`, and its parents.
        let labels: Vec<&str> = key.split('.').collect();
        match labels.as_slice() {
            [_, "pod", _, _] | ["pod", _, _] => Place::Empty,
            [address, _, "pod", _, _] => match dashed_address(address) {
                Some(ip) => Place::Found(Cow::Owned(NameRecords {
                    addresses: BTreeSet::from([IpAddr::V4(ip)]),
                    ..NameRecords::default()
                })),
                None => Place::Missing,
            },
            _ => Place::Missing,
        }
    }

    /// The table's answer to a question for `name` of `record_type`.
    pub(crate) fn answer(&self, name: &Name, record_type: RecordType) -> Answer {
        let key = key_of(name);
        let mut answers = Vec::new();
        let mut additionals = Vec::new();
        let mut alias_outside = None;
        match self.place(&key) {
            Place::Outside => return Answer::Outside,
            Place::Missing => return Answer::NoSuchName,
            Place::Empty => {
                if key == CLUSTER_DOMAIN && matches!(record_type, RecordType::SOA | RecordType::ANY)
                {
                    answers.extend(soa());
                }
            }
            Place::Found(records) => {
                alias_outside = self.collect(
                    name,
                    &records,
                    record_type,
                    &mut answers,
                    &mut additionals,
                    0,
                );
            }
        }
        Answer::Records {
            answers,
            additionals,
            alias_outside,
        }
    }

    /// Adds the records of `owner` of `record_type` (following CNAMEs inside the table);
    /// returns the alias outside the cluster the answer ends in, if any.
    fn collect(
        &self,
        owner: &Name,
        records: &NameRecords,
        record_type: RecordType,
        answers: &mut Vec<Record>,
        additionals: &mut Vec<Record>,
        hops: usize,
    ) -> Option<Name> {
        if let Some(alias) = &records.alias {
            let target = fqdn(alias)?;
            answers.push(Record::from_rdata(
                owner.clone(),
                TTL_SECONDS,
                RData::CNAME(CNAME(target.clone())),
            ));
            if matches!(record_type, RecordType::CNAME | RecordType::ANY) {
                return None;
            }
            if !is_cluster_name(alias) {
                return Some(target);
            }
            if hops >= MAX_ALIAS_HOPS {
                return None;
            }
            return match self.place(alias) {
                Place::Found(next) => {
                    self.collect(&target, &next, record_type, answers, additionals, hops + 1)
                }
                _ => None,
            };
        }
        let wants = |asked: RecordType| record_type == asked || record_type == RecordType::ANY;
        if wants(RecordType::A) || wants(RecordType::AAAA) {
            answers.extend(
                records
                    .addresses
                    .iter()
                    .filter(|ip| match ip {
                        IpAddr::V4(_) => wants(RecordType::A),
                        IpAddr::V6(_) => wants(RecordType::AAAA),
                    })
                    .map(|ip| address_record(owner.clone(), *ip)),
            );
        }
        if wants(RecordType::SRV) && !records.services.is_empty() {
            let weight = u16::try_from(100 / records.services.len())
                .unwrap_or(1)
                .max(1);
            let mut targets = BTreeSet::new();
            for service in &records.services {
                let Some(target) = fqdn(&service.target) else {
                    continue;
                };
                answers.push(Record::from_rdata(
                    owner.clone(),
                    TTL_SECONDS,
                    RData::SRV(SRV::new(0, weight, service.port, target.clone())),
                ));
                if targets.insert(service.target.clone()) {
                    if let Some(target_records) = self.names.get(&service.target) {
                        additionals.extend(
                            target_records
                                .addresses
                                .iter()
                                .map(|ip| address_record(target.clone(), *ip)),
                        );
                    }
                }
            }
        }
        None
    }
}

fn address_record(owner: Name, ip: IpAddr) -> Record {
    let data = match ip {
        IpAddr::V4(ip) => RData::A(A(ip)),
        IpAddr::V6(ip) => RData::AAAA(AAAA(ip)),
    };
    Record::from_rdata(owner, TTL_SECONDS, data)
}

#[cfg(test)]
mod tests;
