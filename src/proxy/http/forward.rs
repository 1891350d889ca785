//! One request: validation, routing and admission, the short-circuit
//! answers, forwarding to the app (with the safe-retry rules) and the
//! upgraded tunnel after a `101`.

use std::cell::Cell;
use std::error::Error as StdError;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header;
use hyper::{Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, sleep_until};
use tracing::debug;

use super::AppTimeouts;
use super::BAD_GATEWAY_BODY;
use super::BAD_REQUEST_BODY;
use super::GATEWAY_TIMEOUT_BODY;
use super::NOT_IMPLEMENTED_BODY;
use super::TOO_LARGE_BODY;
use super::Worker;
use super::answer::{Fail, classify, problem_with, reply};
use super::body::Kind;
use super::body::ReqBody;
use super::body::ResBody;
use super::conn::Busy;
use super::conn::ClientIo;
use super::conn::{Conn, UpstreamWait, informational_written};
use super::expect::{Gate, expects_continue, watch_continue};
use super::headers::CHUNKED_VALUE;
use super::headers::CLOSE_VALUE;
use super::headers::Codings;
use super::headers::UPGRADE_VALUE;
use super::headers::encode_informational;
use super::headers::prepare_request;
use super::headers::prepare_response;
use super::headers::transfer_codings;
use super::headers::upgrade_requested;
use super::target::canonicalize;
use crate::metrics::{Outcome, RouteMetrics};
use crate::proxy::ListenerCtx;
use crate::state::Admission;

/// Largest request body a short-circuited request is read to its end for, so
/// the keep-alive connection stays usable; bigger bodies close it instead.
pub(super) const SHORT_CIRCUIT_DRAIN_MAX: u64 = 64 * 1024;

/// Handles one request; every response is built here, and the request's
/// outcome recorded exactly once: when the response head is handed to hyper,
/// or as `client_closed` when hyper drops the request first (its client went
/// away before the response head).
///
/// Once the drain began, every response but a `101` carries
/// `Connection: close`, so keep-alive clients leave this connection with an
/// answer in hand rather than meet its close with a request in flight.
pub(super) async fn handle(conn: Rc<Conn>, req: Request<Incoming>) -> Response<ResBody> {
    let start = Instant::now();
    let w = conn.worker.clone();
    // The config in force as the request arrives: a reload during it applies to later requests.
    let ctx = w.live.load_full();
    let unanswered = Unanswered { metrics: Cell::new(&ctx.default_route.metrics), start, armed: Cell::new(true) };
    let mut res = respond(conn, req, start, &w, &ctx, &unanswered).await;
    unanswered.armed.set(false);
    if w.ctx.health.is_draining() && res.status() != StatusCode::SWITCHING_PROTOCOLS {
        res.headers_mut().insert(header::CONNECTION, CLOSE_VALUE.clone());
    }
    res
}

/// Records a request dropped before its response head as `client_closed`,
/// with its duration, under the route it took (the default route until one
/// was selected). Lives on the request future: nothing is allocated.
struct Unanswered<'a> {
    metrics: Cell<&'a RouteMetrics>,
    start: Instant,
    armed: Cell<bool>,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if self.armed.get() {
            self.metrics.get().record(Outcome::ClientClosed, self.start.elapsed());
        }
    }
}

