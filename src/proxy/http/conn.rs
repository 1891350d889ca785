//! A client connection's shared state: what its timer notes and decides
//! (idle close, slow head, parking, the upstream response deadline), the
//! socket wrapper that notes when a request head starts, and the
//! per-request guards.

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use bytes::Bytes;
use hyper::Uri;
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
    /// While the request line of the head being read has not ended: how
    /// many of its bytes arrived, plus one (0 = the line ended). See
    /// [`IoState::scan_line`].
    pub(super) line_open: AtomicU32,
    /// The length of the last request line followed to its end.
    pub(super) line_len: AtomicU32,
    /// Where a `#` (a fragment, which no request-target carries) sits in the
    /// request line of the head being read (0 = none): checked against the
    /// parsed request by [`IoState::take_fragment`].
    pub(super) fragment_at: AtomicU32,
    /// Set by the connection timer while a request is at the app: the next
    /// flush looks for a reset the client sent meanwhile (see
    /// [`ClientIo::poll_flush`]).
    pub(super) check_reset: AtomicBool,
    /// Set while `informational` holds bytes to write (checked without the lock).
    pub(super) informational_pending: AtomicBool,
    /// The app's 1xx responses to the current request, encoded for the
    /// client, and the connection task's waker (see `forward::relay_informational`).
    pub(super) informational: Mutex<Informational>,
}

/// 1xx responses waiting to be written to the client.
#[derive(Default)]
pub(super) struct Informational {
    bytes: Vec<u8>,
    /// Wakes the connection's task, which writes them.
    pub(super) waker: Option<Waker>,
}

/// The connection timer's limits, fixed per listener.
#[derive(Debug, Clone, Copy)]
pub(super) struct TimerConfig {
    /// A request head must arrive in full within this (none: no limit).
    pub(super) header_read_timeout: Option<Duration>,
    /// An idle keep-alive connection is closed after this (none: never).
    pub(super) client_idle_timeout: Option<Duration>,
    /// The longest the timer sleeps: the shortest of the two client
    /// timeouts, [`PARK_AFTER`] and the upstream response timeout, which
    /// bounds how late each is enforced. A parked connection's timer sleeps
    /// until its idle deadline instead.
    pub(super) tick: Duration,
}

/// What the connection timer does when it fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TimerAction {
    /// Nothing is due: sleep until then.
    Rearm(Instant),
    /// The request waiting on the app is past its deadline: mark it expired
    /// (it is answered `504`), and sleep until then.
    UpstreamTimeout(Instant),
    /// Idle for `client_idle_timeout`: close gracefully.
    Idle,
    /// A request head took longer than `header_read_timeout`: drop it.
    SlowHead,
    /// Idle for [`PARK_AFTER`]: release hyper's per-connection state.
    Park,
}

/// The timer's decision at `now`, from what the connection noted (`state`)
/// and the deadline of the request waiting on the app (`upstream_due`).
///
/// A request in progress is only held to its upstream deadline. Between
/// requests, a head that started arriving is held to `header_read_timeout`;
/// otherwise the connection is closed at `client_idle_timeout` and parked
/// after [`PARK_AFTER`] (closing wins when both are due).
pub(super) fn decide(state: &IoState, upstream_due: Option<Instant>, now: Instant, cfg: &TimerConfig) -> TimerAction {
    let next = now + cfg.tick;
    let rearm = if state.busy.load(Relaxed) > 0 {
        next
    } else if let Some(head) = state.head_started() {
        match cfg.header_read_timeout {
            Some(t) if now >= head + t => return TimerAction::SlowHead,
            Some(t) => (head + t).min(next),
            None => next,
        }
    } else {
        let idle_since = state.idle_since();
        if cfg.client_idle_timeout.is_some_and(|t| now >= idle_since + t) {
            return TimerAction::Idle;
        }
        if now >= idle_since + PARK_AFTER {
            return TimerAction::Park;
        }
        // Wake at least every `tick`: a head that starts arriving meanwhile
        // is then held to `header_read_timeout` (within one tick).
        next
    };
    match upstream_due {
        Some(due) if now >= due => TimerAction::UpstreamTimeout(rearm),
        Some(due) => TimerAction::Rearm(rearm.min(due)),
        None => TimerAction::Rearm(rearm),
    }
}

