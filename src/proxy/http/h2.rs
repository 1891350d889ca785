//! HTTP/2: cleartext HTTP/2 clients (prior knowledge, detected by their
//! connection preface on the same port as HTTP/1.1), the HTTP/2 (h2c)
//! connection to the app, and gRPC calls answered with gRPC statuses.
//!
//! Each stream is one request and goes through what an HTTP/1.1 request
//! does: target checks, the route table, admission, the short-circuit
//! answers, body limits, the forwarding headers and the request metrics.
//! A gRPC call (`content-type: application/grpc*`) that healthgate answers
//! itself gets a trailers-only gRPC response instead of problem+json
//! (`crate::grpc::status`).
//!
//! The app is spoken to in HTTP/1.1 (pooled connections, the HTTP/2 request
//! translated, as HAProxy does) or, with `upstream_protocol: h2c`, over one
//! multiplexed HTTP/2 connection per worker, bodies and trailers streamed
//! both ways. HTTP/1.1 clients of an h2c listener are translated the other
//! way ([`forward`] is shared).
//!
//! hyper's HTTP/2 runs its streams as tasks on an executor: [`LocalExec`]
//! spawns them on the worker's `LocalSet`, so nothing here needs `Send`.
//!
//! Upstream timeouts: an HTTP/2 connection carries many requests at once,
//! so the one-deadline-per-connection scheme of HTTP/1.1 does not fit; each
//! request on these paths arms its own timer (`timeout_at`).

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tracing::debug;

use super::answer::{Fail, classify, problem, reply};
use super::body::{Kind, ReqBody, ResBody};
use super::conn::{Busy, Conn, IoState};
use super::headers::{CHUNKED_VALUE, prepare_request, prepare_response};
use super::target::canonicalize;
use super::{AppTimeouts, BAD_GATEWAY_BODY, BAD_REQUEST_BODY, GATEWAY_TIMEOUT_BODY, Limits, TOO_LARGE_BODY, Worker};
use crate::config::UpstreamProtocol;
use crate::grpc::status::{self as grpc, LocalStatus};
use crate::metrics::{Outcome, RouteMetrics};
use crate::proxy::accept::Permit;
use crate::proxy::{DrainSignal, ListenerCtx, Route};
use crate::state::{Admission, Reject};

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Response bytes buffered per HTTP/2 stream beyond the client's window.
const MAX_SEND_BUF: usize = 64 * 1024;

static TE_TRAILERS: HeaderValue = HeaderValue::from_static("trailers");
static HTTP_SCHEME: &str = "http";

/// Runs hyper's HTTP/2 tasks (one per stream, and the client connection's)
/// on the worker's `LocalSet`.
#[derive(Clone, Copy, Debug)]
pub struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future + 'static,
{
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

/// A worker's HTTP/2 settings and its connection to an h2c app.
pub(super) struct H2 {
    /// The worker's HTTP/2 connection to the app (`upstream_protocol: h2c`),
    /// shared by all its requests; replaced once closed.
    upstream: RefCell<Option<hyper::client::conn::http2::SendRequest<ReqBody>>>,
    /// `upstream_protocol: h2c`.
    pub(super) upstream_h2c: bool,
}

impl H2 {
    /// The settings of one listener.
    pub(super) fn new(c: &crate::config::HttpListenerConfig) -> H2 {
        H2 { upstream: RefCell::new(None), upstream_h2c: c.upstream_protocol == UpstreamProtocol::H2c }
    }
}

/// The HTTP/2 server settings of a listener's client connections.
pub(super) fn server(c: &crate::config::HttpListenerConfig) -> hyper::server::conn::http2::Builder<LocalExec> {
    let mut server = hyper::server::conn::http2::Builder::new(LocalExec);
    server
        .max_concurrent_streams(c.http2_max_concurrent_streams)
        .max_header_list_size(c.http2_max_header_list_size)
        .max_pending_accept_reset_streams(c.http2_max_pending_accept_reset_streams)
        .max_local_error_reset_streams(c.http2_max_local_error_reset_streams)
        // What a stream may hold for a client that does not read (a
        // zero window): the app's body waits beyond it (hyper: 400 KiB).
        .max_send_buf_size(MAX_SEND_BUF);
    server
}

/// What a new client connection speaks.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Sniffed {
    /// The HTTP/2 preface arrived.
    Http2,
    /// Anything else (HTTP/1.x, or nothing yet worth waiting for).
    Http1,
    /// The client sent the start of the preface and then stalled past
    /// `header_read_timeout`, or the socket failed.
    Closed,
}

