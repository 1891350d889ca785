//! `type: tcp`: a TCP connect, optionally followed by sending bytes and
//! expecting a reply that contains given bytes.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::io::exchange;
use super::tls::{self, TlsSettings};
use super::{Cause, Check, CheckError};
use crate::config::{HostPort, KindCtx, RawDependency};

/// Keys a `tcp` dependency accepts besides the common ones.
pub(crate) const KEYS: &[&str] = &["address", "send", "expect"];

/// Settings of a `tcp` dependency.
#[derive(Debug, Clone)]
pub struct TcpSettings {
    /// Where to connect.
    pub address: HostPort,
    /// Bytes to send after connecting (escapes `\r`, `\n`, `\t`, `\\`, `\xNN` allowed).
    pub send: Option<Vec<u8>>,
    /// Bytes the reply must contain.
    pub expect: Option<Vec<u8>>,
    /// With TLS, the check is a completed, verified TLS handshake.
    pub tls: Option<TlsSettings>,
}

impl TcpSettings {
    pub(crate) fn from_raw(d: &RawDependency, mut ctx: KindCtx<'_>) -> Option<Self> {
        let address = ctx.required(&d.address, "address")?;
        let address = ctx.host_port(address, "address", None);
        let mut bytes = |v: &Option<serde_saphyr::Spanned<String>>, k: &str| match v {
            Some(s) => match unescape(&s.value) {
                Ok(b) => Some(b),
                Err(e) => {
                    ctx.error(s, k, e);
                    None
                }
            },
            None => None,
        };
        let send = bytes(&d.send, "send");
        let expect = bytes(&d.expect, "expect");
        if let Some(e) = &d.expect
            && e.value.is_empty()
        {
            ctx.error(e, "expect", "must not be empty");
        }
        let tls = TlsSettings::from_raw(d, &mut ctx, false).ok()?;
        Some(TcpSettings { address: address?, send, expect, tls })
    }
}

/// Decodes the escapes allowed in `send`/`expect`.
fn unescape(s: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut buf = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        match chars.next() {
            Some('r') => out.push(b'\r'),
            Some('n') => out.push(b'\n'),
            Some('t') => out.push(b'\t'),
            Some('0') => out.push(0),
            Some('\\') => out.push(b'\\'),
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                out.push(u8::from_str_radix(&hex, 16).map_err(|_| format!("invalid escape \\x{hex}"))?);
            }
            other => return Err(format!("invalid escape \\{}", other.map(String::from).unwrap_or_default())),
        }
    }
    Ok(out)
}

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
            let mut buf = Vec::with_capacity(256);
            loop {
                let mut chunk = [0u8; 1024];
                let n = exchange(deadline, "read reply", stream.read(&mut chunk)).await?;
                if n == 0 {
                    return Err(CheckError::new(Cause::Reset, "connection closed before the expected reply"));
                }
                buf.extend_from_slice(&chunk[..n]);
                if buf.windows(expect.len()).any(|w| w == expect.as_slice()) {
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

    #[test]
    fn escapes_decode() {
        assert_eq!(unescape("a\\r\\n\\x41\\\\").unwrap(), b"a\r\nA\\");
        assert!(unescape("\\q").is_err());
    }
}
