//! `grpc.health.v1.Health` (`Check` and `Watch`), so the kubelet's `grpc:`
//! probes, `grpc_health_probe` and gRPC clients' health checking can ask
//! healthgate directly.
//!
//! The few protobuf bytes it needs are written by hand (two one-field
//! messages), and every answer is a proper gRPC response: HTTP 200,
//! `content-type: application/grpc`, `grpc-status` in the trailers (or in the
//! head of a trailers-only error).
//!
//! Service names: `""` and `readiness` follow `/readyz`, `liveness` `/livez`,
//! `startup` `/startupz`, and a dependency's name its verdict ([`verdict`]).
//! Nothing else of `/status` is exposed: only the enum.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::{Semaphore, mpsc, watch};

use crate::state::DepHealth;

/// Path prefix of the health service's methods.
pub const SERVICE_PREFIX: &str = "/grpc.health.v1.Health/";
/// Path of the unary `Check` method.
pub const CHECK_PATH: &str = "/grpc.health.v1.Health/Check";
/// Path of the server-streaming `Watch` method.
pub const WATCH_PATH: &str = "/grpc.health.v1.Health/Watch";
/// Largest request message accepted: a service name is a few bytes, so
/// anything near this is not a health request.
pub const MAX_REQUEST_MESSAGE: usize = 1024;
/// How often a `Watch` stream looks again without a change notification:
/// `/livez` is a matter of time (a stalled loop ticks nothing), not of events.
pub const WATCH_POLL: Duration = Duration::from_secs(1);

/// `grpc.health.v1.HealthCheckResponse.ServingStatus`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServingStatus {
    /// No verdict yet.
    Unknown = 0,
    /// Healthy.
    Serving = 1,
    /// Not healthy.
    NotServing = 2,
    /// `Watch` only: the service name is not known.
    ServiceUnknown = 3,
}

/// The gRPC status codes this service answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// 0.
    Ok = 0,
    /// 4: the request did not arrive in time.
    DeadlineExceeded = 4,
    /// 5: `Check` of an unknown service name.
    NotFound = 5,
    /// 8: too many `Watch` streams, or a request message too large.
    ResourceExhausted = 8,
    /// 12: any other method, or a compressed message.
    Unimplemented = 12,
    /// 13: a malformed request (framing or protobuf).
    Internal = 13,
}

/// Why a request body is not one `HealthCheckRequest`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The body ends inside the 5-byte prefix or the message.
    #[error("truncated message")]
    Truncated,
    /// The body holds more than the one message of a health request.
    #[error("more than one request message")]
    Trailing,
    /// The compressed flag is set (no `grpc-encoding` is supported).
    #[error("compressed messages are not supported")]
    Compressed,
    /// The message is larger than [`MAX_REQUEST_MESSAGE`].
    #[error("request message too large")]
    TooLarge,
    /// The protobuf is malformed.
    #[error("malformed HealthCheckRequest")]
    Malformed,
}

impl DecodeError {
    /// The gRPC status a decode error is answered with.
    pub fn code(&self) -> Code {
        match self {
            DecodeError::Compressed => Code::Unimplemented,
            DecodeError::TooLarge => Code::ResourceExhausted,
            DecodeError::Truncated | DecodeError::Trailing | DecodeError::Malformed => Code::Internal,
        }
    }
}

/// Reads a protobuf varint at `*at`, advancing it.
fn varint(buf: &[u8], at: &mut usize) -> Result<u64, DecodeError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*at).ok_or(DecodeError::Malformed)?;
        *at += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(DecodeError::Malformed)
}

/// Decodes `HealthCheckRequest { string service = 1; }`: unknown fields are
/// skipped and the last `service` wins, as protobuf parsers do.
pub fn decode_request(msg: &[u8]) -> Result<String, DecodeError> {
    let mut at = 0;
    let mut service = String::new();
    while at < msg.len() {
        let key = varint(msg, &mut at)?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                varint(msg, &mut at)?;
            }
            1 | 5 => at += if wire == 1 { 8 } else { 4 },
            2 => {
                let len = usize::try_from(varint(msg, &mut at)?).map_err(|_| DecodeError::Malformed)?;
                let end = at.checked_add(len).filter(|e| *e <= msg.len()).ok_or(DecodeError::Malformed)?;
                if field == 1 {
                    service = std::str::from_utf8(&msg[at..end]).map_err(|_| DecodeError::Malformed)?.to_string();
                }
                at = end;
            }
            _ => return Err(DecodeError::Malformed),
        }
        if field == 0 || at > msg.len() {
            return Err(DecodeError::Malformed);
        }
    }
    Ok(service)
}

