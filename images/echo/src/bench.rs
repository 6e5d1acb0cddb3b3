//! The load client of the data-path benchmarks (`chaos-tests`' `bench-services`), run inside a
//! pod (`docker exec <container> /flotilla-echo bench ...`) against another `flotilla-echo`:
//!
//! `flotilla-echo bench throughput --target IP:PORT --bytes N [--timeout-seconds S]`
//!   One connection, one `GET /bytes/N`. The clock runs from the write of the request to the
//!   last byte of the body read (the connection's setup is not counted). Prints one JSON line:
//!   `bytes`, `seconds`, `megabytes_per_second` (10^6 bytes), `first_byte_us`.
//!
//! `flotilla-echo bench latency --target IP:PORT --rate R --count C [--warmup W] [--timeout-seconds S]`
//!   One persistent connection; after W requests that are not measured, C small requests
//!   (`GET /`, answered with the server's hostname) on a fixed schedule of R per second: request
//!   i is due at start + i/R. A request is written when it is due, or at once when the previous
//!   answer came late. Its latency runs from its write to the end of its answer, except that a
//!   request held back by a late answer counts from the time it was due (so a slow answer also
//!   delays, and is charged to, the requests queued behind it, as with an open-loop client).
//!   Prints one JSON line: `server` (the hostname that answered), `count`, `rate`, `seconds`,
//!   `p50_us`, `p90_us`, `p99_us`, `max_us`, `mean_us`, `late` (requests written after their
//!   time because an answer was late).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

const USAGE: &str = "\
usage: flotilla-echo bench throughput --target IP:PORT --bytes N [--timeout-seconds S]
       flotilla-echo bench latency --target IP:PORT --rate R --count C [--warmup W] [--timeout-seconds S]";

/// The read buffer of the client: one read takes up to this much from the socket.
const READ_BUFFER_BYTES: usize = 256 * 1024;
/// An answer's head larger than this is refused.
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// A small answer's body larger than this is refused.
const MAX_SMALL_BODY_BYTES: u64 = 64 * 1024;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_WARMUP_REQUESTS: u64 = 100;
/// The longest schedule a latency run may have.
const MAX_LATENCY_RUN: Duration = Duration::from_secs(600);

/// Runs `bench ARGS...`; returns the exit code.
pub(crate) fn main(arguments: &[String]) -> i32 {
    match arguments.first().map(String::as_str) {
        Some("-h" | "--help" | "help") => {
            println!("{USAGE}");
            0
        }
        Some(mode @ ("throughput" | "latency")) => {
            let outcome = Options::parse(&arguments[1..]).and_then(|options| {
                if mode == "throughput" {
                    throughput(&options)
                } else {
                    latency(&options)
                }
                .map_err(|error| format!("{}: {error}", options.target))
            });
            match outcome {
                Ok(json) => {
                    println!("{json}");
                    0
                }
                Err(error) => {
                    eprintln!("flotilla-echo bench {mode}: {error}");
                    1
                }
            }
        }
        _ => {
            eprintln!("{USAGE}");
            2
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Options {
    target: SocketAddr,
    bytes: u64,
    rate: f64,
    count: u64,
    warmup: u64,
    timeout: Duration,
}

impl Options {
    fn parse(arguments: &[String]) -> Result<Options, String> {
        let mut target = None;
        let mut options = Options {
            target: SocketAddr::from(([0, 0, 0, 0], 0)),
            bytes: 0,
            rate: 0.0,
            count: 0,
            warmup: DEFAULT_WARMUP_REQUESTS,
            timeout: DEFAULT_TIMEOUT,
        };
        let mut rest = arguments.iter();
        while let Some(flag) = rest.next() {
            let value = rest
                .next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
            let number = |what: &str| -> Result<u64, String> {
                value
                    .parse::<u64>()
                    .map_err(|_| format!("{what} {value:?}: not a whole number"))
            };
            match flag.as_str() {
                "--target" => {
                    target = Some(
                        value
                            .to_socket_addrs()
                            .map_err(|error| format!("--target {value:?}: {error}"))?
                            .next()
                            .ok_or_else(|| format!("--target {value:?}: no address"))?,
                    )
                }
                "--bytes" => options.bytes = number("--bytes")?,
                "--count" => options.count = number("--count")?,
                "--warmup" => options.warmup = number("--warmup")?,
                "--timeout-seconds" => {
                    options.timeout = Duration::from_secs(number("--timeout-seconds")?.max(1))
                }
                "--rate" => {
                    options.rate = value
                        .parse::<f64>()
                        .ok()
                        .filter(|rate| rate.is_finite() && *rate > 0.0)
                        .ok_or_else(|| format!("--rate {value:?}: not a positive number"))?
                }
                other => return Err(format!("unknown flag {other}\n{USAGE}")),
            }
        }
        options.target = target.ok_or_else(|| format!("--target is required\n{USAGE}"))?;
        Ok(options)
    }
}

fn connect(options: &Options) -> io::Result<(TcpStream, BufReader<TcpStream>)> {
    let stream = TcpStream::connect_timeout(&options.target, options.timeout)?;
    stream.set_read_timeout(Some(options.timeout))?;
    stream.set_write_timeout(Some(options.timeout))?;
    stream.set_nodelay(true)?;
    let reader = BufReader::with_capacity(READ_BUFFER_BYTES, stream.try_clone()?);
    Ok((stream, reader))
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// Reads an answer's head; returns its Content-Length (a `200 OK` is required).
fn read_answer_head(reader: &mut impl BufRead) -> io::Result<u64> {
    let mut status = None;
    let mut content_length = None;
    let mut total = 0;
    loop {
        let mut line = String::new();
        let read = reader
            .by_ref()
            .take((MAX_HEAD_BYTES - total + 1) as u64)
            .read_line(&mut line)?;
        if read == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection closed before an answer",
            ));
        }
        total += read;
        if total > MAX_HEAD_BYTES {
            return Err(invalid("answer head too large".into()));
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            break;
        }
        if status.is_none() {
            status = Some(line.to_owned());
        } else if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                content_length = Some(
                    value
                        .trim()
                        .parse::<u64>()
                        .map_err(|_| invalid(format!("bad Content-Length {value:?}")))?,
                );
            }
        }
    }
    let status = status.unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(invalid(format!("answered {status:?}")));
    }
    content_length.ok_or_else(|| invalid("answer without Content-Length".into()))
}

