//! `type: http`: an HTTP/1.1 GET with expected statuses and an optional body
//! substring. Keeps one keep-alive connection between checks.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Request;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::time::{Instant, timeout_at};

use super::io::{Phase, io_error};
use super::tls;
use super::{Cause, Check, CheckError};
pub use crate::config::HttpSettings;

/// Largest response body read when `expect_body` is set.
const MAX_BODY: usize = 256 * 1024;

/// The `http` check.
pub struct HttpCheck {
    settings: HttpSettings,
    conn: Option<SendRequest<Empty<Bytes>>>,
}

impl HttpCheck {
    /// Builds the check.
    pub fn new(settings: HttpSettings) -> Self {
        HttpCheck { settings, conn: None }
    }

    async fn connect(&self, deadline: Instant) -> Result<SendRequest<Empty<Bytes>>, CheckError> {
        let (stream, _) = tls::connect(&self.settings.address, self.settings.tls.as_ref(), deadline).await?;
        let (sender, conn) = match timeout_at(deadline, http1::handshake(TokioIo::new(stream))).await {
            Ok(Ok(pair)) => pair,
            Ok(Err(e)) => return Err(CheckError::new(Cause::Protocol, format!("HTTP handshake: {e}"))),
            Err(_) => return Err(CheckError::new(Cause::ReadTimeout, "HTTP handshake timed out")),
        };
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    async fn request(&self, sender: &mut SendRequest<Empty<Bytes>>, deadline: Instant) -> Result<(), CheckError> {
        let s = &self.settings;
        let req = Request::get(s.path_and_query.as_str())
            .header(hyper::header::HOST, s.host_header.as_str())
            .header(hyper::header::USER_AGENT, concat!("healthgate/", env!("CARGO_PKG_VERSION")))
            .body(Empty::new())
            .map_err(|e| CheckError::new(Cause::Config, format!("cannot build request: {e}")))?;
        let resp = match timeout_at(deadline, sender.send_request(req)).await {
            Err(_) => return Err(CheckError::new(Cause::ReadTimeout, "no response in time")),
            Ok(Err(e)) => return Err(classify_hyper(&e)),
            Ok(Ok(r)) => r,
        };
        let status = resp.status().as_u16();
        let ok =
            if s.expect_status.is_empty() { (200..300).contains(&status) } else { s.expect_status.contains(&status) };
        // Always read the body: it keeps the connection reusable.
        let body = match timeout_at(deadline, Limited::new(resp.into_body(), MAX_BODY).collect()).await {
            Err(_) => return Err(CheckError::new(Cause::ReadTimeout, "response body did not arrive in time")),
            Ok(Err(e)) => return Err(CheckError::new(Cause::Protocol, format!("reading body: {e}"))),
            Ok(Ok(b)) => b.to_bytes(),
        };
        if !ok {
            return Err(CheckError::new(Cause::UnexpectedStatus, format!("status {status}")));
        }
        if let Some(want) = &s.expect_body
            && !body.windows(want.len().max(1)).any(|w| w == want.as_bytes())
        {
            return Err(CheckError::new(Cause::UnexpectedResponse, format!("body does not contain {want:?}")));
        }
        Ok(())
    }
}

/// Classifies a hyper client error.
fn classify_hyper(e: &hyper::Error) -> CheckError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
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
        if let Some(mut sender) = self.conn.take() {
            let reusable = timeout_at(deadline, sender.ready()).await.map(|r| r.is_ok()).unwrap_or(false);
            if reusable {
                match self.request(&mut sender, deadline).await {
                    Ok(()) => {
                        self.conn = Some(sender);
                        return Ok(());
                    }
                    Err(e) if e.cause != Cause::Reset => return Err(e),
                    Err(_) => {}
                }
            }
        }
        let mut sender = self.connect(deadline).await?;
        self.request(&mut sender, deadline).await?;
        self.conn = Some(sender);
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
