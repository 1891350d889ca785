//! One admin connection: HTTP/1.1, or HTTP/2 with prior knowledge (h2c) for
//! the gRPC health service, told apart by the 24-byte HTTP/2 preface.
//!
//! Both get the admin port's limits: the connection table's cap and shedding
//! ([`super::conns`]), `header_read_timeout` for the first bytes and, on
//! HTTP/2, for an idle connection (no open stream), few concurrent streams,
//! a small header list, small flow-control windows (so a connection buffers
//! little) and h2's reset-stream limits against rapid-reset floods.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use super::conns::{self, Busy, Slot, Table};
use super::{Admin, text};
use crate::config::AdminConfig;
use crate::grpc::health::{self, GrpcBody, Limits};
use crate::metrics::GrpcLabels;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Concurrent streams per HTTP/2 connection: a probe uses one, a health
/// client one per `Watch`.
pub const MAX_CONCURRENT_STREAMS: u32 = 8;
/// Largest decoded header list per HTTP/2 request (as for HTTP/1.1).
pub const MAX_HEADER_LIST: u32 = conns::MAX_BUF as u32;
/// Flow-control windows: a health request is a few bytes, so a peer may
/// have little in flight (hyper's default is 1 MiB each).
pub const STREAM_WINDOW: u32 = 16 * 1024;
/// Connection-level flow-control window.
pub const CONNECTION_WINDOW: u32 = 64 * 1024;
/// Bytes queued for sending per stream.
pub const MAX_SEND_BUF: usize = 16 * 1024;
/// Streams a client may reset before they are accepted before the connection
/// is closed (rapid reset), and stream errors we may answer with a reset.
pub const MAX_RESET_STREAMS: usize = 16;
/// Keep-alive pings on a quiet HTTP/2 connection with an open `Watch`, so a
/// vanished peer frees its stream.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a keep-alive ping may go unanswered.
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The protocol a connection speaks, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.x (anything that is not the HTTP/2 preface).
    Http1,
    /// HTTP/2 with prior knowledge.
    Http2,
}

/// The protocol of a connection that began with `first`, or `None` while
/// the bytes are still a proper prefix of the preface.
pub fn classify(first: &[u8]) -> Option<Protocol> {
    let n = first.len().min(PREFACE.len());
    if first[..n] != PREFACE[..n] {
        Some(Protocol::Http1)
    } else if n == PREFACE.len() {
        Some(Protocol::Http2)
    } else {
        None
    }
}

