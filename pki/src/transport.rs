//! Mutual TLS under tonic: the server side accepts TCP connections, runs each TLS handshake
//! in its own task (bounded in time and number) and hands tonic the finished connections with
//! the peer's [`PeerInfo`] as connect info; the client side dials through a connector that
//! does the TLS handshake before HTTP/2 starts.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::identity::{Identity, PeerInfo};

/// The ALPN protocol of gRPC.
pub const GRPC_ALPN: &[u8] = b"h2";
/// A TLS handshake that takes longer than this is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once; further connections wait to be accepted.
const MAX_HANDSHAKES_IN_PROGRESS: usize = 256;

/// A server-side TLS connection with its peer's identity.
pub struct TlsConnection {
    stream: tokio_rustls::server::TlsStream<TcpStream>,
    info: PeerInfo,
}

impl Connected for TlsConnection {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Accepts connections on `listener` until the returned stream is dropped. Connections whose
/// handshake fails (no TLS, a certificate from another CA, an expired one) are closed and
/// logged; they never reach tonic.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> ReceiverStream<Result<TlsConnection, io::Error>> {
    let (sender, receiver) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES_IN_PROGRESS));
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                permit = handshakes.clone().acquire_owned() => permit,
                _ = sender.closed() => return,
            };
            let Ok(permit) = permit else { return };
            let (stream, remote_address) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::debug!(%error, "accept a connection");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
                _ = sender.closed() => return,
            };
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "set TCP_NODELAY");
            }
            let acceptor = acceptor.clone();
            let sender = sender.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match handshake(&acceptor, stream, remote_address).await {
                    Ok(connection) => {
                        let _ = sender.send(Ok(connection)).await;
                    }
                    Err(reason) => {
                        tracing::debug!(%remote_address, %reason, "refused a connection");
                    }
                }
            });
        }
    });
    ReceiverStream::new(receiver)
}

async fn handshake(
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    remote_address: SocketAddr,
) -> Result<TlsConnection, String> {
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
        .await
        .map_err(|_| "TLS handshake timed out".to_string())?
        .map_err(|error| format!("TLS handshake: {error}"))?;
    let identity = match stream.get_ref().1.peer_certificates() {
        Some([leaf, ..]) => {
            Some(Identity::from_certificate(leaf).map_err(|error| error.to_string())?)
        }
        _ => None,
    };
    Ok(TlsConnection {
        stream,
        info: PeerInfo {
            remote_address,
            identity,
        },
    })
}

/// Dials `uri`'s host and port and runs the TLS handshake.
async fn dial(
    connector: TlsConnector,
    uri: Uri,
) -> io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>> {
    let host = uri
        .host()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "address without a host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = uri
        .port_u16()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "address without a port"))?;
    let tcp = TcpStream::connect((host.as_str(), port)).await?;
    tcp.set_nodelay(true)?;
    let server_name = rustls::pki_types::ServerName::try_from(crate::authority::NODE_SERVER_NAME)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(server_name, tcp))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    Ok(TokioIo::new(tls))
}

fn service(
    config: Arc<rustls::ClientConfig>,
) -> impl tower::Service<
    Uri,
    Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    Error = io::Error,
    Future = impl std::future::Future<
        Output = io::Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>,
    > + Send,
> + Clone
       + Send
       + 'static {
    let connector = TlsConnector::from(config);
    tower::service_fn(move |uri: Uri| dial(connector.clone(), uri))
}

/// A channel that connects (and reconnects) on first use, over TLS with `config`.
pub fn lazy_channel(endpoint: &Endpoint, config: Arc<rustls::ClientConfig>) -> Channel {
    endpoint.connect_with_connector_lazy(service(config))
}

/// A channel connected now, over TLS with `config`.
pub async fn connect(
    endpoint: &Endpoint,
    config: Arc<rustls::ClientConfig>,
) -> Result<Channel, tonic::transport::Error> {
    endpoint.connect_with_connector(service(config)).await
}