/// While a connection waits for a whole request head without hyper (see
/// [`read_head`]): when it is closed if the head is still not complete
/// (none: never). A head that started arriving is held to
/// `header_read_timeout`; an idle connection is closed at
/// `client_idle_timeout`, or earlier by the drain's rule (`drain`).
pub(super) fn head_wait_until(state: &IoState, cfg: &TimerConfig, drain: Option<DrainIdle>) -> Option<Instant> {
    match state.head_started() {
        Some(head) => cfg.header_read_timeout.map(|t| head + t),
        None => idle_due(state.idle_since(), cfg, drain),
    }
}

/// When a connection idle since `idle_since`, with no head arriving, is
/// closed if it stays so: at `client_idle_timeout` or by the drain's rule,
/// whichever comes first (none: never).
pub(super) fn idle_due(idle_since: Instant, cfg: &TimerConfig, drain: Option<DrainIdle>) -> Option<Instant> {
    let timeout = cfg.client_idle_timeout.map(|t| idle_since + t);
    let drained = drain.map(|d| idle_since.max(d.began) + d.delay);
    timeout.into_iter().chain(drained).min()
}

/// Headers a waited-for head may have before hyper is asked to decide
/// (hyper's default `max_headers`; more, and hyper applies its own limit).
const HEAD_WAIT_HEADERS: usize = 100;

/// Whether hyper can act on `buf` as it is: a whole request head, or bytes
/// its parser already refuses (answered `400` at once, as when hyper read
/// them itself). Parsed by hyper's parser with hyper's server options
/// (httparse, defaults), so only a head that is valid so far and not yet
/// complete is waited for. hyper too parses the whole buffer again on each
/// read of a head, so this costs no more per arrival than hyper did.
pub(super) fn head_ready(buf: &[u8]) -> bool {
    let mut headers = [const { std::mem::MaybeUninit::uninit() }; HEAD_WAIT_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut req, buf, &mut headers);
    !matches!(parsed, Ok(httparse::Status::Partial))
}

/// What one [`read_head`] round got.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum HeadRead {
    /// Bytes arrived (`buf` may now hold a whole head).
    Bytes,
    /// Nothing to read yet (readiness was stale).
    Nothing,
    /// The client closed its side (end of stream) before any byte of this round.
    Closed,
}

