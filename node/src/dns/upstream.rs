//! Forwarding to the upstream resolvers: the request's own bytes over UDP, to each upstream in
//! turn until one replies, all within one time budget; the reply is relayed as it came. A
//! reply is taken only from the upstream asked (a connected socket of its own per request),
//! with the request's id and question. When the client asked over TCP and the UDP reply is
//! truncated, the same upstream is asked again over TCP.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// How long a forwarded request may take, over every upstream.
pub(crate) const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);
/// Datagrams read from an upstream's socket before the request is given up on (replies that
/// do not match are skipped).
const MAX_DATAGRAMS_PER_REQUEST: usize = 16;
/// The largest DNS message (over TCP, and what EDNS may allow over UDP).
const MAX_MESSAGE_BYTES: usize = 65_535;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ForwardError {
    #[error("no upstream resolver: resolv.conf lists none but this node's own addresses")]
    NoUpstream,
    #[error("no reply from {upstream} within {timeout_ms} ms")]
    TimedOut {
        upstream: SocketAddr,
        timeout_ms: u128,
    },
    #[error("{action}: {source}")]
    Io {
        action: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no matching reply from {upstream} among {datagrams} datagrams")]
    NoMatchingReply {
        upstream: SocketAddr,
        datagrams: usize,
    },
    #[error("a reply of {upstream} over TCP does not match the request")]
    Mismatch { upstream: SocketAddr },
    #[error("a request of {bytes} bytes does not fit a TCP message")]
    RequestTooLong { bytes: usize },
}

fn io_error(action: String) -> impl FnOnce(std::io::Error) -> ForwardError {
    move |source| ForwardError::Io { action, source }
}

/// Whether `reply` answers `request`: a response with its id and question.
fn answers(request: &Message, reply: &[u8]) -> Option<Message> {
    let reply = Message::from_vec(reply).ok()?;
    (reply.metadata.id == request.metadata.id
        && reply.metadata.message_type == hickory_proto::op::MessageType::Response
        && reply.queries == request.queries)
        .then_some(reply)
}

/// Sends `bytes` (the encoding of `request`) to the upstreams in turn and returns the first
/// matching reply, within `timeout` in all.
pub(crate) async fn forward(
    upstreams: &[SocketAddr],
    request: &Message,
    bytes: &[u8],
    over_tcp: bool,
    timeout: Duration,
) -> Result<Vec<u8>, ForwardError> {
    let count = u32::try_from(upstreams.len()).unwrap_or(u32::MAX);
    if count == 0 {
        return Err(ForwardError::NoUpstream);
    }
    let per_upstream = timeout / count;
    let mut last_error = ForwardError::NoUpstream;
    for upstream in upstreams {
        let reply =
            match tokio::time::timeout(per_upstream, exchange_udp(*upstream, request, bytes)).await
            {
                Ok(Ok(reply)) => reply,
                Ok(Err(error)) => {
                    last_error = error;
                    continue;
                }
                Err(_) => {
                    last_error = ForwardError::TimedOut {
                        upstream: *upstream,
                        timeout_ms: per_upstream.as_millis(),
                    };
                    continue;
                }
            };
        let truncated = Message::from_vec(&reply).is_ok_and(|m| m.metadata.truncation);
        if over_tcp && truncated {
            if let Ok(Ok(full)) =
                tokio::time::timeout(per_upstream, exchange_tcp(*upstream, request, bytes)).await
            {
                return Ok(full);
            }
        }
        return Ok(reply);
    }
    Err(last_error)
}

async fn exchange_udp(
    upstream: SocketAddr,
    request: &Message,
    bytes: &[u8],
) -> Result<Vec<u8>, ForwardError> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local)
        .await
        .map_err(io_error(format!("bind a UDP socket to ask {upstream}")))?;
    socket
        .connect(upstream)
        .await
        .map_err(io_error(format!("connect a UDP socket to {upstream}")))?;
    socket
        .send(bytes)
        .await
        .map_err(io_error(format!("send the request to {upstream}")))?;
    let mut buffer = vec![0u8; MAX_MESSAGE_BYTES];
    for _ in 0..MAX_DATAGRAMS_PER_REQUEST {
        let length = socket
            .recv(&mut buffer)
            .await
            .map_err(io_error(format!("receive the reply of {upstream}")))?;
        let reply = buffer.get(..length).unwrap_or_default();
        if answers(request, reply).is_some() {
            return Ok(reply.to_vec());
        }
    }
    Err(ForwardError::NoMatchingReply {
        upstream,
        datagrams: MAX_DATAGRAMS_PER_REQUEST,
    })
}

async fn exchange_tcp(
    upstream: SocketAddr,
    request: &Message,
    bytes: &[u8],
) -> Result<Vec<u8>, ForwardError> {
    let length = u16::try_from(bytes.len())
        .map_err(|_| ForwardError::RequestTooLong { bytes: bytes.len() })?;
    let mut stream = TcpStream::connect(upstream)
        .await
        .map_err(io_error(format!("connect to {upstream} over TCP")))?;
    let mut framed = Vec::with_capacity(bytes.len() + 2);
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(bytes);
    stream
        .write_all(&framed)
        .await
        .map_err(io_error(format!("send the request to {upstream} over TCP")))?;
    let reply_length = stream
        .read_u16()
        .await
        .map_err(io_error(format!("read the reply length of {upstream}")))?;
    let mut reply = vec![0u8; usize::from(reply_length)];
    stream
        .read_exact(&mut reply)
        .await
        .map_err(io_error(format!("read the reply of {upstream} over TCP")))?;
    match answers(request, &reply) {
        Some(_) => Ok(reply),
        None => Err(ForwardError::Mismatch { upstream }),
    }
}
