//! How much of the data plane one peer, and all peers together, can take up.
//!
//! Every call is bounded by the frame [`Limits`](hearth_proto::Limits); these bound how
//! many there are. A connection may carry [`MAX_STREAMS_PER_CONNECTION`] calls at once
//! (HTTP/2 makes a client wait for a free one); the server holds at most
//! [`MAX_CONNECTIONS`] connections, and leaves further ones waiting in the listen
//! backlog until one closes. A connection that has not opened HTTP/2 [`PREFACE_TIMEOUT`]
//! after it is accepted is closed, so idle sockets cannot hold those places; one whose
//! peer stops answering HTTP/2 pings is closed too, so a peer that vanished without a
//! FIN does not hold them either.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::Server;

/// Concurrent calls on one connection. A pipeline link is one long-lived `Stream` per
/// neighbour, plus short probes and handshakes: far fewer.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;

/// Calls of one connection whose handler is still running (not yet answering with a
/// stream); the rest wait. Handlers answer at once, so this only matters under a flood.
pub const MAX_PENDING_CALLS_PER_CONNECTION: usize = 32;

/// Connections held at once: a few per peer and path, for the largest cluster
/// (256 stages) and then some.
pub const MAX_CONNECTIONS: usize = 512;

/// How often the server pings a connection, and how long it waits for the answer
/// before closing it.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long an accepted connection may take to send the HTTP/2 preface, which a real
/// client sends at once.
pub const PREFACE_TIMEOUT: Duration = Duration::from_secs(5);

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`: a peer dribbling it a byte at a time holds no place
/// for longer than [`PREFACE_TIMEOUT`] either.
const HTTP2_PREFACE_LEN: usize = 24;

/// The data plane's gRPC server, with the per-connection limits and keepalive.
pub fn server() -> Server {
    Server::builder()
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .concurrency_limit_per_connection(MAX_PENDING_CALLS_PER_CONNECTION)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
}

/// The connections accepted on `listener`, at most `max_connections` open at once.
///
/// `serve_with_incoming` ignores the server's TCP settings, so `TCP_NODELAY` (which a
/// token-per-hop pipeline needs) is set here. Runs on the current runtime.
pub fn incoming(listener: TcpListener, max_connections: usize) -> ReceiverStream<io::Result<LimitedConnection>> {
    // A queue of one: a connection is only taken off the backlog when the server is
    // ready for it.
    let (accepted, incoming) = mpsc::channel(1);
    let places = Arc::new(Semaphore::new(max_connections));
    tokio::spawn(async move {
        loop {
            let Ok(place) = places.clone().acquire_owned().await else { return };
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, or a connection reset before it was
                    // accepted: wait a moment rather than spin, and go on.
                    tracing::warn!("data plane cannot accept a connection: {error}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!("cannot set TCP_NODELAY on a data plane connection: {error}");
            }
            let connection = LimitedConnection {
                stream,
                _place: place,
                preface_deadline: Some(Box::pin(tokio::time::sleep(PREFACE_TIMEOUT))),
                preface_missing: HTTP2_PREFACE_LEN,
            };
            if accepted.send(Ok(connection)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(incoming)
}

/// An accepted connection holding one of the server's places until it closes.
pub struct LimitedConnection {
    stream: TcpStream,
    _place: OwnedSemaphorePermit,
    /// Until the whole HTTP/2 preface has arrived.
    preface_deadline: Option<Pin<Box<Sleep>>>,
    /// Bytes of the preface still to come.
    preface_missing: usize,
}

impl AsyncRead for LimitedConnection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let filled = buf.filled().len();
        let read = Pin::new(&mut self.stream).poll_read(cx, buf);
        let Some(deadline) = &mut self.preface_deadline else { return read };
        match read {
            Poll::Ready(Ok(())) => {
                let arrived = buf.filled().len() - filled;
                self.preface_missing = self.preface_missing.saturating_sub(arrived);
                if self.preface_missing == 0 {
                    self.preface_deadline = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if deadline.as_mut().poll(cx).is_ready() => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the peer did not open HTTP/2 in time after connecting",
            ))),
            other => other,
        }
    }
}

impl AsyncWrite for LimitedConnection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
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

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The peer's address, for the handlers' logs.
impl Connected for LimitedConnection {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.stream.connect_info()
    }
}