/// Reads what the client sent so far into `buf`, without waiting, up to
/// `limit` bytes in all: the buffer of a connection waiting for its next
/// request head without hyper. It grows with what arrives (starting at
/// 1 KiB) rather than being hyper's 8 KiB read buffer plus its 8 KiB write
/// buffer, so a client that trickles a head (slowloris) costs about the
/// bytes it sent. Stops at a short read: the next one would find nothing
/// (one `recvfrom` per segment, as hyper's read).
pub(super) fn read_head(stream: &TcpStream, buf: &mut Vec<u8>, limit: usize) -> io::Result<HeadRead> {
    let mut got = false;
    while buf.len() < limit {
        if buf.capacity() == buf.len() {
            buf.reserve_exact(buf.len().max(1024).min(limit - buf.len()));
        }
        let spare = buf.capacity() - buf.len();
        match stream.try_read_buf(buf) {
            Ok(0) => return Ok(if got { HeadRead::Bytes } else { HeadRead::Closed }),
            Ok(n) => {
                got = true;
                if n < spare {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => return Err(e),
        }
    }
    Ok(if got { HeadRead::Bytes } else { HeadRead::Nothing })
}

/// The drain's rule for idle client connections, from the moment the drain
/// began (SIGTERM, `began`): every response then carries `Connection: close`
/// (see `forward::handle`), and an idle connection is closed only once its
/// client left it unused for `delay` (`drain.delay`) counted from the later
/// of the drain's start and the connection's last response. A connection
/// idle when the drain began is thus closed when the listener stops
/// accepting, and a client that sends anything meanwhile gets its answer
/// with `Connection: close` instead of meeting the close with a request in
/// flight. A connection whose next request head is arriving, or that has a
/// request in progress, is never closed by this rule.
#[derive(Debug, Clone, Copy)]
pub(super) struct DrainIdle {
    /// When the drain began.
    pub(super) began: Instant,
    /// `drain.delay`.
    pub(super) delay: Duration,
}

impl DrainIdle {
    /// When the connection is closed if it stays idle; `None` while it is
    /// not idle.
    pub(super) fn close_at(&self, state: &IoState) -> Option<Instant> {
        (state.busy.load(Relaxed) == 0 && state.head_started().is_none())
            .then(|| state.idle_since().max(self.began) + self.delay)
    }

    /// The timer's decision `action` (from [`decide`]) at `now`, with this
    /// rule applied: close an idle connection that is due, and otherwise
    /// wake no later than when it will be.
    pub(super) fn apply(&self, state: &IoState, action: TimerAction, now: Instant) -> TimerAction {
        match (self.close_at(state), action) {
            (Some(at), _) if now >= at => TimerAction::Idle,
            (Some(at), TimerAction::Rearm(t)) => TimerAction::Rearm(t.min(at)),
            _ => action,
        }
    }
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
            line_open: AtomicU32::new(1),
            line_len: AtomicU32::new(0),
            fragment_at: AtomicU32::new(0),
            check_reset: AtomicBool::new(false),
            informational_pending: AtomicBool::new(false),
            informational: Mutex::default(),
        }
    }

    /// A connection idle since `since`, coming back from the lot (`lot`)
    /// because its client sent bytes: its next head starts with them.
    pub(super) fn unparked(since: Instant) -> IoState {
        let state = IoState::new(since);
        state.head_started.store(0, Relaxed);
        state.line_open.store(0, Relaxed);
        state
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
        self.line_open.store(0, Relaxed);
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
    pub(super) fn on_read(&self, bytes: &[u8]) {
        if self.busy.load(Relaxed) != 0 {
            return;
        }
        self.head_arriving();
        if self.line_open.load(Relaxed) != 0 {
            self.scan_line(bytes);
        }
    }

    /// Notes when a request head started arriving (once per head, while no
    /// request is in progress): the head is held to `header_read_timeout`
    /// from then on.
    #[inline]
    pub(super) fn head_arriving(&self) {
        if self.busy.load(Relaxed) == 0 && self.head_started.load(Relaxed) == 0 {
            self.head_started.store(self.nanos(Instant::now()) + 1, Relaxed);
            self.line_open.store(1, Relaxed);
            self.fragment_at.store(0, Relaxed);
        }
    }

    /// Follows the request line of a head that started arriving while no
    /// request was in progress (which is where hyper's buffer starts a new
    /// head): notes a `#` in it and whether it ended. hyper does not expose
    /// the raw line: its URI parser drops a fragment, and its limit on the
    /// head's size answers `431` even when the request line alone is over
    /// it. Costs a scan of the request line per request.
    fn scan_line(&self, bytes: &[u8]) {
        let seen = self.line_open.load(Relaxed) - 1;
        // One pass to the LF, or to a `#` first (rare), then on to the LF.
        let mut end = memchr::memchr2(b'\n', b'#', bytes);
        if let Some(i) = end
            && bytes[i] == b'#'
        {
            if self.fragment_at.load(Relaxed) == 0 {
                self.fragment_at.store(seen.saturating_add(i as u32).max(1), Relaxed);
            }
            end = memchr::memchr(b'\n', &bytes[i..]).map(|j| i + j);
        }
        let line = &bytes[..end.unwrap_or(bytes.len())];
        let len = seen.saturating_add(line.len() as u32);
        if end.is_some() {
            self.line_open.store(0, Relaxed);
            self.line_len.store(len, Relaxed);
        } else {
            self.line_open.store(len.saturating_add(1), Relaxed);
        }
    }

    /// Whether the request line of the request `method`/`uri` (as hyper
    /// parsed it, fragment dropped) had a fragment: the `#` right after the
    /// target. Taken once per request.
    pub(super) fn take_fragment(&self, method: &str, uri: &Uri) -> bool {
        let at = self.fragment_at.load(Relaxed);
        if at == 0 {
            return false;
        }
        self.fragment_at.store(0, Relaxed);
        let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
            + uri.authority().map_or(0, |a| a.as_str().len())
            + uri.path_and_query().map_or(0, |p| p.as_str().len());
        at as usize == method.len() + 1 + target
    }

    /// Appends bytes for the client (1xx responses) with `write` and wakes
    /// the connection's task, whose socket wrapper writes them from
    /// `poll_flush`.
    pub(super) fn queue_for_client(&self, write: impl FnOnce(&mut Vec<u8>)) {
        let mut info = self.informational.lock().unwrap_or_else(PoisonError::into_inner);
        write(&mut info.bytes);
        self.informational_pending.store(true, Relaxed);
        if let Some(w) = &info.waker {
            w.wake_by_ref();
        }
    }

    /// When the current request head started arriving, if one is.
    fn head_started(&self) -> Option<Instant> {
        let head = self.head_started.load(Relaxed);
        (head != 0).then(|| self.at(head - 1))
    }

    /// When the connection last became idle.
    pub(super) fn idle_since(&self) -> Instant {
        self.at(self.idle_since.load(Relaxed))
    }
}

/// The client socket: notes when a request head starts arriving.
pub(super) struct ClientIo {
    pub(super) stream: TcpStream,
    pub(super) state: Arc<IoState>,
    /// Bytes hyper had read but not parsed when the connection was parked
    /// (normally none); served before the socket.
    pub(super) prefix: Bytes,
    /// A request line this long is answered `414` (`max_header_bytes`).
    pub(super) max_line: usize,
}

impl AsyncRead for ClientIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            let piece = this.prefix.split_to(n);
            buf.put_slice(&piece);
            this.state.on_read(&piece);
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.state.on_read(&buf.filled()[before..]);
        }
        r
    }
}

