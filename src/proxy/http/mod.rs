//! The HTTP data plane (HTTP/1.1, and HTTP/2 in `h2`): a reverse proxy gated
//! by the shared health state.
//!
//! One [`serve`] runs per worker thread (a current-thread runtime with its
//! own `SO_REUSEPORT` socket), so everything here is worker-local: `Rc`,
//! `Cell`, `RefCell`, no lock anywhere. Per request the happy path costs one
//! relaxed atomic load for admission, two clock reads for the metrics, the
//! header edits below, and hyper's own work; nothing is logged at info.
//!
//! # Per request
//! 1. URI checks: absolute-form, authority-form (`CONNECT`), a path not
//!    starting with `/`, no `Host` (HTTP/1.1) or more than one, a non-ASCII
//!    target or one with a fragment → `400`; a transfer coding other than
//!    `chunked` → `501` (`chunked` twice: `400`); `Content-Length`
//!    over `max_body_bytes` → `413`.
//! 2. Routing and admission: the listener's route table picks the route
//!    (`bypass` prefixes are routes needing nothing: outcome `bypassed`);
//!    [`Health::admission`](crate::state::Health::admission) of the route's
//!    needs decides between forwarding (`proxied`) and answering `503`/`500`
//!    problem+json ourselves (`short_circuited`), with the route's bodies.
//! 3. Forwarding over a pooled keep-alive connection to the app; bodies are
//!    streamed both ways (hyper `Incoming` passed through, never collected).
//! 4. The outcome is recorded once, when the response head is handed to
//!    hyper, or as `client_closed` if hyper drops the request first (a drop
//!    guard on the request future; nothing allocated).
//!
//! # Drain
//! From SIGTERM on, every answer but a `101` carries `Connection: close`,
//! and an idle connection is closed only after its client left it unused
//! for `drain.delay` (`conn::DrainIdle`): no request written on an open
//! connection goes unanswered. Upgraded tunnels are left as they are.
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
//! therefore parked: hyper is shut down without touching the socket, its
//! task ends, and the bare socket waits in the worker's lot (`lot`), one
//! task watching them all; the next request gets a new task and a fresh
//! hyper connection.
//!
//! # 1xx responses
//! hyper's client hands the app's 1xx responses to a per-request callback,
//! and hyper's server has no way to send one. The callback encodes them into
//! the connection's state and wakes its task; the client socket wrapper
//! writes them from `poll_flush` (which hyper calls only with nothing of its
//! own buffered), and the request waits for that before returning its final
//! response (`conn::relay_informational`). The same wrapper follows each
//! request line, which hyper does not expose: for a fragment (dropped by
//! hyper's URI parser) and a request line over `max_header_bytes` (hyper's
//! `431` becomes `414`).
//!
//! # Layout
//! This file: [`serve`] and the per-connection driver. `conn`: what a
//! connection notes and its timer's pure decision. `forward`: one request,
//! from admission to the app's response. `pool`: idle upstream connections.
//! `headers` and `body`: header rules and the streamed bodies. `answer`:
//! healthgate's own problem+json answers and forwarding failures. `lot`:
//! parked connections. `h2`:
//! HTTP/2 clients (told apart by their preface when a connection opens),
//! the h2c app connection and gRPC status answers (docs/grpc.md).

mod answer;
mod body;
mod conn;
mod expect;
mod forward;
mod h2;
mod headers;
mod lot;
mod pool;
mod target;

pub use body::{BodyTooLarge, ClientBodyError};
pub use conn::PARK_AFTER;
pub use expect::CONTINUE_WAIT;
pub use forward::REPLAY_AFTER_IDLE;
pub use headers::strip_hop_by_hop;

use std::cell::RefCell;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use hyper::header::HeaderValue;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, timeout_at};
use tracing::debug;

