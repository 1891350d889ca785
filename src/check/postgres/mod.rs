//! `type: postgres` (alias `postgresql`): a PostgreSQL check over the real
//! frontend/backend protocol on one persistent connection.
//!
//! Each check is one cheap round trip on a connection kept between checks:
//! an empty query, or the configured `query`, plus the `require_writable`
//! select when set. The check owns its socket (framing, SCRAM and md5 come
//! from `postgres-protocol`, see [`wire`]) so that every step has its own
//! deadline and cause, and nothing reconnects behind its back.
//!
//! The server must never log a vanished client because of healthgate:
//!
//! * every connection ends with `Terminate` (also when a check is cancelled
//!   or a connection is given up: [`wire::Conn`]'s `Drop` sends it);
//! * an exchange that overruns its check's deadline is not cut off: it keeps
//!   running in a background task (bounded by [`ABANDON_AFTER`]) and the
//!   next check takes the connection back when the late reply arrives, so a
//!   frozen server sees no half-finished startup and no vanished client when
//!   it resumes, and no second connection is opened meanwhile.
//!
//! A connection the server closed while idle (`idle_session_timeout`, a
//! pooler's idle timeout, a restart) is noticed before or at its first use
//! and replaced once within the same check before anything is judged.

pub mod wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout, timeout_at};
use tracing::debug;

use super::{Cause, Check, CheckError, Details};
use crate::config::DependencyConfig;
pub use crate::config::PostgresSettings;
use crate::net;
use wire::{Conn, Login, WireError};

/// How long an exchange that overran its check may keep running in the
/// background before it is given up.
pub const ABANDON_AFTER: Duration = Duration::from_secs(30);

/// The `require_writable` query: one round trip, no privileges needed.
const WRITABLE_QUERY: &str =
    "SELECT pg_catalog.pg_is_in_recovery(), pg_catalog.current_setting('transaction_read_only')";

// === The check ===

/// How an exchange failed.
#[derive(Debug)]
enum Failure {
    /// The server answered, and the answer means "not healthy"; the
    /// connection is still in step and is kept.
    Judged(CheckError),
    /// The server ended the session (EOF, reset, a FATAL error): on a reused
    /// connection, a reason to reconnect once before judging.
    Lost(CheckError),
    /// Anything else that makes the connection unusable.
    Broken(CheckError),
}

impl Failure {
    fn error(self) -> CheckError {
        match self {
            Failure::Judged(e) | Failure::Lost(e) | Failure::Broken(e) => e,
        }
    }
}

impl From<WireError> for Failure {
    fn from(e: WireError) -> Self {
        match e {
            WireError::Server(e) => {
                Failure::Judged(CheckError::new(wire::cause_of_sqlstate(&e.code, false), e.to_string()))
            }
            WireError::Fatal(e) => Failure::Lost(e),
            WireError::Broken(e) if e.cause == Cause::Reset => Failure::Lost(e),
            WireError::Broken(e) => Failure::Broken(e),
        }
    }
}

/// Progress of a background exchange, for classifying a timeout.
const STAGE_CONNECTING: u8 = 0;
const STAGE_ESTABLISHED: u8 = 1;

/// What a background exchange returns.
struct Outcome {
    /// The connection, when it is still in step.
    conn: Option<Conn>,
    /// `server_version`, from a new session.
    version: Option<String>,
    result: Result<(), Failure>,
}

/// An exchange still running when its check's deadline passed.
struct Pending {
    task: JoinHandle<Outcome>,
    stage: Arc<AtomicU8>,
    peer: std::net::SocketAddr,
    since: Instant,
}

enum Slot {
    Empty,
    Idle(Conn),
    Busy(Pending),
}

/// The `postgres` check.
pub struct PostgresCheck {
    settings: Arc<PostgresSettings>,
    slot: Slot,
    server_version: Option<String>,
    /// The passwords sent so far, kept out of published messages.
    secrets: crate::check::text::KnownSecrets,
}

impl PostgresCheck {
    /// Builds the check.
    pub fn new(settings: PostgresSettings, _dep: &DependencyConfig) -> Self {
        PostgresCheck {
            settings: Arc::new(settings),
            slot: Slot::Empty,
            server_version: None,
            secrets: Default::default(),
        }
    }

