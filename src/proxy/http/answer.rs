//! Answers healthgate gives itself (problem+json) and why forwarding
//! failed, shared by the HTTP/1.1 path (`forward`) and the HTTP/2 one (`h2`).

use std::error::Error as StdError;

use bytes::Bytes;
use hyper::header::{self, HeaderMap};
use hyper::{Response, StatusCode};
use tokio::time::Instant;
use tracing::debug;

use super::body::{BodyTooLarge, ClientBodyError, ResBody};
use super::conn::Busy;
use super::headers::{CLOSE_VALUE, PROBLEM_VALUE};
use crate::metrics::{Outcome, RouteMetrics};

/// Why forwarding failed.
#[derive(Debug)]
pub(super) enum Fail {
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

/// Tells a body-limit or client-body failure from an upstream failure.
pub(super) fn classify(e: hyper::Error) -> Fail {
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

/// A response of ours (problem+json) with a static body.
pub(super) fn reply(
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

pub(super) fn problem(status: StatusCode, body: Bytes, busy: Busy, close: bool) -> Response<ResBody> {
    problem_with(HeaderMap::new(), status, body, busy, close)
}

/// A problem+json response using `headers` (empty) as its header map.
pub(super) fn problem_with(
    headers: HeaderMap,
    status: StatusCode,
    body: Bytes,
    busy: Busy,
    close: bool,
) -> Response<ResBody> {
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
