//! `type: http`: an HTTP/1.1 GET with expected statuses and an optional body
//! substring. Keeps one keep-alive connection between checks.
//!
//! Every byte hyper reads passes through a [`Guarded`] stream that enforces
//! the current request's deadline, a byte budget and a cap on informational
//! (1xx) responses, so a server that streams `100 Continue` forever, or
//! anything else forever, costs one check its verdict and nothing more: the
//! connection task fails as soon as the budget or deadline is spent instead
//! of parsing on after the check gave up.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, timeout_at};

use super::io::{Phase, io_error};
use super::tls;
use super::{Cause, Check, CheckError};
pub use crate::config::HttpSettings;

/// Largest response body prefix searched when `expect_body` is set.
const MAX_BODY: usize = 256 * 1024;
/// Largest body read (and discarded) without `expect_body` to keep the
/// connection reusable; a longer one is not read: the connection is dropped.
const MAX_DISCARD: usize = 64 * 1024;
/// Bytes a response may take besides the body part read (status line,
/// headers, informational responses, chunk framing).
const MAX_HEAD: usize = 64 * 1024;
/// Informational (1xx) responses accepted before the final one.
const MAX_INFORMATIONAL: usize = 8;

/// Limits on what the current request may read, shared between the check
/// and the [`Guarded`] stream under hyper's connection task.
#[derive(Debug)]
struct Budget {
    base: Instant,
    /// The current request's deadline, in ms since `base`.
    deadline_ms: AtomicU64,
    /// Bytes the current response may still take.
    bytes_left: AtomicUsize,
    /// Informational responses received for the current request.
    informational: AtomicUsize,
}

impl Budget {
    fn new() -> Arc<Budget> {
        Arc::new(Budget {
            base: Instant::now(),
            deadline_ms: AtomicU64::new(0),
            bytes_left: AtomicUsize::new(0),
            informational: AtomicUsize::new(0),
        })
    }

    /// Opens the budget of one request.
    fn start(&self, deadline: Instant, bytes: usize) {
        let ms = deadline.saturating_duration_since(self.base).as_millis() as u64;
        self.deadline_ms.store(ms, Ordering::Release);
        self.bytes_left.store(bytes, Ordering::Release);
        self.informational.store(0, Ordering::Release);
    }

    /// Why the next read is refused, if it is.
    fn refusal(&self) -> Option<Exceeded> {
        if self.informational.load(Ordering::Acquire) > MAX_INFORMATIONAL {
            return Some(Exceeded::Informational);
        }
        if self.base.elapsed().as_millis() as u64 > self.deadline_ms.load(Ordering::Acquire) {
            return Some(Exceeded::Deadline);
        }
        if self.bytes_left.load(Ordering::Acquire) == 0 {
            return Some(Exceeded::Bytes);
        }
        None
    }
}

/// A read [`Guarded`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum Exceeded {
    /// More informational responses than [`MAX_INFORMATIONAL`].
    #[error("more than {MAX_INFORMATIONAL} informational (1xx) responses")]
    Informational,
    /// The request's deadline passed.
    #[error("the check's deadline passed")]
    Deadline,
    /// The response went over its byte budget.
    #[error("the response is larger than the check reads")]
    Bytes,
}

/// The check's stream as hyper sees it: reads stop at the [`Budget`].
struct Guarded {
    inner: tls::Stream,
    budget: Arc<Budget>,
}

impl AsyncRead for Guarded {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(why) = this.budget.refusal() {
            return Poll::Ready(Err(std::io::Error::other(why)));
        }
        let left = this.budget.bytes_left.load(Ordering::Acquire);
        let room = buf.remaining().min(left);
        let mut limited = ReadBuf::new(buf.initialize_unfilled_to(room));
        let result = Pin::new(&mut this.inner).poll_read(cx, &mut limited);
        let n = limited.filled().len();
        buf.advance(n);
        this.budget.bytes_left.fetch_sub(n, Ordering::AcqRel);
        result
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A kept-alive connection and the budget its reads obey.
struct Conn {
    sender: SendRequest<Empty<Bytes>>,
    budget: Arc<Budget>,
}

/// How a response body was read.
enum BodyRead {
    /// Read to its end: the connection can serve the next check.
    Whole,
    /// Not read to its end (longer than the check reads): the connection
    /// is dropped rather than read on.
    Partial,
}

/// The `http` check.
pub struct HttpCheck {
    settings: HttpSettings,
    conn: Option<Conn>,
}

impl HttpCheck {
    /// Builds the check.
    pub fn new(settings: HttpSettings) -> Self {
        HttpCheck { settings, conn: None }
    }

