//! `type: mysql` (alias `mariadb`): a MySQL-protocol check over one
//! persistent connection (mysql_async; TLS through its rustls support).
//!
//! Each check sends `COM_PING`, or the configured `query`, and optionally the
//! `require_writable` / `galera` readiness queries, on a connection that is
//! kept between checks. The design goal is that the server never counts an
//! aborted connection because of healthgate (`Aborted_connects`,
//! `Aborted_clients`), so the pod's IP can never be host-blocked (error
//! 1129, `max_connect_errors`):
//!
//! * every connection ends with `COM_QUIT` (`Conn::disconnect`);
//! * when the session's `@@wait_timeout` is not comfortably above the check
//!   interval, the connection is closed after each check instead of being
//!   left for the server to kill;
//! * an exchange that overruns the check's deadline is not cut off: it keeps
//!   running in a background task (bounded by [`ABANDON_AFTER`], after which
//!   its connection is dropped, which mysql_async ends with a `COM_QUIT` if
//!   it can) and the next check takes the connection back when the late
//!   reply arrives. So a
//!   frozen server sees no half-finished handshake and no vanished client,
//!   and healthgate opens no second connection while one is still pending.
//!
//! A connection the server closed while idle (`wait_timeout`, "gone away",
//! EOF or reset on first use) is replaced once within the same check before
//! anything is judged: a stale idle connection is not an outage.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{ClientIdentity, Conn, DriverError, IoError, OptsBuilder, SslOpts, Value};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout, timeout_at};
use tracing::debug;

use super::io::{Phase, classify_io};
use super::tls::TlsSettings;
use super::{ABANDON_AFTER, Cause, Check, CheckError, Details, most_telling};
use crate::config::DependencyConfig;
pub use crate::config::{GaleraMode, MysqlSettings};
use crate::net;

/// Bound on the background `COM_QUIT` of a connection being retired.
const QUIT_BOUND: Duration = Duration::from_secs(5);

/// mysql_async's TLS options for our settings. The connection goes to a
/// resolved IP, so the name to verify is set explicitly: the configured host
/// (or `tls_server_name`), as for every other check.
fn ssl_opts(t: &TlsSettings, host: &str) -> SslOpts {
    let mut o = SslOpts::default().with_danger_tls_hostname_override(Some(t.name_for(host).to_string()));
    if let Some(ca) = &t.ca_file {
        o = o.with_root_certs(vec![ca.clone().into()]).with_disable_built_in_roots(true);
    }
    if let (Some(cert), Some(key)) = (&t.cert_file, &t.key_file) {
        o = o.with_client_identity(Some(ClientIdentity::new(cert.clone().into(), key.clone().into())));
    }
    o
}

// === Classification (pure) ===

/// The cause of a server error code.
pub fn cause_of_code(code: u16) -> Cause {
    match code {
        // Access denied: bad password (1045), no access to the database (1044),
        // no password given (1698), host not allowed (1130), client cannot do
        // the required auth method (1251).
        1044 | 1045 | 1130 | 1251 | 1698 => Cause::Auth,
        // Server-wide (1040) and per-user (1203, 1226) connection limits.
        1040 | 1203 | 1226 => Cause::TooManyConnections,
        1129 => Cause::HostBlocked,
        // 1047: "WSREP has not yet prepared node for application use";
        // 1290/1836: the statement is refused by --read-only / read-only mode;
        // 1053: server shutdown in progress.
        1047 | 1290 | 1836 | 1053 => Cause::NotReady,
        // The server aborted or killed the connection.
        1152 | 1184 | 1927 | 4031 => Cause::Reset,
        _ => Cause::ServerError,
    }
}

/// Whether a server error code means the connection itself is gone.
fn code_means_connection_lost(code: u16) -> bool {
    // 1053 shutdown, 1152/1184 aborted, 1927 killed, 4031 idle disconnect (MySQL 8).
    matches!(code, 1053 | 1152 | 1184 | 1927 | 4031)
}

/// Whether an error says the connection is gone (as opposed to the server
/// answering with an error on a working connection).
pub fn is_connection_lost(e: &mysql_async::Error) -> bool {
    match e {
        mysql_async::Error::Io(_) => true,
        mysql_async::Error::Driver(DriverError::ConnectionClosed) => true,
        mysql_async::Error::Server(s) => code_means_connection_lost(s.code),
        _ => false,
    }
}