impl AsyncWrite for ClientIo {
    /// hyper refuses a head over `max_header_bytes` with `431`; when the
    /// request line alone is that long (or never ended), the answer is `414`
    /// (RFC 9112 §3).
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if (this.state.line_open.load(Relaxed) != 0 || this.state.line_len.load(Relaxed) as usize >= this.max_line)
            && let Some(rest) = buf.strip_prefix(HYPER_431)
        {
            // Written by `poll_flush`, which hyper calls next.
            this.state.queue_for_client(|b| {
                b.extend_from_slice(b"HTTP/1.1 414 URI Too Long\r\n");
                b.extend_from_slice(rest);
            });
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut this.stream).poll_write(cx, buf)
    }
    fn is_write_vectored(&self) -> bool {
        // `writev(false)`: hyper writes one flattened buffer, which
        // `poll_write` can look at as a whole.
        false
    }
    /// Also writes the app's 1xx responses: hyper calls this only with its
    /// own write buffer empty, so they never land inside another message.
    ///
    /// And, when the timer asked for it, fails with the socket's pending
    /// error: hyper (with `half_close`) does not read a client whose request
    /// is at the app, so a client that reset the connection would otherwise
    /// be noticed only when the answer is written. hyper polls this each
    /// time the connection's task wakes, so one `getsockopt` per timer tick
    /// and busy connection; the error ends the connection and cancels the
    /// request (`client_closed`). A plain FIN is a half-close: the request
    /// goes on and is answered.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.state.check_reset.load(Relaxed) {
            this.state.check_reset.store(false, Relaxed);
            if let Some(e) = socket2::SockRef::from(&this.stream).take_error()? {
                return Poll::Ready(Err(e));
            }
        }
        if this.state.informational_pending.load(Relaxed) {
            ready!(this.write_informational(cx))?;
        }
        Pin::new(&mut this.stream).poll_flush(cx)
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

