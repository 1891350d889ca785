//! The worker's pool of idle keep-alive connections to the app, and
//! opening new ones.

use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, sleep_until};
use tracing::debug;

use super::Worker;
use super::answer::Fail;
use super::body::ReqBody;
use crate::net;

/// An idle upstream connection.
pub(super) struct Pooled {
    pub(super) tx: SendRequest<ReqBody>,
    pub(super) since: Instant,
    /// Bytes read from it so far (see [`UpstreamIo`]).
    pub(super) read: Arc<AtomicU64>,
}

/// The app's socket, counting the bytes read from it: hyper reports a
/// connection closed before a complete response the same way whether or
/// not part of one arrived, and a request is replayed only if not one byte
/// of an answer did. Atomic only because hyper's upgrades need a `Send`
/// socket; one thread touches it (a relaxed load and store).
pub(super) struct UpstreamIo {
    stream: TcpStream,
    read: Arc<AtomicU64>,
}

impl AsyncRead for UpstreamIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.stream).poll_read(cx, buf);
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            this.read.store(this.read.load(Relaxed) + n, Relaxed);
        }
        r
    }
}

impl AsyncWrite for UpstreamIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

impl Worker {
    /// An idle pooled connection ready for a request, if any, how long it
    /// was idle, and its read count.
    pub(super) fn checkout(&self) -> Option<(SendRequest<ReqBody>, Duration, Arc<AtomicU64>)> {
        let mut pool = self.pool.borrow_mut();
        let now = Instant::now();
        while let Some(mut p) = pool.pop_back() {
            if self.upstream_idle_timeout.is_some_and(|t| p.since + t <= now) {
                // The newest one expired, so did every older one.
                pool.clear();
                return None;
            }
            // One poll: a connection still busy (e.g. the app answered before
            // the request body was sent in full) is not reusable; drop it.
            let waker = std::task::Waker::noop();
            if let Poll::Ready(Ok(())) = p.tx.poll_ready(&mut Context::from_waker(waker)) {
                return Some((p.tx, now - p.since, p.read));
            }
        }
        None
    }

    /// Returns a connection whose exchange completed to the pool.
    pub(super) fn checkin(&self, tx: SendRequest<ReqBody>, read: Arc<AtomicU64>) {
        let max = self.ctx.config.http.upstream_pool_max_idle;
        if max == 0 || tx.is_closed() {
            return;
        }
        let mut pool = self.pool.borrow_mut();
        if pool.len() >= max {
            pool.pop_front();
        }
        pool.push_back(Pooled { tx, since: Instant::now(), read });
    }

    /// Opens a new upstream connection (resolving the host each time, every
    /// address tried, bounded by `upstream_connect_timeout`).
    pub(super) async fn connect(&self) -> Result<(SendRequest<ReqBody>, Arc<AtomicU64>), Fail> {
        let budget = self.connect_timeout.unwrap_or(Duration::from_secs(3600));
        let deadline = Instant::now() + budget;
        let upstream = &self.ctx.config.upstream;
        let addrs = net::resolve(upstream, deadline).await.map_err(|e| {
            debug!(upstream = %upstream.host, error = %e, "upstream resolve failed");
            Fail::Connect
        })?;
        let (stream, _) = net::connect_addrs(&addrs, deadline).await.map_err(|e| {
            debug!(error = %e, "upstream connect failed");
            Fail::Connect
        })?;
        let read = Arc::<AtomicU64>::default();
        let io = UpstreamIo { stream, read: read.clone() };
        let (tx, conn) = self.client.handshake(TokioIo::new(io)).await.map_err(|e| {
            debug!(error = %e, "upstream handshake failed");
            Fail::Connect
        })?;
        tokio::task::spawn_local(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok((tx, read))
    }
}

/// Closes idle upstream connections once they are `upstream_idle_timeout`
/// old (dropping the last `SendRequest` ends hyper's connection task).
pub(super) async fn sweep_pool(w: Rc<Worker>) {
    let Some(timeout) = w.upstream_idle_timeout else { return };
    loop {
        let next = w.pool.borrow().front().map(|p| p.since + timeout);
        sleep_until(next.unwrap_or_else(|| Instant::now() + timeout)).await;
        let now = Instant::now();
        let mut pool = w.pool.borrow_mut();
        while pool.front().is_some_and(|p| p.since + timeout <= now) {
            pool.pop_front();
        }
        pool.retain(|p| !p.tx.is_closed());
    }
}