    /// The error for an exchange still unanswered at the deadline.
    fn overdue(p: &Pending, earlier: bool) -> CheckError {
        let waiting = if earlier {
            format!(" (still waiting for an exchange started {:?} ago)", p.since.elapsed())
        } else {
            String::new()
        };
        match p.stage.load(Ordering::Acquire) {
            STAGE_CONNECTING => CheckError::new(
                Cause::ConnectTimeout,
                format!("{}: no complete session in time: startup, TLS or authentication unanswered{waiting}", p.peer),
            ),
            _ => {
                CheckError::new(Cause::ReadTimeout, format!("{}: no reply to the check query in time{waiting}", p.peer))
            }
        }
    }

    /// Spawns `work` and waits for it until `deadline`; past the deadline it
    /// keeps running and the slot holds it for the next check.
    async fn run(
        &mut self,
        peer: std::net::SocketAddr,
        stage: Arc<AtomicU8>,
        deadline: Instant,
        work: impl Future<Output = Outcome> + Send + 'static,
    ) -> Result<Outcome, CheckError> {
        let task = tokio::spawn(async move {
            match timeout(ABANDON_AFTER, work).await {
                Ok(o) => o,
                Err(_) => Outcome {
                    conn: None,
                    version: None,
                    result: Err(Failure::Broken(CheckError::new(Cause::ReadTimeout, "given up"))),
                },
            }
        });
        self.slot = Slot::Busy(Pending { task, stage, peer, since: Instant::now() });
        self.await_busy(deadline, false).await.expect("slot is busy")
    }

    /// Waits for a pending exchange until `deadline`. `None` when none is pending.
    async fn await_busy(&mut self, deadline: Instant, earlier: bool) -> Option<Result<Outcome, CheckError>> {
        let Slot::Busy(p) = &mut self.slot else { return None };
        match timeout_at(deadline, &mut p.task).await {
            Err(_) => Some(Err(Self::overdue(p, earlier))),
            Ok(joined) => {
                self.slot = Slot::Empty;
                Some(Ok(joined.unwrap_or_else(|e| Outcome {
                    conn: None,
                    version: None,
                    result: Err(Failure::Broken(CheckError::new(Cause::Protocol, format!("check task failed: {e}")))),
                })))
            }
        }
    }

    /// Opens a new connection and probes it.
    async fn fresh(&mut self, deadline: Instant) -> Result<(), CheckError> {
        let password = match &self.settings.password {
            None => None,
            Some(src) => Some(src.read().map_err(|e| CheckError::new(Cause::Config, e.to_string()))?),
        };
        if let Some(pw) = &password {
            self.secrets.remember(pw.expose());
        }
        // DNS and TCP connect in the foreground: cancelling them leaves
        // nothing behind on the server.
        let (tcp, peer) = net::connect(&self.settings.address, deadline).await?;
        let settings = self.settings.clone();
        let stage = Arc::new(AtomicU8::new(STAGE_CONNECTING));
        let st = stage.clone();
        let work = async move {
            let end = Instant::now() + ABANDON_AFTER;
            let host = settings.address.host.as_str();
            let mut conn = match Conn::negotiate(tcp, peer, host, settings.tls.as_ref(), end).await {
                Ok(c) => c,
                Err(e) => return Outcome { conn: None, version: None, result: Err(Failure::Broken(wire_error(e))) },
            };
            let login = Login {
                user: &settings.user,
                password: password.as_ref().map(|p| p.expose()),
                database: settings.database.as_deref(),
                application_name: &settings.application_name,
            };
            let info = match conn.startup(&login, end).await {
                Ok(info) => info,
                // A failed login is judged as it is: no reconnect.
                Err(e) => return Outcome { conn: None, version: None, result: Err(Failure::Broken(wire_error(e))) },
            };
            st.store(STAGE_ESTABLISHED, Ordering::Release);
            let result = probe(&mut conn, &settings, end).await;
            let keep = matches!(result, Ok(()) | Err(Failure::Judged(_)));
            Outcome { conn: keep.then_some(conn), version: info.server_version, result }
        };
        let outcome = self.run(peer, stage, deadline, work).await?;
        self.settle(outcome)
    }