use super::accept::{self, Permit, Permits, Serve};
use super::{DrainSignal, ListenerCtx, LiveCtx};
use crate::config::{HttpListenerConfig, ListenerConfig};
use crate::metrics::Outcome;
use conn::{ClientIo, Conn, DrainIdle, HeadRead, IoState, TimerAction, TimerConfig, decide};
use forward::{handle, tunnel};
use lot::{Lot, NotParked, ParkedConn};
use pool::{Pooled, sweep_pool};

/// `502` body (RFC 9457, same shape as the short-circuit bodies).
pub const BAD_GATEWAY_BODY: &str = r#"{"type":"about:blank","title":"Bad Gateway","status":502,"cause":"BAD GATEWAY"}"#;
/// `504` body.
pub const GATEWAY_TIMEOUT_BODY: &str =
    r#"{"type":"about:blank","title":"Gateway Timeout","status":504,"cause":"GATEWAY TIMEOUT"}"#;
/// `400` body.
pub const BAD_REQUEST_BODY: &str = r#"{"type":"about:blank","title":"Bad Request","status":400,"cause":"BAD REQUEST"}"#;
/// `501` body (a transfer coding healthgate does not implement).
pub const NOT_IMPLEMENTED_BODY: &str =
    r#"{"type":"about:blank","title":"Not Implemented","status":501,"cause":"NOT IMPLEMENTED"}"#;
/// `413` body.
pub const TOO_LARGE_BODY: &str =
    r#"{"type":"about:blank","title":"Content Too Large","status":413,"cause":"CONTENT TOO LARGE"}"#;

/// hyper keeps up to this many headers on the stack; setting `max_headers`
/// at all moves them to the heap for every request, so only non-default
/// values are passed on.
const HYPER_DEFAULT_MAX_HEADERS: usize = 100;