/// Which protocol the first bytes are, judged from a prefix: `None` while
/// they are a strict prefix of the preface (more bytes needed).
pub(super) fn classify_prefix(bytes: &[u8]) -> Option<Sniffed> {
    let n = bytes.len().min(PREFACE.len());
    if bytes[..n] != PREFACE[..n] {
        Some(Sniffed::Http1)
    } else if n == PREFACE.len() {
        Some(Sniffed::Http2)
    } else {
        None
    }
}

/// Looks at a new connection's first bytes without consuming them. An
/// HTTP/1.1 request is told apart by its first byte (no method starts with
/// `P` and continues `RI `), so it costs one `peek`.
pub(super) async fn sniff(stream: &TcpStream, deadline: Option<Instant>) -> Sniffed {
    let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
    let deadline = deadline.unwrap_or(far);
    let mut buf = [0u8; 24];
    loop {
        if timeout_at(deadline, stream.readable()).await.is_err() {
            return Sniffed::Closed;
        }
        let n = match stream.peek(&mut buf).await {
            Ok(0) => return Sniffed::Http1,
            Ok(n) => n,
            Err(_) => return Sniffed::Closed,
        };
        if let Some(s) = classify_prefix(&buf[..n]) {
            return s;
        }
        // A partial preface: the rest is normally in flight. The socket
        // stays readable while unread bytes wait, so poll on a short sleep.
        if Instant::now() >= deadline {
            return Sniffed::Closed;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Serves one HTTP/2 client connection until it closes, idles out for
/// `client_idle_timeout` with no open stream, or the drain: then a graceful
/// `GOAWAY`, and the open streams finish (bounded by `drain.timeout`, the
/// end of the worker).
pub(super) async fn connection(
    w: Rc<Worker>,
    limits: Rc<Limits>,
    permit: Permit,
    stream: TcpStream,
    peer: HeaderValue,
    mut drain: DrainSignal,
) {
    let state = Arc::new(IoState::new(Instant::now()));
    // The request-head notes of HTTP/1.1 mean nothing here.
    state.head_started.store(0, Relaxed);
    state.line_open.store(0, Relaxed);
    state.idle_since.store(0, Relaxed);
    let conn = Rc::new(Conn::new(w.clone(), state.clone(), peer, permit));
    let svc = service_fn(move |req| {
        let conn = conn.clone();
        async move { Ok::<_, Infallible>(handle(conn, req).await) }
    });
    let mut http = std::pin::pin!(limits.h2_server.serve_connection(TokioIo::new(stream), svc));
    let mut drain_seen = drain.borrow_and_update().is_some();
    if drain_seen {
        http.as_mut().graceful_shutdown();
    }
    let idle = limits.timer.client_idle_timeout;
    let tick = idle.unwrap_or(Duration::from_secs(3600)).min(Duration::from_secs(1));
    let mut closing = false;
    loop {
        tokio::select! {
            r = http.as_mut() => {
                if let Err(e) = r {
                    debug!(error = %e, "HTTP/2 client connection ended with an error");
                }
                return;
            }
            _ = tokio::time::sleep(tick), if !closing && idle.is_some() => {
                let since = state.at(state.idle_since.load(Relaxed));
                if state.busy.load(Relaxed) == 0 && idle.is_some_and(|t| since + t <= Instant::now()) {
                    debug!("HTTP/2 client connection idle; GOAWAY");
                    closing = true;
                    http.as_mut().graceful_shutdown();
                }
            }
            r = drain.changed(), if !drain_seen => {
                if r.is_err() || drain.borrow_and_update().is_some() {
                    // The drain delay is over (the signal fires after it):
                    // GOAWAY; open streams run to their end.
                    drain_seen = true;
                    closing = true;
                    http.as_mut().graceful_shutdown();
                }
            }
        }
    }
}

/// Records a stream reset before its response head as `client_closed`.
struct Unanswered<'a> {
    metrics: &'a RouteMetrics,
    start: Instant,
    armed: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.metrics.record(Outcome::ClientClosed, self.start.elapsed());
        }
    }
}

