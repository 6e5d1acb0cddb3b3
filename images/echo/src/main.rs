//! `flotilla-echo`: the test workload of the `flotilla/echo` image. A tiny HTTP/1.1 server that
//! answers every request with `200 OK` and the body `<hostname>\n`, so a client can tell which
//! pod served it. Std only (the image is `FROM scratch` with one static binary).
//!
//! The port comes from `PORT` (default 8080). One thread per connection; keep-alive unless the
//! request says `Connection: close` (or is HTTP/1.0 without `Connection: keep-alive`).
//!
//! For benchmarks of the data path, `GET /bytes/N` answers N bytes (zeros) instead, and the
//! same binary is the load client: `flotilla-echo bench throughput|latency ...` (`bench.rs`),
//! run inside a pod with `docker exec`.

mod bench;

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

/// A request head larger than this is refused.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// A request body larger than this is refused (it is read and thrown away).
const MAX_BODY_BYTES: u64 = 1024 * 1024;
/// An idle or stalled connection is closed after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The path prefix of the bulk answer: `GET /bytes/N` answers N bytes.
const BYTES_PATH: &str = "/bytes/";
/// The size of the writes of a bulk answer.
const BULK_WRITE_BYTES: usize = 64 * 1024;

fn main() {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    if arguments.first().map(String::as_str) == Some("bench") {
        std::process::exit(bench::main(&arguments[1..]));
    }
    if let Err(error) = run() {
        eprintln!("flotilla-echo: {error}");
        std::process::exit(1);
    }
}

fn run() -> io::Result<()> {
    let port = match std::env::var("PORT") {
        Ok(value) => value.trim().parse::<u16>().map_err(|e| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("PORT {value:?}: {e}"))
        })?,
        Err(_) => 8080,
    };
    let body = format!("{}\n", hostname());
    let listener = TcpListener::bind(("0.0.0.0", port))?;
    eprintln!(
        "flotilla-echo: listening on 0.0.0.0:{port} as {}",
        body.trim_end()
    );
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let body = body.clone();
                std::thread::spawn(move || {
                    if let Err(error) = serve(stream, &body) {
                        if !is_disconnect(&error) {
                            eprintln!("flotilla-echo: connection: {error}");
                        }
                    }
                });
            }
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                eprintln!("flotilla-echo: accept: {error}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    Ok(())
}

/// The pod's hostname: `/etc/hostname` (which Docker writes), else `HOSTNAME`, else `unknown`.
fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty())
        .or_else(|| {
            std::env::var("HOSTNAME")
                .ok()
                .map(|name| name.trim().to_owned())
        })
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

fn is_disconnect(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
    )
}

/// What the server needs from one request head.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    /// The request target (`/`, `/bytes/1000`, ...).
    target: String,
    keep_alive: bool,
    content_length: u64,
}

impl Head {
    /// The size asked for by `GET /bytes/N`, if this is such a request.
    fn bulk_bytes(&self) -> Option<u64> {
        self.target.strip_prefix(BYTES_PATH)?.parse().ok()
    }
}

/// Serves requests on one connection until the client or a `Connection: close` ends it.
fn serve(stream: TcpStream, body: &str) -> io::Result<()> {
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    stream.set_write_timeout(Some(IDLE_TIMEOUT))?;
    // Every answer is written whole (head and body in one write, or a bulk stream): nothing is
    // gained by holding a small segment back.
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    loop {
        let Some(lines) = read_head(&mut reader)? else {
            return Ok(());
        };
        let head = match parse_head(&lines) {
            Ok(head) => head,
            Err(reason) => {
                let response = format!(
                    "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{reason}\n",
                    reason.len() + 1
                );
                writer.write_all(response.as_bytes())?;
                return Ok(());
            }
        };
        let skipped = io::copy(
            &mut (&mut reader).take(head.content_length),
            &mut io::sink(),
        )?;
        if skipped < head.content_length {
            return Ok(());
        }
        let connection = if head.keep_alive {
            "keep-alive"
        } else {
            "close"
        };
        if let Some(bytes) = head.bulk_bytes() {
            write_bulk(&mut writer, bytes, connection)?;
            if !head.keep_alive {
                return Ok(());
            }
            continue;
        }
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {connection}\r\n\r\n{body}",
            body.len()
        );
        writer.write_all(response.as_bytes())?;
        writer.flush()?;
        if !head.keep_alive {
            return Ok(());
        }
    }
}

/// Answers `GET /bytes/N`: a head, then `bytes` zero bytes in large writes.
fn write_bulk(writer: &mut impl Write, bytes: u64, connection: &str) -> io::Result<()> {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {bytes}\r\nConnection: {connection}\r\n\r\n"
    );
    writer.write_all(head.as_bytes())?;
    let chunk = vec![0u8; BULK_WRITE_BYTES];
    let mut left = bytes;
    while left > 0 {
        let now = left.min(BULK_WRITE_BYTES as u64) as usize;
        writer.write_all(&chunk[..now])?;
        left -= now as u64;
    }
    writer.flush()
}