/// Serves one worker's socket of a `protocol: http` listener until drained.
///
/// Runs inside a `tokio::task::LocalSet` on the worker's current-thread
/// runtime. `max_connections` counts the whole listener, across workers (as
/// for TCP listeners): a connection accepted at the limit waits, unread as
/// in the kernel backlog, until a permit frees up ([`super::accept`]). Returns once the drain
/// signal fired and every connection ended (or the drain deadline passed).
pub async fn serve(listener: TcpListener, live: LiveCtx, mut drain: DrainSignal) {
    let w = Rc::new(Worker::new(live.load_full(), live));
    let sweeper = tokio::task::spawn_local(sweep_pool(w.clone()));
    let attendant = w.lot.is_some().then(|| tokio::task::spawn_local(attend_lot(w.clone(), drain.clone())));
    let accepting = Accepting { w: w.clone(), drain: drain.clone() };
    let deadline = accept::run(&listener, &w.ctx.config.name, &w.permits, &mut drain, &accepting).await;
    // Closing the socket makes new connects fail at once (this worker's part
    // of the SO_REUSEPORT group leaves it); each connection follows the
    // drain's rule itself (`DrainIdle`, and `Connection: close` on answers).
    drop(listener);
    let _ = timeout_at(deadline, w.permits.all_returned()).await;
    sweeper.abort();
    if let Some(attendant) = attendant {
        attendant.abort();
    }
    w.pool.borrow_mut().clear();
    if let Some(lot) = &w.lot {
        lot.borrow_mut().close_all();
    }
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

/// Per-worker state: the listener's context, the upstream pool, counters.
struct Worker {
    /// The context at start: the settings a reload refuses to change (the
    /// listener's name, the app's address and protocol) and the shared state.
    ctx: Arc<ListenerCtx>,
    /// The context in force, loaded once per request.
    live: LiveCtx,
    /// The connection-level settings of the context in force, and that
    /// context ([`Worker::limits`]).
    limits: RefCell<(Arc<ListenerCtx>, Rc<Limits>)>,
    client: hyper::client::conn::http1::Builder,
    /// Idle upstream connections, oldest first (used from the back: the
    /// most recently used connection is the least likely to have been
    /// closed by the app).
    pool: RefCell<VecDeque<Pooled>>,
    /// This worker's share of the listener's connection permits (held by
    /// every open client connection, upgraded tunnels included).
    permits: Rc<Permits>,
    /// `Host` for a request that has none (HTTP/1.0): the upstream's authority.
    upstream_host: HeaderValue,
    /// The listener's parked-connections gauge.
    parked: Gauge,
    /// Idle client connections held as bare sockets ([`attend_lot`]);
    /// none if its poller could not be created (idle connections then keep
    /// their tasks).
    lot: Option<RefCell<Lot>>,
    /// HTTP/2: the h2c connection to the app.
    h2: h2::H2,
}

/// A listener's connection-level timeouts and limits. A connection takes
/// the ones in force when it starts serving (and again when it comes back
/// from the lot), so a reload applies them to new and returning
/// connections while a connection in the middle of a request keeps its own.
struct Limits {
    http: hyper::server::conn::http1::Builder,
    /// Accept HTTP/2 clients (`http2`).
    h2_enabled: bool,
    /// The HTTP/2 settings of a client connection (`http2_*`).
    h2_server: hyper::server::conn::http2::Builder<h2::LocalExec>,
    /// hyper does not read a client whose request is at the app (`half_close`):
    /// the connection timer looks for a reset instead.
    watch_resets: bool,
    /// The client connection timer's limits.
    timer: TimerConfig,
    max_header_bytes: usize,
    /// An upgraded tunnel with no traffic for this long is closed.
    tunnel_idle_timeout: Option<Duration>,
    /// The worker's app connection pool: read from this snapshot (a borrow,
    /// not a load of the shared context on every request).
    upstream_idle_timeout: Option<Duration>,
    pool_max_idle: usize,
}

impl Limits {
    fn new(l: &ListenerConfig) -> Limits {
        let c = &l.http;
        let mut http = hyper::server::conn::http1::Builder::new();
        // Our own timer handles header and idle timeouts (see module doc),
        // so hyper needs none and allocates no timer per request.
        http.keep_alive(true).header_read_timeout(None).max_header_size(c.max_header_bytes.max(1));
        // With `half_close`, a client that shuts down its sending side after
        // its request (allowed by RFC 9112 §9.6) still gets the answer, as
        // with HAProxy; hyper then stops reading the client while the
        // request is at the app, so a client that vanished with a reset is
        // noticed by the connection timer instead (`IoState::check_reset`).
        // `abort_on_client_close` takes a FIN as the client leaving (nginx).
        http.half_close(!c.abort_on_client_close);
        // Head and small bodies copied into one buffer and sent with one
        // `write`: fewer instructions than hyper's `writev` queue for the
        // small messages a sidecar mostly relays (callgrind: −3.3 % proxied,
        // −5.0 % short-circuited; bench/compare.sh).
        http.writev(false);
        if c.max_headers != HYPER_DEFAULT_MAX_HEADERS {
            http.max_headers(c.max_headers);
        }
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
        Limits {
            http,
            h2_enabled: c.http2,
            h2_server: h2::server(c),
            watch_resets: !c.abort_on_client_close,
            timer: TimerConfig { header_read_timeout, client_idle_timeout, tick },
            max_header_bytes: c.max_header_bytes.max(1),
            tunnel_idle_timeout: limit(l.idle_timeout),
            upstream_idle_timeout: limit(c.upstream_idle_timeout),
            pool_max_idle: c.upstream_pool_max_idle,
        }
    }
}

/// The app-side timeouts of one request, from the config in force when it
/// arrived (a reload during the request does not change them).
#[derive(Clone, Copy, Debug)]
struct AppTimeouts {
    /// `upstream_connect_timeout`.
    connect: Option<Duration>,
    /// `upstream_response_timeout`.
    response: Option<Duration>,
}

impl AppTimeouts {
    fn of(c: &HttpListenerConfig) -> AppTimeouts {
        AppTimeouts { connect: limit(c.upstream_connect_timeout), response: limit(c.upstream_response_timeout) }
    }
}

/// A zero duration means "no limit". Huge values are capped at a year so
/// that `Instant + Duration` can never overflow (a panic aborts the process).
fn limit(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d.min(Duration::from_secs(365 * 24 * 3600)))
}

