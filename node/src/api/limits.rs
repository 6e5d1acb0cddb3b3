//! Limits against bad input on the gRPC port: a per-client write rate limit (a pure token
//! bucket), tonic's own errors for requests it cannot decode (too large, not protobuf) said as
//! this API says errors, the nesting limit named when serde refuses deep input, and deadlines
//! for a connection's HTTP/2 preface and for answering pings.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt::Display;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use flotilla_raft::store::MAX_OBJECT_DEPTH;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::body::Body;
use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::NamedService;
use tonic::transport::server::Connected;
use tonic::{Code, Request, Status};

/// How many clients the write limiter tracks at once; beyond, idle ones are forgotten first.
pub const MAX_TRACKED_CLIENTS: usize = 10_000;

/// How long a new connection may take to send the 24 bytes of the HTTP/2 client preface.
pub const PREFACE_TIMEOUT: Duration = Duration::from_secs(5);

/// After the preface, a connection from which nothing arrived for this long is pinged...
pub const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);

/// ... and closed when the ping is not answered within this: a stalled or half-sent frame
/// does not hold a connection forever. Every HTTP/2 client answers pings by itself.
pub const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The client preface of HTTP/2 (RFC 9113, 3.4): every gRPC connection starts with it.
const PREFACE_BYTES: usize = 24;

/// Writes per client through the API: a token bucket of `burst` writes, refilled at
/// `per_second`. `per_second == 0` is no limit. The defaults leave room for the benchmarks,
/// which create thousands of pods per second from one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteRateLimit {
    pub per_second: u32,
    pub burst: u32,
}

impl Default for WriteRateLimit {
    fn default() -> WriteRateLimit {
        WriteRateLimit {
            per_second: 10_000,
            burst: 20_000,
        }
    }
}

/// How long a refused client should wait before its next write may pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Token buckets by client key (pure: the caller passes the time).
#[derive(Debug)]
pub struct WriteRateLimiter {
    limit: WriteRateLimit,
    max_clients: usize,
    buckets: HashMap<String, Bucket>,
}

impl WriteRateLimiter {
    pub fn new(limit: WriteRateLimit, max_clients: usize) -> WriteRateLimiter {
        WriteRateLimiter {
            limit,
            max_clients: max_clients.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Takes one write from `client_key`'s bucket, or says how long until one is there.
    pub fn check(&mut self, client_key: &str, now: Instant) -> Result<(), RetryAfter> {
        if self.limit.per_second == 0 {
            return Ok(());
        }
        let rate = f64::from(self.limit.per_second);
        let burst = f64::from(self.limit.burst.max(1));
        if !self.buckets.contains_key(client_key) {
            self.make_room(now);
            self.buckets.insert(
                client_key.to_string(),
                Bucket {
                    tokens: burst,
                    updated: now,
                },
            );
        }
        let Some(bucket) = self.buckets.get_mut(client_key) else {
            return Ok(());
        };
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.updated = bucket.updated.max(now);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(RetryAfter(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / rate,
            )))
        }
    }

    /// How many clients have a bucket.
    pub fn tracked_clients(&self) -> usize {
        self.buckets.len()
    }

    /// Frees a place for one more client: first every bucket that has refilled (forgetting it
    /// changes nothing), else the one used longest ago.
    fn make_room(&mut self, now: Instant) {
        if self.buckets.len() < self.max_clients {
            return;
        }
        let refill_seconds =
            f64::from(self.limit.burst.max(1)) / f64::from(self.limit.per_second.max(1));
        self.buckets.retain(|_, bucket| {
            now.saturating_duration_since(bucket.updated).as_secs_f64() < refill_seconds
        });
        if self.buckets.len() < self.max_clients {
            return;
        }
        let oldest = self
            .buckets
            .iter()
            .min_by_key(|(_, bucket)| bucket.updated)
            .map(|(key, _)| key.clone());
        if let Some(oldest) = oldest {
            self.buckets.remove(&oldest);
        }
    }
}

/// The status of a write refused by the rate limit.
pub fn rate_limited(limit: WriteRateLimit, retry: RetryAfter) -> Status {
    let millis = retry.0.as_micros().div_ceil(1000).max(1);
    Status::resource_exhausted(format!(
        "write rate limit of {} writes/s per client exceeded; retry in {millis} ms",
        limit.per_second
    ))
}

