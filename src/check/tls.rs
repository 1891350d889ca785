//! TLS for the checks: the client configuration built from a dependency's
//! `TlsSettings` (read and validated in `crate::config`), the handshake, and [`Stream`], the plain-or-TLS connection the checks read and
//! write.
//!
//! rustls with the ring provider (the same stack the MySQL client uses, so the
//! binary has one TLS implementation). Server certificates are always
//! verified: against the Mozilla roots bundled in the binary (so a scratch or
//! distroless image needs no CA bundle), or, with `tls_ca_file`, against that
//! CA only — the usual case for an in-cluster service with a private CA.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use super::io::{Phase, io_error};
use super::{Cause, CheckError};
use crate::config::HostPort;
pub use crate::config::TlsSettings;
use crate::config::dependency::tls::{PemError, load_chain, load_key, load_roots};
use crate::net;

impl TlsSettings {
    /// Builds the rustls client configuration. The files are read again at
    /// every connect, so a rotated CA or client certificate is picked up.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, CheckError> {
        let config_error = |e: PemError| CheckError::new(Cause::Config, e.to_string());
        let roots = match &self.ca_file {
            Some(path) => load_roots(path).map_err(config_error)?,
            None => RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() },
        };
        let builder = ClientConfig::builder().with_root_certificates(roots);
        let config = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                let chain = load_chain(cert).map_err(config_error)?;
                let key = load_key(key).map_err(config_error)?;
                builder.with_client_auth_cert(chain, key).map_err(|e| {
                    CheckError::new(Cause::Config, format!("client certificate and key do not fit: {e}"))
                })?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }

    /// The name to verify for a connection to `host`.
    pub fn name_for<'a>(&'a self, host: &'a str) -> &'a str {
        self.server_name.as_deref().unwrap_or(host)
    }
}

/// Connects to `target` (every resolved address) and, with `tls`, completes
/// the TLS handshake, all by `deadline`.
pub async fn connect(
    target: &HostPort,
    tls: Option<&TlsSettings>,
    deadline: Instant,
) -> Result<(Stream, std::net::SocketAddr), CheckError> {
    let (tcp, peer) = net::connect(target, deadline).await?;
    match tls {
        None => Ok((Stream::Plain(tcp), peer)),
        Some(tls) => Ok((handshake(tls, &target.host, tcp, deadline).await?, peer)),
    }
}

/// Runs the client handshake on an established connection by `deadline`.
pub async fn handshake(tls: &TlsSettings, host: &str, tcp: TcpStream, deadline: Instant) -> Result<Stream, CheckError> {
    let config = tls.client_config()?;
    let name = tls.name_for(host);
    let server_name = ServerName::try_from(name.to_string())
        .map_err(|_| CheckError::new(Cause::Config, format!("{name:?} is not a valid TLS server name")))?;
    match timeout_at(deadline, TlsConnector::from(config).connect(server_name, tcp)).await {
        Ok(Ok(s)) => Ok(Stream::Tls(Box::new(s))),
        // A TLS failure (certificate, alert, not TLS at all) is `tls`; the
        // connection dying under the handshake keeps its transport cause.
        Ok(Err(e)) => Err(io_error(&e, Phase::Exchange, "TLS handshake")),
        Err(_) => {
            Err(CheckError::new(Cause::ReadTimeout, "TLS handshake: no reply in time (does this port speak TLS?)"))
        }
    }
}

/// A check's connection: plain TCP or TLS over TCP.
#[derive(Debug)]
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS (boxed: the session state is large and most checks are plain).
    Tls(Box<TlsStream<TcpStream>>),
}

impl Stream {
    /// Reads what is already available without waiting (`WouldBlock` when
    /// nothing is): picks up heartbeats or a close the server sent between checks.
    pub fn try_read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.try_read(buf),
            Stream::Tls(s) => {
                let mut rb = ReadBuf::new(buf);
                let mut cx = Context::from_waker(Waker::noop());
                match Pin::new(s.as_mut()).poll_read(&mut cx, &mut rb) {
                    Poll::Ready(Ok(())) => Ok(rb.filled().len()),
                    Poll::Ready(Err(e)) => Err(e),
                    Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
                }
            }
        }
    }

    /// Writes what fits without waiting; best effort for goodbyes in `Drop`.
    pub fn try_write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.try_write(buf),
            Stream::Tls(s) => {
                let mut cx = Context::from_waker(Waker::noop());
                let mut s = Pin::new(s.as_mut());
                match s.as_mut().poll_write(&mut cx, buf) {
                    Poll::Ready(r) => {
                        let _ = s.poll_flush(&mut cx);
                        r
                    }
                    Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
                }
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