/// Encodes `HealthCheckResponse { ServingStatus status = 1; }` (proto3: the
/// default `UNKNOWN` is the empty message).
pub fn encode_response(status: ServingStatus) -> Vec<u8> {
    match status {
        ServingStatus::Unknown => Vec::new(),
        s => vec![0x08, s as u8],
    }
}

/// Frames one gRPC message: compressed flag 0, big-endian length, message.
pub fn frame(msg: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.put_u8(0);
    b.put_u32(msg.len() as u32);
    b.put_slice(msg);
    b.freeze()
}

/// The one message of a unary request body.
pub fn unframe(body: &[u8]) -> Result<&[u8], DecodeError> {
    if body.len() < 5 {
        return Err(DecodeError::Truncated);
    }
    if body[0] != 0 {
        return Err(DecodeError::Compressed);
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    if len > MAX_REQUEST_MESSAGE {
        return Err(DecodeError::TooLarge);
    }
    match body.len() - 5 {
        n if n < len => Err(DecodeError::Truncated),
        n if n > len => Err(DecodeError::Trailing),
        _ => Ok(&body[5..]),
    }
}

/// The facts a health answer is taken from; each read only when asked for.
pub trait Facts {
    /// Whether `/readyz` answers 200.
    fn ready(&self) -> bool;
    /// Whether `/livez` answers 200.
    fn live(&self) -> bool;
    /// Whether `/startupz` answers 200.
    fn started(&self) -> bool;
    /// The verdict gating uses for the dependency called `name`, if there is one.
    fn dependency(&self, name: &str) -> Option<DepHealth>;
}

/// A [`Facts`] that also says when they may have changed (for `Watch`).
pub trait Source: Facts + Send + Sync + 'static {
    /// A receiver that sees a new value on every change of the facts but
    /// liveness (which `Watch` polls every [`WATCH_POLL`]).
    fn changes(&self) -> watch::Receiver<u64>;
}

/// The serving status of a service name; `None` for an unknown name. The
/// probe names win over a dependency of the same name.
pub fn verdict(service: &str, facts: &impl Facts) -> Option<ServingStatus> {
    let serving = |ok: bool| if ok { ServingStatus::Serving } else { ServingStatus::NotServing };
    Some(match service {
        "" | "readiness" => serving(facts.ready()),
        "liveness" => serving(facts.live()),
        "startup" => serving(facts.started()),
        name => match facts.dependency(name)? {
            DepHealth::Up => ServingStatus::Serving,
            DepHealth::Down => ServingStatus::NotServing,
            DepHealth::Unknown => ServingStatus::Unknown,
        },
    })
}

/// A response body: a few frames known at once, then (for `Watch`) whatever
/// the stream's task sends until it stops.
pub struct GrpcBody {
    queued: VecDeque<Frame<Bytes>>,
    rx: Option<mpsc::Receiver<Frame<Bytes>>>,
}

impl GrpcBody {
    /// An empty body (a trailers-only answer).
    pub fn empty() -> GrpcBody {
        GrpcBody { queued: VecDeque::new(), rx: None }
    }

    /// A body of exactly these frames.
    pub fn frames(frames: impl IntoIterator<Item = Frame<Bytes>>) -> GrpcBody {
        GrpcBody { queued: frames.into_iter().collect(), rx: None }
    }

    /// A plain HTTP body (for the non-gRPC error answers).
    pub fn text(body: &'static str) -> GrpcBody {
        Self::frames([Frame::data(Bytes::from_static(body.as_bytes()))])
    }
}

impl Body for GrpcBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if let Some(f) = this.queued.pop_front() {
            return Poll::Ready(Some(Ok(f)));
        }
        match &mut this.rx {
            Some(rx) => rx.poll_recv(cx).map(|f| f.map(Ok)),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.queued.is_empty() && self.rx.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.rx, self.queued.iter().all(Frame::is_data)) {
            (None, true) => SizeHint::with_exact(
                self.queued.iter().filter_map(Frame::data_ref).map(|d| d.len() as u64).sum::<u64>(),
            ),
            _ => SizeHint::default(),
        }
    }
}

