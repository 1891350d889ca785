//! The HTTP/1.1 data plane: a reverse proxy gated by the shared health state.
//!
//! One [`serve`] runs per worker thread (a current-thread runtime with its
//! own `SO_REUSEPORT` socket), so everything here is worker-local: `Rc`,
//! `Cell`, `RefCell`, no lock anywhere. Per request the happy path costs one
//! relaxed atomic load for admission, two clock reads for the metrics, the
//! header edits below, and hyper's own work; nothing is logged at info.
//!
//! # Per request
//! 1. URI checks: absolute-form, authority-form (`CONNECT`), a path not
//!    starting with `/`, no `Host` (HTTP/1.1) or more than one → `400`; `Content-Length`
//!    over `max_body_bytes` → `413`.
//! 2. Routing and admission: the listener's route table picks the route
//!    (`bypass` prefixes are routes needing nothing: outcome `bypassed`);
//!    [`Health::admission`](crate::state::Health::admission) of the route's
//!    needs decides between forwarding (`proxied`) and answering `503`/`500`
//!    problem+json ourselves (`short_circuited`), with the route's bodies.
//! 3. Forwarding over a pooled keep-alive connection to the app; bodies are
//!    streamed both ways (hyper `Incoming` passed through, never collected).
//!
//! # Timeouts without a timer per request
//! hyper's own `header_read_timeout` allocates and arms a timer for every
//! request, and it also runs while a keep-alive connection is idle, which
//! would cap `client_idle_timeout` at `header_read_timeout`. Instead each
//! client connection owns *one* timer that is never reset on the request
//! path: request start/end and the first bytes of a request head are noted in
//! plain fields (`IoState`), and when the timer fires it decides (idle too
//! long → close gracefully; head too slow → close; otherwise re-arm).
//! The upstream response timeout uses the same timer: a request waiting on
//! the app notes its deadline in the connection (`Conn::upstream_due`),
//! the timer (which wakes at least every tick while a request is in
//! progress, and at the deadline once it is near) marks it expired, and the
//! request, polled by hyper in the same task right after, answers `504`. A
//! `tokio::time::timeout` per request would insert into and remove from the
//! timer wheel on every request.
//!
//! # Parking idle connections
//! hyper keeps ~12 KiB per connection (buffers it never shrinks) for the
//! connection's lifetime. A keep-alive connection idle for [`PARK_AFTER`] is
//! therefore parked: hyper is shut down without touching the socket, only
//! the socket is watched, and the next request gets a fresh hyper connection.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::error::Error as StdError;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, sleep_until, timeout_at};
use tracing::debug;

use super::accept::{self, Permit, Permits, Serve};
use super::{DrainSignal, ListenerCtx, PROBLEM_JSON};
use crate::metrics::{Outcome, RouteMetrics};
use crate::net;
use crate::state::Admission;

/// `502` body (RFC 9457, same shape as the short-circuit bodies).
pub const BAD_GATEWAY_BODY: &str = r#"{"type":"about:blank","title":"Bad Gateway","status":502,"cause":"BAD GATEWAY"}"#;
/// `504` body.
pub const GATEWAY_TIMEOUT_BODY: &str =
    r#"{"type":"about:blank","title":"Gateway Timeout","status":504,"cause":"GATEWAY TIMEOUT"}"#;
/// `400` body.
pub const BAD_REQUEST_BODY: &str = r#"{"type":"about:blank","title":"Bad Request","status":400,"cause":"BAD REQUEST"}"#;
/// `413` body.
pub const TOO_LARGE_BODY: &str =
    r#"{"type":"about:blank","title":"Content Too Large","status":413,"cause":"CONTENT TOO LARGE"}"#;

/// Largest request body a short-circuited request is read to its end for, so
/// the keep-alive connection stays usable; bigger bodies close it instead.
const SHORT_CIRCUIT_DRAIN_MAX: u64 = 64 * 1024;

/// hyper keeps up to this many headers on the stack; setting `max_headers`
/// at all moves them to the heap for every request, so only non-default
/// values are passed on.
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static VIA_VALUE: HeaderValue = HeaderValue::from_static("1.1 healthgate");
static HTTP_VALUE: HeaderValue = HeaderValue::from_static("http");
static UPGRADE_VALUE: HeaderValue = HeaderValue::from_static("upgrade");
static CLOSE_VALUE: HeaderValue = HeaderValue::from_static("close");
static PROBLEM_VALUE: HeaderValue = HeaderValue::from_static(PROBLEM_JSON);

/// Serves one worker's socket of a `protocol: http` listener until drained.
///
/// Runs inside a `tokio::task::LocalSet` on the worker's current-thread
/// runtime. `max_connections` counts the whole listener, across workers (as
/// for TCP listeners): a connection accepted at the limit waits, unread as
/// in the kernel backlog, until a permit frees up ([`super::accept`]). Returns once the drain
/// signal fired and every connection ended (or the drain deadline passed).
pub async fn serve(listener: TcpListener, ctx: Arc<ListenerCtx>, mut drain: DrainSignal) {
    let w = Rc::new(Worker::new(ctx));
    let sweeper = tokio::task::spawn_local(sweep_pool(w.clone()));
    let accepting = Accepting { w: w.clone(), drain: drain.clone() };
    let deadline = accept::run(&listener, &w.ctx.config.name, &w.permits, &mut drain, &accepting).await;
    // Closing the socket makes new connects fail at once (this worker's part
    // of the SO_REUSEPORT group leaves it); each connection saw the drain
    // signal itself and shuts down gracefully.
    drop(listener);
    let _ = timeout_at(deadline, w.permits.all_returned()).await;
    sweeper.abort();
    w.pool.borrow_mut().clear();
}