/// One HTTP/2 stream: checks, routing, admission, then [`forward`].
async fn handle(conn: Rc<Conn>, mut req: Request<Incoming>) -> Response<ResBody> {
    let start = Instant::now();
    let w = conn.worker.clone();
    // The config in force as the stream arrives: a reload during it applies to later streams.
    let ctx = w.live.load_full();
    let busy = Busy::begin(conn);
    let mut unanswered = Unanswered { metrics: &ctx.default_route.metrics, start, armed: true };
    let is_grpc = grpc::is_grpc(req.headers().get(header::CONTENT_TYPE));
    let refused = canonicalize(&mut req).is_err() || !req.uri().path_and_query().is_none_or(|p| p.as_str().is_ascii());
    let res = if refused {
        local_error(&ctx.default_route.metrics, busy, start, (is_grpc, false), Outcome::BadRequest, Fail::ClientBody)
    } else {
        let route = ctx.route(req.method(), req.uri().path(), req.headers());
        unanswered.metrics = &route.metrics;
        let max_body = ctx.config.http.max_body_bytes;
        if max_body > 0 && req.body().size_hint().exact().is_some_and(|n| n > max_body) {
            local_error(&route.metrics, busy, start, (is_grpc, false), Outcome::BadRequest, Fail::TooLarge)
        } else {
            match admit(&ctx, route) {
                Ok(outcome) => forward(busy, req, &ctx, &route.metrics, outcome, start).await,
                Err((class, missing)) => short_circuit(busy, req, route, class, missing, start, is_grpc),
            }
        }
    };
    unanswered.armed = false;
    res
}

/// The outcome of a forwarded request, or why it is answered here.
fn admit(ctx: &ListenerCtx, route: &Route) -> Result<Outcome, (Reject, u64)> {
    if route.bypass {
        return Ok(Outcome::Bypassed);
    }
    match ctx.admission(route.needs) {
        Admission::Admit => Ok(Outcome::Proxied),
        Admission::Reject(class, missing) => Err((class, missing)),
    }
}

/// The answer to a request a missing dependency keeps from the app: the
/// route's problem+json, or for a gRPC call a trailers-only gRPC status.
/// The request body is not read (HTTP/2 resets the stream's upload).
fn short_circuit(
    busy: Busy,
    req: Request<Incoming>,
    route: &Route,
    class: Reject,
    missing: u64,
    start: Instant,
    is_grpc: bool,
) -> Response<ResBody> {
    let w = busy.0.worker.clone();
    let ctx = &w.ctx;
    route.metrics.record(Outcome::ShortCircuited, start.elapsed());
    drop(req);
    if is_grpc {
        let r = &route.responses;
        let (code, reason, message) = match class {
            Reject::OutOfService => (r.grpc_out_of_service, "DEPENDENCY_UNAVAILABLE", "OUT OF SERVICE"),
            Reject::Maintenance => (r.grpc_out_of_service, "MAINTENANCE", "MAINTENANCE"),
            Reject::Degraded => (r.grpc_degraded, "DEPENDENCY_DEGRADED", "DEGRADED"),
        };
        // Named only on the operator's opt-in, as in the problem+json body;
        // never during maintenance (no dependency is the cause).
        let names = if r.expose_dependencies && class != Reject::Maintenance {
            ctx.health.names(missing).join(",")
        } else {
            String::new()
        };
        let status =
            LocalStatus { code, message, reason: Some(reason), dependencies: &names, retry_after: Some(r.retry_delay) };
        return grpc_response(&w, busy, &status);
    }
    let (status, body) = route.responses.body(class, missing, &ctx.health);
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    let mut res = problem(status, body, busy, false);
    if status == StatusCode::SERVICE_UNAVAILABLE {
        res.headers_mut().insert(header::RETRY_AFTER, route.responses.retry_after_value());
    }
    res
}

/// A trailers-only gRPC response (`:status 200`, no body), counted in
/// `healthgate_grpc_local_responses_total`.
fn grpc_response(w: &Worker, busy: Busy, status: &LocalStatus<'_>) -> Response<ResBody> {
    w.ctx.registry.grpc_local_response(&w.ctx.config.name, grpc::code_label(status.code));
    let mut res = Response::new(ResBody { kind: Kind::Full(None), busy });
    status.headers(res.headers_mut());
    res
}