/// Who a request counts against in the write limit: the identity of its client certificate
/// (`user NAME`, `node NAME`), else its IP address.
pub fn client_key<T>(request: &Request<T>) -> String {
    let info = request.extensions().get::<flotilla_pki::PeerInfo>();
    match info.and_then(|info| info.identity.as_ref()) {
        Some(identity) => identity.to_string(),
        None => info
            .map(|info| info.remote_address.ip().to_string())
            .unwrap_or_else(|| "unknown".to_string()),
    }
}

/// The write limiter of one node's Objects service, shared by its requests.
#[derive(Debug, Clone)]
pub struct SharedWriteRateLimiter {
    limit: WriteRateLimit,
    limiter: Arc<Mutex<WriteRateLimiter>>,
}

impl SharedWriteRateLimiter {
    pub fn new(limit: WriteRateLimit) -> SharedWriteRateLimiter {
        SharedWriteRateLimiter {
            limit,
            limiter: Arc::new(Mutex::new(WriteRateLimiter::new(
                limit,
                MAX_TRACKED_CLIENTS,
            ))),
        }
    }

    /// Counts one write of the request's client; `ResourceExhausted` past the limit.
    pub fn admit<T>(&self, request: &Request<T>) -> Result<(), Status> {
        if self.limit.per_second == 0 {
            return Ok(());
        }
        let key = client_key(request);
        let checked = self
            .limiter
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .check(&key, Instant::now());
        checked.map_err(|retry| rate_limited(self.limit, retry))
    }
}

/// Whether a serde_json or serde_yaml error is its recursion limit (128 levels): the input is
/// nested deeper than an object may be.
pub fn is_nesting_error(error: &dyn Display) -> bool {
    error.to_string().contains("recursion limit exceeded")
}

/// The message for input refused by a decoder's recursion limit.
pub fn too_deep(what: &str) -> String {
    format!("{what} is nested more than {MAX_OBJECT_DEPTH} levels deep")
}

/// tonic's own status for a request to `method` that it could not decode, said clearly;
/// `None` for every other status.
pub fn clear_decode_error(method: &str, status: &Status) -> Option<Status> {
    let message = status.message();
    match status.code() {
        Code::OutOfRange => {
            let rest = message.strip_prefix("Error, decoded message length too large: found ")?;
            let (found, rest) = rest.split_once(" bytes, the limit is: ")?;
            let limit = rest.strip_suffix(" bytes")?;
            Some(Status::out_of_range(format!(
                "request to {method} is {found} bytes, more than the limit of {limit} bytes"
            )))
        }
        Code::Internal if message.starts_with("failed to decode Protobuf message") => {
            Some(Status::invalid_argument(format!(
                "request to {method} is not a valid protobuf message: {message}"
            )))
        }
        Code::Internal if message == "Missing request message." => Some(Status::invalid_argument(
            format!("request to {method} carries no message"),
        )),
        _ => None,
    }
}

/// A generated gRPC server whose decode errors are rewritten by [`clear_decode_error`].
#[derive(Debug, Clone)]
pub struct ClearDecodeErrors<S> {
    inner: S,
}

impl<S> ClearDecodeErrors<S> {
    pub fn new(inner: S) -> ClearDecodeErrors<S> {
        ClearDecodeErrors { inner }
    }
}

impl<S: NamedService> NamedService for ClearDecodeErrors<S> {
    const NAME: &'static str = S::NAME;
}

impl<S> Service<http::Request<Body>> for ClearDecodeErrors<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<http::Response<Body>, Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let method = request.uri().path().to_string();
        let response = self.inner.call(request);
        Box::pin(async move {
            let mut response = response.await?;
            // tonic keeps the status of an error response in its extensions.
            let clear = response
                .extensions()
                .get::<Status>()
                .and_then(|status| clear_decode_error(&method, status));
            if let Some(clear) = clear {
                let mut headers = http::HeaderMap::new();
                if clear.add_header(&mut headers).is_ok() {
                    for (name, value) in &headers {
                        response.headers_mut().insert(name, value.clone());
                    }
                    response.extensions_mut().insert(clear);
                }
            }
            Ok(response)
        })
    }
}