/// Classifies a client-library error. `phase` tells whether a session was
/// already established (an I/O timeout is then a read timeout).
pub fn classify(e: &mysql_async::Error, phase: Phase, addr: &str) -> CheckError {
    match e {
        mysql_async::Error::Server(s) => CheckError::new(
            cause_of_code(s.code),
            format!("{addr}: server error {} ({}): {}", s.code, s.state, s.message),
        ),
        mysql_async::Error::Io(IoError::Io(io)) => {
            let tls = io.get_ref().is_some_and(|e| e.is::<tokio_rustls::rustls::Error>());
            let cause = match io.kind() {
                _ if tls => Cause::Tls,
                std::io::ErrorKind::InvalidData => Cause::Protocol,
                // The framed codec's "bytes remaining on stream": the peer
                // closed in the middle of a packet (e.g. of the greeting).
                // The TCP connection was made, so this is a reset, not the
                // refusal an unknown error in the connect phase defaults to.
                std::io::ErrorKind::Other => Cause::Reset,
                _ => classify_io(io, phase),
            };
            CheckError::new(cause, format!("{addr}: {io}"))
        }
        mysql_async::Error::Io(IoError::Tls(e)) => CheckError::new(Cause::Tls, format!("{addr}: {e}")),
        mysql_async::Error::Driver(d) => {
            let cause = match d {
                DriverError::ConnectionClosed => Cause::Reset,
                DriverError::UnknownAuthPlugin { .. }
                | DriverError::CleartextPluginDisabled
                | DriverError::MysqlOldPasswordDisabled => Cause::Auth,
                DriverError::NoClientSslFlagFromServer => Cause::Tls,
                _ => Cause::Protocol,
            };
            CheckError::new(cause, format!("{addr}: {d}"))
        }
        mysql_async::Error::Other(o) => CheckError::new(Cause::Protocol, format!("{addr}: {o}")),
        mysql_async::Error::Url(u) => CheckError::new(Cause::Config, format!("{addr}: {u}")),
    }
}

/// Reads a boolean system variable as the text protocol returns it
/// (`0`/`1`, or `OFF`/`ON` and the newer MariaDB `read_only` words).
fn value_is_on(v: &Value) -> Option<bool> {
    match v {
        Value::Int(i) => Some(*i != 0),
        Value::UInt(u) => Some(*u != 0),
        Value::Bytes(b) => {
            let s = String::from_utf8_lossy(b).trim().to_ascii_uppercase();
            match s.as_str() {
                "0" | "OFF" | "FALSE" => Some(false),
                "" => None,
                // "1", "ON", and MariaDB 11's NO_LOCK / NO_LOCK_NO_ADMIN variants.
                _ => Some(true),
            }
        }
        _ => None,
    }
}

/// Why a Galera node is not ready.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GaleraError {
    /// The wsrep status variables are absent.
    #[error("wsrep status variables are missing: not a Galera node, or wsrep is off")]
    NotGalera,
    /// The node is not in the Primary component.
    #[error("wsrep_cluster_status is {0}, not Primary")]
    NotPrimary(String),
    /// The node is not Synced (or Donor, when allowed).
    #[error("wsrep_local_state is {state} ({name}), not Synced")]
    NotSynced {
        /// The state number as the server reported it.
        state: String,
        /// Its name.
        name: &'static str,
    },
}

/// Judges a Galera node from `wsrep_local_state` and `wsrep_cluster_status`
/// like Percona's clustercheck: ready when the cluster component is Primary
/// and the node is Synced (4), or Donor/Desynced (2) if `allow_donor`.
pub fn galera_verdict(
    local_state: Option<&str>,
    cluster_status: Option<&str>,
    allow_donor: bool,
) -> Result<(), GaleraError> {
    let (Some(state), Some(status)) = (local_state, cluster_status) else {
        return Err(GaleraError::NotGalera);
    };
    if !status.eq_ignore_ascii_case("Primary") {
        return Err(GaleraError::NotPrimary(status.to_string()));
    }
    let name = match state.trim() {
        "1" => "Joining",
        "2" => "Donor/Desynced",
        "3" => "Joined",
        "4" => "Synced",
        _ => "unknown",
    };
    match state.trim() {
        "4" => Ok(()),
        "2" if allow_donor => Ok(()),
        s => Err(GaleraError::NotSynced { state: s.to_string(), name }),
    }
}

/// Whether a connection must be closed after each check because the server
/// would otherwise kill it while idle between checks (`wait_timeout`).
pub fn must_recycle(wait_timeout: Duration, longest_interval: Duration) -> bool {
    // Twice the interval covers jitter, the check's own duration and a
    // monitor that runs a little late.
    longest_interval.saturating_mul(2) >= wait_timeout
}

// === The check ===

/// What a check's exchange found, apart from library errors.
#[derive(Debug)]
enum Failure {
    /// The client library failed (I/O, protocol, server error packet).
    Mysql(mysql_async::Error),
    /// The server answered, and the answer means "not healthy".
    Judged(CheckError),
}

impl From<mysql_async::Error> for Failure {
    fn from(e: mysql_async::Error) -> Self {
        Failure::Mysql(e)
    }
}