/// The answer to a failure healthgate reports itself: problem+json, or for
/// a gRPC call its gRPC status (connect failure and a broken exchange 14
/// UNAVAILABLE, no response in time 4 DEADLINE_EXCEEDED, a body over the
/// limit 8 RESOURCE_EXHAUSTED, a bad request 13 INTERNAL). `h1_client`:
/// the client speaks HTTP/1.1, whose connection cannot carry another
/// request after a body left unread (HTTP/2 resets just the stream).
fn local_error(
    metrics: &RouteMetrics,
    busy: Busy,
    start: Instant,
    (is_grpc, h1_client): (bool, bool),
    outcome: Outcome,
    fail: Fail,
) -> Response<ResBody> {
    if is_grpc {
        metrics.record(outcome, start.elapsed());
        let (code, message) = match fail {
            Fail::Connect => (grpc::UNAVAILABLE, "healthgate: cannot connect to the app"),
            Fail::Upstream => (grpc::UNAVAILABLE, "healthgate: the app's connection failed"),
            Fail::Timeout => (grpc::DEADLINE_EXCEEDED, "healthgate: the app did not answer in time"),
            Fail::TooLarge => (grpc::RESOURCE_EXHAUSTED, "healthgate: request body over max_body_bytes"),
            Fail::ClientBody => (grpc::INTERNAL, "healthgate: bad request"),
        };
        let w = busy.0.worker.clone();
        let status = LocalStatus { code, message, reason: None, dependencies: "", retry_after: None };
        return grpc_response(&w, busy, &status);
    }
    let (status, body) = match fail {
        Fail::Connect | Fail::Upstream => (StatusCode::BAD_GATEWAY, BAD_GATEWAY_BODY),
        Fail::Timeout => (StatusCode::GATEWAY_TIMEOUT, GATEWAY_TIMEOUT_BODY),
        Fail::TooLarge => (StatusCode::PAYLOAD_TOO_LARGE, TOO_LARGE_BODY),
        Fail::ClientBody => (StatusCode::BAD_REQUEST, BAD_REQUEST_BODY),
    };
    let close = h1_client && matches!(fail, Fail::TooLarge | Fail::ClientBody);
    reply(metrics, busy, start, outcome, status, body, close)
}

/// Forwards an admitted request (from an HTTP/2 client, or from an
/// HTTP/1.1 client of an h2c listener) to the app in the listener's
/// upstream protocol, and relays the answer: head, body and trailers
/// streamed.
pub(super) async fn forward(
    busy: Busy,
    req: Request<Incoming>,
    ctx: &ListenerCtx,
    metrics: &RouteMetrics,
    outcome: Outcome,
    start: Instant,
) -> Response<ResBody> {
    let w = busy.0.worker.clone();
    let is_grpc = grpc::is_grpc(req.headers().get(header::CONTENT_TYPE));
    let client_version = req.version();
    let h1_client = client_version != Version::HTTP_2;
    let (mut parts, body) = req.into_parts();
    let te_trailers = parts.headers.get_all(header::TE).iter().any(|v| super::headers::has_token(v, "trailers"));
    let max_body = ctx.config.http.max_body_bytes;
    prepare_request(&mut parts.headers, &busy.0, &ctx.config.http, None, client_version);
    let timeouts = AppTimeouts::of(&ctx.config.http);
    let deadline = timeouts.response.map(|t| start + t);
    let body = ReqBody { inner: Some(body), left: if max_body > 0 { max_body } else { u64::MAX }, hold: None };

    let sent = if w.h2.upstream_h2c {
        // HTTP/2 carries the authority in the URI, not in `Host`.
        let authority = parts.headers.remove(header::HOST).or_else(|| Some(w.upstream_host.clone()));
        parts.uri = absolute(&parts.uri, authority.as_ref());
        if te_trailers {
            // gRPC servers require `te: trailers`; on HTTP/2 it is the one TE allowed.
            parts.headers.insert(header::TE, TE_TRAILERS.clone());
        }
        parts.version = Version::HTTP_2;
        send_h2(&w, Request::from_parts(parts, body), deadline, timeouts.connect)
            .await
            .map(|res| (res, None, Arc::<AtomicU64>::default()))
    } else {
        if is_grpc {
            // gRPC needs HTTP/2 end to end (trailers, full duplex): say so
            // rather than hand the app a call it cannot answer.
            metrics.record(Outcome::UpstreamError, start.elapsed());
            let status = LocalStatus {
                code: grpc::UNIMPLEMENTED,
                message: "healthgate: this listener speaks HTTP/1.1 to its app; gRPC needs upstream_protocol: h2c",
                reason: None,
                dependencies: "",
                retry_after: None,
            };
            return grpc_response(&w, busy, &status);
        }
        if client_version == Version::HTTP_2 {
            join_cookies(&mut parts.headers);
            if !parts.headers.contains_key(header::HOST) {
                parts.headers.insert(header::HOST, w.upstream_host.clone());
            }
        }
        if body.size_hint().exact().is_none() {
            parts.headers.insert(header::TRANSFER_ENCODING, CHUNKED_VALUE.clone());
        }
        parts.version = Version::HTTP_11;
        send_h1(&w, Request::from_parts(parts, body), deadline, timeouts.connect)
            .await
            .map(|(res, tx, read)| (res, Some(tx), read))
    };
    let (res, tx, read) = match sent {
        Ok(r) => r,
        Err(fail) => {
            let outcome = match fail {
                Fail::TooLarge | Fail::ClientBody => Outcome::BadRequest,
                _ => Outcome::UpstreamError,
            };
            return local_error(metrics, busy, start, (is_grpc, h1_client), outcome, fail);
        }
    };
    let (mut parts, body) = res.into_parts();
    if parts.status == StatusCode::SWITCHING_PROTOCOLS
        || prepare_response(&mut parts.headers, ctx.config.http.via, parts.version).is_err()
    {
        // Dropping the body and `tx` closes that upstream connection.
        return local_error(metrics, busy, start, (is_grpc, h1_client), Outcome::UpstreamError, Fail::Upstream);
    }
    parts.version = if client_version == Version::HTTP_2 { Version::HTTP_2 } else { Version::HTTP_11 };
    metrics.record(outcome, start.elapsed());
    Response::from_parts(
        parts,
        ResBody { kind: Kind::Upstream { body, first: Bytes::new(), tx, read, ended: false }, busy },
    )
}