/// [`handle`]'s work: the response to one request.
async fn respond<'w>(
    conn: Rc<Conn>,
    mut req: Request<Incoming>,
    start: Instant,
    w: &'w Rc<Worker>,
    ctx: &'w ListenerCtx,
    unanswered: &Unanswered<'w>,
) -> Response<ResBody> {
    let busy = Busy::begin(conn);

    // Absolute-form becomes origin-form and the path is normalized: routing
    // and admission below, and the app, all read this same target.
    // RFC 9112 §3.2: a target is ASCII (hyper passes other bytes on, which
    // the gate and the app could each decode their own way) and has no
    // fragment (hyper drops it; the client socket noted it). RFC 9112 §3: an
    // invalid request line is refused, not corrected.
    let refused = match canonicalize(&mut req) {
        Err(e) => {
            debug!(error = %e, "request target refused");
            true
        }
        Ok(()) => {
            let target = req.uri().path_and_query().map_or("", |p| p.as_str());
            !target.is_ascii() || busy.0.state.take_fragment(req.method().as_str(), req.uri())
        }
    };
    if refused {
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
    // An unsized body is chunked (hyper refused one whose last coding is
    // not): another coding under it would reach the app relabelled, so it is
    // refused (RFC 9112 §6.1: 501 for a coding not understood; `chunked`
    // twice is invalid: 400). The body is unread: the connection closes.
    if req.body().size_hint().exact().is_none() {
        let (status, body) = match transfer_codings(req.headers()) {
            Codings::Chunked => (StatusCode::OK, ""),
            Codings::ChunkedTwice => (StatusCode::BAD_REQUEST, BAD_REQUEST_BODY),
            Codings::Other => (StatusCode::NOT_IMPLEMENTED, NOT_IMPLEMENTED_BODY),
        };
        if status != StatusCode::OK {
            return reply(&ctx.default_route.metrics, busy, start, Outcome::BadRequest, status, body, true);
        }
    }
    // The route decides what the request needs, its short-circuit bodies and
    // its metric label (`bypass` prefixes are routes needing nothing).
    let route = ctx.route(req.method(), req.uri().path(), req.headers());
    let metrics = &route.metrics;
    unanswered.metrics.set(metrics);
    let max_body = ctx.config.http.max_body_bytes;
    if max_body > 0 && req.body().size_hint().exact().is_some_and(|n| n > max_body) {
        return reply(metrics, busy, start, Outcome::BadRequest, StatusCode::PAYLOAD_TOO_LARGE, TOO_LARGE_BODY, true);
    }

    let outcome = if route.bypass {
        Outcome::Bypassed
    } else {
        match ctx.admission(route.needs) {
            Admission::Admit => Outcome::Proxied,
            Admission::Reject(class, missing) => {
                let (status, body) = route.responses.body(class, missing, &ctx.health);
                let (parts, req_body) = req.into_parts();
                let expects = parts.headers.contains_key(header::EXPECT);
                let bound = super::limit(ctx.config.http.header_read_timeout);
                let keep_alive = req_body.is_end_stream() || Box::pin(settle_body(req_body, expects, bound)).await;
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                // The request's header map is reused for the response: it
                // is dropped anyway, and this saves allocating a new one.
                let mut headers = parts.headers;
                headers.clear();
                let mut res = problem_with(headers, status, body, busy, !keep_alive);
                if status == StatusCode::SERVICE_UNAVAILABLE {
                    res.headers_mut().insert(header::RETRY_AFTER, route.responses.retry_after_value());
                }
                metrics.record(Outcome::ShortCircuited, start.elapsed());
                return res;
            }
        }
    };

    // Upgrade (WebSocket): forward `Connection: upgrade` + `Upgrade` and
    // take over both connections after a 101.
    let upgrade = upgrade_requested(req.headers(), req.version());
    if w.h2.upstream_h2c {
        // An h2c app: the request is translated to HTTP/2 (`h2::forward`),
        // which has no `Upgrade` (RFC 9113 §8.6).
        if upgrade {
            let status = StatusCode::NOT_IMPLEMENTED;
            return reply(metrics, busy, start, Outcome::BadRequest, status, NOT_IMPLEMENTED_BODY, true);
        }
        req.headers_mut().remove(header::EXPECT);
        return super::h2::forward(busy, req, ctx, metrics, outcome, start).await;
    }
    let (mut parts, body) = req.into_parts();
    let upgrade_value = if upgrade { parts.headers.get(header::UPGRADE).cloned() } else { None };
    let expects = expects_continue(&parts.headers, parts.version, !body.is_end_stream());
    let version = parts.version;
    if version == Version::HTTP_10 {
        // RFC 9110 §10.1.1: an HTTP/1.0 request's 100-continue is ignored,
        // and the app, spoken to in HTTP/1.1, must not act on it either.
        parts.headers.remove(header::EXPECT);
        if !parts.headers.contains_key(header::HOST) {
            // Forwarded as HTTP/1.1, which must carry a Host (RFC 9112 §3.2).
            parts.headers.insert(header::HOST, w.upstream_host.clone());
        }
    }
    prepare_request(&mut parts.headers, &busy.0, &ctx.config.http, upgrade_value, version);
    if body.size_hint().exact().is_none() {
        // Forwarded chunked whatever the method: hyper would send a GET or
        // HEAD without its body (RFC 9112 §6: framing is method-independent).
        parts.headers.insert(header::TRANSFER_ENCODING, CHUNKED_VALUE.clone());
    }
    parts.version = Version::HTTP_11;
    let body = ReqBody { inner: Some(body), left: if max_body > 0 { max_body } else { u64::MAX }, hold: None };
    let mut req = Request::from_parts(parts, body);
    let gate = expects.then(|| {
        let (gate, hold) = watch_continue();
        req.body_mut().hold = Some(hold);
        gate
    });
    if version == Version::HTTP_11 {
        relay_informational(&mut req, &busy.0, ctx.config.http.via, gate.clone());
    }
    let sent = send(&busy.0, req, start, AppTimeouts::of(&ctx.config.http)).await;
    if busy.0.state.informational_pending.load(Relaxed) {
        // The app's 1xx responses go out before whatever final answer.
        informational_written(&busy.0.state).await;
    }
    match sent {
        Ok((mut res, tx, read)) => {
            // A final status before the app asked for the body: the client's
            // body is never read, so this connection cannot carry another
            // request, nor can the upstream one (it still owes a body).
            let refused = gate.is_some_and(|g| g.refuse()) && res.status() != StatusCode::SWITCHING_PROTOCOLS;
            if res.status() == StatusCode::SWITCHING_PROTOCOLS {
                if !upgrade {
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
                // A 101 has no body: its codings do not matter.
                let _ = prepare_response(&mut parts.headers, ctx.config.http.via, parts.version);
                parts.version = Version::HTTP_11;
                if let Some(v) = upgrade_value {
                    parts.headers.insert(header::CONNECTION, UPGRADE_VALUE.clone());
                    parts.headers.insert(header::UPGRADE, v);
                }
                // The connection task starts the tunnel once hyper wrote the 101.
                busy.0.switched.set(Some(app_side));
                drop(tx);
                metrics.record(outcome, start.elapsed());
                return Response::from_parts(parts, ResBody::full(Bytes::new(), busy));
            }
            let (mut parts, mut body) = res.into_parts();
            if let Err(e) = prepare_response(&mut parts.headers, ctx.config.http.via, parts.version) {
                // Dropping the body and `tx` closes that upstream connection.
                debug!(error = %e, "response not relayed");
                return reply(
                    metrics,
                    busy,
                    start,
                    Outcome::UpstreamError,
                    StatusCode::BAD_GATEWAY,
                    BAD_GATEWAY_BODY,
                    refused,
                );
            }
            // Sent as HTTP/1.1 whatever the app spoke (RFC 9110 §6.2: an
            // intermediary sends its own version), so an HTTP/1.0 answer
            // does not tell the client that the connection closes; hyper
            // labels it HTTP/1.0 for an HTTP/1.0 client, with
            // `Connection: keep-alive` when the connection stays open.
            parts.version = Version::HTTP_11;
            let Ok(first) = first_bytes(&mut body) else {
                // Bad framing before the first body byte (an unparsable chunk
                // size): nothing was relayed yet, so the client gets a 502
                // rather than a head followed by a cut connection.
                return reply(
                    metrics,
                    busy,
                    start,
                    Outcome::UpstreamError,
                    StatusCode::BAD_GATEWAY,
                    BAD_GATEWAY_BODY,
                    refused,
                );
            };
            let tx = if refused {
                parts.headers.insert(header::CONNECTION, CLOSE_VALUE.clone());
                None
            } else {
                Some(tx)
            };
            metrics.record(outcome, start.elapsed());
            Response::from_parts(parts, ResBody { kind: Kind::Upstream { body, first, tx, read, ended: false }, busy })
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
pub(super) async fn send(
    conn: &Conn,
    mut req: Request<ReqBody>,
    start: Instant,
    timeouts: AppTimeouts,
) -> Result<(Response<Incoming>, SendRequest<ReqBody>, Arc<AtomicU64>), Fail> {
    let w = &*conn.worker;
    let _wait = UpstreamWait(conn);
    loop {
        let (mut tx, read, replay) = match w.checkout() {
            Some((tx, idle, read)) => {
                let replay = (idle >= REPLAY_AFTER_IDLE && req.method().is_idempotent() && req.body().is_end_stream())
                    .then(|| (copy_head(&req), read.load(Relaxed)));
                (tx, read, Some(replay))
            }
            // Boxed: connecting is rare on a warm pool, and inline it would
            // grow every request's future (moved by hyper) by ~500 bytes.
            None => {
                let (tx, read) = Box::pin(w.connect(timeouts.connect)).await?;
                conn.upstream_due.set(timeouts.response.map(|t| Instant::now() + t));
                (tx, read, None)
            }
        };
        if conn.upstream_due.get().is_none() {
            conn.upstream_due.set(timeouts.response.map(|t| start + t));
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
            Ok(res) => return Ok((res, tx, read)),
            Err(mut e) => match (e.take_message(), replay) {
                (Some(back), Some(_)) => {
                    debug!(error = %e.error(), "pooled upstream connection closed before use; retrying");
                    req = back;
                }
                // Not one byte of an answer arrived (a partial status line
                // is the app answering: the request is not sent twice).
                (None, Some(Some((copy, before))))
                    if read.load(Relaxed) == before && closed_before_response(e.error()) =>
                {
                    debug!(error = %e.error(), "idle pooled upstream connection closed under the request; replaying");
                    req = copy;
                }
                _ => return Err(classify(e.into_error())),
            },
        }
    }
}

/// Relays the app's 1xx responses to `req` (`103 Early Hints`, `100`,
/// `102`, any other) to the client, as RFC 9110 §15.2 asks of a proxy.
/// Called for HTTP/1.1 clients only: an HTTP/1.0 client gets none.
///
/// hyper's client reports them through a callback (`on_informational`),
/// but its server has no way to send one: a service returns one response.
/// So the callback encodes them into the connection's shared state and
/// wakes the connection's task (`IoState::queue_for_client`); the client
/// socket wrapper's `poll_flush`, which hyper calls only once everything it
/// buffered is written, writes them on the socket; and the request handler
/// waits until they are written (`conn::informational_written`) before it
/// returns the final response, so they always come before its head. The
/// callback is boxed per request (hyper's API), which the ordinary path
/// pays for.
///
/// For a request whose client waits for `100 Continue` (`gate`), the app's
/// `100` opens the gate instead: hyper's server then sends its own `100` as
/// the body is asked for, so it is not relayed twice. hyper keeps one
/// informational callback per request; this is it.
pub(super) fn relay_informational<B>(req: &mut Request<B>, conn: &Conn, via: bool, gate: Option<Arc<Gate>>) {
    let state = conn.state.clone();
    hyper::ext::on_informational(req, move |res| {
        if let Some(gate) = &gate
            && res.status() == StatusCode::CONTINUE
        {
            gate.open();
            return;
        }
        state.queue_for_client(|b| encode_informational(res.status(), res.headers(), via, b));
    });
}

/// The response body's first bytes if they already arrived (they usually
/// come with the head), or an error if the app's framing already failed.
/// Polled once, without waiting: a body that has not started is relayed as
/// it comes.
fn first_bytes(body: &mut Incoming) -> Result<Bytes, hyper::Error> {
    if body.is_end_stream() {
        return Ok(Bytes::new());
    }
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match Pin::new(body).poll_frame(&mut cx) {
        Poll::Ready(Some(Err(e))) => Err(e),
        // Trailers are never relayed (the `Trailer` header is hop-by-hop).
        Poll::Ready(Some(Ok(frame))) => Ok(frame.into_data().unwrap_or_default()),
        Poll::Ready(None) | Poll::Pending => Ok(Bytes::new()),
    }
}

/// A pooled connection idle at least this long may have been closed by the
/// app's keep-alive timeout just as it was reused (no common server closes
/// idle connections faster).
pub const REPLAY_AFTER_IDLE: Duration = Duration::from_millis(100);

/// A bodyless copy of a request head, for a replay.
pub(super) fn copy_head(req: &Request<ReqBody>) -> Request<ReqBody> {
    let mut r = Request::new(ReqBody { inner: None, left: u64::MAX, hold: None });
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.version_mut() = req.version();
    *r.headers_mut() = req.headers().clone();
    r
}

/// The connection ended (FIN or reset) before any response byte.
pub(super) fn closed_before_response(e: &hyper::Error) -> bool {
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

/// Relays an upgraded connection both ways until either side closes, or
/// until nothing moved either way for the listener's `idle_timeout`: a peer
/// that vanished without a FIN must not hold the tunnel (and the drain) forever.
pub(super) async fn tunnel(client: ClientIo, app: hyper::upgrade::OnUpgrade, conn: Rc<Conn>, idle: Option<Duration>) {
    let app = match app.await {
        Ok(a) => a,
        Err(e) => {
            debug!(error = %e, "upgrade failed");
            return;
        }
    };
    let last = Rc::new(Cell::new(Instant::now()));
    let mut client = Active { io: client, last: last.clone() };
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
pub(super) struct Active<T> {
    pub(super) io: T,
    pub(super) last: Rc<Cell<Instant>>,
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
pub(super) async fn settle_body(mut body: Incoming, expects: bool, bound: Option<Duration>) -> bool {
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
    let bound = bound.unwrap_or(Duration::from_secs(10));
    tokio::time::timeout(bound, drain).await.unwrap_or(false)
}