/// A new connection that fails its reads once `timeout` passed before it sent the HTTP/2
/// preface: a client that connects and sends nothing, or half a preface, is dropped instead
/// of holding its connection forever. Past the preface it is the plain stream.
#[derive(Debug)]
pub struct PrefaceDeadline<IO> {
    inner: IO,
    /// Bytes of the preface not read yet; 0: the deadline no longer applies.
    preface_left: usize,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl<IO> PrefaceDeadline<IO> {
    /// Starts the deadline now; inside a Tokio runtime only (as every accepted stream is).
    pub fn new(inner: IO, timeout: Duration) -> PrefaceDeadline<IO> {
        PrefaceDeadline {
            inner,
            preface_left: PREFACE_BYTES,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

impl<IO: Connected> Connected for PrefaceDeadline<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for PrefaceDeadline<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = buf.filled().len().saturating_sub(before);
                this.preface_left = this.preface_left.saturating_sub(read);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => {
                if this.preface_left > 0 && this.deadline.as_mut().poll(cx).is_ready() {
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no HTTP/2 preface in time",
                    )))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for PrefaceDeadline<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn limiter(per_second: u32, burst: u32) -> WriteRateLimiter {
        WriteRateLimiter::new(WriteRateLimit { per_second, burst }, 100)
    }

    #[test]
    fn a_client_may_write_its_burst_at_once_and_then_waits_for_the_rate() {
        let mut limiter = limiter(10, 3);
        let start = Instant::now();
        for _ in 0..3 {
            assert_eq!(limiter.check("a", start), Ok(()));
        }
        let refused = limiter.check("a", start).unwrap_err();
        assert_eq!(refused, RetryAfter(Duration::from_millis(100)));
        assert!(limiter
            .check("a", start + Duration::from_millis(50))
            .is_err());
        assert_eq!(
            limiter.check("a", start + Duration::from_millis(100)),
            Ok(())
        );
        assert!(limiter
            .check("a", start + Duration::from_millis(100))
            .is_err());
    }

    #[test]
    fn the_bucket_refills_up_to_the_burst_only() {
        let mut limiter = limiter(10, 2);
        let start = Instant::now();
        assert_eq!(limiter.check("a", start), Ok(()));
        let later = start + Duration::from_secs(60);
        assert_eq!(limiter.check("a", later), Ok(()));
        assert_eq!(limiter.check("a", later), Ok(()));
        assert!(limiter.check("a", later).is_err());
    }

    #[test]
    fn clients_have_buckets_of_their_own() {
        let mut limiter = limiter(1, 1);
        let now = Instant::now();
        assert_eq!(limiter.check("a", now), Ok(()));
        assert!(limiter.check("a", now).is_err());
        assert_eq!(limiter.check("b", now), Ok(()));
    }

    #[test]
    fn a_rate_of_zero_is_no_limit() {
        let mut limiter = limiter(0, 0);
        let now = Instant::now();
        for _ in 0..100_000 {
            assert_eq!(limiter.check("a", now), Ok(()));
        }
        assert_eq!(limiter.tracked_clients(), 0);
    }

    #[test]
    fn a_burst_of_zero_still_lets_one_write_through() {
        let mut limiter = limiter(5, 0);
        let now = Instant::now();
        assert_eq!(limiter.check("a", now), Ok(()));
        assert_eq!(
            limiter.check("a", now),
            Err(RetryAfter(Duration::from_millis(200)))
        );
    }

    #[test]
    fn idle_clients_are_forgotten_first_when_too_many_are_tracked() {
        let mut limiter = WriteRateLimiter::new(
            WriteRateLimit {
                per_second: 1,
                burst: 1,
            },
            2,
        );
        let start = Instant::now();
        assert_eq!(limiter.check("idle", start), Ok(()));
        let later = start + Duration::from_secs(5);
        assert_eq!(limiter.check("busy", later), Ok(()));
        assert_eq!(limiter.check("new", later), Ok(()));
        assert_eq!(limiter.tracked_clients(), 2);
        // "busy" kept its empty bucket: it was not the one forgotten.
        assert!(limiter.check("busy", later).is_err());
    }

    #[test]
    fn the_least_recently_seen_client_makes_room_when_none_is_idle() {
        let mut limiter = WriteRateLimiter::new(
            WriteRateLimit {
                per_second: 1,
                burst: 1000,
            },
            2,
        );
        let start = Instant::now();
        assert_eq!(limiter.check("first", start), Ok(()));
        assert_eq!(
            limiter.check("second", start + Duration::from_secs(1)),
            Ok(())
        );
        assert_eq!(
            limiter.check("third", start + Duration::from_secs(2)),
            Ok(())
        );
        assert_eq!(limiter.tracked_clients(), 2);
        assert!(limiter.buckets.contains_key("second") && limiter.buckets.contains_key("third"));
    }

    #[test]
    fn the_refusal_names_the_limit_and_when_to_retry() {
        let limit = WriteRateLimit {
            per_second: 50,
            burst: 10,
        };
        let status = rate_limited(limit, RetryAfter(Duration::from_micros(19_001)));
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(
            status.message(),
            "write rate limit of 50 writes/s per client exceeded; retry in 20 ms"
        );
    }

    #[test]
    fn a_request_without_a_peer_address_counts_as_unknown() {
        assert_eq!(client_key(&Request::new(())), "unknown");
    }

    #[test]
    fn serde_recursion_limits_are_recognized_as_nesting_errors() {
        let deep_json = "[".repeat(10_000);
        let json_error = serde_json::from_str::<serde_json::Value>(&deep_json).unwrap_err();
        assert!(is_nesting_error(&json_error), "{json_error}");
        let deep_yaml = format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000));
        let yaml_error = serde_yaml::from_str::<serde_json::Value>(&deep_yaml).unwrap_err();
        assert!(is_nesting_error(&yaml_error), "{yaml_error}");
        let other = serde_json::from_str::<serde_json::Value>("{").unwrap_err();
        assert!(!is_nesting_error(&other));
    }