    async fn connect(&self, deadline: Instant) -> Result<Conn, CheckError> {
        let (stream, _) = tls::connect(&self.settings.address, self.settings.tls.as_ref(), deadline).await?;
        let budget = Budget::new();
        let io = Guarded { inner: stream, budget: budget.clone() };
        let (sender, conn) = match timeout_at(deadline, http1::handshake(TokioIo::new(io))).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return Err(CheckError::new(Cause::Protocol, format!("HTTP handshake: {e}"))),
            Err(_) => return Err(CheckError::new(Cause::ReadTimeout, "HTTP handshake timed out")),
        };
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(Conn { sender, budget })
    }

    /// One GET; `Ok(true)` when the connection can be reused.
    async fn request(&self, conn: &mut Conn, deadline: Instant) -> Result<bool, CheckError> {
        let s = &self.settings;
        let mut req = Request::get(s.path_and_query.as_str())
            .header(hyper::header::HOST, s.host_header.as_str())
            .header(hyper::header::USER_AGENT, concat!("healthgate/", env!("CARGO_PKG_VERSION")))
            .body(Empty::new())
            .map_err(|e| CheckError::new(Cause::Config, format!("cannot build request: {e}")))?;
        let body_limit = if s.expect_body.is_some() { MAX_BODY } else { MAX_DISCARD };
        conn.budget.start(deadline, MAX_HEAD + body_limit);
        let budget = conn.budget.clone();
        hyper::ext::on_informational(&mut req, move |_| {
            budget.informational.fetch_add(1, Ordering::AcqRel);
        });
        let resp = match timeout_at(deadline, conn.sender.send_request(req)).await {
            Err(_) => return Err(CheckError::new(Cause::ReadTimeout, "no response in time")),
            Ok(Err(e)) => return Err(classify_hyper(&e)),
            Ok(Ok(r)) => r,
        };
        let status = resp.status().as_u16();
        let ok =
            if s.expect_status.is_empty() { (200..300).contains(&status) } else { s.expect_status.contains(&status) };
        let want = s.expect_body.as_deref().map(str::as_bytes);
        let (read, found) = match timeout_at(deadline, read_body(resp.into_body(), body_limit, want)).await {
            Err(_) => return Err(CheckError::new(Cause::ReadTimeout, "response body did not arrive in time")),
            Ok(Err(e)) => return Err(e),
            Ok(Ok(r)) => r,
        };
        if !ok {
            return Err(CheckError::new(Cause::UnexpectedStatus, format!("status {status}")));
        }
        if let Some(want) = &s.expect_body
            && !found
        {
            let within = if matches!(read, BodyRead::Partial) { " (in its first 256 KiB)" } else { "" };
            return Err(CheckError::new(
                Cause::UnexpectedResponse,
                format!("body does not contain {:?}{within}", crate::check::text::clip(want, 64)),
            ));
        }
        Ok(matches!(read, BodyRead::Whole))
    }
}