impl Worker {
    fn new(ctx: Arc<ListenerCtx>, live: LiveCtx) -> Worker {
        let mut client = hyper::client::conn::http1::Builder::new();
        client.writev(false);
        Worker {
            limits: RefCell::new((ctx.clone(), Rc::new(Limits::new(&ctx.config)))),
            client,
            pool: RefCell::new(VecDeque::new()),
            permits: Permits::new(&live),
            upstream_host: HeaderValue::from_str(&ctx.config.upstream.to_string())
                .unwrap_or_else(|_| HeaderValue::from_static("localhost")),
            parked: ctx.registry.parked_connections(&ctx.config.name),
            lot: Lot::new(ctx.registry.parked_connections(&ctx.config.name))
                .inspect_err(|e| tracing::warn!(error = %e, "idle connections keep their tasks: no parking lot"))
                .ok()
                .map(RefCell::new),
            h2: h2::H2::new(&ctx.config.http),
            ctx,
            live,
        }
    }

    /// The connection-level settings in force, rebuilt (once per worker)
    /// after a reload swapped the listener's context.
    fn limits(&self) -> Rc<Limits> {
        let live = self.live.load();
        let mut limits = self.limits.borrow_mut();
        if !Arc::ptr_eq(&limits.0, &live) {
            *limits = (Arc::clone(&live), Rc::new(Limits::new(&live.config)));
        }
        limits.1.clone()
    }
}

/// Serves one client connection until it closes, idles out or is drained.
async fn connection(w: Rc<Worker>, permit: Permit, stream: TcpStream, peer: SocketAddr, drain: DrainSignal) {
    let opened = Instant::now();
    let limits = w.limits();
    if limits.h2_enabled {
        // HTTP/2 with prior knowledge shares the port: told apart by its preface.
        match h2::sniff(&stream, limits.timer.header_read_timeout.map(|t| opened + t)).await {
            h2::Sniffed::Http2 => {
                // Boxed: inline, the HTTP/2 session's state would size every
                // HTTP/1.1 connection's task too (about twice what it needs
                // while it waits for a head).
                let session = h2::connection(w, limits, permit, stream, conn::peer_value(peer.ip()), drain);
                return Box::pin(session).await;
            }
            h2::Sniffed::Closed => return,
            h2::Sniffed::Http1 => {}
        }
    }
    // The first head's `header_read_timeout` counts from the accept, the
    // wait for the first bytes included.
    let client = ParkedConn { stream, permit, peer: peer.ip(), idle_since: opened };
    serve_http1(w, limits, client, Arc::new(IoState::new(opened)), drain).await;
}