    #[test]
    fn tonic_decode_errors_are_said_clearly_and_other_statuses_are_left_alone() {
        let method = "/flotilla.v1.Objects/Create";
        let too_large = Status::out_of_range(
            "Error, decoded message length too large: found 10485771 bytes, the limit is: 4194304 bytes",
        );
        let clear = clear_decode_error(method, &too_large).unwrap();
        assert_eq!(clear.code(), Code::OutOfRange);
        assert_eq!(
            clear.message(),
            "request to /flotilla.v1.Objects/Create is 10485771 bytes, more than the limit of 4194304 bytes"
        );
        let garbage = Status::internal("failed to decode Protobuf message: invalid wire type");
        let clear = clear_decode_error(method, &garbage).unwrap();
        assert_eq!(clear.code(), Code::InvalidArgument);
        assert!(clear
            .message()
            .starts_with("request to /flotilla.v1.Objects/Create is not a valid protobuf message"));
        let empty = Status::internal("Missing request message.");
        assert_eq!(
            clear_decode_error(method, &empty).unwrap().code(),
            Code::InvalidArgument
        );
        for status in [
            Status::internal("open the store"),
            Status::out_of_range("too old resource version 3"),
            Status::invalid_argument("failed to decode Protobuf message"),
        ] {
            assert!(clear_decode_error(method, &status).is_none());
        }
    }

    #[tokio::test]
    async fn a_connection_without_a_preface_fails_its_reads_after_the_deadline() {
        let (_client, server) = tokio::io::duplex(64);
        let mut server = PrefaceDeadline::new(server, Duration::from_millis(50));
        let started = Instant::now();
        let error = server.read(&mut [0; 16]).await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[tokio::test]
    async fn a_connection_past_its_preface_has_no_deadline() {
        let (mut client, server) = tokio::io::duplex(64);
        let mut server = PrefaceDeadline::new(server, Duration::from_millis(50));
        client.write_all(&[b'x'; PREFACE_BYTES]).await.unwrap();
        let mut preface = [0; PREFACE_BYTES];
        server.read_exact(&mut preface).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let reader = tokio::spawn(async move {
            let mut byte = [0; 1];
            server.read_exact(&mut byte).await.map(|_| byte[0])
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        client.write_all(b"y").await.unwrap();
        assert_eq!(reader.await.unwrap().unwrap(), b'y');
    }
}