/// Whether a request is meant for gRPC: a health path, or any path with a
/// gRPC content type (those get `UNIMPLEMENTED`, not the admin's 404).
pub fn is_grpc(req: &Request<Incoming>) -> bool {
    req.uri().path().starts_with(SERVICE_PREFIX) || super::status::is_grpc(req.headers().get(CONTENT_TYPE))
}

/// A plain HTTP answer, for requests that are not gRPC enough for a gRPC one.
fn http_error(status: StatusCode, body: &'static str) -> Response<GrpcBody> {
    let mut r = Response::new(GrpcBody::text(body));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

/// A trailers-only gRPC answer: the status in the response head, no body.
/// `message` is ASCII without `%` (so needs no percent-encoding).
pub fn status_only(code: Code, message: &'static str) -> Response<GrpcBody> {
    let mut r = grpc_head(GrpcBody::empty());
    let h = r.headers_mut();
    h.insert("grpc-status", HeaderValue::from(code as u16));
    h.insert("grpc-message", HeaderValue::from_static(message));
    r
}

fn grpc_head(body: GrpcBody) -> Response<GrpcBody> {
    let mut r = Response::new(body);
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    r
}

/// The `grpc-status: 0` trailers of a successful call.
fn ok_trailers() -> Frame<Bytes> {
    let mut t = HeaderMap::new();
    t.insert("grpc-status", HeaderValue::from(Code::Ok as u16));
    Frame::trailers(t)
}

/// One data frame holding one framed `HealthCheckResponse`.
fn response_frame(status: ServingStatus) -> Frame<Bytes> {
    Frame::data(frame(&encode_response(status)))
}

/// The limits of the health service on one admin server.
pub struct Limits {
    /// How long a client has to send its whole request message.
    pub request_timeout: Duration,
    /// Open `Watch` streams (the permits of this semaphore).
    pub watches: Arc<Semaphore>,
}

/// Reads a request body of at most one framed message of
/// [`MAX_REQUEST_MESSAGE`] bytes, within `timeout`. Read before any answer,
/// errors included: an HTTP/2 stream answered before its request ended is
/// reset, which clients report as a transport error instead of the answer.
async fn read_body(body: Incoming, timeout: Duration) -> Result<BytesMut, (Code, &'static str)> {
    let read = async {
        let mut body = body;
        let mut buf = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return Err((Code::Internal, "request body broken")) };
            if let Ok(data) = frame.into_data() {
                // Room for a second message's prefix, so "one too many" is told apart.
                if buf.len() + data.len() > MAX_REQUEST_MESSAGE + 10 {
                    return Err((Code::ResourceExhausted, "request message too large"));
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(buf)
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(r) => r,
        Err(_) => Err((Code::DeadlineExceeded, "request message not received in time")),
    }
}

/// The service name of a unary request body.
fn read_service(body: &[u8]) -> Result<String, (Code, &'static str)> {
    let msg = unframe(body).map_err(|e| (e.code(), decode_message(&e)))?;
    decode_request(msg).map_err(|e| (e.code(), decode_message(&e)))
}

/// The `grpc-message` of a decode error (static ASCII).
fn decode_message(e: &DecodeError) -> &'static str {
    match e {
        DecodeError::Truncated => "truncated request message",
        DecodeError::Trailing => "more than one request message",
        DecodeError::Compressed => "compressed messages are not supported",
        DecodeError::TooLarge => "request message too large",
        DecodeError::Malformed => "malformed HealthCheckRequest",
    }
}

/// What a call was, for the metrics (bounded label values).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Call {
    /// `check`, `watch` or `other`.
    pub method: &'static str,
    /// The gRPC status (`ok`, `not_found`, ...; for `watch`, of its start),
    /// or `http_error` when the request was not a gRPC call (not POST, not
    /// gRPC content).
    pub outcome: &'static str,
}