/// An established, authenticated session.
struct Session {
    conn: Conn,
    addr: SocketAddr,
    /// The session's `@@wait_timeout`.
    wait_timeout: Duration,
    /// `VERSION()`.
    version: String,
    /// When the server last heard from us.
    last_used: Instant,
    /// Whether the connection count can be read on this session (a server
    /// or proxy that refuses the query is not judged on it).
    counts_connections: bool,
}

/// Progress of a background exchange, for classifying a timeout.
const STAGE_CONNECTING: u8 = 0;
const STAGE_ESTABLISHED: u8 = 1;

/// What a background exchange returns.
struct Outcome {
    /// The session, if one is (still) established.
    session: Option<Session>,
    result: Result<(), Failure>,
}

/// An exchange still running when its check's deadline passed.
struct Pending {
    task: JoinHandle<Outcome>,
    stage: Arc<AtomicU8>,
    addr: SocketAddr,
    since: Instant,
}

enum Slot {
    Empty,
    Idle(Session),
    Busy(Pending),
}

/// What a probe does, shared with the background tasks.
struct Probe {
    query: Option<String>,
    require_writable: bool,
    galera: Option<GaleraMode>,
    saturation: bool,
}

/// The `mysql` check.
pub struct MysqlCheck {
    settings: MysqlSettings,
    probe: Arc<Probe>,
    /// The longer of the dependency's two intervals.
    longest_interval: Duration,
    slot: Slot,
    server_version: Option<String>,
}

impl MysqlCheck {
    /// Builds the check.
    pub fn new(settings: MysqlSettings, dep: &DependencyConfig) -> Self {
        let probe = Arc::new(Probe {
            query: settings.query.clone(),
            require_writable: settings.require_writable,
            galera: settings.galera,
            saturation: settings.fail_on_saturation,
        });
        MysqlCheck {
            settings,
            probe,
            longest_interval: dep.interval.max(dep.interval_down),
            slot: Slot::Empty,
            server_version: None,
        }
    }

    /// Connection options for one resolved address.
    fn opts(&self, addr: SocketAddr, password: Option<String>) -> OptsBuilder {
        let s = &self.settings;
        let attrs = [("program_name".to_string(), "healthgate".to_string())].into_iter().collect();
        OptsBuilder::default()
            .ip_or_hostname(addr.ip().to_string())
            .tcp_port(addr.port())
            .user(Some(s.user.clone()))
            .pass(password)
            .db_name(s.database.clone())
            // Never switch to a Unix socket behind our back: we check the
            // network path the app uses.
            .prefer_socket(false)
            .stmt_cache_size(0)
            // Known values, so mysql_async runs no settings query at connect;
            // the check reads @@wait_timeout itself.
            .max_allowed_packet(Some(16 * 1024 * 1024))
            .wait_timeout(Some(28_800))
            .connect_attributes(attrs)
            .ssl_opts(s.tls.as_ref().map(|t| ssl_opts(t, &s.address.host)))
    }

