//! Request and response bodies: streamed both ways, the request body
//! counted against `max_body_bytes`, the app's connection returned to the
//! pool once its response body was read to the end.

use std::error::Error as StdError;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;

use super::conn::Busy;
use super::expect::Hold;

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
pub(super) struct ReqBody {
    /// `None` for a replayed bodyless request.
    pub(super) inner: Option<Incoming>,
    pub(super) left: u64,
    /// For `Expect: 100-continue`: the body is held back until the app asks
    /// for it (polling `inner` makes hyper send `100 Continue` to the client).
    pub(super) hold: Option<Hold>,
}

impl Body for ReqBody {
    type Data = Bytes;
    type Error = Box<dyn StdError + Send + Sync>;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(hold) = self.hold.as_mut() {
            if !ready!(hold.poll(cx)) {
                // The app answered without asking for the body: dropping it
                // unread tells hyper's server not to ask the client for it.
                // The body never ends: that upstream connection is not reused.
                self.inner = None;
                return Poll::Pending;
            }
            self.hold = None;
        }
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
        self.hold.is_none() && self.inner.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.as_ref().map_or(SizeHint::with_exact(0), Incoming::size_hint)
    }
}

/// The response body sent to the client.
pub(super) struct ResBody {
    pub(super) kind: Kind,
    /// Ends the request (for the idle timer) when the body is done.
    pub(super) busy: Busy,
}

pub(super) enum Kind {
    Full(Option<Bytes>),
    /// The app's body, streamed; its connection goes back to the pool once
    /// the body was read to its end.
    Upstream {
        body: Incoming,
        /// Body bytes read ahead with the head (see `forward::first_bytes`),
        /// sent first.
        first: Bytes,
        tx: Option<SendRequest<ReqBody>>,
        /// The connection's read count, pooled with it.
        read: Arc<AtomicU64>,
        ended: bool,
    },
}

impl ResBody {
    pub(super) fn full(b: Bytes, busy: Busy) -> ResBody {
        ResBody { kind: Kind::Full(Some(b)), busy }
    }
}

impl Body for ResBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match &mut self.get_mut().kind {
            Kind::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            Kind::Upstream { body, first, ended, .. } => {
                if !first.is_empty() {
                    return Poll::Ready(Some(Ok(Frame::data(std::mem::take(first)))));
                }
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
            Kind::Upstream { body, first, ended, .. } => *ended || (first.is_empty() && body.is_end_stream()),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Upstream { body, first, .. } => {
                let mut hint = body.size_hint();
                if !first.is_empty() {
                    let n = first.len() as u64;
                    // Upper first: `set_lower` asserts lower <= upper.
                    if let Some(upper) = hint.upper() {
                        hint.set_upper(upper + n);
                    }
                    hint.set_lower(hint.lower() + n);
                }
                hint
            }
        }
    }
}

impl Drop for ResBody {
    fn drop(&mut self) {
        if let Kind::Upstream { body, tx, read, ended, .. } = &mut self.kind
            && (*ended || body.is_end_stream())
            && let Some(tx) = tx.take()
        {
            self.busy.0.worker.checkin(tx, read.clone());
        }
        // A body dropped early (client gone) drops `tx` with it: hyper then
        // closes that upstream connection, which still has bytes in flight.
    }
}