/// What the accept loop does with a connection: every one is admitted (the
/// route decides per request); it is served until it closes or the drain.
struct Accepting {
    w: Rc<Worker>,
    drain: DrainSignal,
}

impl Serve for Accepting {
    fn admit(&self, _: &TcpStream, _: SocketAddr) -> bool {
        true
    }

    fn serve(&self, stream: TcpStream, peer: SocketAddr, permit: Permit) {
        tokio::task::spawn_local(connection(self.w.clone(), permit, stream, peer, self.drain.clone()));
    }
}

// === impl Worker ===

/// Per-worker state: config-derived constants, the upstream pool, counters.
struct Worker {
    ctx: Arc<ListenerCtx>,
    http: hyper::server::conn::http1::Builder,
    client: hyper::client::conn::http1::Builder,
    /// Idle upstream connections, oldest first (used from the back: the
    /// most recently used connection is the least likely to have been
    /// closed by the app).
    pool: RefCell<VecDeque<Pooled>>,
    /// This worker's share of the listener's connection permits (held by
    /// every open client connection, upgraded tunnels included).
    permits: Rc<Permits>,
    retry_after: HeaderValue,
    header_read_timeout: Option<Duration>,
    client_idle_timeout: Option<Duration>,
    connect_timeout: Option<Duration>,
    response_timeout: Option<Duration>,
    upstream_idle_timeout: Option<Duration>,
    /// An upgraded tunnel with no traffic for this long is closed.
    tunnel_idle_timeout: Option<Duration>,
    /// The longest the connection timer sleeps: the shortest of the two
    /// client timeouts and [`PARK_AFTER`], which bounds how late each is
    /// enforced. A parked connection's timer sleeps until its idle deadline.
    tick: Duration,
}

/// A zero duration means "no limit". Huge values are capped at a year so
/// that `Instant + Duration` can never overflow (a panic aborts the process).
fn limit(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d.min(Duration::from_secs(365 * 24 * 3600)))
}

impl Worker {
    fn new(ctx: Arc<ListenerCtx>) -> Worker {
        let c = &ctx.config.http;
        let mut http = hyper::server::conn::http1::Builder::new();
        // Our own timer handles header and idle timeouts (see module doc),
        // so hyper needs none and allocates no timer per request.
        http.keep_alive(true).header_read_timeout(None).max_header_size(c.max_header_bytes.max(1));
        // Head and small bodies copied into one buffer and sent with one
        // `write`: fewer instructions than hyper's `writev` queue for the
        // small messages a sidecar mostly relays (callgrind: −3.3 % proxied,
        // −5.0 % short-circuited; bench/compare.sh).
        http.writev(false);
        if c.max_headers != HYPER_DEFAULT_MAX_HEADERS {
            http.max_headers(c.max_headers);
        }
        let mut client = hyper::client::conn::http1::Builder::new();
        client.writev(false);
        let retry_after = HeaderValue::from_maybe_shared(ctx.default_route.responses.retry_after.clone())
            .unwrap_or_else(|_| HeaderValue::from_static("1"));
        let header_read_timeout = limit(c.header_read_timeout);
        let client_idle_timeout = limit(c.client_idle_timeout);
        // The timer never sleeps longer than the shorter timeout, so a
        // request starting or ending (which does not touch the timer) is
        // noticed within one tick.
        let tick = match (header_read_timeout, client_idle_timeout) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(Duration::from_secs(60)),
        }
        .min(PARK_AFTER)
        // A deadline is first looked at within one tick of being set.
        .min(limit(c.upstream_response_timeout).unwrap_or(Duration::MAX));
        Worker {
            http,
            client,
            pool: RefCell::new(VecDeque::new()),
            permits: Permits::new(&ctx),
            retry_after,
            header_read_timeout,
            client_idle_timeout,
            connect_timeout: limit(c.upstream_connect_timeout),
            response_timeout: limit(c.upstream_response_timeout),
            upstream_idle_timeout: limit(c.upstream_idle_timeout),
            tunnel_idle_timeout: limit(ctx.config.idle_timeout),
            tick,
            ctx,
        }
    }
}

// === upstream pool ===

/// An idle upstream connection.
struct Pooled {
    tx: SendRequest<ReqBody>,
    since: Instant,
}

impl Worker {
    /// An idle pooled connection ready for a request, if any, and how long it was idle.
    fn checkout(&self) -> Option<(SendRequest<ReqBody>, Duration)> {
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
                return Some((p.tx, now - p.since));
            }
        }
        None
    }

    /// Returns a connection whose exchange completed to the pool.
    fn checkin(&self, tx: SendRequest<ReqBody>) {
        let max = self.ctx.config.http.upstream_pool_max_idle;
        if max == 0 || tx.is_closed() {
            return;
        }
        let mut pool = self.pool.borrow_mut();
        if pool.len() >= max {
            pool.pop_front();
        }
        pool.push_back(Pooled { tx, since: Instant::now() });
    }

    /// Opens a new upstream connection (resolving the host each time, every
    /// address tried, bounded by `upstream_connect_timeout`).
    async fn connect(&self) -> Result<SendRequest<ReqBody>, Fail> {
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
        let (tx, conn) = self.client.handshake(TokioIo::new(stream)).await.map_err(|e| {
            debug!(error = %e, "upstream handshake failed");
            Fail::Connect
        })?;
        tokio::task::spawn_local(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(tx)
    }
}