/// The status line hyper writes for a head over `max_header_bytes`.
const HYPER_431: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\n";

impl ClientIo {
    /// Writes the pending 1xx responses, then wakes the task: the request
    /// handler waits for them before handing hyper its final response.
    fn write_informational(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut info = self.state.informational.lock().unwrap_or_else(PoisonError::into_inner);
        while !info.bytes.is_empty() {
            let n = ready!(Pin::new(&mut self.stream).poll_write(cx, &info.bytes))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            info.bytes.drain(..n);
        }
        self.state.informational_pending.store(false, Relaxed);
        cx.waker().wake_by_ref();
        Poll::Ready(Ok(()))
    }
}

/// Resolves once the 1xx responses relayed so far are written to the client.
pub(super) async fn informational_written(state: &IoState) {
    std::future::poll_fn(|_| {
        // Woken by `ClientIo::write_informational` (the same task).
        if state.informational_pending.load(Relaxed) { Poll::Pending } else { Poll::Ready(()) }
    })
    .await
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
    /// The app's side of a protocol switch whose `101` went to the client:
    /// once hyper is done with the connection, its socket joins the tunnel.
    /// hyper's own upgrade hand-over is not used, as it would also take the
    /// socket of a request that asked to upgrade and was refused.
    pub(super) switched: Cell<Option<hyper::upgrade::OnUpgrade>>,
    /// Returned when the last reference goes (an upgraded tunnel keeps it
    /// after hyper let go).
    pub(super) _permit: Permit,
}

/// The peer's address as an `X-Forwarded-For` element.
pub(super) fn peer_value(ip: std::net::IpAddr) -> HeaderValue {
    let ip = match ip {
        std::net::IpAddr::V6(v6) => v6.to_canonical(),
        ip => ip,
    };
    HeaderValue::from_maybe_shared(Bytes::from(ip.to_string())).expect("an IP address is a valid header")
}

