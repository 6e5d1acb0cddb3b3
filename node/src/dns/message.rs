//! One DNS request, from its bytes to what the server does with it (pure): answer it from the
//! name table, forward it to the upstream resolvers, or answer it from the table and add an
//! ExternalName target's records from upstream. Messages are parsed and written by
//! hickory-proto.
//!
//! Answers for cluster names are authoritative (AA), carry the zone's SOA when negative, and
//! echo EDNS when the request had it. Over UDP an answer longer than the client takes (512
//! bytes, or its EDNS payload size) is sent truncated (TC), with no records, so the client asks
//! again over TCP. Requests that are responses, or not even a header, are ignored; requests
//! that do not parse get FORMERR, other opcodes NOTIMP.

use hickory_proto::op::{
    Edns, Header, Message, MessageType, Metadata, OpCode, Query, ResponseCode,
};
use hickory_proto::rr::{DNSClass, Name, Record, RecordType};
use hickory_proto::serialize::binary::{BinDecodable, BinDecoder};

use super::records::{self, Answer, NameTable};

/// The UDP payload size every client takes (RFC 1035).
const MIN_UDP_PAYLOAD_BYTES: u16 = 512;
/// The largest UDP answer this server sends, whatever the client offers.
const MAX_UDP_PAYLOAD_BYTES: u16 = 4096;
/// The payload size this server offers in its EDNS record (RFC 9715's advice).
const OFFERED_UDP_PAYLOAD_BYTES: u16 = 1232;

/// How a request reached the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Transport {
    Udp,
    Tcp,
}

/// What the server does with one request.
#[derive(Debug)]
pub(crate) enum Decision {
    /// Nothing to answer: a response, or bytes without a DNS header.
    Ignore,
    /// Answer with these bytes.
    Respond(Vec<u8>),
    /// Not a cluster name: relay the request to the upstream resolvers and their reply to
    /// the client; when none answers, send `failure` (SERVFAIL).
    Forward { request: Message, failure: Vec<u8> },
    /// A cluster answer ending in a CNAME to a name outside the cluster: add the records of
    /// `target` of `record_type` from upstream to `response` (see [`finish_chase`]).
    Chase {
        request: Box<Message>,
        response: Box<Message>,
        target: Name,
        record_type: RecordType,
    },
}

/// The response skeleton for `request`: its id, opcode, RD and CD bits and question, EDNS when
/// it had EDNS; recursion available (the server forwards).
fn response_to(request: &Message) -> Message {
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata = Metadata::response_from_request(&request.metadata);
    response.metadata.recursion_available = true;
    response.add_queries(request.queries.iter().cloned());
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(OFFERED_UDP_PAYLOAD_BYTES);
        response.set_edns(edns);
    }
    response
}

/// A response with only `code`, for `request`.
pub(crate) fn failure(request: &Message, code: ResponseCode) -> Message {
    let mut response = response_to(request);
    response.metadata.response_code = code;
    response
}

/// How long a UDP answer to `request` may be.
fn udp_limit(request: &Message) -> usize {
    let offered = request
        .edns
        .as_ref()
        .map_or(MIN_UDP_PAYLOAD_BYTES, Edns::max_payload);
    usize::from(offered.clamp(MIN_UDP_PAYLOAD_BYTES, MAX_UDP_PAYLOAD_BYTES))
}

/// `response` as bytes for `request` over `transport`: truncated (TC, no records) when it is
/// longer than a UDP client takes. `None` when it cannot be written.
pub(crate) fn encode(
    response: &Message,
    request: &Message,
    transport: Transport,
) -> Option<Vec<u8>> {
    let bytes = response.to_vec().ok()?;
    let limit = match transport {
        Transport::Udp => udp_limit(request),
        Transport::Tcp => usize::from(u16::MAX),
    };
    if bytes.len() <= limit {
        return Some(bytes);
    }
    let mut truncated = response.clone();
    truncated.metadata.truncation = true;
    truncated.answers.clear();
    truncated.authorities.clear();
    truncated.additionals.clear();
    truncated.to_vec().ok()
}

/// Decides what to do with the request in `bytes`, from `table`.
pub(crate) fn decide(table: &NameTable, bytes: &[u8], transport: Transport) -> Decision {
    let request = match Message::from_vec(bytes) {
        Ok(request) => request,
        Err(_) => {
            // Answer FORMERR when at least the header is readable and asks something.
            let Ok(header) = Header::read(&mut BinDecoder::new(bytes)) else {
                return Decision::Ignore;
            };
            if header.metadata.message_type != MessageType::Query {
                return Decision::Ignore;
            }
            let mut metadata = Metadata::response_from_request(&header.metadata);
            metadata.response_code = ResponseCode::FormErr;
            let mut response = Message::response(metadata.id, metadata.op_code);
            response.metadata = metadata;
            return response
                .to_vec()
                .map_or(Decision::Ignore, Decision::Respond);
        }
    };
    let respond = |response: &Message| {
        encode(response, &request, transport).map_or(Decision::Ignore, Decision::Respond)
    };
    if request.metadata.message_type != MessageType::Query {
        return Decision::Ignore;
    }
    if request.metadata.op_code != OpCode::Query {
        return respond(&failure(&request, ResponseCode::NotImp));
    }
    let [query] = request.queries.as_slice() else {
        return respond(&failure(&request, ResponseCode::FormErr));
    };
    let query: Query = query.clone();
    let mut response = response_to(&request);
    response.metadata.authoritative = true;
    match table.answer(query.name(), query.query_type()) {
        Answer::Outside => match encode(
            &failure(&request, ResponseCode::ServFail),
            &request,
            transport,
        ) {
            Some(failure) => Decision::Forward { request, failure },
            None => Decision::Ignore,
        },
        _ if query.query_class() != DNSClass::IN => {
            response.metadata.response_code = ResponseCode::Refused;
            respond(&response)
        }
        Answer::NoSuchName => {
            response.metadata.response_code = ResponseCode::NXDomain;
            response.add_authorities(records::soa());
            respond(&response)
        }
        Answer::Records {
            answers,
            additionals,
            alias_outside,
        } => {
            if answers.is_empty() {
                response.add_authorities(records::soa());
            }
            response.add_answers(answers);
            response.add_additionals(additionals);
            match alias_outside {
                Some(target) => Decision::Chase {
                    request: Box::new(request),
                    response: Box::new(response),
                    target,
                    record_type: query.query_type(),
                },
                None => respond(&response),
            }
        }
    }
}

/// The query the server sends upstream for an ExternalName's target.
pub(crate) fn chase_query(target: &Name, record_type: RecordType) -> Message {
    let mut query = Message::query();
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(target.clone(), record_type));
    query
}

/// `response` with the answers of the upstream `reply` (the bytes of a reply to the chase
/// query) added when the reply parses and succeeded.
pub(crate) fn finish_chase(mut response: Message, reply: Option<&[u8]>) -> Message {
    let answers: Vec<Record> = reply
        .and_then(|bytes| Message::from_vec(bytes).ok())
        .filter(|reply| reply.metadata.response_code == ResponseCode::NoError)
        .map(|reply| reply.answers)
        .unwrap_or_default();
    response.add_answers(answers);
    response
}

#[cfg(test)]
mod tests;