/// Closes idle upstream connections once they are `upstream_idle_timeout`
/// old (dropping the last `SendRequest` ends hyper's connection task).
async fn sweep_pool(w: Rc<Worker>) {
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

// === client connections ===

/// State shared between a client connection's socket wrapper, its timer
/// and its requests. Atomics only because hyper's upgrade support requires
/// a `Send` socket type; every access is from one thread, so plain relaxed
/// loads and stores (no read-modify-write) suffice and cost nothing.
struct IoState {
    epoch: Instant,
    /// Requests whose response is not finished.
    busy: AtomicU32,
    /// When the current request head started arriving (ns since `epoch` + 1; 0 = none).
    head_started: AtomicU64,
    /// When the connection last became idle (ns since `epoch`).
    idle_since: AtomicU64,
    /// Set while hyper is being shut down to park the connection: the
    /// socket's shutdown is then skipped, so the client sees nothing.
    parking: AtomicBool,
}

/// What the connection timer decided.
enum Tick {
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
    fn new(epoch: Instant) -> IoState {
        // A new connection is waiting for its first request head.
        IoState {
            epoch,
            busy: AtomicU32::new(0),
            head_started: AtomicU64::new(1),
            idle_since: AtomicU64::new(0),
            parking: AtomicBool::new(false),
        }
    }

    fn nanos(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    fn at(&self, nanos: u64) -> Instant {
        self.epoch + Duration::from_nanos(nanos)
    }

    fn begin_request(&self) {
        self.busy.store(self.busy.load(Relaxed) + 1, Relaxed);
        self.head_started.store(0, Relaxed);
    }

    fn end_request(&self) {
        let n = self.busy.load(Relaxed) - 1;
        self.busy.store(n, Relaxed);
        if n == 0 {
            self.idle_since.store(self.nanos(Instant::now()), Relaxed);
        }
    }

    /// Bytes arrived: if no request is in progress, a head is starting.
    #[inline]
    fn on_read(&self) {
        if self.busy.load(Relaxed) == 0 && self.head_started.load(Relaxed) == 0 {
            self.head_started.store(self.nanos(Instant::now()) + 1, Relaxed);
        }
    }

    fn tick(&self, now: Instant, w: &Worker) -> Tick {
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
    fn idle_deadline(&self, w: &Worker) -> Option<Instant> {
        w.client_idle_timeout.map(|t| self.at(self.idle_since.load(Relaxed)) + t)
    }
}

/// The client socket: notes when a request head starts arriving.
struct ClientIo {
    stream: TcpStream,
    state: Arc<IoState>,
    /// Bytes hyper had read but not parsed when the connection was parked
    /// (normally none); served before the socket.
    prefix: Bytes,
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
struct Conn {
    worker: Rc<Worker>,
    state: Arc<IoState>,
    /// The client's address as an `X-Forwarded-For` element, built once.
    peer: HeaderValue,
    /// When the request waiting on the app (hyper serves one request at a
    /// time per connection) times out with `504`; checked by the connection
    /// timer, so no timer is armed per request.
    upstream_due: Cell<Option<Instant>>,
    /// Set by the connection timer once `upstream_due` passed.
    upstream_expired: Cell<bool>,
    /// Returned when the last reference goes (an upgraded tunnel keeps it
    /// after hyper let go).
    _permit: Permit,
}

impl Conn {
    /// Called when the connection timer fires: marks an overdue upstream
    /// wait expired, and returns when the timer must fire next for it.
    fn check_upstream(&self, now: Instant) -> Option<Instant> {
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
struct UpstreamWait<'a>(&'a Conn);

impl Drop for UpstreamWait<'_> {
    fn drop(&mut self) {
        self.0.upstream_due.set(None);
        self.0.upstream_expired.set(false);
    }
}

/// Serves one client connection until it closes, idles out or is drained.
///
/// Runs hyper on the socket; when the connection has been idle for
/// [`PARK_AFTER`], hyper is shut down without touching the socket (the
/// client sees nothing) and the bare socket waits for the next request,
/// which gets a fresh hyper connection.
async fn connection(w: Rc<Worker>, permit: Permit, stream: TcpStream, peer: SocketAddr, mut drain: DrainSignal) {
    let state = Arc::new(IoState::new(Instant::now()));
    let ip = match peer.ip() {
        IpAddr::V6(v6) => v6.to_canonical(),
        ip => ip,
    };
    let peer = HeaderValue::from_maybe_shared(Bytes::from(ip.to_string())).expect("an IP address is a valid header");
    let conn = Rc::new(Conn {
        worker: w.clone(),
        state: state.clone(),
        peer,
        upstream_due: Cell::new(None),
        upstream_expired: Cell::new(false),
        _permit: permit,
    });
    let this = conn.clone();
    let svc = service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(conn, req).await) }
    });
    let timer = tokio::time::sleep(w.tick);
    tokio::pin!(timer);
    if let Tick::Rearm(t) = state.tick(Instant::now(), &w) {
        timer.as_mut().reset(t);
    }
    let mut drain_seen = drain.borrow_and_update().is_some();
    let mut io = ClientIo { stream, state: state.clone(), prefix: Bytes::new() };
    loop {
        // Boxed: while parked, the connection's task then holds a pointer
        // rather than hyper's whole connection struct.
        let mut http = Box::new(w.http.serve_connection(TokioIo::new(io), svc.clone()).with_upgrades());
        if drain_seen {
            Pin::new(&mut *http).graceful_shutdown();
        }
        let mut timer_on = true;
        let mut parking = false;
        let result = loop {
            tokio::select! {
                biased;
                r = &mut *http => break r,
                _ = timer.as_mut(), if timer_on => match state.tick(Instant::now(), &w) {
                    Tick::Rearm(t) => {
                        // An expired upstream wait is answered when hyper
                        // polls the request, next in this loop.
                        let due = this.check_upstream(Instant::now());
                        timer.as_mut().reset(due.map_or(t, |d| d.min(t)));
                    }
                    Tick::Idle => {
                        timer_on = false;
                        Pin::new(&mut *http).graceful_shutdown();
                    }
                    Tick::Park => {
                        // Once draining, an idle connection closes instead.
                        debug!(closing = drain_seen, "parking idle connection");
                        timer_on = false;
                        parking = !drain_seen;
                        state.parking.store(parking, Relaxed);
                        Pin::new(&mut *http).graceful_shutdown();
                    }
                    Tick::SlowHead => {
                        debug!("request head not received within header_read_timeout; closing");
                        return;
                    }
                },
                r = drain.changed(), if !drain_seen => {
                    if r.is_err() || drain.borrow_and_update().is_some() {
                        drain_seen = true;
                        // Close rather than park.
                        parking = false;
                        state.parking.store(false, Relaxed);
                        // Idle: closes now; in flight: finishes, answers with
                        // `Connection: close`, then closes.
                        Pin::new(&mut *http).graceful_shutdown();
                    }
                }
            }
        };
        if let Err(e) = result {
            if e.is_parse() {
                // hyper answered 400/431 itself; our service never saw it.
                w.ctx.default_route.metrics.record(Outcome::BadRequest, Duration::ZERO);
            }
            debug!(error = %e, "client connection ended with an error");
            return;
        }
        // Without parking, hyper finished the connection (closed it, or
        // handed it to an upgrade).
        let Some(parts) = (if parking { http.into_parts() } else { None }) else { return };
        state.parking.store(false, Relaxed);
        debug!("connection parked");
        let hyper::server::conn::http1::Parts { io: tokio_io, read_buf, .. } = parts;
        io = tokio_io.into_inner();
        // Copied, and the original dropped before waiting: the (normally
        // empty) remainder still points into hyper's 8 KiB read buffer and
        // would keep it alive for as long as the connection stays parked.
        io.prefix = if read_buf.is_empty() { Bytes::new() } else { Bytes::copy_from_slice(&read_buf) };
        drop(read_buf);
        if io.prefix.is_empty() {
            // Parked: only the socket is held until the client speaks again.
            match state.idle_deadline(&w) {
                Some(t) => timer.as_mut().reset(t),
                None => timer.as_mut().reset(Instant::now() + Duration::from_secs(365 * 24 * 3600)),
            }
            tokio::select! {
                r = io.stream.readable() => if r.is_err() { return },
                // Idle timeout: dropping the socket closes it (FIN).
                _ = timer.as_mut() => return,
                r = drain.changed(), if !drain_seen => {
                    if r.is_err() || drain.borrow_and_update().is_some() {
                        return;
                    }
                }
            }
        }
        timer.as_mut().reset(Instant::now() + w.tick);
    }
}