/// Reads and throws away `bytes` bytes of body.
fn discard(reader: &mut impl BufRead, bytes: u64) -> io::Result<()> {
    let mut left = bytes;
    while left > 0 {
        let available = reader.fill_buf()?;
        if available.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("the connection closed {left} bytes before the end of the body"),
            ));
        }
        let taken = available
            .len()
            .min(usize::try_from(left).unwrap_or(usize::MAX));
        reader.consume(taken);
        left -= taken as u64;
    }
    Ok(())
}

fn throughput(options: &Options) -> io::Result<String> {
    if options.bytes == 0 {
        return Err(invalid(format!("--bytes is required\n{USAGE}")));
    }
    let (mut stream, mut reader) = connect(options)?;
    let request = format!(
        "GET /bytes/{} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n",
        options.bytes
    );
    let started = Instant::now();
    stream.write_all(request.as_bytes())?;
    reader.fill_buf()?;
    let first_byte = started.elapsed();
    let length = read_answer_head(&mut reader)?;
    if length != options.bytes {
        return Err(invalid(format!(
            "asked for {} bytes, the answer has {length}",
            options.bytes
        )));
    }
    discard(&mut reader, length)?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(format!(
        "{{\"mode\":\"throughput\",\"target\":\"{}\",\"bytes\":{},\"seconds\":{seconds:.6},\"megabytes_per_second\":{:.1},\"first_byte_us\":{:.1}}}",
        options.target,
        options.bytes,
        options.bytes as f64 / seconds / 1e6,
        first_byte.as_secs_f64() * 1e6,
    ))
}

/// Sends one small request and reads its answer; returns the answer's body.
fn exchange(
    stream: &mut TcpStream,
    reader: &mut BufReader<TcpStream>,
    request: &[u8],
) -> io::Result<Vec<u8>> {
    stream.write_all(request)?;
    let length = read_answer_head(reader)?;
    if length > MAX_SMALL_BODY_BYTES {
        return Err(invalid(format!("a small answer of {length} bytes")));
    }
    let mut body = vec![0u8; length as usize];
    reader.read_exact(&mut body)?;
    Ok(body)
}

/// The `p`-th percentile (nearest rank) of ascending `sorted`, which is not empty.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn micros(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}

/// A JSON string literal of `text`.
fn json_string(text: &str) -> String {
    let mut quoted = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            c if u32::from(c) < 0x20 => quoted.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => quoted.push(c),
        }
    }
    quoted.push('"');
    quoted
}