    /// Waits until `deadline` for the exchange parked in the slot (if any).
    ///
    /// The task stays in the slot while it is awaited, so a check cancelled
    /// here leaves it for the next check to reclaim. On timeout it stays
    /// there too, unless it has been running for [`ABANDON_AFTER`].
    async fn await_busy(&mut self, deadline: Instant) -> Option<Result<Outcome, CheckError>> {
        let Slot::Busy(pending) = &mut self.slot else { return None };
        let waited = timeout_at(deadline, &mut pending.task).await;
        let result = match waited {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(join)) => {
                Err(CheckError::new(Cause::Protocol, format!("{}: check task failed: {join}", pending.addr)))
            }
            Err(_) => {
                let err = timeout_error(&pending.stage, pending.addr, pending.since);
                if pending.since.elapsed() < ABANDON_AFTER {
                    return Some(Err(err));
                }
                Err(err)
            }
        };
        if let Slot::Busy(p) = std::mem::replace(&mut self.slot, Slot::Empty)
            && !p.task.is_finished()
        {
            // Bounded by ABANDON_AFTER itself; let it end on its own.
            detach(p);
        }
        Some(result)
    }

    /// Runs `work` in a background task bounded by [`ABANDON_AFTER`] and
    /// waits for it until `deadline`.
    async fn run(
        &mut self,
        addr: SocketAddr,
        stage: Arc<AtomicU8>,
        deadline: Instant,
        work: impl Future<Output = Outcome> + Send + 'static,
    ) -> Result<Outcome, CheckError> {
        let since = Instant::now();
        let task_stage = stage.clone();
        let task = tokio::spawn(async move {
            match timeout(ABANDON_AFTER, work).await {
                Ok(o) => o,
                Err(_) => {
                    Outcome { session: None, result: Err(Failure::Judged(timeout_error(&task_stage, addr, since))) }
                }
            }
        });
        self.slot = Slot::Busy(Pending { task, stage, addr, since });
        self.await_busy(deadline).await.expect("the slot was just filled")
    }

    /// Keeps a healthy session for the next check, or closes it now when the
    /// server would kill it while idle before then (`wait_timeout`).
    fn keep(&mut self, mut s: Session) {
        s.last_used = Instant::now();
        self.server_version = Some(s.version.clone());
        if must_recycle(s.wait_timeout, self.longest_interval) {
            debug!(addr = %s.addr, wait_timeout = ?s.wait_timeout, "closing the check connection before wait_timeout");
            retire(s);
        } else {
            self.slot = Slot::Idle(s);
        }
    }

    /// Handles the outcome of an exchange with `addr`: keeps or retires the
    /// session and turns the result into the check's verdict.
    fn settle(&mut self, outcome: Outcome, phase: Phase, addr: SocketAddr) -> Result<(), CheckError> {
        let Outcome { session, result } = outcome;
        match result {
            Ok(()) => {
                if let Some(s) = session {
                    self.keep(s);
                }
                Ok(())
            }
            Err(Failure::Judged(e)) => {
                if let Some(s) = session {
                    self.keep(s);
                }
                Err(e)
            }
            Err(Failure::Mysql(e)) => {
                if let Some(s) = session {
                    if e.is_fatal() || is_connection_lost(&e) {
                        retire(s);
                    } else {
                        // A server error on a working connection (e.g. a failing query).
                        self.keep(s);
                    }
                }
                Err(classify(&e, phase, &addr.to_string()))
            }
        }
    }

    /// Opens a new session to one of the resolved addresses and probes it.
    async fn connect_and_probe(&mut self, deadline: Instant) -> Result<(), CheckError> {
        let password = match &self.settings.password {
            None => None,
            Some(src) => match src.read() {
                Ok(p) => Some(p.expose().to_string()),
                Err(e) => return Err(CheckError::new(Cause::Config, e.to_string())),
            },
        };
        let addrs = net::resolve(&self.settings.address, deadline).await?;
        self.try_addrs(&addrs, password, deadline).await
    }

    /// Tries each address in turn, each with an equal share of the time
    /// left, until one gives a verdict from the server itself.
    async fn try_addrs(
        &mut self,
        addrs: &[SocketAddr],
        password: Option<String>,
        deadline: Instant,
    ) -> Result<(), CheckError> {
        let mut failures: Vec<(SocketAddr, CheckError)> = Vec::new();
        for (i, addr) in addrs.iter().copied().enumerate() {
            let share = net::remaining(deadline) / (addrs.len() - i) as u32;
            let attempt_deadline = Instant::now() + share;
            let opts = self.opts(addr, password.clone());
            let probe = self.probe.clone();
            let stage = Arc::new(AtomicU8::new(STAGE_CONNECTING));
            let work = fresh_exchange(opts, addr, probe, stage.clone());
            match self.run(addr, stage, attempt_deadline, work).await {
                Ok(outcome) => {
                    let phase = if outcome.session.is_some() { Phase::Exchange } else { Phase::Connect };
                    match self.settle(outcome, phase, addr) {
                        Ok(()) => return Ok(()),
                        // The server itself answered: its verdict stands.
                        Err(e) if answered(&e) => return Err(with_others(e, &failures)),
                        Err(e) => failures.push((addr, e)),
                    }
                }
                Err(e) => {
                    // A timeout. If another address follows, let this attempt
                    // finish (and quit) in the background; the last one stays
                    // in the slot for the next check to reclaim.
                    if i + 1 < addrs.len()
                        && let Slot::Busy(p) = std::mem::replace(&mut self.slot, Slot::Empty)
                    {
                        detach(p);
                    }
                    failures.push((addr, e));
                }
            }
        }
        // Report the failure that says most about the server (a timeout over
        // a refusal, over a reset, over "unreachable"), and name every
        // address tried.
        let Some(best) = most_telling(failures.iter().map(|(_, e)| e)) else {
            return Err(CheckError::new(Cause::Dns, format!("{} has no address to try", self.settings.address)));
        };
        let (_, e) = failures.remove(best);
        Err(with_others(e, &failures))
    }
}

/// Whether the server itself answered (so other addresses of the same name,
/// the same server over IPv4/IPv6, need not be tried).
fn answered(e: &CheckError) -> bool {
    !matches!(e.cause, Cause::Refused | Cause::ConnectTimeout | Cause::ReadTimeout | Cause::Reset | Cause::Unreachable)
}

/// Adds the failures of addresses tried earlier to an error's message.
fn with_others(mut e: CheckError, earlier: &[(SocketAddr, CheckError)]) -> CheckError {
    if !earlier.is_empty() {
        let others = earlier.iter().map(|(a, f)| format!("{a}: {}", f.cause)).collect::<Vec<_>>().join(", ");
        e.message = format!("{} (also tried {others})", e.message);
    }
    e
}