/// Marks a request in progress until its response body is done.
struct Busy(Rc<Conn>);

impl Busy {
    fn begin(conn: Rc<Conn>) -> Busy {
        conn.state.begin_request();
        Busy(conn)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.state.end_request();
    }
}

// === requests ===

/// Why forwarding failed.
#[derive(Debug)]
enum Fail {
    /// No connection to the app (refused, unreachable, DNS, timeout): 502.
    Connect,
    /// No response head within `upstream_response_timeout`: 504.
    Timeout,
    /// The app's connection failed mid-exchange: 502.
    Upstream,
    /// The request body went over `max_body_bytes`: 413.
    TooLarge,
    /// The client's request body failed (client gone or malformed chunking): 400.
    ClientBody,
}

/// Handles one request; every response is built here, and the request's
/// outcome recorded exactly once, when the response head is handed to hyper.
async fn handle(conn: Rc<Conn>, mut req: Request<Incoming>) -> Response<ResBody> {
    let start = Instant::now();
    let busy = Busy::begin(conn);
    let w = busy.0.worker.clone();
    let ctx = &w.ctx;

    let uri = req.uri();
    let path = uri.path();
    if uri.scheme().is_some()
        || uri.authority().is_some()
        || req.method() == Method::CONNECT
        || !(path.starts_with('/') || (path == "*" && req.method() == Method::OPTIONS))
        || !host_is_valid(req.headers(), req.version())
    {
        return reply(
            &ctx.default_route.metrics,
            busy,
            start,
            Outcome::BadRequest,
            StatusCode::BAD_REQUEST,
            BAD_REQUEST_BODY,
            true,
        );
    }
    // The route decides what the request needs, its short-circuit bodies and
    // its metric label (`bypass` prefixes are routes needing nothing).
    let route = ctx.route(req.method(), path, req.headers());
    let metrics = &route.metrics;
    let max_body = ctx.config.http.max_body_bytes;
    if max_body > 0 && req.body().size_hint().exact().is_some_and(|n| n > max_body) {
        return reply(metrics, busy, start, Outcome::BadRequest, StatusCode::PAYLOAD_TOO_LARGE, TOO_LARGE_BODY, true);
    }

    let outcome = if route.bypass {
        Outcome::Bypassed
    } else {
        match ctx.health.admission(route.needs) {
            Admission::Admit => Outcome::Proxied,
            Admission::Reject(class, missing) => {
                let (status, body) = route.responses.body(class, missing, &ctx.health);
                let (parts, req_body) = req.into_parts();
                let expects = parts.headers.contains_key(header::EXPECT);
                let keep_alive = req_body.is_end_stream() || Box::pin(settle_body(req_body, expects, &w)).await;
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                // The request's header map is reused for the response: it
                // is dropped anyway, and this saves allocating a new one.
                let mut headers = parts.headers;
                headers.clear();
                let mut res = problem_with(headers, status, body, busy, !keep_alive);
                if status == StatusCode::SERVICE_UNAVAILABLE {
                    res.headers_mut().insert(header::RETRY_AFTER, w.retry_after.clone());
                }
                metrics.record(Outcome::ShortCircuited, start.elapsed());
                return res;
            }
        }
    };

    // Upgrade (WebSocket): forward `Connection: upgrade` + `Upgrade` and
    // take over both connections after a 101.
    let upgrade = upgrade_requested(req.headers()).then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let upgrade_value = upgrade.as_ref().and_then(|_| parts.headers.get(header::UPGRADE).cloned());
    prepare_request(&mut parts.headers, &busy.0, upgrade_value);
    parts.version = Version::HTTP_11;
    let body = ReqBody { inner: Some(body), left: if max_body > 0 { max_body } else { u64::MAX } };
    let req = Request::from_parts(parts, body);

    match send(&busy.0, req, start).await {
        Ok((mut res, tx)) => {
            if res.status() == StatusCode::SWITCHING_PROTOCOLS {
                let Some(client_side) = upgrade else {
                    // A 101 nobody asked for cannot be relayed.
                    return reply(
                        metrics,
                        busy,
                        start,
                        Outcome::UpstreamError,
                        StatusCode::BAD_GATEWAY,
                        BAD_GATEWAY_BODY,
                        true,
                    );
                };
                let app_side = hyper::upgrade::on(&mut res);
                let upgrade_value = res.headers().get(header::UPGRADE).cloned();
                let (mut parts, _) = res.into_parts();
                prepare_response(&mut parts.headers, &w);
                if let Some(v) = upgrade_value {
                    parts.headers.insert(header::CONNECTION, UPGRADE_VALUE.clone());
                    parts.headers.insert(header::UPGRADE, v);
                }
                // The tunnel holds the connection (and its permit).
                tokio::task::spawn_local(tunnel(client_side, app_side, busy.0.clone(), w.tunnel_idle_timeout));
                drop(tx);
                metrics.record(outcome, start.elapsed());
                return Response::from_parts(parts, ResBody::full(Bytes::new(), busy));
            }
            let (mut parts, body) = res.into_parts();
            prepare_response(&mut parts.headers, &w);
            metrics.record(outcome, start.elapsed());
            Response::from_parts(parts, ResBody { kind: Kind::Upstream { body, tx: Some(tx), ended: false }, busy })
        }
        Err(Fail::Timeout) => reply(
            metrics,
            busy,
            start,
            Outcome::UpstreamError,
            StatusCode::GATEWAY_TIMEOUT,
            GATEWAY_TIMEOUT_BODY,
            false,
        ),
        Err(Fail::Connect | Fail::Upstream) => {
            reply(metrics, busy, start, Outcome::UpstreamError, StatusCode::BAD_GATEWAY, BAD_GATEWAY_BODY, false)
        }
        Err(Fail::TooLarge) => {
            reply(metrics, busy, start, Outcome::BadRequest, StatusCode::PAYLOAD_TOO_LARGE, TOO_LARGE_BODY, true)
        }
        Err(Fail::ClientBody) => {
            reply(metrics, busy, start, Outcome::BadRequest, StatusCode::BAD_REQUEST, BAD_REQUEST_BODY, true)
        }
    }
}