    /// Keeps the connection of a finished exchange and returns its verdict.
    fn settle(&mut self, outcome: Outcome) -> Result<(), CheckError> {
        if let Some(v) = outcome.version {
            self.server_version = Some(v);
        }
        if let Some(conn) = outcome.conn {
            self.slot = Slot::Idle(conn);
        }
        outcome.result.map_err(Failure::error)
    }
}

/// A wire error outside a query (where an ERROR cannot happen).
fn wire_error(e: WireError) -> CheckError {
    match e {
        WireError::Broken(e) | WireError::Fatal(e) => e,
        WireError::Server(e) => CheckError::new(wire::cause_of_sqlstate(&e.code, true), e.to_string()),
    }
}

/// One probe on an established session: the `require_writable` select, then
/// the `query` (or the empty query when neither is set).
async fn probe(conn: &mut Conn, s: &PostgresSettings, deadline: Instant) -> Result<(), Failure> {
    let peer = conn.peer;
    let judged = |e: WireError| match e {
        WireError::Server(e) => Failure::Judged(wire::server_error(peer, &e, false)),
        other => Failure::from(other),
    };
    if s.require_writable {
        let rows = conn.query(WRITABLE_QUERY, deadline).await.map_err(judged)?;
        let row = rows.first().map(|r| (r.first().cloned().flatten(), r.get(1).cloned().flatten()));
        match row {
            Some((Some(recovery), Some(read_only))) => {
                if recovery == "t" {
                    return Err(Failure::Judged(CheckError::new(
                        Cause::NotMaster,
                        format!("{peer}: the server is a standby (pg_is_in_recovery() is true)"),
                    )));
                }
                if read_only == "on" {
                    return Err(Failure::Judged(CheckError::new(
                        Cause::NotMaster,
                        format!("{peer}: sessions are read-only (transaction_read_only is on)"),
                    )));
                }
            }
            _ => {
                return Err(Failure::Judged(CheckError::new(
                    Cause::Protocol,
                    format!("{peer}: the writable check returned no usable row"),
                )));
            }
        }
    }
    match &s.query {
        Some(q) => conn.query(q, deadline).await.map(drop).map_err(judged),
        None if s.require_writable => Ok(()),
        // The empty query: a full round trip through the backend (and a
        // pooler) that parses and plans nothing.
        None => conn.query("", deadline).await.map(drop).map_err(judged),
    }
}

impl Check for PostgresCheck {
    fn secrets(&self) -> Vec<String> {
        self.secrets.snapshot()
    }

    async fn check(&mut self, deadline: Instant) -> Result<(), CheckError> {
        // 1. An exchange left over from an earlier check: wait for it (it
        //    holds the one connection), then take its connection back.
        if let Some(waited) = self.await_busy(deadline, true).await {
            let outcome = waited?;
            if let Some(v) = outcome.version {
                self.server_version = Some(v);
            }
            if let Some(conn) = outcome.conn {
                self.slot = Slot::Idle(conn);
            }
        }

        // 2. Reuse the idle connection. If the server closed it while idle,
        //    open a new one once, within this check, before judging.
        if let Slot::Idle(mut conn) = std::mem::replace(&mut self.slot, Slot::Empty) {
            match conn.closed_while_idle() {
                Err(e) => debug!(error = %e, "postgres connection closed while idle; reconnecting"),
                Ok(()) => {
                    let peer = conn.peer;
                    let settings = self.settings.clone();
                    let work = async move {
                        let mut conn = conn;
                        let result = probe(&mut conn, &settings, Instant::now() + ABANDON_AFTER).await;
                        let keep = matches!(result, Ok(()) | Err(Failure::Judged(_)));
                        Outcome { conn: keep.then_some(conn), version: None, result }
                    };
                    let outcome = self.run(peer, Arc::new(AtomicU8::new(STAGE_ESTABLISHED)), deadline, work).await?;
                    match outcome.result {
                        Err(Failure::Lost(e)) => {
                            debug!(error = %e, "postgres connection lost while idle; reconnecting once");
                        }
                        _ => return self.settle(outcome),
                    }
                }
            }
        }

        // 3. A new connection.
        self.fresh(deadline).await
    }

    fn details(&self) -> Details {
        Details { server_version: self.server_version.clone(), ..Details::default() }
    }

