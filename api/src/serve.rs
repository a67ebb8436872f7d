//! The HTTP server loop, with the connection limits a public endpoint needs.
//!
//! `axum::serve` keeps a connection for as long as the client likes: no deadline for the request
//! headers, none for a connection that sends nothing, and no cap on their number, so a few
//! hundred slow clients hold the server's sockets while the rate limiter, which sees only
//! complete requests, never notices. This loop serves the same router with:
//!
//! - a **header-read timeout** (`API_HEADER_READ_TIMEOUT_MS`): the head of each request must
//!   arrive within it, counted from when the server starts waiting for it, so a connection that
//!   sends nothing, trickles its headers, or idles between keep-alive requests is closed;
//! - an **idle timeout** (`API_IDLE_TIMEOUT_MS`): a connection on which no byte moves in either
//!   direction for this long is closed (a client that stops reading its response, a body that
//!   stalls). Event streams send a keep-alive comment more often than that;
//! - a **connection cap** (`API_MAX_CONNECTIONS`): beyond it the server stops accepting until a
//!   connection closes (new clients wait in the listen backlog);
//! - bounded request heads (`API_MAX_HEADER_BYTES`): a larger head is answered 431 with a
//!   problem document.
//!
//! Shutdown drains as before: no new connections, requests in flight finish, open event
//! streams are ended by the caller's hook.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower::ServiceExt;

/// The connection limits (see the module documentation).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
    pub max_header_bytes: usize,
}

/// Serves `router` on `listener` until `shutdown` completes, then drains: `on_shutdown` runs
/// (to end open streams) and the connections finish their requests in flight.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
    on_shutdown: impl FnOnce() + Send,
) -> io::Result<()> {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = router.clone().map_request(
            move |mut request: axum::http::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                request.map(axum::body::Body::new)
            },
        );
        let io = TokioIo::new(Watched::new(stream, limits.idle_timeout, peer));
        let connection =
            graceful.watch(builder.serve_connection(io, TowerToHyperService::new(service)));
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%peer, %error, "connection ended");
            }
            drop(permit);
        });
    }
    drop(listener);
    on_shutdown();
    graceful.shutdown().await;
    Ok(())
}

/// A TCP stream that fails once no byte moved for `idle` while the server waits on it, and
/// that answers hyper's bare `431` (request head too large) with a problem document.
struct Watched {
    stream: TcpStream,
    idle: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
    peer: SocketAddr,
    /// Bytes of the problem document still to send instead of hyper's empty 431.
    replacing: Option<(Vec<u8>, usize)>,
    /// Closing after a 431: reading what the client still sends, `drained` bytes so far.
    draining: bool,
    drained: usize,
}

/// How much of an oversized head is read and dropped after the 431, at most.
const DRAIN_LIMIT: usize = 4 * 1024 * 1024;

impl Watched {
    fn new(stream: TcpStream, idle: Duration, peer: SocketAddr) -> Self {
        Self {
            stream,
            idle,
            deadline: Box::pin(tokio::time::sleep(idle)),
            peer,
            replacing: None,
            draining: false,
            drained: 0,
        }
    }

    fn progressed(&mut self) {
        self.deadline
            .as_mut()
            .reset(tokio::time::Instant::now() + self.idle);
    }

    /// Pending I/O: an error once the idle deadline passed.
    fn pending_or_idle<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        if self.deadline.as_mut().poll(cx).is_ready() {
            tracing::debug!(peer = %self.peer, "closing an idle connection");
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no bytes moved within the idle timeout",
            )));
        }
        Poll::Pending
    }
}

/// hyper's answer to a request head over its buffer: a status line and no body.
const BARE_431: &[u8] = b"HTTP/1.1 431 ";

fn problem_431() -> Vec<u8> {
    let body = serde_json::json!({
        "type": "https://backbone.example/problems/request-header-fields-too-large",
        "title": "Request header fields too large",
        "status": 431,
        "detail": "the request's headers are larger than this API accepts; send fewer or \
                   shorter headers (tokens and cookies included)",
    })
    .to_string();
    format!(
        "HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: \
         application/problem+json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.progressed();
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => this.pending_or_idle(cx),
        }
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.replacing.is_none() && buf.starts_with(BARE_431) {
            // hyper writes this head (content-length 0) and closes: send the problem instead,
            // and tell hyper its bytes went out.
            this.replacing = Some((problem_431(), 0));
        }
        if let Some((replacement, sent)) = &mut this.replacing {
            while *sent < replacement.len() {
                match Pin::new(&mut this.stream).poll_write(cx, &replacement[*sent..]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Ok(buf.len())),
                    Poll::Ready(Ok(n)) => *sent += n,
                    Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                    Poll::Pending => return this.pending_or_idle(cx),
                }
            }
            return Poll::Ready(Ok(buf.len()));
        }
        match Pin::new(&mut this.stream).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                if n > 0 {
                    this.progressed();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => this.pending_or_idle(cx),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.replacing.is_none() {
            return Pin::new(&mut this.stream).poll_shutdown(cx);
        }
        // After the 431 the client may still be sending its oversized head: closing with those
        // bytes unread would reset the connection and lose the answer. So end our side, then
        // read and drop what still comes (to a bound, within the idle timeout) before closing.
        if !this.draining {
            std::task::ready!(Pin::new(&mut this.stream).poll_shutdown(cx))?;
            this.draining = true;
            this.drained = 0;
            let grace = this.idle.min(Duration::from_secs(2));
            this.deadline
                .as_mut()
                .reset(tokio::time::Instant::now() + grace);
        }
        let mut scratch = [0u8; 8192];
        while this.drained < DRAIN_LIMIT {
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.stream).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => this.drained += buf.filled().len(),
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Pending => {
                    return match this.pending_or_idle::<()>(cx) {
                        Poll::Ready(_) => Poll::Ready(Ok(())),
                        Poll::Pending => Poll::Pending,
                    }
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        // One buffer at a time keeps the 431 check on the start of what hyper writes.
        let first = bufs
            .iter()
            .find(|b| !b.is_empty())
            .map_or(&[][..], |b| &b[..]);
        self.poll_write(cx, first)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}
