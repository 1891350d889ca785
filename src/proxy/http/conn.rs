//! A client connection's shared state: what its timer notes and decides
//! (idle close, slow head, parking, the upstream response deadline), the
//! socket wrapper that notes when a request head starts, and the
//! per-request guards.

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::header::HeaderValue;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::Worker;
use crate::proxy::accept::Permit;

// === client connections ===

/// State shared between a client connection's socket wrapper, its timer
/// and its requests. Atomics only because hyper's upgrade support requires
/// a `Send` socket type; every access is from one thread, so plain relaxed
/// loads and stores (no read-modify-write) suffice and cost nothing.
pub(super) struct IoState {
    pub(super) epoch: Instant,
    /// Requests whose response is not finished.
    pub(super) busy: AtomicU32,
    /// When the current request head started arriving (ns since `epoch` + 1; 0 = none).
    pub(super) head_started: AtomicU64,
    /// When the connection last became idle (ns since `epoch`).
    pub(super) idle_since: AtomicU64,
    /// Set while hyper is being shut down to park the connection: the
    /// socket's shutdown is then skipped, so the client sees nothing.
    pub(super) parking: AtomicBool,
}

/// What the connection timer decided.
pub(super) enum Tick {
    Rearm(Instant),
    /// Idle for `client_idle_timeout`: close gracefully.
    Idle,
    /// A request head took longer than `header_read_timeout`: drop it.
    SlowHead,
    /// Idle for [`PARK_AFTER`]: release hyper's per-connection state.
    Park,
}

/// A keep-alive connection idle this long is parked: hyper's connection
/// state (an 8 KiB read buffer that hyper never shrinks, the request-future
/// slot, a cached header map) is dropped and the bare socket is watched for
/// readability; the next request gets a fresh hyper connection. Parking
/// costs a few microseconds, so it is kept for connections idle long enough
/// to matter for memory (thousands of idle keep-alive clients), never for
/// one between two requests of a busy client.
pub const PARK_AFTER: Duration = Duration::from_millis(100);

impl IoState {
    pub(super) fn new(epoch: Instant) -> IoState {
        // A new connection is waiting for its first request head.
        IoState {
            epoch,
            busy: AtomicU32::new(0),
            head_started: AtomicU64::new(1),
            idle_since: AtomicU64::new(0),
            parking: AtomicBool::new(false),
        }
    }

    pub(super) fn nanos(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    pub(super) fn at(&self, nanos: u64) -> Instant {
        self.epoch + Duration::from_nanos(nanos)
    }

    pub(super) fn begin_request(&self) {
        self.busy.store(self.busy.load(Relaxed) + 1, Relaxed);
        self.head_started.store(0, Relaxed);
    }

    pub(super) fn end_request(&self) {
        let n = self.busy.load(Relaxed) - 1;
        self.busy.store(n, Relaxed);
        if n == 0 {
            self.idle_since.store(self.nanos(Instant::now()), Relaxed);
        }
    }

    /// Bytes arrived: if no request is in progress, a head is starting.
    #[inline]
    pub(super) fn on_read(&self) {
        if self.busy.load(Relaxed) == 0 && self.head_started.load(Relaxed) == 0 {
            self.head_started.store(self.nanos(Instant::now()) + 1, Relaxed);
        }
    }

    pub(super) fn tick(&self, now: Instant, w: &Worker) -> Tick {
        if self.busy.load(Relaxed) > 0 {
            return Tick::Rearm(now + w.tick);
        }
        let head = self.head_started.load(Relaxed);
        if head != 0 {
            if let Some(t) = w.header_read_timeout {
                let due = self.at(head - 1) + t;
                return if now >= due { Tick::SlowHead } else { Tick::Rearm(due.min(now + w.tick)) };
            }
            return Tick::Rearm(now + w.tick);
        }
        let idle_since = self.at(self.idle_since.load(Relaxed));
        if w.client_idle_timeout.is_some_and(|t| now >= idle_since + t) {
            return Tick::Idle;
        }
        if now >= idle_since + PARK_AFTER {
            return Tick::Park;
        }
        // Wake at least every `tick`: a head that starts arriving meanwhile
        // is then held to `header_read_timeout` (within one tick).
        Tick::Rearm(now + w.tick)
    }

    /// When a parked connection reaches `client_idle_timeout`.
    pub(super) fn idle_deadline(&self, w: &Worker) -> Option<Instant> {
        w.client_idle_timeout.map(|t| self.at(self.idle_since.load(Relaxed)) + t)
    }
}

/// The client socket: notes when a request head starts arriving.
pub(super) struct ClientIo {
    pub(super) stream: TcpStream,
    pub(super) state: Arc<IoState>,
    /// Bytes hyper had read but not parsed when the connection was parked
    /// (normally none); served before the socket.
    pub(super) prefix: Bytes,
}

impl AsyncRead for ClientIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            this.state.on_read();
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.state.on_read();
        }
        r
    }
}

impl AsyncWrite for ClientIo {
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
        let this = self.get_mut();
        if this.state.parking.load(Relaxed) {
            // hyper is being retired, not the connection.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.stream).poll_shutdown(cx)
    }
}

/// One client connection, shared by its requests (and an upgraded tunnel).
pub(super) struct Conn {
    pub(super) worker: Rc<Worker>,
    pub(super) state: Arc<IoState>,
    /// The client's address as an `X-Forwarded-For` element, built once.
    pub(super) peer: HeaderValue,
    /// When the request waiting on the app (hyper serves one request at a
    /// time per connection) times out with `504`; checked by the connection
    /// timer, so no timer is armed per request.
    pub(super) upstream_due: Cell<Option<Instant>>,
    /// Set by the connection timer once `upstream_due` passed.
    pub(super) upstream_expired: Cell<bool>,
    /// Returned when the last reference goes (an upgraded tunnel keeps it
    /// after hyper let go).
    pub(super) _permit: Permit,
}

impl Conn {
    /// Called when the connection timer fires: marks an overdue upstream
    /// wait expired, and returns when the timer must fire next for it.
    pub(super) fn check_upstream(&self, now: Instant) -> Option<Instant> {
        let due = self.upstream_due.get()?;
        if now >= due {
            self.upstream_expired.set(true);
            return None;
        }
        Some(due)
    }
}

/// Clears the connection's upstream deadline when the wait ends (or the
/// request is dropped).
pub(super) struct UpstreamWait<'a>(pub(super) &'a Conn);

impl Drop for UpstreamWait<'_> {
    fn drop(&mut self) {
        self.0.upstream_due.set(None);
        self.0.upstream_expired.set(false);
    }
}

/// Marks a request in progress until its response body is done.
pub(super) struct Busy(pub(super) Rc<Conn>);

impl Busy {
    pub(super) fn begin(conn: Rc<Conn>) -> Busy {
        conn.state.begin_request();
        Busy(conn)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.state.end_request();
    }
}