impl Code {
    /// The label value: the status name in lower case.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::Ok => "ok",
            Code::DeadlineExceeded => "deadline_exceeded",
            Code::NotFound => "not_found",
            Code::ResourceExhausted => "resource_exhausted",
            Code::Unimplemented => "unimplemented",
            Code::Internal => "internal",
        }
    }
}

/// Answers one gRPC request (see [`is_grpc`]) over HTTP/2. `guard` lives as
/// long as the call does: for `Watch`, as long as its stream.
pub async fn handle<S: Source, G: Send + 'static>(
    source: Arc<S>,
    req: Request<Incoming>,
    limits: &Limits,
    guard: G,
) -> (Response<GrpcBody>, Call) {
    let (head, body) = req.into_parts();
    let method = match head.uri.path() {
        CHECK_PATH => "check",
        WATCH_PATH => "watch",
        _ => "other",
    };
    let call = |outcome: &'static str| Call { method, outcome };
    let body = read_body(body, limits.request_timeout).await;
    if head.method != Method::POST {
        let mut r = http_error(StatusCode::METHOD_NOT_ALLOWED, "gRPC calls are POST requests\n");
        r.headers_mut().insert(ALLOW, HeaderValue::from_static("POST"));
        return (r, call("http_error"));
    }
    if !super::status::is_grpc(head.headers.get(CONTENT_TYPE)) {
        let r = http_error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "content-type must be application/grpc\n");
        return (r, call("http_error"));
    }
    let failed = |code: Code, message| (status_only(code, message), call(code.as_str()));
    if method == "other" {
        return failed(Code::Unimplemented, "unknown service or method");
    }
    let service = match body.and_then(|b| read_service(&b)) {
        Ok(s) => s,
        Err((code, message)) => return failed(code, message),
    };
    if method == "check" {
        return match verdict(&service, &*source) {
            Some(status) => {
                (grpc_head(GrpcBody::frames([response_frame(status), ok_trailers()])), call(Code::Ok.as_str()))
            }
            None => failed(Code::NotFound, "unknown service"),
        };
    }
    let Ok(permit) = limits.watches.clone().try_acquire_owned() else {
        return failed(Code::ResourceExhausted, "too many Watch streams");
    };
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let _held = (permit, guard);
        watch_loop(&*source, &service, tx).await;
    });
    (grpc_head(GrpcBody { queued: VecDeque::new(), rx: Some(rx) }), call(Code::Ok.as_str()))
}