/// Serves HTTP/1.1 on a client connection until it closes, idles out, is
/// drained or is parked in the worker's lot.
///
/// Between requests the connection holds no hyper state: the task waits for
/// a whole request head itself ([`wait_for_head`]), then runs hyper on it
/// ([`serve_hyper`], boxed, so that the task's own future stays small while
/// it waits). When the connection has been idle for [`PARK_AFTER`], hyper is
/// shut down without touching the socket (the client sees nothing) and the
/// socket goes to the lot, which gives it a new task when the client sends
/// its next request ([`attend_lot`]). `limits` are the connection's
/// timeouts and limits until it is parked (a reload applies to it when it
/// comes back).
async fn serve_http1(
    w: Rc<Worker>,
    limits: Rc<Limits>,
    client: ParkedConn,
    state: Arc<IoState>,
    mut drain: DrainSignal,
) {
    let ParkedConn { stream, permit, peer: ip, .. } = client;
    // This task writes the app's 1xx responses (`conn::relay_informational`).
    let waker = std::future::poll_fn(|cx| std::task::Poll::Ready(cx.waker().clone())).await;
    state.informational.lock().unwrap_or_else(std::sync::PoisonError::into_inner).waker = Some(waker);
    let mut conn = Rc::new(Conn::new(w.clone(), state.clone(), conn::peer_value(ip), permit));
    let timer = tokio::time::sleep(limits.timer.tick);
    tokio::pin!(timer);
    let mut drain_seen = drain.borrow_and_update().is_some();
    let max_line = limits.max_header_bytes;
    let mut io = ClientIo { stream, state: state.clone(), prefix: Bytes::new(), max_line };
    let mut parked = false;
    loop {
        if !wait_for_head(&w, &limits, &mut io, parked, timer.as_mut(), &mut drain, &mut drain_seen).await {
            return;
        }
        let session = serve_hyper(&w, &limits, &conn, io, timer.as_mut(), &mut drain, &mut drain_seen);
        let back = match Box::pin(session).await {
            Some(back) => back,
            None => return,
        };
        // Bytes hyper read past its last request (rare) are served by this
        // task; otherwise the bare socket waits in the lot.
        if let (true, Some(lot)) = (back.prefix.is_empty(), &w.lot) {
            match Rc::try_unwrap(conn) {
                Ok(c) => {
                    let client =
                        ParkedConn { stream: back.stream, permit: c._permit, peer: ip, idle_since: state.idle_since() };
                    match lot.borrow_mut().park(client) {
                        Ok(()) => {
                            debug!("connection parked");
                            return;
                        }
                        Err(NotParked::Gone) => return,
                        // The client is already sending its next request.
                        Err(NotParked::Ready(client)) => {
                            conn = Rc::new(Conn::new(w.clone(), state.clone(), c.peer, client.permit));
                            io = ClientIo {
                                stream: client.stream,
                                state: state.clone(),
                                prefix: Bytes::new(),
                                max_line,
                            };
                            parked = false;
                            continue;
                        }
                    }
                }
                Err(c) => conn = c,
            }
        }
        (io, parked) = (back, true);
    }
}

/// Watches the worker's parked connections: a client that sends bytes gets
/// its connection back on a new task, one that closes it is closed; the
/// idle timeout and the drain's rule for idle connections close the rest.
async fn attend_lot(w: Rc<Worker>, mut drain: DrainSignal) {
    let Some(lot) = &w.lot else { return };
    let far = || Instant::now() + Duration::from_secs(365 * 24 * 3600);
    let timer = tokio::time::sleep_until(far());
    tokio::pin!(timer);
    let mut drain_seen = drain.borrow_and_update().is_some();
    loop {
        // Parked connections follow the idle timeout in force.
        let limits = w.limits();
        let due = lot.borrow_mut().next_due(&limits.timer, drain_idle(&w));
        timer.as_mut().reset(due.unwrap_or_else(far));
        tokio::select! {
            ready = std::future::poll_fn(|cx| lot.borrow_mut().poll_woken(cx)) => {
                // Returning connections take the settings in force now.
                let limits = w.limits();
                for client in ready {
                    let state = Arc::new(IoState::unparked(client.idle_since));
                    tokio::task::spawn_local(serve_http1(w.clone(), limits.clone(), client, state, drain.clone()));
                }
            }
            _ = timer.as_mut() => {
                let closed = lot.borrow_mut().close_due(Instant::now(), &limits.timer, drain_idle(&w));
                debug!(closed, "parked connections idled out");
            }
            r = drain.changed(), if !drain_seen => {
                if r.is_err() || drain.borrow_and_update().is_some() {
                    drain_seen = true;
                    if stopped_without_drain(&w, true) {
                        lot.borrow_mut().close_all();
                    }
                }
            }
        }
    }
}