/// `uri` (origin-form) made absolute for an HTTP/2 request: `http`, the
/// request's authority, its path and query.
fn absolute(uri: &Uri, authority: Option<&HeaderValue>) -> Uri {
    let mut b = Uri::builder().scheme(HTTP_SCHEME);
    if let Some(a) = authority.and_then(|a| a.to_str().ok()) {
        b = b.authority(a);
    }
    b.path_and_query(uri.path_and_query().map_or("/", |p| p.as_str())).build().unwrap_or_else(|_| uri.clone())
}

/// HTTP/2 may split `Cookie` into several fields; HTTP/1.1 wants one,
/// joined with `; ` (RFC 9113 §8.2.3).
fn join_cookies(h: &mut HeaderMap) {
    let mut all = h.get_all(header::COOKIE).iter();
    if let (Some(first), Some(_)) = (all.next(), all.next()) {
        let mut joined = first.as_bytes().to_vec();
        for v in h.get_all(header::COOKIE).iter().skip(1) {
            joined.extend_from_slice(b"; ");
            joined.extend_from_slice(v.as_bytes());
        }
        if let Ok(v) = HeaderValue::from_bytes(&joined) {
            h.insert(header::COOKIE, v);
        }
    }
}

/// Sends a request to an HTTP/1.1 app on a pooled connection or a new one;
/// resent on another connection only if hyper hands it back unsent.
async fn send_h1(
    w: &Worker,
    mut req: Request<ReqBody>,
    deadline: Option<Instant>,
    connect_timeout: Option<Duration>,
) -> Result<(Response<Incoming>, hyper::client::conn::http1::SendRequest<ReqBody>, Arc<AtomicU64>), Fail> {
    loop {
        let (mut tx, read, pooled) = match w.checkout() {
            Some((tx, _, read)) => (tx, read, true),
            None => {
                let (tx, read) = Box::pin(w.connect(connect_timeout)).await?;
                (tx, read, false)
            }
        };
        let result = match deadline {
            Some(d) => timeout_at(d, tx.try_send_request(req)).await.map_err(|_| Fail::Timeout)?,
            None => tx.try_send_request(req).await,
        };
        match result {
            Ok(res) => return Ok((res, tx, read)),
            Err(mut e) => match e.take_message() {
                Some(back) if pooled => req = back,
                _ => return Err(classify(e.into_error())),
            },
        }
    }
}

