//! Copying a connection's bytes both ways until both sides are done, with half-close passed
//! on (end of one direction → shutdown of the writer the other side reads) and resets passed
//! on (an error on either side → a TCP reset to the client, a stream reset into the tunnel).

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const BUFFER_BYTES: usize = 64 * 1024;
/// The QUIC application error code of a stream reset by the proxy.
pub(crate) const RESET_CODE: u32 = 1;

/// Copies `reader` into `writer` until the reader's end, then shuts the writer down; counts
/// every byte in each of `counters`.
async fn pump<R, W>(reader: &mut R, writer: &mut W, counters: &[&AtomicU64]) -> io::Result<()>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut buffer = vec![0u8; BUFFER_BYTES];
    loop {
        let read = reader.read(&mut buffer).await?;
        if read == 0 {
            return writer.shutdown().await;
        }
        writer.write_all(&buffer[..read]).await?;
        for counter in counters {
            counter.fetch_add(read as u64, Ordering::Relaxed);
        }
    }
}

/// Makes the next close of `stream` a reset (RST) instead of an orderly FIN.
pub(crate) fn reset_on_close(stream: &TcpStream) {
    if let Err(error) = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(%error, "set SO_LINGER 0");
    }
}

/// Splices a client connection and a connection to the endpoint.
pub(crate) async fn tcp_to_tcp(mut client: TcpStream, mut backend: TcpStream, bytes: &AtomicU64) {
    let outcome = {
        let (mut client_read, mut client_write) = client.split();
        let (mut backend_read, mut backend_write) = backend.split();
        let counters = [bytes];
        tokio::try_join!(
            pump(&mut client_read, &mut backend_write, &counters),
            pump(&mut backend_read, &mut client_write, &counters),
        )
    };
    if let Err(error) = outcome {
        tracing::debug!(%error, "spliced connection ended with an error; resetting both sides");
        reset_on_close(&client);
        reset_on_close(&backend);
    }
}

/// Splices a TCP connection and a tunnel stream; `sent` counts bytes into the tunnel,
/// `received` bytes out of it.
pub(crate) async fn tcp_to_stream(
    mut tcp: TcpStream,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    bytes: &AtomicU64,
    sent: &AtomicU64,
    received: &AtomicU64,
) {
    let outcome = {
        let (mut tcp_read, mut tcp_write) = tcp.split();
        let (outward, inward) = ([bytes, sent], [bytes, received]);
        tokio::try_join!(
            pump(&mut tcp_read, &mut send, &outward),
            pump(&mut recv, &mut tcp_write, &inward),
        )
    };
    if let Err(error) = outcome {
        tracing::debug!(%error, "tunnelled connection ended with an error; resetting both sides");
        let code = quinn::VarInt::from_u32(RESET_CODE);
        let _ = send.reset(code);
        let _ = recv.stop(code);
        reset_on_close(&tcp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let (connected, accepted) = tokio::join!(TcpStream::connect(address), listener.accept());
        (connected.expect("connect"), accepted.expect("accept").0)
    }

    #[tokio::test]
    async fn a_half_close_reaches_the_endpoint_and_its_reply_still_comes_back() {
        // client ⇄ (proxy_client ⇄ proxy_backend) ⇄ endpoint
        let (mut client, proxy_client) = pair().await;
        let (proxy_backend, mut endpoint) = pair().await;
        let bytes = AtomicU64::new(0);
        let splice = tcp_to_tcp(proxy_client, proxy_backend, &bytes);
        let exchange = async {
            client.write_all(b"question").await.expect("write");
            client.shutdown().await.expect("half-close");
            let mut asked = Vec::new();
            endpoint
                .read_to_end(&mut asked)
                .await
                .expect("read to the end");
            assert_eq!(asked, b"question");
            endpoint.write_all(b"answer").await.expect("reply");
            endpoint.shutdown().await.expect("close");
            let mut answer = Vec::new();
            client
                .read_to_end(&mut answer)
                .await
                .expect("read the reply");
            assert_eq!(answer, b"answer");
        };
        tokio::time::timeout(Duration::from_secs(5), async {
            tokio::join!(splice, exchange)
        })
        .await
        .expect("the splice ends once both sides closed");
        assert_eq!(bytes.load(Ordering::Relaxed), 14);
    }

    #[tokio::test]
    async fn a_reset_endpoint_resets_the_client() {
        let (mut client, proxy_client) = pair().await;
        let (proxy_backend, endpoint) = pair().await;
        let bytes = AtomicU64::new(0);
        let splice = tcp_to_tcp(proxy_client, proxy_backend, &bytes);
        let exchange = async {
            reset_on_close(&endpoint);
            drop(endpoint);
            let mut reply = Vec::new();
            let outcome = client.read_to_end(&mut reply).await;
            assert!(
                outcome.is_err(),
                "the client was closed, not reset: {outcome:?}"
            );
        };
        tokio::time::timeout(Duration::from_secs(5), async {
            tokio::join!(splice, exchange)
        })
        .await
        .expect("the splice ends");
    }
}