/// Reads until the protocol is known; `None` when the client closes or
/// sends too little within `timeout`.
async fn sniff(stream: &mut TcpStream, timeout: Duration) -> Option<(Protocol, Bytes)> {
    let mut first = Vec::with_capacity(PREFACE.len());
    let read = async {
        loop {
            if let Some(p) = classify(&first) {
                return Some(p);
            }
            let mut chunk = [0u8; PREFACE.len()];
            let want = PREFACE.len() - first.len();
            match stream.read(&mut chunk[..want]).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => first.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let protocol = tokio::time::timeout(timeout, read).await.ok()??;
    Some((protocol, Bytes::from(first)))
}

/// A stream whose first reads return the bytes already read to sniff it.
struct Prefixed {
    prefix: Bytes,
    io: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// The health service's limits for one admin server.
pub fn limits(config: &AdminConfig) -> Arc<Limits> {
    Arc::new(Limits {
        request_timeout: config.header_read_timeout,
        watches: Arc::new(Semaphore::new(config.grpc.max_watch_streams)),
    })
}

/// An admin response: the plain endpoints' or a gRPC one.
type AdminResponse = Response<Either<Full<Bytes>, GrpcBody>>;

/// Routes a request: gRPC (over HTTP/2 only) or the plain admin endpoints.
/// `open` counts the request as an open stream for as long as it lives (a
/// `Watch` keeps it for its stream).
async fn dispatch(
    admin: Arc<Admin>,
    req: Request<Incoming>,
    peer: SocketAddr,
    limits: Arc<Limits>,
    open: Busy,
) -> AdminResponse {
    if req.version() == Version::HTTP_2 && health::is_grpc(&req) {
        let (response, call) = health::handle(admin.clone(), req, &limits, open).await;
        let labels = GrpcLabels { method: call.method.into(), code: call.outcome.into() };
        admin.metrics.grpc_health_requests.get_or_create(&labels).inc();
        return response.map(Either::Right);
    }
    if req.uri().path().starts_with(health::SERVICE_PREFIX) {
        return text(StatusCode::HTTP_VERSION_NOT_SUPPORTED, "gRPC needs HTTP/2 (h2c with prior knowledge)\n")
            .map(Either::Left);
    }
    admin.handle(req, peer).await.map(Either::Left)
}

/// Serves one accepted admin connection until it ends or is shed, then
/// forgets it in `table`.
pub async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    admin: Arc<Admin>,
    slot: Slot,
    table: Table,
    limits: Arc<Limits>,
) {
    let config = admin.config.clone();
    let (protocol, prefix) = if config.grpc.enabled {
        // A connection shed before it said anything is closed now, not at
        // the timeout: a flood of silent connects must not pile up sockets.
        let sniffed = tokio::select! {
            s = sniff(&mut stream, config.header_read_timeout) => s,
            _ = slot.close.notified() => None,
        };
        match sniffed {
            Some(p) => p,
            None => {
                table.remove(slot.id);
                return;
            }
        }
    } else {
        (Protocol::Http1, Bytes::new())
    };
    let io = TokioIo::new(Prefixed { prefix, io: stream });
    let busy = slot.busy.clone();
    let open = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicU64::new(0));
    let service = {
        let (open, requests) = (open.clone(), requests.clone());
        service_fn(move |req| {
            let (admin, limits) = (admin.clone(), limits.clone());
            let busy = Busy::mark(&busy);
            let stream = Busy::mark(&open);
            requests.fetch_add(1, Ordering::Relaxed);
            async move {
                let _busy = busy;
                Ok::<_, Infallible>(dispatch(admin, req, peer, limits, stream).await)
            }
        })
    };
    match protocol {
        Protocol::Http1 => {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(config.header_read_timeout)
                .max_buf_size(conns::MAX_BUF)
                .max_headers(conns::MAX_HEADERS)
                .serve_connection(io, service);
            tokio::select! {
                _ = conn => {}
                _ = slot.close.notified() => {}
            }
        }
        Protocol::Http2 => {
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
                .max_header_list_size(MAX_HEADER_LIST)
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_send_buf_size(MAX_SEND_BUF)
                .max_pending_accept_reset_streams(MAX_RESET_STREAMS)
                .max_local_error_reset_streams(MAX_RESET_STREAMS)
                .keep_alive_interval(KEEP_ALIVE_INTERVAL)
                .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
                .serve_connection(io, service);
            tokio::pin!(conn);
            let idle = config.header_read_timeout;
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + idle, idle);
            let mut seen = 0;
            loop {
                tokio::select! {
                    _ = conn.as_mut() => break,
                    _ = slot.close.notified() => break,
                    _ = tick.tick() => {
                        // Idle for a whole period: no stream open and none begun.
                        let now = requests.load(Ordering::Relaxed);
                        if open.load(Ordering::Relaxed) == 0 && now == seen {
                            conn.as_mut().graceful_shutdown();
                            let _ = tokio::time::timeout(idle, conn.as_mut()).await;
                            break;
                        }
                        seen = now;
                    }
                }
            }
        }
    }
    table.remove(slot.id);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preface_alone_means_http2_and_any_other_byte_http1() {
        assert_eq!(classify(PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), None, "a prefix of the preface: read on");
        assert_eq!(classify(b"GET /readyz HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"POST / HTTP/1.1\r\n"), Some(Protocol::Http1), "P then O: not the preface");
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n\r\nXX"), Some(Protocol::Http1), "a broken preface");
    }
}
