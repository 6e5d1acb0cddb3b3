//! An HTTP/1 request head, read (with `httparse`) and rewritten for the endpoint (pure): the
//! Host and path the Ingress routes by, and the head sent upstream — in origin form, with
//! `Connection: close` (one request per client connection; an upgrade, such as a WebSocket,
//! keeps `Connection: upgrade` and its `Upgrade` header), the hop-by-hop `Keep-Alive` and
//! `Proxy-Connection` left out, `X-Forwarded-For` extended with the client's address and
//! `X-Forwarded-Host`/`X-Forwarded-Proto` set (any the client sent are replaced: the
//! listener is the edge). Headers that frame the body are never touched, since the body
//! itself is spliced as it comes.

use std::net::IpAddr;

/// A request head larger than this is refused (431), as are more than [`MAX_HEADERS`]
/// headers.
pub(crate) const MAX_HEAD_BYTES: usize = 32 * 1024;
pub(crate) const MAX_HEADERS: usize = 100;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HeadError {
    #[error("malformed request head: {0}")]
    Malformed(String),
    #[error(
        "request head larger than {MAX_HEAD_BYTES} bytes or with more than {MAX_HEADERS} headers"
    )]
    TooLarge,
}

fn malformed(what: impl Into<String>) -> HeadError {
    HeadError::Malformed(what.into())
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Head {
    method: String,
    /// The request target in origin form: path and query.
    target: String,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    minor_version: u8,
    /// Every header but Host, in order, as received.
    headers: Vec<(String, Vec<u8>)>,
    /// The authority of an absolute-form target, else the Host header, as received.
    host_header: Option<String>,
    /// The host as the router matches it ([`super::normalize_host`]).
    pub(crate) host: Option<String>,
    /// The path, without query.
    pub(crate) path: String,
    /// The bytes of the head at the start of the buffer parsed; what follows is body.
    pub(crate) length: usize,
    /// `Connection: upgrade` with an `Upgrade` header.
    upgrade: bool,
}

/// Strips `prefix` from the start of `text`, ignoring ASCII case.
fn strip_prefix_ignoring_case<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

/// The authority (if the target is in absolute form) and the origin-form target.
fn split_target(target: &str) -> Result<(Option<&str>, String), HeadError> {
    if target.starts_with('/') {
        return Ok((None, target.to_owned()));
    }
    let rest = strip_prefix_ignoring_case(target, "http://")
        .or_else(|| strip_prefix_ignoring_case(target, "https://"))
        .ok_or_else(|| malformed(format!("request target {target:?}")))?;
    let (authority, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let origin = match path {
        "" => "/".to_owned(),
        query if query.starts_with('?') => format!("/{query}"),
        path => path.to_owned(),
    };
    Ok((Some(authority), origin))
}

/// Parses the head at the start of `buffer`: `Ok(None)` while it is incomplete.
pub(crate) fn parse(buffer: &[u8]) -> Result<Option<Head>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let length = match request.parse(buffer) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) if buffer.len() >= MAX_HEAD_BYTES => {
            return Err(HeadError::TooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(error) => return Err(malformed(error.to_string())),
    };
    if length > MAX_HEAD_BYTES {
        return Err(HeadError::TooLarge);
    }
    let method = request.method.ok_or_else(|| malformed("no method"))?;
    let raw_target = request.path.ok_or_else(|| malformed("no request target"))?;
    let minor_version = request.version.ok_or_else(|| malformed("no version"))?;
    let (authority, target) = split_target(raw_target)?;

    let mut host_headers = Vec::new();
    let mut kept = Vec::new();
    let mut connection_tokens = Vec::new();
    let mut has_upgrade_header = false;
    for header in request.headers.iter() {
        let name = header.name;
        if name.eq_ignore_ascii_case("host") {
            host_headers.push(header.value);
            continue;
        }
        if name.eq_ignore_ascii_case("connection") {
            connection_tokens.extend(
                String::from_utf8_lossy(header.value)
                    .split(',')
                    .map(|token| token.trim().to_ascii_lowercase()),
            );
        }
        if name.eq_ignore_ascii_case("upgrade") {
            has_upgrade_header = true;
        }
        kept.push((name.to_owned(), header.value.to_vec()));
    }
    if host_headers.len() > 1 {
        return Err(malformed("more than one Host header"));
    }
    let host_header = match (authority, host_headers.first()) {
        (Some(authority), _) => Some(authority.to_owned()),
        (None, Some(value)) => Some(
            std::str::from_utf8(value)
                .map_err(|_| malformed("a Host header that is not UTF-8"))?
                .trim()
                .to_owned(),
        ),
        (None, None) if minor_version >= 1 => {
            return Err(malformed("an HTTP/1.1 request without a Host header"))
        }
        (None, None) => None,
    };
    let host = host_header.as_deref().and_then(super::normalize_host);
    let path = target
        .split(['?', '#'])
        .next()
        .unwrap_or_default()
        .to_owned();
    Ok(Some(Head {
        method: method.to_owned(),
        target,
        minor_version,
        headers: kept,
        host_header,
        host,
        path,
        length,
        upgrade: has_upgrade_header && connection_tokens.iter().any(|t| t == "upgrade"),
    }))
}

impl Head {
    /// The head to send to the endpoint for a client at `client`.
    pub(crate) fn upstream(&self, client: IpAddr) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.length + 128);
        out.extend_from_slice(
            format!(
                "{} {} HTTP/1.{}\r\n",
                self.method, self.target, self.minor_version
            )
            .as_bytes(),
        );
        if let Some(host) = &self.host_header {
            out.extend_from_slice(format!("Host: {host}\r\n").as_bytes());
        }
        let mut forwarded_for: Vec<u8> = Vec::new();
        for (name, value) in &self.headers {
            let lower = name.to_ascii_lowercase();
            match lower.as_str() {
                "connection" | "keep-alive" | "proxy-connection" | "x-forwarded-host"
                | "x-forwarded-proto" => continue,
                "upgrade" if !self.upgrade => continue,
                "x-forwarded-for" => {
                    if !forwarded_for.is_empty() {
                        forwarded_for.extend_from_slice(b", ");
                    }
                    forwarded_for.extend_from_slice(value);
                    continue;
                }
                _ => {}
            }
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"X-Forwarded-For: ");
        if !forwarded_for.is_empty() {
            out.extend_from_slice(&forwarded_for);
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(format!("{client}\r\n").as_bytes());
        if let Some(host) = &self.host_header {
            out.extend_from_slice(format!("X-Forwarded-Host: {host}\r\n").as_bytes());
        }
        out.extend_from_slice(b"X-Forwarded-Proto: http\r\n");
        out.extend_from_slice(if self.upgrade {
            b"Connection: upgrade\r\n\r\n".as_slice()
        } else {
            b"Connection: close\r\n\r\n".as_slice()
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(bytes: &[u8]) -> Head {
        parse(bytes)
            .expect("a well-formed head")
            .expect("a complete head")
    }

    fn client() -> IpAddr {
        "192.0.2.7".parse().expect("ip")
    }

    fn upstream_text(bytes: &[u8]) -> String {
        String::from_utf8(head(bytes).upstream(client())).expect("UTF-8")
    }

    #[test]
    fn a_head_gives_the_host_without_port_and_the_path_without_query() {
        let request = b"GET /x/y?z=1 HTTP/1.1\r\nHost: B.Example:8080\r\n\r\nbody";
        let parsed = head(request);
        assert_eq!(parsed.host.as_deref(), Some("b.example"));
        assert_eq!(parsed.path, "/x/y");
        assert_eq!(parsed.length, request.len() - 4);
    }

    #[test]
    fn an_incomplete_head_asks_for_more() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\nHost: a"), Ok(None));
        assert_eq!(parse(b""), Ok(None));
    }

    #[test]
    fn a_malformed_head_is_refused() {
        for request in [
            &b"NOT HTTP\r\n\r\n"[..],
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            b"GET foo HTTP/1.1\r\nHost: a\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: \xff\r\n\r\n",
        ] {
            assert!(
                matches!(parse(request), Err(HeadError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(request)
            );
        }
    }

    #[test]
    fn a_head_too_large_or_with_too_many_headers_is_refused() {
        let mut long = b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: ".to_vec();
        long.resize(MAX_HEAD_BYTES, b'x');
        assert_eq!(parse(&long), Err(HeadError::TooLarge));
        let mut many = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
        for index in 0..MAX_HEADERS {
            many.extend_from_slice(format!("X-{index}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse(&many), Err(HeadError::TooLarge));
    }

    #[test]
    fn an_http_1_0_request_may_come_without_a_host() {
        let parsed = head(b"GET /a HTTP/1.0\r\n\r\n");
        assert_eq!(parsed.host, None);
        assert_eq!(
            String::from_utf8(parsed.upstream(client())).expect("UTF-8"),
            "GET /a HTTP/1.0\r\nX-Forwarded-For: 192.0.2.7\r\n\
             X-Forwarded-Proto: http\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn an_absolute_form_target_gives_the_host_and_goes_upstream_in_origin_form() {
        let request = b"GET http://A.example:81/p?q HTTP/1.1\r\nHost: ignored\r\n\r\n";
        let parsed = head(request);
        assert_eq!(parsed.host.as_deref(), Some("a.example"));
        assert_eq!(parsed.path, "/p");
        assert!(upstream_text(request).starts_with("GET /p?q HTTP/1.1\r\nHost: A.example:81\r\n"));
        assert_eq!(
            head(b"GET http://a.example HTTP/1.1\r\nHost: a.example\r\n\r\n").path,
            "/"
        );
    }

    #[test]
    fn the_upstream_head_closes_after_one_request_and_says_who_asked() {
        let request = b"POST /x HTTP/1.1\r\nHost: a.example\r\nConnection: keep-alive\r\n\
                        Keep-Alive: timeout=5\r\nContent-Length: 4\r\n\
                        X-Forwarded-For: 10.0.0.1\r\nX-Forwarded-For: 10.0.0.2\r\n\
                        X-Forwarded-Host: spoofed\r\nUpgrade: h2c\r\n\r\nbody";
        assert_eq!(
            upstream_text(request),
            "POST /x HTTP/1.1\r\nHost: a.example\r\nContent-Length: 4\r\n\
             X-Forwarded-For: 10.0.0.1, 10.0.0.2, 192.0.2.7\r\n\
             X-Forwarded-Host: a.example\r\nX-Forwarded-Proto: http\r\n\
             Connection: close\r\n\r\n"
        );
    }

    #[test]
    fn an_upgrade_keeps_its_connection_and_upgrade_headers() {
        let request = b"GET /ws HTTP/1.1\r\nHost: a.example\r\nConnection: Upgrade\r\n\
                        Upgrade: websocket\r\nSec-WebSocket-Key: k\r\n\r\n";
        assert_eq!(
            upstream_text(request),
            "GET /ws HTTP/1.1\r\nHost: a.example\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Key: k\r\nX-Forwarded-For: 192.0.2.7\r\n\
             X-Forwarded-Host: a.example\r\nX-Forwarded-Proto: http\r\n\
             Connection: upgrade\r\n\r\n"
        );
    }
}