/// Reads at most `limit` bytes of `body`, looking for `want` as they come
/// (only the tail that could start a match is kept between frames).
/// Returns how far it read and whether `want` was found.
async fn read_body(
    mut body: hyper::body::Incoming,
    limit: usize,
    want: Option<&[u8]>,
) -> Result<(BodyRead, bool), CheckError> {
    let mut seen = 0usize;
    let mut tail: Vec<u8> = Vec::new();
    let mut found = want.is_some_and(<[u8]>::is_empty);
    loop {
        let frame = match body.frame().await {
            None => return Ok((BodyRead::Whole, found)),
            Some(Err(e)) => return Err(classify_hyper(&e)),
            Some(Ok(f)) => f,
        };
        let Ok(data) = frame.into_data() else { continue };
        seen += data.len();
        if let Some(w) = want
            && !found
        {
            tail.extend_from_slice(&data[..data.len().min(limit.saturating_sub(seen - data.len()))]);
            found = tail.windows(w.len()).any(|win| win == w);
            let keep = w.len().saturating_sub(1).min(tail.len());
            tail.drain(..tail.len() - keep);
        }
        if seen >= limit {
            return Ok((BodyRead::Partial, found));
        }
    }
}

/// Classifies a hyper client error (a refusal of [`Guarded`] included).
fn classify_hyper(e: &hyper::Error) -> CheckError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            if let Some(why) = io.get_ref().and_then(|i| i.downcast_ref::<Exceeded>()) {
                let cause = if *why == Exceeded::Deadline { Cause::ReadTimeout } else { Cause::Protocol };
                return CheckError::new(cause, format!("HTTP response: {why}"));
            }
            return io_error(io, Phase::Exchange, "HTTP request");
        }
        source = s.source();
    }
    let cause =
        if e.is_incomplete_message() || e.is_canceled() || e.is_closed() { Cause::Reset } else { Cause::Protocol };
    CheckError::new(cause, format!("HTTP request: {e}"))
}

impl Check for HttpCheck {
    async fn check(&mut self, deadline: Instant) -> Result<(), CheckError> {
        // A pooled connection the server closed while idle is not an outage:
        // retry once on a fresh connection before judging.
        if let Some(mut conn) = self.conn.take() {
            let reusable = timeout_at(deadline, conn.sender.ready()).await.map(|r| r.is_ok()).unwrap_or(false);
            if reusable {
                match self.request(&mut conn, deadline).await {
                    Ok(reuse) => {
                        self.conn = reuse.then_some(conn);
                        return Ok(());
                    }
                    Err(e) if e.cause != Cause::Reset => return Err(e),
                    Err(_) => {}
                }
            }
        }
        let mut conn = self.connect(deadline).await?;
        if self.request(&mut conn, deadline).await? {
            self.conn = Some(conn);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HostPort;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A one-shot HTTP server answering every request with `reply`.
    async fn server(reply: &'static str) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(reply.as_bytes()).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        port
    }

    fn check(port: u16, expect_status: Vec<u16>, body: Option<&str>) -> HttpCheck {
        HttpCheck::new(HttpSettings {
            address: HostPort { host: "127.0.0.1".into(), port },
            path_and_query: "/health".into(),
            host_header: "x".into(),
            expect_status,
            expect_body: body.map(String::from),
            tls: None,
        })
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(2)
    }

    #[tokio::test]
    async fn expected_status_and_body_pass_and_connection_is_reused() {
        let port = server("HTTP/1.1 200 OK\r\ncontent-length: 15\r\n\r\n{\"status\":\"ok\"}").await;
        let mut c = check(port, vec![200], Some("\"ok\""));
        c.check(soon()).await.unwrap();
        c.check(soon()).await.unwrap();
        assert!(c.conn.is_some());
    }

    #[tokio::test]
    async fn unexpected_status_is_reported() {
        let port = server("HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n").await;
        let err = check(port, vec![200], None).check(soon()).await.unwrap_err();
        assert_eq!(err.cause, Cause::UnexpectedStatus);
        assert_eq!(err.message, "status 503");
    }

    #[tokio::test]
    async fn body_mismatch_is_reported() {
        let port = server("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nred").await;
        assert_eq!(
            check(port, vec![], Some("green")).check(soon()).await.unwrap_err().cause,
            Cause::UnexpectedResponse
        );
    }

    #[tokio::test]
    async fn garbage_reply_is_a_protocol_error() {
        let port = server("SSH-2.0-OpenSSH\r\n").await;
        assert_eq!(check(port, vec![], None).check(soon()).await.unwrap_err().cause, Cause::Protocol);
    }
}