/// Sends a request to the app: on a pooled connection if one is ready, else
/// on a new one. A request is resent on another connection only when that
/// is safe:
/// * hyper hands the request back, which it does only if not a byte of it
///   was written (the pooled connection closed first): any method, as the
///   app cannot have seen it;
/// * the pooled connection had been idle for [`REPLAY_AFTER_IDLE`] and
///   failed before any response byte (the app's keep-alive timeout closing
///   it as we reused it), and the request is idempotent and bodyless, so a
///   copy of its head can be replayed. The copy is made only then, never for
///   a connection reused at once (the loaded hot path).
///
/// A fresh connection is never retried, nor is a failure after the response
/// began: the app may have acted on the request.
///
/// `upstream_response_timeout` counts from `start` (the request's arrival)
/// on a pooled connection, from the connect otherwise.
async fn send(
    conn: &Conn,
    mut req: Request<ReqBody>,
    start: Instant,
) -> Result<(Response<Incoming>, SendRequest<ReqBody>), Fail> {
    let w = &*conn.worker;
    let _wait = UpstreamWait(conn);
    loop {
        let (mut tx, replay) = match w.checkout() {
            Some((tx, idle)) => {
                let replay = (idle >= REPLAY_AFTER_IDLE && req.method().is_idempotent() && req.body().is_end_stream())
                    .then(|| copy_head(&req));
                (tx, Some(replay))
            }
            // Boxed: connecting is rare on a warm pool, and inline it would
            // grow every request's future (moved by hyper) by ~500 bytes.
            None => {
                let tx = Box::pin(w.connect()).await?;
                conn.upstream_due.set(w.response_timeout.map(|t| Instant::now() + t));
                (tx, None)
            }
        };
        if conn.upstream_due.get().is_none() {
            conn.upstream_due.set(w.response_timeout.map(|t| start + t));
        }
        let mut response = std::pin::pin!(tx.try_send_request(req));
        let result = std::future::poll_fn(|cx| {
            if conn.upstream_expired.get() {
                return Poll::Ready(Err(Fail::Timeout));
            }
            response.as_mut().poll(cx).map(Ok)
        })
        .await?;
        match result {
            Ok(res) => return Ok((res, tx)),
            Err(mut e) => match (e.take_message(), replay) {
                (Some(back), Some(_)) => {
                    debug!(error = %e.error(), "pooled upstream connection closed before use; retrying");
                    req = back;
                }
                (None, Some(Some(copy))) if closed_before_response(e.error()) => {
                    debug!(error = %e.error(), "idle pooled upstream connection closed under the request; replaying");
                    req = copy;
                }
                _ => return Err(classify(e.into_error())),
            },
        }
    }
}

