//! The Ingress listener, the IO shell around the router: per client connection, read the
//! request head (at most [`MAX_HEAD_BYTES`](super::head::MAX_HEAD_BYTES), within
//! [`HEAD_TIMEOUT`]), route it, connect to a ready endpoint of the chosen Service port as
//! every frontend does, send the rewritten head and whatever of the body came with it, then
//! splice the rest both ways. One request per client connection: the endpoint is told
//! `Connection: close`, so its answer closes the connection and a client sends its next
//! request on a new one, routed afresh.
//!
//! The listener answers by itself, with a short text body and `Connection: close`: 400 for a
//! malformed head, 408 for one that did not come in time, 431 for one too large, 404 when no
//! rule (and no default backend) matches, 503 when the Service port does not exist, has no
//! ready endpoint, or none could be connected.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::head::{self, Head, HeadError, MAX_HEAD_BYTES};
use crate::proxy::{connect, splice, Shared};

/// How long a client may take to send its whole request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// After answering by itself, the listener reads (and throws away) what the client still
/// sends, for this long and this much at most, before closing: closing with unread bytes
/// would reset the connection and could destroy the answer on its way.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
const DRAIN_BYTES: usize = 256 * 1024;

/// An answer of the listener's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    BadRequest,
    NotFound,
    RequestTimeout,
    HeadTooLarge,
    Unavailable,
}

impl Answer {
    /// The whole response.
    fn response(self) -> String {
        let (status, body) = match self {
            Answer::BadRequest => ("400 Bad Request", "bad request\n"),
            Answer::NotFound => (
                "404 Not Found",
                "no Ingress rule matches this host and path\n",
            ),
            Answer::RequestTimeout => ("408 Request Timeout", "the request head came too slowly\n"),
            Answer::HeadTooLarge => (
                "431 Request Header Fields Too Large",
                "the request head is too large\n",
            ),
            Answer::Unavailable => (
                "503 Service Unavailable",
                "the Service has no ready endpoint\n",
            ),
        };
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
    }
}

/// What reading a request head came to.
enum HeadRead {
    /// The head, and the buffer it was parsed from (body bytes may follow it).
    Complete(Box<Head>, Vec<u8>),
    /// The client closed, or sent nothing in time: nothing to answer.
    Nothing,
    Bad(HeadError),
    TimedOut,
}

async fn read_head(stream: &mut TcpStream) -> HeadRead {
    let deadline = tokio::time::Instant::now() + HEAD_TIMEOUT;
    let mut buffer = vec![0u8; MAX_HEAD_BYTES];
    let mut filled = 0;
    loop {
        let read = match tokio::time::timeout_at(deadline, stream.read(&mut buffer[filled..])).await
        {
            Err(_) if filled == 0 => return HeadRead::Nothing,
            Err(_) => return HeadRead::TimedOut,
            Ok(Err(error)) => {
                tracing::debug!(%error, "ingress: read the request head");
                return HeadRead::Nothing;
            }
            Ok(Ok(0)) if filled == 0 => return HeadRead::Nothing,
            Ok(Ok(0)) => return HeadRead::Bad(HeadError::Malformed("truncated".into())),
            Ok(Ok(read)) => read,
        };
        filled += read;
        match head::parse(&buffer[..filled]) {
            Ok(Some(head)) => {
                buffer.truncate(filled);
                return HeadRead::Complete(Box::new(head), buffer);
            }
            Ok(None) => continue,
            Err(error) => return HeadRead::Bad(error),
        }
    }
}

/// Accepts Ingress connections on `listener` until `token` is cancelled; the connections
/// still open then are dropped.
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>, token: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = token.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, client)) => {
                let shared = shared.clone();
                let token = token.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        _ = token.cancelled() => {}
                        _ = handle(stream, client, shared) => {}
                    }
                });
            }
            Err(error) => {
                tracing::warn!(%error, "ingress: accept");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Sends `answer`, then closes once the client is done sending (or the drain's bounds are
/// reached).
async fn answer(mut stream: TcpStream, answer: Answer) {
    if stream
        .write_all(answer.response().as_bytes())
        .await
        .is_err()
    {
        return;
    }
    let _ = stream.shutdown().await;
    let drain = async {
        let mut buffer = [0u8; 4096];
        let mut drained = 0;
        while drained < DRAIN_BYTES {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(read) => drained += read,
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, drain).await;
}

async fn handle(mut stream: TcpStream, client: SocketAddr, shared: Arc<Shared>) {
    let stats = shared.stats.clone();
    let _ = stream.set_nodelay(true);
    // Listening on every address, the listener also gets connections to a cluster IP on its
    // port that no Service port listens on: those are no Ingress requests.
    if let Ok(local) = stream.local_addr() {
        if shared.table().cluster_ips().contains(&local.ip()) {
            return splice::reset_on_close(&stream);
        }
    }
    let (head, buffer) = match read_head(&mut stream).await {
        HeadRead::Complete(head, buffer) => (head, buffer),
        HeadRead::Nothing => return,
        HeadRead::Bad(error) => {
            tracing::debug!(%client, %error, "ingress: bad request");
            stats.ingress_bad_requests.fetch_add(1, Ordering::Relaxed);
            let reply = match error {
                HeadError::TooLarge => Answer::HeadTooLarge,
                HeadError::Malformed(_) => Answer::BadRequest,
            };
            return answer(stream, reply).await;
        }
        HeadRead::TimedOut => {
            stats.ingress_bad_requests.fetch_add(1, Ordering::Relaxed);
            return answer(stream, Answer::RequestTimeout).await;
        }
    };
    stats.ingress_requests.fetch_add(1, Ordering::Relaxed);
    let router = shared.ingress_router();
    let Some(backend) = router.route(head.host.as_deref(), &head.path) else {
        tracing::debug!(host = ?head.host, path = %head.path, "ingress: no rule matches");
        stats.ingress_not_found.fetch_add(1, Ordering::Relaxed);
        return answer(stream, Answer::NotFound).await;
    };
    let table = shared.table();
    let Some(upstream) = table.service_port(&backend.namespace, &backend.service, &backend.port)
    else {
        tracing::debug!(
            service = %format!("{}/{}:{}", backend.namespace, backend.service, backend.port),
            ingress = %backend.ingress,
            "ingress: no such Service port"
        );
        stats.ingress_unavailable.fetch_add(1, Ordering::Relaxed);
        return answer(stream, Answer::Unavailable).await;
    };
    let Some(mut endpoint) = connect(upstream, client.ip(), &shared).await else {
        tracing::debug!(service = %upstream.service, ingress = %backend.ingress, "ingress: no endpoint");
        stats.ingress_unavailable.fetch_add(1, Ordering::Relaxed);
        return answer(stream, Answer::Unavailable).await;
    };
    let mut first = head.upstream(client.ip());
    first.extend_from_slice(&buffer[head.length..]);
    if let Err(error) = endpoint.send(&first, &stats).await {
        tracing::debug!(%error, service = %upstream.service, "ingress: send the request head");
        splice::reset_on_close(&stream);
        return;
    }
    endpoint.splice(stream, &stats).await;
}