/// Reads the lines of one request head (request line first), without the empty line that ends
/// it; `None` when the client closed the connection between requests.
fn read_head(reader: &mut impl BufRead) -> io::Result<Option<Vec<String>>> {
    let mut lines = Vec::new();
    let mut total = 0;
    loop {
        let mut line = String::new();
        let read = reader
            .by_ref()
            .take((MAX_HEAD_BYTES - total + 1) as u64)
            .read_line(&mut line)?;
        if read == 0 {
            return if lines.is_empty() {
                Ok(None)
            } else {
                Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside a request head",
                ))
            };
        }
        total += read;
        if total > MAX_HEAD_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request head too large",
            ));
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            if lines.is_empty() {
                // Tolerate stray empty lines before a request line (RFC 9112 section 2.2).
                continue;
            }
            return Ok(Some(lines));
        }
        lines.push(line.to_owned());
    }
}

fn parse_head(lines: &[String]) -> Result<Head, String> {
    let request_line = lines.first().ok_or("empty request")?;
    let mut parts = request_line.split_whitespace();
    let (Some(_method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(format!("malformed request line {request_line:?}"));
    };
    let mut keep_alive = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        other => return Err(format!("unsupported version {other:?}")),
    };
    let mut content_length = 0;
    for line in &lines[1..] {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("malformed header {line:?}"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            content_length = value
                .parse()
                .map_err(|_| format!("bad Content-Length {value:?}"))?;
            if content_length > MAX_BODY_BYTES {
                return Err("request body too large".to_owned());
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("chunked request bodies are not supported".to_owned());
        }
    }
    Ok(Head {
        target: target.to_owned(),
        keep_alive,
        content_length,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Shutdown;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn http_1_1_keeps_the_connection_open_unless_told_to_close() {
        assert_eq!(
            parse_head(&lines("GET / HTTP/1.1\nHost: x")),
            Ok(Head {
                target: "/".to_owned(),
                keep_alive: true,
                content_length: 0
            })
        );
        assert_eq!(
            parse_head(&lines("GET / HTTP/1.1\nConnection: Close")),
            Ok(Head {
                target: "/".to_owned(),
                keep_alive: false,
                content_length: 0
            })
        );
        assert_eq!(
            parse_head(&lines("GET / HTTP/1.0\nConnection: keep-alive")),
            Ok(Head {
                target: "/".to_owned(),
                keep_alive: true,
                content_length: 0
            })
        );
        assert_eq!(
            parse_head(&lines("GET / HTTP/1.0")),
            Ok(Head {
                target: "/".to_owned(),
                keep_alive: false,
                content_length: 0
            })
        );
    }

    #[test]
    fn malformed_requests_are_refused() {
        assert!(parse_head(&lines("GET /")).is_err());
        assert!(parse_head(&lines("GET / HTTP/2.0")).is_err());
        assert!(parse_head(&lines("GET / HTTP/1.1\nno colon")).is_err());
        assert!(parse_head(&lines("POST / HTTP/1.1\nContent-Length: many")).is_err());
    }

    #[test]
    fn a_server_answers_with_the_body_on_every_request_of_a_connection() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            serve(stream, "pod-a\n").unwrap();
        });
        let mut client = TcpStream::connect(address).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        client
            .write_all(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        server.join().unwrap();
        assert_eq!(answer.matches("HTTP/1.1 200 OK").count(), 2, "{answer}");
        assert!(answer.contains("Connection: keep-alive"), "{answer}");
        assert!(
            answer.ends_with("Connection: close\r\n\r\npod-a\n"),
            "{answer}"
        );
        client.shutdown(Shutdown::Both).ok();
    }

    #[test]
    fn bytes_n_answers_n_bytes_and_the_connection_goes_on() {
        assert_eq!(
            parse_head(&lines("GET /bytes/123 HTTP/1.1"))
                .unwrap()
                .bulk_bytes(),
            Some(123)
        );
        assert_eq!(
            parse_head(&lines("GET /bytes/many HTTP/1.1"))
                .unwrap()
                .bulk_bytes(),
            None
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            serve(stream, "pod-a\n").unwrap();
        });
        let mut client = TcpStream::connect(address).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        client
            .write_all(
                b"GET /bytes/200000 HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nConnection: close\r\n\r\n",
            )
            .unwrap();
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).unwrap();
        server.join().unwrap();
        let text = String::from_utf8_lossy(&answer);
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("Content-Length: 200000\r\n"), "{text}");
        assert!(text.ends_with("Connection: close\r\n\r\npod-a\n"), "{text}");
        let zeros = answer.iter().filter(|byte| **byte == 0).count();
        assert_eq!(zeros, 200_000);
    }
}