    async fn close(&mut self, deadline: Instant) {
        let conn = match std::mem::replace(&mut self.slot, Slot::Empty) {
            Slot::Empty => None,
            Slot::Idle(c) => Some(c),
            // An exchange still running: its connection, if it comes back
            // in time; otherwise the task ends it when it finishes.
            Slot::Busy(mut p) => match timeout_at(deadline, &mut p.task).await {
                Ok(Ok(outcome)) => outcome.conn,
                _ => None,
            },
        };
        if let Some(c) = conn {
            let peer = c.peer;
            c.terminate(deadline).await;
            debug!(%peer, "postgres connection closed with Terminate");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigError, DependencyKind};
    use std::path::Path;

    const LISTENER: &str = "listeners:\n  - name: web\n    listen: 127.0.0.1:0\n    upstream: 127.0.0.1:3000\n";

    fn load(dep: &str) -> Result<Config, ConfigError> {
        Config::from_yaml(&format!("{LISTENER}dependencies:\n  - name: db\n{dep}"), Path::new("t.yaml"))
    }

    fn check_of(dep: &str) -> PostgresCheck {
        let dep = load(dep).unwrap().dependencies.remove(0);
        match &dep.kind {
            DependencyKind::Postgres(s) => PostgresCheck::new(s.clone(), &dep),
            other => panic!("not postgres: {other:?}"),
        }
    }

    /// A server that accepts and answers with `reply`, then closes.
    async fn fake_server(reply: impl AsRef<[u8]> + Send + 'static) -> std::net::SocketAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            while let Ok((mut s, _)) = l.accept().await {
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(reply.as_ref()).await;
                let _ = s.shutdown().await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn server_closing_mid_startup_is_a_reset() {
        let addr = fake_server(b"R\0\0").await;
        let mut c = check_of(&format!("    type: postgres\n    address: \"{addr}\"\n    user: hg\n"));
        let err = c.check(Instant::now() + Duration::from_secs(2)).await.unwrap_err();
        assert_eq!(err.cause, Cause::Reset, "{err}");
    }

    #[tokio::test]
    async fn a_server_that_is_not_postgres_is_a_protocol_error() {
        let addr = fake_server(b"SSH-2.0-OpenSSH_9.2\r\n").await;
        let mut c = check_of(&format!("    type: postgres\n    address: \"{addr}\"\n    user: hg\n"));
        let err = c.check(Instant::now() + Duration::from_secs(2)).await.unwrap_err();
        assert_eq!(err.cause, Cause::Protocol, "{err}");
    }

    #[tokio::test]
    async fn startup_error_is_classified_by_sqlstate_and_keeps_the_message() {
        let body: &[u8] = b"SFATAL\0VFATAL\0C53300\0Msorry, too many clients already\0\0";
        let mut reply = b"E".to_vec();
        reply.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        reply.extend_from_slice(body);
        let addr = fake_server(reply).await;
        let mut c = check_of(&format!("    type: postgres\n    address: \"{addr}\"\n    user: hg\n"));
        let err = c.check(Instant::now() + Duration::from_secs(2)).await.unwrap_err();
        assert_eq!(err.cause, Cause::TooManyConnections, "{err}");
        assert!(err.message.contains("too many clients"), "{err}");
    }

    #[tokio::test]
    async fn tls_refused_by_the_server_is_tls() {
        let addr = fake_server(b"N").await;
        let mut c = check_of(&format!("    type: postgres\n    address: \"{addr}\"\n    user: hg\n    tls: true\n"));
        let err = c.check(Instant::now() + Duration::from_secs(2)).await.unwrap_err();
        assert_eq!(err.cause, Cause::Tls, "{err}");
    }

    #[tokio::test]
    async fn a_silent_server_is_a_connect_timeout_within_the_deadline() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut c = check_of(&format!("    type: postgres\n    address: \"{addr}\"\n    user: hg\n"));
        let start = Instant::now();
        let err = c.check(start + Duration::from_millis(300)).await.unwrap_err();
        assert!(start.elapsed() < Duration::from_millis(450), "{:?}", start.elapsed());
        assert_eq!(err.cause, Cause::ConnectTimeout, "{err}");
        // The startup stays pending: the next check waits for it rather than
        // opening a second connection.
        let err = c.check(Instant::now() + Duration::from_millis(200)).await.unwrap_err();
        assert_eq!(err.cause, Cause::ConnectTimeout, "{err}");
        assert!(err.message.contains("still waiting"), "{err}");
        drop(l);
    }
}
