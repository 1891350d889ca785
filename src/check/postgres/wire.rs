//! The PostgreSQL frontend/backend protocol, as much of it as a check needs,
//! over a socket this module owns: `SSLRequest` and TLS, the startup message,
//! authentication (trust, cleartext, md5, SCRAM-SHA-256), simple queries and
//! `Terminate`.
//!
//! Message encoding and parsing, the SCRAM exchange and the md5 hash come from
//! the `postgres-protocol` crate (rust-postgres); owning the socket keeps
//! every step under the caller's deadline and lets each failure be classified
//! on its own. Server errors are classified by SQLSTATE only, never by text.

use std::net::SocketAddr;

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::backend::{ErrorFields, Message};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::super::tls::{self, Stream, TlsSettings};
use super::super::{Cause, CheckError};
use crate::check::io::exchange;

/// Largest backend message accepted (a check's replies are tiny; a `query`
/// returning a big row is read and discarded up to this size per message).
const MAX_MESSAGE: usize = 16 * 1024 * 1024;
/// Longest server text kept in a check message.
const MAX_TEXT: usize = 200;

/// A failure of one protocol step.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The connection cannot be used any more (I/O, timeout, protocol, a
    /// FATAL server error): the cause says why.
    #[error("{0}")]
    Broken(CheckError),
    /// The server answered an `ErrorResponse` of severity ERROR and is ready
    /// for the next query: the connection is still in step.
    #[error("{0}")]
    Server(ServerError),
    /// The server ended the session with a FATAL error while running a
    /// query (shutdown, a terminated backend, a pooler closing the client).
    #[error("{0}")]
    Fatal(CheckError),
}

/// An `ErrorResponse` as the server sent it (no client data in it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{severity} {code}: {message}")]
pub struct ServerError {
    /// `S`: ERROR, FATAL or PANIC (not localized: the `V` field when present).
    pub severity: String,
    /// `C`: the SQLSTATE.
    pub code: String,
    /// `M`: the primary message, truncated.
    pub message: String,
}

impl ServerError {
    /// Whether the server ends the session after this error.
    pub fn is_fatal(&self) -> bool {
        matches!(self.severity.as_str(), "FATAL" | "PANIC")
    }

    fn from_fields(mut fields: ErrorFields<'_>) -> Result<ServerError, CheckError> {
        let (mut severity, mut localized, mut code, mut message) = (None, None, None, None);
        let bad = |e: std::io::Error| CheckError::new(Cause::Protocol, format!("malformed ErrorResponse: {e}"));
        while let Some(f) = fields.next().map_err(bad)? {
            let v = String::from_utf8_lossy(f.value_bytes()).into_owned();
            match f.type_() {
                b'V' => severity = Some(v),
                b'S' => localized = Some(v),
                b'C' => code = Some(v),
                b'M' => message = Some(v),
                _ => {}
            }
        }
        Ok(ServerError {
            severity: severity.or(localized).unwrap_or_else(|| "ERROR".into()),
            code: code.unwrap_or_else(|| "XX000".into()),
            message: truncate(message.unwrap_or_default()),
        })
    }
}