/// A pooled connection idle at least this long may have been closed by the
/// app's keep-alive timeout just as it was reused (no common server closes
/// idle connections faster).
pub const REPLAY_AFTER_IDLE: Duration = Duration::from_millis(100);

/// A bodyless copy of a request head, for a replay.
fn copy_head(req: &Request<ReqBody>) -> Request<ReqBody> {
    let mut r = Request::new(ReqBody { inner: None, left: u64::MAX });
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.version_mut() = req.version();
    *r.headers_mut() = req.headers().clone();
    r
}

/// The connection ended (FIN or reset) before any response byte.
fn closed_before_response(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() || e.is_canceled() || e.is_closed() {
        return true;
    }
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            return matches!(io.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe);
        }
        source = s.source();
    }
    false
}

/// Tells a body-limit or client-body failure from an upstream failure.
fn classify(e: hyper::Error) -> Fail {
    let mut source = e.source();
    while let Some(s) = source {
        if s.is::<BodyTooLarge>() {
            return Fail::TooLarge;
        }
        if s.is::<ClientBodyError>() {
            return Fail::ClientBody;
        }
        source = s.source();
    }
    debug!(error = %e, "upstream exchange failed");
    Fail::Upstream
}

/// Relays an upgraded connection both ways until either side closes, or
/// until nothing moved either way for the listener's `idle_timeout`: a peer
/// that vanished without a FIN must not hold the tunnel (and the drain) forever.
async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    app: hyper::upgrade::OnUpgrade,
    conn: Rc<Conn>,
    idle: Option<Duration>,
) {
    let (client, app) = match (client.await, app.await) {
        (Ok(c), Ok(a)) => (c, a),
        (Err(e), _) | (_, Err(e)) => {
            debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let last = Rc::new(Cell::new(Instant::now()));
    let mut client = Active { io: TokioIo::new(client), last: last.clone() };
    let mut app = Active { io: TokioIo::new(app), last: last.clone() };
    let copy = tokio::io::copy_bidirectional(&mut client, &mut app);
    tokio::pin!(copy);
    let result = loop {
        let Some(idle) = idle else { break copy.await };
        tokio::select! {
            r = &mut copy => break r,
            _ = sleep_until(last.get() + idle) => {
                // Traffic since the timer was armed moved the deadline: sleep again.
                if last.get() + idle <= Instant::now() {
                    debug!(?idle, "upgraded connection idle; closing");
                    break Ok((0, 0));
                }
            }
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "upgraded connection ended with an error");
    }
    drop(conn);
}

/// An upgraded stream that notes when bytes last arrived, for the tunnel's idle timeout.
struct Active<T> {
    io: T,
    last: Rc<Cell<Instant>>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Active<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.last.set(Instant::now());
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Active<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Reads a short-circuited request's small body to its end so the
/// connection can stay alive; returns `false` when the connection must close
/// instead (a large or unsized body, a slow or failing client). Bodyless
/// requests, the common case, return at once.
///
/// A client waiting for `100 Continue` (`expects`) has not sent its body:
/// it is not asked for just to be discarded.
async fn settle_body(mut body: Incoming, expects: bool, w: &Worker) -> bool {
    if body.is_end_stream() {
        return true;
    }
    if expects || body.size_hint().exact().is_none_or(|n| n > SHORT_CIRCUIT_DRAIN_MAX) {
        return false;
    }
    let drain = async {
        while let Some(frame) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            if frame.is_err() {
                return false;
            }
        }
        true
    };
    let bound = w.header_read_timeout.unwrap_or(Duration::from_secs(10));
    tokio::time::timeout(bound, drain).await.unwrap_or(false)
}

/// A response of ours (problem+json) with a static body.
fn reply(
    metrics: &RouteMetrics,
    busy: Busy,
    start: Instant,
    outcome: Outcome,
    status: StatusCode,
    body: &'static str,
    close: bool,
) -> Response<ResBody> {
    metrics.record(outcome, start.elapsed());
    problem(status, Bytes::from_static(body.as_bytes()), busy, close)
}

fn problem(status: StatusCode, body: Bytes, busy: Busy, close: bool) -> Response<ResBody> {
    problem_with(HeaderMap::new(), status, body, busy, close)
}

/// A problem+json response using `headers` (empty) as its header map.
fn problem_with(headers: HeaderMap, status: StatusCode, body: Bytes, busy: Busy, close: bool) -> Response<ResBody> {
    let mut res = Response::new(ResBody::full(body, busy));
    *res.status_mut() = status;
    *res.headers_mut() = headers;
    let h = res.headers_mut();
    h.insert(header::CONTENT_TYPE, PROBLEM_VALUE.clone());
    if close {
        // The request body was not read: the connection cannot carry another request.
        h.insert(header::CONNECTION, CLOSE_VALUE.clone());
    }
    res
}

// === header rules ===

/// Whether a comma-separated header list contains `token` (ASCII case-insensitive).
fn has_token(v: &HeaderValue, token: &str) -> bool {
    v.as_bytes().split(|b| *b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// RFC 9112 §3.2: an HTTP/1.1 request has exactly one `Host`, an HTTP/1.0
/// one at most; anything else is a 400. hyper passes both cases on, and
/// with two the app and a front proxy could each pick another.
fn host_is_valid(h: &HeaderMap, version: Version) -> bool {
    let mut hosts = h.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(_), None) => true,
        (None, _) => version != Version::HTTP_11,
        (Some(_), Some(_)) => false,
    }
}

/// `Connection: upgrade` plus an `Upgrade` header.
fn upgrade_requested(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE) && h.get_all(header::CONNECTION).iter().any(|v| has_token(v, "upgrade"))
}

/// The fixed hop-by-hop headers (RFC 9110 §7.6.1 and the obsolete
/// `Keep-Alive`/`Proxy-Connection`); `Proxy-Authenticate`/`-Authorization`
/// belong to this hop too. Index = bit in [`strip_hop_by_hop`]'s mask.
fn hop_by_hop(i: usize) -> &'static HeaderName {
    match i {
        0 => &header::CONNECTION,
        1 => &KEEP_ALIVE,
        2 => &PROXY_CONNECTION,
        3 => &header::TE,
        4 => &header::TRAILER,
        5 => &header::TRANSFER_ENCODING,
        6 => &header::UPGRADE,
        7 => &header::PROXY_AUTHENTICATE,
        _ => &header::PROXY_AUTHORIZATION,
    }
}
const HOP_BY_HOP: usize = 9;