/// Sends the current status at once, then one message per change, until the
/// client goes away (its body is dropped and `tx` closes).
async fn watch_loop<S: Source>(source: &S, service: &str, tx: mpsc::Sender<Frame<Bytes>>) {
    let mut changes = source.changes();
    // False once the sender is gone (shutdown): then only the poll wakes us.
    let mut notified = true;
    let mut last = None;
    loop {
        // Mark the current epoch seen before reading the facts: a change
        // after this read is a change to report.
        changes.borrow_and_update();
        let now = verdict(service, source).unwrap_or(ServingStatus::ServiceUnknown);
        if last != Some(now) {
            if tx.send(response_frame(now)).await.is_err() {
                return;
            }
            last = Some(now);
        }
        tokio::select! {
            r = changes.changed(), if notified => notified = r.is_ok(),
            _ = tokio::time::sleep(WATCH_POLL) => {}
            _ = tx.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed {
        ready: bool,
        live: bool,
        started: bool,
        deps: Vec<(&'static str, DepHealth)>,
    }

    impl Facts for Fixed {
        fn ready(&self) -> bool {
            self.ready
        }
        fn live(&self) -> bool {
            self.live
        }
        fn started(&self) -> bool {
            self.started
        }
        fn dependency(&self, name: &str) -> Option<DepHealth> {
            self.deps.iter().find(|(n, _)| *n == name).map(|(_, h)| *h)
        }
    }

    #[test]
    fn each_service_name_follows_its_probe_or_dependency() {
        use ServingStatus::*;
        let deps = vec![("db", DepHealth::Up), ("cache", DepHealth::Down), ("new", DepHealth::Unknown)];
        let f = Fixed { ready: false, live: true, started: true, deps: deps.clone() };
        assert_eq!(verdict("", &f), Some(NotServing));
        assert_eq!(verdict("readiness", &f), Some(NotServing));
        assert_eq!(verdict("liveness", &f), Some(Serving));
        assert_eq!(verdict("startup", &f), Some(Serving));
        assert_eq!(verdict("db", &f), Some(Serving));
        assert_eq!(verdict("cache", &f), Some(NotServing));
        assert_eq!(verdict("new", &f), Some(Unknown));
        assert_eq!(verdict("nope", &f), None);
        assert_eq!(verdict("DB", &f), None, "names are case-sensitive");
        let f = Fixed { ready: true, live: false, started: false, deps };
        assert_eq!(verdict("", &f), Some(Serving));
        assert_eq!(verdict("liveness", &f), Some(NotServing));
        assert_eq!(verdict("startup", &f), Some(NotServing));
    }

    #[test]
    fn a_probe_name_wins_over_a_dependency_of_the_same_name() {
        let f = Fixed { ready: true, live: true, started: true, deps: vec![("readiness", DepHealth::Down)] };
        assert_eq!(verdict("readiness", &f), Some(ServingStatus::Serving));
    }

    #[test]
    fn requests_decode_from_known_bytes() {
        // protoc --encode of `service: "db"`.
        assert_eq!(decode_request(&[0x0a, 0x02, b'd', b'b']).unwrap(), "db");
        assert_eq!(decode_request(&[]).unwrap(), "", "the empty message is service \"\"");
        // An unknown varint field 2 and fixed64 field 3 are skipped; the last field 1 wins.
        let msg = [0x0a, 0x01, b'a', 0x10, 0x96, 0x01, 0x19, 1, 2, 3, 4, 5, 6, 7, 8, 0x0a, 0x01, b'b'];
        assert_eq!(decode_request(&msg).unwrap(), "b");
        assert_eq!(decode_request(&[0x0a, 0x05, b'a']), Err(DecodeError::Malformed), "length past the end");
        assert_eq!(decode_request(&[0x0a, 0x02, 0xff, 0xfe]), Err(DecodeError::Malformed), "not UTF-8");
        assert_eq!(decode_request(&[0x0b]), Err(DecodeError::Malformed), "wire type 3");
        assert_eq!(decode_request(&[0x0a, 0x80]), Err(DecodeError::Malformed), "varint cut short");
        assert_eq!(decode_request(&[0x19, 1, 2]), Err(DecodeError::Malformed), "fixed64 cut short");
        assert_eq!(decode_request(&[0x02, 0x00]), Err(DecodeError::Malformed), "field number 0");
        assert_eq!(decode_request(&[0xff; 11]), Err(DecodeError::Malformed), "varint over 64 bits");
    }

    #[test]
    fn responses_encode_to_known_bytes() {
        assert_eq!(encode_response(ServingStatus::Serving), [0x08, 0x01]);
        assert_eq!(encode_response(ServingStatus::NotServing), [0x08, 0x02]);
        assert_eq!(encode_response(ServingStatus::ServiceUnknown), [0x08, 0x03]);
        assert_eq!(encode_response(ServingStatus::Unknown), [0u8; 0]);
        assert_eq!(&frame(&[0x08, 0x01])[..], [0, 0, 0, 0, 2, 0x08, 0x01]);
    }

    #[test]
    fn a_unary_body_is_exactly_one_uncompressed_message() {
        assert_eq!(unframe(&[0, 0, 0, 0, 2, 0x0a, 0x00]).unwrap(), [0x0a, 0x00]);
        assert_eq!(unframe(&[0, 0, 0, 0, 0]).unwrap(), [0u8; 0]);
        assert_eq!(unframe(&[]), Err(DecodeError::Truncated), "no message at all");
        assert_eq!(unframe(&[0, 0, 0, 0, 3, 1]), Err(DecodeError::Truncated));
        assert_eq!(unframe(&[0, 0, 0, 0, 0, 0]), Err(DecodeError::Trailing));
        assert_eq!(unframe(&[1, 0, 0, 0, 0]), Err(DecodeError::Compressed));
        assert_eq!(unframe(&[0, 0, 0, 4, 1]), Err(DecodeError::TooLarge));
        assert_eq!(DecodeError::TooLarge.code(), Code::ResourceExhausted);
        assert_eq!(DecodeError::Compressed.code(), Code::Unimplemented);
    }
}