/// Cuts a server text to [`MAX_TEXT`] characters.
pub fn truncate(mut s: String) -> String {
    if s.len() > MAX_TEXT {
        let mut cut = MAX_TEXT;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// The cause of a SQLSTATE. `startup` is true before the session is ready
/// (an error then refuses the login rather than a statement).
pub fn cause_of_sqlstate(code: &str, startup: bool) -> Cause {
    match code {
        // invalid_password; invalid_authorization_specification (pg_hba.conf
        // rejected or has no entry, role cannot log in, certificate refused).
        "28P01" | "28000" => Cause::Auth,
        // insufficient_privilege at login: no CONNECT privilege on the database.
        "42501" if startup => Cause::Auth,
        "53300" => Cause::TooManyConnections,
        // cannot_connect_now: starting up, shutting down, in recovery without
        // hot standby; admin_shutdown: the server is stopping (or an
        // administrator terminated this backend).
        "57P03" | "57P01" => Cause::NotReady,
        // crash_shutdown: another backend crashed and the server is
        // restarting; idle_session_timeout / idle_in_transaction_session_timeout.
        "57P02" | "57P05" | "25P03" => Cause::Reset,
        // invalid_catalog_name (no such database); database_dropped.
        "3D000" | "57P04" => Cause::NotFound,
        // read_only_sql_transaction: a write refused on a standby or a
        // read-only session; the node is not the writable primary.
        "25006" => Cause::NotMaster,
        "08P01" => Cause::Protocol,
        c if c.starts_with("08") => Cause::Reset,
        _ => Cause::ServerError,
    }
}

/// The check error for a server error.
pub fn server_error(addr: SocketAddr, e: &ServerError, startup: bool) -> CheckError {
    CheckError::new(cause_of_sqlstate(&e.code, startup), format!("{addr}: {e}"))
}

/// What the server reported during startup.
#[derive(Debug, Default, Clone)]
pub struct StartupInfo {
    /// `server_version` parameter.
    pub server_version: Option<String>,
}

/// What to log in with.
pub struct Login<'a> {
    /// Role name.
    pub user: &'a str,
    /// Password, if configured.
    pub password: Option<&'a str>,
    /// Database (None: the server's default, the user name).
    pub database: Option<&'a str>,
    /// `application_name`.
    pub application_name: &'a str,
}

/// One open connection.
pub struct Conn {
    stream: Stream,
    buf: BytesMut,
    out: BytesMut,
    /// The server's address.
    pub peer: SocketAddr,
    /// Whether `Terminate` was already sent (then `Drop` sends nothing).
    terminated: bool,
}

fn broken(cause: Cause, msg: String) -> WireError {
    WireError::Broken(CheckError::new(cause, msg))
}

impl Conn {
    /// Negotiates TLS on a fresh TCP connection with `SSLRequest` when `tls`
    /// is set (a server that declines fails with `tls`), by `deadline`.
    pub async fn negotiate(
        mut tcp: TcpStream,
        peer: SocketAddr,
        host: &str,
        tls: Option<&TlsSettings>,
        deadline: Instant,
    ) -> Result<Conn, WireError> {
        let stream = match tls {
            None => Stream::Plain(tcp),
            Some(t) => {
                let mut out = BytesMut::new();
                frontend::ssl_request(&mut out);
                exchange(deadline, "SSLRequest", tcp.write_all(&out)).await.map_err(WireError::Broken)?;
                // Exactly one byte: nothing after it may be read before the
                // handshake, or a man in the middle could inject plaintext.
                let answer = exchange(deadline, "SSLRequest", tcp.read_u8()).await.map_err(WireError::Broken)?;
                match answer {
                    b'S' => tls::handshake(t, host, tcp, deadline).await.map_err(WireError::Broken)?,
                    b'N' => {
                        return Err(broken(Cause::Tls, format!("{peer}: the server does not accept TLS (ssl = off)")));
                    }
                    other => {
                        return Err(broken(
                            Cause::Protocol,
                            format!("{peer}: unexpected answer {other:#04x} to SSLRequest: not a PostgreSQL server?"),
                        ));
                    }
                }
            }
        };
        Ok(Conn { stream, buf: BytesMut::with_capacity(4096), out: BytesMut::new(), peer, terminated: false })
    }

    /// Sends the startup message, authenticates and reads until the first
    /// `ReadyForQuery`, by `deadline`.
    pub async fn startup(&mut self, login: &Login<'_>, deadline: Instant) -> Result<StartupInfo, WireError> {
        let mut params: Vec<(&str, &str)> = vec![("user", login.user), ("application_name", login.application_name)];
        if let Some(db) = login.database {
            params.push(("database", db));
        }
        self.out.clear();
        frontend::startup_message(params, &mut self.out).map_err(|e| self.encode_error(e))?;
        self.flush(deadline, "startup").await?;
        let mut scram: Option<ScramSha256> = None;
        let mut info = StartupInfo::default();
        loop {
            match self.read(deadline, "authentication", true).await? {
                Message::AuthenticationOk => break,
                Message::AuthenticationCleartextPassword => {
                    let pw = self.password(login)?;
                    self.out.clear();
                    frontend::password_message(pw.as_bytes(), &mut self.out).map_err(|e| self.encode_error(e))?;
                    self.flush(deadline, "password").await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let pw = self.password(login)?;
                    let hash = md5_hash(login.user.as_bytes(), pw.as_bytes(), body.salt());
                    self.out.clear();
                    frontend::password_message(hash.as_bytes(), &mut self.out).map_err(|e| self.encode_error(e))?;
                    self.flush(deadline, "md5 password").await?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut scram_offered = false;
                    while let Some(m) =
                        mechanisms.next().map_err(|e| broken(Cause::Protocol, format!("{}: {e}", self.peer)))?
                    {
                        scram_offered |= m == SCRAM_SHA_256;
                    }
                    if !scram_offered {
                        return Err(broken(
                            Cause::Auth,
                            format!(
                                "{}: the server offers no SASL mechanism this check speaks (SCRAM-SHA-256)",
                                self.peer
                            ),
                        ));
                    }
                    let pw = self.password(login)?;
                    // "n,,": the client does not use channel binding; valid
                    // whether or not the server offers SCRAM-SHA-256-PLUS.
                    let s = ScramSha256::new(pw.as_bytes(), ChannelBinding::unsupported());
                    self.out.clear();
                    frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut self.out)
                        .map_err(|e| self.encode_error(e))?;
                    scram = Some(s);
                    self.flush(deadline, "SCRAM").await?;
                }
                Message::AuthenticationSaslContinue(body) => {
                    let peer = self.peer;
                    let s =
                        scram.as_mut().ok_or_else(|| broken(Cause::Protocol, format!("{peer}: SASL out of order")))?;
                    s.update(body.data()).map_err(|e| broken(Cause::Auth, format!("{peer}: SCRAM: {e}")))?;
                    self.out.clear();
                    frontend::sasl_response(s.message(), &mut self.out).map_err(|e| self.encode_error(e))?;
                    self.flush(deadline, "SCRAM").await?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let peer = self.peer;
                    let s =
                        scram.as_mut().ok_or_else(|| broken(Cause::Protocol, format!("{peer}: SASL out of order")))?;
                    // Verifies the server's signature: a server that does
                    // not know the password cannot pass.
                    s.finish(body.data()).map_err(|e| broken(Cause::Auth, format!("{peer}: SCRAM: {e}")))?;
                }
                Message::AuthenticationGss
                | Message::AuthenticationKerberosV5
                | Message::AuthenticationScmCredential
                | Message::AuthenticationSspi
                | Message::AuthenticationGssContinue(_) => {
                    return Err(broken(
                        Cause::Auth,
                        format!(
                            "{}: the server asks for GSS/SSPI/Kerberos authentication, which this check does not speak",
                            self.peer
                        ),
                    ));
                }
                Message::ErrorResponse(body) => return Err(self.fatal_at_startup(body.fields())),
                Message::NoticeResponse(_) => {}
                other => return Err(self.unexpected("authentication", &other)),
            }
        }
        loop {
            match self.read(deadline, "session start", true).await? {
                Message::ParameterStatus(p) => {
                    if p.name().ok() == Some("server_version") {
                        info.server_version = p.value().ok().map(|v| truncate(v.to_string()));
                    }
                }
                Message::BackendKeyData(_) | Message::NoticeResponse(_) => {}
                Message::ReadyForQuery(_) => return Ok(info),
                Message::ErrorResponse(body) => return Err(self.fatal_at_startup(body.fields())),
                other => return Err(self.unexpected("session start", &other)),
            }
        }
    }

    /// Runs `sql` with the simple query protocol and returns the first
    /// column of each row (as text; NULL as `None`), by `deadline`. Rows
    /// beyond the first 16 are read and discarded.
    pub async fn query(&mut self, sql: &str, deadline: Instant) -> Result<Vec<Vec<Option<String>>>, WireError> {
        self.out.clear();
        frontend::query(sql, &mut self.out).map_err(|e| self.encode_error(e))?;
        self.flush(deadline, "query").await?;
        let mut rows = Vec::new();
        let mut error: Option<ServerError> = None;
        loop {
            match self.read(deadline, "query", false).await? {
                Message::DataRow(row) => {
                    if rows.len() < 16 {
                        let buf = row.buffer();
                        let cols: Vec<Option<String>> = row
                            .ranges()
                            .map(|r| Ok(r.map(|r| String::from_utf8_lossy(&buf[r]).into_owned())))
                            .collect()
                            .map_err(|e| broken(Cause::Protocol, format!("{}: malformed DataRow: {e}", self.peer)))?;
                        rows.push(cols);
                    }
                }
                Message::ErrorResponse(body) => {
                    let e = ServerError::from_fields(body.fields()).map_err(WireError::Broken)?;
                    if e.is_fatal() {
                        self.terminated = true; // the server is closing the session
                        return Err(WireError::Fatal(server_error(self.peer, &e, false)));
                    }
                    error = Some(e);
                }
                Message::ReadyForQuery(_) => {
                    return match error {
                        Some(e) => Err(WireError::Server(e)),
                        None => Ok(rows),
                    };
                }
                Message::RowDescription(_)
                | Message::CommandComplete(_)
                | Message::EmptyQueryResponse
                | Message::NoticeResponse(_)
                | Message::ParameterStatus(_)
                | Message::NotificationResponse(_) => {}
                Message::CopyInResponse(_) | Message::CopyOutResponse(_) => {
                    return Err(broken(
                        Cause::Config,
                        format!("{}: the query starts a COPY, which a check cannot run", self.peer),
                    ));
                }
                other => return Err(self.unexpected("query", &other)),
            }
        }
    }

    /// Reads what the server sent while the connection was idle, without
    /// waiting: `Err` when it closed the session (EOF, reset, a FATAL error
    /// such as `idle_session_timeout`), so the caller can reconnect before
    /// judging anything.
    pub fn closed_while_idle(&mut self) -> Result<(), CheckError> {
        let mut tmp = [0u8; 4096];
        loop {
            match self.stream.try_read(&mut tmp) {
                Ok(0) => {
                    self.terminated = true;
                    return Err(CheckError::new(
                        Cause::Reset,
                        format!("{}: closed by the server while idle", self.peer),
                    ));
                }
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.terminated = true;
                    return Err(CheckError::new(Cause::Reset, format!("{}: {e} while idle", self.peer)));
                }
            }
        }
        // Asynchronous messages (ParameterStatus after a reload, notices)
        // are fine; an ErrorResponse between queries can only be FATAL.
        while let Some(m) = Message::parse(&mut self.buf)
            .map_err(|e| CheckError::new(Cause::Protocol, format!("{}: {e} while idle", self.peer)))?
        {
            if let Message::ErrorResponse(body) = m {
                self.terminated = true;
                let e = ServerError::from_fields(body.fields())?;
                return Err(CheckError::new(
                    Cause::Reset,
                    format!("{}: closed by the server while idle: {e}", self.peer),
                ));
            }
        }
        Ok(())
    }

    /// Sends `Terminate` and closes the stream, by `deadline`.
    pub async fn terminate(mut self, deadline: Instant) {
        if self.terminated {
            return;
        }
        self.terminated = true;
        self.out.clear();
        frontend::terminate(&mut self.out);
        let out = self.out.split().freeze();
        if exchange(deadline, "Terminate", self.stream.write_all(&out)).await.is_ok() {
            let _ = exchange(deadline, "shutdown", self.stream.shutdown()).await;
        }
    }

    fn password<'a>(&self, login: &Login<'a>) -> Result<&'a str, WireError> {
        login.password.ok_or_else(|| {
            broken(
                Cause::Auth,
                format!(
                    "{}: the server asks for a password and none is configured (password_env / password_file)",
                    self.peer
                ),
            )
        })
    }

    fn encode_error(&self, e: std::io::Error) -> WireError {
        // Only a NUL byte inside a string can fail to encode.
        broken(Cause::Config, format!("{}: cannot encode the message: {e}", self.peer))
    }

    fn fatal_at_startup(&mut self, fields: ErrorFields<'_>) -> WireError {
        self.terminated = true; // the server closes the connection after a startup error
        match ServerError::from_fields(fields) {
            Ok(e) => WireError::Broken(server_error(self.peer, &e, true)),
            Err(e) => WireError::Broken(e),
        }
    }

    fn unexpected(&self, what: &str, m: &Message) -> WireError {
        let name = match m {
            Message::ReadyForQuery(_) => "ReadyForQuery",
            Message::DataRow(_) => "DataRow",
            Message::AuthenticationOk => "AuthenticationOk",
            _ => "a message out of place",
        };
        broken(Cause::Protocol, format!("{}: {what}: unexpected {name}", self.peer))
    }

    async fn flush(&mut self, deadline: Instant, what: &str) -> Result<(), WireError> {
        let out = self.out.split().freeze();
        exchange(deadline, what, self.stream.write_all(&out)).await.map_err(|e| self.io_failure(e))
    }

    /// Reads one backend message by `deadline`.
    async fn read(&mut self, deadline: Instant, what: &str, startup: bool) -> Result<Message, WireError> {
        loop {
            if self.buf.len() >= 5 {
                let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
                if len > MAX_MESSAGE {
                    return Err(broken(Cause::Protocol, format!("{}: {what}: message of {len} bytes", self.peer)));
                }
                if startup && !self.buf[0].is_ascii_alphabetic() {
                    return Err(broken(
                        Cause::Protocol,
                        format!("{}: {what}: not a PostgreSQL reply (first byte {:#04x})", self.peer, self.buf[0]),
                    ));
                }
            }
            match Message::parse(&mut self.buf) {
                Ok(Some(m)) => return Ok(m),
                Ok(None) => {}
                Err(e) => return Err(broken(Cause::Protocol, format!("{}: {what}: {e}", self.peer))),
            }
            self.buf.reserve(4096);
            let n =
                exchange(deadline, what, self.stream.read_buf(&mut self.buf)).await.map_err(|e| self.io_failure(e))?;
            if n == 0 {
                self.terminated = true;
                return Err(broken(Cause::Reset, format!("{}: {what}: connection closed by the server", self.peer)));
            }
        }
    }

    fn io_failure(&mut self, e: CheckError) -> WireError {
        if e.cause != Cause::ReadTimeout {
            self.terminated = true;
        }
        WireError::Broken(CheckError::new(e.cause, format!("{}: {}", self.peer, e.message)))
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        // A connection given up without `terminate()` (a cancelled check, a
        // broken exchange) still says goodbye if the socket takes it, so the
        // server ends the session without logging a vanished client.
        if !self.terminated {
            let mut out = BytesMut::new();
            frontend::terminate(&mut out);
            let _ = self.stream.try_write(&out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_map_to_causes() {
        assert_eq!(cause_of_sqlstate("28P01", true), Cause::Auth);
        assert_eq!(cause_of_sqlstate("28000", true), Cause::Auth);
        assert_eq!(cause_of_sqlstate("42501", true), Cause::Auth);
        assert_eq!(cause_of_sqlstate("42501", false), Cause::ServerError);
        assert_eq!(cause_of_sqlstate("53300", true), Cause::TooManyConnections);
        assert_eq!(cause_of_sqlstate("57P03", true), Cause::NotReady);
        assert_eq!(cause_of_sqlstate("57P01", false), Cause::NotReady);
        assert_eq!(cause_of_sqlstate("57P02", false), Cause::Reset);
        assert_eq!(cause_of_sqlstate("57P05", false), Cause::Reset);
        assert_eq!(cause_of_sqlstate("3D000", true), Cause::NotFound);
        assert_eq!(cause_of_sqlstate("25006", false), Cause::NotMaster);
        assert_eq!(cause_of_sqlstate("08P01", true), Cause::Protocol);
        assert_eq!(cause_of_sqlstate("08006", false), Cause::Reset);
        assert_eq!(cause_of_sqlstate("42P01", false), Cause::ServerError);
        assert_eq!(cause_of_sqlstate("53100", false), Cause::ServerError);
    }

    #[test]
    fn long_server_texts_are_cut() {
        let s = truncate("é".repeat(300));
        assert!(s.len() <= MAX_TEXT + '…'.len_utf8(), "{}", s.len());
        assert!(s.ends_with('…'));
        assert_eq!(truncate("short".into()), "short");
    }
}