/// The [`hop_by_hop`] index of a header name, if it is one. Dispatches on
/// the length first: most ordinary names are rejected without a compare.
#[inline]
fn hop_index(name: &HeaderName) -> Option<usize> {
    let s = name.as_str();
    Some(match s.len() {
        2 if s == "te" => 3,
        7 if s == "trailer" => 4,
        7 if s == "upgrade" => 6,
        10 if s == "connection" => 0,
        10 if s == "keep-alive" => 1,
        16 if s == "proxy-connection" => 2,
        17 if s == "transfer-encoding" => 5,
        18 if s == "proxy-authenticate" => 7,
        19 if s == "proxy-authorization" => 8,
        _ => return None,
    })
}

/// Removes the hop-by-hop headers and the headers `Connection` names.
///
/// One pass over the names finds which are present (usually none, or just
/// `Connection`), so an ordinary message costs no hash lookup per rule. `TE`
/// goes too, `trailers` included: this hop's acceptance of trailers is not
/// the client's, and the proxy does not promise to relay them.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    let mut present = 0u16;
    for name in h.keys() {
        if let Some(i) = hop_index(name) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    if present & 1 != 0 {
        // Names listed in Connection: removed too. The usual tokens
        // (keep-alive, close, upgrade) need no extra allocation.
        let mut named: Vec<HeaderName> = Vec::new();
        for v in h.get_all(header::CONNECTION) {
            for t in v.as_bytes().split(|b| *b == b',') {
                let t = t.trim_ascii();
                if t.is_empty() || t.eq_ignore_ascii_case(b"close") || t.eq_ignore_ascii_case(b"keep-alive") {
                    continue;
                }
                if let Ok(name) = HeaderName::from_bytes(t) {
                    named.push(name);
                }
            }
        }
        for name in named {
            h.remove(name);
        }
    }
    for i in 0..HOP_BY_HOP {
        if present & (1 << i) != 0 {
            h.remove(hop_by_hop(i));
        }
    }
}

/// Request headers for the app: hop-by-hop removed, the upgrade pair
/// restored, `X-Forwarded-For`/`-Proto` and `Via` per config. `Host` is kept.
fn prepare_request(h: &mut HeaderMap, conn: &Conn, upgrade: Option<HeaderValue>) {
    let cfg = &conn.worker.ctx.config.http;
    strip_hop_by_hop(h);
    if let Some(u) = upgrade {
        h.insert(header::CONNECTION, UPGRADE_VALUE.clone());
        h.insert(header::UPGRADE, u);
    }
    if cfg.x_forwarded_for {
        append_forwarded_for(h, &conn.peer);
    }
    if cfg.x_forwarded_proto {
        // Set, not appended: a client must not claim `https` through us.
        h.insert(&X_FORWARDED_PROTO, HTTP_VALUE.clone());
    }
    if cfg.via {
        h.append(header::VIA, VIA_VALUE.clone());
    }
}