fn latency(options: &Options) -> io::Result<String> {
    if options.count == 0 || options.rate == 0.0 {
        return Err(invalid(format!("--rate and --count are required\n{USAGE}")));
    }
    let interval = Duration::from_secs_f64(1.0 / options.rate);
    if interval.saturating_mul(u32::try_from(options.count).unwrap_or(u32::MAX)) > MAX_LATENCY_RUN {
        return Err(invalid(format!(
            "--count {} at --rate {} takes longer than {MAX_LATENCY_RUN:?}",
            options.count, options.rate
        )));
    }
    let (mut stream, mut reader) = connect(options)?;
    let request = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n";
    let mut server = String::new();
    for _ in 0..options.warmup.max(1) {
        let body = exchange(&mut stream, &mut reader, request)?;
        server = String::from_utf8_lossy(&body).trim().to_owned();
    }
    let mut samples = Vec::with_capacity(options.count as usize);
    let mut late = 0u64;
    let started = Instant::now();
    let mut previous_answered = started;
    for index in 0..options.count {
        let due = started + interval.mul_f64(index as f64);
        let now = Instant::now();
        if now < due {
            std::thread::sleep(due - now);
        }
        let written = Instant::now();
        // Held back by the previous answer (not by this client's own timer): charged from due.
        let from = if previous_answered > due {
            late += 1;
            due
        } else {
            written
        };
        exchange(&mut stream, &mut reader, request)?;
        previous_answered = Instant::now();
        samples.push(previous_answered - from);
    }
    let seconds = started.elapsed().as_secs_f64();
    samples.sort();
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    Ok(format!(
        "{{\"mode\":\"latency\",\"target\":\"{}\",\"server\":{},\"count\":{},\"rate\":{},\"seconds\":{seconds:.3},\"p50_us\":{:.1},\"p90_us\":{:.1},\"p99_us\":{:.1},\"max_us\":{:.1},\"mean_us\":{:.1},\"late\":{late}}}",
        options.target,
        json_string(&server),
        options.count,
        options.rate,
        micros(percentile(&samples, 50.0)),
        micros(percentile(&samples, 90.0)),
        micros(percentile(&samples, 99.0)),
        micros(percentile(&samples, 100.0)),
        micros(mean),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn strings(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_owned).collect()
    }

    fn server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(4) {
                let stream = stream.unwrap();
                std::thread::spawn(move || {
                    let _ = crate::serve(stream, "pod-b\n");
                });
            }
        });
        address
    }

    #[test]
    fn flags_are_parsed_and_checked() {
        let options = Options::parse(&strings(
            "--target 10.0.0.1:80 --rate 500 --count 10 --warmup 0",
        ))
        .unwrap();
        assert_eq!(options.target, "10.0.0.1:80".parse().unwrap());
        assert_eq!(
            (options.rate, options.count, options.warmup),
            (500.0, 10, 0)
        );
        assert!(Options::parse(&strings("--rate 5")).is_err());
        assert!(Options::parse(&strings("--target 10.0.0.1:80 --rate -1")).is_err());
        assert!(Options::parse(&strings("--target 10.0.0.1:80 --bogus 1")).is_err());
        assert!(Options::parse(&strings("--target")).is_err());
    }

    #[test]
    fn throughput_reads_every_byte_and_reports_json() {
        let target = server().to_string();
        let options =
            Options::parse(&strings(&format!("--target {target} --bytes 3000000"))).unwrap();
        let json = throughput(&options).unwrap();
        assert!(json.contains("\"bytes\":3000000"), "{json}");
        assert!(json.contains("\"megabytes_per_second\":"), "{json}");
    }

    #[test]
    fn latency_names_the_server_and_reports_percentiles() {
        let target = server().to_string();
        let options = Options::parse(&strings(&format!(
            "--target {target} --rate 2000 --count 50 --warmup 5"
        )))
        .unwrap();
        let json = latency(&options).unwrap();
        assert!(json.contains("\"server\":\"pod-b\""), "{json}");
        assert!(json.contains("\"count\":50"), "{json}");
        assert!(json.contains("\"p99_us\":"), "{json}");
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile(&samples, 50.0), Duration::from_micros(50));
        assert_eq!(percentile(&samples, 99.0), Duration::from_micros(99));
        assert_eq!(percentile(&samples, 100.0), Duration::from_micros(100));
        assert_eq!(json_string("a\"b"), "\"a\\\"b\"");
    }
}
