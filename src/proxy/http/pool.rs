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
        let idle_timeout = self.limits.borrow().1.upstream_idle_timeout;
        while let Some(mut p) = pool.pop_back() {
            if idle_timeout.is_some_and(|t| p.since + t <= now) {
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
        let max = self.limits.borrow().1.pool_max_idle;
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
    pub(super) async fn connect(
        &self,
        timeout: Option<Duration>,
    ) -> Result<(SendRequest<ReqBody>, Arc<AtomicU64>), Fail> {
        let (stream, _) = self.connect_upstream(timeout).await?;
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

    /// A socket to the app: its host resolved each time, every address
    /// tried, within `upstream_connect_timeout`; with that deadline, which
    /// the protocol handshake that follows shares.
    pub(super) async fn connect_upstream(&self, timeout: Option<Duration>) -> Result<(TcpStream, Instant), Fail> {
        let budget = timeout.unwrap_or(Duration::from_secs(3600));
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
        Ok((stream, deadline))
    }
}

/// An idle upstream connection unused this long is closed, unless it is one
/// of the [`POOL_KEEP_IDLE`] most recently used: hyper keeps an 8 KiB read
/// buffer, an 8 KiB write buffer and about 9 KiB of state for each pooled
/// connection, so a pool filled by a burst (up to
/// `upstream_pool_max_idle`, 256 by default: 6.4 MiB) shrinks back within
/// this time once the burst is over. Under steady load every pooled
/// connection is reused within milliseconds and none is closed.
pub const POOL_SHRINK_AFTER: Duration = Duration::from_secs(1);
/// Idle upstream connections kept past [`POOL_SHRINK_AFTER`] (until
/// `upstream_idle_timeout`), so that a quiet client's next requests need no
/// new connection to the app.
pub const POOL_KEEP_IDLE: usize = 8;

/// How many of the oldest idle connections (`since`: when each became
/// idle, oldest first; `len` of them) are due to close at `now`: those
/// past `upstream_idle_timeout`, and those past [`POOL_SHRINK_AFTER`]
/// beyond the newest [`POOL_KEEP_IDLE`].
pub(super) fn pool_due(
    since: impl Iterator<Item = Instant>,
    len: usize,
    now: Instant,
    timeout: Option<Duration>,
) -> usize {
    let mut n = 0;
    for t in since {
        let shrink = len - n > POOL_KEEP_IDLE && t + POOL_SHRINK_AFTER <= now;
        if !(shrink || timeout.is_some_and(|d| t + d <= now)) {
            break;
        }
        n += 1;
    }
    n
}

/// When the sweeper looks at the pool next: when its oldest connection
/// (idle since `oldest`, `len` in the pool) is due.
pub(super) fn pool_next_sweep(oldest: Option<Instant>, len: usize, now: Instant, timeout: Option<Duration>) -> Instant {
    let Some(t) = oldest else {
        // Empty: checked again after the shrink delay (a check-in does not wake the sweeper).
        return now + POOL_SHRINK_AFTER;
    };
    // A pool of a few connections may grow by a burst while the sweeper
    // sleeps (a check-in does not wake it): it looks again within the
    // shrink delay, so a burst's pool shrinks back within twice that.
    let shrink = if len > POOL_KEEP_IDLE { t + POOL_SHRINK_AFTER } else { now + POOL_SHRINK_AFTER };
    let expire = timeout.map(|d| t + d);
    expire.map_or(shrink, |e| e.min(shrink)).max(now)
}

/// Closes idle upstream connections once they are `upstream_idle_timeout`
/// old, and shrinks the pool after a burst (see [`POOL_SHRINK_AFTER`]);
/// dropping the last `SendRequest` ends hyper's connection task.
pub(super) async fn sweep_pool(w: Rc<Worker>) {
    loop {
        // The settings in force: the sweeper, which runs at least every
        // `POOL_SHRINK_AFTER`, takes a reload's pool settings to the worker.
        let timeout = w.limits().upstream_idle_timeout;
        let next = {
            let pool = w.pool.borrow();
            pool_next_sweep(pool.front().map(|p| p.since), pool.len(), Instant::now(), timeout)
        };
        // Never busier than the shrink delay allows.
        sleep_until(next.max(Instant::now() + Duration::from_millis(100))).await;
        let now = Instant::now();
        let mut pool = w.pool.borrow_mut();
        let due = pool_due(pool.iter().map(|p| p.since), pool.len(), now, timeout);
        pool.drain(..due);
        pool.retain(|p| !p.tx.is_closed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn after_a_burst_the_pool_shrinks_to_the_newest_few() {
        let t0 = Instant::now();
        // 20 connections idle since t0 .. t0 + 19 ms (oldest first).
        let since = || (0..20u32).map(|i| t0 + MS * i);
        assert_eq!(pool_due(since(), 20, t0 + MS * 999, None), 0, "none idle for the shrink delay yet");
        assert_eq!(pool_due(since(), 20, t0 + POOL_SHRINK_AFTER + MS * 5, None), 6, "the 6 idle long enough");
        assert_eq!(pool_due(since(), 20, t0 + MS * 60_000, None), 20 - POOL_KEEP_IDLE, "the newest are kept");
        assert_eq!(pool_due(since(), 20, t0 + MS * 60_000, Some(MS * 30_000)), 20, "until the idle timeout");
        assert_eq!(pool_due(since().take(3), 3, t0 + MS * 60_000, None), 0, "a small pool is left alone");
    }

    #[test]
    fn the_sweeper_wakes_when_the_oldest_connection_is_due() {
        let t0 = Instant::now();
        let idle = Some(MS * 30_000);
        assert_eq!(pool_next_sweep(Some(t0), 20, t0, idle), t0 + POOL_SHRINK_AFTER);
        let later = t0 + MS * 10_000;
        assert_eq!(
            pool_next_sweep(Some(t0), 3, later, idle),
            later + POOL_SHRINK_AFTER,
            "few, none due: look again within the shrink delay, in case a burst filled the pool meanwhile"
        );
        assert_eq!(pool_next_sweep(Some(t0), 3, t0 + MS * 29_500, idle), t0 + MS * 30_000, "the idle timeout first");
        assert_eq!(pool_next_sweep(Some(t0), 3, t0, None), t0 + POOL_SHRINK_AFTER, "nothing due: look again later");
        assert_eq!(pool_next_sweep(None, 0, t0, idle), t0 + POOL_SHRINK_AFTER);
        assert_eq!(pool_next_sweep(Some(t0), 20, t0 + MS * 5000, idle), t0 + MS * 5000, "overdue: now");
    }
}