/// Sends a request over the worker's HTTP/2 connection to the app (opened
/// on first use, reopened once closed). A request the connection never
/// sent (it was closing: `GOAWAY`) is sent once more on a new one.
async fn send_h2(
    w: &Worker,
    mut req: Request<ReqBody>,
    deadline: Option<Instant>,
    connect_timeout: Option<Duration>,
) -> Result<Response<Incoming>, Fail> {
    loop {
        let cached = w.h2.upstream.borrow().as_ref().filter(|t| !t.is_closed()).cloned();
        let (mut tx, fresh) = match cached {
            Some(tx) => (tx, false),
            None => {
                let tx = Box::pin(connect_h2(w, connect_timeout)).await?;
                *w.h2.upstream.borrow_mut() = Some(tx.clone());
                (tx, true)
            }
        };
        // Waits for a stream slot (the app's `max_concurrent_streams`).
        let ready = match deadline {
            Some(d) => timeout_at(d, tx.ready()).await.map_err(|_| Fail::Timeout)?,
            None => tx.ready().await,
        };
        if ready.is_err() {
            w.h2.upstream.borrow_mut().take();
            if fresh {
                return Err(Fail::Upstream);
            }
            continue;
        }
        let result = match deadline {
            Some(d) => timeout_at(d, tx.try_send_request(req)).await.map_err(|_| Fail::Timeout)?,
            None => tx.try_send_request(req).await,
        };
        match result {
            Ok(res) => return Ok(res),
            Err(mut e) => match e.take_message() {
                Some(back) if !fresh => {
                    debug!(error = %e.error(), "h2c upstream connection closing; resending on a new one");
                    w.h2.upstream.borrow_mut().take();
                    req = back;
                }
                _ => return Err(classify(e.into_error())),
            },
        }
    }
}

/// Opens the worker's HTTP/2 connection to the app.
async fn connect_h2(
    w: &Worker,
    timeout: Option<Duration>,
) -> Result<hyper::client::conn::http2::SendRequest<ReqBody>, Fail> {
    let (stream, deadline) = w.connect_upstream(timeout).await?;
    // The app's header limit as configured when this shared connection opens.
    let list_size = w.live.load().config.http.http2_max_header_list_size;
    let mut client = hyper::client::conn::http2::Builder::new(LocalExec);
    client.max_header_list_size(list_size.max(64 * 1024));
    let handshake = client.handshake(TokioIo::new(stream));
    let (tx, conn) = match timeout_at(deadline, handshake).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            debug!(error = %e, "h2c upstream handshake failed");
            return Err(Fail::Connect);
        }
        Err(_) => return Err(Fail::Connect),
    };
    tokio::task::spawn_local(async move {
        if let Err(e) = conn.await {
            debug!(error = %e, "h2c upstream connection ended with an error");
        }
    });
    Ok(tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_preface_is_told_from_http1_by_its_prefix() {
        assert_eq!(classify_prefix(b"GET / HTTP/1.1\r\n"), Some(Sniffed::Http1));
        assert_eq!(classify_prefix(b"P"), None, "more bytes needed");
        assert_eq!(classify_prefix(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(classify_prefix(b"POST / HTTP/1.1"), Some(Sniffed::Http1));
        assert_eq!(classify_prefix(PREFACE), Some(Sniffed::Http2));
        assert_eq!(
            classify_prefix(b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n"),
            Some(Sniffed::Http1),
            "a bad preface is no HTTP/2"
        );
    }

    #[test]
    fn an_origin_form_target_becomes_absolute_for_http2() {
        let u: Uri = "/svc.Echo/Say?x=1".parse().unwrap();
        let a = HeaderValue::from_static("app:50051");
        assert_eq!(absolute(&u, Some(&a)).to_string(), "http://app:50051/svc.Echo/Say?x=1");
    }

    #[test]
    fn split_cookies_are_joined_for_http1() {
        let mut h = HeaderMap::new();
        h.append(header::COOKIE, HeaderValue::from_static("a=1"));
        h.append(header::COOKIE, HeaderValue::from_static("b=2"));
        join_cookies(&mut h);
        assert_eq!(h.get_all(header::COOKIE).iter().collect::<Vec<_>>(), ["a=1; b=2"]);
    }
}