/// Appends the client's address to `X-Forwarded-For`, merging any existing
/// fields into one list. Without an existing header this is a refcount
/// increment (the value is built once per connection).
fn append_forwarded_for(h: &mut HeaderMap, peer: &HeaderValue) {
    match h.entry(&X_FORWARDED_FOR) {
        header::Entry::Vacant(e) => {
            e.insert(peer.clone());
        }
        header::Entry::Occupied(mut e) => {
            let mut buf = BytesMut::with_capacity(64);
            for v in e.iter() {
                buf.put_slice(v.as_bytes());
                buf.put_slice(b", ");
            }
            buf.put_slice(peer.as_bytes());
            if let Ok(v) = HeaderValue::from_maybe_shared(buf.freeze()) {
                e.insert(v);
            }
        }
    }
}

/// Response headers for the client: hop-by-hop removed, `Via` per config.
fn prepare_response(h: &mut HeaderMap, w: &Worker) {
    strip_hop_by_hop(h);
    if w.ctx.config.http.via {
        h.append(header::VIA, VIA_VALUE.clone());
    }
}

// === bodies ===

/// The request body went over `max_body_bytes` while streaming.
#[derive(Debug, thiserror::Error)]
#[error("request body over max_body_bytes")]
pub struct BodyTooLarge;

/// Reading the client's request body failed.
#[derive(Debug, thiserror::Error)]
#[error("client request body: {0}")]
pub struct ClientBodyError(#[source] hyper::Error);

/// The request body sent to the app: the client's body, streamed, counted
/// against `max_body_bytes` (a `Content-Length` over it was refused already;
/// this catches chunked bodies).
struct ReqBody {
    /// `None` for a replayed bodyless request.
    inner: Option<Incoming>,
    left: u64,
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = Box<dyn StdError + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let Some(inner) = self.inner.as_mut() else { return Poll::Ready(None) };
        let frame = match ready!(Pin::new(inner).poll_frame(cx)) {
            None => return Poll::Ready(None),
            Some(Err(e)) => return Poll::Ready(Some(Err(Box::new(ClientBodyError(e))))),
            Some(Ok(f)) => f,
        };
        if let Some(data) = frame.data_ref() {
            let n = data.len() as u64;
            if n > self.left {
                // Aborts the upstream request: hyper closes that connection.
                return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
            }
            self.left -= n;
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or(SizeHint::with_exact(0), Incoming::size_hint)
    }
}

/// The response body sent to the client.
struct ResBody {
    kind: Kind,
    /// Ends the request (for the idle timer) when the body is done.
    busy: Busy,
}

enum Kind {
    Full(Option<Bytes>),
    /// The app's body, streamed; its connection goes back to the pool once
    /// the body was read to its end.
    Upstream {
        body: Incoming,
        tx: Option<SendRequest<ReqBody>>,
        ended: bool,
    },
}

impl ResBody {
    fn full(b: Bytes, busy: Busy) -> ResBody {
        ResBody { kind: Kind::Full(Some(b)), busy }
    }
}

impl Body for ResBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.get_mut().kind {
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream { body, ended, .. } => {
                let r = ready!(Pin::new(body).poll_frame(cx));
                if r.is_none() {
                    *ended = true;
                }
                Poll::Ready(r)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Full(b) => b.as_ref().is_none_or(|b| b.is_empty()),
            Kind::Upstream { body, ended, .. } => *ended || body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream { body, .. } => body.size_hint(),
        }
    }
}

impl Drop for ResBody {
    fn drop(&mut self) {
        if let Kind::Upstream { body, tx, ended } = &mut self.kind
            && (*ended || body.is_end_stream())
            && let Some(tx) = tx.take()
        {
            self.busy.0.worker.checkin(tx);
        }
        // A body dropped early (client gone) drops `tx` with it: hyper then
        // closes that upstream connection, which still has bytes in flight.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut h = map(&[
            ("connection", "keep-alive, X-Secret"),
            ("connection", "close"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "h2c"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic x"),
            ("proxy-authenticate", "Basic"),
            ("x-kept", "yes"),
            ("host", "example"),
        ]);
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, vec!["x-kept", "host"]);
    }

    #[test]
    fn an_ordinary_message_is_left_alone() {
        let mut h = map(&[("host", "a"), ("accept", "*/*"), ("content-length", "3")]);
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 3);
    }

    #[test]
    fn hop_index_matches_exactly_the_hop_by_hop_names() {
        for i in 0..HOP_BY_HOP {
            assert_eq!(hop_index(hop_by_hop(i)), Some(i));
        }
        for other in ["host", "user-agent", "content-type", "te-x", "x-upgrade", "connectionx"] {
            assert_eq!(hop_index(&HeaderName::from_static(other)), None, "{other}");
        }
    }

    #[test]
    fn upgrade_needs_both_the_connection_token_and_the_header() {
        assert!(upgrade_requested(&map(&[("connection", "keep-alive, Upgrade"), ("upgrade", "websocket")])));
        assert!(!upgrade_requested(&map(&[("upgrade", "websocket")])));
        assert!(!upgrade_requested(&map(&[("connection", "upgrade")])));
    }

    #[test]
    fn forwarded_for_merges_existing_fields_and_appends_the_peer() {
        let peer = HeaderValue::from_static("10.0.0.9");
        let mut h = map(&[("x-forwarded-for", "1.1.1.1"), ("x-forwarded-for", "2.2.2.2")]);
        append_forwarded_for(&mut h, &peer);
        assert_eq!(h.get_all(&X_FORWARDED_FOR).iter().count(), 1);
        assert_eq!(h[&X_FORWARDED_FOR], "1.1.1.1, 2.2.2.2, 10.0.0.9");
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, &peer);
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.9");
    }
}
