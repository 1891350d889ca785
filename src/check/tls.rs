//! TLS for the checks: settings shared by every protocol, the client
//! handshake, and [`Stream`], the plain-or-TLS connection the checks read and
//! write.
//!
//! rustls with the ring provider (the same stack the MySQL client uses, so the
//! binary has one TLS implementation). Server certificates are always
//! verified: against the Mozilla roots bundled in the binary (so a scratch or
//! distroless image needs no CA bundle), or, with `tls_ca_file`, against that
//! CA only — the usual case for an in-cluster service with a private CA.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

use super::io::{Phase, io_error};
use super::{Cause, CheckError};
use crate::config::{HostPort, KindCtx, RawDependency};
use crate::net;

/// The TLS keys every TLS-capable dependency type accepts.
pub(crate) const KEYS: &[&str] = &["tls", "tls_ca_file", "tls_cert_file", "tls_key_file", "tls_server_name"];

/// TLS settings of one dependency.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsSettings {
    /// PEM file of the CA certificates to trust instead of the bundled Mozilla roots.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain presented to servers that ask for a client certificate.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Name sent as SNI and verified in the certificate (default: the host checked).
    pub server_name: Option<String>,
}

impl TlsSettings {
    /// Reads the TLS keys. `by_scheme` is true when the URL already asks for
    /// TLS (`https://`, `rediss://`, `amqps://`). Returns `Err` after
    /// reporting a problem, `Ok(None)` when the dependency does not use TLS.
    pub(crate) fn from_raw(d: &RawDependency, ctx: &mut KindCtx<'_>, by_scheme: bool) -> Result<Option<Self>, ()> {
        let enabled = match &d.tls {
            Some(t) if by_scheme && !t.value => {
                ctx.error(t, "tls", "the URL scheme asks for TLS; remove `tls: false`");
                return Err(());
            }
            Some(t) => t.value,
            None => by_scheme,
        };
        let path = |v: &Option<serde_saphyr::Spanned<String>>| v.as_ref().map(|s| PathBuf::from(&s.value));
        let settings = TlsSettings {
            ca_file: path(&d.tls_ca_file),
            cert_file: path(&d.tls_cert_file),
            key_file: path(&d.tls_key_file),
            server_name: d.tls_server_name.as_ref().map(|s| s.value.clone()),
        };
        if !enabled {
            let extra = [
                (&d.tls_ca_file, "tls_ca_file"),
                (&d.tls_cert_file, "tls_cert_file"),
                (&d.tls_key_file, "tls_key_file"),
                (&d.tls_server_name, "tls_server_name"),
            ];
            if let Some((Some(s), k)) = extra.into_iter().find(|(v, _)| v.is_some()) {
                ctx.error(s, k, "only has an effect with TLS: set `tls: true` (or use the TLS URL scheme)");
                return Err(());
            }
            return Ok(None);
        }
        // Everything that can be checked before the first connect is checked
        // now, each problem at its own key.
        let mut ok = true;
        if let Some(s) = &d.tls_server_name
            && ServerName::try_from(s.value.as_str()).is_err()
        {
            ctx.error(s, "tls_server_name", "not a valid DNS name or IP address");
            ok = false;
        }
        if let Some(s) = &d.tls_ca_file
            && let Err(e) = load_roots(Path::new(&s.value))
        {
            ctx.error(s, "tls_ca_file", e);
            ok = false;
        }
        match (&d.tls_cert_file, &d.tls_key_file) {
            (Some(c), None) => {
                ctx.error(c, "tls_cert_file", "a client certificate needs `tls_key_file` too");
                ok = false;
            }
            (None, Some(k)) => {
                ctx.error(k, "tls_key_file", "a client key needs `tls_cert_file` too");
                ok = false;
            }
            (Some(c), Some(k)) => {
                if let Err(e) = load_chain(Path::new(&c.value)) {
                    ctx.error(c, "tls_cert_file", e);
                    ok = false;
                }
                if let Err(e) = PrivateKeyDer::from_pem_file(&k.value) {
                    ctx.error(k, "tls_key_file", format!("cannot read a PEM private key: {e}"));
                    ok = false;
                }
            }
            (None, None) => {}
        }
        if ok { Ok(Some(settings)) } else { Err(()) }
    }

    /// Builds the rustls client configuration. The files are read again at
    /// every connect, so a rotated CA or client certificate is picked up.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, CheckError> {
        let config_error = |e: String| CheckError::new(Cause::Config, e);
        let roots = match &self.ca_file {
            Some(path) => load_roots(path).map_err(config_error)?,
            None => RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() },
        };
        let builder = ClientConfig::builder().with_root_certificates(roots);
        let config = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                let chain = load_chain(cert).map_err(config_error)?;
                let key = PrivateKeyDer::from_pem_file(key)
                    .map_err(|e| config_error(format!("{}: cannot read a PEM private key: {e}", key.display())))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| config_error(format!("client certificate and key do not fit: {e}")))?
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

fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read PEM certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certs)
}

fn load_roots(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(load_chain(path)?);
    if added == 0 {
        return Err(format!("{} holds no usable CA certificate", path.display()));
    }
    Ok(roots)
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
