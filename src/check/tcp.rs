//! `type: tcp`: a TCP connect, optionally followed by sending bytes and
//! expecting a reply that contains given bytes.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::io::exchange;
use super::tls;
use super::{Cause, Check, CheckError};
pub use crate::config::TcpSettings;

/// The `tcp` check. Opens a fresh connection each time: a connect is the
/// thing being checked.
pub struct TcpCheck {
    settings: TcpSettings,
}

impl TcpCheck {
    /// Builds the check.
    pub fn new(settings: TcpSettings) -> Self {
        TcpCheck { settings }
    }
}

impl Check for TcpCheck {
    async fn check(&mut self, deadline: Instant) -> Result<(), CheckError> {
        let (mut stream, _) = tls::connect(&self.settings.address, self.settings.tls.as_ref(), deadline).await?;
        if let Some(send) = &self.settings.send {
            exchange(deadline, "send", stream.write_all(send)).await?;
        }
        if let Some(expect) = &self.settings.expect {
            // Search only the new bytes (and the tail that could start a
            // match), so a chatty server costs linear work, at most 64 KiB.
            let mut buf = Vec::with_capacity(256);
            loop {
                let mut chunk = [0u8; 8192];
                let n = exchange(deadline, "read reply", stream.read(&mut chunk)).await?;
                if n == 0 {
                    return Err(CheckError::new(Cause::Reset, "connection closed before the expected reply"));
                }
                let from = buf.len().saturating_sub(expect.len() - 1);
                buf.extend_from_slice(&chunk[..n]);
                if buf[from..].windows(expect.len()).any(|w| w == expect.as_slice()) {
                    break;
                }
                if buf.len() > 64 * 1024 {
                    return Err(CheckError::new(
                        Cause::UnexpectedResponse,
                        "expected bytes not found in the first 64 KiB",
                    ));
                }
            }
        }
        // Close with FIN, not RST: a clean close leaves no error in the server's logs.
        let _ = tokio::time::timeout_at(deadline, stream.shutdown()).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HostPort;
    use crate::config::dependency::tcp::unescape;
    use std::time::Duration;
    use tokio::net::TcpListener;

    fn check_for(port: u16, send: Option<&str>, expect: Option<&str>) -> TcpCheck {
        TcpCheck::new(TcpSettings {
            address: HostPort { host: "127.0.0.1".into(), port },
            send: send.map(|s| unescape(s).unwrap()),
            expect: expect.map(|s| unescape(s).unwrap()),
            tls: None,
        })
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(2)
    }

    #[tokio::test]
    async fn send_expect_passes_when_reply_contains_expected_bytes() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut b = [0u8; 16];
            let _ = s.read(&mut b).await;
            s.write_all(b"+PONG\r\n").await.unwrap();
        });
        check_for(port, Some("PING\\r\\n"), Some("+PONG")).check(soon()).await.unwrap();
    }

    #[tokio::test]
    async fn silent_server_is_a_read_timeout() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let _keep = tokio::spawn(async move {
            let (_s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let err =
            check_for(port, None, Some("x")).check(Instant::now() + Duration::from_millis(200)).await.unwrap_err();
        assert_eq!(err.cause, Cause::ReadTimeout);
    }

    #[tokio::test]
    async fn closed_port_is_refused() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        assert_eq!(check_for(port, None, None).check(soon()).await.unwrap_err().cause, Cause::Refused);
    }
}