/// Waits, without hyper, until a whole request head (or `max_header_bytes`
/// of one, or bytes hyper's parser refuses: see [`conn::head_ready`]) is in
/// `io.prefix`, where hyper will read it first. A parked
/// connection (`parked`, counted in the gauge until bytes arrive) and a new
/// one wait here, holding the socket and a buffer the size of what arrived.
/// Returns false when the connection is to be closed: the client closed
/// it, its head is too slow, it idled out or the drain closes it.
#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename them
async fn wait_for_head(
    w: &Worker,
    limits: &Limits,
    io: &mut ClientIo,
    parked: bool,
    mut timer: Pin<&mut tokio::time::Sleep>,
    drain: &mut DrainSignal,
    drain_seen: &mut bool,
) -> bool {
    let limit = limits.max_header_bytes;
    // Bytes hyper read but did not parse before it was parked (normally none).
    let mut buf = std::mem::take(&mut io.prefix).to_vec();
    let mut gauge = (parked && buf.is_empty()).then(|| Parked::new(&w.parked));
    let mut ready = !buf.is_empty() && conn::head_ready(&buf);
    while !ready && buf.len() < limit {
        let until = conn::head_wait_until(&io.state, &limits.timer, drain_idle(w));
        timer.as_mut().reset(until.unwrap_or_else(|| Instant::now() + Duration::from_secs(365 * 24 * 3600)));
        tokio::select! {
            // Bytes that arrive as the timer fires are read.
            biased;
            r = io.stream.readable() => {
                if r.is_err() {
                    return false;
                }
                match conn::read_head(&io.stream, &mut buf, limit) {
                    Ok(HeadRead::Bytes) => {
                        io.state.head_arriving();
                        gauge = None;
                        ready = conn::head_ready(&buf);
                        if !ready && buf.capacity() > 2 * buf.len() {
                            // A head arriving in pieces keeps only what came.
                            buf.shrink_to_fit();
                        }
                    }
                    Ok(HeadRead::Nothing) => {}
                    // hyper sees a partial head end as it would have.
                    Ok(HeadRead::Closed) if !buf.is_empty() => break,
                    Ok(HeadRead::Closed) | Err(_) => return false,
                }
            }
            // Idle timeout, the drain's idle rule or a head too slow:
            // dropping the socket closes it (FIN).
            _ = timer.as_mut() => return false,
            r = drain.changed(), if !*drain_seen => {
                if r.is_err() || drain.borrow_and_update().is_some() {
                    *drain_seen = true;
                    if stopped_without_drain(w, true) {
                        return false;
                    }
                }
            }
        }
    }
    drop(gauge);
    io.prefix = Bytes::from(buf);
    true
}