impl Conn {
    /// A client connection with no request in progress.
    pub(super) fn new(worker: Rc<Worker>, state: Arc<IoState>, peer: HeaderValue, permit: Permit) -> Conn {
        Conn {
            worker,
            state,
            peer,
            upstream_due: Cell::new(None),
            upstream_expired: Cell::new(false),
            switched: Cell::new(None),
            _permit: permit,
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn cfg(header: Option<u64>, idle: Option<u64>) -> TimerConfig {
        TimerConfig {
            header_read_timeout: header.map(|ms| MS * ms as u32),
            client_idle_timeout: idle.map(|ms| MS * ms as u32),
            tick: MS * 50,
        }
    }

    /// A connection that went idle at `t0` after one request.
    fn idle_at(t0: Instant) -> IoState {
        let s = IoState::new(t0);
        s.begin_request();
        s.busy.store(0, Relaxed);
        s.idle_since.store(s.nanos(t0), Relaxed);
        s
    }

    #[test]
    fn a_new_connection_is_held_to_the_header_read_timeout() {
        let t0 = Instant::now();
        let s = IoState::new(t0);
        let c = cfg(Some(300), Some(60_000));
        assert_eq!(decide(&s, None, t0 + MS * 10, &c), TimerAction::Rearm(t0 + MS * 60));
        assert_eq!(decide(&s, None, t0 + MS * 280, &c), TimerAction::Rearm(t0 + MS * 300), "wakes at the deadline");
        assert_eq!(decide(&s, None, t0 + MS * 300, &c), TimerAction::SlowHead);
    }

    #[test]
    fn a_head_without_header_read_timeout_is_never_cut() {
        let t0 = Instant::now();
        let s = IoState::new(t0);
        assert_eq!(decide(&s, None, t0 + MS * 10_000, &cfg(None, Some(100))), TimerAction::Rearm(t0 + MS * 10_050));
    }

    #[test]
    fn an_idle_connection_is_parked_after_park_after_and_closed_at_the_idle_timeout() {
        let t0 = Instant::now();
        let s = idle_at(t0);
        let c = cfg(Some(1000), Some(3000));
        assert_eq!(decide(&s, None, t0 + PARK_AFTER - MS, &c), TimerAction::Rearm(t0 + PARK_AFTER + MS * 49));
        assert_eq!(decide(&s, None, t0 + PARK_AFTER, &c), TimerAction::Park);
        assert_eq!(decide(&s, None, t0 + MS * 3000, &c), TimerAction::Idle, "closing wins over parking");
        assert_eq!(idle_due(t0, &c, None), Some(t0 + MS * 3000));
        assert_eq!(decide(&s, None, t0 + MS * 3000, &cfg(Some(1000), None)), TimerAction::Park, "no idle limit");
        assert_eq!(idle_due(t0, &cfg(Some(1000), None), None), None);
    }

    #[test]
    fn a_request_in_progress_is_neither_idle_nor_slow() {
        let t0 = Instant::now();
        let s = idle_at(t0);
        s.begin_request();
        let c = cfg(Some(100), Some(100));
        assert_eq!(decide(&s, None, t0 + MS * 5000, &c), TimerAction::Rearm(t0 + MS * 5050));
    }

    #[test]
    fn the_upstream_deadline_wakes_the_timer_and_expires_the_wait() {
        let t0 = Instant::now();
        let s = idle_at(t0);
        s.begin_request();
        let c = cfg(None, None);
        let due = t0 + MS * 1020;
        assert_eq!(decide(&s, Some(due), t0 + MS * 1000, &c), TimerAction::Rearm(due), "wakes at the deadline");
        assert_eq!(decide(&s, Some(due), t0 + MS * 900, &c), TimerAction::Rearm(t0 + MS * 950), "or within a tick");
        assert_eq!(decide(&s, Some(due), due, &c), TimerAction::UpstreamTimeout(due + MS * 50));
    }

    #[test]
    fn during_a_drain_a_connection_idle_since_before_it_is_closed_when_the_delay_ends() {
        let t0 = Instant::now();
        let s = idle_at(t0);
        let c = cfg(Some(1000), Some(60_000));
        let drain = DrainIdle { began: t0 + MS * 500, delay: MS * 2000 };
        assert_eq!(drain.close_at(&s), Some(t0 + MS * 2500), "the delay counts from the drain's start");
        let early = decide(&s, None, t0 + MS * 20, &c);
        assert_eq!(drain.apply(&s, early, t0 + MS * 20), TimerAction::Rearm(t0 + MS * 70), "nothing due yet");
        let late = t0 + MS * 2480;
        assert_eq!(drain.apply(&s, TimerAction::Rearm(late + MS * 50), late), TimerAction::Rearm(t0 + MS * 2500));
        assert_eq!(drain.apply(&s, TimerAction::Park, t0 + MS * 2500), TimerAction::Idle);
    }

    #[test]
    fn during_a_drain_a_connection_that_became_idle_later_gets_the_whole_delay() {
        let t0 = Instant::now();
        let s = idle_at(t0 + MS * 900);
        let drain = DrainIdle { began: t0, delay: MS * 1000 };
        assert_eq!(drain.close_at(&s), Some(t0 + MS * 1900));
        assert_eq!(drain.apply(&s, TimerAction::Park, t0 + MS * 1899), TimerAction::Park);
        assert_eq!(drain.apply(&s, TimerAction::Park, t0 + MS * 1900), TimerAction::Idle);
    }

    #[test]
    fn during_a_drain_a_connection_with_a_request_or_an_arriving_head_is_not_idle() {
        let t0 = Instant::now();
        let drain = DrainIdle { began: t0, delay: Duration::ZERO };
        let busy = idle_at(t0);
        busy.begin_request();
        assert_eq!(drain.close_at(&busy), None);
        let rearm = TimerAction::Rearm(t0 + MS * 50);
        assert_eq!(drain.apply(&busy, rearm, t0 + MS * 10), rearm);
        let fresh = IoState::new(t0);
        assert_eq!(drain.close_at(&fresh), None, "a new connection's first head is held to header_read_timeout");
        let reading = idle_at(t0);
        reading.on_read(b"GET / HTTP/1.1\r\n");
        assert_eq!(drain.close_at(&reading), None);
    }

    #[test]
    fn a_fragment_is_found_in_the_request_line_only_and_matched_to_its_target() {
        let t0 = Instant::now();
        let s = idle_at(t0);
        s.on_read(b"GET /x#fr");
        s.on_read(b"ag HTTP/1.1\r\nReferer: /#top\r\n\r\n");
        assert_eq!(s.line_open.load(Relaxed), 0, "the line ended");
        assert_eq!(s.line_len.load(Relaxed), 21, "up to the LF");
        let other: Uri = "/yy".parse().unwrap();
        let this: Uri = "/x".parse().unwrap();
        assert!(!s.take_fragment("GET", &other), "another target: not this request's line");
        s.fragment_at.store(6, Relaxed);
        assert!(s.take_fragment("GET", &this));
        assert!(!s.take_fragment("GET", &this), "taken once");
        let s = idle_at(t0);
        s.on_read(b"GET /x HTTP/1.1\r\nReferer: /#top\r\n\r\n");
        assert!(!s.take_fragment("GET", &this), "a # in a header is no fragment");
        let s = idle_at(t0);
        s.on_read(b"GET /aaaa");
        assert_eq!(s.line_open.load(Relaxed), 10, "open: 9 bytes so far (+1)");
    }

    #[test]
    fn bytes_after_a_request_start_a_new_head() {
        let t0 = Instant::now();
        let s = idle_at(t0);
        s.on_read(b"GET / HTTP/1.1\r\n");
        let c = cfg(Some(300), Some(60_000));
        let started = s.head_started().expect("a head started");
        assert!(started >= t0);
        assert_eq!(decide(&s, None, started + MS * 300, &c), TimerAction::SlowHead, "held to the header timeout");
    }

    #[test]
    fn a_whole_head_or_one_hyper_refuses_is_ready_and_a_valid_partial_one_is_waited_for() {
        assert!(head_ready(b"GET / HTTP/1.1\r\nHost: h\r\n\r\nbody"));
        assert!(head_ready(b"GET / HTTP/1.1\nHost: h\n\n"), "bare LF, as hyper accepts");
        assert!(!head_ready(b""));
        assert!(!head_ready(b"GET / HTTP/1.1\r\nHost: h\r\n"), "the empty line has not arrived");
        assert!(!head_ready(b"GET / HTTP/1.1\r\nHost: h\r\n\r"));
        assert!(!head_ready(b"GE"));
        // Refused before the head ends: hyper answers 400 at once.
        assert!(head_ready(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"), "a TLS ClientHello");
        assert!(head_ready(b"G\x01T / HTTP/1.1\r\n"));
        assert!(head_ready(b"GET / HTTP/1.1\r\nBad Header: x\r\n"));
    }

    #[test]
    fn a_head_arriving_byte_by_byte_is_ready_only_at_its_end() {
        let head = b"GET /x HTTP/1.1\r\nHost: h\r\nX-A: 1\r\n\r\n";
        for end in 0..head.len() {
            assert!(!head_ready(&head[..end]), "ready after {end} bytes");
        }
        assert!(head_ready(head));
    }

    #[test]
    fn a_parked_connection_waits_until_its_idle_timeout_or_the_drain_rule() {
        let t0 = Instant::now();
        let s = idle_at(t0);
        let c = cfg(Some(1000), Some(3000));
        assert_eq!(head_wait_until(&s, &c, None), Some(t0 + MS * 3000));
        assert_eq!(head_wait_until(&s, &cfg(Some(1000), None), None), None, "no idle limit: waits for ever");
        let drain = DrainIdle { began: t0 + MS * 100, delay: MS * 500 };
        assert_eq!(head_wait_until(&s, &c, Some(drain)), Some(t0 + MS * 600), "the drain closes it earlier");
    }

    #[test]
    fn an_idle_connection_is_due_at_its_timeout_or_a_drain_delay_after_the_later_of_drain_and_idle() {
        let t0 = Instant::now();
        let c = cfg(Some(1000), Some(3000));
        let drain = DrainIdle { began: t0 + MS * 100, delay: MS * 500 };
        assert_eq!(idle_due(t0, &c, None), Some(t0 + MS * 3000));
        assert_eq!(idle_due(t0, &c, Some(drain)), Some(t0 + MS * 600), "idle before the drain: delay from the drain");
        assert_eq!(idle_due(t0 + MS * 400, &c, Some(drain)), Some(t0 + MS * 900), "idle after it: delay from then");
        assert_eq!(idle_due(t0, &cfg(Some(1000), None), None), None, "no idle limit, no drain: never");
        assert_eq!(idle_due(t0, &cfg(Some(1000), None), Some(drain)), Some(t0 + MS * 600));
    }

    #[test]
    fn a_head_waited_for_without_hyper_is_held_to_the_header_read_timeout() {
        let t0 = Instant::now();
        let fresh = IoState::new(t0);
        let c = cfg(Some(300), Some(60_000));
        assert_eq!(head_wait_until(&fresh, &c, None), Some(t0 + MS * 300), "a new connection's first head");
        let s = idle_at(t0);
        s.head_arriving();
        let started = s.head_started().expect("a head started");
        let drain = DrainIdle { began: t0, delay: Duration::ZERO };
        assert_eq!(head_wait_until(&s, &c, Some(drain)), Some(started + MS * 300), "the drain does not cut a head");
        assert_eq!(head_wait_until(&s, &cfg(None, Some(100)), None), None, "no header limit: never cut");
        s.head_arriving();
        assert_eq!(s.head_started(), Some(started), "noted once per head");
    }

    /// A connected pair of loopback sockets (client, server side).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        (c, l.accept().await.unwrap().0)
    }

    /// Waits (bounded) until the server side has something to read, then reads it.
    async fn read_once(s: &TcpStream, buf: &mut Vec<u8>, limit: usize) -> HeadRead {
        let wait = tokio::time::timeout(Duration::from_secs(10), s.readable());
        wait.await.expect("readable in time").unwrap();
        read_head(s, buf, limit).unwrap()
    }

    #[tokio::test]
    async fn reading_a_head_keeps_what_arrived_stops_at_the_limit_and_sees_the_close() {
        use tokio::io::AsyncWriteExt;
        let (mut c, s) = pair().await;
        let mut buf = Vec::new();
        c.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert_eq!(read_once(&s, &mut buf, 100).await, HeadRead::Bytes);
        assert_eq!(buf, b"GET / HTTP/1.1\r\n");
        assert!(buf.capacity() <= 100, "no more than the limit reserved: {}", buf.capacity());
        c.write_all(&[b'a'; 200]).await.unwrap();
        while buf.len() < 100 {
            assert_eq!(read_once(&s, &mut buf, 100).await, HeadRead::Bytes);
        }
        assert_eq!(buf.len(), 100, "stops at the limit");
        let mut rest = Vec::new();
        c.shutdown().await.unwrap();
        let mut total = 0;
        loop {
            match read_once(&s, &mut rest, 1000).await {
                HeadRead::Bytes => total = rest.len(),
                HeadRead::Nothing => {}
                HeadRead::Closed => break,
            }
        }
        assert_eq!(total, 116, "what was left unread is still there, then the end of stream");
    }
}