/// The error for an exchange with `addr`, started at `since`, still
/// unanswered: a connect timeout until the session is established, then a
/// read timeout.
fn timeout_error(stage: &AtomicU8, addr: SocketAddr, since: Instant) -> CheckError {
    let waited = since.elapsed();
    if stage.load(Ordering::Acquire) == STAGE_CONNECTING {
        CheckError::new(Cause::ConnectTimeout, format!("{addr}: connect and handshake not complete after {waited:.1?}"))
    } else {
        CheckError::new(Cause::ReadTimeout, format!("{addr}: no reply after {waited:.1?}"))
    }
}

/// Lets a pending exchange finish in the background; whatever session it
/// ends with is closed with `COM_QUIT`.
fn detach(p: Pending) {
    tokio::spawn(async move {
        if let Ok(Outcome { session: Some(s), .. }) = p.task.await {
            quit(s).await;
        }
    });
}

/// Closes a session with `COM_QUIT` in the background, bounded by [`QUIT_BOUND`].
fn retire(s: Session) {
    tokio::spawn(quit(s));
}

/// Closes a session with `COM_QUIT`, bounded by [`QUIT_BOUND`].
async fn quit(s: Session) {
    let addr = s.addr;
    match timeout(QUIT_BOUND, s.conn.disconnect()).await {
        Ok(Ok(())) => debug!(%addr, "check connection closed with COM_QUIT"),
        Ok(Err(e)) => debug!(%addr, error = %e, "check connection already gone"),
        Err(_) => debug!(%addr, "COM_QUIT not flushed in time"),
    }
}

/// Connects, reads the session facts, then probes.
async fn fresh_exchange(opts: OptsBuilder, addr: SocketAddr, probe: Arc<Probe>, stage: Arc<AtomicU8>) -> Outcome {
    let mut conn = match Conn::new(opts).await {
        Ok(c) => c,
        Err(e) => return Outcome { session: None, result: Err(Failure::Mysql(e)) },
    };
    stage.store(STAGE_ESTABLISHED, Ordering::Release);
    let facts: Result<Option<(u64, String)>, _> = conn.query_first("SELECT @@wait_timeout, VERSION()").await;
    let (wait_timeout, version) = match facts {
        Ok(Some((w, v))) => (Duration::from_secs(w), v),
        Ok(None) => (Duration::from_secs(28_800), String::new()),
        Err(e) => {
            if !is_connection_lost(&e) {
                let _ = timeout(QUIT_BOUND, conn.disconnect()).await;
            }
            return Outcome { session: None, result: Err(Failure::Mysql(e)) };
        }
    };
    let mut session =
        Session { conn, addr, wait_timeout, version, last_used: Instant::now(), counts_connections: true };
    let result = run_probe(&mut session, &probe).await;
    Outcome { session: Some(session), result }
}

/// Probes an existing session.
async fn reuse_exchange(mut session: Session, probe: Arc<Probe>) -> Outcome {
    let result = run_probe(&mut session, &probe).await;
    Outcome { session: Some(session), result }
}