/// Runs hyper on a connection whose next request head is buffered, until
/// the connection is parked (the socket is given back), closes or is
/// upgraded (`None`).
#[allow(clippy::too_many_arguments)] // one call site; a struct would only rename them
async fn serve_hyper(
    w: &Worker,
    limits: &Limits,
    conn: &Rc<Conn>,
    io: ClientIo,
    mut timer: Pin<&mut tokio::time::Sleep>,
    drain: &mut DrainSignal,
    drain_seen: &mut bool,
) -> Option<ClientIo> {
    let state = &conn.state;
    let svc = {
        let conn = conn.clone();
        service_fn(move |req| {
            let conn = conn.clone();
            async move { Ok::<_, Infallible>(handle(conn, req).await) }
        })
    };
    let now = Instant::now();
    timer.as_mut().reset(match decide(state, None, now, &limits.timer) {
        TimerAction::Rearm(t) => t,
        _ => now,
    });
    // Without hyper's `with_upgrades`: a request carrying `Upgrade` makes
    // hyper hold its socket for an upgrade even after a refusal, so the
    // tunnel is started here instead, only after a relayed `101`.
    let mut http = limits.http.serve_connection(TokioIo::new(io), svc);
    if stopped_without_drain(w, *drain_seen) {
        Pin::new(&mut http).graceful_shutdown();
    }
    let mut timer_on = true;
    let mut parking = false;
    let result = loop {
        tokio::select! {
            biased;
            r = Pin::new(&mut http) => break r,
            _ = timer.as_mut(), if timer_on => match timer_action(w, &limits.timer, state, conn.upstream_due.get()) {
                // The reset check runs when hyper polls its socket, next in this loop.
                TimerAction::Rearm(t) if limits.watch_resets && state.busy.load(Relaxed) > 0 => {
                    state.check_reset.store(true, Relaxed);
                    timer.as_mut().reset(t);
                }
                TimerAction::Rearm(t) => timer.as_mut().reset(t),
                TimerAction::UpstreamTimeout(t) => {
                    // Answered `504` when hyper polls the request, next
                    // in this loop.
                    conn.upstream_expired.set(true);
                    timer.as_mut().reset(t);
                }
                TimerAction::Idle => {
                    timer_on = false;
                    Pin::new(&mut http).graceful_shutdown();
                }
                TimerAction::Park => {
                    // Once stopped without a drain, an idle connection closes instead.
                    let closing = stopped_without_drain(w, *drain_seen);
                    debug!(closing, "parking idle connection");
                    timer_on = false;
                    parking = !closing;
                    state.parking.store(parking, Relaxed);
                    Pin::new(&mut http).graceful_shutdown();
                }
                TimerAction::SlowHead => {
                    debug!("request head not received within header_read_timeout; closing");
                    return None;
                }
            },
            r = drain.changed(), if !*drain_seen => {
                if r.is_err() || drain.borrow_and_update().is_some() {
                    *drain_seen = true;
                    if !stopped_without_drain(w, true) {
                        // The drain's own rule (`DrainIdle`) closes this
                        // connection; the timer looks at it now.
                        if timer_on {
                            timer.as_mut().reset(Instant::now());
                        }
                        continue;
                    }
                    // Close rather than park.
                    parking = false;
                    state.parking.store(false, Relaxed);
                    // Idle: closes now; in flight: finishes, answers with
                    // `Connection: close`, then closes.
                    Pin::new(&mut http).graceful_shutdown();
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
        return None;
    }
    if let Some(app) = conn.switched.take() {
        // hyper wrote the `101` and let go: the socket, and any bytes
        // read past the request, join the tunnel.
        let hyper::server::conn::http1::Parts { io: tokio_io, read_buf, .. } = http.into_parts();
        let mut client = tokio_io.into_inner();
        client.prefix = read_buf;
        state.parking.store(false, Relaxed);
        tunnel(client, app, conn.clone(), limits.tunnel_idle_timeout).await;
        return None;
    }
    // Without parking, hyper finished the connection (closed it).
    if !parking {
        return None;
    }
    let parts = http.into_parts();
    state.parking.store(false, Relaxed);
    debug!("connection parked");
    let hyper::server::conn::http1::Parts { io: tokio_io, read_buf, .. } = parts;
    let mut io = tokio_io.into_inner();
    // Copied, and the original dropped: the (normally empty) remainder
    // still points into hyper's 8 KiB read buffer and would keep it alive
    // for as long as the connection stays parked.
    io.prefix = if read_buf.is_empty() { Bytes::new() } else { Bytes::copy_from_slice(&read_buf) };
    Some(io)
}

/// The drain's rule for idle connections, once the drain began (SIGTERM).
fn drain_idle(w: &Worker) -> Option<DrainIdle> {
    w.ctx.health.draining_since().map(|began| DrainIdle { began, delay: w.ctx.drain_delay })
}

/// The connection timer's decision now, the drain's idle rule included.
fn timer_action(w: &Worker, timer: &TimerConfig, state: &IoState, upstream_due: Option<Instant>) -> TimerAction {
    let now = Instant::now();
    let action = decide(state, upstream_due, now, timer);
    match drain_idle(w) {
        Some(d) => d.apply(state, action, now),
        None => action,
    }
}

/// Whether the listener was told to stop (`drain_seen`) with no drain begun
/// before (only when `serve` is driven without the server's drain sequence):
/// connections then close as soon as they can, with no grace for idle ones.
fn stopped_without_drain(w: &Worker, drain_seen: bool) -> bool {
    drain_seen && !w.ctx.health.is_draining()
}

/// Counts a connection in the parked-connections gauge while it lives.
struct Parked<'a>(&'a Gauge);

impl<'a> Parked<'a> {
    fn new(gauge: &'a Gauge) -> Parked<'a> {
        gauge.inc();
        Parked(gauge)
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}