/// The probe proper: the query or `COM_PING`, then the readiness modes.
async fn run_probe(session: &mut Session, probe: &Probe) -> Result<(), Failure> {
    let conn = &mut session.conn;
    let mut round_trips = 0;
    if let Some(q) = &probe.query {
        conn.query_drop(q.as_str()).await?;
        round_trips += 1;
    }
    if probe.require_writable {
        check_writable(conn, session.version.contains("MariaDB")).await?;
        round_trips += 1;
    }
    if let Some(mode) = probe.galera {
        let rows: Vec<(String, String)> = conn
            .query("SHOW GLOBAL STATUS WHERE Variable_name IN ('wsrep_local_state', 'wsrep_cluster_status')")
            .await?;
        let get = |name: &str| rows.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str());
        galera_verdict(get("wsrep_local_state"), get("wsrep_cluster_status"), mode.allow_donor)
            .map_err(|m| Failure::Judged(CheckError::new(Cause::NotReady, format!("{}: {m}", session.addr))))?;
        round_trips += 1;
    }
    // COM_PING (5 bytes, answered by an 11-byte OK) comes before the larger
    // saturation read: on a slow link the exchange that overruns the deadline
    // and is taken back later is then the smallest possible one.
    if round_trips == 0 {
        conn.ping().await?;
    }
    if probe.saturation && session.counts_connections {
        let mariadb = session.version.contains("MariaDB");
        match connection_count(conn, mariadb).await {
            Ok(count) => {
                if let Some((used, max)) = count
                    && saturated(used, max)
                {
                    return Err(Failure::Judged(CheckError::new(
                        Cause::TooManyConnections,
                        format!(
                            "{}: {used} connections in use of max_connections {max}; new logins get error 1040",
                            session.addr
                        ),
                    )));
                }
            }
            Err(mysql_async::Error::Server(e)) => {
                debug!(addr = %session.addr, error = %e, "cannot read the connection count; saturation not checked");
                session.counts_connections = false;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Whether every ordinary connection slot is taken: with `used` connections
/// (`Threads_connected`, this session included) at `max_connections`, the
/// next login of a user without `CONNECTION ADMIN`/`SUPER` gets error 1040.
/// The one extra slot the server keeps for such an administrator does not
/// help the application, and MariaDB's `extra_port` connections (up to
/// `extra_max_connections`) are not counted in `Threads_connected`.
pub fn saturated(used: u64, max: u64) -> bool {
    max > 0 && used >= max
}

/// `(Threads_connected, @@max_connections)` in one round trip, `None` when
/// the server returns no row (MySQL with the performance schema off).
async fn connection_count(conn: &mut Conn, mariadb: bool) -> Result<Option<(u64, u64)>, mysql_async::Error> {
    // MySQL 5.7+ moved the status table to performance_schema; MariaDB keeps it in information_schema.
    let table = if mariadb { "information_schema.GLOBAL_STATUS" } else { "performance_schema.global_status" };
    let row: Option<(String, u64)> = conn
        .query_first(format!(
            "SELECT VARIABLE_VALUE, @@GLOBAL.max_connections FROM {table} \
             WHERE VARIABLE_NAME = 'Threads_connected'"
        ))
        .await?;
    Ok(row.and_then(|(used, max)| Some((used.trim().parse().ok()?, max))))
}

/// Fails with `not_ready` while the server refuses writes.
async fn check_writable(conn: &mut Conn, mariadb: bool) -> Result<(), Failure> {
    // MariaDB has no @@super_read_only; on MySQL it is read too, and an
    // "unknown system variable" (1193) falls back to @@read_only alone.
    let row: Option<mysql_async::Row> = if mariadb {
        conn.query_first("SELECT @@read_only").await?
    } else {
        match conn.query_first("SELECT @@read_only, @@super_read_only").await {
            Err(mysql_async::Error::Server(e)) if e.code == 1193 => conn.query_first("SELECT @@read_only").await?,
            other => other?,
        }
    };
    let values: Vec<Value> = row.map(|r| r.unwrap()).unwrap_or_default();
    let names = ["read_only", "super_read_only"];
    for (name, v) in names.iter().zip(&values) {
        match value_is_on(v) {
            Some(false) => {}
            Some(true) => {
                return Err(Failure::Judged(CheckError::new(Cause::NotReady, format!("@@{name} is on"))));
            }
            None => {
                return Err(Failure::Judged(CheckError::new(
                    Cause::Protocol,
                    format!("unexpected @@{name} value {v:?}"),
                )));
            }
        }
    }
    if values.is_empty() {
        return Err(Failure::Judged(CheckError::new(Cause::Protocol, "@@read_only returned no row")));
    }
    Ok(())
}

impl Check for MysqlCheck {
    async fn check(&mut self, deadline: Instant) -> Result<(), CheckError> {
        // 1. An exchange left over from an earlier check (it overran its
        //    deadline, or that check was cancelled): reclaim its connection.
        if let Slot::Busy(p) = &self.slot
            && p.stage.load(Ordering::Acquire) == STAGE_CONNECTING
            && !p.task.is_finished()
        {
            // A connect still pending from an earlier check: if the name no
            // longer resolves to its address (the server moved), stop waiting
            // for it and connect to the new address instead.
            let pending_addr = p.addr;
            if let Ok(addrs) = net::resolve(&self.settings.address, deadline).await
                && !addrs.contains(&pending_addr)
                && let Slot::Busy(p) = std::mem::replace(&mut self.slot, Slot::Empty)
            {
                debug!(addr = %pending_addr, "address no longer resolves; leaving its pending connect");
                detach(p);
            }
        }
        if let Some(waited) = self.await_busy(deadline).await {
            let outcome = waited?;
            // Its result belongs to the old check; only the session matters.
            match outcome {
                Outcome { session: Some(s), result: Ok(()) | Err(Failure::Judged(_)) } => self.slot = Slot::Idle(s),
                Outcome { session: Some(s), result: Err(Failure::Mysql(e)) }
                    if !e.is_fatal() && !is_connection_lost(&e) =>
                {
                    self.slot = Slot::Idle(s)
                }
                Outcome { session: Some(s), .. } => retire(s),
                Outcome { session: None, .. } => {}
            }
        }

        // 2. Reuse the idle session. If the server closed it while idle, open
        //    a new one once, within this check, before judging.
        if let Slot::Idle(session) = std::mem::replace(&mut self.slot, Slot::Empty) {
            if session.last_used.elapsed() >= session.wait_timeout {
                debug!(addr = %session.addr, "check connection idle past wait_timeout; reconnecting");
                retire(session);
            } else {
                let addr = session.addr;
                let stage = Arc::new(AtomicU8::new(STAGE_ESTABLISHED));
                let work = reuse_exchange(session, self.probe.clone());
                let outcome = self.run(addr, stage, deadline, work).await?;
                let lost = matches!(&outcome.result, Err(Failure::Mysql(e)) if is_connection_lost(e));
                if !lost {
                    return self.settle(outcome, Phase::Exchange, addr);
                }
                if let Err(Failure::Mysql(e)) = &outcome.result {
                    debug!(%addr, error = %e, "check connection lost while idle; reconnecting once");
                }
                if let Some(s) = outcome.session {
                    retire(s);
                }
            }
        }

        // 3. A new session.
        self.connect_and_probe(deadline).await
    }

    fn details(&self) -> Details {
        Details { server_version: self.server_version.clone(), ..Details::default() }
    }

    async fn close(&mut self, deadline: Instant) {
        let session = match std::mem::replace(&mut self.slot, Slot::Empty) {
            Slot::Empty => None,
            Slot::Idle(s) => Some(s),
            Slot::Busy(mut p) => match timeout_at(deadline, &mut p.task).await {
                Ok(Ok(outcome)) => outcome.session,
                Ok(Err(_)) => None,
                Err(_) => {
                    detach(p);
                    None
                }
            },
        };
        if let Some(s) = session {
            let addr = s.addr;
            match timeout_at(deadline, s.conn.disconnect()).await {
                Ok(_) => debug!(%addr, "check connection closed with COM_QUIT"),
                Err(_) => debug!(%addr, "COM_QUIT not flushed by the close deadline"),
            }
        }
    }
}

impl Drop for MysqlCheck {
    fn drop(&mut self) {
        // Without an explicit close(), still end connections with COM_QUIT
        // when a runtime is around to do it.
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        match std::mem::replace(&mut self.slot, Slot::Empty) {
            Slot::Empty => {}
            Slot::Idle(s) => retire(s),
            Slot::Busy(p) => detach(p),
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

    #[test]
    fn tls_true_verifies_against_the_configured_host() {
        let d = load("    type: mysql\n    address: db.internal\n    user: hg\n    tls: true\n")
            .unwrap()
            .dependencies
            .remove(0);
        let DependencyKind::Mysql(s) = d.kind else { panic!("not mysql: {d:?}") };
        let o = ssl_opts(s.tls.as_ref().unwrap(), &s.address.host);
        assert_eq!(o.tls_hostname_override(), Some("db.internal"));
        assert!(!o.accept_invalid_certs() && !o.skip_domain_validation());
    }

    fn check_of(dep: &str) -> MysqlCheck {
        let dep = load(dep).unwrap().dependencies.remove(0);
        match &dep.kind {
            DependencyKind::Mysql(s) => MysqlCheck::new(s.clone(), &dep),
            other => panic!("not mysql: {other:?}"),
        }
    }

    /// A port where nothing listens.
    fn closed_port() -> SocketAddr {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
    }

    #[tokio::test]
    async fn every_address_is_tried_and_the_telling_failure_is_reported() {
        // A listener that accepts (the kernel does) but never greets: like a frozen server.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let silent_addr = silent.local_addr().unwrap();
        let mut c = check_of("    type: mysql\n    address: db\n    user: hg\n");
        let start = Instant::now();
        let err =
            c.try_addrs(&[silent_addr, closed_port()], None, start + Duration::from_millis(400)).await.unwrap_err();
        // The silent address got half the time, then the next one was tried.
        assert!(start.elapsed() < Duration::from_millis(500), "{:?}", start.elapsed());
        assert!(matches!(err.cause, Cause::Refused | Cause::ConnectTimeout), "{err}");
        assert!(err.message.contains("also tried"), "{err}");
        assert!(err.message.contains(&silent_addr.to_string()), "{err}");

        let mut c = check_of("    type: mysql\n    address: db\n    user: hg\n");
        let err = c.try_addrs(&[closed_port(), closed_port()], None, Instant::now() + Duration::from_millis(400)).await;
        let err = err.unwrap_err();
        assert_eq!(err.cause, Cause::Refused, "{err}");
        assert!(err.message.contains("also tried"), "{err}");
    }

    #[tokio::test]
    async fn server_closing_mid_greeting_is_a_reset() {
        // Sends the first bytes of a handshake packet, then closes: a server
        // (or a proxy in front of it) dying in mid-handshake.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            while let Ok((mut s, _)) = l.accept().await {
                let _ = s.write_all(&[0x5b, 0x00, 0x00, 0x00]).await;
                let _ = s.shutdown().await;
            }
        });
        let mut c = check_of("    type: mysql\n    address: db\n    user: hg\n");
        let err = c.try_addrs(&[addr], None, Instant::now() + Duration::from_secs(2)).await.unwrap_err();
        assert_eq!(err.cause, Cause::Reset, "{err}");
    }

    #[test]
    fn saturated_when_connections_in_use_reach_max_connections() {
        // Our own session is among `used`: at max, the next ordinary login gets 1040.
        assert!(!saturated(9, 10));
        assert!(saturated(10, 10));
        // An administrator in the extra slot.
        assert!(saturated(11, 10));
        assert!(!saturated(5, 0), "no limit known");
    }

    #[test]
    fn error_codes_map_to_causes() {
        assert_eq!(cause_of_code(1045), Cause::Auth);
        assert_eq!(cause_of_code(1044), Cause::Auth);
        assert_eq!(cause_of_code(1698), Cause::Auth);
        assert_eq!(cause_of_code(1040), Cause::TooManyConnections);
        assert_eq!(cause_of_code(1226), Cause::TooManyConnections);
        assert_eq!(cause_of_code(1129), Cause::HostBlocked);
        assert_eq!(cause_of_code(1047), Cause::NotReady);
        assert_eq!(cause_of_code(1290), Cause::NotReady);
        assert_eq!(cause_of_code(1927), Cause::Reset);
        assert_eq!(cause_of_code(1064), Cause::ServerError);
        assert_eq!(cause_of_code(1146), Cause::ServerError);
    }

    #[test]
    fn library_errors_are_classified() {
        let server = |code| {
            mysql_async::Error::Server(mysql_async::ServerError { code, message: "m".into(), state: "HY000".into() })
        };
        assert_eq!(classify(&server(1045), Phase::Connect, "a").cause, Cause::Auth);
        let io = |k| mysql_async::Error::Io(IoError::Io(std::io::Error::new(k, "x")));
        assert_eq!(classify(&io(std::io::ErrorKind::ConnectionRefused), Phase::Connect, "a").cause, Cause::Refused);
        assert_eq!(classify(&io(std::io::ErrorKind::UnexpectedEof), Phase::Exchange, "a").cause, Cause::Reset);
        assert_eq!(classify(&io(std::io::ErrorKind::InvalidData), Phase::Exchange, "a").cause, Cause::Protocol);
        let plugin = mysql_async::Error::Driver(DriverError::UnknownAuthPlugin { name: "x".into() });
        assert_eq!(classify(&plugin, Phase::Connect, "a").cause, Cause::Auth);
        let ooo = mysql_async::Error::Driver(DriverError::PacketOutOfOrder);
        assert_eq!(classify(&ooo, Phase::Exchange, "a").cause, Cause::Protocol);
        assert!(is_connection_lost(&io(std::io::ErrorKind::ConnectionReset)));
        assert!(is_connection_lost(&server(4031)));
        assert!(!is_connection_lost(&server(1064)));
    }

    #[test]
    fn galera_states_are_judged_like_clustercheck() {
        assert!(galera_verdict(Some("4"), Some("Primary"), false).is_ok());
        assert!(galera_verdict(Some("2"), Some("Primary"), false).is_err());
        assert!(galera_verdict(Some("2"), Some("Primary"), true).is_ok());
        assert!(galera_verdict(Some("1"), Some("Primary"), true).is_err());
        assert!(galera_verdict(Some("3"), Some("Primary"), true).is_err());
        let e = galera_verdict(Some("4"), Some("non-Primary"), false).unwrap_err().to_string();
        assert!(e.contains("non-Primary"), "{e}");
        assert!(galera_verdict(None, None, false).unwrap_err().to_string().contains("not a Galera node"));
    }

    #[test]
    fn read_only_values_are_understood() {
        assert_eq!(value_is_on(&Value::Bytes(b"0".to_vec())), Some(false));
        assert_eq!(value_is_on(&Value::Bytes(b"1".to_vec())), Some(true));
        assert_eq!(value_is_on(&Value::Bytes(b"OFF".to_vec())), Some(false));
        assert_eq!(value_is_on(&Value::Bytes(b"NO_LOCK".to_vec())), Some(true));
        assert_eq!(value_is_on(&Value::Int(0)), Some(false));
        assert_eq!(value_is_on(&Value::NULL), None);
    }

    #[test]
    fn connection_is_recycled_when_interval_nears_wait_timeout() {
        let s = Duration::from_secs;
        assert!(must_recycle(s(1), s(2)));
        assert!(must_recycle(s(4), s(2)));
        assert!(!must_recycle(s(5), s(2)));
        assert!(!must_recycle(s(28_800), s(2)));
    }
}
